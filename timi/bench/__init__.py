"""``timi bench``: TIMI's cost against plain Hunyuan3D sampling, fused vs explicit guidance memory,
JAX vs PyTorch, and scaling in K instances and L latent tokens (issue 7; results in
``docs/benchmarks.md``).

Sub-modules: :mod:`.config` (shapes and presets), :mod:`.floor` (the FLOP floor of the overhead),
:mod:`.torch_backend` / :mod:`.jax_backend` (the adapters' samplers on random weights),
:mod:`.runs` (overhead, scaling, backends), :mod:`.guidance_pass` (time and peak memory of one
guidance pass), :mod:`.timing`, :mod:`.cli`. Run as ``timi bench ...`` or ``python -m timi.bench ...``.
"""

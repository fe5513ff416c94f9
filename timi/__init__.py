"""TIMI application layer: the ``timi`` command line, metrics, evaluation, benchmarks and testbed.

Built on :mod:`timi_core` (the paper's equations, framework-agnostic) and the adapters
:mod:`timi_torch` (hy3dgen / PyTorch) and :mod:`timi_jax` (Flax).
"""

__version__ = "0.1.0"

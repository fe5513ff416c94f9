"""Parity of timi_jax.Hunyuan3DDiT with hy3dgen's torch Hunyuan3DDiT (same random weights).

Tolerances are relative to the largest magnitude of the reference: ``max|jax - torch| /
max|torch|``. float32: 1e-5 per block and for the full forward. bfloat16: the JAX bf16 model's
error against the float32 reference stays below 3e-2 and below 3x the torch bf16 model's own
error (measured ~0.5-1.5x).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy
hdit = pytest.importorskip("hy3dgen.shapegen.models.denoisers.hunyuan3ddit")

from flax import nnx  # noqa: E402

import timi_jax  # noqa: E402
from timi_jax.modeling import timestep_embedding  # noqa: E402

CONFIGS = {
    # odd head count, qkv bias (hy3dgen's default)
    "h24-heads3": dict(in_channels=8, context_in_dim=12, hidden_size=24, mlp_ratio=2.0, num_heads=3,
                       depth=2, depth_single_blocks=2, axes_dim=[8]),
    # five heads of width 4, no qkv bias, more single blocks
    "h20-heads5-nobias": dict(in_channels=4, context_in_dim=6, hidden_size=20, mlp_ratio=4.0,
                              num_heads=5, depth=1, depth_single_blocks=3, axes_dim=[4],
                              qkv_bias=False),
    # one head, no single blocks, guidance-distilled embedding
    "h16-heads1-guidance": dict(in_channels=6, context_in_dim=10, hidden_size=16, mlp_ratio=1.5,
                                num_heads=1, depth=3, depth_single_blocks=0, axes_dim=[16],
                                guidance_embed=True),
}


def rel_err(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32)) if not isinstance(out, np.ndarray) else out
    ref = ref.detach().float().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    return float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())


def make_torch_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = hdit.Hunyuan3DDiT(**cfg).eval()
    with torch.no_grad():  # RMSNorm scales start at 1: perturb them so that the copy is checked
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def inputs(cfg, b=2, length=7, m=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, cfg["in_channels"], generator=g)
    t = torch.rand(b, generator=g)
    cond = torch.randn(b, m, cfg["context_in_dim"], generator=g)
    return x, t, cond


def j(a):
    return jnp.asarray(a.detach().numpy())


# jitted calls: one compilation per shape, instead of op-by-op eager dispatch (slow on CPU)
forward = nnx.jit(lambda m, x, t, c, g=None: m(x, t, c, g))
embed = nnx.jit(lambda m, x, t, c, g=None: m.embed(x, t, c, g))
call = nnx.jit(lambda module, *args: module(*args))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    cfg = CONFIGS[request.param]
    tm = make_torch_model(cfg)
    return cfg, tm, timi_jax.from_torch(tm)


def test_timestep_embedding_matches_hy3dgen():
    t = torch.rand(16)
    ref = hdit.timestep_embedding(t, 256, 1000.0)  # hy3dgen's call: time_factor as max_period
    out = timestep_embedding(j(t), 256, 1000.0)
    # arguments reach 1000 rad: one float32 ulp of the frequency gives ~3e-5 in cos/sin
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-4, rtol=0)
    ref_small = hdit.timestep_embedding(t * 1e-3, 255, 1000.0)  # odd dim pads a zero column
    np.testing.assert_allclose(np.asarray(timestep_embedding(j(t * 1e-3), 255, 1000.0)),
                               ref_small.numpy(), atol=1e-6, rtol=0)


def test_every_block_matches_torch(pair):
    cfg, tm, jm = pair
    x, t, cond = inputs(cfg)
    guidance = torch.full((2,), 5.0) if cfg.get("guidance_embed") else None
    with torch.no_grad():
        latent = tm.latent_in(x)
        vec = tm.time_in(hdit.timestep_embedding(t, 256, tm.time_factor).to(latent.dtype))
        if guidance is not None:
            vec = vec + tm.guidance_in(hdit.timestep_embedding(guidance, 256, tm.time_factor))
        c = tm.cond_in(cond)
    jl, jc, jv = embed(jm, j(x), j(t), j(cond), None if guidance is None else j(guidance))
    # the guidance embedding's sin/cos arguments reach 5000 rad (scale 5 x time_factor 1000), where XLA's
    # and torch's float32 range reductions differ by up to ~1e-5 relative, depending on the CPU (1.2e-5 on
    # a 2-vCPU AMD EPYC, below 1e-5 elsewhere); see test_timestep_embedding_matches_hy3dgen
    vec_tol = 3e-5 if guidance is not None else 1e-5
    assert rel_err(jl, latent) < 1e-6 and rel_err(jc, c) < 1e-6 and rel_err(jv, vec) < vec_tol
    for i, (tb, jb) in enumerate(zip(tm.double_blocks, jm.double_blocks)):
        with torch.no_grad():
            img, txt = tb(img=latent, txt=c, vec=vec, pe=None)
        ji, jt = call(jb, j(latent), j(c), j(vec))  # same inputs: each block checked on its own
        assert rel_err(ji, img) < 1e-5, f"double block {i} (latent stream)"
        assert rel_err(jt, txt) < 1e-5, f"double block {i} (condition stream)"
        latent, c = img, txt
    h = torch.cat([c, latent], 1)
    for i, (tb, jb) in enumerate(zip(tm.single_blocks, jm.single_blocks)):
        with torch.no_grad():
            out = tb(h, vec=vec, pe=None)
        assert rel_err(call(jb, j(h), j(vec)), out) < 1e-5, f"single block {i}"
        h = out
    with torch.no_grad():
        final = tm.final_layer(h[:, c.shape[1]:], vec)
    assert rel_err(call(jm.final_layer, j(h[:, c.shape[1]:]), j(vec)), final) < 1e-5


@pytest.mark.parametrize("shape", [(1, 3, 1), (3, 16, 11)])  # (2, 7, 5): the block test
def test_full_forward_matches_torch(pair, shape):
    cfg, tm, jm = pair
    b, length, m = shape
    x, t, cond = inputs(cfg, b, length, m, seed=sum(shape))
    kw = {"guidance": torch.full((b,), 3.5)} if cfg.get("guidance_embed") else {}
    with torch.no_grad():
        ref = tm(x, t, {"main": cond}, **kw)
    out = forward(jm, j(x), j(t), j(cond), *[j(v) for v in kw.values()])
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert rel_err(out, ref) < 1e-5
    if shape == (1, 3, 1):  # hy3dgen's calling convention, contexts={'main': cond}
        same = forward(jm, j(x), j(t), {"main": j(cond)}, *[j(v) for v in kw.values()])
        np.testing.assert_array_equal(np.asarray(same), np.asarray(out))


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_half_precision_within_bound(dtype_name):
    cfg = CONFIGS["h24-heads3"]
    tm = make_torch_model(cfg)
    x, t, cond = inputs(cfg, 2, 16, 9)
    with torch.no_grad():
        ref = tm(x, t, {"main": cond})
        tdt = getattr(torch, dtype_name)
        t_half = make_torch_model(cfg).to(tdt)(x.to(tdt), t.to(tdt), {"main": cond.to(tdt)})
    jdt = getattr(jnp, dtype_name)
    jm = timi_jax.from_torch(tm, dtype=jdt)
    assert jm.latent_in.kernel[...].dtype == jdt
    out = forward(jm, j(x), j(t), j(cond))
    assert out.dtype == jdt
    err, torch_err = rel_err(out, ref), rel_err(t_half.float().numpy(), ref)
    bound = 3e-2 if dtype_name == "bfloat16" else 5e-3
    assert err < bound, (err, torch_err)
    assert err < 3 * torch_err + 1e-4, (err, torch_err)
    if dtype_name == "bfloat16":  # float32 compute over stored bf16 weights
        jm_mixed = timi_jax.from_torch(tm, dtype=jnp.float32, param_dtype=jdt)
        assert jm_mixed.latent_in.kernel[...].dtype == jdt
        mixed = forward(jm_mixed, j(x), j(t), j(cond))
        assert mixed.dtype == jnp.float32 and rel_err(mixed, ref) < err


def test_same_parameters_as_hy3dgen_and_errors():
    for cfg in CONFIGS.values():
        abstract = nnx.eval_shape(lambda: timi_jax.Hunyuan3DDiT(**cfg))
        n = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
        assert n == sum(p.numel() for p in hdit.Hunyuan3DDiT(**cfg).parameters())
    v20 = nnx.eval_shape(lambda: timi_jax.Hunyuan3DDiT())  # hy3dgen's defaults: the v2.0 DiT
    n = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(v20, nnx.Param)))
    assert n == 1_113_274_432  # hy3dgen's count (shared/notes/hy3dgen-facts.md)
    assert v20.config == timi_jax.ModelConfig() == timi_jax.PRESETS["v2.0"] == timi_jax.ModelConfig.v2_0()
    mini = nnx.eval_shape(lambda: timi_jax.Hunyuan3DDiT(timi_jax.PRESETS["testbed"]))
    assert (mini.hidden_size, mini.depth, mini.config) == (128, 4, timi_jax.ModelConfig.testbed())
    deeper = nnx.eval_shape(lambda: timi_jax.Hunyuan3DDiT(timi_jax.PRESETS["testbed"], depth=2))  # kwargs replace fields
    assert deeper.config == timi_jax.PRESETS["testbed"].replace(depth=2) and len(deeper.double_blocks) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        timi_jax.PRESETS["testbed"].depth = 3
    with pytest.raises(ValueError, match="divisible"):
        timi_jax.ModelConfig(hidden_size=10, num_heads=3)
    with pytest.raises(ValueError, match="divisible"):
        timi_jax.Hunyuan3DDiT(hidden_size=10, num_heads=3)
    with pytest.raises(ValueError, match="axes_dim"):
        timi_jax.Hunyuan3DDiT(in_channels=4, context_in_dim=4, hidden_size=8, num_heads=2, depth=1,
                              depth_single_blocks=1, axes_dim=[64])
    jm = timi_jax.from_torch(make_torch_model(CONFIGS["h16-heads1-guidance"]))
    with pytest.raises(ValueError, match="guidance"):
        jm.embed(jnp.zeros((1, 2, 6)), jnp.zeros((1,)), jnp.zeros((1, 3, 10)))


@pytest.mark.parametrize("logit_scale", [1.0, 60.0])
def test_attention_matches_jax_dot_product_attention(logit_scale):
    """The CPU attention (output normalised after the value product) equals
    ``jax.nn.dot_product_attention``, values and gradients, also for logits far beyond exp's
    float32 range (the row maximum guards it)."""
    from timi_jax.modeling import attention

    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(keys[i], (2, 9, 3, 8)) for i in range(3))
    q = q * logit_scale
    w = jax.random.normal(keys[3], (2, 9, 24))

    def loss(fn, q, k, v):
        return jnp.sum(w * fn(q, k, v).reshape(2, 9, 24))

    ref_fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v)  # noqa: E731
    out, ref = attention(q, k, v), ref_fn(q, k, v).reshape(2, 9, 24)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6)
    grads = jax.grad(lambda *a: loss(attention, *a), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(lambda *a: loss(ref_fn, *a), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))

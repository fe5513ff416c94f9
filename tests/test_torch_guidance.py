"""ISG on hy3dgen's DiT: fused SDPA vs explicit softmax P, truncation, float32, independence."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

import timi_core
from timi_core import TIMIConfig
from timi_torch import TIMIPipeline
from timi_torch.guidance import guided_probabilities, separation_loss_and_grad
from torch_helpers import fast_base, fast_dir, fast_root, load_base, scene  # noqa: F401  (fixtures)

CFG = TIMIConfig(guided_layers=2, guided_steps=3)


def _inputs(base, batch=2, seed=0):
    """Latents, timestep, conditional embedding and (B, K, M) token masks of the two-object scene."""
    img, masks = scene(alpha=True)
    cm = TIMIPipeline(base).condition_masks(img, masks)
    cond = base.conditioner(base.prepare_image([cm.image] * batch)["image"])["main"]
    z = torch.randn((batch, *base.vae.latent_shape), generator=torch.Generator().manual_seed(seed))
    t = torch.full((batch,), 0.3)
    tokens = cm.tokens[None].repeat(batch, 1, 1)
    return z, t, cond, tokens


def _grad(base, z, t, cond, tokens, mode, config=CFG):
    return separation_loss_and_grad(base.model, z, t, cond, tokens, config, config.guided_layers, mode)


def test_fused_and_explicit_give_the_same_P_and_gradient(fast_base):
    z, t, cond, tokens = _inputs(fast_base)
    tokens[1, 0] = 0.5 * tokens[1, 0]                 # a different mask set for sample 1
    with torch.no_grad():
        P_f = guided_probabilities(fast_base.model, z, t, cond, tokens, 2, "fused")
        P_e = guided_probabilities(fast_base.model, z, t, cond, tokens, 2, "explicit")
    for a, b in zip(P_f, P_e):
        assert a.shape == (2, 64, 2) and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    loss_f, g_f = _grad(fast_base, z, t, cond, tokens, "fused")
    loss_e, g_e = _grad(fast_base, z, t, cond, tokens, "explicit")
    torch.testing.assert_close(loss_f, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_f, g_e, rtol=1e-4, atol=1e-7)
    assert g_f.abs().max() > 0


def test_fused_and_explicit_agree_per_head_and_per_head_is_another_loss(fast_base):
    """``TIMIConfig.per_head``: P (B, H, L, K) whose head mean is the usual P; Eqs.3-4 per head
    then averaged is not Eq.4 of the averaged map (the loss is not linear in P)."""
    z, t, cond, tokens = _inputs(fast_base)
    heads = fast_base.model.double_blocks[0].num_heads
    assert heads > 1
    with torch.no_grad():
        P_h = guided_probabilities(fast_base.model, z, t, cond, tokens, 2, "fused", per_head=True)
        P_e = guided_probabilities(fast_base.model, z, t, cond, tokens, 2, "explicit", per_head=True)
        P = guided_probabilities(fast_base.model, z, t, cond, tokens, 2, "fused")
    for a, b, m in zip(P_h, P_e, P):
        assert a.shape == (2, heads, 64, 2)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.mean(dim=1), m, rtol=1e-5, atol=1e-7)
    cfg = CFG.replace(per_head=True)
    loss_f, g_f = _grad(fast_base, z, t, cond, tokens, "fused", cfg)
    loss_e, g_e = _grad(fast_base, z, t, cond, tokens, "explicit", cfg)
    torch.testing.assert_close(loss_f, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_f, g_e, rtol=1e-4, atol=1e-7)
    expected = torch.stack([timi_core.instance_separation_loss(p, CFG.eps) for p in P_h]).mean(dim=(0, 2))
    torch.testing.assert_close(loss_f, expected, rtol=1e-5, atol=1e-6)
    loss_avg, _ = _grad(fast_base, z, t, cond, tokens, "fused")
    assert not torch.allclose(loss_f, loss_avg, rtol=1e-3)


def test_P_of_the_first_block_matches_an_independent_computation(fast_base):
    """Rebuild block 0's attention from its weights (token order [cond; latent], RMS QK-norm)."""
    model = fast_base.model
    z, t, cond, tokens = _inputs(fast_base, batch=1)
    with torch.no_grad():
        (P,) = guided_probabilities(model, z, t, cond, tokens, 1, "fused")
        (P_h,) = guided_probabilities(model, z, t, cond, tokens, 1, "fused", per_head=True)
        from hy3dgen.shapegen.models.denoisers.hunyuan3ddit import timestep_embedding
        block = model.double_blocks[0]
        vec = model.time_in(timestep_embedding(t, 256, model.time_factor))

        def qk(stream, x):
            mod, _ = getattr(block, f"{stream}_mod")(vec)
            h = (1 + mod.scale) * getattr(block, f"{stream}_norm1")(x) + mod.shift
            q, k, _ = rearrange(getattr(block, f"{stream}_attn").qkv(h), "B L (K H D) -> K B H L D", K=3,
                                H=block.num_heads)
            norm = getattr(block, f"{stream}_attn").norm
            return norm.query_norm(q), norm.key_norm(k)

        q_img, k_img = qk("img", model.latent_in(z))
        _, k_txt = qk("txt", model.cond_in(cond))
        keys = torch.cat([k_txt, k_img], dim=2)
        heads = torch.softmax(q_img @ keys.transpose(-1, -2) / q_img.shape[-1] ** 0.5, dim=-1)
        attn = heads.mean(1)
        expected = timi_core.instance_probability(attn[0, :, : cond.shape[1]], tokens[0])
        expected_h = timi_core.instance_probability(heads[0, :, :, : cond.shape[1]], tokens[0])
    torch.testing.assert_close(P[0], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(P_h[0], expected_h, rtol=1e-5, atol=1e-7)


def test_forward_stops_after_the_last_guided_block(fast_base):
    z, t, cond, tokens = _inputs(fast_base, batch=1)
    model = fast_base.model
    called = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: called.append(name))
             for name, m in [("double0", model.double_blocks[0]), ("double1", model.double_blocks[1]),
                             ("single0", model.single_blocks[0]), ("final", model.final_layer)]]
    try:
        _grad(fast_base, z, t, cond, tokens, "fused", CFG.replace(guided_layers=1))
        with torch.no_grad():
            guided_probabilities(model, z, t, cond, tokens, 1)
    finally:
        for h in hooks:
            h.remove()
    assert called == ["double0", "double0"]
    from hy3dgen.shapegen.models.denoisers import hunyuan3ddit
    assert hunyuan3ddit.attention.__name__ == "attention" and hunyuan3ddit.attention.__module__ == hunyuan3ddit.__name__


def test_samples_are_independent_and_padding_is_exact(fast_base):
    z, t, cond, tokens = _inputs(fast_base, batch=2)
    loss2, g2 = _grad(fast_base, z, t, cond, tokens, "fused")
    loss1, g1 = _grad(fast_base, z[:1], t[:1], cond[:1], tokens[:1], "fused")
    torch.testing.assert_close(loss2[:1], loss1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g2[:1], g1, rtol=1e-4, atol=1e-7)
    # one instance, alone vs padded with an all-zero mask next to a two-instance sample
    single = tokens[:1, :1]
    loss_a, g_a = _grad(fast_base, z[:1], t[:1], cond[:1], single, "fused")
    padded = torch.cat([single, torch.zeros_like(single)], dim=1)
    loss_b, g_b = _grad(fast_base, z[:1], t[:1], cond[:1], padded, "fused")
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(g_a, g_b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_gives_float32_loss_and_gradient(fast_dir, fast_base, dtype):
    z, t, cond, tokens = _inputs(fast_base, batch=1)
    ref_loss, ref_g = _grad(fast_base, z, t, cond, tokens, "fused")
    low = load_base(fast_dir, dtype=dtype)
    loss, g = _grad(low, z.to(dtype), t.to(dtype), cond.to(dtype), tokens, "fused")
    assert loss.dtype == torch.float32 and g.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)
    cos = torch.nn.functional.cosine_similarity(g.flatten(), ref_g.flatten(), dim=0)
    assert cos > 0.9, float(cos)


def test_one_guided_update_lowers_the_loss(fast_base):
    z, t, cond, tokens = _inputs(fast_base, batch=2)
    pipe = TIMIPipeline(fast_base, CFG.replace(beta=0.0))
    z_new, m, diag = pipe.guide(z, t, cond, tokens)
    before, _ = _grad(fast_base, z, t, cond, tokens, "fused")
    after, _ = _grad(fast_base, z_new, t, cond, tokens, "fused")
    assert torch.all(after < before), (before, after)
    torch.testing.assert_close(z - z_new, m)
    assert diag.loss == pytest.approx(before.tolist())
    # GM (Eq.6): the largest update of each sample is alpha * std(z_t) (up to eps / max|g|)
    bound = CFG.alpha * z.flatten(1).std(1, correction=0)
    got = torch.tensor(diag.max_update)
    assert torch.all(got <= bound * (1 + 1e-6)) and torch.all(got >= bound * (1 - 1e-3)), (got, bound)


def test_update_smooths_along_the_token_axis_like_scipy(fast_base):
    """SGU with beta=0: dz = lambda * gaussian_filter1d(dL/dz, sigma, axis=1) (Eqs.5-6, SciPy reference)."""
    from scipy.ndimage import gaussian_filter1d

    z, t, cond, tokens = _inputs(fast_base, batch=2)
    cfg = CFG.replace(beta=0.0, common="keep")  # the paper's Eqs.5-6 as written
    z_new, m, _ = TIMIPipeline(fast_base, cfg).guide(z, t, cond, tokens)
    _, g = _grad(fast_base, z, t, cond, tokens, "fused")
    g_reg = gaussian_filter1d(g.double().numpy(), cfg.sigma, axis=1, mode="reflect", truncate=4.0)
    zd = z.double().numpy()
    lam = cfg.alpha * zd.std(axis=(1, 2), keepdims=True) / (abs(g_reg).max(axis=(1, 2), keepdims=True) + cfg.eps)
    torch.testing.assert_close(m.double(), torch.from_numpy(lam * g_reg), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("K", [1, 3, 16, 37])
def test_fused_probability_for_any_number_of_instances(K):
    """Masks are padded / chunked to the head width (16 here); P equals the explicit softmax's."""
    from timi_torch.guidance import explicit_probability, fused_probability

    g = torch.Generator().manual_seed(K)
    q = torch.randn(2, 3, 40, 16, generator=g, dtype=torch.float64).float()
    k = torch.randn(2, 3, 90, 16, generator=g, dtype=torch.float64).float()
    tokens = torch.rand(2, K, 50, generator=g)
    torch.testing.assert_close(fused_probability(q, k, tokens), explicit_probability(q, k, tokens),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("K", [1, 3, 9])
def test_one_call_gives_hy3dgens_attention_output_and_P(K, dtype):
    """The padded single SDPA: output == rearranged SDPA(q, k, v) in v's dtype, P == explicit softmax's."""
    from timi_torch.guidance import attention_and_probability, explicit_probability

    g = torch.Generator().manual_seed(K)
    q, k, v = (torch.randn(2, 3, 90, 16, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    tokens = torch.rand(2, K, 50, generator=g)
    out, P = attention_and_probability(q, k, v, tokens)
    expected = rearrange(torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()),
                         "B H L D -> B L (H D)")
    assert out.dtype == dtype and out.shape == (2, 90, 48) and P.dtype == torch.float32
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}      # fp16: assert_close's defaults
    torch.testing.assert_close(out, expected.to(dtype), **tol)
    torch.testing.assert_close(P, explicit_probability(q[:, :, 50:], k, tokens), rtol=1e-5, atol=1e-7)


def test_fused_runs_one_sdpa_per_guided_block_with_hy3dgens_block_output(fast_base, monkeypatch):
    """guided_layers=2: 1 combined + 1 P-only SDPA call (was 3); block 0's output equals hy3dgen's."""
    from hy3dgen.shapegen.models.denoisers import hunyuan3ddit

    z, t, cond, tokens = _inputs(fast_base, batch=1)
    calls = []

    def counting(sdpa):
        return lambda *a, **kw: calls.append(1) or sdpa(*a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        counting(torch.nn.functional.scaled_dot_product_attention))
    monkeypatch.setattr(hunyuan3ddit, "scaled_dot_product_attention",
                        counting(hunyuan3ddit.scaled_dot_product_attention))
    outputs = []
    hook = fast_base.model.double_blocks[0].register_forward_hook(lambda mod, args, out: outputs.append(out))
    try:
        with torch.no_grad():
            guided_probabilities(fast_base.model, z, t, cond, tokens, 2, "fused")
            assert len(calls) == 2
            guided_probabilities(fast_base.model, z, t, cond, tokens, 2, "explicit")   # hy3dgen's attention
    finally:
        hook.remove()
    for fused, explicit in zip(*outputs):
        torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)


def test_captures_in_two_threads_do_not_see_each_other(fast_base):
    """Issue 30: a run's attention capture is its own. While thread A sits inside an observing
    capture (blocked in its observer, mid-forward), this thread's guided P (another instance count)
    and a plain forward are those of a solo run; A then sees only its own calls; hy3dgen's
    ``attention`` is back once both are done."""
    import threading

    from hy3dgen.shapegen.models.denoisers import hunyuan3ddit
    from timi_torch.guidance import observe_attention

    model = fast_base.model
    original = hunyuan3ddit.attention
    z2, t2, cond2, tokens2 = _inputs(fast_base, batch=2)
    z1, t1, cond1, tokens1 = _inputs(fast_base, batch=1, seed=1)
    tokens1 = tokens1[:, :1]                                   # one instance here, two in thread A

    def observed(seen, wait=None):
        def observer(layer, q, k):
            seen.append((layer, q.shape[0], q.clone()))
            if wait is not None and layer == 0:
                wait()
        with torch.no_grad(), observe_attention(observer, 2, cond2.shape[1]):
            model(z2, t2, {"main": cond2})
        return seen

    with torch.no_grad():
        solo_P = guided_probabilities(model, z1, t1, cond1, tokens1, 2, "fused")
        solo_out = model(z1, t1, {"main": cond1})
    solo_seen = observed([])
    inside, go, seen, errors = threading.Event(), threading.Event(), [], []

    def wait():
        inside.set()
        assert go.wait(60)

    def thread_a():
        try:
            observed(seen, wait)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            inside.set()

    a = threading.Thread(target=thread_a)
    a.start()
    try:
        assert inside.wait(60)
        with torch.no_grad():
            P = guided_probabilities(model, z1, t1, cond1, tokens1, 2, "fused")
            out = model(z1, t1, {"main": cond1})
    finally:
        go.set()
        a.join(60)
    assert not errors
    for p, q in zip(P, solo_P):
        assert p.shape == (1, 64, 1)
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert torch.equal(out, solo_out)
    assert [(layer, b) for layer, b, _ in seen] == [(0, 2), (1, 2)]
    assert all(torch.equal(q, r) for (_, _, q), (_, _, r) in zip(seen, solo_seen))
    assert hunyuan3ddit.attention is original

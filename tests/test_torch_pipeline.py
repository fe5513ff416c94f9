"""TIMIPipeline on a tiny random-weight model loaded by hy3dgen's real loaders (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch
import trimesh
from PIL import Image

from timi_torch import TIMIConfig, TIMIPipeline
from torch_helpers import (MODEL_ID, SUBFOLDER, fast_base, fast_dir, fast_root, load_base, scene,  # noqa: F401  (fixtures)
                           tiny_base, tiny_dir, tiny_root)

STEPS = 5
GUIDED = TIMIConfig(guided_layers=2, guided_steps=4)


@pytest.fixture(scope="module")
def fast_base_bf16(fast_dir):
    return load_base(fast_dir, dtype=torch.bfloat16)


def _call(pipe, seed=0, image=None, masks=None, **kw):
    """The pipeline's TIMIPipelineOutput for the test scene."""
    img, m = scene(alpha=True)
    kw.setdefault("output_type", "latent")
    return pipe(img if image is None else image, m if masks is None else masks, num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(seed), enable_pbar=False, **kw)


def _run(pipe, seed=0, image=None, masks=None, **kw):
    """The call's latents (its meshes for a mesh output_type)."""
    out = _call(pipe, seed, image, masks, **kw)
    return out.latents if out.meshes is None else out.meshes


@pytest.mark.parametrize("config, model", [(TIMIConfig(guided_steps=0), "tiny_base"), (TIMIConfig(isg=False), "fast_base"),
                                           (TIMIConfig(guided_steps=0), "fast_base_bf16")],
                         ids=["steps0-518px", "isg_off-112px", "steps0-112px-bf16"])
def test_guidance_off_equals_hy3dgen_bitwise(config, model, request):
    """Guidance off: hy3dgen's loop in the model dtype (no float32 master latent), bit for bit."""
    tiny_base = request.getfixturevalue(model)
    img, masks = scene(alpha=True)
    expected = tiny_base(Image.fromarray(img), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
                         output_type="latent", enable_pbar=False)
    got = _run(TIMIPipeline(tiny_base, config), seed=3)
    assert got.dtype == expected.dtype == tiny_base.dtype
    assert torch.equal(got, expected)


def test_guidance_off_batch_equals_hy3dgen_bitwise(fast_base):
    tiny_base = fast_base
    img, masks = scene(alpha=True)
    img2 = np.ascontiguousarray(img[:, ::-1])
    expected = tiny_base([Image.fromarray(img), Image.fromarray(img2)], num_inference_steps=STEPS,
                         generator=torch.Generator().manual_seed(1), output_type="latent", enable_pbar=False)
    got = _run(TIMIPipeline(tiny_base, TIMIConfig(guided_steps=0)), seed=1, image=[img, img2],
               masks=[masks, masks[:, :, ::-1]])
    assert got.shape[0] == 2 and torch.equal(got, expected)


def test_guided_run_is_deterministic_and_reports_diagnostics(fast_base):
    tiny_base = fast_base
    pipe = TIMIPipeline(tiny_base, GUIDED)
    calls = []
    out_a = _call(pipe, callback=lambda i, t, out: calls.append((i, float(t), out.prev_sample.shape)))
    a, diag_a = out_a.latents, out_a.diagnostics
    out_b = _call(pipe)
    b = out_b.latents
    plain_out = _call(TIMIPipeline(tiny_base, GUIDED.replace(isg=False)))
    plain = plain_out.latents
    assert torch.equal(a, b)
    assert not torch.equal(a, plain)
    assert [d.step for d in diag_a] == [0, 1, 2, 3] and out_b.diagnostics == diag_a
    assert plain_out.diagnostics == [] and out_a.meshes is None and out_a.recordings is None
    # the config of a call, or of a copy: the same run, and the shared pipeline is left as it was
    by_call = _call(TIMIPipeline(tiny_base, GUIDED.replace(isg=False)), config=GUIDED)
    by_copy = _call(TIMIPipeline(tiny_base).with_config(GUIDED))
    assert torch.equal(by_call.latents, a) and by_call.diagnostics == diag_a
    assert torch.equal(by_copy.latents, a) and by_copy.diagnostics == diag_a
    assert torch.equal(_run(pipe, config=GUIDED.replace(isg=False)), plain) and pipe.config == GUIDED
    for d in diag_a:
        assert len(d.loss) == len(d.scale) == len(d.max_update) == 1
        assert np.isfinite(d.loss + d.scale + d.max_update).all() and d.max_update[0] > 0
    assert [c[0] for c in calls] == list(range(STEPS)) and calls[0][2] == a.shape


def test_guidance_lowers_separation_loss_over_guided_steps(fast_base):
    tiny_base = fast_base
    """L_sep along the guided trajectory is below L_sep along hy3dgen's plain trajectory."""
    from timi_torch.guidance import separation_loss_and_grad

    img, masks = scene(alpha=True)
    pipe = TIMIPipeline(tiny_base, TIMIConfig(guided_layers=2, guided_steps=5))
    guided = np.array([d.loss[0] for d in _call(pipe).diagnostics])

    states = [tiny_base.prepare_latents(1, torch.float32, "cpu", torch.Generator().manual_seed(0))]
    _run(TIMIPipeline(tiny_base, TIMIConfig(guided_steps=0)),
         callback=lambda i, t, out: states.append(out.prev_sample))
    cm = pipe.condition_masks(img, masks)
    cond = tiny_base.conditioner(tiny_base.prepare_image(cm.image)["image"])["main"]
    times = tiny_base.scheduler.timesteps
    plain = np.array([separation_loss_and_grad(tiny_base.model, states[i], times[i].expand(1) / 1000, cond,
                                               cm.tokens[None], pipe.config, 2)[0].item() for i in range(5)])
    assert guided[0] == pytest.approx(plain[0], abs=1e-5)       # same start
    assert np.all(guided[1:] < plain[1:]), (guided, plain)


def test_trimesh_output(fast_base):
    tiny_base = fast_base
    out = _call(TIMIPipeline(tiny_base, GUIDED), output_type="trimesh", octree_resolution=24, num_chunks=20000)
    meshes = out.meshes
    assert len(meshes) == 1 and isinstance(meshes[0], trimesh.Trimesh) and len(meshes[0].faces) > 0
    assert torch.equal(out.latents, _run(TIMIPipeline(tiny_base, GUIDED)))  # the latents it was decoded from
    assert [d.step for d in out.diagnostics] == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_keep_a_float32_master_latent(fast_dir, fast_base_bf16, dtype):
    """fp16/bf16 model, guidance on: the latent is carried in float32, so the small guided updates
    are not rounded to the model dtype's spacing; the returned latents are in the model dtype."""
    base = fast_base_bf16 if dtype == torch.bfloat16 else load_base(fast_dir, dtype=dtype)
    pipe = TIMIPipeline(base, GUIDED)
    states = []
    output = _call(pipe, callback=lambda i, t, o: states.append(o.prev_sample))
    out, diagnostics = output.latents, output.diagnostics
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    assert all(np.isfinite(d.loss[0]) and d.max_update[0] > 0 for d in diagnostics)
    assert len(states) == STEPS and all(s.dtype == torch.float32 for s in states)
    # the carried latent holds what the model dtype cannot (hy3dgen's step would have rounded it)
    assert not torch.equal(states[0].to(dtype).float(), states[0])
    assert torch.equal(out, states[-1].to(dtype))                  # rounded once, at the end
    # First guided step (momentum from 0, GM): the latent moves by exactly max|(1 - beta) lambda g|
    # = (1 - beta) (alpha std(z) - lambda eps) (Eq.6, lambda = alpha std(z) / (max|g| + eps)),
    # about 0.01 std(z): below bf16's spacing (2^-7 on [1, 2)) and near fp16's. Rounded to the model
    # dtype it would be a multiple of the spacing instead.
    z0 = base.prepare_latents(1, dtype, "cpu", torch.Generator().manual_seed(0)).float()
    d, cfg = diagnostics[0], GUIDED
    lam = torch.tensor(d.scale, dtype=torch.float64)
    expected = (1 - cfg.beta) * (cfg.alpha * z0.double().flatten(1).std(1, correction=0) - lam * cfg.eps)
    torch.testing.assert_close(torch.tensor(d.max_update, dtype=torch.float64), expected, rtol=1e-4, atol=0)
    # the unguided run of the same model and noise: guidance moved the result
    plain = _run(TIMIPipeline(base, GUIDED.replace(isg=False)))
    assert plain.dtype == dtype and not torch.equal(out, plain)


def test_from_pretrained_through_hy3dgen_loaders(fast_root, fast_dir, monkeypatch, fast_base):
    tiny_root, tiny_dir, tiny_base = fast_root, fast_dir, fast_base
    monkeypatch.setenv("HY3DGEN_MODELS", str(tiny_root))
    ref = _run(TIMIPipeline(tiny_base, TIMIConfig(guided_steps=0)))
    by_id = TIMIPipeline.from_pretrained(MODEL_ID, TIMIConfig(guided_steps=0), device="cpu")
    by_dir = TIMIPipeline.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32)
    by_file = TIMIPipeline.from_pretrained(tiny_dir / "model.safetensors", device="cpu",
                                           config_path=tiny_dir / "config.yaml")
    assert by_id.dtype == torch.float32 and by_dir.config == TIMIConfig()
    assert torch.equal(_run(by_id), ref)
    fp16_weights = tiny_base.model.state_dict()
    fp32_weights = safetensors.torch.load_file(str(tiny_dir / "model.safetensors"))
    for key, value in by_dir.base.model.state_dict().items():
        assert torch.equal(value, fp16_weights[key]), key
    for key, value in by_file.base.model.state_dict().items():
        assert torch.equal(value, fp32_weights[f"model.{key}"]), key


def test_missing_checkpoint_files_give_clear_errors(tiny_dir, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="lacks"):
        TIMIPipeline.from_pretrained(tiny_dir, device="cpu", variant="bf16")
    with pytest.raises(FileNotFoundError, match="config_path"):
        TIMIPipeline.from_pretrained(tiny_dir / "model.safetensors", device="cpu")
    monkeypatch.setenv("HY3DGEN_MODELS", str(tmp_path))
    (tmp_path / "acme" / "m" / SUBFOLDER).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no model.fp16.safetensors"):
        TIMIPipeline.from_pretrained("acme/m", device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no local model at"):
        TIMIPipeline.from_pretrained("acme/absent", device="cpu")


def test_bad_inputs(fast_base):
    tiny_base = fast_base
    pipe = TIMIPipeline(tiny_base, GUIDED)
    img, masks = scene(alpha=True)
    with pytest.raises(ValueError, match="output_type"):
        _run(pipe, output_type="glb")
    with pytest.raises(ValueError, match="2 images but 1 mask sets"):
        _run(pipe, image=[img, img], masks=[masks])
    with pytest.raises(ValueError, match="mask size 300x50 differs from the image"):
        _run(pipe, masks=masks[:, :50])
    for steps in (0, -1, 2.5):
        with pytest.raises(ValueError, match=f"num_inference_steps={steps} must be a whole number of at least 1"):
            pipe(img, masks, num_inference_steps=steps, output_type="latent", enable_pbar=False)
    with pytest.raises(ValueError, match="guidance_scale=nan must be a finite number"):
        _run(pipe, guidance_scale=float("nan"))
    with pytest.warns(UserWarning, match="guided_layers=4 exceeds"):
        _run(TIMIPipeline(tiny_base, TIMIConfig(guided_steps=1)))
    with pytest.raises(TypeError, match="hy3dgen"):
        TIMIPipeline(object())


def test_gradient_hook_sees_each_guided_gradient_and_the_shuffle_keeps_its_rows(fast_base):
    """An identity hook leaves the latents bit for bit; the shuffled control permutes token rows
    (same multiset of rows) and changes the result."""
    from timi.testbed.controls import ShuffledGradient
    from timi_torch import TIMIPipeline

    image, masks = scene()
    cfg = TIMIConfig(guided_layers=2, guided_steps=2)
    seen = []

    def identity(grad, step):
        seen.append(step)
        return grad

    def run(hook):
        pipe = TIMIPipeline(fast_base, cfg, gradient_hook=hook)
        return pipe(image, masks, num_inference_steps=3, output_type="latent", enable_pbar=False,
                    generator=torch.Generator().manual_seed(0)).latents

    plain = run(None)
    assert torch.equal(run(identity), plain) and seen == [0, 1]
    g = torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(1))
    s = ShuffledGradient(0)(g, 0)
    for b in range(2):
        assert sorted(map(tuple, s[b].tolist())) == sorted(map(tuple, g[b].tolist()))
    assert not torch.equal(s, g) and not torch.equal(run(ShuffledGradient(0)), plain)


def test_shuffled_gradient_generator_seeds_a_copy_of_the_pipeline_per_call(fast_base):
    """The control's generator runs a copy with a hook seeded by the sampling seed; the shared pipeline
    keeps no hook and no seed (same seed, same permutations; another seed, others)."""
    from timi.testbed.controls import ShuffledGradientGenerator
    from timi_torch import TIMIPipeline

    gen = ShuffledGradientGenerator("unused")
    gen._pipe = shared = TIMIPipeline(fast_base, TIMIConfig())
    g = torch.randn(1, 16, 3, generator=torch.Generator().manual_seed(1))
    first, again, other = (gen.pipeline_for(seed).gradient_hook(g, 0) for seed in (0, 0, 1))
    assert shared.gradient_hook is None and gen.pipeline_for(0) is not shared
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_position_smoothing_makes_guided_sampling_follow_the_tokens_not_their_order(fast_base):
    """hy3dgen's DiT has no latent position embedding, so its sampler is equivariant to the order of
    the latent tokens: permuting the starting noise permutes the result. TIMI with Eq.5 over the
    tokens' positions keeps that, with the positions read from the latent or from the VAE decoder;
    Eq.5 along the token axis (the default) does not."""
    image, masks = scene()
    z0 = fast_base.prepare_latents(1, torch.float32, "cpu", torch.Generator().manual_seed(0))
    perm = torch.randperm(z0.shape[1], generator=torch.Generator().manual_seed(1))

    def gap(config):
        pipe = TIMIPipeline(fast_base, config, token_positions=lambda x: x[..., :3])
        run = [pipe(image, masks, num_inference_steps=STEPS, output_type="latent", enable_pbar=False,
                    latents=z).latents for z in (z0, z0[:, perm])]
        return float((run[1] - run[0][:, perm]).abs().max()), float((run[0] - fast_base(
            Image.fromarray(image), num_inference_steps=STEPS, output_type="latent", enable_pbar=False, latents=z0)).abs().max())

    plain, _ = gap(GUIDED.replace(isg=False))
    by_position, moved = gap(GUIDED.replace(smoothing="positions"))
    by_decoder, moved_too = gap(GUIDED.replace(smoothing="decoder"))   # positions from the VAE decoder
    by_index, _ = gap(GUIDED)
    assert plain < 1e-5 and by_position < 1e-4 and moved > 1e-3, (plain, by_position, moved)
    assert by_decoder < 1e-4 and moved_too > 1e-3, (by_decoder, moved_too)
    assert by_index > 100 * max(by_position, by_decoder), (by_index, by_position, by_decoder)
    with pytest.raises(ValueError, match="token_positions"):
        _run(TIMIPipeline(fast_base, GUIDED.replace(smoothing="positions")))
    without_sr = GUIDED.replace(sr=False)   # no Eq.5: no positions needed, the same run either way
    assert torch.equal(_run(TIMIPipeline(fast_base, without_sr.replace(smoothing="positions"))),
                       _run(TIMIPipeline(fast_base, without_sr)))


def test_decoder_attention_positions_leave_the_decoder_as_it_was_and_follow_the_tokens(fast_base):
    """The reader hooks the decoder's processor for its own calls only: the occupancy is hy3dgen's and
    the processor is restored. Its positions are weighted means of grid points (inside the box), and
    permuting the tokens permutes them (hy3dgen's VAE has no token position embedding)."""
    from timi_torch.positions import DecoderAttentionPositions

    vae = fast_base.vae
    x1 = torch.randn(2, *vae.latent_shape, generator=torch.Generator().manual_seed(0))
    attention = vae.geo_decoder.cross_attn_decoder.attn.attention
    before = attention.attn_processor
    queries = torch.rand(2, 50, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        occ = vae.geo_decoder(queries=queries, latents=vae(x1 / vae.scale_factor))
    reader = DecoderAttentionPositions(vae, resolution=6, chunk=100)
    pos = reader(x1)
    assert attention.attn_processor is before
    with torch.no_grad():
        assert torch.equal(vae.geo_decoder(queries=queries, latents=vae(x1 / vae.scale_factor)), occ)
    assert pos.shape == (2, x1.shape[1], 3) and pos.abs().max() <= reader.box + 1e-6
    perm = torch.randperm(x1.shape[1], generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(reader(x1[:, perm]), pos[:, perm], atol=1e-5, rtol=1e-5)

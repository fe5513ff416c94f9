"""TRELLIS stage 1's sampler with and without TIMI (``timi_torch.trellis.sample``, ``guide``).

Guidance off must reproduce upstream's ``FlowEulerGuidanceIntervalSampler`` trajectory stored in
``tests/fixtures/trellis_upstream.npz`` (bit for bit here); with guidance on, Eq.5 must be the 3-D
Gaussian of the paper over D, H, W (SciPy's ``gaussian_filter``), and the gradient must come from the
first ``guided_layers`` blocks alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from timi_core import TIMIConfig
from timi_torch.trellis import (SamplerSettings, SparseStructureDecoder, SparseStructureFlowModel,
                                condition_token_masks, flow_times, guide, sample)
from trellis_helpers import upstream, upstream_flow  # noqa: F401  (upstream: a fixture)


@pytest.fixture(scope="module")
def model(upstream):
    return upstream_flow(upstream, "a")


def _settings(upstream) -> SamplerSettings:
    s = json.loads(str(upstream["trajectory/settings"]))
    return SamplerSettings(steps=s["steps"], cfg_strength=s["cfg_strength"], cfg_interval=tuple(s["cfg_interval"]),
                           rescale_t=s["rescale_t"], sigma_min=s["sigma_min"])


def _tokens(num_cond: int) -> torch.Tensor:
    tokens = torch.zeros(1, 2, num_cond)
    tokens[0, 0, 1:num_cond // 2] = 1
    tokens[0, 1, num_cond // 2:] = 1
    return tokens


@pytest.mark.parametrize("config", [None, TIMIConfig(isg=False), TIMIConfig(guided_steps=0)])
def test_guidance_off_is_upstreams_trajectory_bit_for_bit(upstream, model, config):
    noise, cond = torch.from_numpy(upstream["trajectory/noise"]), torch.from_numpy(upstream["trajectory/cond"])
    out = sample(model, noise, cond, torch.zeros_like(cond), config=config, settings=_settings(upstream),
                 keep_trajectory=True, enable_pbar=False)
    for ours, theirs in zip(out.trajectory, upstream["trajectory/latents"], strict=True):
        assert torch.equal(ours, torch.from_numpy(theirs))
    assert out.diagnostics == []


def test_guided_window_is_the_first_part_of_the_trajectory_in_noise_level():
    times = flow_times(50, 3.0)
    assert times[0] == 1 and times[-1] == 0 and np.all(np.diff(times) < 0)
    n = TIMIConfig().num_guided_steps(1 - times[:-1])
    assert np.all(1 - times[:n] < 0.3) and 1 - times[n] >= 0.3 - 1e-6


def test_eq5_is_a_3d_gaussian_over_the_grid(upstream, model):
    """SGU with GM off and beta 0 moves the latent by alpha * (K_sigma * dL/dz): SciPy's 3-D filter."""
    noise, cond = torch.from_numpy(upstream["trajectory/noise"]), torch.from_numpy(upstream["trajectory/cond"])
    grads = []
    config = TIMIConfig.paper(gm=False, beta=0.0, alpha=1.0, guided_steps=1, guided_layers=3)
    settings = SamplerSettings(steps=1, cfg_strength=0.0, rescale_t=1.0)
    out = sample(model, noise, cond, None, tokens=_tokens(cond.shape[1]), config=config, settings=settings,
                 gradient_hook=lambda g, step: grads.append(g.clone()) or g, enable_pbar=False, keep_trajectory=True)
    g = grads[0].numpy().astype(np.float64)
    expected = gaussian_filter(g, sigma=(0, 0, 1.5, 1.5, 1.5), mode="reflect", truncate=4.0)
    # undo the step's velocity: the guided latent is noise - smoothed grad; compare by re-running the update alone
    timestep_v = model(noise - torch.from_numpy(expected).float(), torch.full((1,), 1000.0), cond)
    np.testing.assert_allclose(out.latents.numpy(), (noise - torch.from_numpy(expected).float() - timestep_v).detach().numpy(),
                               rtol=0, atol=1e-5)
    assert np.abs(expected - g).max() > 1e-3                                # the smoothing did something


def test_gradient_comes_from_the_first_guided_blocks_only(upstream, model):
    noise, cond = torch.from_numpy(upstream["trajectory/noise"]), torch.from_numpy(upstream["trajectory/cond"])
    config = TIMIConfig(guided_layers=1, guided_steps=1)

    def first_grad(m):
        grads = []
        sample(m, noise, cond, None, tokens=_tokens(cond.shape[1]), config=config,
               settings=SamplerSettings(steps=1, rescale_t=1.0), gradient_hook=lambda g, s: grads.append(g) or g,
               enable_pbar=False)
        return grads[0]

    other = SparseStructureFlowModel(**model.config.kwargs()).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.blocks[1].cross_attn.to_q.weight.mul_(3.0)                  # a block after the guided one
        other.out_layer.weight.mul_(3.0)
    assert torch.equal(first_grad(model), first_grad(other))
    with torch.no_grad():
        other.blocks[0].cross_attn.to_q.weight.mul_(3.0)                  # the guided block itself
    assert not torch.equal(first_grad(model), first_grad(other))


def test_timi_moves_the_latent_and_records_its_steps(upstream, model):
    noise, cond = torch.from_numpy(upstream["trajectory/noise"]), torch.from_numpy(upstream["trajectory/cond"])
    settings = _settings(upstream)
    base = sample(model, noise, cond, torch.zeros_like(cond), settings=settings, enable_pbar=False)
    guided = sample(model, noise, cond, torch.zeros_like(cond), tokens=_tokens(cond.shape[1]),
                    config=TIMIConfig(guided_layers=2, guided_steps=2), settings=settings, enable_pbar=False)
    assert [d.step for d in guided.diagnostics] == [0, 1]
    assert not torch.equal(base.latents, guided.latents)
    with pytest.raises(ValueError, match="condition-token masks"):
        sample(model, noise, cond, config=TIMIConfig(guided_steps=1), settings=settings, enable_pbar=False)


# ----------------------------------------------------------------------------- upstream pipeline stand-in
class _UpstreamSampler:
    """Upstream's stage-1 sampler as the pipeline holds it (only what ``guide`` reads or replaces)."""

    def __init__(self, sigma_min):
        self.sigma_min = sigma_min

    def sample(self, model, noise, cond, neg_cond, steps, rescale_t, cfg_strength, cfg_interval, verbose=True):
        out = sample(model, noise, cond, neg_cond, settings=SamplerSettings(steps, cfg_strength, tuple(cfg_interval),
                                                                            rescale_t, self.sigma_min),
                     enable_pbar=False)
        return type("Out", (), {"samples": out.latents})()


class _StandInPipeline:
    """``TrellisImageTo3DPipeline``'s attribute names and call order (upstream's ``run``: preprocess,
    get_cond, manual_seed, sample_sparse_structure, sample_slat, decode_slat), with small models and a
    conditioner that returns fixed tokens of upstream's layout (5 prefix tokens, 37 x 37 patches)."""

    def __init__(self, flow, decoder, cond):
        self.models = {"sparse_structure_flow_model": flow, "sparse_structure_decoder": decoder}
        self.sparse_structure_sampler = _UpstreamSampler(1e-5)
        self.sparse_structure_sampler_params = {"steps": 4, "cfg_strength": 7.5, "cfg_interval": [0.5, 1.0],
                                                "rescale_t": 3.0}
        self.cond, self.stage_two = cond, []

    def get_cond(self, images):
        return {"cond": self.cond, "neg_cond": torch.zeros_like(self.cond)}

    def sample_sparse_structure(self, cond, num_samples=1, sampler_params={}):
        flow = self.models["sparse_structure_flow_model"]
        noise = torch.randn(num_samples, flow.in_channels, *[flow.resolution] * 3)
        z = self.sparse_structure_sampler.sample(flow, noise, **cond, **{**self.sparse_structure_sampler_params,
                                                                         **sampler_params}, verbose=False).samples
        return torch.argwhere(self.models["sparse_structure_decoder"](z) > 0)[:, [0, 2, 3, 4]].int()

    def run(self, image, seed=42):
        cond = self.get_cond([image])
        torch.manual_seed(seed)
        coords = self.sample_sparse_structure(cond)
        self.stage_two.append(coords)                                       # stage 2 sees only coords
        return coords


def test_guide_runs_timi_inside_the_upstream_pipelines_stage_one_and_restores_it():
    torch.manual_seed(0)
    flow = SparseStructureFlowModel(resolution=8, in_channels=4, out_channels=4, model_channels=32, cond_channels=16,
                                    num_blocks=2, num_heads=2, patch_size=2, qk_rms_norm=True).eval()
    for p in flow.parameters():
        p.data.normal_(0, 0.2)
    decoder = SparseStructureDecoder(out_channels=1, latent_channels=4, num_res_blocks=1, channels=[8, 8],
                                     num_res_blocks_middle=1).eval()
    pipe = _StandInPipeline(flow, decoder, torch.randn(1, 5 + 37 * 37, 16))
    image = np.zeros((74, 74, 3), np.uint8)
    masks = np.zeros((2, 74, 74), bool)
    masks[0, 20:50, 10:30], masks[1, 20:50, 40:64] = True, True
    original = pipe.sparse_structure_sampler
    with torch.no_grad():
        plain = pipe.run(image)
        with guide(pipe, image, masks, TIMIConfig(guided_layers=2, guided_steps=2, alpha=1.0)) as stage_one:
            guided = pipe.run(image)
    assert pipe.sparse_structure_sampler is original
    assert [d.step for d in stage_one.diagnostics] == [0, 1]
    assert len(pipe.stage_two) == 2 and not torch.equal(plain, guided)


def test_masks_follow_upstreams_crop_onto_the_patch_grid():
    image = np.zeros((120, 200, 3), np.uint8)
    masks = np.zeros((2, 120, 200), bool)
    masks[0, 30:90, 40:95], masks[1, 30:90, 105:160] = True, True            # left and right of x = 100
    tokens = condition_token_masks(image, masks).numpy()
    assert tokens.shape == (2, 5 + 37 * 37) and np.all(tokens[:, :5] == 0)
    cols = np.arange(37)[None, :].repeat(37, 0).ravel()
    left, right = tokens[0, 5:] > 0, tokens[1, 5:] > 0
    assert cols[left].max() < 18.5 < cols[right].min()                    # the crop is centred on x = 100
    # the crop (side int(1.2 * 119) = 142 px) maps the masks' 55 x 60 px onto (55 / 142 * 37) x (60 / 142 * 37) patches
    assert tokens[0, 5:].sum() == pytest.approx(55 * 60 * (37 / 142) ** 2, rel=0.05)

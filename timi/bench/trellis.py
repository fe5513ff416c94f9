"""``timi bench overhead --model trellis|trellis-testbed-size``: TRELLIS stage 1, plain vs TIMI sampling.

Both runs use :func:`timi_torch.trellis.sample` on the same weights, noise, condition and schedule
(upstream's sampler: CFG inside ``cfg_interval`` means two forwards per step there, one outside);
the TIMI run adds, per guided step, one pass through ``input_layer`` and the first ``l`` of ``N``
blocks and its backward. FLOP estimate of the ratio, as ``timi.bench.floor`` counts Hunyuan3D's:
``1 + G * (1 + b) (l / N) / F`` with ``F`` the plain run's forwards, ``G`` the guided steps and a
backward of ``b`` forwards: ``floor`` with the usual ``b = 2``, ``floor_input_grad`` with ``b = 1``
(frozen weights need input gradients only). Both count ``l`` whole blocks (the pass stops inside the
last one, after its cross-attention's P) and ignore Eq.2's map and Eqs.3-7 (small at these sizes), and
at CPU sizes a forward is not FLOP-bound, so a measured ratio can fall below them. Random weights (every parameter perturbed):
the timing of a forward does not depend on what the weights learned.
"""

from __future__ import annotations

import dataclasses

import torch

from timi_core import TIMIConfig

from .timing import interleaved, machine_info

__all__ = ["TRELLIS_SHAPES", "trellis_overhead"]

#: ``--model`` names: the released image model's flow (1374 condition tokens of DINOv2 ViT-L/14-reg,
#: 25 steps as the hub's pipeline.json is reported to use; GPU) and the shipped grid testbed's shape (CPU: width
#: 128, 4 blocks, 512 voxel tokens, 257 condition tokens).
TRELLIS_SHAPES = {
    "trellis": dict(flow="image-large", cond_tokens=1374, steps=25),
    "trellis-testbed-size": dict(flow=None, cond_tokens=257, steps=25),
}


def _flow_config(name: str):
    from timi_torch.trellis import FLOW_PRESETS, FlowConfig

    if TRELLIS_SHAPES[name]["flow"] is not None:
        return FLOW_PRESETS[TRELLIS_SHAPES[name]["flow"]]
    return FlowConfig(resolution=16, in_channels=8, out_channels=8, model_channels=128, cond_channels=64, num_blocks=4,
                      num_heads=4, patch_size=2, qk_rms_norm=True)


def trellis_overhead(name: str = "trellis-testbed-size", *, steps: int | None = None, guided_layers: int = 4,
                     repeats: int = 3, warmup: int = 1, seed: int = 0, device: str | None = None) -> dict:
    """Medians of plain and TIMI sampling, their ratio and the FLOP floor (module docstring)."""
    from timi_torch.trellis import SamplerSettings, SparseStructureFlowModel, flow_times, sample

    shape = TRELLIS_SHAPES[name]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = _flow_config(name)
    if device == "cpu" and cfg.use_fp16:
        cfg = dataclasses.replace(cfg, use_fp16=False)                   # fp16 matmuls are not a CPU path
    torch.manual_seed(seed)
    model = SparseStructureFlowModel.from_config(cfg).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    settings = SamplerSettings(steps=steps or shape["steps"])
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(1, cfg.in_channels, *[cfg.resolution] * 3, generator=g).to(device)
    cond = torch.randn(1, shape["cond_tokens"], cfg.cond_channels, generator=g).to(device)
    tokens = torch.zeros(1, 2, shape["cond_tokens"], device=device)
    half = shape["cond_tokens"] // 2
    tokens[0, 0, 1:half], tokens[0, 1, half:] = 1.0, 1.0
    config = TIMIConfig(guided_layers=guided_layers)

    def run(guided: bool):
        def call():
            out = sample(model, noise, cond, torch.zeros_like(cond), tokens=tokens if guided else None,
                         config=config if guided else None, settings=settings, enable_pbar=False)
            if device != "cpu":
                torch.cuda.synchronize()
            return out
        return call

    timings = interleaved({"plain": run(False), "timi": run(True)}, repeats=repeats, warmup=warmup)
    times = flow_times(settings.steps, settings.rescale_t)
    lo, hi = settings.cfg_interval
    forwards = sum(2 if lo <= t <= hi else 1 for t in times[:-1])
    guided = config.num_guided_steps(1.0 - times[:-1])
    layers = min(guided_layers, cfg.num_blocks)
    floor = 1 + guided * 3 * (layers / cfg.num_blocks) / forwards
    floor_input_grad = 1 + guided * 2 * (layers / cfg.num_blocks) / forwards
    plain_s, timi_s = timings["plain"]["median_s"], timings["timi"]["median_s"]
    return {"benchmark": "trellis_overhead", "model": name, "flow": cfg.kwargs(), "device": device,
            "steps": settings.steps, "guided_steps": guided, "guided_layers": layers, "plain_forwards": forwards,
            "plain_s": plain_s, "timi_s": timi_s, "ratio": timi_s / plain_s, "floor": floor, "floor_input_grad": floor_input_grad, "timings": timings,
            "machine": machine_info()}

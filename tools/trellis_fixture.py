"""Regenerate ``tests/fixtures/trellis_upstream.npz``: numbers from TRELLIS's own stage-1 modules and sampler.

Run against an extract of microsoft/TRELLIS (no code of it is in this repository; it is not on PyPI):

    git -C TRELLIS archive HEAD trellis/models trellis/modules trellis/pipelines/samplers | tar -x -C /tmp/up
    : > /tmp/up/trellis/__init__.py; : > /tmp/up/trellis/pipelines/__init__.py
    ATTN_BACKEND=sdpa PYTHONPATH=adapters/torch python tools/trellis_fixture.py --source /tmp/up --commit <sha>

(empty package ``__init__`` files: the real ones import the whole pipeline; ``easydict``, which the
sampler imports for its return value, is replaced by a dict stand-in when absent.)

What it stores (float32 arrays and JSON strings, a few tens of KB):

* for each small flow configuration in :data:`FLOWS`: upstream's state-dict keys and shapes, in
  order; the weights are ``timi_torch.hunyuan21.testing.seeded_state_dict(shapes, seed)`` (stored: the
  seed; every parameter perturbed, so upstream's zero-initialised adaLN and output layers hide
  nothing), loaded strictly into upstream's ``SparseStructureFlowModel``; inputs ``x``, ``cond`` and
  the velocities upstream's module (float32, CPU) returns at a few timesteps ``1000 t``;
* the same for a small :data:`DECODER` (``SparseStructureDecoder``): input ``z`` and its logits;
* one short trajectory of upstream's ``FlowEulerGuidanceIntervalSampler.sample`` on flow "a"
  (CFG strength 3 inside ``cfg_interval`` (0.5, 1.0), ``rescale_t`` 3, sigma_min 1e-5, zero negative
  condition): the noise, the condition and every step's ``pred_x_prev`` and ``pred_x_0``;
* the state-dict keys and shapes of the released configurations (built on the meta device).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

#: Small flow configurations (upstream's keywords). "a": the released image model's options (patch 1,
#: qk RMS norm in self-attention, explicit heads); "b": the others (patch 2, heads from
#: num_head_channels, shared modulation, RMS norm in the cross-attention too).
FLOWS = {
    "a": dict(resolution=4, in_channels=3, out_channels=3, model_channels=48, cond_channels=20, num_blocks=3,
              num_heads=4, mlp_ratio=2, patch_size=1, pe_mode="ape", qk_rms_norm=True),
    "b": dict(resolution=8, in_channels=2, out_channels=2, model_channels=32, cond_channels=12, num_blocks=2,
              num_head_channels=16, mlp_ratio=4, patch_size=2, pe_mode="ape", share_mod=True, qk_rms_norm=True,
              qk_rms_norm_cross=True),
}
#: A small decoder (upstream's keywords; the released one is [512, 128, 32] from 8 channels).
DECODER = dict(out_channels=1, latent_channels=3, num_res_blocks=1, num_res_blocks_middle=1, channels=[16, 8, 8])
#: The released configurations whose keys and shapes are stored.
RELEASED = {
    "flow_image_large": dict(resolution=16, in_channels=8, out_channels=8, model_channels=1024, cond_channels=1024,
                             num_blocks=24, num_heads=16, mlp_ratio=4, patch_size=1, pe_mode="ape",
                             qk_rms_norm=True, use_fp16=True),
    "decoder_16l8": dict(out_channels=1, latent_channels=8, num_res_blocks=2, num_res_blocks_middle=2,
                         channels=[512, 128, 32], use_fp16=True),
}
BATCH, CONTEXT = 2, 7
TIMES = (0.0, 0.37, 0.93)
TRAJECTORY = dict(steps=5, cfg_strength=3.0, cfg_interval=[0.5, 1.0], rescale_t=3.0, sigma_min=1e-5, noise_seed=7)


def _import_upstream(source: Path):
    if not (source / "trellis" / "models" / "sparse_structure_flow.py").is_file():
        raise SystemExit(f"{source} holds no trellis/models/sparse_structure_flow.py: pass the extract.")
    if os.environ.get("ATTN_BACKEND") != "sdpa":
        raise SystemExit("set ATTN_BACKEND=sdpa (upstream's default backend is flash_attn).")
    sys.path.insert(0, str(source))
    if importlib.util.find_spec("easydict") is None:
        stub = types.ModuleType("easydict")

        class EasyDict(dict):
            __getattr__ = dict.__getitem__
            __setattr__ = dict.__setitem__

        stub.EasyDict = EasyDict
        sys.modules["easydict"] = stub
    flow = importlib.import_module("trellis.models.sparse_structure_flow")
    vae = importlib.import_module("trellis.models.sparse_structure_vae")
    samplers = importlib.import_module("trellis.pipelines.samplers")
    return flow, vae, samplers


def _shapes(model) -> dict:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", required=True, type=Path)
    ap.add_argument("--commit", required=True, help="the upstream commit the extract was taken from")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/trellis_upstream.npz")
    args = ap.parse_args()
    from timi_torch.hunyuan21.testing import seeded_state_dict

    flow, vae, samplers = _import_upstream(args.source)
    torch.set_grad_enabled(False)
    out: dict[str, np.ndarray] = {}
    models = {}
    for name, cfg in FLOWS.items():
        seed = 2000 + ord(name)
        model = flow.SparseStructureFlowModel(**cfg).eval()
        shapes = _shapes(model)
        model.load_state_dict(seeded_state_dict(shapes, seed), strict=True)
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(BATCH, cfg["in_channels"], *[cfg["resolution"]] * 3, generator=g)
        cond = torch.randn(BATCH, CONTEXT, cfg["cond_channels"], generator=g)
        out[f"{name}/config"] = np.array(json.dumps(cfg))
        out[f"{name}/shapes"] = np.array(json.dumps(list(shapes.items())))
        out[f"{name}/seed"] = np.array(seed)
        out[f"{name}/x"], out[f"{name}/cond"] = x.numpy(), cond.numpy()
        out[f"{name}/t"] = np.array(TIMES, np.float32)
        out[f"{name}/v"] = np.stack([model(x, torch.full((BATCH,), 1000 * t), cond).numpy() for t in TIMES])
        models[name] = model

    seed = 2100
    decoder = vae.SparseStructureDecoder(**DECODER).eval()
    shapes = _shapes(decoder)
    decoder.load_state_dict(seeded_state_dict(shapes, seed), strict=True)
    z = torch.randn(BATCH, DECODER["latent_channels"], 4, 4, 4, generator=torch.Generator().manual_seed(seed + 1))
    out["decoder/config"] = np.array(json.dumps(DECODER))
    out["decoder/shapes"] = np.array(json.dumps(list(shapes.items())))
    out["decoder/seed"] = np.array(seed)
    out["decoder/z"], out["decoder/logits"] = z.numpy(), decoder(z).numpy()

    cfg = FLOWS["a"]
    cond = torch.from_numpy(out["a/cond"][:1])
    noise = torch.randn(1, cfg["in_channels"], *[cfg["resolution"]] * 3,
                        generator=torch.Generator().manual_seed(TRAJECTORY["noise_seed"]))
    sampler = samplers.FlowEulerGuidanceIntervalSampler(TRAJECTORY["sigma_min"])
    result = sampler.sample(models["a"], noise, cond=cond, neg_cond=torch.zeros_like(cond), steps=TRAJECTORY["steps"],
                            rescale_t=TRAJECTORY["rescale_t"], cfg_strength=TRAJECTORY["cfg_strength"],
                            cfg_interval=tuple(TRAJECTORY["cfg_interval"]), verbose=False)
    out["trajectory/noise"] = noise.numpy()
    out["trajectory/cond"] = cond.numpy()
    out["trajectory/latents"] = torch.stack(result["pred_x_t"]).numpy()
    out["trajectory/x0"] = torch.stack(result["pred_x_0"]).numpy()
    out["trajectory/settings"] = np.array(json.dumps({"config": "a", **TRAJECTORY}))

    for name, cfg in RELEASED.items():
        with torch.device("meta"):
            module = (flow.SparseStructureFlowModel if name.startswith("flow") else vae.SparseStructureDecoder)(**cfg)
        out[f"released/{name}/config"] = np.array(json.dumps(cfg))
        out[f"released/{name}/shapes"] = np.array(json.dumps(list(_shapes(module).items())))
    out["upstream_commit"] = np.array(args.commit)
    out["torch_version"] = np.array(torch.__version__)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) from upstream {args.commit}")


if __name__ == "__main__":
    main()

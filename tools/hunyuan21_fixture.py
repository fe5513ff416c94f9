"""Regenerate ``tests/fixtures/hunyuan21_upstream.npz``: numbers from Hunyuan3D 2.1's own DiT and pipeline.

Run against a checkout of Tencent-Hunyuan/Hunyuan3D-2.1 (no code of it is in this repository; its
``hy3dshape`` package is not on PyPI and is imported here from the checkout, without running its
package ``__init__``, which pulls in mesh post-processing):

    python tools/hunyuan21_fixture.py --source /path/to/Hunyuan3D-2.1 [--out tests/fixtures/hunyuan21_upstream.npz]

What it stores (float32 arrays and JSON strings, a few tens of KB):

* for each small configuration in :data:`CONFIGS`: upstream's state-dict keys and shapes, in order;
  the weights are ``timi_torch.hunyuan21.testing.seeded_state_dict(shapes, seed)`` (stored: the
  seed), loaded strictly into upstream's ``HunYuanDiTPlain``; inputs ``x``, ``cond`` and the
  velocities upstream's module (eval mode, float32, CPU) returns at a few timesteps;
* one short sampling trajectory of upstream's ``Hunyuan3DDiTFlowMatchingPipeline.__call__`` (its
  ``FlowMatchEulerDiscreteScheduler``, CFG at scale 5) on configuration ``"a"``: the starting noise,
  the condition tokens and every step's latent. Conditioner and VAE are stand-ins that return the
  stored tokens (zeros for the unconditional branch, as upstream's encoder does) and the latent shape.

``timm`` is replaced by an empty stand-in when it is not installed: ``moe_layers.py`` imports three
names from it and uses none.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

#: Small configurations (upstream's keywords). "a": the released config's options (qk RMSNorm, no
#: qkv bias, no pooling, no position embedding, U-Net skips, MoE top-2); "b": the other options
#: (qkv bias, LayerNorm qk-norm, sin-cos position embedding, attention pooling: batch 1 only, as
#: upstream's pooled vector broadcasts wrongly for batch > 1), MoE top-1.
CONFIGS = {
    "a": dict(input_size=24, in_channels=8, hidden_size=64, context_dim=32, depth=5, num_heads=4, qk_norm=True,
              text_len=10, with_decoupled_ca=False, use_attention_pooling=False, qk_norm_type="rms", qkv_bias=False,
              use_pos_emb=False, num_moe_layers=2, num_experts=4, moe_top_k=2),
    "b": dict(input_size=24, in_channels=8, hidden_size=32, context_dim=16, depth=4, num_heads=2, qk_norm=True,
              text_len=10, use_attention_pooling=True, qk_norm_type="layer", qkv_bias=True, use_pos_emb=True,
              num_moe_layers=1, num_experts=3, moe_top_k=1),
}
BATCH = {"a": 2, "b": 1}
TIMES = (0.0, 0.37, 0.93)
TRAJECTORY_STEPS, TRAJECTORY_SCALE = 5, 5.0


def _import_upstream(source: Path):
    pkg = source / "hy3dshape" / "hy3dshape"
    if not pkg.is_dir():
        raise SystemExit(f"{source} holds no hy3dshape/hy3dshape: pass the Hunyuan3D-2.1 checkout.")
    root = types.ModuleType("hy3dshape")
    root.__path__ = [str(pkg)]
    sys.modules["hy3dshape"] = root
    importlib.import_module("hy3dshape.models")          # transformers and diffusers (which probe for
    importlib.import_module("diffusers.models.attention")  # timm) before any timm stand-in
    stubs = []
    if importlib.util.find_spec("timm") is None:
        stubs = ["timm", "timm.models", "timm.models.vision_transformer"]
        for name in stubs:
            sys.modules[name] = types.ModuleType(name)
        vt = sys.modules["timm.models.vision_transformer"]
        vt.PatchEmbed = vt.Attention = vt.Mlp = None
    dit = importlib.import_module("hy3dshape.models.denoisers.hunyuandit")
    for name in stubs:
        del sys.modules[name]
    pipelines = importlib.import_module("hy3dshape.pipelines")
    schedulers = importlib.import_module("hy3dshape.schedulers")
    return dit, pipelines, schedulers


class _Conditioner(torch.nn.Module):
    def __init__(self, cond):
        super().__init__()
        self.cond = cond

    def forward(self, image=None, **_):
        return {"main": self.cond}

    def unconditional_embedding(self, batch_size, **_):
        return {"main": torch.zeros_like(self.cond)}


class _VAE(torch.nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.latent_shape = shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", required=True, type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/hunyuan21_upstream.npz")
    args = ap.parse_args()
    from timi_torch.hunyuan21.testing import seeded_state_dict

    dit, pipelines, schedulers = _import_upstream(args.source)
    torch.set_grad_enabled(False)
    out: dict[str, np.ndarray] = {}
    models = {}
    for name, cfg in CONFIGS.items():
        seed = 1000 + ord(name)
        model = dit.HunYuanDiTPlain(**cfg).eval()
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        model.load_state_dict(seeded_state_dict(shapes, seed), strict=True)
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(BATCH[name], cfg["input_size"], cfg["in_channels"], generator=g)
        cond = torch.randn(BATCH[name], cfg["text_len"], cfg["context_dim"], generator=g)
        out[f"{name}/config"] = np.array(json.dumps(cfg))
        out[f"{name}/shapes"] = np.array(json.dumps(list(shapes.items())))
        out[f"{name}/seed"] = np.array(seed)
        out[f"{name}/x"], out[f"{name}/cond"] = x.numpy(), cond.numpy()
        out[f"{name}/t"] = np.array(TIMES, np.float32)
        out[f"{name}/v"] = np.stack([model(x, torch.full((x.shape[0],), t), {"main": cond}).numpy() for t in TIMES])
        models[name] = (model, cond)

    model, cond = models["a"]
    cond = cond[:1]
    cfg = CONFIGS["a"]
    pipe = pipelines.Hunyuan3DDiTFlowMatchingPipeline(
        vae=_VAE((cfg["input_size"], cfg["in_channels"])), model=model,
        scheduler=schedulers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000),
        conditioner=_Conditioner(cond), image_processor=None, device="cpu", dtype=torch.float32)
    steps = []
    noise = torch.randn((1, *pipe.vae.latent_shape), generator=torch.Generator().manual_seed(7))
    final = pipe(image=torch.zeros(1, 3, 8, 8), mask=torch.zeros(1, 1, 8, 8), num_inference_steps=TRAJECTORY_STEPS,
                 guidance_scale=TRAJECTORY_SCALE, generator=torch.Generator().manual_seed(7), output_type="latent",
                 enable_pbar=False, callback=lambda i, t, o: steps.append(o.prev_sample.clone()), callback_steps=1)
    out["trajectory/noise"] = noise.numpy()
    out["trajectory/cond"] = cond.numpy()
    out["trajectory/latents"] = torch.stack(steps).numpy()
    assert torch.equal(final, steps[-1])
    out["trajectory/settings"] = np.array(json.dumps({"config": "a", "steps": TRAJECTORY_STEPS,
                                                      "guidance_scale": TRAJECTORY_SCALE, "noise_seed": 7}))
    commit = subprocess.run(["git", "-C", str(args.source), "rev-parse", "HEAD"], capture_output=True, text=True)
    out["upstream_commit"] = np.array(commit.stdout.strip() or "unknown")
    out["torch_version"] = np.array(torch.__version__)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) from upstream {out['upstream_commit']}")


if __name__ == "__main__":
    main()

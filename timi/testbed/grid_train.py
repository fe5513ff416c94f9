"""Training of the grid testbed (``timi testbed train-grid``): TRELLIS's stage-1 flow model on the
testbed's single assets, in TRELLIS's flow-matching convention.

* Data (:func:`build_grid_cache`): the token testbed's DiT training set, train-split single assets
  ``0..n-1`` of base seed ``seed`` (:func:`timi.testbed.scenes.generate_scene`), each as its exact
  32^3 occupancy (:func:`timi.testbed.grid.occupancy_grid`, bit-packed) and the conditioner's input
  image (:func:`timi.testbed.data.conditioner_image`: hy3dgen's ``ImageProcessorV2``, 224 px).
* Latent: the fixed encoding :func:`timi.testbed.grid.encode`, (8, 16, 16, 16) in {-1, +1}.
* Conditioner: the shipped token model's (preset ``v3p``: hy3dgen's ``SingleImageEncoder`` /
  ``DinoImageEncoder`` with no layers, fixed weights, :func:`timi.testbed.model.build_conditioner`);
  tokens = class token, then 16 x 16 patches (257 x 64), computed once.
* Flow model: ``timi_torch.trellis.SparseStructureFlowModel`` (upstream TRELLIS's constructor).
* Loss, as TRELLIS's ``FlowMatchingTrainer`` (``trellis/trainers/flow_matching/flow_matching.py``):
  ``t = 1`` noise, ``t = 0`` data, ``x_t = (1 - t) x_0 + (sigma_min + (1 - sigma_min) t) eps``,
  target ``v = (1 - sigma_min) eps - x_0``, ``t ~ sigmoid(N(1, 1))`` (ss_flow's logitNormal), the
  model is called with ``1000 t``; with probability ``p_uncond`` a sample's condition is zeros
  (TRELLIS's negative condition for classifier-free guidance). AdamW, cosine learning rate with
  warm-up, gradient clipping, EMA weights exported.

Reproducible from ``seed`` (each batch and noise draw is a function of ``(seed, step)``), resumable
from ``<out>/checkpoint.pt``. :func:`export_grid_model` writes a TRELLIS folder (``pipeline.json``,
``ckpts/ss_flow.{json,safetensors}``, the fixed decoder) with its conditioner, which
``timi_torch.trellis.TrellisPipeline`` (``timi generate --model FOLDER``) loads.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import grid
from .train import _lr, _rng

#: the token testbed preset whose conditioner the grid model shares (the shipped v5's)
CONDITIONER_PRESET = "v3p"
TESTBED_FILE = "testbed.json"


@dataclass(frozen=True)
class GridConfig:
    """Flow model sizes (upstream keywords) and training settings of ``timi testbed train-grid``."""

    seed: int = 0
    n_train: int = 1600
    steps: int = 3000
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 100
    sigma_min: float = 1e-5
    t_mean: float = 1.0
    t_std: float = 1.0
    p_uncond: float = 0.1
    ema: float = 0.999
    save_every: int = 200
    threads: int = 1
    model_channels: int = 128
    num_blocks: int = 4
    num_heads: int = 4
    num_head_channels: int = 32
    mlp_ratio: float = 4
    patch_size: int = 2
    qk_rms_norm: bool = True

    def flow_kwargs(self, cond_channels: int) -> dict:
        """``SparseStructureFlowModel``'s constructor keywords (upstream's names)."""
        return {"resolution": grid.LATENT_RESOLUTION, "in_channels": grid.CHANNELS,
                "model_channels": self.model_channels, "cond_channels": cond_channels,
                "out_channels": grid.CHANNELS, "num_blocks": self.num_blocks, "num_heads": self.num_heads,
                "num_head_channels": self.num_head_channels, "mlp_ratio": self.mlp_ratio,
                "patch_size": self.patch_size, "pe_mode": "ape", "use_fp16": False, "use_checkpoint": False,
                "share_mod": False, "qk_rms_norm": self.qk_rms_norm, "qk_rms_norm_cross": False}


def _grid_sample(args: tuple) -> tuple[np.ndarray, np.ndarray]:
    from .data import conditioner_image
    from .scenes import generate_scene

    seed, i, image_size = args
    torch.set_num_threads(1)
    scene = generate_scene(seed, "train", i, num_instances=1)
    occ = np.packbits(grid.occupancy_grid(scene.primitives).reshape(-1))
    return occ, conditioner_image(scene.image, image_size).numpy().astype(np.float16)


def build_grid_cache(path: str | Path, n: int, seed: int = 0, image_size: int = 224, workers: int = 1,
                     progress: bool = True) -> Path:
    """Write ``n`` train-split single assets (bit-packed 32^3 occupancy, conditioner image) to ``path``
    (.npz); reuse it if it matches."""
    from .data import map_jobs

    path = Path(path)
    meta = {"n": n, "seed": seed, "image_size": image_size, "grid": grid.GRID, "box": grid.BOX}
    if path.exists():
        with np.load(path) as f:
            if all(k in f and float(f[k]) == v for k, v in meta.items()):
                return path
    rows = map_jobs(_grid_sample, [(seed, i, image_size) for i in range(n)], workers, "grid cache", progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, occupancy=np.stack([r[0] for r in rows]), image=np.stack([r[1] for r in rows]), **meta)
    tmp.replace(path)
    return path


def load_grid_cache(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, 8, 16, 16, 16) in {-1, +1}, images (N, 3, S, S) float16) of a grid cache."""
    with np.load(path) as f:
        occ = np.unpackbits(f["occupancy"], axis=1)[:, : grid.GRID**3].reshape(-1, grid.GRID, grid.GRID, grid.GRID)
        return grid.encode(occ), torch.from_numpy(f["image"])


def flow_pair(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, sigma_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TRELLIS's convention (t = 1 noise, t = 0 data): ``x_t`` and the velocity target ``v``."""
    tt = t.reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - tt) * x0 + (sigma_min + (1 - sigma_min) * tt) * eps, (1 - sigma_min) * eps - x0


def build_flow_model(kwargs: dict) -> torch.nn.Module:
    from timi_torch.trellis import SparseStructureFlowModel

    return SparseStructureFlowModel(**kwargs)


class GridTrainer:
    """Flow model, its EMA, optimiser and loss history; ``run`` trains up to ``cfg.steps``."""

    def __init__(self, out: str | Path, cache: str | Path | None, cfg: GridConfig = GridConfig(),
                 progress: bool = True):
        from .model import SIZES, build_conditioner

        self.out, self.cfg, self.progress = Path(out), cfg, progress
        self.out.mkdir(parents=True, exist_ok=True)
        self.sizes = SIZES[CONDITIONER_PRESET]
        torch.manual_seed(cfg.seed)
        self.cond = build_conditioner(self.sizes).eval()
        self.kwargs = cfg.flow_kwargs(self.sizes.cond_width)
        self.flow = build_flow_model(self.kwargs)
        self.flow_ema = copy.deepcopy(self.flow).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.flow.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.state = {"step": 0, "loss": [], "seconds": 0.0}
        self.latents = self.tokens = None
        if cache is not None:  # None: only to export a checkpoint
            self.latents, images = load_grid_cache(cache)
            if len(self.latents) != cfg.n_train:
                raise ValueError(f"cache {cache} holds {len(self.latents)} samples, not n_train={cfg.n_train}")
            with torch.no_grad():  # the conditioner is fixed: its tokens once
                self.tokens = torch.cat([self.cond(image=images[i:i + 64].float())["main"]
                                         for i in range(0, len(images), 64)])
        self.ckpt = self.out / "checkpoint.pt"
        if self.ckpt.exists():
            blob = torch.load(self.ckpt, map_location="cpu", weights_only=False)
            if blob["cfg"]["seed"] != cfg.seed or blob["kwargs"] != self.kwargs:
                raise ValueError(f"{self.ckpt} was written with another seed or model size; use another OUT")
            for name in ("flow", "flow_ema", "opt"):
                getattr(self, name).load_state_dict(blob[name])
            self.state = blob["state"]

    def _save(self) -> None:
        blob = {"cfg": asdict(self.cfg), "kwargs": self.kwargs, "state": self.state, "flow": self.flow.state_dict(),
                "flow_ema": self.flow_ema.state_dict(), "opt": self.opt.state_dict()}
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.replace(self.ckpt)

    def step(self, step: int) -> float:
        cfg = self.cfg
        rng, gen = _rng(cfg, 6, step)
        idx = torch.from_numpy(rng.choice(len(self.latents), cfg.batch, replace=False))
        x0 = self.latents[idx]
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(len(idx), generator=gen) * cfg.t_std + cfg.t_mean)
        xt, target = flow_pair(x0, eps, t, cfg.sigma_min)
        keep = (torch.rand(len(idx), generator=gen) >= cfg.p_uncond).float()[:, None, None]
        loss = F.mse_loss(self.flow(xt, 1000 * t, self.tokens[idx] * keep), target)
        for g in self.opt.param_groups:
            g["lr"] = _lr(step, cfg.steps, cfg.lr, cfg.warmup)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.flow.parameters(), 1.0)
        self.opt.step()
        with torch.no_grad():
            for pe, pl in zip(self.flow_ema.parameters(), self.flow.parameters()):
                pe.lerp_(pl, 1.0 - cfg.ema)
        return loss.item()

    def run(self, log_every: int = 10) -> dict:
        """Train up to ``cfg.steps`` (printing loss and s/step), checkpointing every ``save_every``."""
        torch.set_num_threads(self.cfg.threads)
        hist, t0, start = self.state["loss"], time.time(), self.state["step"]
        while self.state["step"] < self.cfg.steps:
            step, tick = self.state["step"], time.time()
            hist.append(self.step(step))
            self.state["step"] = step + 1
            self.state["seconds"] += time.time() - tick
            if self.progress and (step % log_every == 0 or step + 1 == self.cfg.steps):
                print(f"step {step + 1}/{self.cfg.steps} loss {np.mean(hist[-log_every:]):.4f} "
                      f"s/step {(time.time() - t0) / (step + 1 - start):.2f}", flush=True)
            if (step + 1) % self.cfg.save_every == 0 or step + 1 == self.cfg.steps:
                self._save()
        return self.summary()

    def summary(self) -> dict:
        hist = self.state["loss"]
        return {"steps": self.state["step"], "final_mse": float(np.mean(hist[-100:])) if hist else None,
                "seconds": self.state["seconds"],
                "s_per_step": self.state["seconds"] / max(1, self.state["step"])}


def export_grid_model(trainer: GridTrainer, out_dir: str | Path, ema: bool = True, extra: dict | None = None) -> Path:
    """A TRELLIS folder that carries its conditioner (``timi_torch.trellis.TrellisPipeline``,
    ``timi generate --model FOLDER``): ``pipeline.json`` (upstream's stage-1 entries and sampler
    settings, ``box`` 1.01), ``ckpts/ss_flow.json`` + ``.safetensors`` (upstream's constructor keywords
    and the flow model's state dict, float32), ``ckpts/ss_dec.json`` (the parameter-free
    ``DepthToSpaceDecoder``: :func:`timi.testbed.grid.decode`), ``conditioner.json`` +
    ``conditioner.safetensors`` (hy3dgen's sections), and ``testbed.json`` (latent encoding, box,
    training config and summary)."""
    import safetensors.torch
    from timi_torch.trellis.modeling import DepthToSpaceDecoder
    from timi_torch.trellis.params import save_model, write_pipeline_json
    from timi_torch.trellis.pipeline import CONDITIONER_FILE, CONDITIONER_WEIGHTS
    from timi_torch.trellis.sampler import SamplerSettings

    from .model import hy3dgen_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(trainer.flow_ema if ema else trainer.flow, out / "ckpts" / "ss_flow")
    save_model(DepthToSpaceDecoder(grid.FACTOR, grid.CHANNELS), out / "ckpts" / "ss_dec")
    write_pipeline_json(out, "ckpts/ss_flow", "ckpts/ss_dec", SamplerSettings(sigma_min=trainer.cfg.sigma_min),
                        extra={"box": grid.BOX})
    cfg = hy3dgen_config(trainer.sizes)
    safetensors.torch.save_file({k: v.contiguous() for k, v in trainer.cond.state_dict().items()},
                                str(out / CONDITIONER_WEIGHTS))
    (out / CONDITIONER_FILE).write_text(json.dumps({"conditioner": cfg["conditioner"],
                                                    "image_processor": cfg["image_processor"]}, indent=1))
    meta = {"encoding": grid.ENCODING, "grid": grid.GRID, "factor": grid.FACTOR, "box": grid.BOX,
            "latent_shape": [grid.CHANNELS] + [grid.LATENT_RESOLUTION] * 3,
            "values": {"empty": -1.0, "occupied": 1.0},
            "flow": {"convention": "trellis: t=1 noise, t=0 data, model gets 1000 t",
                     "sigma_min": trainer.cfg.sigma_min},
            "conditioner_preset": CONDITIONER_PRESET, "condition_prefix_tokens": 1,
            "weights": "ema" if ema else "live", "train_config": asdict(trainer.cfg), "summary": trainer.summary(),
            **(extra or {})}
    (out / TESTBED_FILE).write_text(json.dumps(meta, indent=1))
    return out

"""Training of the testbed model (``timi testbed train``): ShapeVAE on occupancy, then DiT by flow matching.

Stage 1 (VAE): :class:`~timi.testbed.model.PointEncoder` + hy3dgen ``ShapeVAE`` decoder, binary
cross-entropy on exact occupancy plus a small KL term (diagonal Gaussian per latent token).

Stage 1c (decoder only, optional; "VAE stage 3" in docs/testbed.md): the decoder alone, on gap and
thin-part queries besides the others; the encoder and so the latents stay as they are, and a DiT
trained on them can be kept.

Stage 2 (latents): encoder means of every training scene; ``scale_factor = 1 / std`` so the DiT
sees unit-variance latents, as hy3dgen's pipeline divides by ``vae.scale_factor`` before decoding.

Stage 3 (DiT): hy3dgen's flow-matching convention, read from ``Hunyuan3DDiTFlowMatchingPipeline``
and ``FlowMatchEulerDiscreteScheduler``: ``sigmas = linspace(0, 1)``, ``t = 0`` is noise and
``t = 1`` data, ``x_t = t * x_1 + (1 - t) * x_0``, the model predicts the velocity
``x_1 - x_0`` and receives ``t`` in [0, 1]. The DINOv2 conditioner trains with the DiT; with
probability ``cond_drop`` a sample's condition is replaced by zeros, hy3dgen's unconditional
embedding, so classifier-free guidance works as in hy3dgen. EMA weights are exported.

Reproducible from ``seed`` (every batch and noise draw is a function of ``(seed, stage, step)``),
resumable from ``<out>/checkpoint.pt`` (written every ``save_every`` steps and at stage ends).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .model import PointEncoder, TestbedSizes, build_parts, decode_occupancy


@dataclass(frozen=True)
class TrainConfig:
    """``n_train`` single assets (VAE and DiT) plus ``n_multi`` multi-instance scenes (VAE only)."""

    seed: int = 0
    n_train: int = 2000
    n_multi: int = 400
    vae_steps: int = 3000
    #: second VAE stage: half of each batch multi-instance scenes, plus queries in the gaps between
    #: primitives (a decoder trained mostly on connected assets bridges gaps of 0.05-0.12)
    vae_gap_steps: int = 0
    vae_gap_lr: float = 3e-4
    #: third VAE stage: the decoder alone (encoder frozen, so the latents and a DiT trained on them
    #: stay valid), half multi-instance batches, queries in gaps and inside thin parts, where a
    #: decoder trained on the first two stages breaks a connected part into pieces
    vae_decoder_steps: int = 0
    vae_decoder_lr: float = 2e-4
    #: uniform queries per sample in the decoder stage (the other sets take ``n_query`` each): more of
    #: them hold down floaters, small blobs that a decoder trained near surfaces puts in empty space
    decoder_uniform_queries: int = 1024
    #: decoder stage only: each sample's latent is perturbed by Gaussian noise of standard deviation
    #: ``s / scale_factor`` (``s`` in units of the latents' std, the DiT's scale), ``s`` drawn
    #: uniformly in ``[0, decoder_latent_noise]``, and still decoded to its exact occupancy. A decoder
    #: trained this way maps latents near the encoder's (as a DiT's samples are) to whole shapes,
    #: where a sharp decoder trained on clean latents alone breaks them into pieces
    decoder_latent_noise: float = 0.0
    vae_batch: int = 8
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    n_surface: int = 2048
    n_query: int = 1024
    dit_steps: int = 3000
    dit_batch: int = 16
    dit_lr: float = 1e-3
    cond_drop: float = 0.1
    #: ``image``: the conditioner's tokens of the rendered image; ``oracle`` (a control, never shipped):
    #: the clean latents themselves through a fixed random projection, to tell whether the DiT can read
    #: condition tokens at all (docs/testbed.md, "Does the DiT use its image?")
    condition: str = "image"
    #: how noise tokens pair with data tokens: ``independent`` (token i with token i, hy3dgen's
    #: training) or ``ot``: within each sample, the assignment of noise tokens to data tokens that
    #: minimises the summed squared distance (:func:`ot_coupling`)
    coupling: str = "independent"
    ema: float = 0.999
    warmup: int = 100
    save_every: int = 250
    threads: int = 2
    #: torch device of the modules and batches (random draws stay on the CPU, so a seed gives the
    #: same batches and noise on any device); the cache stays in CPU memory
    device: str = "cpu"


def flow_matching_pair(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hy3dgen's convention: ``x_t = t x_1 + (1 - t) x_0`` (t=0 noise, t=1 data) and target ``v = x_1 - x_0``."""
    tt = t.reshape(-1, *([1] * (x1.ndim - 1)))
    return tt * x1 + (1 - tt) * x0, x1 - x0


COUPLINGS = ("independent", "ot")


@torch.no_grad()
def ot_coupling(x1: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``x1`` with each sample's tokens reordered so that token i pairs with noise token i at least total cost.

    The latent tokens are a set (hy3dgen's DiT has no latent position embedding and its VAE decoder
    is permutation invariant), so any reordering of a sample's tokens is the same shape; pairing each
    noise token with the data token an optimal assignment gives it (``scipy.optimize.linear_sum_assignment``
    on squared distances) leaves the marginals of ``x_0`` and ``x_1`` as they were but makes the
    velocity target nearly a function of ``x_t`` and the shape (equivariant optimal-transport flow
    matching, Klein et al. 2023; Song et al. 2023), so what remains to predict is what the image tells.
    """
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x0.double(), x1.double()).square().cpu().numpy()
    order = np.stack([linear_sum_assignment(c)[1] for c in cost])
    return torch.gather(x1, 1, torch.from_numpy(order).to(x1.device)[..., None].expand_as(x1))


def couple(x1: torch.Tensor, x0: torch.Tensor, coupling: str) -> torch.Tensor:
    """The data tokens paired with ``x0`` under ``coupling`` (one of :data:`COUPLINGS`)."""
    if coupling == "independent":
        return x1
    if coupling == "ot":
        return ot_coupling(x1, x0)
    raise ValueError(f"unknown coupling {coupling!r}; use one of {COUPLINGS}")


@torch.no_grad()
def losses_with_and_without_image(dit, x1: torch.Tensor, x0: torch.Tensor, t: float,
                                  cond: torch.Tensor, coupling: str = "independent") -> tuple[float, float]:
    """Velocity MSE of ``dit`` at ``x_t`` with the condition tokens ``cond`` and with zeros (hy3dgen's
    unconditional embedding), in the training convention (:func:`flow_matching_pair`, ``coupling``
    as the model was trained); :mod:`timi.testbed.condition_use`."""
    x1 = couple(x1, x0, coupling)
    tt = torch.full((x1.shape[0],), float(t), device=x1.device)
    xt, target = flow_matching_pair(x1, x0, tt)
    return tuple(float(((dit(xt, tt, {"main": c}) - target) ** 2).mean()) for c in (cond, torch.zeros_like(cond)))


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _rng(cfg: TrainConfig, stage: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    ss = np.random.SeedSequence(cfg.seed, spawn_key=(stage, step))
    return np.random.default_rng(ss), torch.Generator().manual_seed(int(ss.generate_state(1)[0]))


class Trainer:
    """Holds modules, optimisers and the loss history; ``run`` trains whatever is not done yet."""

    def __init__(self, out: str | Path, cache: str | Path | None, cfg: TrainConfig = TrainConfig(),
                 sizes: TestbedSizes = TestbedSizes(), progress: bool = True):
        self.out, self.cfg, self.sizes, self.progress = Path(out), cfg, sizes, progress
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        parts = build_parts(sizes)
        self.vae, self.dit, self.cond = parts["vae"], parts["model"], parts["conditioner"]
        self.encoder = PointEncoder(self.vae, sizes)
        self.device = torch.device(cfg.device)
        for module in (self.vae, self.dit, self.cond, self.encoder):
            module.to(self.device)
        #: a fixed conditioner (``sizes.conditioner == "fixed"``) stays frozen: its tokens are computed once
        self.cond_trains = sizes.conditioner != "fixed"
        self.cond.requires_grad_(self.cond_trains)
        self.dit_ema = copy.deepcopy(self.dit).requires_grad_(False)
        self.cond_ema = copy.deepcopy(self.cond).requires_grad_(False)
        self.vae_opt = torch.optim.AdamW(list(self.encoder.parameters()) + list(self.vae.parameters()),
                                         lr=cfg.vae_lr, weight_decay=0.0)
        self.decoder_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_decoder_lr, weight_decay=0.0)
        self.dit_opt = torch.optim.AdamW(self._dit_params(), lr=cfg.dit_lr, weight_decay=0.0)
        self._cond_tokens: torch.Tensor | None = None
        self.state = {"vae_step": 0, "vae_gap_step": 0, "vae_decoder_step": 0, "dit_step": 0,
                      "scale_factor": None, "vae_loss": [], "vae_gap_loss": [], "vae_decoder_loss": [],
                      "dit_loss": [], "latents_at": None}
        self.latents: torch.Tensor | None = None
        self.data: dict[str, torch.Tensor] = {}
        if cache is not None:  # None: only to export a checkpoint
            with np.load(cache) as f:
                if int(f["n"]) != cfg.n_train or int(f["n_multi"]) != cfg.n_multi or \
                        int(f["num_latents"]) != sizes.num_latents or int(f["image_size"]) != sizes.image_size:
                    raise ValueError(f"cache {cache} was built for other sizes (n, n_multi, num_latents, image_size)")
                self.data = {k: torch.from_numpy(f[k]) for k in
                             ("surface", "fps", "volume", "volume_occ", "near", "near_occ", "gap", "gap_occ",
                              "thin", "thin_occ", "image", "num_instances") if k in f}
        #: the DiT's training pool: single assets only (the single-object prior, issue 12)
        self.dit_pool = (np.flatnonzero(self.data["num_instances"].numpy() == 1) if self.data
                         else np.zeros(0, dtype=np.int64))
        self.multi_pool = (np.flatnonzero(self.data["num_instances"].numpy() > 1) if self.data
                           else np.zeros(0, dtype=np.int64))
        self.ckpt = self.out / "checkpoint.pt"
        if self.ckpt.exists():
            self._load()

    # -- checkpointing --------------------------------------------------------------------------
    def _save(self) -> None:
        blob = {"cfg": asdict(self.cfg), "sizes": asdict(self.sizes), "state": self.state,
                "encoder": self.encoder.state_dict(), "vae": self.vae.state_dict(),
                "dit": self.dit.state_dict(), "cond": self.cond.state_dict(),
                "dit_ema": self.dit_ema.state_dict(), "cond_ema": self.cond_ema.state_dict(),
                "vae_opt": self.vae_opt.state_dict(), "dit_opt": self.dit_opt.state_dict(),
                "decoder_opt": self.decoder_opt.state_dict(),
                "latents": self.latents}
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.replace(self.ckpt)

    def _load(self) -> None:
        blob = torch.load(self.ckpt, map_location="cpu", weights_only=False)
        if blob["sizes"] != asdict(self.sizes) or blob["cfg"]["seed"] != self.cfg.seed:
            raise ValueError(f"{self.ckpt} was written with other sizes or seed; use another --out")
        for name in ("encoder", "vae", "dit", "cond", "dit_ema", "cond_ema", "vae_opt", "dit_opt", "decoder_opt"):
            if name in blob:  # decoder_opt: not in checkpoints written before the decoder stage existed
                getattr(self, name).load_state_dict(blob[name])
        self.state = blob["state"]
        self.latents = None if blob["latents"] is None else blob["latents"].to(self.device)
        for key, value in (("vae_gap_step", 0), ("vae_gap_loss", []), ("latents_at", None),
                           ("vae_decoder_step", 0), ("vae_decoder_loss", [])):
            self.state.setdefault(key, value)  # checkpoints written before the gap / decoder stages existed
        if self.latents is not None and self.state["latents_at"] is None:
            self.state["latents_at"] = [self.state["vae_step"], 0]

    # -- stage 1: VAE ---------------------------------------------------------------------------
    def vae_step(self, step: int) -> float:
        """Stage 1: batches from every sample, uniform + near-surface queries."""
        cfg = self.cfg
        rng, gen = _rng(cfg, 1, step)
        idx = torch.from_numpy(rng.choice(len(self.data["surface"]), cfg.vae_batch, replace=False))
        lr = _lr(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup)
        return self._vae_update(rng, gen, idx, lr, ("volume", "near"))

    def vae_gap_step(self, step: int) -> float:
        """Stage 1b: half of each batch multi-instance scenes; a third of the queries in gaps."""
        cfg = self.cfg
        rng, gen = _rng(cfg, 4, step)
        half = cfg.vae_batch // 2
        idx = np.concatenate([rng.choice(self.multi_pool, half, replace=False),
                              rng.choice(self.dit_pool, cfg.vae_batch - half, replace=False)])
        lr = _lr(step, cfg.vae_gap_steps, cfg.vae_gap_lr, cfg.warmup)
        return self._vae_update(rng, gen, torch.from_numpy(idx), lr, ("volume", "near", "gap"))

    def vae_decoder_step(self, step: int) -> float:
        """Stage 1c: the decoder alone; half multi-instance batches; queries also in gaps and thin parts."""
        cfg = self.cfg
        if "thin" not in self.data:
            raise ValueError("the training cache has no thin-part queries (cache_version < 3); build a new one")
        rng, gen = _rng(cfg, 5, step)
        half = cfg.vae_batch // 2
        idx = np.concatenate([rng.choice(self.multi_pool, half, replace=False),
                              rng.choice(self.dit_pool, cfg.vae_batch - half, replace=False)])
        lr = _lr(step, cfg.vae_decoder_steps, cfg.vae_decoder_lr, cfg.warmup)
        sets = {"volume": cfg.decoder_uniform_queries, "near": cfg.n_query, "gap": cfg.n_query, "thin": cfg.n_query}
        return self._vae_update(rng, gen, torch.from_numpy(idx), lr, sets, decoder_only=True,
                                latent_noise=cfg.decoder_latent_noise)

    def _vae_update(self, rng, gen, idx, lr: float, query_sets: tuple[str, ...] | dict[str, int],
                    decoder_only: bool = False, latent_noise: float = 0.0) -> float:
        """One AdamW step on BCE of exact occupancy; ``query_sets``: cached query sets, ``n_query`` each,
        or a mapping set -> count; ``latent_noise``: see ``TrainConfig.decoder_latent_noise``."""
        cfg, d = self.cfg, self.data
        pick = lambda n, k: torch.from_numpy(rng.choice(n, k, replace=False))  # noqa: E731
        dev = self.device
        surface = d["surface"][idx][:, : cfg.n_surface].to(dev)
        counts = query_sets if isinstance(query_sets, dict) else dict.fromkeys(query_sets, cfg.n_query)
        parts = [(d[name], d[f"{name}_occ"], pick(d[name].shape[1], k)) for name, k in counts.items()]
        queries = torch.cat([q[idx][:, sel] for q, _, sel in parts], 1)
        queries, occ = queries.to(dev), torch.cat([o[idx][:, sel] for _, o, sel in parts], 1).float().to(dev)
        with torch.set_grad_enabled(not decoder_only):
            mean, logvar = self.encoder(surface, d["fps"][idx].to(dev))
        z = mean + torch.randn(mean.shape, generator=gen).to(dev) * (0.5 * logvar).exp()
        if latent_noise > 0:
            if not self.state["scale_factor"]:
                raise ValueError("decoder latent noise needs the latents' scale_factor (train the VAE first)")
            s = torch.from_numpy(rng.uniform(0.0, latent_noise, size=(len(idx), 1, 1))).float()
            z = z + (s * torch.randn(mean.shape, generator=gen)).to(dev) / self.state["scale_factor"]
        logits = decode_occupancy(self.vae, z, queries)
        bce = F.binary_cross_entropy_with_logits(logits, occ)
        learnt = slice(3, None) if self.sizes.latent_positions else slice(None)  # exact positions: no KL
        kl = 0.5 * (mean**2 + logvar.exp() - logvar - 1)[..., learnt].mean()
        loss = bce if decoder_only else bce + cfg.kl_weight * kl
        opt = self.decoder_opt if decoder_only else self.vae_opt
        params = [p for g in opt.param_groups for p in g["params"]]
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return bce.item()

    # -- stage 2: latents -----------------------------------------------------------------------
    @torch.no_grad()
    def encode_all(self) -> torch.Tensor:
        self.encoder.eval()
        d, n = self.data, len(self.data["surface"])
        dev = self.device
        means = [self.encoder(d["surface"][i:i + 64, : self.cfg.n_surface].to(dev), d["fps"][i:i + 64].to(dev))[0]
                 for i in range(0, n, 64)]
        self.encoder.train()
        return torch.cat(means)

    # -- stage 3: DiT ---------------------------------------------------------------------------
    def _dit_params(self) -> list[torch.nn.Parameter]:
        return list(self.dit.parameters()) + (list(self.cond.parameters()) if self.cond_trains else [])

    def condition_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """Conditioner tokens of training samples ``idx`` (a frozen conditioner's are computed once)."""
        if self.cfg.condition == "oracle":
            x1 = self.latents[idx] * self.state["scale_factor"]
            proj = torch.randn(x1.shape[-1], self.sizes.cond_width, generator=torch.Generator().manual_seed(5))
            return torch.cat([torch.zeros(len(idx), 1, self.sizes.cond_width, device=x1.device),
                              x1 @ proj.to(x1.device) / x1.shape[-1] ** 0.5], 1)
        if self.cfg.condition != "image":
            raise ValueError(f"unknown condition {self.cfg.condition!r}; use 'image' or 'oracle'")
        if self.cond_trains:
            return self.cond(image=self.data["image"][idx].float().to(self.device))["main"]
        if self._cond_tokens is None:
            images = self.data["image"]
            with torch.no_grad():
                self._cond_tokens = torch.cat([self.cond(image=images[i:i + 64].float().to(self.device))["main"]
                                               for i in range(0, len(images), 64)])
        return self._cond_tokens[idx]

    @torch.no_grad()
    def condition_use(self, n: int = 32, ts: tuple[float, ...] = (0.05, 0.5, 0.8)) -> dict[str, float]:
        """Velocity loss of the live DiT with vs without the image on ``n`` fixed training assets
        (:mod:`timi.testbed.condition_use` measures the exported model on test scenes the same way)."""
        rng, gen = _rng(self.cfg, 5, 0)
        idx = torch.from_numpy(self.dit_pool[rng.choice(len(self.dit_pool), min(n, len(self.dit_pool)), replace=False)])
        x1 = self.latents[idx] * self.state["scale_factor"]
        cond = self.condition_tokens(idx)
        out = {}
        for t in ts:
            x0 = torch.randn(x1.shape, generator=gen).to(self.device)
            with_image, with_zeros = losses_with_and_without_image(self.dit, x1, x0, t, cond, self.cfg.coupling)
            out[f"t{t}"] = (with_zeros - with_image) / with_zeros
        return out

    def dit_step(self, step: int) -> float:
        cfg = self.cfg
        rng, gen = _rng(cfg, 3, step)
        idx = torch.from_numpy(self.dit_pool[rng.choice(len(self.dit_pool), cfg.dit_batch, replace=False)])
        x1 = self.latents[idx] * self.state["scale_factor"]
        x0 = torch.randn(x1.shape, generator=gen).to(self.device)
        x1 = couple(x1, x0, cfg.coupling)
        t = torch.rand(len(idx), generator=gen).to(self.device)
        xt, target = flow_matching_pair(x1, x0, t)
        cond = self.condition_tokens(idx)
        keep = (torch.rand(len(idx), generator=gen) >= cfg.cond_drop).float()[:, None, None].to(self.device)
        cond = cond * keep  # dropped samples get zeros = hy3dgen's unconditional embedding
        v = self.dit(xt, t, {"main": cond})
        loss = F.mse_loss(v, target)
        for g in self.dit_opt.param_groups:
            g["lr"] = _lr(step, cfg.dit_steps, cfg.dit_lr, cfg.warmup)
        self.dit_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self._dit_params(), 1.0)
        self.dit_opt.step()
        pairs = ((self.dit_ema, self.dit), (self.cond_ema, self.cond)) if self.cond_trains else ((self.dit_ema, self.dit),)
        with torch.no_grad():
            for ema, live in pairs:
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1.0 - cfg.ema)
        return loss.item()

    # -- driver ---------------------------------------------------------------------------------
    def _loop(self, name: str, total: int, fn) -> None:
        from tqdm import tqdm

        key, hist = f"{name}_step", self.state[f"{name}_loss"]
        bar = tqdm(total=total, initial=self.state[key], desc=f"train {name}", disable=not self.progress,
                   mininterval=5.0)
        t0 = time.time()
        while self.state[key] < total:
            step = self.state[key]
            hist.append(fn(step))
            self.state[key] = step + 1
            bar.update(1)
            if step % 25 == 0:
                bar.set_postfix(loss=f"{np.mean(hist[-50:]):.4f}")
            if (step + 1) % self.cfg.save_every == 0 or step + 1 == total:
                if name == "dit":  # does the DiT use its image yet? (relative loss drop with the image)
                    use = self.condition_use()
                    self.state.setdefault("condition_use", []).append({"step": step + 1, **use})
                    bar.write(f"dit step {step + 1}: loss drop with the image "
                              + ", ".join(f"{k} {v:.1%}" for k, v in use.items()))
                self._save()
        bar.close()
        self.state.setdefault("seconds", {})[name] = self.state.get("seconds", {}).get(name, 0.0) + time.time() - t0

    def run(self) -> dict:
        torch.set_num_threads(self.cfg.threads)
        self._loop("vae", self.cfg.vae_steps, self.vae_step)
        self._loop("vae_gap", self.cfg.vae_gap_steps, self.vae_gap_step)
        self._loop("vae_decoder", self.cfg.vae_decoder_steps, self.vae_decoder_step)  # latents unchanged
        vae_at = [self.state["vae_step"], self.state["vae_gap_step"]]
        if self.latents is None or self.state["latents_at"] != vae_at:
            if self.state["dit_step"]:
                raise RuntimeError("the VAE changed after the DiT started training; use a new --out")
            encoder_changed = self.state["latents_at"] is not None or not self.state.get("scale_factor_kept")
            self.state["latents_at"] = vae_at
            self.latents = self.encode_all()
            if encoder_changed:  # else: the encoder of --init-from, and the scale its DiT was trained with
                self.state["scale_factor"] = float(1.0 / self.latents[torch.from_numpy(self.dit_pool)].std())
            self._save()
        self._loop("dit", self.cfg.dit_steps, self.dit_step)
        self.plot_losses(self.out / "loss_curve.png")
        tail = lambda h: float(np.mean(h[-100:])) if h else None  # noqa: E731 (None: stage not run here)
        summary = {"vae_final_bce": tail(self.state["vae_loss"]), "vae_gap_final_bce": tail(self.state["vae_gap_loss"]),
                   "vae_decoder_final_bce": tail(self.state["vae_decoder_loss"]),
                   "dit_final_mse": tail(self.state["dit_loss"]),
                   "scale_factor": self.state["scale_factor"], "seconds": self.state.get("seconds", {})}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def plot_losses(self, path: str | Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, name, label in ((axes[0], "vae", "VAE occupancy BCE"), (axes[1], "dit", "DiT flow-matching MSE")):
            h = np.asarray(self.state[f"{name}_loss"] + (self.state["vae_gap_loss"] + self.state["vae_decoder_loss"]
                                                         if name == "vae" else []))
            if h.size:
                ax.plot(h, alpha=0.3, lw=0.5)
                w = max(1, h.size // 50)
                ax.plot(np.arange(w - 1, h.size), np.convolve(h, np.ones(w) / w, mode="valid"), lw=1.5)
            ax.set_title(label)
            ax.set_xlabel("step")
            ax.set_yscale("log")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def export_state(self, ema: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """Key groups (DiT / conditioner: EMA or live weights, VAE decoder, our encoder) for
        :func:`~timi.testbed.export.export_model_dir`."""
        if self.state["scale_factor"] is None:
            raise RuntimeError("the VAE stage has not finished; no scale_factor yet")
        dit, cond = (self.dit_ema, self.cond_ema) if ema else (self.dit, self.cond)
        return {"model": dit.state_dict(), "vae": self.vae.state_dict(),
                "conditioner": cond.state_dict(), "encoder": self.encoder.state_dict()}

    def init_from(self, model_dir: str | Path, vae_done: bool = True, dit: bool = True) -> str:
        """Start from an exported model directory (its fp16 weights; fresh optimisers).

        With ``vae_done`` the VAE stage counts as finished (its weights are the directory's) and the
        latents keep the directory's ``scale_factor`` (its DiT was trained with it). The DiT
        and conditioner start from the directory's EMA weights when their sizes are this run's;
        otherwise (e.g. a new conditioner on a kept VAE), or without ``dit``, they train from scratch. Needs the shipped
        encoder file. When the latent layout differs (``latent_positions``) the VAE stages run on from
        these weights. Returns what was taken, in words.
        """
        from .export import load_groups, testbed_extra

        extra = testbed_extra(model_dir)
        theirs = TestbedSizes(**extra.get("sizes", {}))
        for field in ("num_latents", "latent_channels", "vae_width", "vae_heads", "vae_layers", "vae_mlp_ratio",
                      "encoder_layers"):
            if getattr(theirs, field) != getattr(self.sizes, field):
                raise ValueError(f"{model_dir}: its VAE has {field}={getattr(theirs, field)}, this run "
                                 f"{getattr(self.sizes, field)}; start without --init-from")
        dit = dit and theirs.replace(scale_factor=1.0) == self.sizes.replace(scale_factor=1.0)
        if theirs.latent_positions != self.sizes.latent_positions:
            vae_done = False  # the latents mean something else: the VAE stages fine-tune from these weights
        groups = load_groups(model_dir)
        if "encoder" not in groups:
            raise FileNotFoundError(f"{model_dir} has no encoder weights; it cannot seed a new run")
        if dit:
            self.dit.load_state_dict(groups["model"])
            self.dit_ema.load_state_dict(groups["model"])
            self.cond.load_state_dict(groups["conditioner"])
            self.cond_ema.load_state_dict(groups["conditioner"])
        self.vae.load_state_dict(groups["vae"])
        self.encoder.load_state_dict(groups["encoder"])
        #: what this run started from, exported with it (nested: the parent's own parent stays inside)
        self.state["parent"] = {"model_dir": str(model_dir), "took": "vae" + ("+dit" if dit else ""),
                                **{k: v for k, v in extra.items() if k != "sizes"}}
        if vae_done:
            self.state["vae_step"], self.state["vae_gap_step"] = self.cfg.vae_steps, self.cfg.vae_gap_steps
            # the encoder is theirs, so is the latents' scale: the DiT was trained on latents * theirs
            self.state["scale_factor"], self.state["scale_factor_kept"] = float(theirs.scale_factor), True
        return ("VAE and encoder (trained)" if vae_done else "VAE and encoder (to fine-tune)") + \
            (", DiT and conditioner" if dit else "; the DiT trains from scratch")

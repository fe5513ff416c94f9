"""Tiny Hunyuan3D 2.1 model folders in 2.1's on-disk format, and seeded weights for parity fixtures.

:func:`write_tiny_model_dir` writes what a ``hunyuan3d-dit-v2-1`` folder holds: ``config.yaml`` with
upstream's ``hy3dshape`` targets and option names, and ``model.fp16.ckpt`` (a torch pickle with
``model``, ``vae``, ``conditioner`` sections; the VAE section with encoder weights, as a real one has,
which decoding drops). Random weights at toy sizes (preset ``"2.1-tiny"``), nothing downloaded.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import yaml

from ..testing import calibrate_surface, tiny_config
from .modeling import PRESETS, HunYuanDiTPlain
from .params import build_pipeline

__all__ = ["write_tiny_model_dir", "tiny_config21", "seeded_state_dict"]


def _hy3dshape(target: str) -> str:
    return "hy3dshape." + target[len("hy3dgen.shapegen."):]


def tiny_config21(preset: str = "2.1-tiny", *, image_size: int = 112, cond_layers: int = 1, **dit) -> dict:
    """``config.yaml`` of a tiny 2.1 model: the ``preset``'s DiT options (overridden by ``dit``),
    2.1's VAE keywords (encoder ones included) and hy3dshape targets, a DINOv2 of width
    ``context_dim`` at ``image_size`` px."""
    import dataclasses

    cfg = dataclasses.replace(PRESETS[preset], **dit)
    grid = (image_size // 14) ** 2 + 1
    params = dataclasses.asdict(cfg)
    params.update(text_len=grid)
    for key in ("mlp_ratio", "norm_type", "guidance_cond_proj_dim"):
        params.pop(key)
    base = tiny_config(latent_channels=cfg.in_channels, num_latents=cfg.input_size, cond_width=cfg.context_dim,
                       cond_layers=cond_layers, image_size=image_size)
    base["model"] = {"target": "hy3dshape.models.denoisers.hunyuandit.HunYuanDiTPlain", "params": params}
    base["vae"]["target"] = "hy3dshape.models.autoencoders.ShapeVAE"
    base["vae"]["params"].update(num_encoder_layers=1, geo_decoder_mlp_expand_ratio=4, geo_decoder_downsample_ratio=1,
                                 geo_decoder_ln_post=True, point_feats=4, pc_size=81920, pc_sharpedge_size=0,
                                 scale_factor=1.0039506158752403)
    base["conditioner"]["target"] = "hy3dshape.models.conditioner.SingleImageEncoder"
    for part in ("scheduler", "image_processor"):
        base[part]["target"] = _hy3dshape(base[part]["target"])
    base["pipeline"] = {"target": "hy3dshape.pipelines.Hunyuan3DDiTFlowMatchingPipeline"}
    return base


def _encoder_weights(vae_params: dict, generator) -> dict:
    """Stand-ins for 2.1's VAE encoder weights (``pre_kl``, ``encoder.input_proj``)."""
    width, embed = vae_params["width"], vae_params["embed_dim"]
    fourier = 3 * (2 * vae_params.get("num_freqs", 8) + 1)
    return {"pre_kl.weight": torch.randn(2 * embed, width, generator=generator),
            "pre_kl.bias": torch.zeros(2 * embed),
            "encoder.input_proj.weight": torch.randn(width, fourier + vae_params["point_feats"], generator=generator),
            "encoder.input_proj.bias": torch.zeros(width)}


def write_tiny_model_dir(path, *, seed: int = 0, preset: str = "2.1-tiny", **options) -> Path:
    """Write a random-weight 2.1 model folder (``config.yaml``, ``model.fp16.ckpt`` in float16,
    ``model.ckpt`` in float32). ``options``: keywords of :func:`tiny_config21`."""
    from hy3dgen.shapegen.pipelines import instantiate_from_config

    config = tiny_config21(preset, **options)
    out = Path(os.path.expanduser(str(path)))
    out.mkdir(parents=True, exist_ok=True)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = HunYuanDiTPlain(**config["model"]["params"])
        vae_section = {**config["vae"], "target": "hy3dgen.shapegen.models.autoencoders.ShapeVAE"}
        vae_params = {k: v for k, v in config["vae"]["params"].items()
                      if k not in ("num_encoder_layers", "point_feats", "pc_size", "pc_sharpedge_size")}
        vae = instantiate_from_config({**vae_section, "params": vae_params})
        calibrate_surface(vae, seed)
        conditioner = instantiate_from_config({**config["conditioner"],
                                               "target": "hy3dgen.shapegen.models.conditioner.SingleImageEncoder"})
        sections = {"model": model.state_dict(), "vae": dict(vae.state_dict()), "conditioner": conditioner.state_dict()}
        sections["vae"].update(_encoder_weights(config["vae"]["params"], torch.Generator().manual_seed(seed)))
    finally:
        torch.random.set_rng_state(state)
    full = {s: {k: v.detach().float().contiguous().clone() for k, v in sd.items()} for s, sd in sections.items()}
    torch.save(full, out / "model.ckpt")
    torch.save({s: {k: v.half() for k, v in sd.items()} for s, sd in full.items()}, out / "model.fp16.ckpt")
    with open(out / "config.yaml", "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return out


def load_tiny(path, dtype=torch.float32, variant: str | None = None):
    """hy3dgen's pipeline for a folder of :func:`write_tiny_model_dir` (``variant=None``: float32 file)."""
    path = Path(path)
    with open(path / "config.yaml") as f:
        config = yaml.safe_load(f)
    name = "model.ckpt" if variant is None else f"model.{variant}.ckpt"
    return build_pipeline(config, path / name, device="cpu", dtype=dtype)


def seeded_state_dict(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Weights made from ``seed`` alone, key by key in the given order (a fixture stores the seed,
    not the tensors): a 2-D weight ~ N(0, 1/fan_in); a norm's weight 1 + 0.1 N(0, 1); anything
    else (biases, the MoE gate is 2-D) 0.1 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        noise = torch.randn(tuple(shape), generator=g, dtype=torch.float64)
        if key.endswith("weight") and len(shape) == 2:
            value = noise / math.sqrt(shape[1])
        elif key.endswith("weight") and "norm" in key:
            value = 1 + 0.1 * noise
        else:
            value = 0.1 * noise
        out[key] = value.float()
    return out

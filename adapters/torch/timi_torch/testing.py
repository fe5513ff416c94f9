"""Tiny random-weight Hunyuan3D-2 family model directories in hy3dgen's own on-disk format.

:func:`write_tiny_model_dir` writes what hy3dgen's loaders read (``config.yaml`` plus
``model.fp16.safetensors`` and ``model.safetensors`` holding the ``model.``, ``vae.`` and
``conditioner.`` key groups), with the v2.0 architecture classes at toy sizes, so tests and
benchmarks run the *real* loader and model code on a CPU in seconds and without any download:

>>> from timi_torch import write_tiny_model_dir
>>> d = write_tiny_model_dir("/tmp/models/tencent/Hunyuan3D-2/hunyuan3d-dit-v2-0")  # doctest: +SKIP
>>> from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline                     # doctest: +SKIP
>>> pipe = Hunyuan3DDiTFlowMatchingPipeline.from_single_file(                         # doctest: +SKIP
...     f"{d}/model.fp16.safetensors", f"{d}/config.yaml", device="cpu", dtype=torch.float32,
...     use_safetensors=True)

or, through hy3dgen's local-directory resolution (``$HY3DGEN_MODELS/<model_path>/<subfolder>``):
``HY3DGEN_MODELS=/tmp/models`` and
``Hunyuan3DDiTFlowMatchingPipeline.from_pretrained("tencent/Hunyuan3D-2", device="cpu")``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import yaml

__all__ = ["write_tiny_model_dir", "write_tiny_vae_dir", "tiny_config", "VARIANTS"]

#: The published shape DiTs (hy3dgen's subfolder names) -> what distinguishes their config.yaml,
#: as :func:`tiny_config` keywords: guidance-distilled (fast, turbo: ``guidance_embed``), turbo's
#: consistency scheduler, 2mini's 8 double-stream blocks, 2mv's multi-view conditioner.
VARIANTS: dict[str, dict] = {}
for _family, _extra in (("v2-0", {}), ("v2-mini", {"depth": 8}), ("v2-mv", {"multiview": True})):
    VARIANTS[f"hunyuan3d-dit-{_family}"] = dict(_extra)
    VARIANTS[f"hunyuan3d-dit-{_family}-fast"] = dict(_extra, guidance_embed=True)
    VARIANTS[f"hunyuan3d-dit-{_family}-turbo"] = dict(_extra, guidance_embed=True, scheduler="consistency")


def _conditioner(cond_width: int, cond_layers: int, image_size: int, multiview: bool) -> dict:
    encoder = {
        "type": "DinoImageEncoderMV" if multiview else "DinoImageEncoder",
        "kwargs": {
            "config": {
                "attention_probs_dropout_prob": 0.0,
                "drop_path_rate": 0.0,
                "hidden_act": "gelu",
                "hidden_dropout_prob": 0.0,
                "hidden_size": cond_width,
                "image_size": image_size,
                "initializer_range": 0.02,
                "layer_norm_eps": 1.0e-6,
                "layerscale_value": 1.0,
                "mlp_ratio": 4,
                "model_type": "dinov2",
                "num_attention_heads": 2,
                "num_channels": 3,
                "num_hidden_layers": cond_layers,
                "patch_size": 14,
                "qkv_bias": True,
                "torch_dtype": "float32",
                "use_swiglu_ffn": False,
            },
            "image_size": image_size,
            "use_cls_token": True,
        },
    }
    if multiview:
        encoder["kwargs"]["view_num"] = 4
    return {"target": "hy3dgen.shapegen.models.SingleImageEncoder", "params": {"main_image_encoder": encoder}}


def tiny_config(
    *,
    depth: int = 2,
    depth_single_blocks: int = 2,
    hidden_size: int = 32,
    num_heads: int = 2,
    latent_channels: int = 8,
    num_latents: int = 64,
    cond_width: int = 24,
    cond_layers: int = 1,
    image_size: int = 518,
    vae_width: int = 32,
    vae_layers: int = 1,
    guidance_embed: bool = False,
    scheduler: str = "flow",
    pcm_timesteps: int = 100,
    multiview: bool = False,
) -> dict:
    """The ``config.yaml`` content of a tiny model: hy3dgen v2.0's layout and classes, toy sizes.

    ``image_size`` is the conditioner's input size (518 and a 37x37 DINOv2 patch grid, as in the
    real model, by default; use a multiple of 14 such as 112 for faster tests).
    The family's variants (:data:`VARIANTS`): ``guidance_embed=True`` (a guidance-distilled DiT,
    the fast and turbo models), ``scheduler="consistency"`` (turbo's
    ``ConsistencyFlowMatchEulerDiscreteScheduler`` with ``pcm_timesteps``; 100 as third-party
    copies of the turbo configs have it), ``multiview=True`` (2mv: ``DinoImageEncoderMV`` with four
    views and ``MVImageProcessorV2``), ``depth=8`` (2mini's double-stream blocks).
    """
    if scheduler not in ("flow", "consistency"):
        raise ValueError(f"scheduler={scheduler!r} must be 'flow' or 'consistency'.")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}.")
    if image_size % 14:
        raise ValueError(f"image_size={image_size} must be a multiple of the DINOv2 patch size 14.")
    return {
        "model": {
            "target": "hy3dgen.shapegen.models.Hunyuan3DDiT",
            "params": {
                "in_channels": latent_channels,
                "context_in_dim": cond_width,
                "hidden_size": hidden_size,
                "mlp_ratio": 4.0,
                "num_heads": num_heads,
                "depth": depth,
                "depth_single_blocks": depth_single_blocks,
                "axes_dim": [hidden_size // num_heads],
                "theta": 10000,
                "qkv_bias": True,
                "guidance_embed": guidance_embed,
            },
        },
        "vae": {
            "target": "hy3dgen.shapegen.models.ShapeVAE",
            "params": {
                "num_latents": num_latents,
                "embed_dim": latent_channels,
                "num_freqs": 8,
                "include_pi": False,
                "heads": 2,
                "width": vae_width,
                "num_decoder_layers": vae_layers,
                "qkv_bias": False,
                "qk_norm": True,
                "scale_factor": 0.9990943042622529,
            },
        },
        "conditioner": _conditioner(cond_width, cond_layers, image_size, multiview),
        "scheduler": {
            "target": "hy3dgen.shapegen.schedulers.FlowMatchEulerDiscreteScheduler",
            "params": {"num_train_timesteps": 1000},
        } if scheduler == "flow" else {
            "target": "hy3dgen.shapegen.schedulers.ConsistencyFlowMatchEulerDiscreteScheduler",
            "params": {"num_train_timesteps": 1000, "pcm_timesteps": pcm_timesteps},
        },
        "image_processor": {
            "target": f"hy3dgen.shapegen.preprocessors.{'MVImageProcessorV2' if multiview else 'ImageProcessorV2'}",
            "params": {"size": 512, "border_ratio": 0.15},
        },
    }


def calibrate_surface(vae, seed: int) -> None:
    """Shift the random occupancy head so its median over a coarse grid is 0 for a random latent.

    Random weights give an occupancy field that may never cross hy3dgen's default level 0, and
    then marching cubes finds no surface; centring the field makes a surface (almost) certain.
    """
    from hy3dgen.shapegen.models.autoencoders.volume_decoders import generate_dense_grid_points
    import numpy as np

    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn((1, *vae.latent_shape), generator=g)
    xyz, _, _ = generate_dense_grid_points(
        bbox_min=np.array([-1.01] * 3), bbox_max=np.array([1.01] * 3), octree_resolution=16, indexing="ij")
    q = torch.from_numpy(xyz).float().reshape(1, -1, 3)
    with torch.no_grad():
        logits = vae.geo_decoder(queries=q, latents=vae(z / vae.scale_factor))
        vae.geo_decoder.output_proj.bias -= logits.median()


def write_tiny_model_dir(
    path,
    *,
    seed: int = 0,
    variant: str = "hunyuan3d-dit-v2-0",
    depth: int | None = None,
    depth_single_blocks: int = 2,
    **sizes,
) -> Path:
    """Write a tiny random-weight Hunyuan3D 2.0 model directory that hy3dgen's loaders read.

    Parameters
    ----------
    path : directory to write (created). It receives ``config.yaml``, ``model.fp16.safetensors``
        (float16 weights, hy3dgen's default ``variant='fp16'``) and ``model.safetensors`` (float32,
        ``variant=None``), each with the ``model.``, ``vae.`` and ``conditioner.`` key groups.
        To load it with ``from_pretrained(model_path, subfolder=...)`` write it to
        ``$HY3DGEN_MODELS/<model_path>/<subfolder>``.
    seed : seeds the random weights (same seed, same files).
    variant : which published DiT's layout (a key of :data:`VARIANTS`, hy3dgen's subfolder name):
        ``hunyuan3d-dit-v2-0`` (default), ``-fast``/``-turbo`` (guidance-distilled; turbo with the
        consistency scheduler), ``hunyuan3d-dit-v2-mini*`` (8 double-stream blocks),
        ``hunyuan3d-dit-v2-mv*`` (multi-view conditioner and image processor).
    depth, depth_single_blocks : number of double- and single-stream DiT blocks (``depth``
        default: the variant's, 2 for v2-0 and mv, 8 for mini).
    **sizes : any other keyword of :func:`tiny_config` (``hidden_size``, ``num_heads``,
        ``latent_channels``, ``num_latents``, ``cond_width``, ``cond_layers``, ``image_size``, ...).

    Returns the directory as a :class:`pathlib.Path`.
    """
    from hy3dgen.shapegen.pipelines import instantiate_from_config
    import safetensors.torch

    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {sorted(VARIANTS)}.")
    options = {**VARIANTS[variant], **sizes, "depth_single_blocks": depth_single_blocks}
    if depth is not None:
        options["depth"] = depth
    config = tiny_config(**options)
    out = Path(os.path.expanduser(str(path)))
    out.mkdir(parents=True, exist_ok=True)

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        parts = {name: instantiate_from_config(copy.deepcopy(config[name]))
                 for name in ("model", "vae", "conditioner")}
        calibrate_surface(parts["vae"], seed)
    finally:
        torch.random.set_rng_state(state)

    tensors = {}
    for name, module in parts.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().to(torch.float32).contiguous().clone()
    safetensors.torch.save_file(tensors, str(out / "model.safetensors"))
    safetensors.torch.save_file({k: v.to(torch.float16) for k, v in tensors.items()},
                                str(out / "model.fp16.safetensors"))
    with open(out / "config.yaml", "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return out


def write_tiny_vae_dir(path, model_dir) -> Path:
    """A ShapeVAE folder in hy3dgen's format (``config.yaml`` with ``target``/``params``, and
    ``model.fp16.safetensors`` / ``model.safetensors`` holding the bare VAE state dict), made from
    the VAE of the tiny model in ``model_dir``: what ``ShapeVAE.from_pretrained`` /
    ``from_single_file`` read, e.g. a stand-in for the turbo VAE ``hunyuan3d-vae-v2-0-turbo`` that
    FlashVDM decoding uses (same architecture; its weights are the model's own here)."""
    import safetensors.torch

    model_dir = Path(model_dir)
    with open(model_dir / "config.yaml") as f:
        vae_config = yaml.safe_load(f)["vae"]
    weights = safetensors.torch.load_file(str(model_dir / "model.safetensors"))
    vae = {k[len("vae."):]: v for k, v in weights.items() if k.startswith("vae.")}
    out = Path(os.path.expanduser(str(path)))
    out.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(vae, str(out / "model.safetensors"))
    safetensors.torch.save_file({k: v.to(torch.float16) for k, v in vae.items()}, str(out / "model.fp16.safetensors"))
    with open(out / "config.yaml", "w") as f:
        yaml.safe_dump(vae_config, f, sort_keys=False)
    return out

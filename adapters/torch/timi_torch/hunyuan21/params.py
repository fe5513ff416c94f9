"""Loading Hunyuan3D 2.1 model folders (``hunyuan3d-dit-v2-1``: ``config.yaml`` + ``model.fp16.ckpt``).

A 2.1 ``config.yaml`` names ``hy3dshape`` classes, a package that is not on PyPI. What of it differs
from hy3dgen 2.0.2 (read from Tencent-Hunyuan/Hunyuan3D-2.1, ``docs/hunyuan21.md``):

* the DiT, ``HunYuanDiTPlain`` -> :class:`timi_torch.hunyuan21.HunYuanDiTPlain`, loaded strictly;
* the ShapeVAE gains a point-cloud encoder (``encoder.*``, ``pre_kl.*`` weights and the
  ``num_encoder_layers``, ``pc_size``, ... keywords) that decoding never uses; its decoder is
  hy3dgen's ``ShapeVAE`` unchanged. :data:`ENCODER_PREFIXES` are dropped (upstream itself loads the
  VAE with ``strict=False``); every other key must match;
* conditioner, image processor, flow-matching scheduler and the pipeline's sampling loop are
  hy3dgen's, line for line, so their targets map to ``hy3dgen.shapegen`` (:func:`resolve_target`).

:func:`build_pipeline` returns hy3dgen's ``Hunyuan3DDiTFlowMatchingPipeline`` holding these parts,
which ``timi_torch.TIMIPipeline`` wraps as it wraps a 2.0 pipeline.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch

from .modeling import HunYuanDiTPlain

__all__ = ["is_hunyuan21", "resolve_target", "read_checkpoint", "load_dit", "load_vae", "build_pipeline",
           "ENCODER_PREFIXES", "SUBFOLDER", "FAMILY"]

#: The model repository's name and the DiT's subfolder in it (``$HY3DGEN_MODELS/tencent/Hunyuan3D-2.1/...``).
FAMILY, SUBFOLDER = "Hunyuan3D-2.1", "hunyuan3d-dit-v2-1"
#: VAE weights of 2.1's point-cloud encoder, unused by decoding.
ENCODER_PREFIXES = ("encoder.", "pre_kl.")


def is_hunyuan21(config: dict) -> bool:
    """Whether a parsed ``config.yaml`` describes a Hunyuan3D 2.1 DiT (``HunYuanDiTPlain``)."""
    target = str(((config or {}).get("model") or {}).get("target", ""))
    return target.rsplit(".", 1)[-1] == "HunYuanDiTPlain"


def resolve_target(target: str):
    """The class for a config ``target``: 2.1's DiT -> ours; ``hy3dshape.X`` -> ``hy3dgen.shapegen.X``."""
    if target.rsplit(".", 1)[-1] == "HunYuanDiTPlain":
        return HunYuanDiTPlain
    name = target.lstrip(".")
    for prefix in ("hy3dshape.hy3dshape.", "hy3dshape."):
        if name.startswith(prefix):
            name = "hy3dgen.shapegen." + name[len(prefix):]
            break
    module, cls = name.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


def _build(section: dict):
    return resolve_target(section["target"])(**(section.get("params") or {}))


def read_checkpoint(path) -> dict[str, dict[str, torch.Tensor]]:
    """``{'model': ..., 'vae': ..., 'conditioner': ...}`` from a ``.ckpt`` (torch pickle, tensors
    only) or a ``.safetensors`` file whose keys carry the section as prefix."""
    path = Path(path)
    if path.suffix == ".safetensors":
        import safetensors.torch

        out: dict[str, dict] = {}
        for key, value in safetensors.torch.load_file(str(path), device="cpu").items():
            section, _, rest = key.partition(".")
            out.setdefault(section, {})[rest] = value
        return out
    return torch.load(str(path), map_location="cpu", weights_only=True)


def load_dit(state: dict, params: dict) -> HunYuanDiTPlain:
    """The DiT from ``model.params`` and the ``model`` section, strictly."""
    model = HunYuanDiTPlain(**params)
    model.load_state_dict(state, strict=True)
    return model


def load_vae(state: dict, section: dict):
    """hy3dgen's ``ShapeVAE`` from 2.1's ``vae`` section: encoder keywords and weights dropped,
    everything else strict."""
    cls = resolve_target(section["target"])
    accepted = inspect.signature(cls.__init__).parameters
    vae = cls(**{k: v for k, v in (section.get("params") or {}).items() if k in accepted})
    decoder = {k: v for k, v in state.items() if not k.startswith(ENCODER_PREFIXES)}
    vae.load_state_dict(decoder, strict=True)
    return vae


def build_pipeline(config: dict, ckpt_path, device="cpu", dtype=torch.float32, **kwargs):
    """hy3dgen's ``Hunyuan3DDiTFlowMatchingPipeline`` for a 2.1 ``config`` (parsed ``config.yaml``)
    and checkpoint, as 2.1's ``from_single_file`` builds it."""
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline

    ckpt = read_checkpoint(ckpt_path)
    missing = [s for s in ("model", "vae") if s not in ckpt]
    if missing:
        raise KeyError(f"{ckpt_path} holds no {missing} section(s) (it holds {sorted(ckpt)}).")
    model = load_dit(ckpt["model"], config["model"].get("params") or {})
    vae = load_vae(ckpt["vae"], config["vae"])
    conditioner = _build(config["conditioner"])
    if "conditioner" in ckpt:
        conditioner.load_state_dict(ckpt["conditioner"])
    return Hunyuan3DDiTFlowMatchingPipeline(vae=vae, model=model, scheduler=_build(config["scheduler"]),
                                            conditioner=conditioner,
                                            image_processor=_build(config["image_processor"]),
                                            device=device, dtype=dtype, **kwargs)

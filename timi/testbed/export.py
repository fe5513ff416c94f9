"""Export the trained testbed model as an hy3dgen model directory (config.yaml + fp16 safetensors).

The directory is what hy3dgen's loaders read: ``config.yaml`` (targets ``Hunyuan3DDiT``,
``ShapeVAE``, ``SingleImageEncoder`` with a small DINOv2 config, ``FlowMatchEulerDiscreteScheduler``
and ``ImageProcessorV2``) and ``model.fp16.safetensors`` with the ``model.``, ``vae.`` and
``conditioner.`` key groups. The default model ships as
``timi/assets/testbed_model/hunyuan3d-dit-v2-0``; load it with
``Hunyuan3DDiTFlowMatchingPipeline.from_pretrained(str(parent), subfolder="hunyuan3d-dit-v2-0")``
or ``from_single_file(dir / "model.fp16.safetensors", dir / "config.yaml", use_safetensors=True)``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from .model import TestbedSizes, hy3dgen_config

SUBFOLDER = "hunyuan3d-dit-v2-0"
ENCODER_FILE = "encoder.fp16.safetensors"


def testbed_extra(model_dir: str | Path) -> dict:
    """The ``timi_testbed`` block :func:`export_model_dir` writes into ``config.yaml`` (sizes, training
    config, summary); empty for a directory that was not exported by the testbed."""
    return yaml.safe_load((Path(model_dir) / "config.yaml").read_text()).get("timi_testbed", {})


def export_model_dir(groups: dict[str, dict[str, torch.Tensor]], sizes: TestbedSizes, out_dir: str | Path,
                     extra: dict | None = None) -> Path:
    """Write ``config.yaml`` and ``model.fp16.safetensors`` into ``out_dir`` (created)."""
    import safetensors.torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for group in ("model", "vae", "conditioner"):
        for key, value in groups[group].items():
            tensors[f"{group}.{key}"] = value.detach().cpu().to(torch.float16).contiguous().clone()
    safetensors.torch.save_file(tensors, str(out / "model.fp16.safetensors"), metadata={"format": "pt"})
    if "encoder" in groups:  # our point encoder (hy3dgen has none): lets a later run resume training
        enc = {k: v.detach().cpu().to(torch.float16).contiguous().clone() for k, v in groups["encoder"].items()}
        safetensors.torch.save_file(enc, str(out / ENCODER_FILE), metadata={"format": "pt"})
    config = hy3dgen_config(sizes)
    config["timi_testbed"] = {"sizes": asdict(sizes), **(extra or {})}  # hy3dgen ignores this key
    with open(out / "config.yaml", "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return out


def load_pipeline(model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """hy3dgen's ``Hunyuan3DDiTFlowMatchingPipeline`` for an exported directory (its own loader)."""
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline

    d = Path(model_dir)
    if not (d / "config.yaml").exists():
        raise FileNotFoundError(f"{d} has no config.yaml; pass a directory written by `timi testbed export`")
    return Hunyuan3DDiTFlowMatchingPipeline.from_single_file(
        str(d / "model.fp16.safetensors"), str(d / "config.yaml"), device=device, dtype=dtype, use_safetensors=True)


def load_groups(model_dir: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The key groups of an exported directory (``model``, ``vae``, ``conditioner``, ``encoder`` if shipped)."""
    import safetensors.torch

    d = Path(model_dir)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in safetensors.torch.load_file(str(d / "model.fp16.safetensors")).items():
        group, rest = key.split(".", 1)
        groups.setdefault(group, {})[rest] = value.float()
    if (d / ENCODER_FILE).exists():
        groups["encoder"] = {k: v.float() for k, v in safetensors.torch.load_file(str(d / ENCODER_FILE)).items()}
    return groups

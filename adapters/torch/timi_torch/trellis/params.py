"""TRELLIS checkpoints in upstream's layout: reading, writing, and the stage-1 part of a pipeline folder.

Upstream (``trellis/models/__init__.py: from_pretrained``) keeps a model as two files beside each
other, ``<stem>.json`` (``{"name": <class>, "args": {<constructor keywords>}}``) and
``<stem>.safetensors`` (the state dict, loaded strictly); a pipeline folder (``TRELLIS-image-large``)
has ``pipeline.json`` whose ``args.models`` maps roles (``sparse_structure_flow_model``,
``sparse_structure_decoder``, ...) to stems under the folder (``ckpts/ss_flow_img_dit_L_16l8_fp16``)
and whose ``args.sparse_structure_sampler`` holds the sampler's ``args`` (``sigma_min``) and
``params`` (steps, cfg_strength, cfg_interval, rescale_t). Only the stage-1 entries are read here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .modeling import DepthToSpaceDecoder, SparseStructureDecoder, SparseStructureFlowModel
from .sampler import SamplerSettings

__all__ = ["CLASSES", "load_model", "save_model", "load_stage1", "write_pipeline_json", "FLOW_ROLE", "DECODER_ROLE"]

CLASSES = {"SparseStructureFlowModel": SparseStructureFlowModel, "SparseStructureDecoder": SparseStructureDecoder,
           "DepthToSpaceDecoder": DepthToSpaceDecoder}
FLOW_ROLE, DECODER_ROLE = "sparse_structure_flow_model", "sparse_structure_decoder"


def _stem(path) -> Path:
    p = Path(os.path.expanduser(os.fspath(path)))
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


def load_model(path, device="cpu"):
    """A stage-1 module from ``<stem>.json`` + ``<stem>.safetensors`` (``path``: the stem or either
    file), loaded strictly as upstream does. Raises ``FileNotFoundError`` naming a missing file and
    ``ValueError`` for a class this package does not implement or weights that do not fit."""
    from safetensors.torch import load_file

    stem = _stem(path)
    config_file, weights_file = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    needs_weights = config.get("name") != "DepthToSpaceDecoder"           # parameter-free: no weights file
    missing = [str(f) for f in (config_file, weights_file) if not f.is_file() and (needs_weights or f == config_file)]
    if missing:
        raise FileNotFoundError(f"TRELLIS model {stem} lacks {missing}; upstream keeps <name>.json and "
                                "<name>.safetensors side by side (e.g. ckpts/ss_flow_img_dit_L_16l8_fp16.*).")
    name = config.get("name")
    if name not in CLASSES:
        raise ValueError(f"{config_file} names {name!r}; TIMI implements TRELLIS's stage 1 only: {sorted(CLASSES)}.")
    model = CLASSES[name](**config["args"])
    if not needs_weights:
        return model.to(device).eval()
    try:
        model.load_state_dict(load_file(str(weights_file)), strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]
        raise ValueError(f"{weights_file} does not fit {name}({config['args']}): {first}") from e
    return model.to(device).eval().requires_grad_(False)


def save_model(model, path) -> Path:
    """Write ``model`` as upstream's ``<stem>.json`` + ``<stem>.safetensors``; returns the stem."""
    from safetensors.torch import save_file

    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    name = next(k for k, cls in CLASSES.items() if isinstance(model, cls))
    stem.with_name(stem.name + ".json").write_text(json.dumps({"name": name, "args": model.config.kwargs()}, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if state:
        save_file(state, str(stem.with_name(stem.name + ".safetensors")))
    return stem


def write_pipeline_json(folder, flow_stem: str, decoder_stem: str, settings: SamplerSettings = SamplerSettings(),
                        extra: dict | None = None) -> Path:
    """A ``pipeline.json`` with upstream's stage-1 entries (stems relative to ``folder``)."""
    args = {"models": {FLOW_ROLE: flow_stem, DECODER_ROLE: decoder_stem},
            "sparse_structure_sampler": {"name": "FlowEulerGuidanceIntervalSampler",
                                         "args": {"sigma_min": settings.sigma_min},
                                         "params": {"steps": settings.steps, "cfg_strength": settings.cfg_strength,
                                                    "cfg_interval": list(settings.cfg_interval),
                                                    "rescale_t": settings.rescale_t}},
            **(extra or {})}
    path = Path(folder) / "pipeline.json"
    path.write_text(json.dumps({"name": "TrellisImageTo3DPipeline", "args": args}, indent=2))
    return path


def load_stage1(folder, device="cpu"):
    """``(flow_model, decoder, SamplerSettings)`` from a TRELLIS pipeline folder (``pipeline.json`` and
    the two stage-1 checkpoints it names; the other roles are ignored)."""
    folder = Path(os.path.expanduser(os.fspath(folder)))
    spec = folder / "pipeline.json"
    if not spec.is_file():
        raise FileNotFoundError(f"{folder} holds no pipeline.json; pass a TRELLIS pipeline folder "
                                "(e.g. a download of microsoft/TRELLIS-image-large).")
    args = json.loads(spec.read_text())["args"]
    models = args.get("models", {})
    for role in (FLOW_ROLE, DECODER_ROLE):
        if role not in models:
            raise ValueError(f"{spec} names no {role!r} model.")
    sampler = args.get("sparse_structure_sampler", {})
    params = sampler.get("params", {})
    defaults = SamplerSettings()
    settings = SamplerSettings(steps=int(params.get("steps", defaults.steps)),
                               cfg_strength=float(params.get("cfg_strength", defaults.cfg_strength)),
                               cfg_interval=tuple(params.get("cfg_interval", defaults.cfg_interval)),
                               rescale_t=float(params.get("rescale_t", defaults.rescale_t)),
                               sigma_min=float(sampler.get("args", {}).get("sigma_min", defaults.sigma_min)))
    flow = load_model(folder / models[FLOW_ROLE], device)
    decoder = load_model(folder / models[DECODER_ROLE], device)
    return flow, decoder, settings


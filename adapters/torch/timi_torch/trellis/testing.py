"""Tiny TRELLIS folders for tests: upstream's layout and key names, written by our code, random weights.

:func:`write_tiny_trellis_dir` writes ``pipeline.json``, ``ckpts/ss_flow.{json,safetensors}``,
``ckpts/ss_dec.{json,safetensors}`` (upstream's ``SparseStructureDecoder``, or the grid testbed's
parameter-free ``DepthToSpaceDecoder``) and the hy3dgen conditioner ``TrellisPipeline`` needs
(``conditioner.json`` + ``.safetensors``, a tiny DINOv2 from ``timi_torch.testing.tiny_config``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..testing import tiny_config
from .modeling import DepthToSpaceDecoder, SparseStructureDecoder, SparseStructureFlowModel
from .params import save_model, write_pipeline_json
from .pipeline import CONDITIONER_FILE, CONDITIONER_WEIGHTS
from .sampler import SamplerSettings

__all__ = ["write_tiny_trellis_dir"]


def write_tiny_trellis_dir(path, *, seed: int = 0, decoder: str = "conv", image_size: int = 112, cond_width: int = 24,
                           num_blocks: int = 4, steps: int = 4, box: float = 0.5) -> Path:
    """A tiny TRELLIS folder at ``path`` (created): an 8^3 x 8-channel flow (patch 2), a decoder to 16^3
    (``decoder="conv"``: upstream's class; ``"depth_to_space"``: the grid testbed's), a tiny conditioner
    at ``image_size`` px. Weights are random with every parameter perturbed (no zero layers), so a
    sample has structure; the decoder's output bias is centred so about half the voxels are occupied."""
    from hy3dgen.shapegen.pipelines import instantiate_from_config
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = tiny_config(cond_width=cond_width, image_size=image_size)
    flow = SparseStructureFlowModel(resolution=8, in_channels=8, out_channels=8, model_channels=32,
                                    cond_channels=cond_width, num_blocks=num_blocks, num_heads=2, mlp_ratio=2,
                                    patch_size=2, qk_rms_norm=True)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            p.add_(0.05 * torch.randn_like(p)) if not name.endswith("gamma") else None
    save_model(flow, out / "ckpts" / "ss_flow")
    if decoder == "conv":
        dec = SparseStructureDecoder(out_channels=1, latent_channels=8, num_res_blocks=1, num_res_blocks_middle=1,
                                     channels=[8, 8])
        with torch.no_grad():
            dec.out_layer[-1].bias -= dec(torch.randn(1, 8, 8, 8, 8)).median()
    elif decoder == "depth_to_space":
        dec = DepthToSpaceDecoder(factor=2, latent_channels=8)
    else:
        raise ValueError(f"decoder={decoder!r}: use 'conv' or 'depth_to_space'.")
    save_model(dec, out / "ckpts" / "ss_dec")
    write_pipeline_json(out, "ckpts/ss_flow", "ckpts/ss_dec", SamplerSettings(steps=steps), extra={"box": box})
    conditioner = instantiate_from_config(json.loads(json.dumps(cfg["conditioner"])))
    save_file({k: v.contiguous() for k, v in conditioner.state_dict().items()}, str(out / CONDITIONER_WEIGHTS))
    (out / CONDITIONER_FILE).write_text(json.dumps({"conditioner": cfg["conditioner"],
                                                    "image_processor": cfg["image_processor"]}, indent=1))
    return out

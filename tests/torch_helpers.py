"""Shared helpers for the timi_torch tests: a tiny hy3dgen model on disk and a two-object scene.

Import the fixtures into a test module with ``from torch_helpers import tiny_dir, tiny_pipe``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

MODEL_ID = "tencent/Hunyuan3D-2"
SUBFOLDER = "hunyuan3d-dit-v2-0"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """``$HY3DGEN_MODELS``-style root holding ``tencent/Hunyuan3D-2/hunyuan3d-dit-v2-0``."""
    from timi_torch import write_tiny_model_dir

    root = tmp_path_factory.mktemp("hy3dgen_models")
    write_tiny_model_dir(root / MODEL_ID / SUBFOLDER, seed=0)
    return root


@pytest.fixture(scope="session")
def fast_root(tmp_path_factory):
    """Like ``tiny_root`` but a 112 px conditioner (8x8 patches + CLS = 65 condition tokens): fast."""
    from timi_torch import write_tiny_model_dir

    root = tmp_path_factory.mktemp("hy3dgen_fast")
    write_tiny_model_dir(root / MODEL_ID / SUBFOLDER, seed=0, image_size=112)
    return root


@pytest.fixture(scope="session")
def fast_dir(fast_root):
    return fast_root / MODEL_ID / SUBFOLDER


@pytest.fixture(scope="session")
def tiny_dir(tiny_root):
    return tiny_root / MODEL_ID / SUBFOLDER


def load_base(model_dir, dtype=torch.float32):
    """hy3dgen's own pipeline, loaded by hy3dgen's own single-file loader (fp16 file, hy3dgen's default)."""
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline

    return Hunyuan3DDiTFlowMatchingPipeline.from_single_file(
        str(model_dir / "model.fp16.safetensors"), str(model_dir / "config.yaml"),
        device="cpu", dtype=dtype, use_safetensors=True)


@pytest.fixture(scope="session")
def tiny_base(tiny_dir):
    return load_base(tiny_dir)


@pytest.fixture(scope="session")
def fast_base(fast_dir):
    return load_base(fast_dir)


def scene(alpha: bool = True, size=(200, 300)):
    """A red and a blue rectangle (disjoint) on a transparent (or white) background, and their masks."""
    H, W = size
    img = np.zeros((H, W, 4), np.uint8)
    if not alpha:
        img[...] = 255
    img[50:150, 60:120] = [230, 20, 20, 255]
    img[80:170, 150:260] = [20, 20, 230, 255]
    masks = np.zeros((2, H, W), bool)
    masks[0, 50:150, 60:120] = True
    masks[1, 80:170, 150:260] = True
    return (img if alpha else img[..., :3]), masks


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny hy3dgen model directory with a 112 px conditioner, for the command-line tests."""
    from timi_torch import write_tiny_model_dir

    return write_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny", image_size=112)

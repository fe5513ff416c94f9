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


#: hy3dgen's model id of each family (``$HY3DGEN_MODELS/<id>/<subfolder>``).
FAMILY_IDS = {"v2-0": "tencent/Hunyuan3D-2", "v2-mini": "tencent/Hunyuan3D-2mini", "v2-mv": "tencent/Hunyuan3D-2mv"}


def family_id(variant: str) -> str:
    return next(mid for fam, mid in FAMILY_IDS.items() if variant.startswith(f"hunyuan3d-dit-{fam}"))


@pytest.fixture(scope="session")
def variant_root(tmp_path_factory):
    """``$HY3DGEN_MODELS``-style root; ``variant_dir(name)`` writes (once) the tiny model folder of a
    published variant (hy3dgen's subfolder name, 112 px conditioner) at ``<root>/<id>/<name>``."""
    return tmp_path_factory.mktemp("hy3dgen_family")


@pytest.fixture(scope="session")
def variant_dir(variant_root):
    from timi_torch import write_tiny_model_dir

    def make(variant: str):
        d = variant_root / family_id(variant) / variant
        if not (d / "config.yaml").is_file():
            write_tiny_model_dir(d, variant=variant, seed=0, image_size=112)
        return d

    return make


@pytest.fixture(scope="session")
def variant_base(variant_dir):
    """``variant_base(name)``: hy3dgen's own pipeline of that tiny variant (float32, cached)."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            cache[variant] = load_base(variant_dir(variant))
        return cache[variant]

    return get


def views_scene(views=("front", "left"), size=(200, 300)):
    """A two-object scene seen from several views (the objects move between views; in 'left' the
    blue one is hidden): ``({view: RGBA image}, {view: (2, H, W) masks})``."""
    img, masks = scene(alpha=True, size=size)
    images, mask_sets = {}, {}
    for i, view in enumerate(views):
        shift = 20 * i
        im, m = np.roll(img, shift, axis=1), np.roll(masks, shift, axis=2)
        if view == "left":
            im = im.copy()
            im[m[1]] = 0
            m = m.copy()
            m[1] = False
        images[view], mask_sets[view] = im, m
    return images, mask_sets

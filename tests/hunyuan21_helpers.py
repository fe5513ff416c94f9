"""Shared helpers for the Hunyuan3D 2.1 tests (torch and JAX backends): upstream's stored numbers,
hy3dgen's pipeline around our DiT with the fixture's weights, and a tiny 2.1-format folder.

Import the fixtures into a test module with ``from hunyuan21_helpers import upstream, tiny21, base21``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from timi_torch.hunyuan21 import HunYuanDiTPlain
from timi_torch.hunyuan21.testing import load_tiny, seeded_state_dict, write_tiny_model_dir
from timi_torch.masks import ConditionMasks

FIXTURE = Path(__file__).parent / "fixtures" / "hunyuan21_upstream.npz"


@pytest.fixture(scope="session")
def upstream():
    """``tests/fixtures/hunyuan21_upstream.npz`` as a dict (made by ``tools/hunyuan21_fixture.py``)."""
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def tiny21(tmp_path_factory):
    """A tiny 2.1 model folder in upstream's layout (``hunyuan21.testing.write_tiny_model_dir``)."""
    return write_tiny_model_dir(tmp_path_factory.mktemp("hy21") / "hunyuan3d-dit-v2-1", seed=0)


@pytest.fixture(scope="session")
def base21(tiny21):
    """hy3dgen's pipeline holding the tiny folder's 2.1 DiT (float32)."""
    return load_tiny(tiny21)


class FixtureConditioner(torch.nn.Module):
    """The stored condition tokens (zeros for the unconditional branch, as the DINO encoder's)."""

    def __init__(self, cond):
        super().__init__()
        self.cond = cond

    def forward(self, image=None, **_):
        return {"main": self.cond.expand(image.shape[0], -1, -1)}

    def unconditional_embedding(self, batch_size, **_):
        return {"main": torch.zeros_like(self.cond).expand(batch_size, -1, -1)}


def fixture_base(upstream):
    """hy3dgen's pipeline around our DiT with the fixture's weights (conditioner / VAE stand-ins)."""
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline
    from hy3dgen.shapegen.schedulers import FlowMatchEulerDiscreteScheduler

    cfg = json.loads(str(upstream["a/config"]))
    shapes = dict((k, tuple(v)) for k, v in json.loads(str(upstream["a/shapes"])))
    model = HunYuanDiTPlain(**cfg).eval()
    model.load_state_dict(seeded_state_dict(shapes, int(upstream["a/seed"])), strict=True)
    vae = torch.nn.Module()
    vae.latent_shape = (cfg["input_size"], cfg["in_channels"])
    return Hunyuan3DDiTFlowMatchingPipeline(
        vae=vae, model=model, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000),
        conditioner=FixtureConditioner(torch.from_numpy(upstream["trajectory/cond"])),
        image_processor=lambda image: {"image": torch.zeros(1, 3, 8, 8)}, device="cpu", dtype=torch.float32)


def condition_masks(M: int, K: int = 2, seed: int = 0) -> ConditionMasks:
    """Random condition-token masks of K instances over M tokens (the CLS token in none)."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.randint(0, K + 1, (M,), generator=g)
    owner[0] = 0                                                    # the CLS token
    tokens = torch.stack([(owner == k + 1).float() for k in range(K)])
    return ConditionMasks(tokens, np.zeros((K, 8, 8), bool), np.zeros((8, 8, 3), np.uint8), None, (3, 3), 1)

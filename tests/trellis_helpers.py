"""Shared helpers for the TRELLIS tests (torch and JAX): upstream's stored numbers and our flow model
loaded with the fixture's weights.

Import into a test module with ``from trellis_helpers import upstream, fixture_shapes, upstream_flow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from timi_torch.hunyuan21.testing import seeded_state_dict
from timi_torch.trellis import SparseStructureFlowModel

FIXTURE = Path(__file__).parent / "fixtures" / "trellis_upstream.npz"


@pytest.fixture(scope="session")
def upstream():
    """``tests/fixtures/trellis_upstream.npz`` as a dict (made by ``tools/trellis_fixture.py``)."""
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def fixture_shapes(upstream, name: str) -> dict:
    """Upstream's state-dict keys and shapes of configuration ``name`` (in upstream's order)."""
    return {k: tuple(v) for k, v in json.loads(str(upstream[f"{name}/shapes"]))}


def fixture_state(upstream, name: str) -> dict:
    """The fixture's weights of configuration ``name`` (made from its stored seed)."""
    return seeded_state_dict(fixture_shapes(upstream, name), int(upstream[f"{name}/seed"]))


def upstream_flow(upstream, name: str) -> SparseStructureFlowModel:
    """Our flow model of configuration ``name`` with the fixture's weights, loaded strictly, eval mode."""
    model = SparseStructureFlowModel(**json.loads(str(upstream[f"{name}/config"]))).eval()
    model.load_state_dict(fixture_state(upstream, name), strict=True)
    return model

"""Shared fixtures: the array-API backends every core test runs on, and hypothesis profiles."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("MPLBACKEND", "Agg")

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile("stress", max_examples=2000, deadline=None)  # hunting rare float32 failures
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = ["numpy", "array_api_strict", "torch", "jax"]


class Backend:
    """One array-API backend: its namespace, how to make arrays, and its float tolerance."""

    def __init__(self, name: str):
        self.name = name
        if name == "numpy":
            import array_api_compat.numpy as xp

            self.xp, self.rtol, self.atol = xp, 1e-10, 1e-12
        elif name == "array_api_strict":
            import array_api_strict as xp

            self.xp, self.rtol, self.atol = xp, 1e-10, 1e-12
        elif name == "torch":
            import array_api_compat.torch as xp

            self.xp, self.rtol, self.atol = xp, 1e-10, 1e-12
        elif name == "jax":
            import jax.numpy as xp  # jax arrays are float32 unless x64 is enabled

            self.xp, self.rtol, self.atol = xp, 2e-5, 2e-6
        else:  # pragma: no cover
            raise ValueError(name)

    def asarray(self, a):
        a = np.asarray(a)
        if self.name == "torch":
            import torch

            return torch.asarray(a)
        return self.xp.asarray(a)

    def to_numpy(self, a) -> np.ndarray:
        if self.name == "torch":
            return a.detach().cpu().numpy()
        if self.name == "array_api_strict":
            return np.asarray(a.__array__()) if hasattr(a, "__array__") else np.array(a.tolist())
        return np.asarray(a)

    def assert_close(self, actual, expected, rtol=None, atol=None):
        np.testing.assert_allclose(
            self.to_numpy(actual), np.asarray(expected),
            rtol=self.rtol if rtol is None else rtol, atol=self.atol if atol is None else atol,
        )

    def __repr__(self) -> str:
        return self.name


@pytest.fixture(params=BACKENDS, scope="session")
def backend(request) -> Backend:
    return Backend(request.param)


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance (2 CPUs) for a test module, whose workers can import this folder's helpers
    (``ray_helpers``); tests/test_eval_ray.py, tests/test_generate_batch.py."""
    ray = pytest.importorskip("ray")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent), old]))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old

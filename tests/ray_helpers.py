"""Generators for the Ray engine's tests (tests/test_eval_ray.py, tests/test_generate_batch.py),
importable by Ray's worker processes (the ``ray_instance`` fixture puts this folder on their ``PYTHONPATH``).

:class:`MarkedGenerator` makes one box per instance from the masks (so the scores are real and
deterministic), logs every call to ``MARKS/calls.txt``, and can hang on one unit, on its first try,
until the test kills its worker. :class:`DyingGenerate` is ``timi.generate.generate`` whose worker
dies in the middle of writing one scene's output, on its first try.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import trimesh


def unit_name(scene_id: str, config, seed: int) -> str:
    return f"{scene_id}|{'TIMI' if config.enabled else 'base'}|{seed}"


class MarkedGenerator:
    identity = {"generator": "tests.ray_helpers.MarkedGenerator"}

    def __init__(self, marks: Path, *, delay: float = 0.0, hang: str | None = None):
        self.marks, self.delay, self.hang = Path(marks), float(delay), hang

    def __call__(self, image, masks, config, seed, scene_id):
        unit = unit_name(scene_id, config, seed)
        with open(self.marks / "calls.txt", "a") as f:
            f.write(unit + "\n")
        hung = self.marks / "hung"
        if unit == self.hang and not hung.exists():  # first try: wait here until the test kills this worker
            import ray

            hung.write_text(ray.get_runtime_context().get_actor_id())
            time.sleep(120)
            raise RuntimeError("the test did not kill the worker")
        time.sleep(self.delay)
        shift = 0.05 * seed + (0.1 if config.enabled else 0.3)
        boxes = []
        for k, mask in enumerate(masks):
            ys, xs = np.nonzero(mask)
            centre = (xs.mean() / mask.shape[1] - 0.5 + shift, 0.5 - ys.mean() / mask.shape[0], 0.1 * k)
            boxes.append(trimesh.creation.box((0.3, 0.3, 0.3)).apply_translation(centre))
        return trimesh.util.concatenate(boxes), None, 1.0


class DyingGenerate:
    """``timi.generate.generate`` (a batch's scene), logging each call's output name to ``MARKS/calls.txt``;
    on the first try of the scene written to ``die_on``, its worker process dies after leaving a
    half-written temporary file of that output, as a worker killed mid-write does."""

    def __init__(self, marks: Path, die_on: str):
        self.marks, self.die_on = Path(marks), die_on

    def __call__(self, opts, **kwargs):
        from timi.generate import generate

        out = Path(opts.out)
        with open(self.marks / "calls.txt", "a") as f:
            f.write(out.name + "\n")
        died = self.marks / "died"
        if out.name == self.die_on and not died.exists():
            died.write_text(str(os.getpid()))
            out.parent.mkdir(parents=True, exist_ok=True)
            (out.parent / f".{out.name}.half{out.suffix}.tmp").write_bytes(b"glTF half")
            os._exit(1)
        return generate(opts, **kwargs)

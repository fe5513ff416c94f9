"""The settings a TIMI run takes when none is given, in one place.

``timi_torch.TIMIPipeline`` (its ``from_pretrained`` and ``__call__``), ``timi_jax.TIMIPipelineJAX``
and ``timi generate`` (its options and :class:`timi.generate.GenerateOptions`) all read their
defaults here, so the library runs as fast as the command line (issue 38). No framework is
imported here (``timi generate --help`` reads it).
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["NUM_INFERENCE_STEPS", "GUIDANCE_SCALE", "OCTREE_RESOLUTION", "DECODING", "SMALL_MODEL_BYTES",
           "usable_cores", "default_threads"]

#: Denoising steps (hy3dgen's and the paper's 50).
NUM_INFERENCE_STEPS = 50
#: Classifier-free guidance scale (hy3dgen's).
GUIDANCE_SCALE = 5.0
#: Marching-cubes grid resolution (hy3dgen's).
OCTREE_RESOLUTION = 384
#: Volume decoding (``timi_torch.decoding``): coarse-to-fine near the surface, the dense mesh in a
#: fraction of the time (docs/benchmarks.md); ``"dense"`` is hy3dgen's own.
DECODING = "coarse-to-fine"
#: Torch intra-op threads: one for checkpoints below this size (docs/benchmarks.md: the demo on the
#: shipped 3.6 MB model took 13.7 s on 1 thread, 120.9 s on 2, with another process busy), all
#: usable cores for larger ones.
SMALL_MODEL_BYTES = 200 * 2**20


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads(checkpoint_bytes: Optional[int]) -> int:
    """The default number of torch threads for a checkpoint of this size (``None``: unknown): 1 below
    :data:`SMALL_MODEL_BYTES`, else :func:`usable_cores`."""
    if checkpoint_bytes is not None and checkpoint_bytes < SMALL_MODEL_BYTES:
        return 1
    return usable_cores()

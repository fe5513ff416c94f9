"""What a call needs in memory, estimated and checked before anything is allocated (issue 38).

The mesh stage holds the ShapeVAE's occupancy logits on an ``(R+1)^3`` grid (``octree_resolution``
R) with its working copies, whichever decoding (:mod:`timi_torch.decoding`); at R = 10000 that is
tens of terabytes, which a run would otherwise try to allocate until the machine stalls. The
denoising loop holds its schedule and one diagnostics record per step. :func:`check_memory` refuses
a call whose estimate exceeds the memory available now, with one line naming the argument, the
estimate and the largest value that fits; ``TIMIPipeline.__call__`` and ``timi generate`` / ``timi
eval`` (before any model loads) call it.
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["BYTES_PER_GRID_POINT", "BYTES_PER_STEP", "MemoryEstimateError", "available_bytes", "call_bytes",
           "check_memory", "format_bytes"]

#: Peak memory per point of the (R+1)^3 grid while decoding and meshing it, in bytes: measured (peak
#: resident set, CPU) 36 coarse-to-fine and 24 dense on the shipped model's demo latent at octree 256,
#: up to ~120 for a field with a surface in every cell (a random-weight VAE's); the estimate is 64.
BYTES_PER_GRID_POINT = 64
#: Per denoising step (the schedule's entries, a guided step's diagnostics, the progress bar), generous.
BYTES_PER_STEP = 4096


class MemoryEstimateError(ValueError):
    """A call whose memory estimate exceeds the memory available; the message names the argument."""


def available_bytes(device=None) -> Optional[int]:
    """Memory a call may use now: the host's available memory (``MemAvailable``; the grid is meshed on
    the CPU), and on a CUDA ``device`` at most the GPU's free memory; ``None`` when unknown."""
    host = None
    try:
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        host = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            host = None
    if device is not None and str(device).startswith("cuda"):
        import torch

        try:
            free = int(torch.cuda.mem_get_info(torch.device(device))[0]) if torch.cuda.is_available() else None
        except (RuntimeError, ValueError):  # a device name checked elsewhere (--device)
            free = None
        if free is not None:
            host = free if host is None else min(host, free)
    return host


def call_bytes(octree_resolution: Optional[int], num_inference_steps: int) -> tuple[int, int]:
    """(mesh-stage bytes, denoising-loop bytes) a call at these settings is estimated to need
    (``octree_resolution=None``: no meshes)."""
    mesh = 0 if octree_resolution is None else (int(octree_resolution) + 1) ** 3 * BYTES_PER_GRID_POINT
    return mesh, int(num_inference_steps) * BYTES_PER_STEP


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def check_memory(octree_resolution: Optional[int], num_inference_steps: int, device=None, *,
                 names: tuple[str, str] = ("octree_resolution=", "num_inference_steps=")) -> None:
    """Raise :class:`MemoryEstimateError` when :func:`call_bytes` exceeds :func:`available_bytes`.

    ``names``: how the two arguments are written in the message (the library's ``octree_resolution=``,
    the command line's ``--octree-resolution ``); the argument named is the one that takes the most."""
    available = available_bytes(device)
    if available is None:
        return
    mesh, loop = call_bytes(octree_resolution, num_inference_steps)
    if mesh + loop <= available:
        return
    if mesh >= loop:
        room = max(available - loop, 0) // BYTES_PER_GRID_POINT
        most = int(round(room ** (1 / 3))) - 1
        while most > 0 and (most + 1) ** 3 > room:
            most -= 1
        raise MemoryEstimateError(
            f"{names[0]}{octree_resolution}: meshing its {octree_resolution + 1}^3-point grid needs about "
            f"{format_bytes(mesh)} of memory and {format_bytes(available)} is available here; use at most "
            f"{max(most, 0)} (hy3dgen's default is 384).")
    most = max(available - mesh, 0) // BYTES_PER_STEP
    raise MemoryEstimateError(
        f"{names[1]}{num_inference_steps}: the denoising loop's schedule and per-step records need about "
        f"{format_bytes(loop)} of memory and {format_bytes(available)} is available here; use at most {most} "
        "(50 is hy3dgen's default).")

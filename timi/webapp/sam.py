"""Segment-Anything on the page (``timi app --sam-checkpoint FILE``): click points or a box per
instance, get its mask, add it to the label map.

The ``segment-anything`` package (``pip install 'timi[sam]'``) builds the model from a local
checkpoint (:func:`load_sam`; never downloaded); :class:`SamClicker` keeps one
``SamPredictor`` for the whole app, computes a picture's embedding once (a lock keeps two sessions
from mixing pictures) and turns prompts into a mask (:meth:`SamClicker.mask`).
:func:`add_instance` puts a mask into a label map as a new instance.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

__all__ = ["SAM_TYPES", "SamError", "sam_model_type", "load_sam", "SamClicker", "add_instance", "picture_rgb"]

SAM_TYPES = ("vit_b", "vit_l", "vit_h")


class SamError(ValueError):
    """A SAM checkpoint or prompt that cannot be used; one line naming it and the fix."""


def sam_model_type(checkpoint: str | Path, model_type: str = "auto") -> str:
    """``--sam-model``, or with ``auto`` the type in the checkpoint's name (``sam_vit_b_01ec64.pth``)."""
    if model_type != "auto":
        if model_type not in SAM_TYPES:
            raise SamError(f"--sam-model {model_type!r}: choose one of auto, {', '.join(SAM_TYPES)}.")
        return model_type
    found = [t for t in SAM_TYPES if t in Path(checkpoint).name.lower()]
    if len(found) != 1:
        raise SamError(f"--sam-checkpoint {checkpoint}: its name does not say vit_b, vit_l or vit_h; "
                       "pass --sam-model vit_b|vit_l|vit_h.")
    return found[0]


def load_sam(checkpoint: str | Path, model_type: str = "auto", device: Optional[str] = None):
    """A ``segment_anything.SamPredictor`` for a local checkpoint; one-line :class:`SamError`s."""
    try:
        from segment_anything import SamPredictor, sam_model_registry
    except ImportError:
        raise SamError("--sam-checkpoint needs the segment-anything package: pip install 'timi[sam]'.") from None
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise SamError(f"--sam-checkpoint {checkpoint}: no such file; pass a local SAM checkpoint (.pth).")
    kind = sam_model_type(path, model_type)
    try:
        sam = sam_model_registry[kind](checkpoint=str(path))
    except Exception as e:  # torch.load / load_state_dict: a wrong file or the wrong --sam-model
        raise SamError(f"--sam-checkpoint {checkpoint}: cannot load it as SAM {kind} "
                       f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); check the file and --sam-model.") from None
    if device:
        sam.to(device)
    return SamPredictor(sam.eval())


def picture_rgb(image: str | Path | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 for SAM: the picture on white where it is transparent."""
    img = Image.open(image) if isinstance(image, (str, Path)) else Image.fromarray(np.asarray(image))
    rgba = np.asarray(img.convert("RGBA")).astype(np.float64)
    a = rgba[..., 3:4] / 255.0
    return (rgba[..., :3] * a + 255.0 * (1 - a)).round().astype(np.uint8)


class SamClicker:
    """Prompts -> masks with one ``SamPredictor`` shared by the app's sessions."""

    def __init__(self, predictor):
        self.predictor = predictor
        self._lock = threading.Lock()
        self._key: str | None = None

    def mask(self, image: str | Path | np.ndarray, points: Sequence[tuple[float, float, int]] = (),
             box: Sequence[float] | None = None) -> np.ndarray:
        """(H, W) bool: SAM's best-scoring mask for ``points`` ((x, y, 1 = object | 0 = background)
        in pixels) and/or ``box`` (x0, y0, x1, y1)."""
        if not len(points) and box is None:
            raise SamError("SAM needs a prompt: click a point on the object or two corners of a box.")
        rgb = picture_rgb(image)
        key = hashlib.sha1(rgb.tobytes() + str(rgb.shape).encode()).hexdigest()
        coords = np.asarray([(x, y) for x, y, _ in points], dtype=np.float32) if len(points) else None
        labels = np.asarray([int(v) for _, _, v in points], dtype=np.int64) if len(points) else None
        b = None if box is None else np.asarray(box, dtype=np.float32)
        with self._lock:
            if key != self._key:
                self.predictor.set_image(rgb)
                self._key = key
            masks, scores, _ = self.predictor.predict(point_coords=coords, point_labels=labels, box=b,
                                                      multimask_output=box is None)
        return np.asarray(masks[int(np.argmax(scores))], dtype=bool)


def add_instance(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``labels`` with ``mask`` as a new instance (last); it takes its pixels from any instance
    under it, as a brush painting over. An empty mask changes nothing."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != labels.shape:
        raise SamError(f"the mask is {mask.shape[1]}x{mask.shape[0]} but the picture {labels.shape[1]}x{labels.shape[0]}.")
    if not mask.any():
        return labels.copy()
    from .masks import relabel

    out = labels.astype(np.int32).copy()
    out[mask] = out.max() + 1
    return relabel(out)

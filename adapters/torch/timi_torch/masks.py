"""Instance masks -> condition-token masks ``M`` (K, M) of paper Eq.2, in the image's exact geometry.

hy3dgen prepares the condition image in two stages and the masks must follow both:

1. ``ImageProcessorV2``: crop to the alpha bounding box (hy3dgen's crop excludes the last row and
   column of the box), ``cv2.INTER_AREA`` resize so the longer side is ``int(max(H, W) * (1 -
   border_ratio))``, centre on a square ``max(H, W)`` canvas, then resize to ``size`` (512) px.
2. The conditioner's ``transforms.Resize(image_size)`` + ``CenterCrop(image_size)`` (518 px), whose
   DINOv2 patch grid (14 px patches, 37 x 37) gives the condition tokens after one CLS token.

:func:`condition_token_masks` replays that geometry on the masks (same boxes, same OpenCV and
torchvision calls, linear instead of cubic interpolation), assigns every conditioner pixel to at
most one instance (so the masks stay disjoint), and pools them onto the tokens with
``timi_core.pool_masks`` (CLS weight 0). The result is what Eq.2's ``M`` is for this image.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

import timi_core

__all__ = ["ConditionMasks", "MultiViewConditionMasks", "condition_token_masks", "multiview_token_masks",
           "load_rgba", "instance_masks", "named_instance_masks"]

DEFAULT_BORDER_RATIO = 0.15  # ImageProcessorV2.__call__'s default when its border_ratio is None


@dataclasses.dataclass(frozen=True)
class ConditionMasks:
    """Masks of one image in every frame the pipeline uses.

    Attributes
    ----------
    tokens : torch.Tensor (K, M) float32
        Area fraction of each condition token covered by each instance (Eq.2's ``M``); the CLS
        (prefix) tokens are 0.
    frame_masks : np.ndarray (K, S, S) bool
        The instances in the conditioner's input frame (S = 518 for Hunyuan3D 2.0), disjoint.
    frame_image : np.ndarray (S, S, 3) uint8
        hy3dgen's processed image in that same frame (what DINOv2 sees, before normalisation).
    image : PIL.Image.Image
        The RGBA image handed to hy3dgen (alpha = union of the masks when the input had none).
    grid : (gh, gw) patch grid; ``prefix_tokens``: leading tokens without a patch (CLS).
    """

    tokens: torch.Tensor
    frame_masks: np.ndarray
    frame_image: np.ndarray
    image: Image.Image
    grid: tuple[int, int]
    prefix_tokens: int

    @property
    def num_instances(self) -> int:
        return int(self.tokens.shape[0])


# ----------------------------------------------------------------------------- inputs

def _as_image(image) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        if not os.path.exists(image):
            raise FileNotFoundError(f"image file {os.fspath(image)!r} does not exist.")
        return Image.open(image)
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.min() >= 0 and arr.max() <= 1:
                arr = (arr * 255).round()
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)):
            return Image.fromarray(arr)
        raise ValueError(f"image array must have shape (H, W), (H, W, 3) or (H, W, 4); got {image.shape}.")
    raise TypeError(f"image must be a path, a PIL image or an array; got {type(image).__name__}.")


def _as_mask_array(m, index: int) -> np.ndarray:
    """One mask of a list: a path or PIL image (read like ``timi generate``'s mask PNGs) or an array."""
    from timi.masks_io import binary_from_image, masks_from_array, open_image

    if isinstance(m, (str, os.PathLike)):
        if not os.path.exists(m):
            raise FileNotFoundError(f"mask file {os.fspath(m)!r} (instance {index}) does not exist.")
        m = open_image(m)
    if isinstance(m, Image.Image):
        return binary_from_image(m)
    if isinstance(m, torch.Tensor):
        m = m.detach().cpu().numpy()
    m = np.asarray(m)
    if m.ndim == 3 and m.shape[2] in (1, 3, 4):
        m = m[..., -1] if m.shape[2] == 4 else m[..., 0]
    if m.ndim != 2:
        raise ValueError(f"mask {index} must be an (H, W) image; got shape {m.shape}.")
    return masks_from_array(m[None], f"mask {index}")[0][0]


def instance_masks(masks, max_labels: int | None = None) -> np.ndarray:
    return named_instance_masks(masks, max_labels)[0]


def named_instance_masks(masks, max_labels: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Normalise mask inputs to a (K, H, W) bool array, by the same rules as ``timi generate``
    (:mod:`timi.masks_io`: :func:`~timi.masks_io.masks_from_array` for arrays,
    :func:`~timi.masks_io.read_masks` for files).

    Accepted: a (K, H, W) bool/integer/float array or tensor (on above half range: > 0.5 for
    values in [0, 1], > half the largest value for 0/255; floats finite, in [0, 1] or [0, 255]),
    an (H, W) integer label map (label 0 is background; every other label is one instance, in
    increasing label order), a path to a label-map image, a (K, H, W) ``.npy`` or an RLE ``.json``,
    or a list of mask images (paths, PIL images or (H, W) arrays; 0/1 and 0/255 images alike).
    Raises ``ValueError`` (:class:`timi.masks_io.MaskInputError`) for anything else.
    :func:`named_instance_masks` also returns each instance's name (``label_3`` for label 3 of a
    label map, a file's stem, ``instance_k`` for slice k of an array): the instance's identity
    across the views of a multi-view input.
    """
    from timi.masks_io import masks_from_array, read_masks

    if isinstance(masks, (str, os.PathLike)):
        path = os.fspath(masks)
        if not os.path.exists(path):
            raise FileNotFoundError(f"mask file {path!r} does not exist.")
        found = read_masks(path, max_labels=max_labels)
        return found.masks, list(found.names)
    if isinstance(masks, (list, tuple)):
        if not masks:
            raise ValueError("masks: got an empty list; pass at least one instance mask.")
        arrs = [_as_mask_array(m, i) for i, m in enumerate(masks)]
        shapes = {a.shape for a in arrs}
        if len(shapes) > 1:
            raise ValueError(f"masks: the mask images have different sizes {sorted(shapes)}.")
        return np.stack(arrs), [f"instance_{k}" for k in range(len(arrs))]
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    return masks_from_array(masks, max_labels=max_labels)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def load_rgba(image, masks: np.ndarray) -> Image.Image:
    """The RGBA image for hy3dgen: the input's own alpha, or the union of the masks when it has none."""
    img = _as_image(image)
    has_alpha = _has_alpha(img)
    rgba = img.convert("RGBA")
    if (rgba.height, rgba.width) != masks.shape[1:]:
        raise ValueError(
            f"masks have size {masks.shape[1]}x{masks.shape[2]} (H x W) but the image is "
            f"{rgba.height}x{rgba.width}; masks must be in the image's own pixel frame."
        )
    if not has_alpha:
        arr = np.asarray(rgba).copy()
        arr[..., 3] = np.where(masks.any(axis=0), 255, 0).astype(np.uint8)
        rgba = Image.fromarray(arr, "RGBA")
    return rgba


# ----------------------------------------------------------------------------- geometry

@dataclasses.dataclass(frozen=True)
class RecenterLayout:
    """Where ``ImageProcessorV2.recenter`` puts the alpha bounding box on its square canvas."""

    size: int
    box: tuple[int, int, int, int]      # x_min, x_max, y_min, y_max (rows, cols; max excluded)
    target: tuple[int, int, int, int]   # x2_min, x2_max, y2_min, y2_max on the canvas


def recenter_layout(alpha: np.ndarray, border_ratio: float) -> RecenterLayout:
    """The box arithmetic of hy3dgen's ``ImageProcessorV2.recenter`` for an (H, W) alpha."""
    H, W = alpha.shape
    size = max(H, W)
    rows, cols = np.nonzero(alpha)
    if rows.size == 0:
        raise ValueError("the image's foreground (alpha, or the union of the masks) is empty.")
    x_min, x_max, y_min, y_max = rows.min(), rows.max(), cols.min(), cols.max()
    h, w = x_max - x_min, y_max - y_min
    if h == 0 or w == 0:
        raise ValueError("the image's foreground is a single row or column; hy3dgen cannot recentre it.")
    desired = int(size * (1 - border_ratio))
    scale = desired / max(h, w)
    h2, w2 = int(h * scale), int(w * scale)
    x2, y2 = (size - h2) // 2, (size - w2) // 2
    return RecenterLayout(int(size), (int(x_min), int(x_max), int(y_min), int(y_max)),
                          (x2, x2 + h2, y2, y2 + w2))


def _resize(arr: np.ndarray, size_wh: tuple[int, int], interpolation) -> np.ndarray:
    """``cv2.resize`` for any channel count (OpenCV's area resize takes at most 4 channels)."""
    if arr.ndim == 3 and arr.shape[2] > 4:
        return np.stack([cv2.resize(arr[..., c], size_wh, interpolation=interpolation)
                         for c in range(arr.shape[2])], axis=-1)
    return cv2.resize(arr, size_wh, interpolation=interpolation)


def recenter(arr: np.ndarray, layout: RecenterLayout, interpolation=cv2.INTER_AREA) -> np.ndarray:
    """Place ``arr`` (H, W[, C]) on the recentred square canvas exactly as hy3dgen places the image."""
    x_min, x_max, y_min, y_max = layout.box
    x2_min, x2_max, y2_min, y2_max = layout.target
    out = np.zeros((layout.size, layout.size) + arr.shape[2:], dtype=arr.dtype)
    resized = _resize(arr[x_min:x_max, y_min:y_max], (y2_max - y2_min, x2_max - x2_min), interpolation)
    out[x2_min:x2_max, y2_min:y2_max] = resized.reshape(out[x2_min:x2_max, y2_min:y2_max].shape)
    return out


def _encoder(pipeline):
    base = getattr(pipeline, "base", pipeline)
    cond = getattr(base, "conditioner", None)
    enc = getattr(cond, "main_image_encoder", None)
    if enc is None:
        raise TypeError("expected a hy3dgen pipeline (or TIMIPipeline) whose conditioner has a "
                        "`main_image_encoder` (SingleImageEncoder / DualImageEncoder).")
    return base, enc


def _resize_crop(encoder):
    """The conditioner's own geometric transforms (Resize, CenterCrop), without Normalize."""
    from torchvision import transforms
    geo = [t for t in encoder.transform.transforms if isinstance(t, (transforms.Resize, transforms.CenterCrop))]
    return transforms.Compose(geo)


def _token_grid(encoder) -> tuple[tuple[int, int], int, int]:
    cfg = encoder.model.config
    patch = int(cfg.patch_size)
    crop = encoder.transform.transforms[1].size
    side = int(crop[0] if isinstance(crop, (list, tuple)) else crop)
    grid = (side // patch, side // patch)
    prefix = 1 if encoder.use_cls_token else 0
    if prefix + grid[0] * grid[1] != encoder.num_patches:
        raise RuntimeError(f"conditioner token count {encoder.num_patches} does not match a "
                           f"{grid} patch grid with {prefix} CLS token.")
    return grid, prefix, patch


def _is_multiview(base) -> bool:
    """hy3dgen's multi-view image processor (``MVImageProcessorV2``, Hunyuan3D-2mv) takes ``{view: image}``."""
    return hasattr(base.image_processor, "view2idx")


def condition_token_masks(image, masks, pipeline, names: Sequence[str] | None = None):
    """Map instance masks in the image's pixel frame onto the condition tokens (Eq.2's ``M``).

    Parameters
    ----------
    image : path, PIL image or (H, W, 3|4) array, RGB or RGBA. Without alpha the union of the
        masks becomes the foreground (alpha), as hy3dgen expects a background-removed image.
        For a multi-view model (Hunyuan3D-2mv): a ``{view: image}`` dict, see
        :func:`multiview_token_masks`.
    masks : (K, H, W) bool/uint8 array, (H, W) integer label map (0 = background) or list of K mask
        images, all in the image's own (H, W) frame; instances must be disjoint. Multi-view: a
        ``{view: masks}`` dict.
    pipeline : a hy3dgen ``Hunyuan3DDiTFlowMatchingPipeline`` or a :class:`~timi_torch.TIMIPipeline`
        (its image processor and conditioner define the geometry).
    names : optional instance names for the messages (``label_3``, file names).

    Returns a :class:`ConditionMasks` (:class:`MultiViewConditionMasks` for a multi-view model);
    ``.tokens`` is the (K, M) float32 tensor for ``timi_core.instance_probability``. Raises
    ``ValueError`` for a size mismatch, empty or overlapping masks, an instance outside the
    picture's alpha (the checks of :func:`timi.masks_io.validate_masks`, shared with ``timi
    generate``), or an instance that covers no pixel at the conditioner's resolution; warns
    for a single instance (Eq.4 then only pulls attention onto the object, nothing to separate).
    """
    base, encoder = _encoder(pipeline)
    if _is_multiview(base) or isinstance(image, Mapping):
        return multiview_token_masks(image, masks, base, names=names)
    grid, _, _ = _token_grid(encoder)
    m = instance_masks(masks, max_labels=grid[0] * grid[1])
    if m.shape[0] == 1:
        warnings.warn("condition_token_masks: only one instance mask; TIMI's separation loss (Eq.4) "
                      "has nothing to separate and only pulls attention onto that object.", stacklevel=2)
    return _view_token_masks(image, m, base, encoder, names)


def _view_token_masks(image, m: np.ndarray, base, encoder, names, missing_ok: bool = False):
    """One image's :class:`ConditionMasks` from (K, H, W) masks. ``missing_ok`` (a view of a
    multi-view input): an empty mask, or one that covers no conditioner pixel, is an instance this
    view does not show: its token row is 0 (the caller checks that some view shows it)."""
    from timi.masks_io import instance_label, validate_masks

    grid, prefix, patch = _token_grid(encoder)
    img = _as_image(image)
    foreground = np.asarray(img.convert("RGBA"))[..., 3] > 0 if _has_alpha(img) else None
    m = validate_masks(m, image_size=(img.height, img.width), names=names, foreground=foreground,
                       max_instances=grid[0] * grid[1], allow_empty=missing_ok)
    rgba = load_rgba(img, m)
    K = m.shape[0]

    processor = base.image_processor
    border = processor.border_ratio if processor.border_ratio is not None else DEFAULT_BORDER_RATIO
    layout = recenter_layout(np.asarray(rgba)[..., 3], border)
    soft = recenter(np.ascontiguousarray(m.transpose(1, 2, 0), dtype=np.float32), layout)
    soft = soft.reshape(layout.size, layout.size, K)
    soft = _resize(soft, (processor.size, processor.size), cv2.INTER_LINEAR)
    soft = torch.from_numpy(soft.reshape(processor.size, processor.size, K)).permute(2, 0, 1)
    geo = _resize_crop(encoder)
    soft = geo(soft).clamp(0, 1)                                            # (K, S, S)

    background = (1 - soft.sum(0, keepdim=True)).clamp(min=0)
    owner = torch.cat([background, soft]).argmax(0)                         # 0 = background
    frame = torch.stack([owner == k + 1 for k in range(K)]).numpy()
    lost = [instance_label(k, names) for k in range(K) if not frame[k].any() and m[k].any()]
    if lost and not missing_ok:
        raise ValueError(f"{', '.join(lost)} cover(s) no pixel at the conditioner's {frame.shape[1]} px "
                         "resolution, too small to guide; enlarge the mask or crop the picture closer to the objects.")

    covered = frame[:, : grid[0] * patch, : grid[1] * patch]               # DINOv2 drops the rest
    shown = covered.reshape(K, -1).any(axis=1) if missing_ok else np.ones(K, dtype=bool)
    tokens = torch.zeros(K, prefix + grid[0] * grid[1], dtype=torch.float32)
    if shown.any():
        tokens[torch.from_numpy(shown)] = timi_core.pool_masks(torch.from_numpy(covered[shown]), grid,
                                                               prefix_tokens=prefix).to(torch.float32)

    with torch.no_grad():                                                   # what the processor makes of it
        img = processor.load_image(rgba, border_ratio=border)[0]           # (1, 3, 512, 512) in [-1, 1]
        img = geo(((img[0] + 1) / 2).float())
    frame_image = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return ConditionMasks(tokens, frame, frame_image, rgba, grid, prefix)


# ----------------------------------------------------------------------------- multi-view


@dataclasses.dataclass(frozen=True)
class MultiViewConditionMasks:
    """The masks of a multi-view input (Hunyuan3D-2mv): one :class:`ConditionMasks` per view.

    ``views``: ``{view: ConditionMasks}`` in hy3dgen's view order (``MVImageProcessorV2``: front,
    left, back, right), each with the same K instances (a view's row is 0 where it does not show
    the instance); ``tokens`` (K, V * N) float32: the views' token masks side by side, in the order
    of ``DinoImageEncoderMV``'s condition tokens (each view's N tokens, its CLS first with weight
    0); ``names``: the instances.
    """

    views: dict
    tokens: torch.Tensor
    names: tuple

    @property
    def num_instances(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def image(self) -> dict:
        """``{view: RGBA image}`` for hy3dgen's ``MVImageProcessorV2``."""
        return {view: cm.image for view, cm in self.views.items()}

    @property
    def grid(self) -> tuple[int, int]:
        return next(iter(self.views.values())).grid

    @property
    def prefix_tokens(self) -> int:
        return next(iter(self.views.values())).prefix_tokens


def _view_order(base, image, masks) -> list[str]:
    processor = base.image_processor
    if not _is_multiview(base):
        raise ValueError(f"a {{view: image}} dict needs a multi-view model (Hunyuan3D-2mv, MVImageProcessorV2); "
                         f"this model's image processor is {type(processor).__name__}: pass one image.")
    known = list(processor.view2idx)
    if not isinstance(image, Mapping) or not image:
        raise ValueError(f"this model is multi-view (Hunyuan3D-2mv): pass the image as a {{view: image}} dict with "
                         f"views among {', '.join(known)}; got {type(image).__name__}.")
    unknown = [v for v in image if v not in processor.view2idx]
    if unknown:
        raise ValueError(f"unknown view(s) {', '.join(map(repr, unknown))}: hy3dgen's views are {', '.join(known)}.")
    if not isinstance(masks, Mapping) or set(masks) != set(image):
        got = sorted(masks) if isinstance(masks, Mapping) else type(masks).__name__
        raise ValueError(f"masks must be a {{view: masks}} dict with the image's views {sorted(image)}; got {got}.")
    return sorted(image, key=processor.view2idx.__getitem__)


def _view_instances(source, max_labels: int) -> tuple[np.ndarray, list[str]]:
    """:func:`named_instance_masks` of one view, where a label-map file holding the single label 1
    (which ``timi.masks_io`` reads as one binary mask named after the file) is instance ``label_1``:
    in multi-view input a view may show only one of the labelled instances."""
    m, names = named_instance_masks(source, max_labels)
    if isinstance(source, (str, os.PathLike)) and len(names) == 1 and os.path.isfile(source):
        from timi.masks_io import open_image

        try:
            values = np.unique(np.asarray(open_image(source)))
        except ValueError:
            return m, names
        if values.tolist() == [0, 1]:
            names = ["label_1"]
    return m, names


def multiview_token_masks(images, masks, pipeline, names: Sequence[str] | None = None) -> MultiViewConditionMasks:
    """Instance masks of a multi-view input on the condition tokens of ``DinoImageEncoderMV``.

    ``images``: hy3dgen's ``{view: image}`` dict (views front, left, back, right);
    ``masks``: ``{view: masks}`` with the same views, each in its image's own pixel frame and in
    any form :func:`condition_token_masks` takes. Instances are matched across views by identity:
    slice ``k`` of a (K, H, W) array, label value of a label map (``label_3``), a mask file's
    name; an all-zero mask, or a missing label or file, means the view does not show that
    instance (a label-map file holding only label 1 is ``label_1``). Each view's masks follow exactly the processing of its image (the single-view
    geometry, view by view); the mask matrix is the views' token masks side by side in hy3dgen's
    view order, each view's CLS column 0. Raises ``ValueError`` for views that differ from the
    images', and for an instance that no view shows (at the conditioner's resolution).
    """
    base, encoder = _encoder(pipeline)
    order = _view_order(base, images, masks)
    grid, _, _ = _token_grid(encoder)
    per_view = {v: _view_instances(masks[v], grid[0] * grid[1]) for v in order}
    ids = list(dict.fromkeys(n for v in order for n in per_view[v][1]))     # first appearance, view order
    if names is not None and len(names) != len(ids):
        raise ValueError(f"names: {len(names)} given for the {len(ids)} instances of the views ({', '.join(ids)}).")
    shown = list(names) if names is not None else ids
    stacks = {}
    for v in order:
        m, view_ids = per_view[v]
        if len(set(view_ids)) != len(view_ids):
            raise ValueError(f"view {v!r}: instance names repeat ({', '.join(view_ids)}); each instance once per view.")
        stack = np.zeros((len(ids),) + m.shape[1:], dtype=bool)
        for j, n in enumerate(view_ids):
            stack[ids.index(n)] = m[j]
        stacks[v] = stack
    if len(ids) == 1:
        warnings.warn("condition_token_masks: only one instance mask; TIMI's separation loss (Eq.4) "
                      "has nothing to separate and only pulls attention onto that object.", stacklevel=2)
    views = {}
    for v in order:
        try:
            views[v] = _view_token_masks(images[v], stacks[v], base, encoder, shown, missing_ok=True)
        except ValueError as e:
            raise type(e)(f"view {v!r}: {e}") from None
    from timi.masks_io import instance_label

    tokens = torch.cat([views[v].tokens for v in order], dim=1)
    unseen = [instance_label(k, shown) for k in range(len(ids)) if not tokens[k].any()]
    if unseen:
        raise ValueError(f"{', '.join(unseen)} is shown by no view (empty, or too small for the conditioner's "
                         f"resolution, in every one of {', '.join(order)}); give it a mask in at least one view.")
    return MultiViewConditionMasks(views, tokens, tuple(shown))

"""Instance masks made on the page, as label maps (H, W) int32: 0 = background, k = instance k.

* :func:`propose_labels` - a first guess from the picture alone: the connected parts of its
  foreground (the alpha, or what differs from the border colour of a picture without alpha),
  each split further where differently coloured objects touch (SLIC superpixels merged by colour
  over their adjacency graph, scikit-image), specks folded into their neighbours;
* :func:`merge_labels`, :func:`split_label`, :func:`remove_labels` - the edits the page's clicks make;
* :func:`painted_labels` - Gradio ``ImageEditor`` layers -> labels (one instance per layer and
  brush colour);
* :func:`masks_from_labels`, :func:`write_masks_json` - the hand-over to ``timi generate``'s
  mask reader (an RLE JSON that keeps the instances' order and names);
* :func:`labels_overlay` - the masks tinted over the picture, selected instances outlined.

Colours: chromaticity (the colour with its brightness divided out) carries most weight, so the
shading across one object's faces does not split it, while lightness still separates a grey
object from a white one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

__all__ = ["foreground_of", "propose_labels", "relabel", "carry_names", "merge_labels", "split_label", "remove_labels",
           "label_at", "painted_labels", "masks_from_labels", "labels_from_masks", "rle_encode", "write_masks_json",
           "labels_overlay", "parse_colour", "PALETTE"]

#: Brush colours of the paint tab (tab10's first ten, as :func:`timi.instances.instance_colors`).
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _rgb(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return a[..., :3].astype(np.float64)


def foreground_of(image: np.ndarray, tolerance: float = 24.0) -> np.ndarray:
    """(H, W) bool: where the alpha is non-zero (what hy3dgen crops to); for a picture without a
    transparent pixel, where the colour differs from the median border colour by more than
    ``tolerance`` (0-255 units, Euclidean in RGB)."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 4 and a[..., 3].min() < 255:
        return a[..., 3] > 0
    rgb = _rgb(a)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return np.linalg.norm(rgb - np.median(border, axis=0), axis=-1) > tolerance


def _features(image: np.ndarray, lightness_weight: float) -> np.ndarray:
    """(H, W, 3): chromaticity r/(r+g+b), g/(r+g+b) scaled to 0-100, and lightness (0-100) weighted."""
    rgb = _rgb(image) + 1.0
    total = rgb.sum(-1, keepdims=True)
    chroma = rgb[..., :2] / total * 100.0
    light = (total - 3.0) / (3 * 255.0) * 100.0 * lightness_weight
    return np.concatenate([chroma, light], axis=-1)


def _colour_regions(feat: np.ndarray, part: np.ndarray, threshold: float, segments: int) -> np.ndarray:
    """Split one connected part into regions of similar colour: SLIC superpixels inside the part,
    neighbours merged while their mean colours differ by less than ``threshold``."""
    from skimage import graph, segmentation

    sp = segmentation.slic(feat, n_segments=segments, compactness=0.3, mask=part, start_label=1,
                           channel_axis=-1, convert2lab=False, enforce_connectivity=True)
    if sp.max() <= 1:
        return part.astype(np.int32)
    rag = graph.rag_mean_color(feat, sp, mode="distance")
    if 0 in rag:  # the background superpixel (outside the part) takes no part in the merging
        rag.remove_node(0)
    merged = graph.cut_threshold(sp, rag, threshold, in_place=False)
    merged = np.where(part, merged + 1, 0)
    return merged.astype(np.int32)


def _fold_specks(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Regions under ``min_area`` pixels take the label of the nearest larger region (specks of
    anti-aliased edges, highlights); the foreground stays covered."""
    from scipy import ndimage

    sizes = np.bincount(labels.ravel())
    small = (sizes < min_area) & (np.arange(len(sizes)) > 0)
    if not small[labels].any():
        return labels
    keep = (labels > 0) & ~small[labels]
    if not keep.any():
        return labels
    _, (r, c) = ndimage.distance_transform_edt(~keep, return_indices=True)
    out = labels.copy()
    holes = (labels > 0) & ~keep
    out[holes] = labels[r[holes], c[holes]]
    return out


def relabel(labels: np.ndarray, by: str = "value") -> np.ndarray:
    """Labels renumbered 1..K without gaps: in the order of their values (``by="value"``: edits keep
    the instances' order) or of each region's first pixel, row-major (``by="position"``)."""
    labels = np.asarray(labels)
    values, first = np.unique(labels.ravel(), return_index=True)
    order = [v for _, v in sorted(zip(first, values))] if by == "position" else list(values)
    lut = np.zeros(int(values.max()) + 1 if values.size else 1, dtype=np.int32)
    for i, v in enumerate(v for v in order if v != 0):
        lut[v] = i + 1
    return lut[labels].astype(np.int32)


def carry_names(old: np.ndarray, new: np.ndarray, names: Sequence[str], fresh: str = "instance") -> list[str]:
    """Names for ``new``'s instances after an edit of ``old``: each takes the name of the old instance
    most of its pixels had (split pieces share it; the scene's node names then get ``_2``...);
    an instance on old background is ``<fresh>_<k>``."""
    out = []
    for k in range(1, int(new.max()) + 1):
        under = old[new == k]
        under = under[under > 0]
        j = int(np.bincount(under).argmax()) if under.size else 0
        out.append(names[j - 1] if 0 < j <= len(names) else f"{fresh}_{k}")
    return out


def propose_labels(image: np.ndarray, *, colour_threshold: float = 8.0, lightness_weight: float = 0.25,
                   segments: int = 200, min_area_fraction: float = 0.003) -> np.ndarray:
    """A first set of instance masks from the picture alone (module docstring): (H, W) int32.

    ``colour_threshold``: adjacent superpixels whose mean colours (chromaticity in 0-100, plus
    ``lightness_weight`` x lightness) differ by less than this are one object;
    ``min_area_fraction``: regions smaller than this share of the picture are folded into a
    neighbour. An empty foreground gives no instance (all zeros).
    """
    from skimage import measure

    fg = foreground_of(image)
    H, W = fg.shape
    parts = measure.label(fg, connectivity=2)
    feat = _features(image, lightness_weight)
    out = np.zeros((H, W), np.int32)
    min_area = max(1, int(min_area_fraction * H * W))
    for p in range(1, int(parts.max()) + 1):
        part = parts == p
        if part.sum() < min_area:
            continue
        regions = _colour_regions(feat, part, colour_threshold, segments)
        regions = _fold_specks(measure.label(regions, connectivity=1, background=0), min_area)
        out[regions > 0] = regions[regions > 0] + out.max()
    return relabel(out, by="position")


def label_at(labels: np.ndarray, x: int, y: int) -> int:
    """The label under pixel column ``x``, row ``y`` (0 outside the picture)."""
    H, W = labels.shape
    return int(labels[y, x]) if 0 <= y < H and 0 <= x < W else 0


def merge_labels(labels: np.ndarray, ids: Iterable[int]) -> np.ndarray:
    """The instances ``ids`` become one (the smallest id keeps it); renumbered 1..K."""
    ids = sorted({int(i) for i in ids if i > 0})
    out = np.asarray(labels).copy()
    if len(ids) > 1:
        out[np.isin(out, ids)] = ids[0]
    return relabel(out)


def remove_labels(labels: np.ndarray, ids: Iterable[int]) -> np.ndarray:
    """The instances ``ids`` become background; renumbered 1..K."""
    out = np.asarray(labels).copy()
    out[np.isin(out, [int(i) for i in ids])] = 0
    return relabel(out)


def split_label(labels: np.ndarray, k: int, image: np.ndarray, *, lightness_weight: float = 0.25,
                seed: int = 0) -> np.ndarray:
    """Split instance ``k``: into its connected pieces when it has several, else into two by
    colour (2-means on the features of :func:`propose_labels`, each cluster's pieces kept apart).
    The pieces keep ``k``'s place; renumbered 1..K. Unchanged when ``k`` cannot be split."""
    from scipy.cluster.vq import kmeans2
    from skimage import measure

    labels = np.asarray(labels)
    region = labels == k
    if k <= 0 or region.sum() < 2:
        return labels.copy()
    pieces = measure.label(region, connectivity=2)
    if pieces.max() < 2:
        feat = _features(image, lightness_weight)[region]
        _, assign = kmeans2(feat, 2, seed=seed, minit="++")
        if len(np.unique(assign)) < 2:
            return labels.copy()
        two = np.zeros(labels.shape, np.int32)
        two[region] = assign + 1
        pieces = measure.label(two, connectivity=1, background=0)
    out = labels.astype(np.int32) * 1000
    out[region] = k * 1000 + pieces[region]
    return relabel(out)


def parse_colour(c) -> tuple[int, int, int]:
    """``#rrggbb``, ``rgb(r, g, b)`` or ``rgba(...)`` -> (r, g, b)."""
    s = str(c).strip().lower()
    if s.startswith("#") and len(s) == 7:
        return tuple(int(s[i:i + 2], 16) for i in (1, 3, 5))
    if s.startswith("rgb"):
        vals = [float(v) for v in s[s.index("(") + 1:s.index(")")].split(",")[:3]]
        return tuple(int(round(v)) for v in vals)
    raise ValueError(f"not a colour: {c!r}")


def painted_labels(layers: Sequence, size: tuple[int, int], palette: Sequence[str] = PALETTE,
                   min_pixels: int = 4, tolerance: float = 16.0) -> np.ndarray:
    """ImageEditor layers (RGBA arrays or PIL images; painted where alpha > 127) -> labels (H, W).

    Each layer is painted over the layers before it; within a layer, a pixel within ``tolerance``
    (RGB distance) of a ``palette`` colour takes it, and a blended one (where strokes of two colours
    meet) takes the colour of the nearest such pixel. Every (layer, colour) pair with at least
    ``min_pixels`` pixels is one instance, in layer then palette order. A layer of another size
    than ``size`` (H, W) is resized to it (nearest neighbour)."""
    from scipy import ndimage

    H, W = size
    pal = np.asarray([parse_colour(c) for c in palette], dtype=np.float64)
    out = np.zeros((H, W), np.int32)
    n = 0
    for layer in layers:
        if layer is None:
            continue
        img = layer if isinstance(layer, Image.Image) else Image.fromarray(np.asarray(layer).astype(np.uint8))
        img = img.convert("RGBA")
        if img.size != (W, H):
            img = img.resize((W, H), Image.NEAREST)
        a = np.asarray(img)
        on = a[..., 3] > 127
        if not on.any():
            continue
        dist = np.linalg.norm(a[..., :3][:, :, None, :].astype(np.float64) - pal[None, None], axis=-1)
        which = np.where(on & (dist.min(-1) <= tolerance), dist.argmin(-1), -1)
        sure = which >= 0
        if not sure.any():
            continue
        _, (r, c) = ndimage.distance_transform_edt(~sure, return_indices=True)
        which = np.where(on, which[r, c], -1)
        for col in range(len(pal)):
            sel = which == col
            if sel.sum() >= min_pixels:
                n += 1
                out[sel] = n
    return relabel(out)


def masks_from_labels(labels: np.ndarray) -> np.ndarray:
    """(H, W) labels -> (K, H, W) bool masks of labels 1..max (an unused label gives an empty mask)."""
    labels = np.asarray(labels)
    return np.stack([labels == k for k in range(1, int(labels.max()) + 1)]) if labels.max() > 0 \
        else np.zeros((0, *labels.shape), bool)


def labels_from_masks(masks: np.ndarray) -> np.ndarray:
    """(K, H, W) disjoint bool masks -> labels (k + 1 where instance k is)."""
    from ..masks_io import label_map_from_masks

    return label_map_from_masks(masks)


def rle_encode(mask: np.ndarray) -> dict:
    """(H, W) bool -> COCO's uncompressed RLE ``{"size": [h, w], "counts": [...]}``: run lengths over
    the pixels in column-major order, starting with background (what :func:`timi.masks_io.rle_decode` reads)."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def write_masks_json(labels: np.ndarray, path: str | Path, names: Sequence[str] | None = None) -> Path | None:
    """The instances as a Grounded-SAM-style RLE JSON (``{"annotations": [{"segmentation", "class_name"}]}``),
    a form ``timi generate --masks`` reads, keeping the order and the names. ``None`` when there is no instance."""
    import json

    masks = masks_from_labels(labels)
    if not len(masks):
        return None
    names = list(names or [])[:len(masks)]
    names += [f"instance_{k + 1}" for k in range(len(names), len(masks))]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{"segmentation": rle_encode(m), "class_name": str(n)} for m, n in zip(masks, names)]
    path.write_text(json.dumps({"annotations": records}))
    return path


def labels_overlay(image: np.ndarray, labels: np.ndarray, selected: Iterable[int] = (), tint: float = 0.55) -> np.ndarray:
    """(H, W, 3) uint8: the picture (on white where transparent) with instance k tinted in
    :func:`timi.instances.instance_colors`' colour k - 1, selected instances outlined in black."""
    from skimage.segmentation import find_boundaries

    from ..instances import instance_colors

    a = np.asarray(image)
    rgb = _rgb(a)
    if a.ndim == 3 and a.shape[-1] == 4:
        alpha = a[..., 3:4] / 255.0
        rgb = rgb * alpha + 255.0 * (1 - alpha)
    K = int(labels.max())
    if K:
        colours = instance_colors(K)[:, :3].astype(np.float64)
        on = labels > 0
        rgb[on] = (1 - tint) * rgb[on] + tint * colours[labels[on] - 1]
        rgb[find_boundaries(labels, mode="inner")] = colours[np.maximum(labels, 1) - 1][find_boundaries(labels, mode="inner")] * 0.6
    for k in selected:
        edge = find_boundaries(labels == k, mode="thick")
        rgb[edge] = 0.0
    return np.clip(rgb, 0, 255).astype(np.uint8)

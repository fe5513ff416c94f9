"""Reading instance masks from the files people already have, and checking them against the image.

Accepted inputs (all give a ``(K, H, W)`` boolean array in the image's own pixel frame):

* a **label-map** image (PNG, palette/greyscale/16-bit; 0 = background, each other value one
  instance, in increasing value order; an RGB label map gives one instance per non-black colour);
* a **folder** of binary mask images, or a **list** of them (one instance per file, in name order
  for a folder; a pixel is "on" where the mask's alpha, or else its grey value, is above half range);
* an ``.npy`` array ``(K, H, W)`` (bool / 0-1 / 0-255) or an ``(H, W)`` integer label map;
* **COCO-style RLE JSON** as written by Segment-Anything's ``amg.py --convert-to-rle``,
  Grounded-SAM(-2) (``{"annotations": [{"segmentation": {"size", "counts"}, "class_name"}]}``) or a
  COCO annotation file: compressed (string) or uncompressed (list) ``counts``; COCO polygons too.

Every problem raises :class:`MaskInputError` with one line naming the file and the fix: unreadable
file, size mismatch with the image, empty mask, overlapping masks (see ``overlap``), more
instances than the condition-token grid can hold.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "MaskInputError",
    "InstanceMasks",
    "IMAGE_SUFFIXES",
    "read_masks",
    "load_masks",
    "load_instance_masks",
    "label_map_from_masks",
    "resolve_overlaps",
    "validate_masks",
    "rle_decode",
    "rle_counts_from_string",
    "read_image_size",
    "masks_from_array",
    "image_foreground",
    "check_input_picture",
    "MAX_LABELS",
    "instance_label",
    "foreground_notes",
    "MaskFileNotFoundError",
    "binary_from_image",
    "open_image",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
OVERLAP_MODES = ("error", "first", "last")
#: An 8-bit or colour image with more distinct values than this is a soft/greyscale picture, not a label map.
MAX_LABELS_IN_IMAGE = 256
#: Without a model's token count: the most instances any input may hold (Hunyuan3D 2.0's 37 x 37 grid).
MAX_LABELS = 37 * 37
#: A picture with at most this many distinct values and no alpha is a mask, not the input picture.
MASK_LIKE_VALUES = 2


class MaskInputError(ValueError):
    """Bad mask input. The message is one line naming the file and how to fix it."""


class MaskFileNotFoundError(MaskInputError, FileNotFoundError):
    """A mask or image file that does not exist (also a ``FileNotFoundError``)."""


@dataclass
class InstanceMasks:
    """Masks read from disk: ``masks`` (K, H, W) bool, one display name and one source per instance."""

    masks: np.ndarray
    names: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return int(self.masks.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    def label_map(self) -> np.ndarray:
        """(H, W) int32: 0 background, k+1 where instance k is (masks must be disjoint)."""
        return label_map_from_masks(self.masks)


def label_map_from_masks(masks: np.ndarray) -> np.ndarray:
    """(K, H, W) disjoint bool masks -> (H, W) int32 label map (0 = background, k+1 = instance k)."""
    masks = np.asarray(masks, dtype=bool)
    labels = np.zeros(masks.shape[1:], dtype=np.int32)
    for k in range(masks.shape[0]):
        labels[masks[k]] = k + 1
    return labels


# --------------------------------------------------------------------------------------- images


def open_image(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except FileNotFoundError:
        raise MaskFileNotFoundError(f"{path}: file not found; check the path.") from None
    except Image.DecompressionBombError as e:
        raise MaskInputError(f"{path}: {e}; a mask has the picture's size, pass that.") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise MaskInputError(f"{path}: cannot read it as an image ({e}); pass a PNG/JPEG mask or label map.") from None


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file, with a clear error when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise MaskFileNotFoundError(f"{path}: image not found; check the path.")
    try:
        with Image.open(path) as img:
            img.load()  # the pixels too: a truncated file fails here, not in the middle of the run
            w, h = img.size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise MaskInputError(f"{path}: cannot read the image ({e}); pass a PNG or JPEG picture.") from None
    return h, w


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def image_foreground(path: str | Path) -> np.ndarray | None:
    """(H, W) bool: where the picture's alpha is non-zero (what hy3dgen crops to), or ``None`` when
    it has no alpha channel (then the union of the masks is the foreground)."""
    with Image.open(path) as img:
        if not _has_alpha(img):
            return None
        return np.asarray(img.convert("RGBA"))[..., 3] > 0


def _colour_count(path: Path) -> int | None:
    """Distinct colours of a picture without alpha (``None``: it has alpha, or cannot be read)."""
    try:
        with Image.open(path) as img:
            if _has_alpha(img):
                return None
            return len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0))
    except (OSError, UnidentifiedImageError):
        return None


def _mask_like(path: Path) -> bool:
    n = _colour_count(path)
    return n is not None and n <= MASK_LIKE_VALUES


def check_input_picture(image: str | Path, masks: Sequence[str | Path] = (), hint: str | None = None) -> None:
    """Refuse an input picture that is one of the mask files or is itself a black-and-white mask
    (``timi generate --masks a.png b.png c.png`` takes ``b.png`` as the picture). ``hint``: the
    fix to name instead of the command line's (``timi app``: no command-line syntax on the page)."""
    image = Path(image)
    read_image_size(image)
    typed = [Path(m) for m in masks[:1]] + [image] + [Path(m) for m in masks[1:]]  # the order on the command line
    pictures = [p for p in typed if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not _mask_like(p)]
    picture = pictures[0] if len(pictures) == 1 else Path("PICTURE")
    if hint is None:
        hint = f"put the picture first: {picture} --masks {' '.join(str(p) for p in typed if p != picture)}"
    if any(Path(m).exists() and Path(m).resolve() == image.resolve() for m in masks):
        raise MaskInputError(f"{image}: given as the picture and as a mask; {hint}.")
    n = _colour_count(image)
    if n is not None and n <= MASK_LIKE_VALUES:
        raise MaskInputError(f"{image}: the picture has only {n} colour(s), so it is a mask, not the input picture; {hint}.")


def _threshold(a: np.ndarray) -> np.ndarray:
    """The one on/off rule for mask values: above half range, i.e. > 0.5 for values in [0, 1]
    (bool, 0/1, soft [0, 1]) and > half the largest value otherwise (0/255, 0/65535)."""
    top = a.max() if a.size else 0
    return a > (0.5 if top <= 1 else top / 2.0)


def binary_from_image(img: Image.Image) -> np.ndarray:
    """One binary mask from an image: its alpha if it has a non-trivial one, else grey > half range."""
    if _has_alpha(img):
        alpha = np.asarray(img.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            return alpha > 127
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img).astype(np.float64)
    else:
        a = np.asarray(img.convert("L")).astype(np.float64)
    return _threshold(a)


def _is_jpeg(img: Image.Image, path: Path) -> bool:
    return img.format == "JPEG" or path.suffix.lower() in (".jpg", ".jpeg")


def _binary_jpeg(img: Image.Image, path: Path) -> np.ndarray:
    """A single JPEG file is one binary mask when its grey values sit near black and white;
    a JPEG label map is refused (lossy compression changes the label values along every edge)."""
    a = np.asarray(img.convert("L"))
    near = (a <= 32) | (a >= 223)
    if near.mean() >= 0.98 and (a >= 223).any():
        return (a > 127)[None]
    raise MaskInputError(
        f"{path}: a JPEG label map: lossy compression changes the label values along every edge "
        f"({len(np.unique(a))} distinct values); save the label map as PNG."
    )


def _label_masks(a: np.ndarray, where: str | Path, max_labels: int | None) -> tuple[np.ndarray, list[str]]:
    """(H, W) integer label map -> masks (one per non-zero label, in increasing order) and names."""
    values = np.unique(a)
    nonzero = values[values != 0]
    limit = MAX_LABELS if max_labels is None else max_labels
    if len(nonzero) > limit:
        raise MaskInputError(
            f"{where}: {len(nonzero)} labels but the condition-token grid holds only {limit} tokens; "
            "merge small instances, or threshold the picture if it is not a label map."
        )
    masks = np.stack([a == v for v in nonzero]) if len(nonzero) else np.zeros((0,) + a.shape, bool)
    return masks, [f"label_{int(v)}" for v in nonzero]


def _labels_from_image(img: Image.Image, path: Path, max_labels: int | None = None) -> tuple[np.ndarray, list[str]]:
    """A single image as masks: binary (one instance) or label map (one instance per value/colour)."""
    if _is_jpeg(img, path):
        return _binary_jpeg(img, path), [path.stem]
    if img.mode in ("RGB", "RGBA") and not _is_grey(img):
        rgb = np.asarray(img.convert("RGB")).reshape(-1, 3)
        colours, inverse = np.unique(rgb, axis=0, return_inverse=True)
        if len(colours) > MAX_LABELS_IN_IMAGE:
            raise MaskInputError(
                f"{path}: {len(colours)} distinct colours, so it is a picture rather than a label map; "
                "pass a label map (0 = background, 1..K) or one binary PNG per instance."
            )
        h, w = img.size[1], img.size[0]
        inverse = inverse.reshape(h, w)
        keep = [i for i, c in enumerate(colours) if tuple(c) != (0, 0, 0)]
        masks = np.stack([inverse == i for i in keep]) if keep else np.zeros((0, h, w), bool)
        names = ["#%02x%02x%02x" % tuple(int(v) for v in colours[i]) for i in keep]
        return masks, names
    if img.mode == "P":
        a = np.asarray(img)  # palette indices are the labels
    elif img.mode in ("I", "I;16", "I;16B", "I;16L"):
        a = np.asarray(img).astype(np.int64)
    elif img.mode in ("RGBA", "LA"):
        alpha = np.asarray(img.getchannel("A"))
        grey = np.asarray(img.convert("L"))
        if alpha.min() < 255 and len(np.unique(grey)) <= 2:
            return (alpha > 127)[None], [path.stem]
        a = grey
    else:
        a = np.asarray(img.convert("L"))
    values = np.unique(a)
    nonzero = values[values != 0]
    if len(nonzero) == 1 and nonzero[0] in (1, 255, 65535):  # binary mask: one instance
        return (a != 0)[None], [path.stem]
    sixteen = img.mode in ("I", "I;16", "I;16B", "I;16L")
    if not sixteen and len(values) >= MAX_LABELS_IN_IMAGE:  # every 8-bit value used: a picture
        raise MaskInputError(
            f"{path}: {len(values)} distinct values, so it is a soft/greyscale picture rather than a label map; "
            "threshold it to a binary mask or pass a label map (0 = background, 1..K)."
        )
    return _label_masks(a, path, max_labels)


def _is_grey(img: Image.Image) -> bool:
    rgb = np.asarray(img.convert("RGB"))
    return bool(np.all(rgb[..., 0] == rgb[..., 1]) and np.all(rgb[..., 1] == rgb[..., 2]))


# ------------------------------------------------------------------------------------ COCO RLE


def rle_counts_from_string(s: str) -> list[int]:
    """Decode COCO's compressed RLE string (pycocotools ``rleFrString``) into run lengths.

    Each count is written as 5-bit groups, least significant first, each group as the character
    ``48 + group`` with bit 0x20 meaning "another group follows"; the last group's bit 0x10 is the
    sign. From the fourth count on, the stored value is the difference to the count two places back.
    """
    counts: list[int] = []
    p = 0
    data = s.encode("ascii") if isinstance(s, str) else bytes(s)
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                raise ValueError("truncated RLE string")
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_decode(rle: dict) -> np.ndarray:
    """COCO RLE ``{"size": [h, w], "counts": str | list[int]}`` -> (h, w) bool mask.

    Runs alternate background/foreground starting with background, over the pixels in column-major
    (Fortran) order, as in the COCO format.
    """
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = rle_counts_from_string(counts)
    counts = np.asarray(counts, dtype=np.int64)
    if np.any(counts < 0) or counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {counts.sum()} but size {h}x{w} has {h * w} pixels")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T


def _polygon_mask(polys: list, hw: tuple[int, int]) -> np.ndarray:
    from skimage.draw import polygon

    mask = np.zeros(hw, dtype=bool)
    for poly in polys:
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        rr, cc = polygon(xy[:, 1], xy[:, 0], shape=hw)
        mask[rr, cc] = True
    return mask


def _records_from_json(obj) -> list[dict]:
    """The annotation records of a SAM / Grounded-SAM / COCO JSON, each with a 'segmentation'."""
    if isinstance(obj, dict):
        if "annotations" in obj:
            return _records_from_json(obj["annotations"])
        if "counts" in obj and "size" in obj:
            return [{"segmentation": obj}]
        if "segmentation" in obj:
            return [obj]
        if "masks" in obj:
            return _records_from_json(obj["masks"])
        raise ValueError("no 'annotations', 'segmentation' or RLE {'size', 'counts'} found")
    if isinstance(obj, list):
        out = []
        for rec in obj:
            if isinstance(rec, dict) and "counts" in rec and "size" in rec:
                out.append({"segmentation": rec})
            elif isinstance(rec, dict) and "segmentation" in rec:
                out.append(rec)
            else:
                raise ValueError("a list entry has no 'segmentation' or RLE {'size', 'counts'}")
        return out
    raise ValueError("expected a JSON object or list")


def _masks_from_json(path: Path) -> tuple[np.ndarray, list[str]]:
    try:
        obj = json.loads(path.read_text())
        records = _records_from_json(obj)
        sizes = _json_image_sizes(obj)
        masks, names = [], []
        for i, rec in enumerate(records):
            seg = rec["segmentation"]
            if isinstance(seg, dict):
                masks.append(rle_decode(seg))
            else:  # COCO polygons need the image size from the file's "images" entry
                hw = sizes.get(rec.get("image_id"))
                if hw is None and len(sizes) == 1:
                    hw = next(iter(sizes.values()))
                if hw is None:
                    raise ValueError("polygon segmentation without an 'images' entry giving height/width")
                masks.append(_polygon_mask(seg, hw))
            label = rec.get("class_name", rec.get("label", rec.get("category_name", rec.get("category_id"))))
            names.append(str(label) if label is not None else f"{path.stem}_{i}")
    except MaskInputError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise MaskInputError(f"{path}: cannot read the file ({e}); check the path and permissions.") from None
    except (ValueError, KeyError, TypeError) as e:
        raise MaskInputError(
            f"{path}: not a COCO-RLE mask JSON ({e}); pass SAM/Grounded-SAM RLE output "
            "(records with segmentation={'size': [h, w], 'counts': ...})."
        ) from None
    if not masks:
        raise MaskInputError(f"{path}: the JSON holds no masks; pass a file with at least one annotation.")
    shapes = {m.shape for m in masks}
    if len(shapes) > 1:
        raise MaskInputError(f"{path}: masks of different sizes {sorted(shapes)}; all must match the image size.")
    return np.stack(masks), names


def _json_image_sizes(obj) -> dict:
    if isinstance(obj, dict) and isinstance(obj.get("images"), list):
        return {im.get("id"): (int(im["height"]), int(im["width"])) for im in obj["images"] if "height" in im}
    return {}


# ----------------------------------------------------------------------------------- npy / dirs


def masks_from_array(a, where: str | Path = "masks", max_labels: int | None = None,
                     stem: str = "instance") -> tuple[np.ndarray, list[str]]:
    """The one rule for mask arrays, shared by ``timi generate`` (``.npy`` files) and the Python API.

    ``(K, H, W)`` bool, integer or float: a pixel is on above half range (:func:`_threshold`):
    > 0.5 for values in [0, 1], > half the largest value for 0/255 or 0/65535; floats must be
    finite and lie in [0, 1] or [0, 255]; negative values are refused. ``(H, W)`` integer (or
    bool) array: a label map (0 = background). Returns (masks, names) or raises
    :class:`MaskInputError` naming ``where``.
    """
    a = np.asarray(a)
    if not (a.dtype == bool or np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise MaskInputError(f"{where}: masks of dtype {a.dtype}; pass a bool, integer or float array.")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise MaskInputError(f"{where}: {bad} NaN/inf value(s) in the masks; replace them with 0 (background) or 1.")
    if a.dtype != bool and a.size and a.min() < 0:
        raise MaskInputError(f"{where}: negative values (min {a.min():g}); masks hold 0 (background) and 1 or 255.")
    if a.ndim == 2:
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise MaskInputError(f"{where}: a 2-D array must be an integer label map (0 = background, 1..K); "
                                 f"got dtype {a.dtype}; cast it to int or pass (K, H, W) masks.")
        return _label_masks(a, where, max_labels)
    if a.ndim != 3:
        raise MaskInputError(f"{where}: array of shape {a.shape}; pass (K, H, W) masks or an (H, W) label map.")
    if np.issubdtype(a.dtype, np.floating) and a.size and a.max() > 255:
        raise MaskInputError(f"{where}: float masks must lie in [0, 1] or [0, 255]; got [{a.min():g}, {a.max():g}].")
    m = a if a.dtype == bool else _threshold(a)
    return m.astype(bool), [f"{stem}_{k}" for k in range(a.shape[0])]


def _masks_from_npy(path: Path, max_labels: int | None = None) -> tuple[np.ndarray, list[str]]:
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise MaskInputError(f"{path}: cannot load it as a .npy array ({e}); save masks with numpy.save.") from None
    return masks_from_array(a, path, max_labels, stem=path.stem)


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


def _expand(sources: Iterable[str | Path]) -> list[tuple[Path, str]]:
    """Sources -> [(path, kind)], kind in {'binary', 'single'}; folders expand to their images."""
    sources = [Path(s) for s in sources]
    out: list[tuple[Path, str]] = []
    for src in sources:
        if src.is_dir():
            files = sorted((p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
            if not files:
                raise MaskInputError(f"{src}: folder holds no mask images ({', '.join(IMAGE_SUFFIXES)}); add one PNG per instance.")
            out += [(f, "binary") for f in files]
        elif not src.exists():
            raise MaskFileNotFoundError(f"{src}: file not found; check the path.")
        else:
            out.append((src, "binary" if len(sources) > 1 and src.suffix.lower() in IMAGE_SUFFIXES else "single"))
    return out


def read_masks(sources: str | Path | Sequence[str | Path], max_labels: int | None = None) -> InstanceMasks:
    """Read masks from one source or several (instances concatenated in order). No validation.

    One image file is a label map (or a single binary mask); images in a folder or a list of
    several files are binary masks, one instance each. ``.npy`` and ``.json`` files may hold many.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise MaskInputError("no masks given; pass --masks with a label map, mask PNGs, an .npy or an RLE .json.")
    masks, names, origins = [], [], []
    for path, kind in _expand(sources):
        suffix = path.suffix.lower()
        if suffix == ".npy":
            m, n = _masks_from_npy(path, max_labels)
        elif suffix == ".json":
            m, n = _masks_from_json(path)
        elif suffix in IMAGE_SUFFIXES:
            img = open_image(path)
            if kind == "binary":
                m, n = binary_from_image(img)[None], [path.stem]
            else:
                m, n = _labels_from_image(img, path, max_labels)
        else:
            raise MaskInputError(
                f"{path}: unknown mask format '{suffix}'; use a PNG label map, mask PNGs, a (K, H, W) .npy or an RLE .json."
            )
        if m.shape[0] == 0:
            raise MaskInputError(f"{path}: holds no instance (all background); draw at least one mask.")
        if masks and m.shape[1:] != masks[0].shape[1:]:
            raise MaskInputError(
                f"{path}: mask size {m.shape[2]}x{m.shape[1]} differs from {origins[0]} "
                f"({masks[0].shape[2]}x{masks[0].shape[1]}); make all masks the image's size."
            )
        masks.append(m.astype(bool))
        names += n
        origins += [str(path)] * m.shape[0]
    return InstanceMasks(np.concatenate(masks, axis=0), names, origins)


# ---------------------------------------------------------------------------------- validation


def resolve_overlaps(masks: np.ndarray, mode: str = "error", sources: Sequence[str] | None = None) -> np.ndarray:
    """Make masks disjoint: ``error`` raises naming the pairs, ``first``/``last`` give a pixel claimed
    by several instances to the first/last of them (in input order)."""
    if mode not in OVERLAP_MODES:
        raise MaskInputError(f"--overlap {mode!r}: choose one of {', '.join(OVERLAP_MODES)}.")
    masks = np.asarray(masks, dtype=bool)
    claims = masks.sum(axis=0)
    if not np.any(claims > 1):
        return masks
    if mode == "error":
        K = masks.shape[0]
        flat = masks.reshape(K, -1).astype(np.int64)
        both = flat @ flat.T
        pairs = [(i, j) for i in range(K) for j in range(i + 1, K) if both[i, j] > 0]
        where = _name(sources, pairs[0][0]) if sources else "masks"
        desc = ", ".join(f"{i}&{j} ({both[i, j]} px)" for i, j in pairs[:4]) + (" ..." if len(pairs) > 4 else "")
        raise MaskInputError(
            f"{where}: instance masks overlap: {desc}; make them disjoint or pass --overlap first|last."
        )
    order = range(masks.shape[0]) if mode == "first" else range(masks.shape[0] - 1, -1, -1)
    taken = np.zeros(masks.shape[1:], dtype=bool)
    out = np.zeros_like(masks)
    for k in order:
        out[k] = masks[k] & ~taken
        taken |= masks[k]
    return out


def _name(sources: Sequence[str] | None, k: int) -> str:
    return sources[k] if sources and k < len(sources) else "masks"


def validate_masks(
    masks: np.ndarray,
    *,
    image_size: tuple[int, int] | None = None,
    image_path: str | Path | None = None,
    sources: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    overlap: str = "error",
    max_instances: int | None = None,
    foreground: np.ndarray | None = None,
    allow_empty: bool = False,
) -> np.ndarray:
    """Check masks against the image and return them disjoint (see :func:`resolve_overlaps`).

    ``image_size`` is (H, W); ``max_instances`` is the number of condition tokens of the patch grid
    (an instance needs at least one token); ``foreground`` (H, W) bool is where the picture's alpha
    is non-zero (:func:`image_foreground`), ``None`` for a picture without alpha.
    ``allow_empty``: an empty mask is an instance this view does not show (multi-view input); the
    other checks then apply to the non-empty masks. Raises :class:`MaskInputError`.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise MaskInputError(f"{_name(sources, 0)}: masks must be (K, H, W); got shape {masks.shape}.")
    masks = masks.astype(bool)
    K, H, W = masks.shape
    if K == 0:
        raise MaskInputError(f"{_name(sources, 0)}: no instance masks; pass at least one.")
    if image_size is not None and (H, W) != tuple(image_size):
        ih, iw = image_size
        img = f"image {image_path}" if image_path else "the image"
        raise MaskInputError(
            f"{_name(sources, 0)}: mask size {W}x{H} differs from {img} ({iw}x{ih}); "
            "resize the masks to the image (nearest-neighbour) or pass the matching image."
        )
    if max_instances is not None and K > max_instances:
        raise MaskInputError(
            f"{_name(sources, 0)}: {K} instances but the condition-token grid holds only {max_instances} tokens; "
            "merge small instances or pass fewer masks."
        )
    present = [k for k in range(K) if masks[k].any()]
    for k in range(K):
        if k not in present and not allow_empty:
            raise MaskInputError(f"{_name(sources, k)}: {instance_label(k, names)} is empty; remove it or fix the mask.")
    if foreground is not None and foreground.shape == (H, W):
        for k in present:
            if not (masks[k] & foreground).any():
                raise MaskInputError(
                    f"{_name(sources, k)}: {instance_label(k, names)} lies entirely outside the picture's foreground "
                    "(its alpha is 0 under the whole mask); fix the mask or the picture's alpha."
                )
    out = resolve_overlaps(masks, overlap, sources)
    for k in present:
        if not out[k].any():
            raise MaskInputError(
                f"{_name(sources, k)}: {instance_label(k, names)} is entirely covered by other masks after --overlap "
                f"{overlap}; remove it or use the other --overlap order."
            )
    return out


def instance_label(k: int, names: Sequence[str] | None = None) -> str:
    """How messages name instance ``k`` (0-based, as in ``timi inspect``'s table): ``instance 2 (label_3)``."""
    return f"instance {k} ({names[k]})" if names and k < len(names) else f"instance {k}"


def foreground_notes(image: str | Path, masks: np.ndarray) -> list[str]:
    """What the picture's foreground will be, when it is not the picture's own alpha."""
    if image_foreground(image) is not None:
        return []
    union = np.asarray(masks, dtype=bool).any(axis=0)
    notes = [f"{image} has no alpha channel: the union of the masks is used as the foreground (hy3dgen expects "
             "a cut-out picture); pass an RGBA picture to set it yourself."]
    if union.all():
        notes.append(f"the masks cover the whole of {image}, so hy3dgen sees no background; leave the background "
                     "out of the masks or pass an RGBA picture.")
    return notes


def load_masks(
    sources: str | Path | Sequence[str | Path],
    *,
    image: str | Path | None = None,
    image_size: tuple[int, int] | None = None,
    overlap: str = "error",
    max_instances: int | None = None,
) -> np.ndarray:
    """Read and validate masks -> (K, H, W) bool, disjoint, in the image's pixel frame."""
    return load_instance_masks(sources, image=image, image_size=image_size, overlap=overlap, max_instances=max_instances).masks


def load_instance_masks(
    sources: str | Path | Sequence[str | Path],
    *,
    image: str | Path | None = None,
    image_size: tuple[int, int] | None = None,
    overlap: str = "error",
    max_instances: int | None = None,
) -> InstanceMasks:
    """Like :func:`load_masks` but keeps the instance names and source files."""
    if image is not None and image_size is None:
        image_size = read_image_size(image)
    found = read_masks(sources, max_labels=max_instances)
    found.masks = validate_masks(
        found.masks,
        image_size=image_size,
        image_path=image,
        sources=found.sources,
        names=found.names,
        overlap=overlap,
        max_instances=max_instances,
        foreground=image_foreground(image) if image is not None else None,
    )
    return found

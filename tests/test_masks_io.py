"""Mask inputs: every format reads to the same (K, H, W) masks; every bad input gives a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from timi.masks_io import (
    MaskInputError,
    load_instance_masks,
    load_masks,
    read_masks,
    resolve_overlaps,
    rle_counts_from_string,
    rle_decode,
)

H, W = 24, 32


def scene_masks() -> np.ndarray:
    """Three disjoint instances of different shapes (a box, a disc, an L)."""
    yy, xx = np.mgrid[:H, :W]
    a = (yy >= 3) & (yy < 12) & (xx >= 2) & (xx < 10)
    b = (yy - 15) ** 2 + (xx - 20) ** 2 < 30
    c = ((yy >= 18) & (yy < 22) & (xx >= 2) & (xx < 12)) | ((xx >= 26) & (xx < 29) & (yy >= 2))
    return np.stack([a, b, c])


def write_image(tmp_path, hw=(H, W)):
    p = tmp_path / "photo.png"
    Image.fromarray(np.full(hw + (3,), 200, np.uint8)).save(p)
    return p


# --------------------------------------------------------------------------------- formats


def test_label_map_png(tmp_path):
    m = scene_masks()
    labels = np.zeros((H, W), np.uint8)
    for k in range(3):
        labels[m[k]] = k + 1
    Image.fromarray(labels).save(tmp_path / "labels.png")
    got = load_masks(tmp_path / "labels.png", image=write_image(tmp_path))
    np.testing.assert_array_equal(got, m)


def test_label_map_palette_and_16bit(tmp_path):
    m = scene_masks()
    labels = np.zeros((H, W), np.uint16)
    for k, v in enumerate([3, 700, 1000]):  # non-consecutive labels keep their order
        labels[m[k]] = v
    Image.fromarray(labels).save(tmp_path / "labels16.png")
    found = read_masks(tmp_path / "labels16.png")
    np.testing.assert_array_equal(found.masks, m)
    assert found.names == ["label_3", "label_700", "label_1000"]

    idx = np.zeros((H, W), np.uint8)
    for k in range(3):
        idx[m[k]] = k + 1
    pal = Image.fromarray(idx, mode="L").convert("P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12))
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(read_masks(tmp_path / "pal.png").masks, m)


def test_rgb_colour_label_map(tmp_path):
    m = scene_masks()
    rgb = np.zeros((H, W, 3), np.uint8)
    for k, col in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        rgb[m[k]] = col
    Image.fromarray(rgb).save(tmp_path / "colours.png")
    got = read_masks(tmp_path / "colours.png").masks
    # instances come in colour order (sorted RGB), so compare as sets of masks
    assert sorted(map(lambda a: a.tobytes(), got)) == sorted(map(lambda a: a.tobytes(), m))


def test_folder_and_list_of_binary_pngs(tmp_path):
    m = scene_masks()
    d = tmp_path / "masks"
    d.mkdir()
    for k, name in enumerate(["obj2", "obj10", "obj3"]):  # natural order: obj2, obj3, obj10
        Image.fromarray(m[k].astype(np.uint8) * 255).save(d / f"{name}.png")
    found = load_instance_masks(d, image=write_image(tmp_path))
    assert found.names == ["obj2", "obj3", "obj10"]
    np.testing.assert_array_equal(found.masks, m[[0, 2, 1]])

    files = [d / "obj10.png", d / "obj2.png"]
    np.testing.assert_array_equal(load_masks(files), m[[1, 0]])


def test_binary_png_with_alpha_uses_alpha(tmp_path):
    m = scene_masks()[1]
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere: only the alpha says where the object is
    rgba[..., 3] = m * 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    Image.fromarray(scene_masks()[0].astype(np.uint8) * 255).save(tmp_path / "b.png")
    got = load_masks([tmp_path / "a.png", tmp_path / "b.png"])
    np.testing.assert_array_equal(got[0], m)


def test_npy_stack_and_label_map(tmp_path):
    m = scene_masks()
    np.save(tmp_path / "m.npy", m)
    np.testing.assert_array_equal(load_masks(tmp_path / "m.npy"), m)
    np.save(tmp_path / "m255.npy", m.astype(np.uint8) * 255)
    np.testing.assert_array_equal(load_masks(tmp_path / "m255.npy"), m)
    labels = (m * np.arange(1, 4)[:, None, None]).sum(0).astype(np.int32)
    np.save(tmp_path / "lab.npy", labels)
    np.testing.assert_array_equal(load_masks(tmp_path / "lab.npy"), m)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """Independent encoder of COCO's uncompressed RLE (column-major runs, starting with zeros)."""
    flat = mask.T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    assert sum(counts) == mask.size
    return {"size": list(mask.shape), "counts": counts}


def _compressed_rle(mask: np.ndarray) -> dict:
    """Independent encoder of COCO's compressed RLE string (the inverse of the documented scheme)."""
    counts = _uncompressed_rle(mask)["counts"]
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            out.append(chr((c | (0x20 if more else 0)) + 48))
    return {"size": list(mask.shape), "counts": "".join(out)}


def test_rle_known_string():
    # 'size' [3, 2]: column-major pixels 0,0,1,1,1,0 -> runs [2, 3, 1]; counts < 16 are one char '0'+n
    assert rle_counts_from_string("231") == [2, 3, 1]
    got = rle_decode({"size": [3, 2], "counts": "231"})
    np.testing.assert_array_equal(got, [[False, True], [False, True], [True, False]])


def test_rle_matches_pycocotools(tmp_path):
    mask_util = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for shape in [(7, 5), (40, 33), (120, 90)]:
        m = rng.random(shape) > 0.6
        m[:, : shape[1] // 3] = True  # a long run, so multi-group counts appear
        enc = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        s = enc["counts"].decode("ascii")
        np.testing.assert_array_equal(rle_decode({"size": enc["size"], "counts": s}), m)
        np.testing.assert_array_equal(mask_util.decode(enc).astype(bool), m)
        assert _compressed_rle(m)["counts"] == s  # the test's own encoder agrees with pycocotools


def test_sam_and_grounded_sam_json(tmp_path):
    m = scene_masks()
    compressed = _compressed_rle

    # Segment-Anything amg.py: a list of records, each with an RLE 'segmentation'
    sam = [{"segmentation": compressed(mk), "area": int(mk.sum()), "bbox": [0, 0, 1, 1]} for mk in m]
    (tmp_path / "sam.json").write_text(json.dumps(sam))
    np.testing.assert_array_equal(load_masks(tmp_path / "sam.json"), m)

    # Grounded-SAM-2: {"annotations": [{"class_name", "segmentation"}], ...}
    gsam = {"image_path": "x.png", "annotations": [
        {"class_name": name, "segmentation": compressed(mk), "score": [0.9]} for name, mk in zip(["cup", "ball", "pipe"], m)
    ], "img_width": W, "img_height": H}
    (tmp_path / "gsam.json").write_text(json.dumps(gsam))
    found = load_instance_masks(tmp_path / "gsam.json", image=write_image(tmp_path))
    assert found.names == ["cup", "ball", "pipe"]
    np.testing.assert_array_equal(found.masks, m)


def test_uncompressed_rle_json(tmp_path):
    m = scene_masks()
    (tmp_path / "u.json").write_text(json.dumps([_uncompressed_rle(mk) for mk in m]))
    np.testing.assert_array_equal(load_masks(tmp_path / "u.json"), m)


def test_coco_polygon_json(tmp_path):
    coco = {
        "images": [{"id": 1, "height": H, "width": W}],
        "annotations": [{"image_id": 1, "category_id": 5, "segmentation": [[2, 3, 10, 3, 10, 12, 2, 12]]}],
    }
    (tmp_path / "poly.json").write_text(json.dumps(coco))
    got = load_masks(tmp_path / "poly.json")
    assert got.shape == (1, H, W)
    assert got[0, 5, 5] and not got[0, 20, 20]


# ----------------------------------------------------------------------------------- errors


def _err(fn, *a, **kw) -> str:
    with pytest.raises(MaskInputError) as e:
        fn(*a, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_size_mismatch_names_file_and_fix(tmp_path):
    np.save(tmp_path / "m.npy", scene_masks())
    msg = _err(load_masks, tmp_path / "m.npy", image=write_image(tmp_path, (H + 1, W)))
    assert "m.npy" in msg and "32x24" in msg and "32x25" in msg and "resize" in msg


def test_empty_mask(tmp_path):
    m = scene_masks()
    m[1] = False
    np.save(tmp_path / "m.npy", m)
    msg = _err(load_masks, tmp_path / "m.npy")
    assert "m.npy" in msg and "instance 1" in msg and "empty" in msg


def test_all_background_label_map(tmp_path):
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "zero.png")
    assert "zero.png" in _err(load_masks, tmp_path / "zero.png")


def test_overlap_modes(tmp_path):
    m = scene_masks()
    m[1, 3:6, 2:5] = True  # instance 1 overlaps instance 0 on 9 pixels
    np.save(tmp_path / "m.npy", m)
    msg = _err(load_masks, tmp_path / "m.npy")
    assert "overlap" in msg and "0&1 (9 px)" in msg and "--overlap first|last" in msg
    first = load_masks(tmp_path / "m.npy", overlap="first")
    last = load_masks(tmp_path / "m.npy", overlap="last")
    assert first[0, 4, 3] and not first[1, 4, 3]
    assert last[1, 4, 3] and not last[0, 4, 3]
    assert first.sum(0).max() == 1 and last.sum(0).max() == 1
    # nothing outside the overlap changes
    np.testing.assert_array_equal(first | last, m)
    with pytest.raises(MaskInputError, match="choose one of"):
        resolve_overlaps(m, "middle")


def test_overlap_swallowing_an_instance(tmp_path):
    m = scene_masks()
    m[0] |= m[1]  # instance 1 lies inside instance 0
    np.save(tmp_path / "m.npy", m)
    assert "covered" in _err(load_masks, tmp_path / "m.npy", overlap="first")
    assert load_masks(tmp_path / "m.npy", overlap="last")[1].sum() == scene_masks()[1].sum()


def test_unreadable_files(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert "bad.png" in _err(load_masks, tmp_path / "bad.png")
    (tmp_path / "bad.json").write_text("{\"foo\": 1}")
    assert "bad.json" in _err(load_masks, tmp_path / "bad.json")
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    assert "bad.npy" in _err(load_masks, tmp_path / "bad.npy")
    assert "missing.png" in _err(load_masks, tmp_path / "missing.png")
    (tmp_path / "m.txt").write_text("1")
    assert "unknown mask format" in _err(load_masks, tmp_path / "m.txt")
    (tmp_path / "empty_dir").mkdir()
    assert "empty_dir" in _err(load_masks, tmp_path / "empty_dir")


def test_photo_is_not_a_label_map(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    assert "label map" in _err(load_masks, tmp_path / "photo.png")


def test_more_instances_than_tokens(tmp_path):
    np.save(tmp_path / "m.npy", scene_masks())
    msg = _err(load_masks, tmp_path / "m.npy", max_instances=2)
    assert "3 instances" in msg and "2 tokens" in msg


def test_masks_of_different_sizes_in_a_list(tmp_path):
    Image.fromarray(np.ones((H, W), np.uint8) * 255).save(tmp_path / "a.png")
    Image.fromarray(np.ones((H, W + 2), np.uint8) * 255).save(tmp_path / "b.png")
    msg = _err(load_masks, [tmp_path / "a.png", tmp_path / "b.png"])
    assert "b.png" in msg and "a.png" in msg

"""Masks follow the condition image's geometry exactly (hy3dgen's recentre/resize + DINOv2 crop)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import timi_core
from timi_torch import condition_token_masks, write_tiny_model_dir
from timi_torch.masks import recenter, recenter_layout
from torch_helpers import load_base, scene, tiny_base, tiny_dir, tiny_root  # noqa: F401  (fixtures)


def test_recenter_geometry_matches_hy3dgen_bitwise():
    """Our replay of the crop/resize/placement reproduces ImageProcessorV2.recenter on the image itself."""
    from hy3dgen.shapegen.preprocessors import ImageProcessorV2

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (157, 233, 4), dtype=np.uint8)
    img[..., 3] = 0
    img[20:131, 41:199, 3] = rng.integers(1, 256, (111, 158), dtype=np.uint8)
    expected_rgb, expected_mask = ImageProcessorV2.recenter(img.copy(), border_ratio=0.15)

    canvas = recenter(img, recenter_layout(img[..., 3], 0.15), cv2.INTER_AREA)
    mask = canvas[..., 3:].astype(np.float32) / 255
    rgb = (canvas[..., :3] * mask + 255 * (1 - mask)).clip(0, 255).astype(np.uint8)
    np.testing.assert_array_equal(rgb, expected_rgb)
    np.testing.assert_array_equal((mask * 255).clip(0, 255).astype(np.uint8)[..., 0], expected_mask[..., 0])


def _colour_masks(frame_image):
    f = frame_image.astype(int)
    red = (f[..., 0] > 150) & (f[..., 1] < 90) & (f[..., 2] < 90)
    blue = (f[..., 2] > 150) & (f[..., 0] < 90) & (f[..., 1] < 90)
    return np.stack([red, blue])


def test_masks_land_on_the_tokens_of_their_image_regions(tiny_base):
    """Alignment: the masks in the conditioner's frame cover the pixels where hy3dgen's processed
    image shows each object's colour, and pool onto the same tokens."""
    img, masks = scene(alpha=True)
    cm = condition_token_masks(img, masks, tiny_base)
    assert cm.grid == (37, 37) and cm.prefix_tokens == 1 and cm.tokens.shape == (2, 1370)
    assert cm.frame_masks.shape == (2, 518, 518) and cm.frame_image.shape == (518, 518, 3)

    # The frame image is hy3dgen's own processing (prepare_image + the conditioner's Resize/CenterCrop).
    encoder = tiny_base.conditioner.main_image_encoder
    ref = tiny_base.prepare_image(Image.fromarray(img))["image"]
    ref = encoder.transform.transforms[1](encoder.transform.transforms[0]((ref[0] + 1) / 2))
    np.testing.assert_allclose(cm.frame_image, (ref.permute(1, 2, 0).numpy() * 255), atol=0.51)

    colour = _colour_masks(cm.frame_image)
    for k in range(2):
        agree = (colour[k] == cm.frame_masks[k]).mean()
        assert agree > 0.995, (k, agree)
    by_colour = timi_core.pool_masks(torch.from_numpy(colour), (37, 37), prefix_tokens=1)
    assert torch.all(cm.tokens[:, 0] == 0)  # CLS weight 0
    assert (by_colour - cm.tokens).abs().max() < 0.2
    assert (by_colour - cm.tokens).abs().mean() < 2e-3
    strong = cm.tokens.max(0).values > 0.5
    assert strong.sum() > 100
    assert torch.equal(cm.tokens.argmax(0)[strong], by_colour.argmax(0)[strong])


def test_mask_formats_agree(tiny_base, tmp_path):
    img, masks = scene(alpha=True)
    ref = condition_token_masks(img, masks, tiny_base).tokens
    labels = masks[0] * 3 + masks[1] * 7          # label map: 0 background, 3 and 7 the instances
    paths = []
    for k in range(2):
        Image.fromarray(masks[k].astype(np.uint8) * 255).save(tmp_path / f"m{k}.png")
        paths.append(tmp_path / f"m{k}.png")
    Image.fromarray(img).save(tmp_path / "scene.png")
    for variant in (masks.astype(np.uint8), torch.from_numpy(masks), labels, paths,
                    [Image.open(p) for p in paths]):
        assert torch.equal(condition_token_masks(img, variant, tiny_base).tokens, ref)
    assert torch.equal(condition_token_masks(str(tmp_path / "scene.png"), masks, tiny_base).tokens, ref)


def test_rgb_without_alpha_uses_the_union_of_masks(tiny_base):
    rgb, masks = scene(alpha=False)
    rgba = np.dstack([rgb, np.where(masks.any(0), 255, 0).astype(np.uint8)])
    a = condition_token_masks(rgba, masks, tiny_base)
    b = condition_token_masks(rgb, masks, tiny_base)
    np.testing.assert_array_equal(np.asarray(b.image)[..., 3], np.where(masks.any(0), 255, 0))
    assert torch.equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.frame_image, b.frame_image)


def test_bad_masks_give_clear_errors(tiny_base):
    img, masks = scene(alpha=True)
    with pytest.raises(ValueError, match="mask size 300x100 differs from the image"):
        condition_token_masks(img, masks[:, :100], tiny_base)
    empty = masks.copy()
    empty[1] = False
    with pytest.raises(ValueError, match="instance 1 is empty"):
        condition_token_masks(img, empty, tiny_base)
    both = masks.copy()
    both[1, 60:70, 100:110] = True
    with pytest.raises(ValueError, match=r"overlap: 0&1 \(100 px\)"):
        condition_token_masks(img, both, tiny_base)
    with pytest.warns(UserWarning, match="only one instance"):
        condition_token_masks(img, masks[:1], tiny_base)
    speck = np.zeros((3, 200, 300), bool)
    speck[:2] = masks
    speck[2, 10, 10] = True                     # a single pixel, outside the objects' alpha
    with pytest.raises(ValueError, match=r"instance 2 \(speck\) lies entirely outside the picture's foreground"):
        condition_token_masks(img, speck, tiny_base, names=["a", "b", "speck"])
    big = np.full((1200, 1200, 4), 255, np.uint8)   # all foreground: 1 px becomes 0.36 px at 512
    halves = np.zeros((3, 1200, 1200), bool)
    halves[0, :, :600] = halves[1, :, 600:] = True
    halves[1, 600, 900], halves[2, 600, 900] = False, True
    with pytest.raises(ValueError, match=r"^instance 2 \(speck\) cover\(s\) no pixel.*crop the picture closer"):
        condition_token_masks(big, halves, tiny_base, names=["a", "b", "speck"])


def test_more_instances_than_tokens(tmp_path):
    """A 28 px conditioner has a 2x2 patch grid: 5 instances cannot be resolved."""
    d = write_tiny_model_dir(tmp_path / "m", image_size=28)
    base = load_base(d)
    labels = np.repeat(np.arange(1, 6), 40)[None, :].repeat(120, 0)   # five vertical stripes
    img = np.full((120, 200, 3), 128, np.uint8)
    with pytest.raises(ValueError, match="5 labels but the condition-token grid holds only 4 tokens"):
        condition_token_masks(img, labels, base)
    with pytest.raises(ValueError, match="5 instances but the condition-token grid holds only 4 tokens"):
        condition_token_masks(img, np.stack([labels == k for k in range(1, 6)]), base)


def test_mask_files_read_like_arrays(tmp_path):
    """A label-map PNG path, a .npy path and lists of 0/1 or 0/255 mask PNGs give the same masks."""
    from timi_torch.masks import instance_masks

    labels = np.zeros((20, 30), np.uint8)
    labels[2:8, 3:10] = 1
    labels[10:18, 12:25] = 2
    expected = np.stack([labels == 1, labels == 2])
    Image.fromarray(labels).save(tmp_path / "labels.png")
    np.save(tmp_path / "masks.npy", expected)
    for scale in (1, 255):
        for k in range(2):
            Image.fromarray(expected[k].astype(np.uint8) * scale).save(tmp_path / f"m{k}_{scale}.png")
        paths = [tmp_path / f"m{k}_{scale}.png" for k in range(2)]
        np.testing.assert_array_equal(instance_masks(paths), expected)
    np.testing.assert_array_equal(instance_masks(str(tmp_path / "labels.png")), expected)
    np.testing.assert_array_equal(instance_masks(tmp_path / "masks.npy"), expected)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        instance_masks(tmp_path / "nope.png")

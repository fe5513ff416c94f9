"""``timi app --sam-checkpoint``'s plumbing on a randomly initialised, small SAM built from
``segment-anything``'s own classes (no weights exist here): a checkpoint file loaded through the
package's registry, prompts in the picture's pixels -> one mask of the picture's size -> a new
instance in the label map; one embedding per picture; one-line errors."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("segment_anything", reason="segment-anything is not installed (pip install 'timi[sam]')")

import torch  # noqa: E402
from segment_anything import SamPredictor  # noqa: E402
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: E402

from timi.webapp.sam import SamClicker, SamError, add_instance, load_sam, picture_rgb, sam_model_type  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "timi" / "assets" / "example"


def small_sam(size: int = 64, dim: int = 32) -> Sam:
    """SAM's architecture at a toy size: a 64 px, one-block ViT (4 x 4 patches of 16 px)."""
    torch.manual_seed(0)
    grid = size // 16
    return Sam(
        image_encoder=ImageEncoderViT(img_size=size, patch_size=16, embed_dim=dim, depth=1, num_heads=2, mlp_ratio=2,
                                      out_chans=dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                      use_rel_pos=True, window_size=0, global_attn_indexes=(0,)),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(size, size),
                                     mask_in_chans=8),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=1, iou_head_hidden_dim=16,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=32, num_heads=2)),
    ).eval()


class Counting(SamPredictor):
    def __init__(self, sam):
        super().__init__(sam)
        self.embedded = 0
        self.calls = []

    def set_image(self, image, image_format="RGB"):
        self.embedded += 1
        return super().set_image(image, image_format)

    def predict(self, **kw):
        self.calls.append(kw)
        return super().predict(**kw)


def test_click_to_mask_to_label_map():
    picture = np.asarray(Image.open(EXAMPLE / "image.png"))          # 256 x 256 RGBA
    truth = np.asarray(Image.open(EXAMPLE / "masks.png")).astype(np.int32)
    pred = Counting(small_sam())
    clicker = SamClicker(pred)
    ys, xs = np.nonzero(truth == 2)
    mask = clicker.mask(picture, [(int(xs[0]), int(ys[0]), 1), (3, 3, 0)])
    assert mask.shape == truth.shape and mask.dtype == bool
    assert pred.embedded == 1 and pred.features.shape == (1, 32, 4, 4)
    np.testing.assert_array_equal(pred.calls[0]["point_coords"], [[xs[0], ys[0]], [3, 3]])  # the picture's pixels
    np.testing.assert_array_equal(pred.calls[0]["point_labels"], [1, 0])
    assert pred.calls[0]["multimask_output"] is True
    box = clicker.mask(picture, box=[10, 20, 120, 200])
    assert box.shape == truth.shape and pred.embedded == 1  # the same picture: embedded once
    assert pred.calls[1]["multimask_output"] is False
    clicker.mask(picture[::-1].copy(), [(5, 5, 1)])
    assert pred.embedded == 2                                   # another picture: embedded again

    forced = np.zeros_like(mask)
    forced[:40, :40] = True
    for m in (mask, forced):
        labels = add_instance(truth, m)
        if not m.any():
            assert np.array_equal(labels, truth)
            continue
        assert labels.max() == 4 and np.array_equal(labels == 4, m)        # the new instance, last
        np.testing.assert_array_equal(labels[~m], truth[~m])               # the others keep the rest
    with pytest.raises(SamError, match="needs a prompt"):
        clicker.mask(picture)
    with pytest.raises(SamError, match="the mask is"):
        add_instance(truth, forced[:10])


def test_picture_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgb = picture_rgb(rgba)
    assert rgb.shape == (4, 4, 3) and tuple(rgb[0, 0]) == (10, 20, 30) and (rgb[1:] == 255).all()


def test_checkpoint_loading(tmp_path, monkeypatch):
    """load_sam goes through segment-anything's registry and torch.load of the given file only."""
    import segment_anything

    built = []

    def registry_builder(checkpoint=None):
        built.append(checkpoint)
        sam = small_sam()
        if checkpoint is not None:
            sam.load_state_dict(torch.load(checkpoint, weights_only=True))
        return sam

    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", registry_builder)
    good = tmp_path / "sam_vit_b_tiny.pth"
    ref = small_sam()
    torch.save(ref.state_dict(), good)
    pred = load_sam(good, device="cpu")
    assert isinstance(pred, SamPredictor) and built == [str(good)]
    for a, b in zip(pred.model.parameters(), ref.parameters()):
        assert torch.equal(a, b)

    assert sam_model_type("x/sam_vit_h_4b8939.pth") == "vit_h" and sam_model_type("any.pth", "vit_l") == "vit_l"
    with pytest.raises(SamError, match="pass --sam-model"):
        sam_model_type("weights.pth")
    with pytest.raises(SamError, match="choose one of"):
        sam_model_type("weights.pth", "vit_x")
    with pytest.raises(SamError, match="no such file"):
        load_sam(tmp_path / "missing_vit_b.pth")
    bad = tmp_path / "broken_vit_b.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SamError) as e:
        load_sam(bad)
    assert "cannot load it as SAM vit_b" in str(e.value) and "\n" not in str(e.value)


def test_page_has_the_sam_tab_only_with_a_checkpoint(tmp_path):
    pytest.importorskip("gradio")
    from timi.webapp.run import AppConfig
    from timi.webapp.ui import build_app

    def tab_visible(demo):
        return [b.visible for b in demo.blocks.values() if type(b).__name__ == "Tab" and b.label == "SAM"]

    with_sam = build_app(AppConfig(model="unused", workdir=tmp_path, sam=SamClicker(SamPredictor(small_sam()))))
    without = build_app(AppConfig(model="unused", workdir=tmp_path))
    assert tab_visible(with_sam) == [True] and tab_visible(without) == [False]
    assert any(getattr(b, "elem_id", None) == "sam-add" for b in with_sam.blocks.values())

"""The Hunyuan3D-2 family in TIMIPipeline: guidance-distilled (fast, turbo), turbo's consistency
scheduler and 2mini's 8 double-stream blocks, on tiny models built from hy3dgen's own classes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from timi_torch import TIMIConfig, TIMIPipeline
from torch_helpers import scene, variant_base, variant_dir, variant_root  # noqa: F401  (fixtures)

STEPS = 5
SINGLE_VIEW = ["hunyuan3d-dit-v2-0-fast", "hunyuan3d-dit-v2-0-turbo", "hunyuan3d-dit-v2-mini",
               "hunyuan3d-dit-v2-mini-turbo"]


def _call(pipe, seed=3, steps=STEPS, **kw):
    img, masks = scene(alpha=True)
    return pipe(img, masks, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="latent", enable_pbar=False, **kw)


@pytest.mark.parametrize("variant", SINGLE_VIEW)
def test_guidance_off_equals_hy3dgen_and_guidance_changes_the_run(variant, variant_base):
    base = variant_base(variant)
    img, _ = scene(alpha=True)
    expected = base(Image.fromarray(img), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
                    output_type="latent", enable_pbar=False)
    for off in (TIMIConfig(isg=False), TIMIConfig(guided_steps=0)):
        assert torch.equal(_call(TIMIPipeline(base, off)).latents, expected)
    cfg = TIMIConfig(guided_layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # guided_layers fits every variant here: no warning
        a, b = _call(TIMIPipeline(base, cfg)), _call(TIMIPipeline(base, cfg))
    assert torch.equal(a.latents, b.latents) and a.diagnostics == b.diagnostics
    assert not torch.equal(a.latents, expected)
    assert [d.step for d in a.diagnostics] == [0, 1]  # 5 steps: those starting below sigma 0.3


def test_guidance_distilled_dit_runs_one_branch_with_hy3dgens_guidance_tensor(variant_base):
    """fast: no CFG batch in the sampling forward nor in the guidance pass, and the guidance scale
    reaches the guidance pass (it enters the DiT's conditioning vector)."""
    base = variant_base("hunyuan3d-dit-v2-0-fast")
    assert base.model.guidance_embed is True
    seen = []
    hook = base.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0].shape[0], kwargs.get("guidance"))), with_kwargs=True)
    try:
        out = _call(TIMIPipeline(base, TIMIConfig(guided_layers=2)), guidance_scale=4.0)
    finally:
        hook.remove()
    assert len(seen) == STEPS + 2                                  # 5 sampling forwards + 2 guidance passes
    for batch, guidance in seen:
        assert batch == 1 and guidance.dtype == base.dtype and guidance.tolist() == [4.0]
    other = _call(TIMIPipeline(base, TIMIConfig(guided_layers=2)), guidance_scale=2.0)
    assert other.diagnostics[0].loss != out.diagnostics[0].loss


def test_turbo_keeps_the_consistency_schedulers_steps_and_guides_only_early_steps(variant_base):
    from hy3dgen.shapegen.schedulers import ConsistencyFlowMatchEulerDiscreteScheduler

    base = variant_base("hunyuan3d-dit-v2-0-turbo")
    assert isinstance(base.scheduler, ConsistencyFlowMatchEulerDiscreteScheduler)
    pipe = TIMIPipeline(base, TIMIConfig(guided_layers=2))
    outputs = []
    out = _call(pipe, callback=lambda i, t, o: outputs.append((float(t), o)))
    times = [t / 1000 for t, _ in outputs]
    np.testing.assert_allclose(times, [0, 0.2, 0.4, 0.6, 0.8], atol=0.002)   # the PCM grid's 5 points
    assert all(hasattr(o, "pred_original_sample") for _, o in outputs)      # the scheduler's own step
    assert [d.step for d in out.diagnostics] == [0, 1] and all(d.timestep < 0.3 for d in out.diagnostics)
    # the last step goes to sigma 1 (dt > 0), unlike the flow-matching scheduler's dt = 0
    assert base.scheduler.sigmas_[-1] == 1 and base.scheduler.sigmas_[-2] < 0.81
    assert pipe.num_guided_steps(5) == 2 and pipe.num_guided_steps(10) == 4  # 10 steps: 0, .1, .2, .2993


def test_guided_window_on_hy3dgens_schedulers(variant_base):
    """The paper's 15 of 50 steps, 9 of 30 at hy3dgen's app's Standard setting, 3 of Fast's 10."""
    pipe = TIMIPipeline(variant_base("hunyuan3d-dit-v2-0-fast"))
    assert [pipe.num_guided_steps(n) for n in (50, 30, 10, 5)] == [15, 9, 3, 2]
    assert pipe.num_guided_steps(30, TIMIConfig(guided_steps=15)) == 15


def test_mini_guides_the_first_4_of_its_8_double_blocks(variant_base):
    base = variant_base("hunyuan3d-dit-v2-mini")
    assert len(base.model.double_blocks) == 8
    calls = []
    hooks = [blk.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, blk in enumerate(base.model.double_blocks)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            TIMIPipeline(base).guide(*_guide_inputs(base))
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0, 1, 2]           # the forward stops inside block 3 (the 4th), after its P


def _guide_inputs(base):
    img, masks = scene(alpha=True)
    pipe = TIMIPipeline(base)
    cm = pipe.condition_masks(img, masks)
    cond = base.conditioner(base.prepare_image(cm.image)["image"])["main"]
    z = base.prepare_latents(1, torch.float32, "cpu", torch.Generator().manual_seed(0))
    return z, torch.zeros(1), cond, cm.tokens[None]


# ----------------------------------------------------------------------------- multi-view (2mv)

def _mv_call(pipe, images, masks, seed=3, **kw):
    return pipe(images, masks, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
                output_type="latent", enable_pbar=False, **kw)


@pytest.mark.parametrize("variant", ["hunyuan3d-dit-v2-mv", "hunyuan3d-dit-v2-mv-turbo"])
def test_multiview_guidance_off_equals_hy3dgen_and_guided_runs_differ(variant, variant_base):
    from torch_helpers import views_scene

    base = variant_base(variant)
    images, masks = views_scene(("left", "front"))            # hy3dgen sorts the views: front, left
    expected = base({v: Image.fromarray(im) for v, im in images.items()}, num_inference_steps=STEPS,
                    generator=torch.Generator().manual_seed(3), output_type="latent", enable_pbar=False)
    assert torch.equal(_mv_call(TIMIPipeline(base, TIMIConfig(isg=False)), images, masks).latents, expected)
    a = _mv_call(TIMIPipeline(base, TIMIConfig(guided_layers=2)), images, masks)
    b = _mv_call(TIMIPipeline(base, TIMIConfig(guided_layers=2)), images, masks)
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, expected)
    assert [d.step for d in a.diagnostics] == [0, 1]


def test_multiview_masks_follow_each_views_image_processing(variant_base):
    """Per view: the masks' frame is hy3dgen's processed view image (MVImageProcessorV2 + the
    encoder's resize/crop) and the tokens are the single-view mapping of that view; the mask matrix
    holds the views side by side in hy3dgen's order, each CLS column 0."""
    from timi_torch import condition_token_masks
    from timi_torch.masks import _resize_crop
    from torch_helpers import views_scene

    base, single = variant_base("hunyuan3d-dit-v2-mv"), variant_base("hunyuan3d-dit-v2-0-fast")
    images, masks = views_scene(("left", "front"))
    cm = condition_token_masks(images, masks, base)
    assert list(cm.views) == ["front", "left"] and cm.num_instances == 2
    processed = base.prepare_image(cm.image)                      # hy3dgen's own processing of the dict
    assert list(processed["view_idxs"][0]) == [0, 1]
    geo = _resize_crop(base.conditioner.main_image_encoder)
    n = cm.views["front"].tokens.shape[1]
    assert cm.tokens.shape == (2, 2 * n)
    for v_index, view in enumerate(["front", "left"]):
        frame = geo(((processed["image"][0, v_index] + 1) / 2).float())
        expected = (frame.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(cm.views[view].frame_image, expected)
        block = cm.tokens[:, v_index * n:(v_index + 1) * n]
        assert torch.equal(block, cm.views[view].tokens) and not block[:, 0].any()      # CLS: 0
        shown = [k for k in range(2) if masks[view][k].any()]
        alone = condition_token_masks(images[view], masks[view][shown], single)        # the single-view mapping
        assert torch.equal(block[shown], alone.tokens)
    assert not cm.tokens[1, n:].any() and cm.tokens[1, :n].any()   # the blue object is hidden in 'left'


def test_multiview_instances_match_by_label_and_bad_inputs_are_named(variant_base):
    from timi_torch import condition_token_masks
    from torch_helpers import views_scene

    base = variant_base("hunyuan3d-dit-v2-mv")
    images, masks = views_scene(("front", "left"))
    labels = {"front": masks["front"][0] * 3 + masks["front"][1] * 7, "left": masks["left"][0].astype(np.int64) * 3}
    by_label = condition_token_masks(images, labels, base)
    assert by_label.names == ("label_3", "label_7")
    assert torch.equal(by_label.tokens, condition_token_masks(images, masks, base).tokens)
    img = images["front"]
    cases = [
        (img, masks["front"], "multi-view.*pass the image as a \\{view: image\\} dict"),
        ({"top": img}, {"top": masks["front"]}, "unknown view.*'top'.*front, left, back, right"),
        (images, {"front": masks["front"]}, "masks must be a \\{view: masks\\} dict with the image's views"),
        (images, {"front": masks["front"] * [[[1]], [[0]]], "left": masks["left"] * [[[1]], [[0]]]},
         "instance 1 \\(instance_1\\) is shown by no view"),
        (images, {"front": masks["front"], "left": masks["left"][:, :50]}, "view 'left'.*mask size"),
    ]
    for im, ms, match in cases:
        with pytest.raises(ValueError, match=match):
            condition_token_masks(im, ms, base)
    with pytest.raises(ValueError, match="needs a multi-view model"):
        condition_token_masks(images, masks, variant_base("hunyuan3d-dit-v2-0-fast"))

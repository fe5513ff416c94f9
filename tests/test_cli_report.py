"""The report's attention recorder reads the right tensors: its Eq.2 ``P`` equals the adapter's fused
``P`` (timi_torch.guidance) on the same latent, step and layers, and its image maps are Eq.3's
weights applied to the head-averaged attention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import hy3dgen.shapegen  # noqa: F401

EXAMPLE = Path(__file__).resolve().parents[1] / "timi" / "assets" / "example"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from timi_core import TIMIConfig
    from timi_torch import TIMIPipeline, write_tiny_model_dir

    d = write_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny", image_size=112)
    return TIMIPipeline.from_pretrained(str(d), TIMIConfig(isg=False, guided_layers=2), device="cpu")


def test_recorder_probability_matches_the_adapter(pipe):
    from PIL import Image

    from timi.report import AttentionRecorder
    from timi_torch.guidance import guided_probabilities

    if not (EXAMPLE / "masks.png").exists():
        pytest.skip("example scene not present")
    labels = np.asarray(Image.open(EXAMPLE / "masks.png"))
    masks = np.stack([labels == k for k in (1, 2, 3)])
    image = str(EXAMPLE / "image.png")
    from hy3dgen.shapegen.models.denoisers import hunyuan3ddit

    cond = pipe.condition_masks(image, masks)
    rec = AttentionRecorder(cond.tokens, layers=2, steps=1)
    attention, forward = hunyuan3ddit.attention, pipe.base.model.forward
    out = pipe(image, masks, num_inference_steps=2, generator=torch.manual_seed(0), output_type="latent",
               enable_pbar=False, recorder=rec)
    assert [(r.step, r.layer) for r in rec.records] == [(0, 0), (0, 1)]
    assert out.recordings == rec.records
    assert hunyuan3ddit.attention is attention and pipe.base.model.forward == forward  # nothing left replaced
    assert "forward" not in vars(pipe.base.model) and "guide" not in vars(pipe)      # nothing replaced at all

    base = pipe.base
    z0 = base.prepare_latents(1, base.dtype, base.device, torch.manual_seed(0))   # step 0's latent
    inputs = base.prepare_image([cond.image])
    img = inputs.pop("image")
    with torch.no_grad():
        c = base.encode_cond(image=img, additional_cond_inputs=inputs, do_classifier_free_guidance=False,
                             dual_guidance=False)["main"]
        ref = guided_probabilities(base.model, z0, torch.zeros(1), c, cond.tokens[None], 2, mode="fused")
    for r, P in zip(rec.records, ref):
        np.testing.assert_allclose(r.probability, P[0].numpy(), rtol=1e-4, atol=1e-6)
        # R = W^T A_zc with W = P / sum_v P (Eq.3): the masked mass of R_k equals sum_v W_vk P_v.
        W = r.probability / (r.probability.sum(0, keepdims=True) + 1e-6)
        tokens = cond.tokens.numpy()
        lhs = r.maps @ tokens.T                       # (K, K): sum_j R_kj M_k'j
        rhs = W.T @ r.probability                     # sum_v W_vk P_vk'
        np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-7)
        assert np.all((r.purity >= 0) & (r.purity <= 1))

"""timi_jax on the Hunyuan3D-2 family: turbo's consistency schedule, guidance-distilled DiTs,
2mini's preset and multi-view conditions, against hy3dgen and timi_torch on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("jax")

import timi_jax  # noqa: E402
from timi_torch import TIMIConfig, TIMIPipeline  # noqa: E402
from torch_helpers import scene, variant_base, variant_dir, variant_root, views_scene  # noqa: E402,F401

STEPS = 5


@pytest.mark.parametrize("steps", [1, 5, 8, 10])
def test_consistency_schedule_is_hy3dgens(steps):
    from hy3dgen.shapegen.schedulers import ConsistencyFlowMatchEulerDiscreteScheduler

    sched = ConsistencyFlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, pcm_timesteps=100)
    sched.set_timesteps(sigmas=np.linspace(0, 1, steps))          # as hy3dgen's pipeline calls it
    timesteps, sigmas = timi_jax.consistency_schedule(steps, pcm_timesteps=100)
    np.testing.assert_array_equal(timesteps, sched.timesteps.numpy())
    np.testing.assert_array_equal(sigmas, sched.sigmas_.numpy())


def test_mini_preset_has_hy3dgens_parameter_count():
    from flax import nnx
    from hy3dgen.shapegen.models import Hunyuan3DDiT

    cfg = timi_jax.PRESETS["mini"]
    with torch.device("meta"):
        ref = sum(p.numel() for p in Hunyuan3DDiT(depth=8, depth_single_blocks=16).parameters())
    model = nnx.eval_shape(lambda: timi_jax.Hunyuan3DDiT(cfg))
    count = sum(int(np.prod(x.shape)) for x in __import__("jax").tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    assert (cfg.depth, cfg.depth_single_blocks) == (8, 16) and count == ref == 559_196_224


def _inputs(variant):
    if "mv" in variant:
        return views_scene(("left", "front"))
    return scene(alpha=True)


@pytest.mark.parametrize("variant", ["hunyuan3d-dit-v2-0-turbo", "hunyuan3d-dit-v2-mini-fast",
                                     "hunyuan3d-dit-v2-mv-turbo"])
def test_jax_pipeline_matches_torch_on_each_variant(variant, variant_base):
    base = variant_base(variant)
    image, masks = _inputs(variant)
    cfg = TIMIConfig(guided_layers=2)
    kw = dict(num_inference_steps=STEPS, output_type="latent", enable_pbar=False)
    ref = TIMIPipeline(base, cfg)(image, masks, generator=torch.Generator().manual_seed(3), **kw)
    jax_pipe = timi_jax.TIMIPipelineJAX(base, cfg)
    got = jax_pipe(image, masks, generator=torch.Generator().manual_seed(3), **kw)
    np.testing.assert_allclose(got.latents.numpy(), ref.latents.numpy(), atol=2e-5)
    assert [d.step for d in got.diagnostics] == [d.step for d in ref.diagnostics] == [0, 1]
    np.testing.assert_allclose([d.timestep for d in got.diagnostics], [d.timestep for d in ref.diagnostics], atol=1e-6)
    np.testing.assert_allclose([d.loss[0] for d in got.diagnostics], [d.loss[0] for d in ref.diagnostics], rtol=1e-5)
    assert jax_pipe.num_guided_steps(STEPS) == 2
    plain = jax_pipe(image, masks, generator=torch.Generator().manual_seed(3), config=cfg.replace(isg=False), **kw)
    expected = TIMIPipeline(base, cfg.replace(isg=False))(image, masks, generator=torch.Generator().manual_seed(3), **kw)
    np.testing.assert_allclose(plain.latents.numpy(), expected.latents.numpy(), atol=2e-5)
    assert not np.allclose(plain.latents.numpy(), got.latents.numpy(), atol=1e-4)

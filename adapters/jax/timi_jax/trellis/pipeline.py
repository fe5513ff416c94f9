"""``TrellisPipelineJAX``: ``timi_torch.trellis.TrellisPipeline`` with its sampling stage in JAX.

The image conditioner, the masks on the condition tokens and the decoder stay the torch pipeline's
(the shared front and back ends); stage 3 runs :func:`timi_jax.trellis.sample` (jitted, TIMI with
Eq.5 as a 3-D Gaussian over D, H, W) on a Flax copy of the same flow weights
(:func:`timi_jax.trellis.from_torch`). The noise is drawn by torch from the call's ``generator``, so
both backends start from the same latent.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from timi_torch.trellis.pipeline import TrellisPipeline

from ..pipeline import step_diagnostics
from .params import from_torch
from .sampler import sample

__all__ = ["TrellisPipelineJAX"]


class TrellisPipelineJAX(TrellisPipeline):
    """A :class:`~timi_torch.trellis.pipeline.TrellisPipeline` (``pipe``) whose denoising runs in JAX."""

    backend = "jax"

    def __init__(self, pipe: TrellisPipeline):
        self.__dict__.update(copy.copy(pipe.__dict__))
        self.jax_model = from_torch(pipe.model)

    def _sample(self, noise, inputs, config, settings, callback, callback_steps, enable_pbar, recorder):
        if self.gradient_hook is not None:
            raise ValueError("gradient hooks (controls) run on the torch backend only; use --backend torch.")
        out = sample(self.jax_model, noise.cpu().numpy(), inputs.cond_main.float().cpu().numpy(),
                     inputs.uncond_main.float().cpu().numpy(), tokens=inputs.tokens.cpu().numpy(), config=config,
                     settings=settings)
        latents = torch.from_numpy(np.array(out.latents)).to(self.device)
        diagnostics = step_diagnostics(dataclasses.replace(out, times=1.0 - np.asarray(out.times)))
        if callback is not None:            # the compiled program runs all steps at once
            callback(settings.steps - 1, 0.0, latents)
        return latents, diagnostics, None

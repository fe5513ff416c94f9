"""The JAX side: ``timi_jax.sample`` (one jitted ``lax.scan`` program) on the *same* random weights,
noise, condition tokens and masks as the PyTorch :class:`~timi.bench.torch_backend.BenchModel`."""

from __future__ import annotations

import numpy as np

from timi_core import TIMIConfig

from .torch_backend import BenchModel

__all__ = ["JaxSampler", "jax_available"]


def jax_available() -> str | None:
    """None when ``timi_jax.sample`` can be imported, else the reason it cannot."""
    try:
        import timi_jax
    except Exception as e:  # pragma: no cover - environment dependent
        return f"JAX sampler not available: import timi_jax failed ({type(e).__name__}: {e})"
    if not hasattr(timi_jax, "sample"):  # pragma: no cover
        return "JAX sampler not available: timi_jax has no `sample` function"
    return None


class JaxSampler:
    """Plain / TIMI sampling with ``timi_jax.sample``'s program, compiled ahead of time and timed
    apart (``compile``, as :func:`timi_jax.bench.time_sampler`); ``run(guided)`` blocks until the
    latents exist."""

    def __init__(self, bench: BenchModel):
        import jax
        import jax.numpy as jnp
        import timi_jax

        why = jax_available()
        if why:
            raise RuntimeError(why)
        cfg = bench.cfg
        self.cfg = cfg
        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[cfg.dtype]
        self.model = timi_jax.from_torch(bench.model, dtype=dtype)
        B = cfg.batch_size
        self.noise = jnp.asarray(bench.noise().float().cpu().numpy())
        self.cond = jnp.asarray(np.broadcast_to(bench.cond.float().cpu().numpy(), (B, *bench.cond.shape[1:])))
        self.tokens = jnp.asarray(np.broadcast_to(bench.tokens.cpu().numpy(), (B, *bench.tokens.shape)))
        timi_cfg = TIMIConfig(guided_layers=cfg.guided_layers, guided_steps=cfg.guided_steps)
        self.configs = {True: timi_cfg, False: timi_cfg.replace(isg=False)}
        self.device = str(jax.devices()[0])
        self.compile_s: dict[bool, float] = {}
        self._runs = {}

    def compile(self, guided: bool) -> float:
        """Compile the plain or guided program ahead of time (once); its compile seconds."""
        from timi_jax.bench import compile_sampler

        if guided not in self._runs:
            self._runs[guided], self.compile_s[guided] = compile_sampler(
                self.model, self.noise, self.cond, None, self.tokens if guided else None,
                num_inference_steps=self.cfg.steps, guidance_scale=self.cfg.guidance_scale,
                config=self.configs[guided])
        return self.compile_s[guided]

    def run(self, guided: bool):
        """One whole sampling run on the compiled program; blocks until the latents exist."""
        self.compile(guided)
        return self._runs[guided]()

    def step_times(self, repeats: int = 10) -> dict:
        """Medians of one compiled guidance pass (``timi_jax.separation_loss_and_grad``: Eqs.2-4,
        forward + backward, conditional branch) and one compiled CFG forward (batch 2), interleaved.

        The whole sampler is one XLA program, so the time inside its guidance cannot be read off a
        run as PyTorch's can; these two separately compiled pieces are what a TIMI run adds and what
        each of its steps costs, timed with far less noise than two whole-run medians."""
        import jax
        import jax.numpy as jnp
        import timi_jax
        from flax import nnx

        from .timing import interleaved

        graphdef, state = nnx.split(self.model)
        config = self.configs[True]
        dtype = self.model.dtype
        t = jnp.full((self.noise.shape[0],), 0.5, dtype)
        guide = jax.jit(lambda s, z, t, c, tok: timi_jax.separation_loss_and_grad(
            nnx.merge(graphdef, s), z, t, c, tok, config))
        forward = jax.jit(lambda s, z, t, c: nnx.merge(graphdef, s)(z, t, c))
        z2 = jnp.concatenate([self.noise, self.noise]).astype(dtype)
        c2 = jnp.concatenate([self.cond, jnp.zeros_like(self.cond)]).astype(dtype)
        t2 = jnp.concatenate([t, t])
        res = interleaved({
            "guide": lambda: jax.block_until_ready(guide(state, self.noise, t, self.cond, self.tokens)),
            "step": lambda: forward(state, z2, t2, c2).block_until_ready()}, repeats=repeats, warmup=1)
        return {"guide_s": res["guide"]["median_s"], "step_s": res["step"]["median_s"]}

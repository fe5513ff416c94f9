"""Data-parallel sampling: a batch of scenes sharded over 4 (virtual CPU) devices equals the
unsharded run. Runs in a subprocess because the device count is fixed when JAX starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from timi_jax.testing import random_model
    import timi_jax
    from timi_core import TIMIConfig

    assert len(jax.devices()) == 4, jax.devices()
    cfg = dict(in_channels=4, context_in_dim=6, hidden_size=12, mlp_ratio=2.0, num_heads=3,
               depth=2, depth_single_blocks=1, axes_dim=[4])
    model = random_model(seed=0, **cfg)
    rng = np.random.default_rng(1)
    B, L, M, K = 8, 10, 7, 2
    noise = jnp.asarray(rng.standard_normal((B, L, 4)), jnp.float32)
    cond = jnp.asarray(rng.standard_normal((B, M, 6)), jnp.float32)
    labels = rng.integers(0, K, size=(B, M))       # each scene: its own token -> instance map
    tokens = jnp.asarray(np.eye(K)[labels].transpose(0, 2, 1), jnp.float32)  # (B, K, M)
    config = TIMIConfig(guided_layers=2, guided_steps=2)
    kw = dict(num_inference_steps=4, guidance_scale=4.0, config=config)
    plain = timi_jax.sample(model, noise, cond, None, tokens, **kw)
    mesh = timi_jax.data_parallel_mesh()
    sharded = timi_jax.sample(model, noise, cond, None, tokens, mesh=mesh, **kw)
    diff = float(jnp.max(jnp.abs(sharded.latents - plain.latents)))
    loss_diff = float(jnp.max(jnp.abs(sharded.losses - plain.losses)))
    print(json.dumps(dict(
        devices=len(sharded.latents.sharding.device_set),
        spec=str(sharded.latents.sharding.spec),
        diff=diff, loss_diff=loss_diff,
        scale=float(jnp.max(jnp.abs(plain.latents))),
        guided=bool(np.all(np.asarray(plain.losses[:2]) > 0)))))
    try:
        timi_jax.sample(model, noise[:6], cond[:6], None, tokens[:6], mesh=mesh, **kw)
    except ValueError as e:
        print("ERROR", e)
""")


def test_sharded_batch_equals_unsharded(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[0])
    assert result["devices"] == 4 and "data" in result["spec"]
    assert result["guided"]
    assert result["diff"] <= 1e-5 * result["scale"], result
    assert result["loss_diff"] <= 1e-5, result
    assert lines[1].startswith("ERROR batch 6 is not a multiple of the 4 devices")

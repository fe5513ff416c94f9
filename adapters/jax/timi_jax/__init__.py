"""TIMI for JAX: a Flax Hunyuan3D-DiT that loads hy3dgen weights, with a jitted TIMI sampler."""

"""Benchmark model/sampler shapes (:class:`BenchConfig`) and their presets.

The default is the Hunyuan3D 2.0 DiT *architecture* at full depth (16 double + 32 single blocks,
head dim 64) at a CPU-friendly width (hidden 128, 2 heads) with L=512 latent and M=257 condition
tokens (a 16x16 patch grid plus one CLS token), 20 steps of which 6 are guided (the paper's 30%),
guidance on the first 4 double blocks, CFG batch 2 as hy3dgen does (``guidance_embed=True``: a
guidance-distilled DiT, the fast / turbo models, one branch per step). ``full_size()`` is the real
model (hidden 1024, 16 heads, 64 latent channels, condition width 1536, L=3072, M=1370, 50 steps
with 15 guided).
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["BenchConfig", "default_config", "full_size_config", "tiny_config", "guidance_pass_config",
           "hunyuan21_config", "ARCHITECTURES"]

ARCHITECTURES = ("2.0", "2.1", "2.1-tiny")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Shapes of one benchmark run; every field ends up in the JSON under ``config``."""

    hidden_size: int = 128
    num_heads: int = 2
    depth: int = 16                  # double-stream blocks
    depth_single_blocks: int = 32
    latent_channels: int = 64
    context_dim: int = 1536          # condition token width (DINOv2-giant)
    num_latents: int = 512           # L
    num_cond_tokens: int = 257       # M = 1 CLS + gh*gw patches
    steps: int = 20
    guided_steps: int = 6
    guided_layers: int = 4
    num_instances: int = 3           # K
    guidance_scale: float = 5.0      # CFG (batch 2), or the guidance embedding's scale (distilled)
    guidance_embed: bool = False     # a guidance-distilled DiT (fast / turbo): one branch, no CFG pair
    batch_size: int = 1              # images per call (the CFG batch is twice this)
    dtype: str = "float32"
    seed: int = 0
    architecture: str = "2.0"        # "2.0": hy3dgen's Hunyuan3DDiT; "2.1" / "2.1-tiny": HunYuanDiTPlain with that
                                     # preset's MoE and norm options (blocks = depth, no single blocks)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}.")
        if not 1 <= self.guided_layers <= self.depth:
            raise ValueError(f"guided_layers={self.guided_layers} must be in [1, depth={self.depth}].")
        if not 0 <= self.guided_steps <= self.steps:
            raise ValueError(f"guided_steps={self.guided_steps} must be in [0, steps={self.steps}].")
        if self.num_instances < 1:
            raise ValueError(f"num_instances={self.num_instances} must be >= 1.")
        grid = self.patch_grid  # validates M
        if self.num_instances > grid[1]:
            raise ValueError(f"num_instances={self.num_instances} exceeds the {grid[1]} patch columns "
                             "(the benchmark masks are vertical stripes, one per instance).")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r} must be one of {ARCHITECTURES}.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r} must be float32, bfloat16 or float16.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(gh, gw) with gh*gw = M - 1 (one CLS token), square as DINOv2's."""
        g = math.isqrt(self.num_cond_tokens - 1)
        if g < 1 or g * g != self.num_cond_tokens - 1:
            raise ValueError(f"num_cond_tokens={self.num_cond_tokens} must be 1 + g*g (CLS + a square patch "
                             "grid), e.g. 257 (16x16) or 1370 (37x37).")
        return g, g

    def replace(self, **kw) -> "BenchConfig":
        return dataclasses.replace(self, **kw)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_config() -> BenchConfig:
    return BenchConfig()


def full_size_config() -> BenchConfig:
    """Real Hunyuan3D 2.0 shapes and the paper's schedule (50 steps, 15 guided) in float16, as the
    paper's timings; for a GPU (on a CPU pass ``--dtype float32``)."""
    return BenchConfig(hidden_size=1024, num_heads=16, num_latents=3072, num_cond_tokens=1370,
                       steps=50, guided_steps=15, dtype="float16")


def tiny_config() -> BenchConfig:
    """A seconds-long smoke configuration (CI)."""
    return BenchConfig(hidden_size=32, num_heads=2, depth=2, depth_single_blocks=1, latent_channels=8,
                       context_dim=16, num_latents=32, num_cond_tokens=17, steps=3, guided_steps=1,
                       guided_layers=2, num_instances=2)


def hunyuan21_config(preset: str) -> BenchConfig:
    """Hunyuan3D 2.1's DiT (``timi_torch.hunyuan21.PRESETS[preset]``): ``"2.1"`` the released shapes
    (21 blocks, hidden 2048, L=4096, M=1370, 50 steps / 15 guided, float16; a GPU), ``"2.1-tiny"``
    the tiny preset (5 blocks, hidden 64, L=64, M=65; 20 steps / 6 guided)."""
    from timi_torch.hunyuan21 import PRESETS

    p = PRESETS[preset]
    common = dict(architecture=preset, hidden_size=p.hidden_size, num_heads=p.num_heads, depth=p.depth,
                  depth_single_blocks=0, latent_channels=p.in_channels, context_dim=p.context_dim,
                  num_latents=p.input_size, num_cond_tokens=p.text_len)
    if preset == "2.1":
        return BenchConfig(**common, steps=50, guided_steps=15, dtype="float16")
    return BenchConfig(**common)


def guidance_pass_config() -> BenchConfig:
    """Real shapes for one guidance pass: only the first 4 double blocks exist (Eqs.2-4 need no more)."""
    return BenchConfig(hidden_size=1024, num_heads=16, depth=4, depth_single_blocks=0, num_latents=3072,
                       num_cond_tokens=1370, guided_layers=4, steps=1, guided_steps=1)

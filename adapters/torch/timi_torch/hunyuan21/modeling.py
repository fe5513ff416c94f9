"""Hunyuan3D 2.1's shape DiT (``hy3dshape``'s ``HunYuanDiTPlain``), written for TIMI.

Same constructor keywords, ``forward(x, t, contexts)`` and state-dict keys as upstream
(Tencent-Hunyuan/Hunyuan3D-2.1, ``hy3dshape/models/denoisers/hunyuandit.py`` and ``moe_layers.py``),
so a 2.1 checkpoint's ``model`` section loads strictly; the numbers match upstream's in float32
(``tests/test_hunyuan21_model.py``, against a fixture made from the upstream source). The network:

* ``x_embedder`` lifts the (B, L, C) latent tokens; the timestep embedding is prepended to them as
  one extra token (the *time token*, sequence position 0) and dropped by the final layer;
* each of ``depth`` blocks: self-attention over [time; latent] tokens (``attn1``), then
  cross-attention from those tokens to the condition tokens ``contexts["main"]`` (``attn2``, the
  attention TIMI reads: Eq.1's ``A_zc`` is its softmax, normalised over the condition tokens
  alone), then an MLP; QK RMSNorm (eps 1e-6) per head; LayerNorms with affine weights (eps 1e-6);
* U-Net long skips: block ``i > depth // 2`` starts with ``skip_norm(skip_linear([skip, x]))``,
  the skip being the output of block ``depth - 1 - i``;
* the last ``num_moe_layers`` blocks replace the MLP by a mixture of experts (softmax gate, top-k
  experts weighted by their un-renormalised gate scores, plus one shared expert).

Two numerical details of upstream are kept because the weights were trained with them: the
projections of a head are interleaved (``attn1``'s q, k, v of head ``h`` are the consecutive
slices ``3h, 3h+1, 3h+2`` of ``[to_q(x), to_k(x), to_v(x)]`` cut into head-width pieces;
``attn2``'s k, v those of ``[to_k(y), to_v(y)]``), and the timestep frequencies have
``hidden_size`` channels (max period 10000, sin before cos) with ``t`` in [0, 1] as the pipeline
passes it.

The cross-attention calls the module function :func:`attention`; ``timi_torch.guidance`` routes
that function to read Eq.2's ``P`` during a guidance pass (as it does hy3dgen 2.0's ``attention``).
:class:`DiT21Config` holds the configuration (presets :data:`PRESETS`); loading weights is
:mod:`timi_torch.hunyuan21.params`' business, this module does not import it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DiT21Config", "PRESETS", "HunYuanDiTPlain", "attention"]

_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class DiT21Config:
    """``HunYuanDiTPlain``'s keywords (upstream's names). Defaults: the released
    ``hunyuan3d-dit-v2-1`` config (preset ``"2.1"``), not upstream's constructor defaults."""

    input_size: int = 4096
    in_channels: int = 64
    hidden_size: int = 2048
    context_dim: int = 1024
    depth: int = 21
    num_heads: int = 16
    mlp_ratio: float = 4.0          # accepted, unused: upstream's MLPs are always 4x wide
    norm_type: str = "layer"
    qk_norm_type: str = "rms"
    qk_norm: bool = True
    text_len: int = 1370
    with_decoupled_ca: bool = False
    use_pos_emb: bool = False
    use_attention_pooling: bool = False
    guidance_cond_proj_dim: int | None = None
    qkv_bias: bool = False
    num_moe_layers: int = 6
    num_experts: int = 8
    moe_top_k: int = 2

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}.")
        head = self.hidden_size // self.num_heads
        if head % 8 or head > 128:
            raise ValueError(f"head dim {head} must be a multiple of 8 and at most 128 (as upstream asserts).")
        if self.norm_type not in ("layer", "rms") or self.qk_norm_type not in ("layer", "rms"):
            raise ValueError("norm_type and qk_norm_type must be 'layer' or 'rms'.")
        if self.with_decoupled_ca:
            raise NotImplementedError("with_decoupled_ca=True (decoupled cross-attention) is not supported; the "
                                      "released Hunyuan3D 2.1 config sets it false.")
        if self.guidance_cond_proj_dim is not None:
            raise NotImplementedError("guidance_cond_proj_dim is not supported (upstream adds a 4*hidden projection to "
                                      "a hidden-wide embedding, which cannot run); the released 2.1 config omits it.")
        if not 1 <= self.moe_top_k <= self.num_experts:
            raise ValueError(f"moe_top_k={self.moe_top_k} must be in [1, num_experts={self.num_experts}].")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "DiT21Config":
        """Upstream's keywords (a config.yaml ``model.params``); unknown ones are ignored as upstream's
        ``**kwargs`` ignores them. Upstream's constructor defaults apply to missing keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**UPSTREAM_DEFAULTS, **{k: v for k, v in kwargs.items() if k in names}})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def is_moe(self, layer: int) -> bool:
        return self.depth - layer <= self.num_moe_layers

    def has_skip(self, layer: int) -> bool:
        return layer > self.depth // 2


#: ``HunYuanDiTPlain.__init__``'s own defaults, for configs that omit a key.
UPSTREAM_DEFAULTS = dict(input_size=1024, in_channels=4, hidden_size=1024, context_dim=1024, depth=24, num_heads=16,
                         qk_norm=False, text_len=257, use_attention_pooling=True, qkv_bias=True, num_moe_layers=6,
                         num_experts=8, moe_top_k=2)

#: ``"2.1"``: the released ``hunyuan3d-dit-v2-1``; ``"2.1-tiny"``: the same options at toy sizes
#: (5 blocks: 2 skip blocks, 2 MoE blocks), for tests and benchmarks.
PRESETS = {
    "2.1": DiT21Config(),
    "2.1-tiny": DiT21Config(input_size=64, in_channels=8, hidden_size=64, context_dim=32, depth=5, num_heads=4,
                            text_len=65, num_moe_layers=2, num_experts=4, moe_top_k=2),
}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Cross-attention of the blocks: q (B, H, S, D), k, v (B, H, M, D) -> (B, S, H*D), softmax
    scale ``D**-0.5``. A module function so that TIMI's guidance can route it (Eq.2)."""
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _norm(kind: str, width: int) -> nn.Module:
    return nn.LayerNorm(width, eps=_EPS) if kind == "layer" else nn.RMSNorm(width, eps=_EPS)


class _Attention(nn.Module):
    """``attn1`` (self, ``cross=False``) or ``attn2`` (cross) with upstream's parameter names."""

    def __init__(self, dim: int, kv_dim: int, cfg: DiT21Config, cross: bool):
        super().__init__()
        self.heads, self.cross = cfg.num_heads, cross
        self.to_q = nn.Linear(dim, dim, bias=cfg.qkv_bias)
        self.to_k = nn.Linear(kv_dim, dim, bias=cfg.qkv_bias)
        self.to_v = nn.Linear(kv_dim, dim, bias=cfg.qkv_bias)
        self.q_norm = _norm(cfg.qk_norm_type, cfg.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = _norm(cfg.qk_norm_type, cfg.head_dim) if cfg.qk_norm else nn.Identity()
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor, parts: int) -> list[torch.Tensor]:
        """Head-interleaved split (module doc): (B, S, parts*H*D) -> parts x (B, H, S, D)."""
        B, S, _ = t.shape
        t = t.reshape(B, S, self.heads, parts, -1)
        return [t[..., i, :].transpose(1, 2) for i in range(parts)]

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.cross:
            (q,) = self._heads(self.to_q(x), 1)
            k, v = self._heads(torch.cat([self.to_k(y), self.to_v(y)], dim=-1), 2)
            out = attention(self.q_norm(q), self.k_norm(k), v)
        else:
            q, k, v = self._heads(torch.cat([self.to_q(x), self.to_k(x), self.to_v(x)], dim=-1), 3)
            out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
            out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.out_proj(out)


class _MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _GELUProj(nn.Module):
    def __init__(self, width: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(width, inner)

    def forward(self, x):
        return F.gelu(self.proj(x))


class _Expert(nn.Module):
    """One feed-forward expert, keyed as diffusers' ``FeedForward`` (``net.0.proj``, ``net.2``)."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.ModuleList([_GELUProj(width, 4 * width), nn.Identity(), nn.Linear(4 * width, width)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class _Gate(nn.Module):
    def __init__(self, width: int, experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, width))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))


class _MoE(nn.Module):
    """Top-k mixture of experts plus a shared expert: ``sum_{e in topk} g_e(x) E_e(x) + S(x)`` with
    ``g = softmax(x W^T)`` (not renormalised over the top k). Differentiable (upstream's inference
    path is not); each expert sees only the tokens routed to it."""

    def __init__(self, width: int, cfg: DiT21Config):
        super().__init__()
        self.top_k = cfg.moe_top_k
        self.experts = nn.ModuleList([_Expert(width) for _ in range(cfg.num_experts)])
        self.gate = _Gate(width, cfg.num_experts)
        self.shared_experts = _Expert(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        scores = F.linear(flat, self.gate.weight).softmax(dim=-1)
        weight, index = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            chosen = index == e                                       # (N, k)
            rows = chosen.any(dim=-1).nonzero().squeeze(-1)
            if rows.numel():
                w = (weight * chosen).sum(dim=-1)[rows, None]
                out = out.index_add(0, rows, expert(flat[rows]) * w)
        return out.reshape(x.shape) + self.shared_experts(x)


class _Block(nn.Module):
    def __init__(self, cfg: DiT21Config, layer: int):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = _norm(cfg.norm_type, D)
        self.attn1 = _Attention(D, D, cfg, cross=False)
        self.norm2 = _norm(cfg.norm_type, D)
        self.attn2 = _Attention(D, cfg.context_dim, cfg, cross=True)
        self.norm3 = _norm(cfg.norm_type, D)
        self.skip_linear = None
        if cfg.has_skip(layer):
            self.skip_norm = _norm(cfg.norm_type, D)
            self.skip_linear = nn.Linear(2 * D, D)
        self.use_moe = cfg.is_moe(layer)
        if self.use_moe:
            self.moe = _MoE(D, cfg)
        else:
            self.mlp = _MLP(D)

    def forward(self, x, cond, skip=None):
        if self.skip_linear is not None:
            x = self.skip_norm(self.skip_linear(torch.cat([skip, x], dim=-1)))
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), cond)
        h = self.norm3(x)
        return x + (self.moe(h) if self.use_moe else self.mlp(h))


class _TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, 1, hidden): sinusoidal frequencies (``hidden`` channels, max period 1e4)."""
        half = self.hidden // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
        if self.hidden % 2:
            emb = F.pad(emb, (0, 1))
        return self.mlp(emb.to(self.mlp[0].weight.dtype))[:, None]


class _AttentionPool(nn.Module):
    """Upstream's optional pooled condition vector (``use_attention_pooling``): one query, the mean
    token, attending over [mean; tokens] with a learned position embedding, 8 heads."""

    def __init__(self, tokens: int, width: int, out: int = 1024, heads: int = 8):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(tokens + 1, width) / width ** 0.5)
        self.k_proj, self.q_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.c_proj = nn.Linear(width, out)

    def forward(self, x):
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        B, S, C = x.shape
        split = lambda t: t.reshape(B, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q_proj(x[:, :1])), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.c_proj(out.transpose(1, 2).reshape(B, C))


def _sincos(length: int, width: int) -> torch.Tensor:
    omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2.0))
    out = np.outer(np.arange(length, dtype=np.float32).astype(np.float64), omega)
    return torch.from_numpy(np.concatenate([np.sin(out), np.cos(out)], axis=1)).float()[None]


class HunYuanDiTPlain(nn.Module):
    """Hunyuan3D 2.1's DiT: ``HunYuanDiTPlain(**config_yaml_model_params)`` or ``(config=DiT21Config)``.

    ``forward(x, t, contexts)``: ``x`` (B, L, in_channels), ``t`` (B,) in [0, 1] (the pipeline's
    ``timestep / 1000``), ``contexts["main"]`` (B, M, context_dim) -> velocity (B, L, in_channels).
    Other keywords (``guidance=``, which hy3dgen's pipeline passes) are ignored, as upstream does.
    """

    def __init__(self, config: DiT21Config | None = None, **kwargs):
        super().__init__()
        cfg = config if config is not None else DiT21Config.from_kwargs(**kwargs)
        self.config = cfg
        self.depth, self.num_heads, self.in_channels = cfg.depth, cfg.num_heads, cfg.in_channels
        self.guidance_cond_proj_dim = cfg.guidance_cond_proj_dim
        D = cfg.hidden_size
        self.x_embedder = nn.Linear(cfg.in_channels, D)
        self.t_embedder = _TimestepEmbedder(D)
        if cfg.use_pos_emb:
            self.register_buffer("pos_embed", _sincos(cfg.input_size, D))
        if cfg.use_attention_pooling:
            self.pooler = _AttentionPool(cfg.text_len, cfg.context_dim)
            self.extra_embedder = nn.Sequential(nn.Linear(1024, 4 * D), nn.SiLU(), nn.Linear(4 * D, D))
        self.blocks = nn.ModuleList([_Block(cfg, i) for i in range(cfg.depth)])
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(D, eps=_EPS)
        self.final_layer.linear = nn.Linear(D, cfg.in_channels)

    def forward(self, x, t, contexts, **kwargs):
        cond = contexts["main"]
        c = self.t_embedder(t)                                          # (B, 1, D): the time token
        x = self.x_embedder(x)
        if self.config.use_pos_emb:
            x = x + self.pos_embed.to(x.dtype)
        if self.config.use_attention_pooling:
            c = c + self.extra_embedder(self.pooler(cond))[:, None]
        x = torch.cat([c, x], dim=1)
        skips = []
        half = self.depth // 2
        for i, block in enumerate(self.blocks):
            x = block(x, cond, skips.pop() if i > half else None)
            if i < half:
                skips.append(x)
        x = self.final_layer.norm_final(x)[:, 1:]
        return self.final_layer.linear(x)

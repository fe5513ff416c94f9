"""The theoretical floor of TIMI's overhead, from FLOP counts of the Hunyuan3D-DiT config.

Counting 2 FLOPs per multiply-add and the matmuls only (norms, activations and the scheduler are
<1% here), per sample with ``S = L + M`` joint tokens, width ``h``, latent channels ``C``,
condition width ``c``:

* double-stream block: ``2*12*h^2*(L + M)`` (qkv, proj and the 4x MLP of both streams)
  ``+ 4*S^2*h`` (joint attention: ``Q K^T`` and ``A V``) ``+ 2*12*h^2`` (two 6h modulations);
* single-stream block: ``2*12*h^2*S`` (linear1 ``h -> 7h``, linear2 ``5h -> h``) ``+ 4*S^2*h + 2*3*h^2``;
* embeddings: ``2*(L*C*h + M*c*h + 256*h + h^2)``; final layer ``2*(L*h*C + 2*h^2)``.

Plain sampling costs ``T`` steps of ``n`` branches of a full forward ``F_full`` (``n = 2``, the CFG
pair; ``n = 1`` for a guidance-distilled DiT, fast / turbo, which hy3dgen runs without CFG). TIMI
adds, on ``t`` of the ``T`` steps, one forward + backward through the embeddings and the first ``l``
double blocks on one branch (``F_guide``); with the usual "backward = 2 x forward" rule

    floor = 1 + (t / T) * (1 + 2) * F_guide / (n * F_full)

(so the relative overhead of a distilled model is twice that of its CFG parent at equal shapes)
(issue 7's "about 4%" for l=4 of 48 blocks, t=15 of 50 steps). Only input gradients are needed
(the weights are frozen), for which backward ~ 1 x forward on the linear layers: ``floor_input_grad``
uses ``1 + 1`` instead of ``1 + 2``, a lower bound.

``floor_as_implemented`` counts what ``timi_torch``'s fused guidance pass computes instead of ``l``
whole blocks (same ``b = 2``): each guided block but the last runs its joint attention with q, k
and v padded by the K mask channels to ``D' = ceil8(D + K)`` per head, which also yields ``P``
(``4*S^2*H*D'`` instead of ``4*S^2*h``); the last guided block computes its modulations, q and k
and the P attention of the ``L`` latent queries (values padded to the head width, ``4*L*S*h``) and
nothing after it.

Hunyuan3D 2.1 (``cfg.architecture`` "2.1*", :func:`forward_flops21`): per block on ``S = 1 + L``
tokens (the time token), ``2*4*h^2*S + 4*S^2*h`` (self-attention), ``2*2*h^2*S + 2*2*c*h*M +
4*S*M*h`` (cross-attention), ``2*8*h^2*S`` per feed-forward (MoE blocks: ``top_k`` routed experts
plus the shared one, and the gate ``2*E*h*S``), ``2*2*h^2*S`` per long skip; embeddings
``2*(L*C*h + 8*h^2)``, final ``2*L*h*C``. ``F_guide``: embeddings, ``l - 1`` whole blocks, and the
last guided block up to its cross-attention's P (self-attention, q and k projections, ``2*S*M*h``).
``floor_as_implemented`` is not modelled for 2.1 (n/a).
"""

from __future__ import annotations

from .config import BenchConfig

__all__ = ["forward_flops", "forward_flops21", "overhead_floor", "guide_flops_as_implemented", "branches"]


def _double_block(h: int, L: int, M: int) -> float:
    S = L + M
    return 2 * 12 * h * h * (L + M) + 4 * S * S * h + 2 * 12 * h * h


def _single_block(h: int, L: int, M: int) -> float:
    S = L + M
    return 2 * 12 * h * h * S + 4 * S * S * h + 2 * 3 * h * h


def _embeddings(cfg: BenchConfig) -> float:
    h = cfg.hidden_size
    return 2 * (cfg.num_latents * cfg.latent_channels * h + cfg.num_cond_tokens * cfg.context_dim * h
                + 256 * h + h * h)


def forward_flops(cfg: BenchConfig, double_blocks: int | None = None, single_blocks: int | None = None,
                  final: bool = True) -> float:
    """FLOPs of one forward of one sample (all blocks by default)."""
    h, L, M = cfg.hidden_size, cfg.num_latents, cfg.num_cond_tokens
    nd = cfg.depth if double_blocks is None else double_blocks
    ns = cfg.depth_single_blocks if single_blocks is None else single_blocks
    total = _embeddings(cfg) + nd * _double_block(h, L, M) + ns * _single_block(h, L, M)
    if final:
        total += 2 * (L * h * cfg.latent_channels + 2 * h * h)
    return float(total)


def guide_flops_as_implemented(cfg: BenchConfig) -> float:
    """Forward FLOPs of ``timi_torch``'s fused guidance pass for one sample (module docstring)."""
    h, L, M, H = cfg.hidden_size, cfg.num_latents, cfg.num_cond_tokens, cfg.num_heads
    S, D = L + M, cfg.head_dim
    padded = -(-(D + cfg.num_instances) // 8) * 8
    with_p = 2 * 12 * h * h * S + 4 * S * S * H * padded + 2 * 12 * h * h
    last = 2 * 3 * h * h * S + 2 * 12 * h * h + 4 * L * S * h
    return _embeddings(cfg) + (cfg.guided_layers - 1) * with_p + last


def _block21(cfg: BenchConfig, layer: int, last_guided: bool = False) -> float:
    from timi_torch.hunyuan21 import PRESETS

    p = PRESETS[cfg.architecture]
    h, c, M, S = cfg.hidden_size, cfg.context_dim, cfg.num_cond_tokens, 1 + cfg.num_latents
    self_attn = 2 * 4 * h * h * S + 4 * S * S * h
    if last_guided:
        return self_attn + 2 * h * h * S + 2 * c * h * M + 2 * S * M * h
    moe = cfg.depth - layer <= min(p.num_moe_layers, cfg.depth)
    ffn = (p.moe_top_k + 1) * 2 * 8 * h * h * S + 2 * p.num_experts * h * S if moe else 2 * 8 * h * h * S
    skip = 2 * 2 * h * h * S if layer > cfg.depth // 2 else 0
    return self_attn + 2 * 2 * h * h * S + 2 * 2 * c * h * M + 4 * S * M * h + ffn + skip


def forward_flops21(cfg: BenchConfig, guided_layers: int | None = None) -> float:
    """FLOPs of one forward of Hunyuan3D 2.1's DiT for one sample, or (``guided_layers``) of the
    guidance pass up to the last guided cross-attention (module docstring)."""
    h, L, C = cfg.hidden_size, cfg.num_latents, cfg.latent_channels
    total = 2 * (L * C * h + 8 * h * h)
    if guided_layers is not None:
        return float(total + sum(_block21(cfg, i) for i in range(guided_layers - 1))
                     + _block21(cfg, guided_layers - 1, last_guided=True))
    return float(total + sum(_block21(cfg, i) for i in range(cfg.depth)) + 2 * L * h * C)


def overhead_floor(cfg: BenchConfig) -> dict:
    """``floor`` (backward = 2x forward), ``floor_input_grad`` (backward = 1x forward) and
    ``floor_as_implemented``, plus the FLOP counts they come from; see the module docstring."""
    if cfg.architecture != "2.0":
        full, guide = forward_flops21(cfg), forward_flops21(cfg, cfg.guided_layers)
    else:
        full = forward_flops(cfg)
        guide = forward_flops(cfg, double_blocks=cfg.guided_layers, single_blocks=0, final=False)
    frac = cfg.guided_steps / cfg.steps
    n = branches(cfg)
    return {
        "floor": 1 + frac * 3 * guide / (n * full),
        "floor_input_grad": 1 + frac * 2 * guide / (n * full),
        "floor_as_implemented": (1 + frac * 3 * guide_flops_as_implemented(cfg) / (n * full)
                                 if cfg.architecture == "2.0" else None),
        "forward_gflops_per_sample": full / 1e9,
        "guided_forward_gflops_per_sample": guide / 1e9,
        "branches": n,
        "formula": f"1 + (t/T) * (1 + b) * F_guide / ({n} * F_full), b = 2 (floor) or 1 (floor_input_grad)",
    }


def branches(cfg: BenchConfig) -> int:
    """Forwards per plain step: the CFG pair (2), or 1 for a guidance-distilled DiT (hy3dgen runs no
    CFG batch when ``guidance_embed``)."""
    return 1 if cfg.guidance_embed else 2

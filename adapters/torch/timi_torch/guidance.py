"""Instance-aware Separation Guidance (paper Sec. 4.1, Eqs.2-4) on hy3dgen's ``Hunyuan3DDiT`` and
Hunyuan3D 2.1's ``HunYuanDiTPlain`` (:mod:`timi_torch.hunyuan21`).

The guidance pass runs the *conditional* branch of the frozen DiT on the current latent, records
the instance probability map ``P`` (Eq.2) of each of the first ``guided_layers`` double-stream
blocks and stops the forward right after the last of them. ``L_sep`` (Eqs.3-4, from
``timi_core``) is averaged over those layers and differentiated w.r.t. the latent.

How ``P`` is read out of the model without forking it: every double-stream block calls the module
function ``hy3dgen.shapegen.models.denoisers.hunyuan3ddit.attention(q, k, v)`` on the joint
sequence ``[condition tokens; latent tokens]`` with RMS-normalised q and k. :func:`capture_attention`
routes that function, while a capture is open, to the capture of the calling thread (a context
variable: no shared state, so concurrent runs in one process never mix). Since ``SDPA(q, k, V) = softmax(q k^T / sqrt(d)) V`` with the
softmax over the whole joint sequence, values ``V = [M^T; 0]`` (the masks for condition keys, zero
for latent keys) give ``P = mean_h SDPA(q_z, k, V)`` for the latent queries ``q_z``: exactly
``A_zc M^T`` averaged over heads (Eq.2), without the L x M attention matrix.

* ``mode="fused"`` (default): each guided block but the last gets its attention output *and* ``P``
  from ONE SDPA call, with q, k zero-padded and v extended by the mask channels: ``SDPA([q, 0],
  [k, 0], [v, V])`` at the original scale ``d^-1/2`` is ``[attention(q, k, v), SDPA(q, k, V)]``
  (:func:`attention_and_probability`). The last guided block only needs ``P`` (the forward stops
  there), so it runs ``SDPA(q_z, k, V)`` alone (:func:`fused_probability`).
* ``mode="explicit"``: the reference; materialises the head-averaged softmax, slices ``A_zc``
  (:func:`condition_attention`) and calls ``timi_core.instance_probability``; the blocks run
  hy3dgen's own attention.

Hunyuan3D 2.1 (:data:`SITES` ``"2.1"``): the guided layers are the first blocks' cross-attentions
(``attn2``), which call ``timi_torch.hunyuan21.modeling.attention(q, k, v)`` with the [time token;
latent tokens] as queries and the condition tokens alone as keys, so Eq.1's ``A_zc`` is that
softmax itself (normalised over the condition tokens) and ``P = mean_h SDPA(q_z, k, M^T)`` with
``q_z`` the queries after the time token. The same two paths apply (values ``M^T`` on every key).
An :class:`AttentionSite` says, per family, which function is routed, which blocks count and which
queries and keys are latent and condition tokens; :func:`attention_site` picks it from the model.

Observation without guidance: :func:`observe_attention` hands the first blocks' ``q`` and ``k`` to
an observer (``observer(layer, q, k)``) during an ordinary forward, which then runs on unchanged.
``TIMIPipeline`` uses it for a recorder passed to its call (e.g. ``timi.report.AttentionRecorder``);
it is the same wrapper (:func:`capture_attention`, ``mode="observe"``), the only place where
hy3dgen's ``attention`` is wrapped.

``P`` is computed in float32 from the model's q and k, so the loss is float32 for fp16/bf16 models
(in the fused path the guided blocks' attention output is computed in float32 too, then cast back).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import threading

import torch
import torch.nn.functional as F
from einops import rearrange

import timi_core

__all__ = ["capture_attention", "observe_attention", "condition_attention", "separation_loss_and_grad",
           "guided_probabilities", "guided_update", "smoothing_axes", "observed", "MODES", "AttentionSite", "SITES",
           "attention_site", "guidable_layers"]

MODES = ("fused", "explicit")


class _StopForward(Exception):
    """Raised after the last guided block: the rest of the DiT is not needed for the loss."""


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """Where a DiT family computes the attention Eq.2 reads.

    ``module``: the module whose function ``attention(q, k, v)`` (q, k, v (B, H, S, D) -> (B, S, H*D))
    the guided blocks call; ``blocks``: the model's attribute listing them (the most layers to
    guide); ``joint``: keys are ``[condition; latent]`` and so are the queries (hy3dgen 2.0's
    double-stream blocks), else keys are the condition tokens alone (cross-attention) and the
    latent queries follow ``prefix`` other tokens (2.1's time token).
    """

    module: str
    blocks: str
    joint: bool
    prefix: int = 0
    context_dict: bool = True

    def call(self, model, x, timestep, cond_main, **kwargs):
        """The model's own forward on the conditional branch: ``model(x, t, {'main': cond})``
        (Hunyuan3D) or ``model(x, t, cond)`` (``context_dict=False``: TRELLIS)."""
        return model(x, timestep, {"main": cond_main} if self.context_dict else cond_main, **kwargs)

    def latent_queries(self, num_cond: int) -> slice:
        return slice(num_cond, None) if self.joint else slice(self.prefix, None)

    def function_owner(self):
        import importlib

        return importlib.import_module(self.module)


SITES = {"2.0": AttentionSite("hy3dgen.shapegen.models.denoisers.hunyuan3ddit", "double_blocks", joint=True),
         "2.1": AttentionSite("timi_torch.hunyuan21.modeling", "blocks", joint=False, prefix=1),
         "trellis": AttentionSite("timi_torch.trellis.modeling", "blocks", joint=False, context_dict=False)}


def attention_site(model) -> AttentionSite:
    """The :class:`AttentionSite` of a loaded DiT (hy3dgen's ``Hunyuan3DDiT``, 2.1's ``HunYuanDiTPlain``
    or TRELLIS's ``SparseStructureFlowModel``)."""
    from .hunyuan21.modeling import HunYuanDiTPlain
    from .trellis.modeling import SparseStructureFlowModel

    if isinstance(model, HunYuanDiTPlain):
        return SITES["2.1"]
    if isinstance(model, SparseStructureFlowModel):
        return SITES["trellis"]
    if hasattr(model, "double_blocks"):
        return SITES["2.0"]
    raise TypeError(f"{type(model).__name__} is neither hy3dgen's Hunyuan3DDiT, Hunyuan3D 2.1's HunYuanDiTPlain "
                    "nor TRELLIS's SparseStructureFlowModel.")


def guidable_layers(model) -> int:
    """How many layers TIMI can guide on ``model``: its double-stream blocks (2.0), its blocks' cross-attentions (2.1)."""
    return len(getattr(model, attention_site(model).blocks))


def _mask_values(tokens: torch.Tensor, num_keys: int, width: int) -> torch.Tensor:
    """Values ``[M^T; 0]`` of Eq.2 as an attention output: (B, S, width) float32 holding the
    (B, K, M) condition-token masks on the first M keys and first K channels, zeros elsewhere."""
    B, K, M = tokens.shape
    values = tokens.new_zeros(B, num_keys, width, dtype=torch.float32)
    values[:, :M, :K] = tokens.transpose(1, 2)
    return values


def fused_probability(q_z: torch.Tensor, k: torch.Tensor, tokens: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    """Eq.2 via SDPA: q_z (B, H, L, D), k (B, H, M+L, D), tokens (B, K, M) -> P (B, L, K), the mean
    over heads, or (B, H, L, K), one map per head, with ``per_head``.

    The values are the masks for the condition keys and 0 for the latent keys, zero-padded to the
    head width D (in chunks of D instances when K > D) so that PyTorch picks its fused
    (flash / memory-efficient) kernels, which need equal q/k/v widths; the padding columns are
    dropped from the output.
    """
    B, H, S, D = k.shape
    q_z, k = q_z.float(), k.float()
    out = []
    for start in range(0, tokens.shape[1], D):
        chunk = tokens[:, start:start + D]
        values = _mask_values(chunk, S, D)[:, None].expand(B, H, S, D)
        out.append(F.scaled_dot_product_attention(q_z, k, values)[..., : chunk.shape[1]])
    P = torch.cat(out, dim=-1)
    return P if per_head else P.mean(dim=1)


def attention_and_probability(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor,
                              per_head: bool = False, queries: slice | None = None):
    """hy3dgen's ``attention(q, k, v)`` (B, S, H*D) and Eq.2's ``P`` (B, L, K) in one SDPA call
    (``per_head``: P per head, (B, H, L, K)).

    q, k, v (B, H, S, D) over ``[M condition; L latent]`` tokens (or q over ``[prefix; L latent]``
    and k, v over the M condition tokens: cross-attention, with ``queries`` the latent ones;
    default ``M:``), tokens (B, K, M). v gets the extra
    value channels ``[M^T; 0]`` and q, k as many zero channels (up to a multiple of 8), so all three
    share one width (PyTorch's fused kernels); the scale stays ``D^-1/2``, so the softmax is unchanged.
    """
    B, H, _, D = q.shape
    S = k.shape[2]
    K, M = tokens.shape[1], tokens.shape[2]
    pad = -(-(D + K) // 8) * 8 - D
    masks = _mask_values(tokens, S, pad)
    values = torch.cat([v.float(), masks[:, None].expand(B, H, S, pad)], dim=-1)
    out = F.scaled_dot_product_attention(F.pad(q.float(), (0, pad)), F.pad(k.float(), (0, pad)), values,
                                         scale=D ** -0.5)
    P = out[:, :, slice(M, None) if queries is None else queries, D:D + K]
    return rearrange(out[..., :D].to(v.dtype), "B H L D -> B L (H D)"), P if per_head else P.mean(dim=1)


def condition_attention(q_z: torch.Tensor, k: torch.Tensor, num_cond: int, head_chunk: int | None = None,
                        per_head: bool = False):
    """Eq.1's block ``A_zc``, averaged over heads, float32: the explicit softmax over the joint sequence.

    ``q_z`` (..., H, L, D) latent queries, ``k`` (..., H, M + L, D) keys (condition tokens first),
    ``num_cond`` = M -> (..., L, M), or (..., H, L, M) with ``per_head``. ``head_chunk``: heads per
    softmax (bounds the memory of the (heads, L, M + L) scores); default all at once.
    """
    H, D = q_z.shape[-3], q_z.shape[-1]
    if per_head:
        scores = torch.matmul(q_z.float(), k.float().transpose(-1, -2)) * D ** -0.5
        return scores.softmax(dim=-1)[..., :num_cond]
    if head_chunk is None:
        scores = torch.matmul(q_z.float(), k.float().transpose(-1, -2)) * D ** -0.5
        return scores.softmax(dim=-1)[..., :num_cond].mean(dim=-3)
    total = 0
    for h in range(0, H, head_chunk):
        heads = slice(h, h + head_chunk)
        scores = torch.matmul(q_z[..., heads, :, :].float(), k[..., heads, :, :].float().transpose(-1, -2)) * D ** -0.5
        total = total + scores.softmax(dim=-1)[..., :num_cond].sum(dim=-3)
    return total / H


def explicit_probability(q_z: torch.Tensor, k: torch.Tensor, tokens: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    """Eq.2 with the explicit attention matrix (reference path); same shapes as the fused one."""
    attn_zc = condition_attention(q_z, k, tokens.shape[-1], per_head=per_head)   # (B, [H,] L, M), Eq.1's A_zc
    return torch.stack([timi_core.instance_probability(attn_zc[b], tokens[b])
                        for b in range(tokens.shape[0])])


@dataclasses.dataclass
class _Capture:
    """One capture's state (one ``with capture_attention(...)`` block, in one thread)."""

    tokens: torch.Tensor | None
    num_layers: int
    mode: str
    per_head: bool = False
    observer: object = None
    site: AttentionSite = SITES["2.0"]
    num_cond: int | None = None         # observe mode: M, to find the latent queries
    probabilities: list = dataclasses.field(default_factory=list)
    calls: int = 0

    def attention(self, original, q, k, v, **kwargs):
        """hy3dgen's ``attention(q, k, v)`` for this capture: observed, or recording ``P``."""
        if self.mode == "observe":
            if self.calls < self.num_layers:
                self.observer(self.calls, q[:, :, self.site.latent_queries(self.num_cond or 0)], k)
            self.calls += 1
            return original(q, k, v, **kwargs)
        M = self.tokens.shape[-1]
        if (q.shape[2] <= M) if self.site.joint else (k.shape[2] != M):
            raise ValueError(f"attention over {k.shape[2]} keys does not fit {M} condition tokens "
                             "(plus latent tokens in joint attention); do the masks belong to this conditioner?")
        queries = self.site.latent_queries(M)
        last = len(self.probabilities) + 1 == self.num_layers
        if self.mode == "fused" and not last:             # the block's output and P in one call
            out, P = attention_and_probability(q, k, v, self.tokens, self.per_head, queries)
            self.probabilities.append(P)
            return out
        probability = fused_probability if self.mode == "fused" else explicit_probability
        self.probabilities.append(probability(q[:, :, queries], k, self.tokens, self.per_head))
        if last:
            raise _StopForward
        return original(q, k, v, **kwargs)


#: The capture of the current thread (or asyncio task); None: hy3dgen's attention runs untouched.
#: Context-local, so captures in other threads (two runs in one process) never see each other's.
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("timi_attention_capture", default=None)
_LOCK = threading.Lock()
_USERS: dict[str, int] = {}   # captures open in any thread, per site module: its dispatcher is installed while > 0


def _dispatcher(original):
    """hy3dgen's ``attention`` routed to the calling context's capture, if any."""

    @functools.wraps(original)
    def attention(q, k, v, **kwargs):
        state = _ACTIVE.get()
        if state is None:
            return original(q, k, v, **kwargs)
        return state.attention(original, q, k, v, **kwargs)

    attention._timi_original = original
    return attention


@contextlib.contextmanager
def _installed(site: AttentionSite):
    """The dispatcher in place of the site's ``attention`` while any capture of it is open (in any
    thread); the model's own function is put back when the last one closes."""
    module = site.function_owner()
    with _LOCK:
        if not hasattr(module.attention, "_timi_original"):
            module.attention = _dispatcher(module.attention)
        _USERS[site.module] = _USERS.get(site.module, 0) + 1
    try:
        yield
    finally:
        with _LOCK:
            _USERS[site.module] -= 1
            if _USERS[site.module] == 0 and hasattr(module.attention, "_timi_original"):
                module.attention = module.attention._timi_original


@contextlib.contextmanager
def capture_attention(tokens: torch.Tensor | None, num_layers: int, mode: str = "fused", observer=None,
                      per_head: bool = False, site: AttentionSite = SITES["2.0"], num_cond: int | None = None):
    """Within the block, the DiT's first ``num_layers`` attention calls record ``P`` (B, L, K) (Eq.2),
    or (B, H, L, K) with ``per_head`` (``TIMIConfig.per_head``).

    ``tokens``: (B, K, M) condition-token masks. The forward stops (``_StopForward``) after the
    ``num_layers``-th call; use :func:`guided_probabilities`, which handles that.
    ``mode="observe"``: nothing is recorded or stopped; each of the first ``num_layers`` calls
    hands its ``(layer, q_z, k)`` to ``observer`` (the latent queries (B, H, L, D), found with
    ``num_cond`` = M in joint attention, and all keys, condition tokens first) and runs the
    model's attention (:func:`observe_attention`). ``site``: the DiT family's
    :class:`AttentionSite` (default hy3dgen 2.0's).

    The capture is per call: its state lives in a context variable, so only forwards of this
    thread (asyncio task) inside the block see it; two pipelines running at once in one process
    (two threads) each capture their own calls, and forwards outside any capture run hy3dgen's
    attention unchanged.
    """
    if mode not in MODES + ("observe",):
        raise ValueError(f"attention mode {mode!r} is not one of {MODES}.")
    state = _Capture(tokens, num_layers, mode, per_head, observer, site, num_cond)
    with _installed(site):
        token = _ACTIVE.set(state)
        try:
            yield state
        finally:
            _ACTIVE.reset(token)


def observe_attention(observer, num_layers: int, num_cond: int, site: AttentionSite = SITES["2.0"]):
    """Context manager around ONE DiT forward: its first ``num_layers`` guidable attention calls
    hand ``(layer, q_z, k)`` to ``observer`` (latent queries, keys with the ``num_cond`` condition
    tokens first); the forward itself is unchanged (:func:`capture_attention`, ``mode="observe"``)."""
    return capture_attention(None, num_layers, "observe", observer, site=site, num_cond=num_cond)


def observed(recorder, step: int, num_cond: int, model):
    """The conditional forward of ``step`` observed by ``recorder`` (``timi.report.AttentionRecorder``:
    ``recorder.wants(step)``, ``recorder.layers``, ``recorder.observe(step, layer, q_z, k)``), or a
    no-op context; every sampler wraps its step's first (conditional) forward in it."""
    if recorder is None or not recorder.wants(step):
        return contextlib.nullcontext()
    return observe_attention(functools.partial(recorder.observe, step), recorder.layers, num_cond,
                             attention_site(model))


def guided_probabilities(model, x, timestep, cond_main, tokens, num_layers, mode="fused", per_head=False, **kwargs):
    """P (list over the first ``num_layers`` guided layers: double-stream blocks of 2.0, cross-attentions
    of 2.1 and TRELLIS; each (B, L, K) float32, (B, H, L, K) with ``per_head``).

    Runs the model's own forward (:meth:`AttentionSite.call`) and stops after the last guided
    layer, so the gradient of a loss on ``P`` passes only through the first ``num_layers`` blocks.
    """
    site = attention_site(model)
    depth = guidable_layers(model)
    if not 1 <= num_layers <= depth:
        raise ValueError(f"num_layers={num_layers} must be in [1, {depth}] (the model's guidable blocks).")
    with capture_attention(tokens, num_layers, mode, per_head=per_head, site=site) as state:
        try:
            site.call(model, x, timestep, cond_main, **kwargs)
        except _StopForward:
            pass
    if len(state.probabilities) != num_layers:
        raise RuntimeError(f"captured {len(state.probabilities)} attention calls, expected {num_layers}: "
                           f"the DiT does not call {site.module}.attention as expected.")
    return state.probabilities


@contextlib.contextmanager
def frozen_parameters(model):
    """Parameters temporarily excluded from autograd (hy3dgen leaves ``requires_grad=True`` on the
    DiT): the backward then keeps and computes only what ``dL/dz`` needs."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def separation_loss_and_grad(model, latents, timestep, cond_main, tokens, config: timi_core.TIMIConfig,
                             num_layers: int, mode: str = "fused", **model_kwargs):
    """Per-sample ``L_sep`` (B,) (mean over guided layers of Eq.4) and ``dL_sep/dz`` (float32).

    ``config.per_head``: Eqs.3-4 on each head's ``P`` (Eq.2 without the mean over heads), then the
    mean over heads.

    ``latents`` (B, L, C) in any dtype; the latent leaf is float32 and cast to the model's dtype
    for the forward, so the gradient and the loss are float32. Samples are independent: the
    gradient is that of the *sum* of the per-sample losses.
    """
    dtype = next(model.parameters()).dtype
    with torch.enable_grad(), frozen_parameters(model):
        z = latents.detach().to(torch.float32).clone().requires_grad_(True)
        Ps = guided_probabilities(model, z.to(dtype), timestep, cond_main, tokens, num_layers, mode,
                                  config.per_head, **model_kwargs)
        per_layer = torch.stack([timi_core.instance_separation_loss(P, config.eps, config.detach_weights,
                                                                    config.normalize_instances)
                                 for P in Ps])                               # (layers, B[, H])
        if config.per_head:
            per_layer = per_layer.mean(dim=-1)
        loss = per_layer.mean(dim=0)
        (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), grad


def smoothing_axes(latents: torch.Tensor) -> tuple[int, ...]:
    """Axes of Eq.5's Gaussian: the token axis of (B, L, C) token latents (hy3dgen's ShapeVAE), or
    the three spatial axes D, H, W of a (B, C, D, H, W) grid latent (TRELLIS: Eq.5 as written)."""
    if latents.ndim == 3:
        return (1,)
    if latents.ndim == 5:
        return (2, 3, 4)
    raise ValueError(f"latents of shape {tuple(latents.shape)} are neither (B, L, C) tokens nor a "
                     "(B, C, D, H, W) grid; cannot choose the smoothing axes of Eq.5.")


def guided_update(model, latents, timestep, cond_main, tokens, momentum, config: timi_core.TIMIConfig,
                  num_layers: int, mode: str = "fused", *, step: int = 0, gradient_hook=None, positions=None,
                  model_kwargs: dict | None = None, time: float | None = None):
    """One ISG + SGU update (Eqs.2-7) of ``latents`` -> ``(latents, momentum, StepDiagnostics)``:
    the one place every sampler (Hunyuan3D 2.0 / 2.1, TRELLIS stage 1) makes a guided step.

    ``latents``: (B, L, C) tokens or a (B, C, D, H, W) grid, any dtype; the returned latents are
    float32 (``latents`` upcast minus the float32 momentum). ``timestep``: what the model's forward
    takes (flow time for hy3dgen, ``1000 t`` for TRELLIS); ``time``: the value recorded in the
    diagnostics (default ``float(timestep[0])``). ``gradient_hook(grad, step) -> grad`` acts on
    ``dL/dz`` before SGU (controls); ``positions`` (B, L, D) for Eq.5 over positions; Eq.5 runs
    along :func:`smoothing_axes` otherwise (the token axis, or D, H, W of a grid).
    """
    loss, grad = separation_loss_and_grad(model, latents, timestep, cond_main, tokens, config, num_layers, mode,
                                          **(model_kwargs or {}))
    if gradient_hook is not None:
        grad = gradient_hook(grad, step)
    z = latents.detach().to(torch.float32)
    axes = smoothing_axes(z)
    z_new, momentum, scale, smoothed = timi_core.sgu_step(z, grad, momentum, config, axes=axes, positions=positions)
    update = z_new - z
    share = functools.partial(timi_core.common_share, axes=axes)
    diag = timi_core.StepDiagnostics(step, float(timestep[0]) if time is None else float(time), loss.tolist(),
                                     scale.tolist(), update.abs().flatten(1).amax(1).tolist(),
                                     share(grad.to(torch.float32)).tolist(), share(smoothed.to(torch.float32)).tolist(),
                                     share(update).tolist())
    return z_new, momentum, diag

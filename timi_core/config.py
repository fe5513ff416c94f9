"""TIMI hyper-parameters with the paper's defaults (Sec. 5.1) and the ablation switches."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

#: The paper's guided window (Sec. 5.1: the first 15 of 50 steps) as a part of the trajectory:
#: the steps that start in the first 15/50 = 30 % of flow time (noise level sigma < 0.3).
PAPER_GUIDED_FRACTION = 15 / 50
#: A step that starts within this distance below the fraction counts as starting at it (not guided):
#: schedules are float32, and a sigma equal to the fraction must not depend on its rounding.
_WINDOW_TOL = 1e-6
#: Eq.5's neighbours: along the latent's token axis, or by the tokens' positions in space.
SMOOTHING = ("tokens", "positions", "decoder")
#: What of the gradient's token-common part (its per-channel mean over the tokens) the step keeps.
COMMON = ("keep", "remove", "only")


@dataclasses.dataclass(frozen=True)
class TIMIConfig:
    """Configuration of TIMI guidance.

    Paper defaults (Sec. 5.1): ISG on the first ``guided_layers=4`` double-stream blocks during the
    first 15 of the 50 denoising steps; SGU with ``alpha=0.1`` (Eq.6), ``sigma=1.5`` (Eq.5),
    ``beta=0.9`` (Eq.7) and ``eps=1e-6`` (Eqs.3, 4, 6).

    The guided window (:meth:`num_guided_steps`) is a part of the trajectory, not a step count:
    a step is guided when it starts at a noise level ``sigma < guided_fraction`` (flow time of
    hy3dgen's schedule, 0 = noise, 1 = data; default ``15/50``). On hy3dgen's 50-step
    ``linspace(0, 1, 50)`` schedule that is exactly the paper's first 15 steps (``sigma_14 = 14/49
    < 0.3 <= sigma_15 = 15/49``); at 30 steps the first 9, on turbo's 5-step consistency schedule
    the first 2. ``guided_steps=N`` guides the first ``N`` steps instead, whatever the schedule.

    Ablation switches (Tables 2 and 5):

    * ``isg`` -- Instance-aware Separation Guidance (Sec. 4.1). Off: no guidance at all; the sampler
      is the base model's.
    * ``sgu`` -- Spatial-stabilized Geometry-adaptive Update (Sec. 4.2). Off: the raw gradient step
      ``z <- z - alpha * dL/dz`` (no smoothing, no modulation, no momentum).
    * ``gm`` -- Geometry-adaptive Modulation (Eq.6). Off: ``dz = alpha * g_reg``.
    * ``sr`` -- Spatial-stabilized Regularization (Eq.5). Off: ``g_reg = dL/dz``.

    ``detach_weights=False`` lets the Eq.3 weights ``W`` take part in the gradient, as the equations
    are written; ``True`` treats ``W`` as a constant.

    ``normalize_instances=False`` uses Eq.2's ``P = A_zc M^T`` as written; ``True`` divides each
    latent token's row by its sum over the instances before Eqs.3-4 (a variant studied on the
    testbed, docs/results.md: on hy3dgen's joint attention the rows of ``A_zc`` do not sum to 1
    over the image tokens, so Eq.4 as written can be lowered by raising the total instance mass).

    ``per_head=False`` averages Eq.2's ``A_zc`` over the attention heads (one map per layer); ``True``
    keeps one ``P`` per head, applies Eqs.3-4 to each and averages the losses over the heads (a
    variant studied on the testbed: a head-averaged map can be pure while no single head is).

    ``smoothing`` chooses Eq.5's neighbours: ``"tokens"`` (default) filters along the latent's
    axes, the token axis of hy3dgen's (B, L, C) latents, whose neighbours are unrelated tokens (the
    paper's grid has spatial neighbours; hy3dgen's latent has no grid); ``"positions"`` filters over
    the tokens' positions in space, ``sigma`` in units of their nearest-neighbour spacing
    (:func:`timi_core.gaussian_smooth_points`), read from the latents themselves, which needs a
    model whose latents carry them (the testbed's, in channels 0-2); ``"decoder"`` is the same
    smoothing with the positions read from the VAE decoder's cross-attention, for any hy3dgen model
    (``timi_torch.positions.DecoderAttentionPositions``).

    ``common`` chooses what the step keeps of the gradient's *token-common part*, its per-channel
    mean over the latent's smoothing axes (the tokens of hy3dgen's (B, L, C) latents; the same
    shift for every token), after Eq.5 and before Eq.6 (:func:`timi_core.select_common`):
    ``"keep"`` (the paper: all of it), ``"remove"`` (the default; ``g - mean_tokens(g)``: only the
    token-specific rest, which moves tokens relative to each other) or ``"only"`` (the shared
    shift alone; an analysis variant: it ignores which token the gradient came from, so a
    shuffled-gradient control equals it). On token latents Eq.5 along the token axis averages
    unrelated tokens, so what survives it is mostly the common part, and Eq.6 scales that up: a
    shift shared by every token, which the decoder turns into a change of size (docs/results.md).

    :meth:`paper` is the paper's literal form (Sec. 5.1); ``TIMIConfig()`` is the project's
    default, which differs from it in one field: ``common="remove"``. Chosen by a rule written
    before scoring (docs/results.md, issue 27): on the testbed's validation split it was the only
    variant that kept the shapes' size (area 0.99 of the base model's; the paper's form 0.82) and
    raised SSR at matched size above its shuffled control. On the held-out test split that gain did
    not replicate: neither form separates instances at matched size there; the default keeps the
    shapes' size (0.98; the paper's form 0.80).
    """

    alpha: float = 0.1
    sigma: float = 1.5
    beta: float = 0.9
    eps: float = 1e-6
    guided_layers: int = 4
    guided_steps: Optional[int] = None
    guided_fraction: float = PAPER_GUIDED_FRACTION
    isg: bool = True
    sgu: bool = True
    gm: bool = True
    sr: bool = True
    detach_weights: bool = False
    normalize_instances: bool = False
    per_head: bool = False
    smoothing: str = "tokens"
    common: str = "remove"

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, rule: str) -> None:
            if not ok:
                value = getattr(self, name)
                raise ValueError(f"TIMIConfig.{name}={value!r} is invalid: {rule}.")

        def finite(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        check("alpha", finite(self.alpha) and self.alpha >= 0, "use a finite number >= 0 (paper: 0.1)")
        check("sigma", finite(self.sigma) and self.sigma >= 0, "use a finite number >= 0 (paper: 1.5)")
        check("beta", finite(self.beta) and 0 <= self.beta < 1, "use 0 <= beta < 1 (paper: 0.9)")
        check("eps", finite(self.eps) and self.eps >= 0, "use a finite number >= 0 (paper: 1e-6)")
        def count(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        check("guided_layers", count(self.guided_layers), "use an integer >= 0 (paper: 4)")
        check("guided_steps", self.guided_steps is None or count(self.guided_steps),
              "use an integer >= 0, or None for the guided_fraction window (paper: 15 of 50 steps)")
        check("guided_fraction", finite(self.guided_fraction) and 0 <= self.guided_fraction <= 1,
              "use a number in [0, 1], the part of the trajectory to guide (paper: 15/50 = 0.3)")
        check("smoothing", self.smoothing in SMOOTHING, f"use one of {SMOOTHING} (paper's Eq.5 on token latents: 'tokens')")
        check("common", self.common in COMMON,
              f"use one of {COMMON} (the paper keeps the gradient's token-common part: 'keep')")
        for name in ("isg", "sgu", "gm", "sr", "detach_weights", "normalize_instances", "per_head"):
            check(name, isinstance(getattr(self, name), bool), "use True or False")

    @property
    def needs_positions(self) -> bool:
        """Whether Eq.5 runs over the tokens' positions (``smoothing`` other than ``"tokens"``, with SGU
        and SR on), so that a guided step needs them."""
        return self.sgu and self.sr and self.smoothing != "tokens"

    @classmethod
    def paper(cls, **changes) -> "TIMIConfig":
        """The paper's literal form (Sec. 5.1, Eqs.2-7 as written): alpha 0.1, sigma 1.5 along the
        latent's axes (the token axis on hy3dgen), beta 0.9, l = 4 layers, the first 30 % of the
        trajectory, the whole gradient kept. ``changes`` override fields (validated)."""
        return cls(**{**PAPER_FIELDS, **changes})

    @classmethod
    def preset(cls, name: str, **changes) -> "TIMIConfig":
        """A named configuration (:data:`PRESETS`): ``"default"`` (``TIMIConfig()``) or ``"paper"``."""
        if name not in PRESETS:
            raise ValueError(f"unknown TIMI preset {name!r}; use one of {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **changes})

    def replace(self, **changes) -> "TIMIConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def enabled(self) -> bool:
        """Whether any guidance runs at all (on some schedule)."""
        window = self.guided_fraction > 0 if self.guided_steps is None else self.guided_steps > 0
        return self.isg and window and self.guided_layers > 0

    def num_guided_steps(self, sigmas: Sequence[float]) -> int:
        """How many leading steps of a schedule are guided (the guided window, paper Sec. 5.1).

        ``sigmas``: the noise level at which each denoising step starts, in hy3dgen's flow time
        (``scheduler.timesteps / num_train_timesteps``: 0 = noise, 1 = data, increasing). With
        ``guided_steps=None`` the steps before the first one starting at ``sigma >=
        guided_fraction`` (to within 1e-6); else ``min(guided_steps, len(sigmas))``. 0 when off.
        """
        sigmas = [float(s) for s in sigmas]
        if not self.enabled:
            return 0
        if self.guided_steps is not None:
            return min(self.guided_steps, len(sigmas))
        limit = self.guided_fraction - _WINDOW_TOL
        return next((i for i, s in enumerate(sigmas) if not s < limit), len(sigmas))

    def guidance_active(self, step_index: int, sigmas: Sequence[float]) -> bool:
        """Whether the denoising step ``step_index`` (0-based) of the schedule ``sigmas`` is guided."""
        return step_index < self.num_guided_steps(sigmas)


#: The paper's literal form: the fields that :meth:`TIMIConfig.paper` sets (every other field at
#: the value the paper implies, which is also its default here).
PAPER_FIELDS = dict(alpha=0.1, sigma=1.5, beta=0.9, eps=1e-6, guided_layers=4, guided_steps=None,
                    guided_fraction=PAPER_GUIDED_FRACTION, isg=True, sgu=True, gm=True, sr=True,
                    detach_weights=False, normalize_instances=False, per_head=False, smoothing="tokens",
                    common="keep")
#: Named configurations (``--preset``): field values over :class:`TIMIConfig`'s defaults
#: (``"default"``: ``common="remove"``; ``"paper"``: the paper's literal form).
PRESETS = {"default": {}, "paper": PAPER_FIELDS}

"""``timi inspect``: how instance masks land on the condition tokens, without running the model.

The masks follow exactly the geometry the image goes through in hy3dgen (foreground crop,
recentring with a border, resize to 512, the conditioner's Resize + CenterCrop to 518 and DINOv2's
14-px patches: a 37 x 37 token grid after one CLS token for Hunyuan3D 2.0), computed by
:func:`timi_torch.condition_token_masks`. Here that function runs on a *geometry-only* stand-in for
the pipeline (:func:`timi.pipelines.geometry_pipeline`), built from the model's ``config.yaml`` (or
Hunyuan3D 2.0's defaults), so no weights are loaded. An instance that covers less than one token
in total, or is the majority of no token, is reported: average pooling onto the token grid (paper
Eq.2's ``M``) can wash it out.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import typer

from .masks_io import MaskInputError, foreground_notes, load_instance_masks
from .pipelines import (ModelConfigError, ModelNotFoundError, geometry_pipeline, grid_tokens,  # noqa: F401 (re-exported)
                        model_config_path, model_notes, resolve_model)

__all__ = ["geometry_pipeline", "prepare_masks", "TokenCoverage", "token_coverage", "coverage_warnings",
           "overlay_figure", "save_figure"]

#: An instance must cover at least this many tokens' worth of area to be reliably separable.
MIN_TOKEN_AREA = 1.0


def _default_model_or_none():
    try:
        return resolve_model(None)
    except ModelNotFoundError:
        return None  # Hunyuan3D 2.0's geometry


def prepare_masks(image, masks, model: Optional[str], overlap: str = "error", timi: bool = True):
    """Masks -> condition tokens with the model's geometry (its ``config.yaml``), loading no weights:
    the checks ``timi generate`` and ``timi inspect`` share. Returns (masks, condition masks, notes)."""
    import timi_torch

    notes = model_notes(model) if model is not None else []
    geo_pipe = geometry_pipeline(model)
    found = load_instance_masks(masks, image=image, overlap=overlap, max_instances=grid_tokens(geo_pipe.geometry))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cond = timi_torch.condition_token_masks(str(image), found.masks, geo_pipe, names=found.names)
        except ValueError as e:
            files = sorted(set(map(str, found.sources)))
            where = files[0] if len(files) == 1 else "masks (" + ", ".join(
                f"instance {k}: {src}" for k, src in enumerate(found.sources)) + ")"
            raise MaskInputError(f"{where}: {e}") from None
    notes += foreground_notes(image, found.masks)
    notes += coverage_warnings(token_coverage(cond.tokens, cond.prefix_tokens), found.names, cond.grid)
    if found.count == 1 and timi:
        notes.append("only one instance mask: TIMI's separation loss has nothing to separate (Eq.4); pass one mask per object.")
    return found, cond, notes


@dataclass
class TokenCoverage:
    """Per instance: total covered area in tokens, tokens where it is the majority, its best token."""

    area: np.ndarray       # (K,) sum over tokens of the covered fraction
    majority: np.ndarray   # (K,) tokens covered more than half by this instance
    peak: np.ndarray       # (K,) largest covered fraction of any single token


def token_coverage(tokens, prefix_tokens: int = 0) -> TokenCoverage:
    t = np.asarray(tokens.detach().cpu() if hasattr(tokens, "detach") else tokens, dtype=np.float64)[:, prefix_tokens:]
    return TokenCoverage(t.sum(1), (t > 0.5).sum(1), t.max(1))


def coverage_warnings(cov: TokenCoverage, names: Sequence[str], grid: tuple[int, int]) -> list[str]:
    out = []
    for k, name in enumerate(names):
        if cov.area[k] < MIN_TOKEN_AREA or cov.majority[k] == 0:
            out.append(
                f"instance {k} ({name}) covers {cov.area[k]:.2f} token(s) of the {grid[0]}x{grid[1]} grid "
                f"and is the majority of {int(cov.majority[k])}; it may not survive pooling - "
                "crop the image closer or merge it with a neighbour."
            )
    return out


def overlay_figure(cond, names: Sequence[str], title: str = ""):
    """Matplotlib figure: the conditioner's view with the masks, and the token grid coloured by
    instance (opacity = covered fraction), with the 14-px patch grid drawn."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from .instances import instance_colors

    K = cond.num_instances
    gh, gw = cond.grid
    colors = instance_colors(K)[:, :3] / 255.0
    S = cond.frame_image.shape[0]
    t = np.asarray(cond.tokens.detach().cpu(), dtype=np.float64)[:, cond.prefix_tokens:].reshape(K, gh, gw)

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6))
    img = cond.frame_image.astype(np.float64) / 255.0
    tint = img.copy()
    for k in range(K):
        tint[cond.frame_masks[k]] = 0.45 * img[cond.frame_masks[k]] + 0.55 * colors[k]
    axes[0].imshow(tint)
    axes[0].set_title(f"conditioner input ({S}x{S}) with masks")
    tokimg = np.ones((gh, gw, 3))
    owner = t.argmax(0)
    frac = t.max(0)
    for k in range(K):
        sel = owner == k
        tokimg[sel] = 1 - frac[sel, None] * (1 - colors[k])
    axes[1].imshow(tokimg, interpolation="nearest", extent=(0, gw, gh, 0))
    axes[1].set_title(f"condition tokens ({gh}x{gw}; opacity = covered fraction)")
    for ax, n, step in ((axes[0], gh, S / gh), (axes[1], gh, 1.0)):
        for i in range(n + 1):
            ax.axhline(i * step, color="k", lw=0.15, alpha=0.5)
            ax.axvline(i * step, color="k", lw=0.15, alpha=0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    cov = token_coverage(cond.tokens, cond.prefix_tokens)
    handles = [Patch(color=colors[k], label=f"{k}: {names[k]} ({cov.area[k]:.1f} tok)") for k in range(K)]
    fig.legend(handles=handles, loc="lower center", ncol=min(K, 5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95 if title else 1))
    return fig


#: The dpi PNG figures are saved at (timi inspect, the report).
FIGURE_DPI = 110


def save_figure(fig, path: str | Path, dpi: int = FIGURE_DPI) -> Path:
    """Save a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    from .io import write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------------ CLI


def inspect_command(
    image_and_masks: list[Path] = typer.Argument(..., metavar="IMAGE", help="Input picture (PNG/JPEG); paths after it are more mask files (`--masks a.png b.png`)."),
    masks: list[Path] = typer.Option(..., "--masks", "-m", help="Label-map PNG, folder or list of mask PNGs, (K,H,W) .npy, or RLE .json."),
    out: Path = typer.Option(Path("masks_on_tokens.png"), "--out", "-o", help="Overlay PNG to write."),
    model: Optional[str] = typer.Option(None, help="hy3dgen model directory whose config.yaml sets the geometry (default: the shipped model's, else Hunyuan3D 2.0's)."),
    overlap: str = typer.Option("error", help="Overlapping masks: error, first or last."),
) -> None:
    """Show how the masks land on the condition tokens (overlay PNG); warn about instances too small
    to survive the pooling. Loads no model weights."""
    from rich.console import Console

    from .cli_common import run_cli, split_image_and_masks
    from .io import OutputError, check_writable
    from .masks_io import check_input_picture

    err = Console(stderr=True, soft_wrap=True)
    image, masks = split_image_and_masks(image_and_masks, masks)

    def run():
        if Path(out).suffix.lower() != ".png":
            raise OutputError(f"{out}: the overlay is a PNG; pass --out NAME.png.")
        check_writable(out)
        check_input_picture(image, masks)
        found, cond, notes = prepare_masks(image, masks, resolve_model(model, weights=False) if model
                                           else _default_model_or_none(), overlap, timi=False)
        cov = token_coverage(cond.tokens, cond.prefix_tokens)
        save_figure(overlay_figure(cond, found.names, title=f"{image} - {found.count} instances"), out)
        return found, cond, cov, notes

    found, cond, cov, notes = run_cli(run, err)
    console = Console(soft_wrap=True)
    gh, gw = cond.grid
    console.print(f"{found.count} instance(s) on a {gh}x{gw} token grid (+{cond.prefix_tokens} CLS); overlay: {out}",
                  markup=False, highlight=False)
    for k, name in enumerate(found.names):
        console.print(f"  {k}: {name:<20} {cov.area[k]:8.2f} tokens of area, majority of {int(cov.majority[k]):4d}, "
                      f"peak {cov.peak[k]:.2f}", markup=False, highlight=False)
    for w in notes:
        err.print(f"warning: {w}", markup=False, highlight=False)

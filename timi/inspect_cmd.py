"""``timi inspect``: how instance masks land on the condition tokens, without running the model.

The masks follow exactly the geometry the image goes through in hy3dgen (foreground crop,
recentring with a border, resize to 512, the conditioner's Resize + CenterCrop to 518 and DINOv2's
14-px patches: a 37 x 37 token grid after one CLS token for Hunyuan3D 2.0), computed by
:func:`timi_torch.condition_token_masks`. Here that function runs on a *geometry-only* stand-in for
the pipeline, built from the model's ``config.yaml`` (or Hunyuan3D 2.0's defaults), so no weights
are loaded. An instance that covers less than one token in total, or is the majority of no token,
is reported: average pooling onto the token grid (paper Eq.2's ``M``) can wash it out.
"""

from __future__ import annotations

import io
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import typer
import yaml

__all__ = ["geometry_pipeline", "TokenCoverage", "token_coverage", "coverage_warnings", "overlay_figure", "save_figure"]

#: Hunyuan3D 2.0's conditioner and image processor settings (used when no config.yaml is found).
DEFAULT_GEOMETRY = {"image_size": 518, "patch_size": 14, "use_cls_token": True, "processor_size": 512, "border_ratio": 0.15}
#: An instance must cover at least this many tokens' worth of area to be reliably separable.
MIN_TOKEN_AREA = 1.0


class ModelConfigError(ValueError):
    """A model's ``config.yaml`` that cannot be read or lacks what hy3dgen needs; names the file."""


#: The sections hy3dgen's loader builds the pipeline from (each a ``target`` class and ``params``).
CONFIG_SECTIONS = ("model", "vae", "conditioner", "scheduler", "image_processor")
#: ``Hunyuan3DDiT``'s defaults (hy3dgen 2.0.2) for the settings that must agree: each head's
#: rotary embedding is split into ``axes_dim``, so ``sum(axes_dim) == hidden_size / num_heads``.
DIT_DEFAULTS = {"hidden_size": 1024, "num_heads": 16, "axes_dim": [64]}


def model_config_path(model: str | Path | None) -> Path | None:
    """The model's ``config.yaml``: in a model directory, beside a checkpoint file, or for a hy3dgen
    id under ``$HY3DGEN_MODELS/<id>/hunyuan3d-dit-v2-0`` (hy3dgen's local resolution)."""
    import os

    if model is None:
        return None
    p = Path(str(model)).expanduser()
    root = Path(os.environ.get("HY3DGEN_MODELS", "~/.cache/hy3dgen")).expanduser()
    candidates = [p / "config.yaml", p.parent / "config.yaml" if p.is_file() else None,
                  root / str(model) / "hunyuan3d-dit-v2-0" / "config.yaml"]
    return next((c for c in candidates if c is not None and c.is_file()), None)


def read_model_config(path: Path) -> dict:
    """Parse and check a hy3dgen ``config.yaml`` (:func:`check_model_config`); one-line errors."""
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ModelConfigError(f"{path}: not valid YAML ({problem}{where}); restore the model's config.yaml.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"{path}: cannot read it ({e}); check the file and its permissions.") from None
    check_model_config(config, path)
    return config


def check_model_config(config, path: Path) -> None:
    """What hy3dgen would otherwise fail on deep inside the model build: missing sections, and DiT
    settings that disagree (``Got [64] but expected positional dim 6``)."""
    fix = "restore the model's config.yaml (it must match model.fp16.safetensors)"
    if not isinstance(config, dict):
        raise ModelConfigError(f"{path}: holds a {type(config).__name__}, not hy3dgen's sections "
                               f"({', '.join(CONFIG_SECTIONS)}); {fix}.")
    missing = [k for k in CONFIG_SECTIONS if not isinstance(config.get(k), dict) or "target" not in config[k]]
    if missing:
        raise ModelConfigError(f"{path}: no {', '.join(missing)} section with a 'target'; {fix}.")
    params = {**DIT_DEFAULTS, **(config["model"].get("params") or {})}
    try:
        hidden, heads = int(params["hidden_size"]), int(params["num_heads"])
        axes = [int(v) for v in params["axes_dim"]]
    except (TypeError, ValueError):
        raise ModelConfigError(f"{path}: model.params hidden_size, num_heads and axes_dim must be integers; {fix}.") from None
    if heads <= 0 or hidden % heads or sum(axes) != hidden // heads:
        raise ModelConfigError(
            f"{path}: model.params hidden_size {hidden} / num_heads {heads} does not match axes_dim {axes} "
            f"(sum {sum(axes)}; missing keys take hy3dgen's full-size defaults); {fix}."
        )


def geometry_from_config(config: dict | None) -> dict:
    """The geometry settings (see :data:`DEFAULT_GEOMETRY`) read from a hy3dgen ``config.yaml``."""
    geo = dict(DEFAULT_GEOMETRY)
    if not config:
        return geo
    try:
        enc = (config.get("conditioner", {}).get("params") or {}).get("main_image_encoder", {}).get("kwargs", {})
        geo["image_size"] = int(enc.get("image_size", 224))  # hy3dgen's ImageEncoder default
        geo["use_cls_token"] = bool(enc.get("use_cls_token", True))
        geo["patch_size"] = int((enc.get("config") or {}).get("patch_size", 14))
        proc = config.get("image_processor", {}).get("params") or {}
        geo["processor_size"] = int(proc.get("size", 512))
        if proc.get("border_ratio") is not None:
            geo["border_ratio"] = float(proc["border_ratio"])
    except (AttributeError, TypeError, ValueError) as e:
        raise ModelConfigError(f"config.yaml: unreadable conditioner/image_processor settings ({e}); "
                               "restore the model's config.yaml.") from None
    if geo["image_size"] < geo["patch_size"] or geo["patch_size"] <= 0 or geo["processor_size"] <= 0:
        raise ModelConfigError(f"config.yaml: image_size {geo['image_size']} / patch_size {geo['patch_size']} / "
                               f"size {geo['processor_size']} give no token grid; restore the model's config.yaml.")
    return geo


def _default_model_or_none():
    from .generate import ModelNotFoundError, resolve_model

    try:
        return resolve_model(None)
    except ModelNotFoundError:
        return None  # Hunyuan3D 2.0's geometry


def geometry_pipeline(model: str | Path | None = None, geometry: dict | None = None):
    """A stand-in with the attributes :func:`timi_torch.condition_token_masks` reads (hy3dgen's real
    ``ImageProcessorV2`` and the conditioner's torchvision transform) and no network weights."""
    from hy3dgen.shapegen.preprocessors import ImageProcessorV2
    from torchvision import transforms

    if geometry is None:
        path = model_config_path(model)
        try:
            geometry = geometry_from_config(read_model_config(path) if path is not None else None)
        except ModelConfigError as e:
            msg = str(e)
            if not msg.startswith("config.yaml:"):
                raise
            raise ModelConfigError(f"{path}:{msg[len('config.yaml:'):]}") from None
    geo = geometry
    S, patch = geo["image_size"], geo["patch_size"]
    processor = ImageProcessorV2(size=geo["processor_size"], border_ratio=geo["border_ratio"])
    encoder = types.SimpleNamespace(
        transform=transforms.Compose([
            transforms.Resize(S, transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(S),
        ]),
        model=types.SimpleNamespace(config=types.SimpleNamespace(patch_size=patch)),
        use_cls_token=geo["use_cls_token"],
        num_patches=(S // patch) ** 2 + int(geo["use_cls_token"]),
    )

    def prepare_image(image):
        return processor(image)

    return types.SimpleNamespace(
        image_processor=processor,
        conditioner=types.SimpleNamespace(main_image_encoder=encoder),
        prepare_image=prepare_image,
        geometry=geo,
    )


def grid_tokens(geometry: dict) -> int:
    """Number of patch tokens (the most instances the grid can hold)."""
    g = geometry["image_size"] // geometry["patch_size"]
    return g * g


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


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
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

    from .generate import prepare_masks, resolve_model, run_cli, split_image_and_masks
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

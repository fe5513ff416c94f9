"""``--report DIR``: pictures that show what the guidance did (all headless, CPU, matplotlib).

* ``instance_maps_layer<l>.png`` - for each recorded denoising step (rows) and instance (columns):
  where the 3D latent tokens that belong to instance ``k`` look in the image. With ``A_zc`` the
  head-averaged 3D-to-image attention of guided layer ``l`` (paper Eq.1), ``P = A_zc M^T`` (Eq.2)
  and ``W`` its token weights (Eq.3, normalised over the latent tokens), the map is
  ``R_k = W_{:,k}^T A_zc`` over the condition tokens, drawn on the conditioner's view of the image
  with the instance's mask outlined. Its *purity* is the share of ``R_k``'s mass on masked tokens
  that falls on instance ``k``'s own tokens: 1 means instance-k tokens only look at instance k.
  They are recorded from the denoiser's own conditional forward at each step (after TIMI's update
  on guided steps), so a ``--no-timi`` run records the same pictures for comparison, by
  :class:`AttentionRecorder`, a hook passed to the pipeline's call (nothing is replaced).
* ``guidance.png`` - ``L_sep`` (Eq.4), lambda (Eq.6) and the max latent update per guided step,
  and the purity of every recorded step and layer.
* ``views.png`` - the result seen from the front (the input view), the side, the top and a
  three-quarter view, each instance in the colour of its own pixels (:func:`instance_view_colors`;
  a palette when two of them look alike, as the legend says; grey: parts no mask claims), rendered by
  z-buffered surface-point splatting.
* ``masks_on_tokens.png`` - the masks on the condition-token grid (as ``timi inspect``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import trimesh

__all__ = ["AttentionRecorder", "instance_image_maps", "plot_instance_maps", "plot_guidance", "render_views",
           "plot_views", "instance_view_colors", "write_summary", "write_report"]

#: Colours closer than this (RGB in [0, 1]) are told apart badly: instances that would look alike, or
#: like the views' white background or the unclaimed parts' grey, take the palette instead.
MIN_COLOR_DISTANCE = 0.2
#: The colour of the parts no mask claims.
UNCLAIMED_COLOR = np.array([0.6, 0.6, 0.6, 1.0])


# -------------------------------------------------------------------------------- recording


def instance_image_maps(q_z, k, tokens, eps: float = 1e-6, head_chunk: int = 4):
    """Image-space instance maps ``R`` (K, M) and ``P`` (L, K) from one block's queries/keys.

    ``q_z`` (H, L, D) latent queries, ``k`` (H, M + L, D) keys, ``tokens`` (K, M) masks. The
    attention is the softmax over the whole joint sequence (Eq.1), averaged over heads (in chunks
    of ``head_chunk`` heads to bound memory): ``timi_torch.guidance.condition_attention``, the
    adapter's explicit Eq.2 path.
    """
    import timi_core
    from timi_torch.guidance import condition_attention

    a_zc = condition_attention(q_z, k, tokens.shape[-1], head_chunk=head_chunk)   # (L, M), Eq.1 block A_zc
    P = timi_core.instance_probability(a_zc, tokens.to(a_zc))           # (L, K), Eq.2
    W = timi_core.spatial_weights(P, eps)                                 # (L, K), Eq.3
    R = W.transpose(0, 1) @ a_zc                                          # (K, M)
    return R, P


def purity(R: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """(K,) share of each instance map's mass on masked tokens that lies on its own mask."""
    own = (R * tokens).sum(1)
    any_mask = (R * tokens.sum(0, keepdims=True)).sum(1)
    return own / np.maximum(any_mask, 1e-12)


def instance_key_cosine(k, tokens) -> np.ndarray:
    """(K, K) cosine between the instances' mean key vectors, averaged over heads.

    ``k`` (H, M + L, D) keys of one block (condition tokens first), ``tokens`` (K, M) masks; each
    instance's mean key is the mask-weighted mean of its condition tokens' keys. Near 1: no query
    can tell the instances apart (issue 12's cause (b)).
    """
    import torch

    M = tokens.shape[-1]
    w = tokens.float() / tokens.float().sum(-1, keepdim=True).clamp_min(1e-12)        # (K, M)
    means = torch.einsum("km,hmd->hkd", w.to(k.device), k[:, :M].float())             # (H, K, D)
    means = torch.nn.functional.normalize(means, dim=-1)
    return (means @ means.transpose(-1, -2)).mean(0).cpu().numpy().astype(np.float64)


@dataclasses.dataclass
class StepMaps:
    step: int
    layer: int
    maps: np.ndarray     # (K, M) R over the condition tokens (prefix tokens included)
    purity: np.ndarray   # (K,)
    probability: np.ndarray | None = None  # (L, K) Eq.2's P of this layer and step
    key_cosine: np.ndarray | None = None   # (K, K) instance_key_cosine of this layer and step


class AttentionRecorder:
    """Records :func:`instance_image_maps` from the first ``layers`` double-stream blocks of the
    denoiser's conditional forward at the first ``steps`` denoising steps of a ``TIMIPipeline`` call.

    A hook the pipeline offers, nothing is replaced: pass it to the call,
    ``pipe(image, masks, ..., recorder=AttentionRecorder(cond.tokens, layers=4, steps=15))``; the
    pipeline asks :meth:`wants` each step and hands the blocks' q and k to :meth:`observe`
    (through ``timi_torch.guidance.observe_attention``). The guidance passes are not observed.
    The output's ``recordings`` are the :class:`StepMaps` in :attr:`records`. One image per call
    (batch 1); the conditional half of the CFG batch is the first sample.
    """

    def __init__(self, tokens, layers: int, steps: int):
        self.layers, self.steps = int(layers), int(steps)
        self.tokens = tokens.detach().float()
        self._tokens_np = self.tokens.cpu().numpy()
        self.records: list[StepMaps] = []

    def wants(self, step: int) -> bool:
        """Whether the forward of denoising step ``step`` is to be observed."""
        return 0 <= step < self.steps

    def observe(self, step: int, layer: int, q_z, k) -> None:
        """One guided layer's latent queries (B, H, L, D) and keys (B, H, M [+ L], D), condition
        tokens first, at ``step``: its maps, purity, P, key cosine."""
        R, P = instance_image_maps(q_z[0], k[0], self.tokens.to(q_z.device))
        R = R.cpu().numpy().astype(np.float64)
        self.records.append(StepMaps(step, layer, R, purity(R, self._tokens_np), P.cpu().numpy(),
                                     instance_key_cosine(k[0], self.tokens)))


# -------------------------------------------------------------------------------- plotting


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _pick_steps(steps: Sequence[int], n: int) -> list[int]:
    steps = sorted(set(steps))
    if len(steps) <= n:
        return steps
    idx = np.unique(np.round(np.linspace(0, len(steps) - 1, n)).astype(int))
    return [steps[i] for i in idx]


PANEL_PX = 256  #: side of one instance-map panel in pixels


def _instance_panel(grey: np.ndarray, heat: np.ndarray, crop: float, outline: np.ndarray, color) -> np.ndarray:
    """One (P, P, 3) panel: the greyed image, ``heat`` (gh, gw) in magma over its ``crop`` fraction
    (nearest cells, scaled to its maximum, 75 % opacity) and the mask ``outline`` in ``color``."""
    from matplotlib import colormaps

    P = grey.shape[0]
    panel = np.repeat(np.clip(grey / 1.6, 0, 1)[..., None], 3, axis=-1)
    side = int(round(crop * P))
    rows = np.minimum((np.arange(side) * heat.shape[0]) // side, heat.shape[0] - 1)
    cols = np.minimum((np.arange(side) * heat.shape[1]) // side, heat.shape[1] - 1)
    rgb = colormaps["magma"](heat[np.ix_(rows, cols)] / (heat.max() or 1.0))[..., :3]
    panel[:side, :side] = 0.25 * panel[:side, :side] + 0.75 * rgb
    panel[outline] = color
    return panel


def plot_instance_maps(records: Sequence[StepMaps], cond, names: Sequence[str], layer: int, max_rows: int = 6):
    """One figure for one layer: rows = steps, columns = instances (see module doc). The panels are
    composed as one picture (one axes), which draws in a fraction of a grid of axes' time."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    from .instances import instance_colors

    plt = _plt()
    recs = {r.step: r for r in records if r.layer == layer}
    steps = _pick_steps(list(recs), max_rows)
    K = cond.num_instances
    gh, gw = cond.grid
    pre = cond.prefix_tokens
    S = cond.frame_image.shape[0]
    P = PANEL_PX
    grey = np.asarray(Image.fromarray(cond.frame_image.astype(np.uint8)).convert("L").resize((P, P), Image.BILINEAR),
                      dtype=np.float64) / 255.0
    colors = instance_colors(K)[:, :3] / 255.0
    crop = gh * (S // gh) / S
    outlines = []
    for k in range(K):
        mask = np.asarray(Image.fromarray(cond.frame_masks[k].astype(np.uint8) * 255).resize((P, P), Image.NEAREST)) > 127
        outlines.append(find_boundaries(mask, mode="thick"))
    gap, row_gap = 6, 18                             # row_gap leaves room for the panel titles
    mosaic = np.ones((len(steps) * (P + row_gap) - row_gap, K * (P + gap) - gap, 3))
    for row, step in enumerate(steps):
        rec = recs[step]
        for k in range(K):
            heat = rec.maps[k, pre:].reshape(gh, gw)
            y, x = row * (P + row_gap), k * (P + gap)
            mosaic[y:y + P, x:x + P] = _instance_panel(grey, heat, crop, outlines[k], colors[k])
    # pixels placed as they are (figimage: no resampling); labels in pixel coordinates
    from .inspect_cmd import FIGURE_DPI

    left, top, dpi = 28, 40, FIGURE_DPI
    H, W = mosaic.shape[:2]
    fig = plt.figure(figsize=((W + left) / dpi, (H + top) / dpi), dpi=dpi)
    fig.figimage(mosaic, xo=left, yo=0)
    for row, step in enumerate(steps):
        rec = recs[step]
        y = H - row * (P + row_gap)                  # top of the row, from the figure's bottom
        fig.text(left - 4, y - P / 2, f"step {step}", rotation=90, ha="right", va="center", fontsize=9,
                 transform=None)
        for k in range(K):
            fig.text(left + k * (P + gap) + P / 2, y + 1, f"{names[k]}  purity {rec.purity[k]:.2f}", ha="center",
                     va="bottom", fontsize=8, color=colors[k], transform=None)
    fig.suptitle(f"where instance-k 3D tokens look in the image (W^T A_zc, each panel scaled to its maximum), "
                 f"layer {layer}", fontsize=9, y=1 - 4 / (H + top), va="top")
    return fig


def plot_guidance(diagnostics, records: Sequence[StepMaps], names: Sequence[str]):
    """L_sep, lambda and max update per guided step; the share of the update common to all tokens
    (raw gradient, after Eq.5, applied step); mean purity per recorded step and layer."""
    plt = _plt()
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.6))
    if diagnostics:
        steps = [d.step for d in diagnostics]
        axes[0].plot(steps, [d.loss[0] for d in diagnostics], "o-")
        axes[1].plot(steps, [d.scale[0] for d in diagnostics], "o-", color="tab:orange")
        axes[2].plot(steps, [d.max_update[0] for d in diagnostics], "o-", color="tab:green")
        for field, label, color in (("common_gradient", "raw dL/dz", "tab:gray"),
                                    ("common_smoothed", "after Eq.5", "tab:blue"),
                                    ("common_update", "applied step (Eq.7)", "tab:red")):
            values = [getattr(d, field) for d in diagnostics]
            if all(v is not None for v in values):
                axes[4].plot(steps, [v[0] for v in values], "o-", color=color, label=label)
        axes[4].set_ylim(0, 1.02)
        axes[4].legend(fontsize=8)
    else:
        for ax in (*axes[:3], axes[4]):
            ax.text(0.5, 0.5, "no guided steps\n(--no-timi or guided-steps 0)", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_title("L_sep (Eq.4), mean over guided layers")
    axes[1].set_title("lambda (Eq.6)")
    axes[2].set_title("max |update| of z (Eq.7)")
    for layer in sorted({r.layer for r in records}):
        rs = sorted((r for r in records if r.layer == layer), key=lambda r: r.step)
        axes[3].plot([r.step for r in rs], [float(np.mean(r.purity)) for r in rs], "o-", label=f"layer {layer}")
    axes[3].set_title("mean instance purity of the maps")
    axes[4].set_title("share of the update common to all tokens")
    axes[3].set_ylim(0, 1.02)
    if records:
        axes[3].legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("denoising step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------- views

VIEWS = {  # name: (azimuth about +y in degrees, elevation in degrees); front = the input view (+z)
    "front (input view)": (0.0, 0.0),
    "right side": (90.0, 0.0),
    "top": (0.0, 89.9),
    "three-quarter": (-40.0, 25.0),
}


def _view_rotation(azimuth: float, elevation: float) -> np.ndarray:
    """Rotation taking world points into a camera frame looking along -z (x right, y up)."""
    a, e = np.radians(azimuth), np.radians(elevation)
    ry = np.array([[np.cos(a), 0, -np.sin(a)], [0, 1, 0], [np.sin(a), 0, np.cos(a)]])
    rx = np.array([[1, 0, 0], [0, np.cos(e), -np.sin(e)], [0, np.sin(e), np.cos(e)]])
    return rx @ ry


def render_views(
    meshes: Sequence[trimesh.Trimesh | None],
    colors: np.ndarray,
    *,
    resolution: int = 256,
    samples: int = 200_000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """(resolution, resolution, 3) float images of the coloured meshes from :data:`VIEWS`.

    Surface points (area-weighted) are splatted into a z-buffer; Lambert shading from each point's
    face normal. All views share one scale so sizes compare.
    """
    present = [(m, c) for m, c in zip(meshes, colors) if m is not None and len(m.faces)]
    if not present:
        raise ValueError("render_views: no geometry to render.")
    total_area = sum(m.area for m, _ in present)
    pts, nrm, col = [], [], []
    for i, (m, c) in enumerate(present):
        n = max(2000, int(samples * m.area / max(total_area, 1e-12)))
        p, f = trimesh.sample.sample_surface(m, n, seed=seed + i)
        pts.append(p)
        nrm.append(m.face_normals[f])
        col.append(np.broadcast_to(np.asarray(c, dtype=np.float64)[:3], (len(p), 3)))
    pts, nrm, col = np.concatenate(pts), np.concatenate(nrm), np.concatenate(col)
    centre = (pts.min(0) + pts.max(0)) / 2
    radius = np.linalg.norm(pts - centre, axis=1).max() * 1.05
    light = np.array([-0.35, 0.5, 0.8]) / np.linalg.norm([-0.35, 0.5, 0.8])
    out = {}
    for name, (az, el) in VIEWS.items():
        R = _view_rotation(az, el)
        p = (pts - centre) @ R.T
        n = nrm @ R.T
        u = ((p[:, 0] / radius + 1) / 2 * resolution).astype(np.int64)
        v = ((1 - (p[:, 1] / radius + 1) / 2) * resolution).astype(np.int64)
        ok = (u >= 0) & (u < resolution) & (v >= 0) & (v < resolution)
        pix = v[ok] * resolution + u[ok]
        depth = p[ok, 2]
        zbuf = np.full(resolution * resolution, -np.inf)
        np.maximum.at(zbuf, pix, depth)                   # nearest surface (largest z) per pixel
        front = depth >= zbuf[pix]
        chosen = np.flatnonzero(ok)[front]
        shade = 0.35 + 0.65 * np.clip(np.abs(n[chosen] @ light), 0, 1)
        img = np.ones((resolution * resolution, 3))
        img[pix[front]] = col[chosen] * shade[:, None]
        out[name] = _fill_pinholes(img.reshape(resolution, resolution, 3), zbuf.reshape(resolution, resolution),
                                   tolerance=0.05 * radius)
    return out


def _fill_pinholes(img: np.ndarray, depth: np.ndarray, tolerance: float) -> np.ndarray:
    """Fix point-splatting gaps: empty pixels inside the silhouette, and pixels showing a surface
    behind a gap in a nearer one (a neighbour is nearer by more than ``tolerance``), take the
    colour of the nearest good pixel."""
    from scipy import ndimage

    hit = np.isfinite(depth)
    d = np.where(hit, depth, -np.inf)
    see_through = hit & (d < ndimage.maximum_filter(d, size=3) - tolerance)
    good = hit & ~see_through
    holes = (ndimage.binary_closing(hit, structure=np.ones((3, 3))) & ~hit) | see_through
    if holes.any() and good.any():
        _, (r, c) = ndimage.distance_transform_edt(~good, return_indices=True)
        img[holes] = img[r[holes], c[holes]]
    return img


def plot_views(views: dict[str, np.ndarray], names: Sequence[str], colors: np.ndarray, image=None, title: str = "",
               note: str = ""):
    """The views side by side, the input image first, and a legend of the instances' colours
    (``note``: what the colours are, :func:`instance_view_colors`)."""
    from matplotlib.patches import Patch

    plt = _plt()
    n = len(views) + (image is not None)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.8))
    i = 0
    if image is not None:
        axes[0].imshow(image)
        axes[0].set_title("input image", fontsize=9)
        i = 1
    for ax, (name, img) in zip(axes[i:], views.items()):
        ax.imshow(img)
        ax.set_title(name, fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=np.asarray(c)[:3], label=str(nm)) for nm, c in zip(names, colors)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False,
               title=note or None, title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def instance_view_colors(image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, str]:
    """(K, 4) RGBA colours in [0, 1] for the instances' meshes in ``views.png``, and what they are (the
    legend's note): each instance's own colour, the median of its pixels in the (H, W, 3) ``image``
    under its (K, H, W) mask, so the orange box is drawn orange; or, when two instances (or one and
    the white background or the unclaimed grey) would look alike, the instance palette
    (:func:`timi.instances.instance_colors`)."""
    from .instances import instance_colors

    rgb = np.asarray(image, dtype=np.float64)[..., :3] / 255.0
    own = np.array([np.median(rgb[m], axis=0) if m.any() else np.full(3, np.nan) for m in np.asarray(masks, bool)])
    others = np.vstack([own, np.ones(3), UNCLAIMED_COLOR[:3]])
    gaps = np.linalg.norm(own[:, None] - others[None], axis=-1)
    gaps[np.arange(len(own)), np.arange(len(own))] = np.inf
    if len(own) and np.isfinite(own).all() and gaps.min() >= MIN_COLOR_DISTANCE:
        return np.hstack([own, np.ones((len(own), 1))]), "colours: each instance's own (its pixels)"
    return instance_colors(len(own)) / 255.0, "colours: a palette (some instances' own colours look alike)"


def write_summary(path: str | Path, data: dict) -> Path:
    from .io import write_text

    def default(o):
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        return str(o)

    return write_text(path, json.dumps(data, indent=1, default=default))


def write_report(folder: Path, opts, result, cond, files: list | None = None) -> list[Path]:
    """All report PNGs and ``summary.json`` (module docstring) of one ``timi generate`` run:
    ``opts`` its ``GenerateOptions``, ``result`` its ``GenerateResult`` (whose ``recordings`` give
    the instance maps), ``cond`` the image's ``ConditionMasks``. ``files`` (appended to as each
    file is written) lets the caller remove a partial report."""
    import time

    import trimesh
    from PIL import Image

    from .inspect_cmd import overlay_figure, save_figure

    start = time.perf_counter()
    files = [] if files is None else files
    folder.mkdir(parents=True, exist_ok=True)
    names = result.masks.names
    files.append(save_figure(overlay_figure(cond, names, title=str(opts.image)), folder / "masks_on_tokens.png"))
    records = result.recordings
    for layer in sorted({r.layer for r in records}):
        fig = plot_instance_maps(records, cond, names, layer)
        files.append(save_figure(fig, folder / f"instance_maps_layer{layer}.png"))
    files.append(save_figure(plot_guidance(result.diagnostics, records, names), folder / "guidance.png"))
    split = result.split
    image = np.asarray(Image.open(opts.image).convert("RGB"))
    colors, note = instance_view_colors(image, result.masks.masks)
    unclaimed = [trimesh.util.concatenate([split.parts[i] for i in split.unclaimed])] if split.unclaimed else []
    meshes = list(split.meshes) + unclaimed
    cols = list(colors) + ([UNCLAIMED_COLOR] if split.unclaimed else [])
    labels = list(names) + (["unclaimed"] if split.unclaimed else [])
    views = render_views(meshes, np.asarray(cols))
    mode = "TIMI" if opts.timi else "no TIMI"
    files.append(save_figure(plot_views(views, labels, cols, image=image,
                                        title=f"{mode}, seed {opts.seed}, {opts.steps} steps", note=note),
                               folder / "views.png"))
    summary = {
        "image": str(opts.image), "masks": [str(m) for m in opts.masks], "out": str(result.out),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()
                    if k not in ("image", "masks", "out")},
        "instances": names,
        "timings_s": {**result.timings, "report": time.perf_counter() - start},
        "diagnostics": [dataclasses.asdict(d) for d in result.diagnostics],
        "purity": [{"step": r.step, "layer": r.layer, "purity": r.purity} for r in records],
        "split": split.summary().splitlines(),
        "warnings": result.warnings,
    }
    files.append(write_summary(folder / "summary.json", summary))
    return files

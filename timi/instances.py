"""Per-instance meshes: split the generated geometry into connected parts and give each part to the
instance whose mask it lands in when seen from the input view.

TIMI (like hy3dgen) returns one mesh for the whole scene. MIDI returns one mesh per instance; to
offer the same we split the scene mesh into connected components (``trimesh``) and assign each
component by projecting it into the input image's instance masks.

Mesh frame -> image pixels (the "front view")
---------------------------------------------
hy3dgen meshes are in a right-handed frame with **+y up**, the input view looking from **+z**
towards -z, and image column ``u`` growing with +x (hy3dgen's texture renderer uses elevation 0,
azimuth 0 for that front view; the testbed renders with the same convention, see
:mod:`timi.testbed.render`). The projection is orthographic: ``u = u0 + s * x``,
``v = v0 - s * y`` (pixel units, pixel centres at ``+0.5``).

The scale ``s`` and offset ``(u0, v0)`` depend on hy3dgen's preprocessing: the image is cropped to
its foreground bounding box (alpha, or the union of the masks when there is no alpha), recentred
with a border and resized, and the DiT generates the object normalised into its box
(``bounds`` 1.01), so the mesh's front silhouette corresponds to the image's foreground box up to
one unknown uniform scale. :meth:`FrontView.fit` therefore maps the mesh's x/y bounding box onto the
foreground's pixel bounding box (same centre, longer sides equal); parts under 0.5 % of the surface
area (marching-cubes floaters) are left out of that box. When the camera is known (the
testbed's renders), :meth:`FrontView.from_extent` gives the exact mapping instead.

Assignment
----------
Each part is sampled on its surface; a depth buffer from dense samples of the whole mesh keeps the
nearest surface at each pixel (other points are hidden behind something), and the visible points
of a part vote with the label under them. Voting runs on the label map downsampled (nearest) to at
most 256 px on the longer side, so the samples cover the grid densely at any photo resolution. The part goes to the instance with most votes when that instance
holds at least ``min_share`` of the part's votes inside the image (background pixels vote for
"nobody"); otherwise the part is *unclaimed* and reported. A part hidden entirely behind others
votes with all its points. A part that several instances each claim a good share of (objects
generated fused together) is cut along the mask borders: visible faces take the instance under
them, hidden ones that of the nearest visible face.

The latent-token route (:func:`split_instances_by_tokens`, ``--assign tokens``) needs no camera:
Eq.2's ``P`` at the final latents says which instance each latent token belongs to, and hy3dgen's
ShapeVAE decodes every surface point by cross-attention to those tokens, so each point inherits the
instance mixture of the tokens it reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import trimesh

from .masks_io import label_map_from_masks

__all__ = [
    "FrontView",
    "PartAssignment",
    "InstanceSplit",
    "split_parts",
    "assign_parts",
    "split_instances",
    "cut_part",
    "instance_scene",
    "instance_colors",
    "node_names",
    "token_instance_map",
    "point_instance_probabilities",
    "split_instances_by_tokens",
]


@dataclass(frozen=True)
class FrontView:
    """Orthographic front camera: ``u = u0 + scale * x``, ``v = v0 - scale * y`` (pixels), depth = +z."""

    scale: float
    u0: float
    v0: float
    height: int
    width: int

    @classmethod
    def from_extent(cls, height: int, width: int, extent: float = 1.0) -> "FrontView":
        """The testbed camera: the image covers ``[-extent, extent]`` in x and y."""
        return cls(scale=width / (2.0 * extent), u0=width / 2.0, v0=height / 2.0, height=height, width=width)

    @classmethod
    def fit(cls, vertices: np.ndarray, foreground: np.ndarray) -> "FrontView":
        """Map the x/y bounding box of ``vertices`` onto the pixel bounding box of ``foreground`` (H, W)."""
        foreground = np.asarray(foreground, dtype=bool)
        if not foreground.any():
            raise ValueError("FrontView.fit: the foreground is empty; pass the masks' union or the alpha mask.")
        rows, cols = np.nonzero(foreground)
        v_lo, v_hi = rows.min(), rows.max() + 1.0
        u_lo, u_hi = cols.min(), cols.max() + 1.0
        lo, hi = np.asarray(vertices)[:, :2].min(0), np.asarray(vertices)[:, :2].max(0)
        ext = hi - lo
        if not np.all(np.isfinite(ext)) or ext.max() <= 0:
            raise ValueError("FrontView.fit: the mesh has no extent in x/y.")
        scale = max(u_hi - u_lo, v_hi - v_lo) / ext.max()
        cx, cy = (lo + hi) / 2.0
        u0 = (u_lo + u_hi) / 2.0 - scale * cx
        v0 = (v_lo + v_hi) / 2.0 + scale * cy
        return cls(float(scale), float(u0), float(v0), foreground.shape[0], foreground.shape[1])

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) points -> integer pixel (row, col) of each point; may fall outside the image."""
        points = np.asarray(points, dtype=np.float64)
        u = self.u0 + self.scale * points[:, 0]
        v = self.v0 - self.scale * points[:, 1]
        return np.floor(v).astype(np.int64), np.floor(u).astype(np.int64)


@dataclass
class PartAssignment:
    """One connected part: its instance (index into the masks, or -1 when unclaimed) and its votes."""

    index: int
    instance: int
    faces: int
    votes: np.ndarray  # (K + 1,) votes: background, instance 0, ..., instance K-1
    visible: bool
    cut_from: int | None = None  # a piece cut out of a fused part: that part's index in ``parts``

    @property
    def share(self) -> float:
        total = self.votes.sum()
        return float(self.votes[self.instance + 1] / total) if total and self.instance >= 0 else 0.0


@dataclass
class InstanceSplit:
    """The result of :func:`split_instances`: one mesh per instance (None when it got no part)."""

    meshes: list[trimesh.Trimesh | None]
    names: list[str]
    parts: list[trimesh.Trimesh]
    assignments: list[PartAssignment]
    unclaimed: list[int] = field(default_factory=list)

    @property
    def found(self) -> int:
        """How many instances received geometry."""
        return sum(m is not None for m in self.meshes)

    def summary(self) -> str:
        lines = []
        for k, (name, mesh) in enumerate(zip(self.names, self.meshes)):
            n_parts = sum(a.instance == k for a in self.assignments)
            faces = 0 if mesh is None else len(mesh.faces)
            lines.append(f"instance {k} ({name}): {n_parts} part(s), {faces} faces" + ("" if mesh is not None else "  <- no geometry"))
        cut = sorted({a.cut_from for a in self.assignments if a.cut_from is not None})
        if cut:
            lines.append(f"cut: {len(cut)} fused part(s) cut along the mask borders")
        if self.unclaimed:
            faces = sum(a.faces for a in self.assignments if a.index in self.unclaimed)
            lines.append(f"unclaimed: {len(self.unclaimed)} part(s), {faces} faces (no instance holds half of their votes)")
        return "\n".join(lines)


def split_parts(mesh: trimesh.Trimesh) -> list[trimesh.Trimesh]:
    """Connected components of a mesh (faces sharing an edge), largest first."""
    parts = mesh.split(only_watertight=False)
    return sorted(parts, key=lambda p: -len(p.faces))


def _surface_points(part: trimesh.Trimesh, count: int, seed: int) -> np.ndarray:
    """Area-weighted surface samples plus (up to ``count``) vertices, so tiny parts get points too."""
    verts = np.asarray(part.vertices)
    if len(verts) > count:
        verts = verts[np.random.default_rng(seed).choice(len(verts), count, replace=False)]
    if part.area > 0:
        pts, _ = trimesh.sample.sample_surface(part, count, seed=seed)
        return np.concatenate([pts, verts], axis=0)
    return verts


def assign_parts(
    parts: Sequence[trimesh.Trimesh],
    masks: np.ndarray,
    view: FrontView,
    *,
    samples_per_part: int = 4000,
    min_share: float = 0.5,
    depth_tolerance_px: float = 2.0,
    seed: int = 0,
) -> list[PartAssignment]:
    """Assign each part to an instance by visible-point votes in the front view (see module doc)."""
    return _vote(parts, masks, view, samples_per_part, min_share, depth_tolerance_px, seed)[0]


#: Voting and the depth buffer run on a grid whose longer side is at most this many pixels, so the
#: surface samples cover it densely whatever the photo's resolution.
WORK_RESOLUTION = 256


def _working_grid(labels: np.ndarray, view: FrontView, limit: int = WORK_RESOLUTION):
    """Nearest-neighbour downsampling of the label map and the matching view (pixel centres)."""
    H, W = labels.shape
    f = min(1.0, limit / max(H, W))
    if f == 1.0:
        return labels, view
    Hw, Ww = max(1, round(H * f)), max(1, round(W * f))
    rows = np.minimum(((np.arange(Hw) + 0.5) * H / Hw).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(Ww) + 0.5) * W / Ww).astype(np.int64), W - 1)
    fy, fx = Hw / H, Ww / W
    return labels[np.ix_(rows, cols)], FrontView(view.scale * fx, view.u0 * fx, view.v0 * fy, Hw, Ww)


def _depth_buffer(parts, view: FrontView, per_pixel: float = 8.0, seed: int = 0) -> np.ndarray:
    """(H*W,) nearest depth (largest z) per pixel from dense area-weighted surface samples."""
    H, W = view.height, view.width
    mesh = trimesh.util.concatenate(list(parts))
    n = int(min(4_000_000, max(50_000, per_pixel * H * W)))
    pts = trimesh.sample.sample_surface(mesh, n, seed=seed)[0] if mesh.area > 0 else np.asarray(mesh.vertices)
    pts = np.concatenate([pts, mesh.vertices], axis=0)
    rows, cols = view.project(pts)
    inside = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
    zbuf = np.full(H * W, -np.inf)
    np.maximum.at(zbuf, rows[inside] * W + cols[inside], pts[inside, 2])
    return zbuf


def _vote(parts, masks, view, samples_per_part, min_share, depth_tolerance_px, seed):
    """:func:`assign_parts`, plus the working label map, view and depth buffer it used."""
    masks = np.asarray(masks, dtype=bool)
    K, H, W = masks.shape
    if (H, W) != (view.height, view.width):
        raise ValueError(f"assign_parts: masks are {W}x{H} but the view is {view.width}x{view.height}.")
    labels, view = _working_grid(label_map_from_masks(masks), view)
    H, W = labels.shape
    n = len(parts)
    if n == 0:
        return [], labels, view, np.full(H * W, -np.inf)
    zbuf = _depth_buffer(parts, view, seed=seed)
    points = [_surface_points(p, samples_per_part, seed + i) for i, p in enumerate(parts)]
    owner = np.concatenate([np.full(len(p), i) for i, p in enumerate(points)])
    allpts = np.concatenate(points, axis=0)
    rows, cols = view.project(allpts)
    inside = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
    flat = rows[inside] * W + cols[inside]
    visible = np.zeros(len(allpts), dtype=bool)
    visible[inside] = allpts[inside, 2] >= zbuf[flat] - depth_tolerance_px / view.scale
    label = np.zeros(len(allpts), dtype=np.int64)
    label[inside] = labels[rows[inside], cols[inside]]

    def votes(sel):  # (parts, K + 1) label counts of the selected points
        return np.bincount(owner[sel] * (K + 1) + label[sel], minlength=n * (K + 1)).reshape(n, K + 1)

    seen = votes(visible)
    hidden = votes(inside)
    out = []
    for i, part in enumerate(parts):
        was_seen = bool(seen[i].sum() > 0)
        v = seen[i] if was_seen else hidden[i]   # a part hidden behind others votes with all its points
        best = int(np.argmax(v[1:])) if K else -1
        total = v.sum()
        claimed = total > 0 and v[best + 1] > 0 and v[best + 1] >= min_share * total
        out.append(PartAssignment(i, best if claimed else -1, len(part.faces), v.astype(np.int64), was_seen))
    return out, labels, view, zbuf


def cut_part(
    part: trimesh.Trimesh,
    labels: np.ndarray,
    view: FrontView,
    zbuf: np.ndarray,
    candidates: Sequence[int],
    depth_tolerance_px: float = 2.0,
) -> dict[int, trimesh.Trimesh]:
    """Cut one connected part that several instances claim along the mask borders.

    Faces whose centre is visible in the front view take the instance under it (when it is one of
    ``candidates``, 0-based); every other face (hidden, or on background) takes the instance of the
    nearest such face centre in 3D. Returns {instance: piece}; empty when no face is visible on a
    candidate's mask.
    """
    from scipy.spatial import cKDTree

    H, W = view.height, view.width
    centres = part.triangles_center
    rows, cols = view.project(centres)
    inside = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
    face_label = np.full(len(centres), -1, dtype=np.int64)
    idx = np.flatnonzero(inside)
    pix = rows[idx] * W + cols[idx]
    seen = centres[idx, 2] >= zbuf[pix] - depth_tolerance_px / view.scale
    lab = labels[rows[idx], cols[idx]] - 1
    ok = seen & np.isin(lab, np.asarray(candidates))
    face_label[idx[ok]] = lab[ok]
    known = face_label >= 0
    if not known.any():
        return {}
    if not known.all():
        _, nearest = cKDTree(centres[known]).query(centres[~known])
        face_label[~known] = face_label[known][nearest]
    return {int(k): part.submesh([np.flatnonzero(face_label == k)], append=True) for k in np.unique(face_label)}


def _body_vertices(parts: Sequence[trimesh.Trimesh], min_area_fraction: float = 0.005) -> np.ndarray:
    """Vertices of the parts that make up the shape, leaving out floaters (parts under 0.5 % of the
    total area), which marching cubes leaves around and which would stretch the fitted box."""
    areas = np.array([p.area for p in parts])
    keep = [p for p, a in zip(parts, areas) if a >= min_area_fraction * areas.sum()] or list(parts)
    return np.concatenate([p.vertices for p in keep], axis=0)


def instance_colors(k: int) -> np.ndarray:
    """(k, 4) uint8 RGBA colours, distinct for up to 20 instances (matplotlib's tab20 order)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if k <= 10 else colormaps["tab20"]
    return (np.asarray([cmap(i % cmap.N) for i in range(k)]) * 255).round().astype(np.uint8)


def split_instances(
    mesh: trimesh.Trimesh,
    masks: np.ndarray,
    *,
    names: Sequence[str] | None = None,
    view: FrontView | None = None,
    foreground: np.ndarray | None = None,
    cut_fused: bool = True,
    cut_share: float = 0.15,
    **assign_kw,
) -> InstanceSplit:
    """Split ``mesh`` into one mesh per instance of ``masks`` (K, H, W) in the input image's frame.

    ``view`` defaults to :meth:`FrontView.fit` on ``foreground`` (default: the masks' union). With
    ``cut_fused``, a connected part on which two or more instances each hold at least ``cut_share``
    of the votes (objects generated fused together) is cut along the mask borders (:func:`cut_part`)
    instead of going whole to one instance. ``assign_kw``: see :func:`assign_parts`.
    """
    masks = np.asarray(masks, dtype=bool)
    K = masks.shape[0]
    names = list(names) if names is not None else [f"instance_{k + 1:02d}" for k in range(K)]
    parts = split_parts(mesh)
    if view is None:
        view = FrontView.fit(_body_vertices(parts), masks.any(0) if foreground is None else foreground)
    opts = dict(samples_per_part=4000, min_share=0.5, depth_tolerance_px=2.0, seed=0)
    opts.update(assign_kw)
    assignments, labels, work_view, zbuf = _vote(parts, masks, view, **opts)
    if cut_fused:
        parts, assignments = list(parts), list(assignments)
        for a in list(assignments):
            inst = a.votes[1:]
            candidates = [k for k in range(K) if inst.sum() and inst[k] >= cut_share * inst.sum()]
            if len(candidates) < 2:
                continue
            pieces = cut_part(parts[a.index], labels, work_view, zbuf, candidates, opts["depth_tolerance_px"])
            if len(pieces) < 2:
                continue
            a.instance = -2  # replaced by its pieces
            for k, piece in pieces.items():
                parts.append(piece)
                assignments.append(PartAssignment(len(parts) - 1, k, len(piece.faces), a.votes, True, cut_from=a.index))
        assignments = [a for a in assignments if a.instance != -2]
    meshes: list[trimesh.Trimesh | None] = []
    for k in range(K):
        mine = [parts[a.index] for a in assignments if a.instance == k]
        meshes.append(trimesh.util.concatenate(mine) if mine else None)
    unclaimed = [a.index for a in assignments if a.instance < 0]
    return InstanceSplit(meshes, names, list(parts), assignments, unclaimed)


def instance_scene(split: InstanceSplit, *, include_unclaimed: bool = True, colored: bool = True) -> trimesh.Scene:
    """A scene with one named node per instance that got geometry (plus ``unclaimed`` if any)."""
    scene = trimesh.Scene()
    colors = instance_colors(len(split.names))
    for k, (name, mesh) in enumerate(zip(split.names, split.meshes)):
        if mesh is None:
            continue
        mesh = mesh.copy()
        if colored:
            mesh.visual.face_colors = colors[k]
        node = node_names(split.names)[k]
        scene.add_geometry(mesh, node_name=node, geom_name=node)
    if include_unclaimed and split.unclaimed:
        rest = trimesh.util.concatenate([split.parts[i] for i in split.unclaimed])
        if colored:
            rest.visual.face_colors = (160, 160, 160, 255)
        scene.add_geometry(rest, node_name="unclaimed", geom_name="unclaimed")
    return scene


def node_names(names: Sequence[str]) -> list[str]:
    """Scene-node names for instances: file-safe, unique (a repeated name gets ``_2``, ``_3`` ...)."""
    out: list[str] = []
    for k, name in enumerate(names):
        clean = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)).strip("_") or f"instance_{k + 1:02d}"
        base, n = clean, 2
        while clean in out or clean == "unclaimed":
            clean, n = f"{base}_{n}", n + 1
        out.append(clean)
    return out


# ------------------------------------------------------------------ the latent-token route


def token_instance_map(pipe, latents, cond, *, layers: int | None = None, timestep: float = 1.0):
    """(L, K) float32: how much each latent token belongs to each instance, at the final latents.

    Eq.2's ``P = A_zc M^T`` from the DiT's conditional forward on ``latents`` at ``timestep``
    (1.0 = data in hy3dgen's flow convention), averaged over the first ``layers`` double-stream
    blocks (default: the pipeline's guided layers), each row normalised to sum to 1.
    ``pipe``: a ``timi_torch.TIMIPipeline`` or ``timi_jax.TIMIPipelineJAX`` (its hy3dgen ``base``
    is used); ``cond``: the image's ``ConditionMasks``.
    """
    import torch
    from timi_torch.frontend import prepare_inputs
    from timi_torch.guidance import guidable_layers, guided_probabilities

    base = pipe.base
    depth = guidable_layers(base.model)
    n = min(layers or pipe.config.guided_layers, depth)
    inputs = prepare_inputs(base, cond.image, cond, do_classifier_free_guidance=False)
    with torch.no_grad():
        z = latents[:1].to(base.device, base.dtype)
        t = torch.full((1,), timestep, device=base.device, dtype=base.dtype)
        Ps = guided_probabilities(base.model, z, t, inputs.cond_main, inputs.tokens, n)
    P = torch.stack(Ps).mean(0)[0].float()
    return P / P.sum(-1, keepdim=True).clamp_min(1e-12)


def point_instance_probabilities(vae, latents, token_map, points: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """(N, K): each point's instance distribution carried from the latent tokens.

    hy3dgen's ShapeVAE decodes occupancy at a point by cross-attention from the point to the
    latent tokens (``geo_decoder``). Replacing the values of that attention by ``token_map`` (L, K)
    gives ``sum_v a(p, v) token_map[v]`` per head (averaged over heads): the instance mixture of the
    tokens the decoder reads for this point. Rows sum to 1 when ``token_map``'s rows do. Uses the
    decoder's own processor hook and restores the original processor afterwards.
    """
    import torch
    import torch.nn.functional as F

    dec = vae.geo_decoder
    attention = dec.cross_attn_decoder.attn.attention
    original = attention.attn_processor
    recorded: list = []

    def processor(attn, q, k, v):
        vals = token_map.to(device=q.device, dtype=torch.float32)[None, None].expand(k.shape[0], k.shape[1], -1, -1)
        recorded.append(F.scaled_dot_product_attention(q.float(), k.float(), vals).mean(1)[0])
        return original(attn, q, k, v)

    out = []
    with torch.no_grad():
        lat = vae(latents[:1].to(next(vae.parameters()).dtype) / vae.scale_factor)
        attention.attn_processor = processor
        try:
            for s in range(0, len(points), chunk):
                q = torch.as_tensor(np.asarray(points[s:s + chunk]), dtype=lat.dtype, device=lat.device)[None]
                dec(queries=q, latents=lat)
                out.append(recorded.pop().cpu().numpy())
        finally:
            attention.attn_processor = original
    return np.concatenate(out, axis=0) if out else np.zeros((0, token_map.shape[1]))


def split_instances_by_tokens(
    mesh: trimesh.Trimesh,
    pipe,
    latents,
    cond,
    *,
    names: Sequence[str] | None = None,
    samples_per_part: int = 1000,
    min_share: float = 0.5,
    token_map=None,
    seed: int = 0,
) -> InstanceSplit:
    """Like :func:`split_instances`, but each part's points vote with the instance the latent
    tokens they are decoded from belong to (:func:`token_instance_map`,
    :func:`point_instance_probabilities`) instead of a projection into the image. No camera
    model is needed and hidden parts vote like visible ones; it relies on the DiT's attention."""
    K = cond.num_instances
    names = list(names) if names is not None else [f"instance_{k + 1:02d}" for k in range(K)]
    tmap = token_instance_map(pipe, latents, cond) if token_map is None else token_map
    parts = split_parts(mesh)
    points = [_surface_points(p, samples_per_part, seed + i) for i, p in enumerate(parts)]
    probs = point_instance_probabilities(pipe.base.vae, latents, tmap, np.concatenate(points, axis=0))
    best = probs.argmax(1)
    assignments, start = [], 0
    for i, (part, pts) in enumerate(zip(parts, points)):
        votes = np.concatenate([[0], np.bincount(best[start:start + len(pts)], minlength=K)]).astype(np.int64)
        start += len(pts)
        k = int(np.argmax(votes[1:]))
        claimed = votes[k + 1] >= min_share * votes.sum()
        assignments.append(PartAssignment(i, k if claimed else -1, len(part.faces), votes, True))
    meshes = []
    for k in range(K):
        mine = [parts[a.index] for a in assignments if a.instance == k]
        meshes.append(trimesh.util.concatenate(mine) if mine else None)
    return InstanceSplit(meshes, names, list(parts), assignments, [a.index for a in assignments if a.instance < 0])

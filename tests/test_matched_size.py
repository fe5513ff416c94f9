"""Matched-size scoring (issue 27): one latent decoded at several iso levels, the level whose surface
area equals a target, and what it does to a run that only shrinks every shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage import measure

from timi.evaluation.sizes import IsoSurfaces, match_area, mesh_size
from timi.metrics import score_scene

REPO = Path(__file__).resolve().parents[1]
SCORE = dict(points_per_object=600, icp_points=300, seed=0)


# ------------------------------------------------------------------ an analytic field
def _dumbbell(n: int = 56):
    """Two balls (radius 0.3, centres x = +-0.36) joined by a thin bar whose field peaks at 0.04: at
    level 0 one part (fused), at level 0.06 two (the bar is gone and the balls are a little smaller)."""
    ax = np.linspace(-1.0, 1.0, n + 1)
    x, y, z = np.meshgrid(ax, ax, ax, indexing="ij")
    balls = [0.3 - np.sqrt((x - c) ** 2 + y ** 2 + z ** 2) for c in (-0.36, 0.36)]
    bar = np.where(np.abs(x) < 0.36, 0.12 - np.sqrt(y ** 2 + z ** 2), -1.0) - 0.08
    field = np.maximum(np.maximum(*balls), bar)
    spacing = 2.0 / n

    def extract(level: float):
        if not field.min() < level < field.max():
            return None
        v, f, _, _ = measure.marching_cubes(field, level)
        return trimesh.Trimesh(v * spacing - 1.0, f)

    gt = [trimesh.creation.icosphere(subdivisions=3, radius=0.3).apply_translation([c, 0, 0]) for c in (-0.36, 0.36)]
    return field, extract, gt


def test_a_uniform_shrink_gains_no_ssr_at_matched_size():
    field, extract, gt = _dumbbell()
    base = extract(0.0)
    shrunk = IsoSurfaces(extract, float(field.min()), float(field.max()), level=0.06)   # a run that only shrinks
    base_scores = score_scene(base, gt, **SCORE)
    own = score_scene(shrunk.extract(shrunk.level), gt, **SCORE)
    assert (base_scores.n_pred, own.n_pred) == (1, 2) and own.ssr > base_scores.ssr   # shrinking "separates"
    match = match_area(shrunk, mesh_size(base)[0])
    assert match.matched and abs(match.area - mesh_size(base)[0]) <= 1e-3 * mesh_size(base)[0]
    assert abs(match.level) < 0.01                               # back at the base's level ...
    assert score_scene(match.mesh, gt, **SCORE).ssr == base_scores.ssr   # ... and at its SSR


@settings(max_examples=15, deadline=None)
@given(st.floats(0.05, 0.95))
def test_match_area_reaches_any_area_between_the_extremes(fraction):
    field, extract, _ = _dumbbell(40)
    surfaces = IsoSurfaces(extract, float(field.min()), float(field.max()))
    areas = [mesh_size(extract(lv))[0] for lv in (-0.2, 0.25)]
    target = areas[1] + fraction * (areas[0] - areas[1])
    match = match_area(surfaces, target)
    assert match.matched and abs(match.area - target) <= 1e-3 * target
    assert -0.2 <= match.level <= 0.25


def test_a_target_out_of_reach_is_reported_not_faked():
    field, extract, _ = _dumbbell(40)
    match = match_area(IsoSurfaces(extract, float(field.min()), float(field.max())), 1e4)
    assert not match.matched and match.area < 1e4
    with pytest.raises(ValueError, match="positive"):
        match_area(IsoSurfaces(extract, -1.0, 1.0), 0.0)


# ------------------------------------------------------------------ the shipped model's VAE
@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    """The shipped model's base latents of the example scene (5 steps), decoded once at octree 48."""
    pytest.importorskip("hy3dgen")
    from timi.evaluation.dataset import load_scene
    from timi.evaluation.generators import TIMITorchGenerator
    from timi_core import TIMIConfig

    scene = load_scene(REPO / "timi" / "assets" / "example")
    gen = TIMITorchGenerator(str(REPO / "timi" / "assets" / "testbed_model" / "hunyuan3d-dit-v2-0"), device="cpu",
                             steps=5, octree_resolution=48)
    mesh, _, _, latents = gen(scene.image, scene.masks, TIMIConfig(isg=False), 0)
    return gen, scene, mesh, latents, gen.iso_surfaces(latents)


@pytest.mark.xdist_group("heavy")
def test_matched_size_of_the_base_against_itself_is_the_identity(decoded, tmp_path):
    from timi.evaluation.dataset import load_mesh
    from timi.io import write_mesh

    _, scene, mesh, _, surfaces = decoded
    match = match_area(surfaces, mesh_size(mesh)[0])
    assert match.matched and match.level == surfaces.level == 0.0
    np.testing.assert_array_equal(match.mesh.vertices, mesh.vertices)        # the same mesh, bit for bit
    np.testing.assert_array_equal(match.mesh.faces, mesh.faces)
    write_mesh(mesh, tmp_path / "a.ply")
    write_mesh(match.mesh, tmp_path / "b.ply")
    a, b = (score_scene(load_mesh(tmp_path / f), scene.gt_meshes, **SCORE) for f in ("a.ply", "b.ply"))
    assert a == b


@pytest.mark.xdist_group("heavy")
@settings(max_examples=8, deadline=None)
@given(st.floats(0.05, 0.95), st.floats(0.05, 0.95))
def test_two_iso_levels_of_one_latent_give_nested_surfaces(decoded, u, v):
    _, _, _, _, surfaces = decoded
    lo, hi = sorted((u, v))
    if hi - lo < 0.05:
        return
    span = min(surfaces.high, 4.0) - max(surfaces.low, -4.0)
    low_level, high_level = max(surfaces.low, -4.0) + lo * span, max(surfaces.low, -4.0) + hi * span
    low, high = surfaces.extract(low_level), surfaces.extract(high_level)
    if low is None or high is None:
        return
    assert mesh_size(low)[1] >= mesh_size(high)[1]                # the lower level encloses more volume
    points = high.sample(300, seed=0) if hasattr(high, "sample") else high.vertices[:300]
    inside = trimesh.proximity.signed_distance(low, points)     # > 0 inside the lower level's surface
    assert inside.min() > -1e-4


@pytest.mark.xdist_group("heavy")
def test_base_latents_decoded_higher_gain_no_ssr_at_matched_size(decoded):
    gen, scene, mesh, latents, surfaces = decoded
    shrunk = IsoSurfaces(surfaces.extract, surfaces.low, surfaces.high, level=0.5)   # a known uniform shrink
    assert mesh_size(shrunk.extract(0.5))[0] < 0.97 * mesh_size(mesh)[0]
    match = match_area(shrunk, mesh_size(mesh)[0])
    assert match.matched and abs(match.level) < 0.05
    base = score_scene(mesh, scene.gt_meshes, **SCORE)
    assert score_scene(match.mesh, scene.gt_meshes, **SCORE).ssr == base.ssr

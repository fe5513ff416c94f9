"""Tests of timi.metrics: known-answer scenes, parity with brute force, alignment, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.distance import cdist
from scipy.spatial.transform import Rotation
from skimage.measure import marching_cubes

from timi.metrics import (chamfer_distance, count_instances, f_score, icp_align, icp_align_search,
                          layout_consistency_distance, match_parts_to_instances, normalize_per_axis,
                          part_count_class, sample_surface_points, scene_normalization, score_scene,
                          separation_success_rate, split_instances)

N = 1500  # points per object in tests (the default, 20480, is MIDI's and slower)


def three_objects() -> list[trimesh.Trimesh]:
    box = trimesh.creation.box((0.5, 0.5, 0.5)).apply_translation((-0.6, 0.0, 0.0))
    ball = trimesh.creation.icosphere(subdivisions=2, radius=0.3).apply_translation((0.6, 0.0, 0.0))
    can = trimesh.creation.cylinder(radius=0.2, height=0.6).apply_translation((0.0, 0.7, 0.1))
    return [box, ball, can]


def fused_boxes(gap: float) -> trimesh.Trimesh:
    """Marching-cubes surface of two unit-ish boxes side by side along x with ``gap`` between them."""
    h = 0.02
    x = np.arange(-1.2, 1.2 + h, h)
    gx, gy, gz = np.meshgrid(x, x, x, indexing="ij")
    inside_y_z = (np.abs(gy) < 0.3) & (np.abs(gz) < 0.3)
    left = (gx > -0.6 - gap / 2) & (gx < -gap / 2)
    right = (gx > gap / 2) & (gx < 0.6 + gap / 2)
    occ = ((left | right) & inside_y_z).astype(np.float32)
    verts, faces, _, _ = marching_cubes(occ, 0.5, spacing=(h, h, h))
    return trimesh.Trimesh(verts - 1.2, faces)


def two_boxes() -> list[trimesh.Trimesh]:
    return [trimesh.creation.box((0.6, 0.6, 0.6)).apply_translation((-0.3, 0, 0)),
            trimesh.creation.box((0.6, 0.6, 0.6)).apply_translation((0.3, 0, 0))]


# ---------------------------------------------------------------- known answers
@pytest.mark.parametrize("as_scene", [False, True], ids=["per-instance", "scene-mesh"])
def test_identical_prediction_scores_perfectly(as_scene):
    gt = three_objects()
    pred = trimesh.util.concatenate(gt) if as_scene else [m.copy() for m in gt]
    s = score_scene(pred, gt, points_per_object=N)
    assert s.cd_s == pytest.approx(0.0, abs=1e-20) and s.fs_s == 1.0
    assert s.cd_o == pytest.approx(0.0, abs=1e-12) and s.fs_o == 1.0
    assert s.lcd == pytest.approx(0.0, abs=1e-9) and s.ssr == 1.0
    assert (s.n_pred, s.n_gt) == (3, 3)


def test_translated_copy_gives_translation_in_lcd():
    gt = three_objects()
    t = np.array([0.04, -0.03, 0.02])
    pred = [m.copy().apply_translation(t) for m in gt]
    scale = scene_normalization(trimesh.util.concatenate(gt).bounds)[0, 0]
    s = score_scene(pred, gt, points_per_object=N, align="none")
    # Eqs.8-9: every centroid is |t| from its partner (and nearer than any other): both means = |t|.
    assert s.lcd == pytest.approx(2 * scale * np.linalg.norm(t), rel=1e-9)
    assert s.cd_s > 1e-4 and s.ssr == 1.0
    # ICP alignment removes a global translation again.
    aligned = score_scene(pred, gt, points_per_object=N, align="icp")
    assert aligned.lcd < 1e-6 and aligned.cd_s < 1e-10


def test_lcd_of_translated_centroids_is_twice_the_shift():
    c = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    t = np.array([0.1, 0.05, 0.0])
    assert layout_consistency_distance(c + t, c) == pytest.approx(2 * np.linalg.norm(t))


def test_two_touching_boxes_fused_into_one_part_give_ssr_half():
    fused = fused_boxes(gap=0.0)
    apart = fused_boxes(gap=0.1)
    assert count_instances(fused) == 1
    assert count_instances(apart) == 2
    gt = two_boxes()
    s = score_scene(fused, gt, points_per_object=N)
    assert s.ssr == 0.5 and (s.n_pred, s.n_gt) == (1, 2)
    # The fused part is shared by both instances. MIDI's per-axis normalisation stretches the
    # fused 2:1:1 block back to a cube, so only the missing inner walls lower FS-O; still lower.
    s_apart = score_scene(apart, gt, points_per_object=N)
    assert s_apart.ssr == 1.0 and s_apart.fs_o > s.fs_o and s_apart.cd_o < s.cd_o


def test_specks_below_the_area_fraction_are_not_instances():
    body = trimesh.creation.box((1.0, 1.0, 1.0))  # area 6
    speck = trimesh.creation.icosphere(subdivisions=1, radius=0.02).apply_translation((2, 0, 0))
    mesh = trimesh.util.concatenate([body, speck])
    assert speck.area / mesh.area < 1e-3
    assert count_instances(mesh) == 1
    assert count_instances(mesh, min_area_fraction=0.0) == 2
    assert split_instances(mesh, 0.0)[0].area == pytest.approx(body.area)  # largest first


def test_a_far_speck_does_not_shift_the_alignment():
    gt = three_objects()
    speck = trimesh.creation.icosphere(subdivisions=1, radius=0.01).apply_translation((3.0, 3.0, 0.0))
    pred = trimesh.util.concatenate([*gt, speck])
    s = score_scene(pred, gt, points_per_object=N)
    assert s.n_pred == 3 and s.lcd < 1e-2 and s.cd_o < 1e-4  # (speck inside the box: LCD 1.25)
    assert s.fs_s > 0.999  # only the speck's few points are far


def test_ssr_counts_fractured_prediction():
    gt = three_objects()
    halves = [trimesh.creation.box((0.24, 0.5, 0.5)).apply_translation((-0.73, 0, 0)),
              trimesh.creation.box((0.24, 0.5, 0.5)).apply_translation((-0.47, 0, 0))]
    pred = trimesh.util.concatenate(halves + gt[1:])
    s = score_scene(pred, gt, points_per_object=N, align="none")
    assert (s.n_pred, s.ssr) == (4, 0.75)
    assert s.fs_o > 0.9  # both halves are given to the box instance, which they rebuild


def test_matching_parts_to_instances():
    gt = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    # parts listed in another order
    assert match_parts_to_instances(gt[[2, 0, 1]] + 0.01, gt) == [[1], [2], [0]]
    # fused: one part between instances 0 and 1 -> both get it; instance 2 its own
    assert match_parts_to_instances(np.array([[0.5, 0, 0], [0, 1, 0]]), gt) == [[0], [0], [1]]
    # fractured: two parts near instance 0
    assert match_parts_to_instances(np.array([[0.1, 0, 0], [-0.1, 0, 0], [1, 0, 0], [0, 1, 0]]), gt) \
        == [[0, 1], [2], [3]]


# ---------------------------------------------------------------- alignment
def test_icp_recovers_a_known_rigid_transform():
    mesh = trimesh.creation.capsule(radius=0.2, height=0.8)
    mesh = trimesh.util.concatenate([mesh, trimesh.creation.box((0.3, 0.1, 0.5)).apply_translation((0.3, 0.2, 0))])
    target = sample_surface_points(mesh, 3000, seed=1)
    known = np.eye(4)
    known[:3, :3] = Rotation.from_rotvec([0.05, -0.1, 0.12]).as_matrix()
    known[:3, 3] = [0.03, -0.02, 0.05]
    source = trimesh.transform_points(target, known)
    result = icp_align(source, target)
    np.testing.assert_allclose(result.matrix, np.linalg.inv(known), atol=1e-6)
    np.testing.assert_allclose(result.points, target, atol=1e-6)
    # fitted on a subset, applied to all points
    subset = icp_align(source, target, max_points=500, seed=3)
    np.testing.assert_allclose(subset.matrix, np.linalg.inv(known), atol=1e-6)
    assert subset.points.shape == source.shape


def test_icp_search_recovers_a_half_turn():
    mesh = trimesh.util.concatenate([trimesh.creation.box((1.0, 0.4, 0.2)),
                                     trimesh.creation.box((0.2, 0.2, 0.6)).apply_translation((0.4, 0.1, 0.3))])
    target = sample_surface_points(mesh, 1500, seed=2)
    known = np.eye(4)
    known[:3, :3] = Rotation.from_euler("y", 180, degrees=True).as_matrix()
    source = trimesh.transform_points(target, known)
    assert icp_align(source, target).cost > 1e-3  # plain ICP gets stuck
    result = icp_align_search(source, target)
    np.testing.assert_allclose(result.matrix, np.linalg.inv(known), atol=1e-6)


def test_scene_alignment_removes_scale_and_offset_of_the_canonical_box():
    gt = three_objects()
    similarity = np.diag([0.37, 0.37, 0.37, 1.0])
    similarity[:3, 3] = [0.2, -0.5, 1.0]
    pred = [m.copy().apply_transform(similarity) for m in gt]
    s = score_scene(pred, gt, points_per_object=N)
    assert s.cd_s < 1e-12 and s.lcd < 1e-6 and s.fs_o == 1.0


def test_normalize_per_axis_fills_the_box_and_ignores_axis_scales():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(500, 3))
    n = normalize_per_axis(p)
    np.testing.assert_allclose(n.min(0), -0.95)
    np.testing.assert_allclose(n.max(0), 0.95)
    np.testing.assert_allclose(normalize_per_axis(p * [2.0, 0.1, 7.0] + [1, 2, 3]), n, atol=1e-12)


def test_sampling_is_deterministic_by_seed():
    gt = three_objects()
    pred = [m.copy().apply_translation((0.02, 0, 0)) for m in gt]
    pred[1] = trimesh.creation.icosphere(subdivisions=2, radius=0.25).apply_translation((0.6, 0, 0))
    a = score_scene(pred, gt, points_per_object=N, seed=3)
    b = score_scene(pred, gt, points_per_object=N, seed=3)
    c = score_scene(pred, gt, points_per_object=N, seed=4)
    assert a == b and a.cd_o != c.cd_o
    assert a.cd_o == pytest.approx(c.cd_o, rel=0.3)


# ---------------------------------------------------------------- parity with brute force
point_sets = arrays(np.float64, st.tuples(st.integers(1, 40), st.just(3)),
                    elements=st.floats(-2, 2, allow_nan=False, width=32))


@given(point_sets, point_sets)
def test_chamfer_matches_brute_force(a, b):
    d = cdist(a, b)
    expected = np.mean(d.min(1) ** 2) + np.mean(d.min(0) ** 2)
    assert chamfer_distance(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert chamfer_distance(a, b) == pytest.approx(chamfer_distance(b, a), rel=1e-12, abs=1e-15)


@given(point_sets, point_sets, st.floats(0.05, 2.0))
def test_f_score_matches_brute_force(a, b, tau):
    d = cdist(a, b)
    precision = np.mean(d.min(1) < tau)
    recall = np.mean(d.min(0) < tau)
    expected = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    assert f_score(a, b, tau) == pytest.approx(expected, abs=1e-12)


@given(point_sets, point_sets)
def test_lcd_matches_eqs_8_9_loop(p, g):
    first = sum(min(np.linalg.norm(x - y) for y in g) for x in p) / len(p)
    second = sum(min(np.linalg.norm(y - x) for x in p) for y in g) / len(g)
    assert layout_consistency_distance(p, g) == pytest.approx(first + second, rel=1e-9, abs=1e-12)


@given(st.integers(0, 50), st.integers(1, 50))
def test_ssr_is_eq_10(n_pred, n_gt):
    s = separation_success_rate(n_pred, n_gt)
    assert s == min(n_pred, n_gt) / max(n_pred, n_gt)
    assert 0 <= s <= 1 and (s == 1) == (n_pred == n_gt)
    if n_pred:
        assert s == separation_success_rate(n_gt, n_pred)
    # the part-count class says which way SSR < 1 misses: fewer parts (fused) or more (fragments)
    assert part_count_class(n_pred, n_gt) == ("right" if s == 1 else "fewer" if n_pred < n_gt else "more")


# ---------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors():
    gt = three_objects()
    empty = trimesh.Trimesh()
    with pytest.raises(ValueError, match=r"pred is empty"):
        score_scene(empty, gt, points_per_object=N)
    with pytest.raises(ValueError, match=r"gt_instances\[1\] is empty"):
        score_scene(gt[0], [gt[0], empty], points_per_object=N)
    with pytest.raises(ValueError, match="gt_instances is empty"):
        score_scene(gt[0], [], points_per_object=N)
    with pytest.raises(ValueError, match="paired by index"):
        score_scene(gt[:2], gt, points_per_object=N)
    with pytest.raises(ValueError, match="align="):
        score_scene(gt, gt, align="best")
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        chamfer_distance(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="empty"):
        chamfer_distance(np.zeros((0, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        f_score(np.full((2, 3), np.nan), np.zeros((4, 3)))
    with pytest.raises(TypeError, match="sample_surface_points"):
        chamfer_distance(gt[0], gt[1])
    with pytest.raises(ValueError, match="threshold"):
        f_score(np.zeros((2, 3)), np.zeros((2, 3)), 0.0)
    with pytest.raises(ValueError, match="n_gt is 0"):
        separation_success_rate(1, 0)
    with pytest.raises(ValueError, match="n_pred"):
        separation_success_rate(-1, 2)

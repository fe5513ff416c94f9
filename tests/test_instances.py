"""Per-instance meshes on scenes built so that the right answer is known, and atomic mesh writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh

from timi.instances import FrontView, instance_scene, node_names, split_instances
from timi.io import OutputError, write_mesh

RES = 96  # image of RES x RES pixels covering [-1, 1]^2 (the testbed camera, extent 1)


def box(lo, hi) -> trimesh.Trimesh:
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    return trimesh.creation.box(extents=hi - lo, transform=trimesh.transformations.translation_matrix((lo + hi) / 2))


def rect_mask(lo, hi, view: FrontView) -> np.ndarray:
    """Pixels whose centres fall inside the x/y rectangle [lo, hi] seen from the front."""
    v, u = np.mgrid[: view.height, : view.width] + 0.5
    x = (u - view.u0) / view.scale
    y = (view.v0 - v) / view.scale
    return (x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1])


def occluded_scene(res: int = RES):
    """Box A in front (z high) partly hides box B behind it; C stands apart; a floater sits in the
    background (no mask) and must come back unclaimed. Masks are what the front camera sees."""
    view = FrontView.from_extent(res, res, 1.0)
    A = ((-0.6, -0.5, 0.2), (0.1, 0.3, 0.6))
    B = ((-0.5, -0.4, -0.6), (0.3, 0.5, -0.1))   # behind A, mostly hidden by it (58% of its x/y)
    C = ((0.55, -0.8, -0.3), (0.85, -0.4, 0.3))
    F = ((-0.9, 0.75, 0.0), (-0.8, 0.85, 0.1))   # floater, not in any mask
    mA = rect_mask(A[0], A[1], view)
    mB = rect_mask(B[0], B[1], view) & ~mA       # the visible part of B
    mC = rect_mask(C[0], C[1], view)
    mesh = trimesh.util.concatenate([box(*A), box(*B), box(*C), box(*F)])
    return mesh, np.stack([mA, mB, mC]), view


def test_front_view_projection_convention():
    view = FrontView.from_extent(100, 100, 1.0)
    r, c = view.project(np.array([[-0.99, 0.99, 0.0], [0.99, -0.99, 0.0], [0.0, 0.0, 5.0]]))
    assert (r[0], c[0]) == (0, 0)      # top-left is (-x, +y): +y is up, image rows grow downward
    assert (r[1], c[1]) == (99, 99)
    assert (r[2], c[2]) == (50, 50)    # depth does not move a point in an orthographic view


def test_split_with_known_camera_and_occlusion():
    mesh, masks, view = occluded_scene()
    split = split_instances(mesh, masks, names=["front", "back", "side"], view=view)
    assert len(split.parts) == 4
    volumes = [None if m is None else round(m.volume, 6) for m in split.meshes]
    assert volumes == [round(0.7 * 0.8 * 0.4, 6), round(0.8 * 0.9 * 0.5, 6), round(0.3 * 0.4 * 0.6, 6)]
    assert len(split.unclaimed) == 1
    floater = split.parts[split.unclaimed[0]]
    np.testing.assert_allclose(floater.bounds, [[-0.9, 0.75, 0.0], [-0.8, 0.85, 0.1]], atol=1e-9)
    assert "unclaimed: 1 part(s)" in split.summary()


def test_high_resolution_masks():
    """A 2000 x 2000 photo: voting runs on a coarser grid that the samples cover densely, so the
    hidden side of the back box still counts as hidden."""
    mesh, masks, view = occluded_scene(2000)
    split = split_instances(mesh, masks, view=view, cut_fused=False)
    assert [round(m.volume, 6) for m in split.meshes] == [round(0.7 * 0.8 * 0.4, 6), round(0.8 * 0.9 * 0.5, 6),
                                                         round(0.3 * 0.4 * 0.6, 6)]
    assert len(split.unclaimed) == 1


def test_without_zbuffer_the_occluded_box_would_be_misassigned():
    """The back box projects mostly into the front box's mask: only visible points decide correctly."""
    mesh, masks, view = occluded_scene()
    with_depth = split_instances(mesh, masks, view=view, cut_fused=False)
    no_depth = split_instances(mesh, masks, view=view, depth_tolerance_px=np.inf, cut_fused=False)  # all "visible"
    assert with_depth.meshes[1] is not None
    assert no_depth.meshes[1] is None  # most of the back box's points land in the front box's mask
    assert len(no_depth.unclaimed) == 2


def test_fused_objects_are_cut_along_the_mask_border():
    """Two objects generated as one connected mesh (a bar through both masks): the part is cut
    where the masks meet; its hidden back faces follow the nearest visible ones."""
    view = FrontView.from_extent(RES, RES, 1.0)
    bar = trimesh.creation.box(extents=(1.2, 0.3, 0.3))                      # x in [-0.6, 0.6]
    bar = bar.subdivide().subdivide().subdivide()                           # faces small enough to cut
    left, right = rect_mask((-0.6, -0.15), (0.0, 0.15), view), rect_mask((0.0, -0.15), (0.6, 0.15), view)
    split = split_instances(bar, np.stack([left, right]), view=view)
    assert len(split.parts) == 3 and split.unclaimed == []
    assert {a.cut_from for a in split.assignments} == {0}
    lo, hi = split.meshes[0].bounds, split.meshes[1].bounds
    assert hi[0][0] == pytest.approx(0.0, abs=0.08) and lo[1][0] == pytest.approx(0.0, abs=0.08)
    assert lo[0][0] == pytest.approx(-0.6) and hi[1][0] == pytest.approx(0.6)
    assert abs(split.meshes[0].area - split.meshes[1].area) < 0.1 * bar.area
    whole = split_instances(bar, np.stack([left, right]), view=view, cut_fused=False)
    assert whole.unclaimed == [0] and whole.found == 0  # uncut, neither instance holds half of the votes


def test_fit_recovers_unknown_scale_and_offset():
    """hy3dgen's mesh units differ from the image's: fitting the mask box recovers the same split."""
    mesh, masks, view = occluded_scene()
    mesh.apply_transform(trimesh.transformations.compose_matrix(scale=[0.63] * 3, translate=[0.1, -0.2, 0.05]))
    # the image's foreground is the silhouette of the whole scene (floater included, like an alpha mask)
    fg = np.zeros_like(masks[0])
    truth = FrontView.from_extent(RES, RES, 1.0)
    for part in trimesh.util.concatenate([mesh]).split(only_watertight=False):
        lo, hi = (part.bounds - [0.1, -0.2, 0.05]) / 0.63
        fg |= rect_mask(lo, hi, truth)
    split = split_instances(mesh, masks, foreground=fg)
    assert [m is not None for m in split.meshes] == [True, True, True]
    assert len(split.unclaimed) == 1
    assert split.meshes[0].volume == pytest.approx(0.7 * 0.8 * 0.4 * 0.63**3, rel=1e-6)


def test_fit_ignores_a_far_floater():
    """A speck outside everything (not in the image's foreground) must not stretch the fitted box."""
    mesh, masks, view = occluded_scene()
    speck = box((1.4, 1.4, 0.0), (1.43, 1.43, 0.03))
    alpha = masks.any(0) | rect_mask((-0.9, 0.75), (-0.8, 0.85), view)  # the image shows the floater F, not the speck
    split = split_instances(trimesh.util.concatenate([mesh, speck]), masks, foreground=alpha)
    assert [m is not None for m in split.meshes] == [True, True, True]
    assert split.meshes[1].volume == pytest.approx(0.8 * 0.9 * 0.5, rel=1e-6)
    assert len(split.unclaimed) == 2  # the background floater and the speck


def test_instance_scene_has_one_named_node_per_instance(tmp_path):
    mesh, masks, view = occluded_scene()
    split = split_instances(mesh, masks, names=["cup", "cup", "ball"], view=view)
    scene = instance_scene(split)
    path = write_mesh(scene, tmp_path / "scene.glb")
    loaded = trimesh.load(path)
    assert sorted(loaded.graph.nodes_geometry) == sorted(["cup", "cup_2", "ball", "unclaimed"])
    only = instance_scene(split, include_unclaimed=False)
    assert sorted(only.graph.nodes_geometry) == ["ball", "cup", "cup_2"]
    assert node_names(["a b", "", "unclaimed"]) == ["a_b", "instance_02", "unclaimed_2"]


def test_testbed_example_scene_splits_into_its_instances():
    """The shipped example: ground-truth instance meshes, rendered label map, known camera."""
    from PIL import Image

    root = Path(__file__).resolve().parents[1] / "timi" / "assets" / "example"
    if not (root / "masks.png").exists():
        pytest.skip("example scene not present")
    labels = np.asarray(Image.open(root / "masks.png"))
    gt = [trimesh.load(p) for p in sorted((root / "gt").glob("instance_*.ply"))]
    masks = np.stack([labels == k + 1 for k in range(len(gt))])
    view = FrontView.from_extent(*labels.shape, 1.0)
    split = split_instances(trimesh.util.concatenate(gt), masks, view=view)
    assert split.unclaimed == []
    for k, g in enumerate(gt):
        np.testing.assert_allclose(split.meshes[k].bounds, g.bounds, atol=1e-6)


# ------------------------------------------------------------------------------ atomic writes


@pytest.mark.parametrize("ext", [".glb", ".obj", ".ply"])
def test_write_mesh_formats_roundtrip(tmp_path, ext):
    mesh = box((0, 0, 0), (1, 2, 3))
    path = write_mesh(mesh, tmp_path / f"out{ext}")
    back = trimesh.load(path, force="mesh")
    np.testing.assert_allclose(back.bounds, mesh.bounds, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == [f"out{ext}"]  # no temporary file left


def test_write_mesh_is_atomic_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "scene.glb"
    target.write_bytes(b"previous result")

    def half_write(self, data):  # a write that dies half-way (disk full, killed, ...)
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_mesh(box((0, 0, 0), (1, 1, 1)), target)
    monkeypatch.undo()
    assert target.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["scene.glb"]


def test_write_mesh_rejects_unknown_extension(tmp_path):
    with pytest.raises(OutputError, match=r"unknown mesh format '\.fbx'.*\.glb"):
        write_mesh(box((0, 0, 0), (1, 1, 1)), tmp_path / "x.fbx")
    assert not (tmp_path / "x.fbx").exists()

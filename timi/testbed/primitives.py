"""Primitive shapes of the testbed: exact signed distance functions and matching trimesh meshes.

Every primitive lives in a local frame (symmetry axis = local z, centred at the origin) and is
placed in the scene by a rigid transform plus a uniform scale, so its world SDF stays exact:
``sdf_world(p) = scale * sdf_local(R^T (p - t) / scale)``. Negative = inside. The SDFs follow the
closed forms catalogued by I. Quilez ("distance functions"); the meshes come from
``trimesh.creation`` with the same conventions (checked by ``tests/test_testbed_scenes.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import trimesh

PRIMITIVE_KINDS = ("box", "sphere", "cylinder", "cone", "capsule", "torus")


def _sdf_box(p: np.ndarray, half: np.ndarray) -> np.ndarray:
    q = np.abs(p) - half
    outside = np.linalg.norm(np.maximum(q, 0.0), axis=-1)
    inside = np.minimum(q.max(axis=-1), 0.0)
    return outside + inside


def _sdf_sphere(p: np.ndarray, radius: float) -> np.ndarray:
    return np.linalg.norm(p, axis=-1) - radius


def _sdf_cylinder(p: np.ndarray, radius: float, half_height: float) -> np.ndarray:
    d = np.stack([np.linalg.norm(p[..., :2], axis=-1) - radius, np.abs(p[..., 2]) - half_height], -1)
    return np.minimum(d.max(axis=-1), 0.0) + np.linalg.norm(np.maximum(d, 0.0), axis=-1)


def _sdf_capsule(p: np.ndarray, radius: float, half_length: float) -> np.ndarray:
    axis_point = np.zeros_like(p)
    axis_point[..., 2] = np.clip(p[..., 2], -half_length, half_length)
    return np.linalg.norm(p - axis_point, axis=-1) - radius


def _sdf_torus(p: np.ndarray, major: float, minor: float) -> np.ndarray:
    q = np.stack([np.linalg.norm(p[..., :2], axis=-1) - major, p[..., 2]], -1)
    return np.linalg.norm(q, axis=-1) - minor


def _sdf_cone(p: np.ndarray, radius: float, half_height: float) -> np.ndarray:
    """Exact capped cone: base disc of ``radius`` at z=-h, apex at z=+h (Quilez, sdCappedCone)."""
    h, r1, r2 = half_height, radius, 0.0
    qx = np.linalg.norm(p[..., :2], axis=-1)
    qy = p[..., 2]
    k1 = np.array([r2, h])
    k2 = np.array([r2 - r1, 2.0 * h])
    ca = np.stack([qx - np.minimum(qx, np.where(qy < 0.0, r1, r2)), np.abs(qy) - h], -1)
    q = np.stack([qx, qy], -1)
    f = np.clip(((k1 - q) @ k2) / (k2 @ k2), 0.0, 1.0)
    cb = q - k1 + k2 * f[..., None]
    sign = np.where((cb[..., 0] < 0.0) & (ca[..., 1] < 0.0), -1.0, 1.0)
    return sign * np.sqrt(np.minimum((ca**2).sum(-1), (cb**2).sum(-1)))


@dataclass
class Primitive:
    """One placed primitive: ``kind`` with local ``params``, rotation ``R``, ``translation``, ``scale``.

    Params by kind (local frame, axis z): box ``half`` (3,), sphere ``radius``, cylinder / cone
    ``radius, half_height``, capsule ``radius, half_length``, torus ``major, minor``.
    """

    kind: str
    params: dict
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))
    scale: float = 1.0
    color: tuple = (200, 80, 80)

    def __post_init__(self) -> None:
        if self.kind not in PRIMITIVE_KINDS:
            raise ValueError(f"unknown primitive kind {self.kind!r}; use one of {PRIMITIVE_KINDS}")
        self.rotation = np.asarray(self.rotation, dtype=np.float64).reshape(3, 3)
        self.translation = np.asarray(self.translation, dtype=np.float64).reshape(3)

    # -- geometry -------------------------------------------------------------------------------
    def local_sdf(self, p: np.ndarray) -> np.ndarray:
        k, a = self.kind, self.params
        if k == "box":
            return _sdf_box(p, np.asarray(a["half"], dtype=np.float64))
        if k == "sphere":
            return _sdf_sphere(p, a["radius"])
        if k == "cylinder":
            return _sdf_cylinder(p, a["radius"], a["half_height"])
        if k == "cone":
            return _sdf_cone(p, a["radius"], a["half_height"])
        if k == "capsule":
            return _sdf_capsule(p, a["radius"], a["half_length"])
        return _sdf_torus(p, a["major"], a["minor"])

    def sdf(self, points: np.ndarray) -> np.ndarray:
        """Exact signed distance (world units) of ``points`` (..., 3); negative inside."""
        local = (np.asarray(points, dtype=np.float64) - self.translation) @ self.rotation / self.scale
        return self.scale * self.local_sdf(local)

    def local_mesh(self) -> trimesh.Trimesh:
        k, a = self.kind, self.params
        if k == "box":
            return trimesh.creation.box(extents=2.0 * np.asarray(a["half"], dtype=np.float64))
        if k == "sphere":
            return trimesh.creation.icosphere(subdivisions=3, radius=a["radius"])
        if k == "cylinder":
            return trimesh.creation.cylinder(radius=a["radius"], height=2 * a["half_height"], sections=48)
        if k == "cone":
            mesh = trimesh.creation.cone(radius=a["radius"], height=2 * a["half_height"], sections=48)
            mesh.apply_translation([0.0, 0.0, -a["half_height"]])
            return mesh
        if k == "capsule":
            return trimesh.creation.capsule(height=2 * a["half_length"], radius=a["radius"], count=[24, 24])
        return trimesh.creation.torus(a["major"], a["minor"], major_sections=48, minor_sections=24)

    def transform(self) -> np.ndarray:
        """4x4 local -> world matrix (rotation * scale, then translation)."""
        m = np.eye(4)
        m[:3, :3] = self.rotation * self.scale
        m[:3, 3] = self.translation
        return m

    def mesh(self) -> trimesh.Trimesh:
        """Ground-truth world mesh (watertight, coloured with the instance colour)."""
        mesh = self.local_mesh()
        mesh.apply_transform(self.transform())
        mesh.visual.face_colors = np.array([*self.color, 255], dtype=np.uint8)
        return mesh

    def to_json(self) -> dict:
        d = asdict(self)
        d["rotation"] = self.rotation.tolist()
        d["translation"] = self.translation.tolist()
        d["color"] = [int(c) for c in self.color]
        d["params"] = {k: (np.asarray(v).tolist()) for k, v in self.params.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Primitive":
        return cls(
            kind=d["kind"],
            params=dict(d["params"]),
            rotation=np.asarray(d["rotation"]),
            translation=np.asarray(d["translation"]),
            scale=float(d["scale"]),
            color=tuple(int(c) for c in d["color"]),
        )


def scene_sdf(primitives: list[Primitive], points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union SDF of the scene and the index of the closest primitive for each point."""
    per = np.stack([p.sdf(points) for p in primitives], axis=0)
    return per.min(axis=0), per.argmin(axis=0)

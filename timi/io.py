"""Atomic output files: a result appears complete under its name or not at all.

Every writer here writes to a temporary file in the destination folder and moves it into place
with :func:`os.replace` (atomic on POSIX and Windows within one file system). If anything fails on
the way, the temporary file is removed and an existing file of that name is left untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:  # trimesh is imported where a mesh is written (`timi --help` stays light)
    import trimesh

__all__ = ["MESH_FORMATS", "OutputError", "WriteError", "atomic_path", "write_mesh", "write_bytes", "write_text",
           "check_mesh_path", "check_writable", "mesh_bytes", "first_missing", "remove_stale_temporaries"]

#: Extensions the mesh writer accepts, mapped to trimesh's file types.
MESH_FORMATS = {".glb": "glb", ".obj": "obj", ".ply": "ply", ".stl": "stl"}


class OutputError(ValueError):
    """A bad output path (unknown extension, missing folder); one line naming the path and the fix."""


class WriteError(RuntimeError):
    """Writing a checked output failed while running (disk full, folder removed); names the output."""


def first_missing(path: str | Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what writing there would create)."""
    top, p = None, Path(path).absolute()
    while not p.exists() and p != p.parent:
        top, p = p, p.parent
    return top


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: str | Path, folder: bool = False) -> Path:
    """Fail early, with the output's own name, when ``path`` (a file, or a folder with ``folder``)
    cannot be created: probe a temporary file in the nearest existing folder and remove it, so
    nothing is left behind and no folder is created."""
    path = Path(path)
    where = path if folder else path.parent
    base = _existing_ancestor(where)
    if not base.is_dir():
        raise OutputError(f"{path}: {base} is a file, not a folder; pass a path in a folder.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".timi-probe.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{path}: cannot write in {base} ({e.strerror}); pass a path in a writable folder.") from None
    return path


def check_mesh_path(path: str | Path) -> Path:
    """Validate an output mesh path before spending time on generation."""
    path = Path(path)
    if path.is_dir():  # first: a folder named like a mesh (bad/dir.glb) or not (out/) gets one message
        raise OutputError(f"{path}: is a folder; pass a file name such as {path / 'scene.glb'}.")
    if path.suffix.lower() not in MESH_FORMATS:
        raise OutputError(
            f"{path}: unknown mesh format '{path.suffix}'; use one of {', '.join(MESH_FORMATS)} (chosen by extension)."
        )
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``, on error delete it."""
    path = Path(path)
    created = first_missing(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=(suffix if suffix is not None else path.suffix) + ".tmp",
                                   dir=path.parent)
    except OSError as e:
        _remove_folder(created)
        raise WriteError(f"{path}: cannot write it ({e.strerror}); pass a path in a writable folder.") from None
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the result the usual permissions
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise WriteError(f"{path}: cannot move the finished file into place ({e.strerror}).") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        _remove_folder(created)
        raise


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files of ``path`` that a killed writer left (:func:`atomic_path` names them
    ``.NAME.<random>SUFFIX.tmp`` beside it; a process killed mid-write cannot remove its own). Returns them."""
    import glob

    path = Path(path)
    stale = list(path.parent.glob(f".{glob.escape(path.name)}.*{glob.escape(path.suffix)}.tmp"))
    for tmp in stale:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return stale


def _remove_folder(folder: Path | None) -> None:
    """Remove a folder this module created for a write that then failed (nothing else is in it)."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _write_with(path: str | Path, writer: Callable[[Path], None]) -> Path:
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes atomically."""
    return _write_with(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    """Write text (UTF-8) atomically."""
    return _write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_mesh(mesh: trimesh.Trimesh | trimesh.Scene, path: str | Path) -> Path:
    """Export a mesh or scene by the path's extension (GLB/OBJ/PLY/STL), atomically.

    GLB keeps a scene's named nodes; OBJ keeps them as groups (``o`` lines); PLY and STL hold a
    single mesh, so a scene is flattened into one (node transforms applied).
    """
    return write_bytes(path, mesh_bytes(mesh, path))


def mesh_bytes(mesh: trimesh.Trimesh | trimesh.Scene, path: str | Path) -> bytes:
    """The file :func:`write_mesh` writes for ``path``'s extension, in memory."""
    path = check_mesh_path(path)
    file_type = MESH_FORMATS[path.suffix.lower()]
    import trimesh

    if isinstance(mesh, trimesh.Scene) and file_type in ("ply", "stl"):
        mesh = mesh.to_mesh()
    if isinstance(mesh, trimesh.Trimesh) and len(mesh.faces) == 0:
        raise OutputError(f"{path}: the mesh has no faces, nothing to write; check the generation log.")
    data = mesh.export(file_type=file_type)
    return data.encode("utf-8") if isinstance(data, str) else data

"""Files shipped with timi: the README's example scene and the small testbed model.

>>> from timi.assets import example
>>> sorted(p.name for p in example().glob("*.png"))
['image.png', 'masks.png']
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASSETS", "example"]

#: This folder, wherever timi is installed.
ASSETS = Path(__file__).resolve().parent


def example() -> Path:
    """Folder of the example scene (two boxes and a cylinder): ``image.png`` (RGBA), ``masks.png``
    (a label map, one value per instance), ``gt/`` (ground-truth meshes), ``layout.json``, ``scene.glb``.
    Works from any working folder, as the README's snippet uses it."""
    return ASSETS / "example"

"""Testbed (issue 8): procedural multi-object scenes with exact ground truth and the small shipped model.

* :mod:`timi.testbed.scenes` — scenes, renders, exact instance masks, ground-truth meshes, splits.
* :mod:`timi.testbed.train` — the ShapeVAE + Hunyuan3DDiT training (``timi testbed train``).
* :mod:`timi.testbed.export` — hy3dgen model directory export and loading.
* :func:`default_model_path` — the model shipped with the project (``--model`` default).
"""

from __future__ import annotations

from pathlib import Path

from timi.assets import ASSETS, example
DEFAULT_MODEL_SUBFOLDER = "hunyuan3d-dit-v2-0"


def default_model_path() -> Path:
    """Directory of the shipped testbed model (``config.yaml`` + ``model.fp16.safetensors``).

    Its parent works with hy3dgen's resolver:
    ``Hunyuan3DDiTFlowMatchingPipeline.from_pretrained(str(p.parent), subfolder=p.name)``.
    """
    path = ASSETS / "testbed_model" / DEFAULT_MODEL_SUBFOLDER
    if not (path / "config.yaml").exists():
        raise FileNotFoundError(f"the shipped testbed model is missing at {path}; "
                                "reinstall timi or run `timi testbed train --export PATH`")
    return path


TRELLIS_TESTBED = "trellis_testbed"


def trellis_testbed_path() -> Path:
    """Folder of the shipped grid testbed (``--model trellis-testbed``): a TRELLIS folder
    (``pipeline.json``, the stage-1 flow model, the fixed depth-to-space decoder, its conditioner)."""
    path = ASSETS / TRELLIS_TESTBED
    if not (path / "pipeline.json").is_file():
        raise FileNotFoundError(f"the grid testbed is not installed at {path}; train it with "
                                "`timi testbed train-grid` (docs/testbed.md) or pass a TRELLIS folder")
    return path


def example_scene_path() -> Path:
    """Folder of the example scene used by the README demo (:func:`timi.assets.example`)."""
    return example()

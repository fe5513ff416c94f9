"""The generation interface the harness calls, and its implementation on ``timi_torch.TIMIPipeline``.

A generator is any callable ``generate(image, masks, config, seed) -> (scene_mesh, instances, seconds)``:

* ``image``: (H, W, 4) uint8 RGBA input view; ``masks``: (K, H, W) bool instance masks;
* ``config``: a :class:`timi_core.TIMIConfig` (``isg=False`` = the base model, no TIMI);
* ``seed``: the sampling seed;
* returns the scene mesh (:class:`trimesh.Trimesh`), a list of K per-instance meshes or ``None``
  (then the metrics split the scene mesh, see ``docs/metrics.md``), and the generation time in
  seconds (what the table's s/scene column averages), or a dict of seconds per stage (``sampling``,
  ``mesh``: the table shows them apart; the time is their sum); optionally a fourth item, the final
  latents (L, C) as an array, which the cache keeps so that the scene can be decoded again at
  another iso level (matched-size scoring, :mod:`timi.evaluation.sizes`).

An optional attribute ``identity`` (a JSON-able dict: model, steps, ...) enters the cache key, so
outputs of another model or sampler setting are never mistaken for cached ones.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import trimesh

from timi_core import TIMIConfig


class Generator(Protocol):
    def __call__(self, image: np.ndarray, masks: np.ndarray, config: TIMIConfig,
                 seed: int) -> tuple[trimesh.Trimesh, Optional[list[trimesh.Trimesh]], float]: ...


def generator_identity(generate: Callable) -> dict[str, Any]:
    """The ``identity`` dict of a generator, or its qualified name when it has none."""
    ident = getattr(generate, "identity", None)
    if ident is not None:
        return dict(ident)
    target = getattr(generate, "__func__", generate)
    name = getattr(target, "__qualname__", type(generate).__qualname__)
    return {"generator": f"{getattr(target, '__module__', '?')}.{name}"}


class TIMITorchGenerator:
    """Generation with :class:`timi_torch.TIMIPipeline` (hy3dgen sampler + TIMI guidance).

    The pipeline is loaded once, on first use, through the application's one door
    (:func:`timi.pipelines.load_pipeline`); each call passes its ``config`` to the pipeline's call
    (the shared pipeline is not changed) and seeds a ``torch.Generator``. The time covers sampling
    and surface extraction (the paper's "Time"), returned per stage (``{"sampling": s, "mesh": s}``). ``decoding``: the volume decoding
    (:data:`timi.pipelines.DECODINGS`; default hy3dgen's dense one, as the published scores).
    """

    def __init__(self, model: str, *, device: str | None = None, dtype: str | None = None, steps: int = 50,
                 guidance_scale: float = 5.0, octree_resolution: int = 384, mc_level: float = 0.0,
                 num_chunks: int = 8000, decoding: str = "dense"):
        self.model, self.device, self.dtype, self.decoding = str(model), device, dtype, str(decoding)
        self.steps, self.guidance_scale = int(steps), float(guidance_scale)
        self.octree_resolution, self.mc_level, self.num_chunks = int(octree_resolution), float(mc_level), int(num_chunks)
        self._pipe = None

    @property
    def identity(self) -> dict[str, Any]:
        identity = {"generator": "timi_torch.TIMIPipeline", "model": self.model, "dtype": self.dtype,
                    "steps": self.steps, "guidance_scale": self.guidance_scale,
                    "octree_resolution": self.octree_resolution, "mc_level": self.mc_level}
        if self.decoding != "dense":          # absent at the default: caches written before keep their keys
            identity["decoding"] = self.decoding
        return identity

    def pipeline(self):
        if self._pipe is None:
            from timi.pipelines import load_pipeline

            self._pipe = load_pipeline(self.model, device=self.device, dtype=self.dtype, decoding=self.decoding)
        return self._pipe

    def pipeline_for(self, seed: int):
        """The pipeline that one call with sampling ``seed`` runs: the shared one; a subclass may
        return a copy with hooks of its own (e.g. the testbed's seeded gradient control)."""
        return self.pipeline()

    def __call__(self, image, masks, config: TIMIConfig, seed: int):
        import torch

        pipe = self.pipeline_for(int(seed))
        rng = torch.Generator(device=pipe.device).manual_seed(int(seed))
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        from timi_torch.frontend import export_meshes

        def clock() -> float:
            if pipe.device.type == "cuda":
                torch.cuda.synchronize(pipe.device)
            return time.perf_counter()

        start = clock()
        out = pipe(image, masks, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                   generator=rng, output_type="latent", octree_resolution=self.octree_resolution,
                   num_chunks=self.num_chunks, enable_pbar=False, config=config)
        sampled = clock()
        mesh = export_meshes(pipe.base, out.latents, mc_level=self.mc_level, num_chunks=self.num_chunks,
                             octree_resolution=self.octree_resolution, enable_pbar=False)[0]
        seconds = {"sampling": sampled - start, "mesh": clock() - sampled}
        if not isinstance(mesh, trimesh.Trimesh):
            mesh = trimesh.Trimesh(mesh.mesh_v, mesh.mesh_f)  # hy3dgen's raw Latent2MeshOutput
        return mesh, None, seconds, out.latents[0].detach().float().cpu().numpy()


    def iso_surfaces(self, latents):
        """One sample's final latents (L, C) decoded once (:func:`timi_torch.frontend.decode_volume`,
        this generator's grid and bounds): a :class:`timi.evaluation.sizes.IsoSurfaces` whose mesh at
        the generation's own ``mc_level`` is the generated mesh."""
        import torch
        from timi_torch.frontend import decode_volume, surface_at_level

        from .sizes import IsoSurfaces

        pipe = self.pipeline()
        base = pipe.base
        z = torch.as_tensor(np.asarray(latents))[None].to(device=pipe.device, dtype=pipe.dtype)
        grid = decode_volume(base, z, num_chunks=self.num_chunks, octree_resolution=self.octree_resolution)[0]
        extract = functools.partial(surface_at_level, base, grid, octree_resolution=self.octree_resolution)
        return IsoSurfaces(extract, float(grid.min()), float(grid.max()), self.mc_level)


def load_generator_factory(spec: str) -> Callable:
    """``"package.module:attribute"`` -> the attribute (a generator, or a factory returning one)."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"--generator {spec!r}: use 'package.module:callable'.")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--generator {spec!r}: cannot import ({type(e).__name__}: {e}).") from e
    return obj


class PredictionReader:
    """A "generator" that reads another method's outputs from disk (e.g. MIDI's or DPA's results),
    so they are scored and tabulated exactly like TIMI's.

    Layout: ``ROOT/<scene_id>/`` with ``instance_XX.(ply|glb|obj)`` (per-instance meshes, XX = 01..K,
    paired with the masks' instances) or one ``scene.(glb|ply|obj)``; optionally ``generation.json``
    with ``{"seconds": ...}`` for the time column. The scene ids must match the dataset's.
    """

    SUFFIXES = (".glb", ".ply", ".obj")

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"--predictions {self.root}: folder does not exist.")

    @property
    def identity(self) -> dict[str, Any]:
        # names, sizes and times of the files: new predictions are never mistaken for cached ones
        listing = sorted((str(p.relative_to(self.root)), p.stat().st_size, p.stat().st_mtime_ns)
                         for p in self.root.rglob("*") if p.is_file())
        return {"generator": "predictions", "root": str(self.root.resolve()),
                "files": hashlib.sha1(json.dumps(listing).encode()).hexdigest()[:16]}

    def __call__(self, image, masks, config, seed, scene_id: str):
        from .dataset import load_mesh

        folder = self.root / scene_id
        if not folder.is_dir():
            known = sorted(p.name for p in self.root.iterdir() if p.is_dir())[:5]
            raise FileNotFoundError(f"no prediction for scene {scene_id!r} in {self.root} (it holds {known}...); "
                                    "the prediction folders must be named like the dataset's scene folders.")
        numbered = {}
        for p in folder.iterdir():
            m = re.fullmatch(r"instance_(\d+)", p.stem)
            if m and p.suffix.lower() in self.SUFFIXES:
                numbered[int(m.group(1))] = p
        instances = None
        if numbered:
            if sorted(numbered) != list(range(1, masks.shape[0] + 1)):
                raise ValueError(f"{folder}: instance files {sorted(numbered)} do not match the scene's "
                                 f"{masks.shape[0]} masks (1..{masks.shape[0]}).")
            instances = [load_mesh(numbered[k]) for k in sorted(numbered)]
            mesh = None
        else:
            scene_files = [folder / f"scene{s}" for s in self.SUFFIXES if (folder / f"scene{s}").is_file()]
            if not scene_files:
                raise FileNotFoundError(f"{folder}: no instance_XX.* or scene.glb|ply|obj prediction.")
            mesh = load_mesh(scene_files[0])
        info = folder / "generation.json"
        seconds = json.loads(info.read_text()).get("seconds") if info.is_file() else None
        return mesh, instances, seconds

"""Evaluation harness: run a generator over a folder of scenes, cache, score with :mod:`timi.metrics`,
and write Table-1-style tables and sweep plots (``timi eval``; layout in docs/metrics.md).

* :mod:`.dataset` -- scene folder layout and loading (:func:`load_scene`, :class:`SceneError`)
* :mod:`.generators` -- the ``generate(image, masks, config, seed)`` interface, :class:`TIMITorchGenerator`
* :mod:`.runs` -- TIMI / baseline rows, ablations of Tables 2-7, ``FIELD=v1,v2`` sweeps
* :mod:`.runner` -- :class:`Evaluator`: caching, resume, skip-and-report
* :mod:`.ray_engine` -- ``timi eval --engine ray``: the same units on a Ray cluster (docs/cluster.md)
* :mod:`.report` -- Markdown / CSV tables and matplotlib plots
"""

import importlib

#: Public name -> submodule; imported on first use (PEP 562), so ``timi --help`` and ``timi eval
#: --help`` load neither trimesh nor scipy nor matplotlib.
_EXPORTS = {
    "SceneData": "dataset", "SceneError": "dataset", "discover_scenes": "dataset", "load_scene": "dataset",
    "TIMITorchGenerator": "generators", "generator_identity": "generators",
    "write_report": "report",
    "Evaluator": "runner", "MetricSettings": "runner", "RunSummary": "runner", "SceneResult": "runner",
    "ABLATIONS": "runs", "Run": "runs", "ablation_runs": "runs", "plan_runs": "runs", "sweep_runs": "runs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

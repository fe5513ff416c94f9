"""Evaluation harness: run a generator over a folder of scenes, cache, score with :mod:`timi.metrics`,
and write Table-1-style tables and sweep plots (``timi eval``; layout in docs/metrics.md).

* :mod:`.dataset` -- scene folder layout and loading (:func:`load_scene`, :class:`SceneError`)
* :mod:`.generators` -- the ``generate(image, masks, config, seed)`` interface, :class:`TIMITorchGenerator`
* :mod:`.runs` -- TIMI / baseline rows, ablations of Tables 2-7, ``FIELD=v1,v2`` sweeps
* :mod:`.runner` -- :class:`Evaluator`: caching, resume, skip-and-report
* :mod:`.ray_engine` -- ``timi eval --engine ray``: the same units on a Ray cluster (docs/cluster.md)
* :mod:`.report` -- Markdown / CSV tables and matplotlib plots
"""

from .dataset import SceneData, SceneError, discover_scenes, load_scene
from .generators import TIMITorchGenerator, generator_identity
from .report import write_report
from .runner import Evaluator, MetricSettings, RunSummary, SceneResult
from .runs import ABLATIONS, Run, ablation_runs, plan_runs, sweep_runs

__all__ = ["SceneData", "SceneError", "discover_scenes", "load_scene", "TIMITorchGenerator", "generator_identity",
           "write_report", "Evaluator", "MetricSettings", "RunSummary", "SceneResult", "ABLATIONS", "Run",
           "ablation_runs", "plan_runs", "sweep_runs"]

"""Metrics of the paper (Table 1 and Appendix A) with MIDI's evaluation conventions.

=============================================  ===============================================
What                                           Function
=============================================  ===============================================
Chamfer distance (squared, MIDI)               :func:`chamfer_distance`
F-score at tau = 0.1 (MIDI)                    :func:`f_score`
Layout Consistency Distance (Eqs.8-9)          :func:`layout_consistency_distance`
Separation Success Rate (Eq.10)                :func:`separation_success_rate`
independent instances (components - specks)    :func:`count_instances`, :func:`split_instances`
fused / right / fragmented part count          :func:`part_count_class`
alignment (normalisation + rigid ICP, MIDI)    :func:`icp_align`, :func:`normalize_per_axis`,
                                               :func:`scene_normalization`
all six numbers for one scene                  :func:`score_scene` -> :class:`SceneScores`
=============================================  ===============================================

NumPy / SciPy / trimesh only; every convention is documented with its source in docs/metrics.md.
"""

from .alignment import (BOX_HALF, ICP_ITERATIONS, Alignment, cube_rotations, icp_align, icp_align_search,
                        normalize_per_axis, scene_normalization)
from .instances import (MIN_AREA_FRACTION, PART_COUNT_CLASSES, count_instances, layout_consistency_distance,
                        match_parts_to_instances, part_count_class, separation_success_rate, split_instances)
from .pointclouds import (FSCORE_THRESHOLD, POINTS_PER_OBJECT, as_points, chamfer_distance, chamfer_terms,
                          check_mesh, f_score, nearest_distances, sample_surface_points)
from .scene import ALIGN_MODES, METRIC_LABELS, METRIC_NAMES, SceneScores, score_scene

__all__ = [
    "chamfer_distance", "chamfer_terms", "f_score", "nearest_distances", "sample_surface_points",
    "as_points", "check_mesh", "layout_consistency_distance", "separation_success_rate",
    "count_instances", "split_instances", "match_parts_to_instances", "icp_align", "icp_align_search",
    "cube_rotations", "normalize_per_axis", "scene_normalization", "Alignment", "score_scene",
    "SceneScores", "METRIC_NAMES", "METRIC_LABELS", "ALIGN_MODES", "POINTS_PER_OBJECT",
    "FSCORE_THRESHOLD", "ICP_ITERATIONS", "BOX_HALF", "MIN_AREA_FRACTION", "part_count_class",
    "PART_COUNT_CLASSES",
]

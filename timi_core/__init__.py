"""timi_core: the TIMI equations (paper Eqs. 2-7), written once against the Python array API.

Every function accepts arrays of any array-API backend (NumPy, PyTorch, JAX, array-api-strict)
and returns the same backend. No framework is imported here.

=========  =====================================  ============================================
Equation   What                                   Function
=========  =====================================  ============================================
Eq.2       instance probability map P             :func:`instance_probability`
Eq.3       structure-aware spatial weights W      :func:`spatial_weights`
Eq.4       instance-consistent separation loss    :func:`separation_loss`,
                                                  :func:`instance_separation_loss`
Eq.5       Gaussian smoothing of dL/dz (SR)       :func:`gaussian_smooth` (axes),
                                                  :func:`gaussian_smooth_points` (positions),
                                                  :func:`smooth_gradient` (as configured)
Eq.6       geometry-adaptive scale (GM)           :func:`adaptive_scale`
Eq.7       momentum update                        :func:`momentum`, :func:`sgu_update`
(5-6)      token-common part of the update        :func:`token_common`, :func:`common_share`,
                                                  :func:`select_common` (``TIMIConfig.common``)
=========  =====================================  ============================================
"""

from .config import PAPER_GUIDED_FRACTION, PRESETS, TIMIConfig
from .masks import area_pooling_matrix, pool_masks, stack_token_masks
from .outputs import StepDiagnostics, TIMIPipelineOutput
from .separation import (instance_probability, instance_separation_loss, normalize_over_instances, separation_loss,
                         spatial_weights)
from .smoothing import gaussian_kernel1d, gaussian_smooth, gaussian_smooth_points, nearest_neighbour_spacing
from .update import (SGUStep, adaptive_scale, common_share, momentum, select_common, sgu_step, sgu_update,
                     smooth_gradient, token_common)

__all__ = [
    "TIMIConfig",
    "PAPER_GUIDED_FRACTION",
    "PRESETS",
    "instance_probability",
    "spatial_weights",
    "separation_loss",
    "instance_separation_loss",
    "normalize_over_instances",
    "gaussian_smooth",
    "gaussian_smooth_points",
    "nearest_neighbour_spacing",
    "gaussian_kernel1d",
    "SGUStep",
    "adaptive_scale",
    "momentum",
    "sgu_step",
    "sgu_update",
    "smooth_gradient",
    "token_common",
    "common_share",
    "select_common",
    "pool_masks",
    "area_pooling_matrix",
    "stack_token_masks",
    "StepDiagnostics",
    "TIMIPipelineOutput",
]

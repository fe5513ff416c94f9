"""TIMI for PyTorch: guidance inside hy3dgen's Hunyuan3D-DiT flow-matching pipeline."""

from .testing import write_tiny_model_dir

__all__ = ["write_tiny_model_dir"]

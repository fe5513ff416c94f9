"""TIMI for PyTorch: guidance inside hy3dgen's Hunyuan3D-DiT flow-matching pipeline."""

"""Hunyuan3D 2.1 weights (upstream's / ``timi_torch.hunyuan21``'s state-dict keys) -> the Flax
:class:`timi_jax.hunyuan21.HunYuanDiTPlain`.

:data:`KEY_TABLE` (read by :class:`timi_jax.params.KeyTable`): one row per kind of tensor (torch
module prefix -> Flax path, kind), ``{i}`` a block and ``{e}`` an expert index. ``linear``: ``weight`` (out, in) -> ``kernel`` (in, out), ``bias``
copied; ``norm``: ``weight`` -> ``scale``, ``bias`` copied (LayerNorm; RMSNorm has none);
``param``: copied as is. Sources: a torch module, a state dict, a 2.1 checkpoint (``.ckpt`` /
``.safetensors``, its ``model`` section) or a model folder (:func:`from_checkpoint`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax.numpy as jnp

from ..params import KeyTable
from .modeling import DiT21Config, HunYuanDiTPlain

__all__ = ["KEY_TABLE", "flax_path", "convert", "from_torch", "from_checkpoint"]

_FFN = ((".net.0.proj", ".fc1"), (".net.2", ".fc2"))
KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    ("x_embedder", "x_embedder", "linear"),
    ("t_embedder.mlp.0", "t_fc1", "linear"),
    ("t_embedder.mlp.2", "t_fc2", "linear"),
    *[(f"blocks.{{i}}.{n}", f"blocks.{{i}}.{n}", "norm") for n in ("norm1", "norm2", "norm3", "skip_norm")],
    *[(f"blocks.{{i}}.{a}.{p}", f"blocks.{{i}}.{a}.{p}", "linear")
      for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "out_proj")],
    *[(f"blocks.{{i}}.{a}.{n}", f"blocks.{{i}}.{a}.{n}", "norm") for a in ("attn1", "attn2") for n in ("q_norm", "k_norm")],
    ("blocks.{i}.skip_linear", "blocks.{i}.skip_linear", "linear"),
    ("blocks.{i}.mlp.fc1", "blocks.{i}.ffn.fc1", "linear"),
    ("blocks.{i}.mlp.fc2", "blocks.{i}.ffn.fc2", "linear"),
    ("blocks.{i}.moe.gate", "blocks.{i}.ffn", "param:gate"),
    *[(f"blocks.{{i}}.moe.experts.{{e}}{t}", f"blocks.{{i}}.ffn.experts.{{e}}{f}", "linear") for t, f in _FFN],
    *[(f"blocks.{{i}}.moe.shared_experts{t}", f"blocks.{{i}}.ffn.shared_experts{f}", "linear") for t, f in _FFN],
    ("final_layer.norm_final", "norm_final", "norm"),
    ("final_layer.linear", "final_linear", "linear"),
)
#: Buffers recomputed by the Flax module (upstream stores the sin-cos table in the state dict).
RECOMPUTED = ("pos_embed",)
_TABLE = KeyTable(KEY_TABLE, "timi_jax.hunyuan21.params.KEY_TABLE", RECOMPUTED,
                  "attention pooling is not ported; or not a 2.1 DiT key",
                  "depth, num_moe_layers, qkv_bias, qk_norm?")


def flax_path(key: str) -> tuple[tuple, bool]:
    """``'blocks.3.moe.experts.1.net.2.weight'`` -> ``(('blocks', 3, 'ffn', 'experts', 1, 'fc2', 'kernel'), True)``."""
    return _TABLE.flax_path(key)


def convert(state_dict: Mapping, abstract_state) -> dict[tuple, jnp.ndarray]:
    """Flax path -> array for every torch tensor; every Flax parameter must be filled, shapes must match."""
    return _TABLE.convert(state_dict, abstract_state)


def from_torch(source, config: DiT21Config | None = None, *, dtype=jnp.float32, param_dtype=None,
               **kwargs) -> HunYuanDiTPlain:
    """A Flax 2.1 DiT holding ``source``'s weights (a torch ``HunYuanDiTPlain``: config read off it;
    else pass ``config`` or upstream's keywords)."""
    if config is None:
        config = getattr(source, "config", None) if not kwargs else DiT21Config.from_kwargs(**kwargs)
    if not isinstance(config, DiT21Config):
        raise ValueError("pass config=DiT21Config(...) or upstream's keywords for a state dict or a file.")
    return _TABLE.build(lambda: HunYuanDiTPlain(config, dtype=dtype, param_dtype=param_dtype or dtype), source)


def from_checkpoint(folder, *, dtype=jnp.float32, param_dtype=None) -> HunYuanDiTPlain:
    """From a 2.1 model folder (``config.yaml`` + ``model[.fp16].ckpt`` or ``.safetensors``)."""
    import yaml

    with open(os.path.join(folder, "config.yaml")) as f:
        params = (yaml.safe_load(f)["model"].get("params") or {})
    for name in ("model.fp16.ckpt", "model.ckpt", "model.fp16.safetensors", "model.safetensors"):
        if os.path.exists(os.path.join(folder, name)):
            return from_torch(os.path.join(folder, name), DiT21Config.from_kwargs(**params), dtype=dtype,
                              param_dtype=param_dtype)
    raise FileNotFoundError(f"{folder}: no model[.fp16].ckpt or model[.fp16].safetensors")

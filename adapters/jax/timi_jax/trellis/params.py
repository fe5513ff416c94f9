"""TRELLIS stage-1 flow weights (upstream's / ``timi_torch.trellis``'s state-dict keys) -> the Flax
:class:`timi_jax.trellis.SparseStructureFlowModel`.

:data:`KEY_TABLE` (read by :class:`timi_jax.params.KeyTable`): one row per kind of tensor, ``{i}`` a
block index; ``pos_emb`` is a buffer upstream saves and loads with the weights (the fixed sin/cos table
in the released checkpoints), so it is copied too. Sources: a torch
``SparseStructureFlowModel`` (its config read off it), a state dict, a ``.safetensors`` file, or
upstream's checkpoint stem (``<stem>.json`` + ``<stem>.safetensors``, :func:`from_checkpoint`).
Half-precision tensors (the released ``*_fp16`` checkpoints) become float32 parameters.
"""

from __future__ import annotations

import jax.numpy as jnp

from ..params import KeyTable
from .modeling import FlowConfig, SparseStructureFlowModel

__all__ = ["KEY_TABLE", "from_torch", "from_checkpoint"]

KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    ("t_embedder.mlp.0", "t_embedder.in_layer", "linear"),
    ("t_embedder.mlp.2", "t_embedder.out_layer", "linear"),
    ("adaLN_modulation.1", "adaLN_modulation.lin", "linear"),          # share_mod
    ("", "", "keep:pos_emb"),                                         # a buffer upstream saves and loads
    ("input_layer", "input_layer", "linear"),
    ("blocks.{i}.norm2", "blocks.{i}.norm2", "norm"),
    *[(f"blocks.{{i}}.{a}.{p}", f"blocks.{{i}}.{a}.{p}", "linear")
      for a, ps in (("self_attn", ("to_qkv", "to_out")), ("cross_attn", ("to_q", "to_kv", "to_out"))) for p in ps],
    *[(f"blocks.{{i}}.{a}.{n}", f"blocks.{{i}}.{a}.{n}", "keep:gamma")
      for a in ("self_attn", "cross_attn") for n in ("q_rms_norm", "k_rms_norm")],
    ("blocks.{i}.mlp.mlp.0", "blocks.{i}.mlp.fc1", "linear"),
    ("blocks.{i}.mlp.mlp.2", "blocks.{i}.mlp.fc2", "linear"),
    ("blocks.{i}.adaLN_modulation.1", "blocks.{i}.adaLN_modulation.lin", "linear"),
    ("out_layer", "out_layer", "linear"),
)
_TABLE = KeyTable(KEY_TABLE, "timi_jax.trellis.params.KEY_TABLE", (),
                  "not a stage-1 flow key: the decoder and stage 2 are not ported to JAX",
                  "num_blocks, share_mod, qk_rms_norm, qk_rms_norm_cross?")


def from_torch(source, config: FlowConfig | None = None, *, dtype=jnp.float32, param_dtype=None,
               **kwargs) -> SparseStructureFlowModel:
    """A Flax flow model holding ``source``'s weights (a torch ``SparseStructureFlowModel``: config
    read off it; else pass ``config`` or upstream's keywords)."""
    if config is None:
        config = FlowConfig(**kwargs) if kwargs else getattr(source, "config", None)
    if not isinstance(config, FlowConfig):
        raise ValueError("pass config=FlowConfig(...) or upstream's keywords for a state dict or a file.")
    return _TABLE.build(lambda: SparseStructureFlowModel(config, dtype=dtype, param_dtype=param_dtype or dtype),
                        source)


def from_checkpoint(path, *, dtype=jnp.float32, param_dtype=None) -> SparseStructureFlowModel:
    """From upstream's checkpoint layout (``<stem>.json`` + ``<stem>.safetensors``; ``path`` the stem
    or either file), read by :func:`timi_torch.trellis.load_model` (its checks and errors)."""
    from timi_torch.trellis import load_model

    return from_torch(load_model(path), dtype=dtype, param_dtype=param_dtype)

"""hy3dgen (PyTorch) weights -> :class:`timi_jax.Hunyuan3DDiT` parameters.

The mapping is the table :data:`KEY_TABLE`: one row per kind of tensor, ``{i}`` standing for a
block index. ``torch.nn.Linear`` stores ``weight`` as (out, in); Flax ``kernel`` is (in, out), so
``weight`` rows are transposed; ``bias`` and RMSNorm ``scale`` are copied. Every tensor's shape is
checked against the Flax model and a mismatch names the offending torch key.

Accepted sources (:func:`load_state_dict`):

* a ``torch.nn.Module`` (hy3dgen's ``Hunyuan3DDiT``): its ``state_dict()``;
* a mapping of arrays/tensors: a plain DiT state dict, a single-file checkpoint's flat dict with
  ``model.`` / ``vae.`` / ``conditioner.`` prefixes (only ``model.`` keys are used), a torch.load
  result grouped as ``{'model': {...}, 'vae': {...}}``, or ``{'state_dict': {...}}``;
* a path to such a checkpoint, ``.safetensors`` (read without torch) or ``.ckpt`` / ``.pt`` /
  ``.pth`` (``torch.load(weights_only=True)``).

The model configuration (:class:`timi_jax.modeling.ModelConfig`'s fields) comes from hy3dgen's
``config.yaml`` (:func:`config_from_yaml`), from the torch module's attributes, or is inferred from
the tensor shapes (:func:`infer_config`). This module builds the network of
:mod:`timi_jax.modeling` and fills it; the network never imports this module.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .modeling import Hunyuan3DDiT, ModelConfig

__all__ = [
    "KEY_TABLE",
    "torch_key_to_flax_path",
    "load_state_dict",
    "infer_config",
    "config_from_yaml",
    "convert_state_dict",
    "load_into",
    "from_torch",
    "from_checkpoint",
    "KeyTable",
]

# (torch module prefix, flax module path, kind) -- kind "linear": weight->kernel (transposed) and
# bias->bias; kind "scale": the RMSNorm scale, copied.
KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    ("latent_in", "latent_in", "linear"),
    ("time_in.in_layer", "time_in.in_layer", "linear"),
    ("time_in.out_layer", "time_in.out_layer", "linear"),
    ("cond_in", "cond_in", "linear"),
    ("guidance_in.in_layer", "guidance_in.in_layer", "linear"),
    ("guidance_in.out_layer", "guidance_in.out_layer", "linear"),
    *[
        row
        for s in ("img", "txt")
        for row in (
            (f"double_blocks.{{i}}.{s}_mod.lin", f"double_blocks.{{i}}.{s}_mod.lin", "linear"),
            (f"double_blocks.{{i}}.{s}_attn.qkv", f"double_blocks.{{i}}.{s}_attn.qkv", "linear"),
            (f"double_blocks.{{i}}.{s}_attn.proj", f"double_blocks.{{i}}.{s}_attn.proj", "linear"),
            (f"double_blocks.{{i}}.{s}_attn.norm.query_norm",
             f"double_blocks.{{i}}.{s}_attn.norm.query_norm", "scale"),
            (f"double_blocks.{{i}}.{s}_attn.norm.key_norm",
             f"double_blocks.{{i}}.{s}_attn.norm.key_norm", "scale"),
            (f"double_blocks.{{i}}.{s}_mlp.0", f"double_blocks.{{i}}.{s}_mlp.fc1", "linear"),
            (f"double_blocks.{{i}}.{s}_mlp.2", f"double_blocks.{{i}}.{s}_mlp.fc2", "linear"),
        )
    ],
    ("single_blocks.{i}.linear1", "single_blocks.{i}.linear1", "linear"),
    ("single_blocks.{i}.linear2", "single_blocks.{i}.linear2", "linear"),
    ("single_blocks.{i}.norm.query_norm", "single_blocks.{i}.norm.query_norm", "scale"),
    ("single_blocks.{i}.norm.key_norm", "single_blocks.{i}.norm.key_norm", "scale"),
    ("single_blocks.{i}.modulation.lin", "single_blocks.{i}.modulation.lin", "linear"),
    ("final_layer.linear", "final_layer.linear", "linear"),
    ("final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation", "linear"),
)

_LEAVES = {"linear": {"weight": "kernel", "bias": "bias"}, "scale": {"scale": "scale"}}


def _compile_table():
    rules = []
    for torch_prefix, flax_prefix, kind in KEY_TABLE:
        pattern = re.escape(torch_prefix).replace(re.escape("{i}"), r"(?P<i>\d+)")
        for torch_leaf, flax_leaf in _LEAVES[kind].items():
            rules.append((re.compile(rf"^{pattern}\.{torch_leaf}$"), flax_prefix, flax_leaf,
                          torch_leaf == "weight"))
    return rules


_RULES = _compile_table()


def torch_key_to_flax_path(key: str) -> tuple[tuple, bool]:
    """``'double_blocks.3.img_mlp.0.weight'`` -> ``(('double_blocks', 3, 'img_mlp', 'fc1',
    'kernel'), True)``; the flag says whether the tensor is transposed. KeyError if unknown."""
    for regex, flax_prefix, flax_leaf, transpose in _RULES:
        match = regex.match(key)
        if match:
            dotted = flax_prefix.replace("{i}", match.group("i")) if "{i}" in flax_prefix else flax_prefix
            path = tuple(int(p) if p.isdigit() else p for p in dotted.split(".")) + (flax_leaf,)
            return path, transpose
    raise KeyError(f"torch key {key!r} has no row in timi_jax.params.KEY_TABLE: not a "
                   "Hunyuan3DDiT parameter (a VAE/conditioner key, or another model's checkpoint?)")


# ----------------------------------------------------------------------------- loading sources
def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor: bf16/fp16 -> float32 exactly
        value = value.detach().cpu()
        if not value.dtype.is_floating_point or value.dtype.itemsize < 4:
            value = value.float()
        return value.numpy()
    return np.asarray(value, dtype=np.float32) if str(getattr(value, "dtype", "")) == "bfloat16" \
        else np.asarray(value)


def _read_file(path: str) -> Mapping:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found")
    if path.endswith(".safetensors"):
        from safetensors.flax import load_file

        return load_file(path)
    if path.endswith((".ckpt", ".pt", ".pth", ".bin")):
        import torch

        return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(f"checkpoint {path!r}: use a .safetensors, .ckpt, .pt or .pth file")


def load_state_dict(source) -> dict[str, np.ndarray]:
    """The DiT's torch-named tensors as NumPy arrays from any accepted source (module docstring)."""
    if isinstance(source, (str, os.PathLike)):
        source = _read_file(os.fspath(source))
    elif hasattr(source, "state_dict") and callable(source.state_dict):
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise TypeError(f"expected a torch module, a state dict or a checkpoint path, got "
                        f"{type(source).__name__}")
    if "state_dict" in source and isinstance(source["state_dict"], Mapping):
        source = source["state_dict"]
    if "model" in source and isinstance(source["model"], Mapping):  # torch.load single-file ckpt
        source = source["model"]
    source = {k.replace("_forward_module.", ""): v for k, v in source.items()}
    if any(k.startswith("model.") for k in source):  # flat single-file ckpt: keep the DiT group
        source = {k[len("model."):]: v for k, v in source.items() if k.startswith("model.")}
    if not source:
        raise ValueError("the checkpoint holds no DiT tensors (no keys, or no 'model.' group)")
    return {k: _to_numpy(v) for k, v in source.items()}


# ----------------------------------------------------------------------------- configuration
_CONFIG_ATTRS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def infer_config(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Constructor arguments read off the tensor shapes (``theta``/``time_factor`` not stored)."""
    sd = state_dict
    if "latent_in.weight" not in sd or "cond_in.weight" not in sd:
        raise KeyError("cannot infer the config: 'latent_in.weight' or 'cond_in.weight' missing")
    hidden, in_channels = sd["latent_in.weight"].shape
    cfg = dict(in_channels=int(in_channels), hidden_size=int(hidden),
               context_in_dim=int(sd["cond_in.weight"].shape[1]),
               guidance_embed="guidance_in.in_layer.weight" in sd)

    def count(prefix):
        idx = {int(k.split(".")[1]) for k in sd if k.startswith(prefix + ".")}
        return max(idx) + 1 if idx else 0

    cfg["depth"], cfg["depth_single_blocks"] = count("double_blocks"), count("single_blocks")
    for key in ("double_blocks.0.img_attn.norm.query_norm.scale",
                "single_blocks.0.norm.query_norm.scale"):
        if key in sd:
            head_dim = int(sd[key].shape[0])
            cfg.update(num_heads=int(hidden) // head_dim, axes_dim=[head_dim])
            break
    if "double_blocks.0.img_mlp.0.weight" in sd:
        cfg["mlp_ratio"] = sd["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden
        cfg["qkv_bias"] = "double_blocks.0.img_attn.qkv.bias" in sd
    elif "single_blocks.0.linear1.weight" in sd:
        cfg["mlp_ratio"] = (sd["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden) / hidden
    return cfg


def config_from_yaml(path: str) -> dict:
    """The DiT's constructor arguments from hy3dgen's ``config.yaml`` (``model.params``)."""
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f)
    try:
        params = dict(config["model"].get("params", {}))
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{path}: expected hy3dgen's layout with a 'model:' section") from None
    params.pop("ckpt_path", None)
    return params


def scheduler_config_from_yaml(path: str) -> dict:
    """The scheduler's arguments (``num_train_timesteps``, ``shift``) from hy3dgen's config.yaml."""
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f)
    return dict((config.get("scheduler") or {}).get("params", {}) or {})


# ----------------------------------------------------------------------------- conversion
def convert_state_dict(state_dict: Mapping[str, np.ndarray], abstract_state,
                       *, strict: bool = True) -> dict[tuple, jnp.ndarray]:
    """Flax parameter path -> array for each torch tensor, transposed, shape-checked and cast.

    ``abstract_state``: ``nnx.split(model)[1]`` (arrays or ``ShapeDtypeStruct``). Raises KeyError
    for a torch key without a table row or one naming a parameter the model lacks, and (when
    ``strict``) for model parameters the checkpoint lacks; ValueError for a shape mismatch. Each
    error names the torch key.
    """
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(abstract_state)}
    new = {}
    for key, value in state_dict.items():
        path, transpose = torch_key_to_flax_path(key)
        dotted = ".".join(map(str, path))
        if path not in flat:
            raise KeyError(f"torch key {key!r} maps to Flax parameter {dotted}, which this model "
                           "does not have: the constructor arguments do not match the checkpoint "
                           "(depth, depth_single_blocks, qkv_bias, guidance_embed?)")
        value = value.T if transpose else value
        expected = tuple(flat[path].shape)
        if tuple(value.shape) != expected:
            raise ValueError(f"torch key {key!r}: shape {tuple(value.shape)}"
                             f"{' (transposed)' if transpose else ''} != expected {expected} of "
                             f"Flax {dotted}; check the constructor arguments (hidden_size, "
                             "num_heads, mlp_ratio, in_channels, context_in_dim)")
        new[path] = jnp.asarray(value, dtype=flat[path].dtype)
    missing = [".".join(map(str, p)) for p in flat if p not in new]
    if missing and strict:
        raise KeyError(f"the checkpoint lacks {len(missing)} parameter(s) of the Flax model, e.g. "
                       f"{missing[:5]}")
    return new


def load_into(model: Hunyuan3DDiT, source, *, strict: bool = True) -> Hunyuan3DDiT:
    """Copy the weights of ``source`` into ``model`` in place (cast to its ``param_dtype``)."""
    _, state = nnx.split(model)
    new = convert_state_dict(load_state_dict(source), state, strict=strict)
    nnx.update(model, nnx.from_flat_state(new))
    return model


def from_torch(model_or_state_dict, *, dtype=jnp.float32, param_dtype=None,
               **hy3dgen_dit_kwargs) -> Hunyuan3DDiT:
    """A :class:`Hunyuan3DDiT` holding the weights of a hy3dgen torch model / state dict / file.

    The configuration is, in order: ``hy3dgen_dit_kwargs``; else the torch module's attributes;
    else what the shapes imply (:func:`infer_config`); else hy3dgen's defaults. ``param_dtype``
    defaults to ``dtype``.
    """
    config = {}
    if hasattr(model_or_state_dict, "state_dict") and hasattr(model_or_state_dict, "hidden_size"):
        config = {a: getattr(model_or_state_dict, a) for a in _CONFIG_ATTRS
                  if hasattr(model_or_state_dict, a)}
    sd = load_state_dict(model_or_state_dict)
    if not config:
        config = infer_config(sd)
    config.update(hy3dgen_dit_kwargs)
    config.pop("ckpt_path", None)
    param_dtype = param_dtype if param_dtype is not None else dtype
    # build the module abstractly (no random initialisation of a billion weights), then fill it
    abstract = nnx.eval_shape(lambda: Hunyuan3DDiT(**config, dtype=dtype, param_dtype=param_dtype))
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, nnx.from_flat_state(convert_state_dict(sd, state)))


def from_checkpoint(path: str, config_path: str | None = None, *, dtype=jnp.float32,
                    param_dtype=None, **hy3dgen_dit_kwargs) -> Hunyuan3DDiT:
    """Load from a hy3dgen model directory (``config.yaml`` + ``model[.fp16].safetensors|ckpt``)
    or a single checkpoint file (config from ``config_path``, else inferred from shapes)."""
    if os.path.isdir(path):
        config_path = config_path or os.path.join(path, "config.yaml")
        for name in ("model.fp16.safetensors", "model.safetensors", "model.fp16.ckpt", "model.ckpt"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path}: no model[.fp16].safetensors or model[.fp16].ckpt")
    kwargs = config_from_yaml(config_path) if config_path else {}
    kwargs.update(hy3dgen_dit_kwargs)
    return from_torch(path, dtype=dtype, param_dtype=param_dtype, **kwargs)


# ----------------------------------------------------------------------------- other families' tables
class KeyTable:
    """torch state-dict keys -> Flax parameter paths for a model family (Hunyuan3D 2.1, TRELLIS).

    ``rows``: ``(torch module prefix, Flax module path, kind)``, ``{i}`` / ``{e}`` standing for a block
    / expert index. ``kind`` ``"linear"``: ``weight`` (out, in) -> ``kernel`` (in, out), ``bias``
    copied; ``"norm"``: ``weight`` -> ``scale``, ``bias`` copied (a LayerNorm; an RMSNorm has no
    bias); ``"param:<leaf>"``: the torch ``weight`` copied to ``<leaf>``; ``"keep:<leaf>"``: the torch
    ``<leaf>`` copied to ``<leaf>`` (an empty prefix: a top-level tensor). ``recomputed``: torch keys the Flax module recomputes (buffers);
    ``name`` and the two hints go into the errors."""

    _LEAVES = {"linear": {"weight": "kernel", "bias": "bias"}, "norm": {"weight": "scale", "bias": "bias"}}

    def __init__(self, rows, name: str, recomputed=(), unknown_hint: str = "", mismatch_hint: str = ""):
        self.rows, self.name, self.recomputed = tuple(rows), name, tuple(recomputed)
        self.unknown_hint, self.mismatch_hint = unknown_hint, mismatch_hint
        self._rules = []
        for torch_prefix, flax_prefix, kind in self.rows:
            pattern = (re.escape(torch_prefix).replace(re.escape("{i}"), r"(?P<i>\d+)")
                       .replace(re.escape("{e}"), r"(?P<e>\d+)"))
            head, _, leaf = kind.partition(":")
            leaves = {"param": {"weight": leaf}, "keep": {leaf: leaf}}.get(head) or self._LEAVES[kind]
            for torch_leaf, flax_leaf in leaves.items():
                self._rules.append((re.compile(rf"^{pattern + '[.]' if pattern else ''}{torch_leaf}$"), flax_prefix, flax_leaf,
                                    kind == "linear" and torch_leaf == "weight"))

    def flax_path(self, key: str) -> tuple[tuple, bool]:
        """A torch key -> ``(Flax path, transposed?)``; KeyError for a key with no row."""
        for regex, prefix, leaf, transpose in self._rules:
            m = regex.match(key)
            if m:
                groups = m.groupdict()
                dotted = prefix.replace("{i}", groups.get("i") or "").replace("{e}", groups.get("e") or "")
                return tuple(int(p) if p.isdigit() else p for p in dotted.split(".") if p) + (leaf,), transpose
        raise KeyError(f"torch key {key!r} has no row in {self.name} ({self.unknown_hint})")

    def convert(self, state_dict: Mapping, abstract_state) -> dict[tuple, jnp.ndarray]:
        """Flax path -> array for every torch tensor; every Flax parameter must be filled, shapes must match."""
        flat = {p: v.get_value() for p, v in nnx.to_flat_state(abstract_state)}
        new = {}
        for key, value in state_dict.items():
            if key in self.recomputed:
                continue
            path, transpose = self.flax_path(key)
            if path not in flat:
                raise KeyError(f"torch key {key!r} -> {'.'.join(map(str, path))}, which this model lacks: the "
                               f"config does not match the checkpoint ({self.mismatch_hint})")
            value = value.T if transpose else value
            if tuple(value.shape) != tuple(flat[path].shape):
                raise ValueError(f"torch key {key!r}: shape {tuple(value.shape)} != {tuple(flat[path].shape)} "
                                 "of the Flax model")
            new[path] = jnp.asarray(value, flat[path].dtype)
        missing = [".".join(map(str, p)) for p in flat if p not in new]
        if missing:
            raise KeyError(f"the checkpoint lacks {len(missing)} parameter(s) of the Flax model, e.g. {missing[:5]}")
        return new

    def build(self, make_model, source):
        """``make_model()`` built abstractly (no random initialisation) and filled from ``source``
        (anything :func:`load_state_dict` accepts)."""
        graphdef, state = nnx.split(nnx.eval_shape(make_model))
        return nnx.merge(graphdef, nnx.from_flat_state(self.convert(load_state_dict(source), state)))

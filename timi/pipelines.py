"""The one door from the application to the adapters: models, their geometry, loaded pipelines.

``timi generate``, ``timi inspect``, ``timi eval`` and ``timi testbed`` find a model, read its
geometry and load a pipeline here, and nowhere else:

* :func:`resolve_model` - ``--model`` or the model shipped with the project (the only place
  that falls back to ``timi.testbed.default_model_path``), checked before anything loads;
* :func:`model_config_path`, :func:`read_model_config`, :func:`geometry_pipeline`,
  :func:`grid_tokens` - the model's ``config.yaml`` and the condition-token geometry it implies,
  loading no weights (``timi inspect``, the mask checks of ``timi generate``);
* :func:`load_pipeline` - a ``timi_torch.TIMIPipeline`` or ``timi_jax.TIMIPipelineJAX`` for
  (model, backend, device, dtype, config); :func:`pipeline_depth` - its double-stream blocks.

>>> from timi.pipelines import load_pipeline                              # doctest: +SKIP
>>> pipe = load_pipeline()                  # the shipped model, torch, cpu/cuda  # doctest: +SKIP
>>> out = pipe("scene.png", masks, generator=torch.manual_seed(0))        # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import types
from pathlib import Path
from typing import Optional

import yaml

from timi_core import TIMIConfig
from timi_core.defaults import DECODING

__all__ = ["ModelNotFoundError", "ModelConfigError", "BackendUnavailableError", "BACKENDS", "DTYPES", "DECODINGS",
           "resolve_model", "model_notes", "model_config_path", "read_model_config", "check_model_config",
           "geometry_from_config", "geometry_pipeline", "grid_tokens", "resolve_device", "torch_dtype",
           "check_backend", "load_pipeline", "pipeline_depth", "DEFAULT_GEOMETRY", "DEFAULT_SUBFOLDER", "MC_ALGOS",
           "check_mc_algo", "turbo_vae_path", "enable_flashvdm", "is_multiview", "token_positions", "is_trellis",
           "NAMED_MODELS", "family_preset"]

BACKENDS = ("torch", "jax")
DTYPES = ("auto", "float32", "float16", "bfloat16")
#: hy3dgen's subfolder of a model id (``$HY3DGEN_MODELS/<id>/<subfolder>``).
DEFAULT_SUBFOLDER = "hunyuan3d-dit-v2-0"
#: A hy3dgen model id (``owner/name``), looked up under ``$HY3DGEN_MODELS`` and then on the hub.
_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
#: Hunyuan3D 2.0's conditioner and image processor settings (used when no config.yaml is found).
DEFAULT_GEOMETRY = {"image_size": 518, "patch_size": 14, "use_cls_token": True, "processor_size": 512, "border_ratio": 0.15,
                    "multiview": False}
#: hy3dgen's surface extractors (``SurfaceExtractors``): marching cubes on CPU, ``dmc`` (CUDA, ``diso``).
MC_ALGOS = ("mc", "dmc")
#: Volume decodings (``timi_torch.decoding``): coarse-to-fine, the command line's default, or dense.
DECODINGS = ("coarse-to-fine", "dense")
#: hy3dgen's ``enable_flashvdm`` mapping: the turbo VAE a family's DiTs decode with (model id, subfolder).
TURBO_VAES = {"Hunyuan3D-2": ("tencent/Hunyuan3D-2", "hunyuan3d-vae-v2-0-turbo"),
              "Hunyuan3D-2mv": ("tencent/Hunyuan3D-2", "hunyuan3d-vae-v2-0-turbo"),
              "Hunyuan3D-2mini": ("tencent/Hunyuan3D-2mini", "hunyuan3d-vae-v2-mini-turbo")}
#: The sections hy3dgen's loader builds the pipeline from (each a ``target`` class and ``params``).
CONFIG_SECTIONS = ("model", "vae", "conditioner", "scheduler", "image_processor")
#: ``Hunyuan3DDiT``'s defaults (hy3dgen 2.0.2) for the settings that must agree: each head's
#: rotary embedding is split into ``axes_dim``, so ``sum(axes_dim) == hidden_size / num_heads``.
DIT_DEFAULTS = {"hidden_size": 1024, "num_heads": 16, "axes_dim": [64]}


class ModelNotFoundError(FileNotFoundError):
    """No model to load; the message says where it was looked for and what to pass."""


class ModelConfigError(ValueError):
    """A model's ``config.yaml`` that cannot be read or lacks what hy3dgen needs; names the file."""


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this command; the message says which one can."""


# ------------------------------------------------------------------------------ which model


def resolve_model(model: Optional[str], weights: bool = True) -> str:
    """``--model`` or, when not given, the model shipped with the project (``timi.testbed``).

    A local folder must hold ``config.yaml`` (and, with ``weights``, ``model.fp16.safetensors``);
    a string that is no local path must be a hy3dgen id (``owner/name``). Raises
    :class:`ModelNotFoundError` naming the argument, before anything is loaded.
    """
    if model:
        if str(model) in NAMED_MODELS:
            return str(NAMED_MODELS[str(model)]())
        return _check_model_arg(str(model), weights)
    from timi.testbed import default_model_path

    try:
        path = default_model_path()
    except Exception as e:  # the helper exists but cannot find/build its files
        raise ModelNotFoundError(f"the shipped model is not available ({e}); pass --model DIR_OR_ID.") from None
    if path is not None and Path(path).exists():
        return str(path)
    raise ModelNotFoundError(
        "no --model given and no shipped default model is installed; pass --model with a hy3dgen model "
        "directory (config.yaml + model*.safetensors) or an id such as tencent/Hunyuan3D-2 (looked up under $HY3DGEN_MODELS)."
    )


def _trellis_testbed_path() -> Path:
    from timi.testbed import trellis_testbed_path

    try:
        return trellis_testbed_path()
    except FileNotFoundError as e:
        raise ModelNotFoundError(f"--model trellis-testbed: {e}") from None


#: Models shipped with the project, by name (``--model NAME``).
NAMED_MODELS = {"trellis-testbed": _trellis_testbed_path}


def is_trellis(model: str | Path | None) -> bool:
    """Whether ``model`` is a folder in TRELLIS's layout (``pipeline.json``: :mod:`timi_torch.trellis`)."""
    from timi_torch.trellis.pipeline import is_trellis_folder

    return model is not None and is_trellis_folder(model)


def family_preset(model: str | Path | None, preset: str = "default") -> str:
    """The TIMI form ``--preset default`` means for ``model``: ``TIMIConfig()`` on token latents
    (Hunyuan3D), the paper's literal form on a TRELLIS grid latent, where the rule written before
    scoring (docs/lab/2026-12-07-grid-testbed-plan.md) found no variant that qualifies on the grid
    testbed's validation split, so the paper's form stays (docs/results.md). Other presets unchanged."""
    if preset != "default" or model is None:
        return preset
    try:
        return "paper" if is_trellis(resolve_model(str(model))) else preset
    except ModelNotFoundError:
        return preset


def _check_model_arg(model: str, weights: bool) -> str:
    p = Path(model).expanduser()
    want = ("a hy3dgen model directory (config.yaml + model.fp16.safetensors, or Hunyuan3D 2.1's model.fp16.ckpt), "
            "a TRELLIS folder (pipeline.json) or an id such as tencent/Hunyuan3D-2")
    if is_trellis(p):
        return model
    if p.is_dir():
        need = ["config.yaml"] + (["model.fp16.safetensors"] if weights else [])
        missing = [n for n in need if not (p / n).is_file()]
        if missing == ["model.fp16.safetensors"] and (p / "model.fp16.ckpt").is_file():
            missing = []
        if missing:
            held = ", ".join(sorted(f.name for f in p.iterdir())[:6]) or "nothing"
            raise ModelNotFoundError(f"--model {model}: the folder lacks {' and '.join(missing)} (it holds {held}); pass {want}.")
        return model
    if p.is_file() or (_MODEL_ID.fullmatch(model) and not model.startswith((".", "~"))):
        return model
    raise ModelNotFoundError(f"--model {model}: no such folder or file; pass {want} (looked up under $HY3DGEN_MODELS).")


def _models_root() -> str:
    return os.environ.get("HY3DGEN_MODELS", "~/.cache/hy3dgen")


def model_notes(model: str) -> list[str]:
    """A warning when an id has no local copy (hy3dgen will try the hub; the masks are checked
    with Hunyuan3D 2.0's geometry)."""
    if model_config_path(model) is not None:
        return []
    return [f"--model {model}: no local config.yaml (looked under {_models_root()}/{model}/{_subfolder(model)}); "
            "using Hunyuan3D 2.0's 37x37 token geometry - set HY3DGEN_MODELS or pass the model folder."]


# ------------------------------------------------------------------------ its config.yaml


def _subfolder(model) -> str:
    from timi_torch.pipeline import default_subfolder

    return default_subfolder(str(model))


def model_config_path(model: str | Path | None) -> Path | None:
    """The model's ``config.yaml``: in a model directory, beside a checkpoint file, or for a hy3dgen
    id under ``$HY3DGEN_MODELS/<id>/hunyuan3d-dit-v2-0`` (hy3dgen's local resolution;
    ``hunyuan3d-dit-v2-1`` for ``*/Hunyuan3D-2.1``)."""
    if model is None:
        return None
    p = Path(str(model)).expanduser()
    if is_trellis(p):
        from timi_torch.trellis.pipeline import CONDITIONER_FILE

        return p / CONDITIONER_FILE if (p / CONDITIONER_FILE).is_file() else None
    root = Path(_models_root()).expanduser()
    candidates = [p / "config.yaml", p.parent / "config.yaml" if p.is_file() else None,
                  root / str(model) / _subfolder(model) / "config.yaml"]
    return next((c for c in candidates if c is not None and c.is_file()), None)


def read_model_config(path: Path) -> dict:
    """Parse and check a hy3dgen ``config.yaml`` (:func:`check_model_config`), or a TRELLIS folder's
    ``conditioner.json`` (its conditioner and image processor sections); one-line errors."""
    if path.suffix == ".json":
        import json

        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ModelConfigError(f"{path}: cannot read it ({e}); restore the TRELLIS folder's conditioner.json.") from None
        if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in ("conditioner", "image_processor")):
            raise ModelConfigError(f"{path}: no conditioner and image_processor sections; restore the TRELLIS folder's "
                                   "conditioner.json.")
        return config
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ModelConfigError(f"{path}: not valid YAML ({problem}{where}); restore the model's config.yaml.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"{path}: cannot read it ({e}); check the file and its permissions.") from None
    check_model_config(config, path)
    return config


def check_model_config(config, path: Path) -> None:
    """What hy3dgen would otherwise fail on deep inside the model build: missing sections, and DiT
    settings that disagree (``Got [64] but expected positional dim 6``)."""
    fix = "restore the model's config.yaml (it must match model.fp16.safetensors)"
    if not isinstance(config, dict):
        raise ModelConfigError(f"{path}: holds a {type(config).__name__}, not hy3dgen's sections "
                               f"({', '.join(CONFIG_SECTIONS)}); {fix}.")
    missing = [k for k in CONFIG_SECTIONS if not isinstance(config.get(k), dict) or "target" not in config[k]]
    if missing:
        raise ModelConfigError(f"{path}: no {', '.join(missing)} section with a 'target'; {fix}.")
    if str(config["model"]["target"]).rsplit(".", 1)[-1] == "HunYuanDiTPlain":     # Hunyuan3D 2.1
        _check_dit21(config["model"].get("params") or {}, path, fix)
        return
    params = {**DIT_DEFAULTS, **(config["model"].get("params") or {})}
    try:
        hidden, heads = int(params["hidden_size"]), int(params["num_heads"])
        axes = [int(v) for v in params["axes_dim"]]
    except (TypeError, ValueError):
        raise ModelConfigError(f"{path}: model.params hidden_size, num_heads and axes_dim must be integers; {fix}.") from None
    if heads <= 0 or hidden % heads or sum(axes) != hidden // heads:
        raise ModelConfigError(
            f"{path}: model.params hidden_size {hidden} / num_heads {heads} does not match axes_dim {axes} "
            f"(sum {sum(axes)}; missing keys take hy3dgen's full-size defaults); {fix}."
        )


def _check_dit21(params: dict, path: Path, fix: str) -> None:
    from timi_torch.hunyuan21 import DiT21Config

    try:
        DiT21Config.from_kwargs(**params)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise ModelConfigError(f"{path}: model.params of the Hunyuan3D 2.1 DiT: {e}; {fix}.") from None


# ------------------------------------------------------------------------------ its geometry


def geometry_from_config(config: dict | None) -> dict:
    """The geometry settings (see :data:`DEFAULT_GEOMETRY`) read from a hy3dgen ``config.yaml``."""
    geo = dict(DEFAULT_GEOMETRY)
    if not config:
        return geo
    try:
        enc = (config.get("conditioner", {}).get("params") or {}).get("main_image_encoder", {}).get("kwargs", {})
        geo["image_size"] = int(enc.get("image_size", 224))  # hy3dgen's ImageEncoder default
        geo["use_cls_token"] = bool(enc.get("use_cls_token", True))
        geo["patch_size"] = int((enc.get("config") or {}).get("patch_size", 14))
        proc = config.get("image_processor", {}).get("params") or {}
        geo["multiview"] = str(config.get("image_processor", {}).get("target", "")).endswith("MVImageProcessorV2")
        geo["processor_size"] = int(proc.get("size", 512))
        if proc.get("border_ratio") is not None:
            geo["border_ratio"] = float(proc["border_ratio"])
    except (AttributeError, TypeError, ValueError) as e:
        raise ModelConfigError(f"config.yaml: unreadable conditioner/image_processor settings ({e}); "
                               "restore the model's config.yaml.") from None
    if geo["image_size"] < geo["patch_size"] or geo["patch_size"] <= 0 or geo["processor_size"] <= 0:
        raise ModelConfigError(f"config.yaml: image_size {geo['image_size']} / patch_size {geo['patch_size']} / "
                               f"size {geo['processor_size']} give no token grid; restore the model's config.yaml.")
    return geo


def geometry_pipeline(model: str | Path | None = None, geometry: dict | None = None):
    """A stand-in with the attributes :func:`timi_torch.condition_token_masks` reads (hy3dgen's real
    ``ImageProcessorV2`` and the conditioner's torchvision transform) and no network weights."""
    from hy3dgen.shapegen.preprocessors import ImageProcessorV2, MVImageProcessorV2
    from torchvision import transforms

    if geometry is None:
        path = model_config_path(model)
        try:
            geometry = geometry_from_config(read_model_config(path) if path is not None else None)
        except ModelConfigError as e:
            msg = str(e)
            if not msg.startswith("config.yaml:"):
                raise
            raise ModelConfigError(f"{path}:{msg[len('config.yaml:'):]}") from None
    geo = geometry
    S, patch = geo["image_size"], geo["patch_size"]
    processor = (MVImageProcessorV2 if geo.get("multiview") else ImageProcessorV2)(
        size=geo["processor_size"], border_ratio=geo["border_ratio"])
    encoder = types.SimpleNamespace(
        transform=transforms.Compose([
            transforms.Resize(S, transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(S),
        ]),
        model=types.SimpleNamespace(config=types.SimpleNamespace(patch_size=patch)),
        use_cls_token=geo["use_cls_token"],
        num_patches=(S // patch) ** 2 + int(geo["use_cls_token"]),
    )

    def prepare_image(image):
        return processor(image)

    return types.SimpleNamespace(
        image_processor=processor,
        conditioner=types.SimpleNamespace(main_image_encoder=encoder),
        prepare_image=prepare_image,
        geometry=geo,
    )


def grid_tokens(geometry: dict) -> int:
    """Number of patch tokens (the most instances the grid can hold)."""
    g = geometry["image_size"] // geometry["patch_size"]
    return g * g


# ------------------------------------------------------------------------------ its pipeline


def resolve_device(name: Optional[str]) -> str:
    """``--device``: checked, default CUDA when available."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a torch device; use cpu, cuda or cuda:N.") from None
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu.")
    return name


def torch_dtype(name, device: str):
    """``--dtype`` (a name, ``"auto"``/``None``: float16 on CUDA, float32 elsewhere, or a torch dtype)."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    name = "auto" if name is None else name
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}.")
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def check_backend(backend: str) -> None:
    """Raises ``ValueError`` for an unknown backend and :class:`BackendUnavailableError` when the
    JAX adapter cannot sample here."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}.")
    if backend == "jax":
        try:
            from timi_jax import TIMIPipelineJAX  # noqa: F401
        except ImportError as e:
            raise BackendUnavailableError(f"--backend jax: the JAX adapter cannot sample here ({e}); "
                                          "use --backend torch.") from None


def check_mc_algo(mc_algo: Optional[str]) -> None:
    """``--mc-algo``: one of :data:`MC_ALGOS`; ``dmc`` needs the ``diso`` package (CUDA)."""
    if mc_algo is None:
        return
    if mc_algo not in MC_ALGOS:
        raise ValueError(f"--mc-algo {mc_algo!r}: choose one of {', '.join(MC_ALGOS)}.")
    if mc_algo == "dmc":
        import importlib.util

        if importlib.util.find_spec("diso") is None:
            raise BackendUnavailableError("--mc-algo dmc: hy3dgen's differentiable marching cubes needs the diso "
                                          "package (CUDA); install it or use --mc-algo mc.")


def turbo_vae_path(model: str) -> Path:
    """The turbo ShapeVAE folder FlashVDM decoding uses for ``model`` (hy3dgen's ``enable_flashvdm``
    mapping, :data:`TURBO_VAES`): beside a model folder (``<family>/hunyuan3d-vae-v2-0-turbo``, or
    ``-mini-turbo`` for a mini DiT, as the model repositories lay them out), else under
    ``$HY3DGEN_MODELS/<id>/<subfolder>``. Raises :class:`ModelNotFoundError` naming where it looked."""
    p = Path(str(model)).expanduser()
    folder = p.parent if p.is_file() else p
    family = folder.parent.name if folder.is_dir() else str(model).split("/")[-1]
    mini = "mini" in folder.name or family.endswith("mini")
    subfolder = "hunyuan3d-vae-v2-mini-turbo" if mini else "hunyuan3d-vae-v2-0-turbo"
    candidates = []
    if folder.is_dir():
        candidates.append(folder.parent / subfolder)
    mid, sub = TURBO_VAES.get(family, (None, None))
    if mid is not None:
        candidates.append(Path(_models_root()).expanduser() / mid / sub)
    for c in candidates:
        if (c / "config.yaml").is_file() and (c / "model.fp16.safetensors").is_file():
            return c
    looked = ", ".join(str(c) for c in candidates) or "nowhere (not a model folder or a known id)"
    raise ModelNotFoundError(f"--flashvdm needs the turbo VAE ({subfolder}: config.yaml + model.fp16.safetensors); "
                             f"looked in {looked}. Put it beside the model folder, or drop --flashvdm.")


def enable_flashvdm(pipe, model: str, mc_algo: Optional[str] = None) -> None:
    """hy3dgen's ``enable_flashvdm`` on a loaded pipeline, for any model folder: the turbo VAE
    (:func:`turbo_vae_path`, loaded by hy3dgen's ``ShapeVAE.from_single_file``) replaces the VAE
    and decodes with ``FlashVDMVolumeDecoding`` (adaptive KV selection, ``topk_mode='mean'``) and
    ``mc_algo`` (default ``mc``), as hy3dgen's defaults. Only the decoding changes: the DiT, its
    latents and TIMI's guidance are untouched."""
    from hy3dgen.shapegen.models.autoencoders import ShapeVAE

    folder = turbo_vae_path(model)
    base = pipe.base
    base.vae = ShapeVAE.from_single_file(str(folder / "model.fp16.safetensors"), str(folder / "config.yaml"),
                                         device=base.device, dtype=base.dtype, use_safetensors=True)
    base.vae.enable_flashvdm_decoder(enabled=True, adaptive_kv_selection=True, topk_mode="mean", mc_algo=mc_algo or "mc")


def load_pipeline(model: Optional[str] = None, *, backend: str = "torch", device: Optional[str] = None,
                  dtype=None, config: TIMIConfig = TIMIConfig(), attention: str = "fused", flashvdm: bool = False,
                  mc_algo: Optional[str] = None, decoding: Optional[str] = DECODING, threads: Optional[int] = None):
    """A pipeline for ``model`` (default: the shipped one; see :func:`resolve_model`).

    ``backend="torch"``: ``timi_torch.TIMIPipeline`` (``attention`` its ISG path);
    ``backend="jax"``: ``timi_jax.TIMIPipelineJAX`` around the same hy3dgen pipeline, its DiT in
    the torch model's dtype. ``device``: default CUDA when available; ``dtype``: a name of
    :data:`DTYPES` or a torch dtype (default ``"auto"``: float16 on CUDA, float32 on CPU).
    ``config``: the calls' default ``TIMIConfig``. Both return a ``timi_core.TIMIPipelineOutput``.
    Any variant of the Hunyuan3D-2 family loads (its ``config.yaml`` names the DiT, scheduler,
    conditioner and image processor), and a Hunyuan3D 2.1 folder, on both backends. ``flashvdm``: decode with the turbo VAE and FlashVDM
    (:func:`enable_flashvdm`); ``mc_algo``: hy3dgen's surface extractor (:data:`MC_ALGOS`);
    ``decoding``: ``"coarse-to-fine"`` (the default, ``timi_core.defaults.DECODING``:
    :class:`timi_torch.decoding.CoarseToFineVolumeDecoder`, the same mesh as dense in a fraction of
    the time: docs/benchmarks.md) or ``"dense"``; ``None`` keeps hy3dgen's own (dense), as a plain
    hy3dgen pipeline decodes. Ignored with ``flashvdm``. ``threads``: the torch threads the torch
    pipeline's calls run on (default: ``TIMIPipeline.from_pretrained``'s, as ``timi generate --threads``).
    """
    import timi_torch

    check_backend(backend)
    check_mc_algo(mc_algo)
    if decoding not in (None,) + DECODINGS:
        raise ValueError(f"decoding={decoding!r}: use one of {', '.join(DECODINGS)}.")
    if backend == "jax" and config.smoothing != "tokens":
        raise BackendUnavailableError(f"TIMIConfig.smoothing={config.smoothing!r} (Eq.5 over token positions) runs "
                                      "on the torch backend only; use --backend torch.")
    path = resolve_model(model)
    if is_trellis(path):
        return _load_trellis(path, backend, device, config, attention)
    if flashvdm:
        turbo_vae_path(path)              # before the weights load
    device = resolve_device(device)
    pipe = timi_torch.TIMIPipeline.from_pretrained(path, config, device=device, dtype=torch_dtype(dtype, device),
                                                   attention=attention, decoding=decoding, num_threads=threads)
    if flashvdm:
        enable_flashvdm(pipe, path, mc_algo)
    elif mc_algo is not None:
        pipe.base.set_surface_extractor(mc_algo)
    pipe.token_positions = token_positions(path)
    if backend == "torch":
        return pipe
    import jax.numpy as jnp
    import torch
    from timi_jax import TIMIPipelineJAX

    jdtype = {torch.float32: jnp.float32, torch.float16: jnp.float16, torch.bfloat16: jnp.bfloat16}[pipe.dtype]
    return TIMIPipelineJAX(pipe.base, config, dtype=jdtype)


def _load_trellis(path: str, backend: str, device: Optional[str], config: TIMIConfig, attention: str):
    """A TRELLIS folder's :class:`timi_torch.trellis.pipeline.TrellisPipeline` (float32; Eq.5 on its grid)."""
    from timi_torch.trellis.pipeline import TrellisPipeline

    if config.smoothing != "tokens":
        raise BackendUnavailableError(f"TIMIConfig.smoothing={config.smoothing!r} is for token latents; a TRELLIS "
                                      "grid latent smooths over its own D, H, W axes (use the default).")
    pipe = TrellisPipeline.from_pretrained(path, config, device=resolve_device(device), attention=attention)
    if backend == "torch":
        return pipe
    try:
        from timi_jax.trellis import TrellisPipelineJAX
    except ImportError:
        raise BackendUnavailableError("--backend jax does not run TRELLIS folders yet; use --backend torch.") from None
    return TrellisPipelineJAX(pipe)


def token_positions(model: str | Path | None):
    """The reader of the latent tokens' positions for ``model`` (``TIMIPipeline.token_positions``,
    needed by ``TIMIConfig.smoothing="positions"``): the testbed's position channels when its
    ``config.yaml`` says the latents carry them, else None (hy3dgen's latents carry no positions)."""
    from timi.testbed.model import token_position_reader

    path = model_config_path(model)
    return None if path is None else token_position_reader(read_model_config(path))


def is_multiview(model: str | Path | None) -> bool:
    """Whether ``model``'s ``config.yaml`` names hy3dgen's multi-view image processor (Hunyuan3D-2mv)."""
    path = model_config_path(model)
    return bool(path is not None and geometry_from_config(read_model_config(path)).get("multiview"))


def pipeline_depth(pipe) -> int:
    """The most layers a loaded pipeline's DiT can guide: its double-stream blocks (Hunyuan3D 2.0
    family) or its cross-attention blocks (2.1)."""
    from timi_torch.guidance import guidable_layers

    return guidable_layers(pipe.base.model)

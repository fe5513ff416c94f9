"""hy3dgen checkpoints -> timi_jax parameters: every source format, the config, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy
from flax import nnx  # noqa: E402

import timi_jax  # noqa: E402
from timi_jax import params as P  # noqa: E402
from torch_helpers import fast_base, fast_dir, fast_root  # noqa: E402, F401  (fixtures)


def flat_params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
    fa, fb = flat_params(a), flat_params(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


@pytest.fixture(scope="module")
def reference(fast_base):
    return timi_jax.from_torch(fast_base.model)


def test_from_torch_copies_every_tensor_with_transposes(fast_base, reference):
    sd = fast_base.model.state_dict()
    flat = flat_params(reference)
    assert len(flat) == len(sd)  # one Flax parameter per torch tensor, none left over
    for key, value in sd.items():
        path, transpose = P.torch_key_to_flax_path(key)
        expected = value.numpy().T if transpose else value.numpy()
        np.testing.assert_array_equal(flat[path], expected, err_msg=key)
    assert P.torch_key_to_flax_path("double_blocks.1.txt_mlp.2.weight") == (
        ("double_blocks", 1, "txt_mlp", "fc2", "kernel"), True)
    assert P.torch_key_to_flax_path("final_layer.adaLN_modulation.1.bias") == (
        ("final_layer", "adaLN_modulation", "bias"), False)


def test_every_checkpoint_format_gives_the_same_model(fast_dir, fast_base, reference, tmp_path):
    from safetensors.torch import load_file

    # model directory: config.yaml + model.fp16.safetensors (hy3dgen's default variant)
    assert_same_params(timi_jax.from_checkpoint(str(fast_dir)), reference)
    # single safetensors file with model./vae./conditioner. groups, config from the yaml
    assert_same_params(timi_jax.from_checkpoint(str(fast_dir / "model.fp16.safetensors"),
                                                str(fast_dir / "config.yaml")), reference)
    # grouped torch.load checkpoint (.ckpt) and a flat 'model.'-prefixed dict, config inferred
    flat = load_file(str(fast_dir / "model.fp16.safetensors"))
    grouped = {"model": {k[6:]: v for k, v in flat.items() if k.startswith("model.")},
               "vae": {k[4:]: v for k, v in flat.items() if k.startswith("vae.")}}
    torch.save(grouped, tmp_path / "model.ckpt")
    assert_same_params(timi_jax.from_torch(str(tmp_path / "model.ckpt")), reference)
    assert_same_params(timi_jax.from_torch(flat), reference)
    # the network from hy3dgen's config, then the weights loaded into it (params.load_into); hy3dgen's
    # constructor argument ckpt_path is refused: the network (modeling) does not load (params)
    cfg = P.config_from_yaml(str(fast_dir / "config.yaml"))
    assert_same_params(P.load_into(timi_jax.Hunyuan3DDiT(**cfg), str(tmp_path / "model.ckpt")), reference)
    with pytest.raises(TypeError, match="load_into"):
        timi_jax.Hunyuan3DDiT(**cfg, ckpt_path=str(tmp_path / "model.ckpt"))
    # bf16 storage: the same values rounded to bf16
    bf16 = timi_jax.from_torch(fast_base.model, dtype=jnp.bfloat16)
    k = ("double_blocks", 0, "img_attn", "qkv", "kernel")
    assert flat_params(bf16)[k].dtype == jnp.bfloat16
    np.testing.assert_array_equal(flat_params(bf16)[k],
                                  flat_params(reference)[k].astype(jnp.bfloat16))


def test_config_from_yaml_module_and_shapes_agree(fast_dir, fast_base):
    cfg = P.config_from_yaml(str(fast_dir / "config.yaml"))
    inferred = P.infer_config(P.load_state_dict(fast_base.model))
    for key, value in inferred.items():
        assert cfg[key] == value, key
    assert P.scheduler_config_from_yaml(str(fast_dir / "config.yaml")) == {"num_train_timesteps": 1000}
    jm = timi_jax.from_torch(fast_base.model)
    for key in ("in_channels", "hidden_size", "num_heads", "depth", "depth_single_blocks"):
        assert getattr(jm, key) == cfg[key]


def test_errors_name_the_offending_key(fast_base, tmp_path):
    sd = dict(fast_base.model.state_dict())
    cfg = P.infer_config(P.load_state_dict(sd))
    with pytest.raises(ValueError, match=r"double_blocks\.0\.img_attn\.norm\.query_norm\.scale"):
        timi_jax.from_torch(sd, num_heads=cfg["num_heads"] * 2,
                            axes_dim=[cfg["hidden_size"] // (2 * cfg["num_heads"])])
    with pytest.raises(ValueError, match=r"'latent_in\.weight'.*transposed"):
        timi_jax.from_torch(sd, in_channels=cfg["in_channels"] + 1)
    with pytest.raises(KeyError, match=r"'vae\.decoder\.w'.*KEY_TABLE"):
        timi_jax.from_torch({**sd, "vae.decoder.w": torch.zeros(1)}, **cfg)
    with pytest.raises(KeyError, match=r"double_blocks\.1\..*constructor arguments"):
        timi_jax.from_torch(sd, depth=1)
    with pytest.raises(KeyError, match="lacks 1 parameter"):
        timi_jax.from_torch({k: v for k, v in sd.items() if k != "cond_in.bias"}, **cfg)
    with pytest.raises(FileNotFoundError):
        timi_jax.from_torch(str(tmp_path / "absent.safetensors"))
    with pytest.raises(ValueError, match="safetensors"):
        timi_jax.from_torch(str(tmp_path))

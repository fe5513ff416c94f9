"""write_tiny_model_dir writes hy3dgen's on-disk format, read by hy3dgen's own loaders."""

from __future__ import annotations

import safetensors.torch
import torch
import yaml

from timi_torch import write_tiny_model_dir


def test_tiny_model_dir_layout_and_hy3dgen_from_pretrained(tmp_path, monkeypatch):
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline

    d = write_tiny_model_dir(tmp_path / "acme" / "tiny" / "hunyuan3d-dit-v2-0", seed=5, depth=3,
                             depth_single_blocks=1, image_size=56)
    assert sorted(p.name for p in d.iterdir()) == ["config.yaml", "model.fp16.safetensors", "model.safetensors"]
    config = yaml.safe_load((d / "config.yaml").read_text())
    assert config["model"]["params"]["depth"] == 3 and config["model"]["params"]["depth_single_blocks"] == 1
    fp32 = safetensors.torch.load_file(str(d / "model.safetensors"))
    fp16 = safetensors.torch.load_file(str(d / "model.fp16.safetensors"))
    assert {k.split(".")[0] for k in fp32} == {"model", "vae", "conditioner"}
    assert fp32.keys() == fp16.keys()
    assert all(v.dtype == torch.float32 for v in fp32.values())
    assert all(v.dtype == torch.float16 for v in fp16.values())

    monkeypatch.setenv("HY3DGEN_MODELS", str(tmp_path))
    pipe = Hunyuan3DDiTFlowMatchingPipeline.from_pretrained("acme/tiny", device="cpu", dtype=torch.float32,
                                                            variant=None)
    assert len(pipe.model.double_blocks) == 3 and len(pipe.model.single_blocks) == 1
    for key, value in pipe.model.state_dict().items():
        assert torch.equal(value, fp32[f"model.{key}"]), key
    assert pipe.conditioner.main_image_encoder.num_patches == 1 + 4 * 4


def test_same_seed_same_weights(tmp_path):
    a = safetensors.torch.load_file(str(write_tiny_model_dir(tmp_path / "a", seed=1, image_size=28) / "model.safetensors"))
    b = safetensors.torch.load_file(str(write_tiny_model_dir(tmp_path / "b", seed=1, image_size=28) / "model.safetensors"))
    c = safetensors.torch.load_file(str(write_tiny_model_dir(tmp_path / "c", seed=2, image_size=28) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)

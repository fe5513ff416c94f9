"""``timi generate --model DIR`` and ``TIMIPipeline.from_pretrained`` on a tiny model folder of each
published variant (hy3dgen's config.yaml + safetensors), multi-view input, FlashVDM and --mc-algo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import hy3dgen.shapegen  # noqa: F401  (binds hy3dgen's log handler to the real stderr, not the runner's)
from typer.testing import CliRunner

from timi.cli import app
from timi_torch import TIMIConfig, TIMIPipeline
from timi_torch.testing import VARIANTS
from torch_helpers import family_id, scene, variant_base, variant_dir, variant_root, views_scene  # noqa: F401

FAST = ["--steps", "3", "--octree-resolution", "16", "--quiet", "--guided-layers", "2"]


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The single-view scene (picture + label map) and a two-view scene (pictures + label maps)."""
    d = tmp_path_factory.mktemp("variant_scene")
    img, masks = scene(alpha=True)
    Image.fromarray(img).save(d / "image.png")
    Image.fromarray((masks[0] * 1 + masks[1] * 2).astype(np.uint8)).save(d / "labels.png")
    images, view_masks = views_scene(("front", "left"))
    for v in images:
        Image.fromarray(images[v]).save(d / f"{v}.png")
        Image.fromarray((view_masks[v][0] * 1 + view_masks[v][1] * 2).astype(np.uint8)).save(d / f"{v}_labels.png")
    return d


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_folder_loads_through_from_pretrained(variant, variant_dir, variant_root, monkeypatch):
    """A folder, and hy3dgen's id + subfolder resolution under $HY3DGEN_MODELS, give the variant's DiT,
    scheduler and image processor as its config.yaml names them."""
    d = variant_dir(variant)
    options = VARIANTS[variant]
    monkeypatch.setenv("HY3DGEN_MODELS", str(variant_root))
    for pipe in (TIMIPipeline.from_pretrained(d, device="cpu"),
                 TIMIPipeline.from_pretrained(family_id(variant), device="cpu", subfolder=variant)):
        base = pipe.base
        assert base.model.guidance_embed is options.get("guidance_embed", False)
        assert len(base.model.double_blocks) == options.get("depth", 2)
        assert type(base.scheduler).__name__ == ("ConsistencyFlowMatchEulerDiscreteScheduler"
                                                 if options.get("scheduler") == "consistency"
                                                 else "FlowMatchEulerDiscreteScheduler")
        assert hasattr(base.image_processor, "view2idx") is options.get("multiview", False)


@pytest.mark.parametrize("variant, steps, guided", [("hunyuan3d-dit-v2-0-turbo", 5, 2),   # 0, .2 | .4, .6, .8
                                                    ("hunyuan3d-dit-v2-mini-fast", 3, 1)])  # 0 | .5, 1
def test_generate_with_a_variant_folder(variant, steps, guided, variant_dir, files, tmp_path):
    code, out = run("generate", files / "image.png", "--masks", files / "labels.png", "-o", tmp_path / "s.glb",
                    "--model", variant_dir(variant), *FAST, "--steps", steps)
    assert code == 0, out
    assert (tmp_path / "s.glb").stat().st_size > 0
    assert f"{guided} guided steps" in out           # the steps that start below sigma 0.3


def test_generate_multiview_cli_form(variant_dir, variant_base, files, tmp_path):
    from timi.generate import GenerateOptions, generate

    d = variant_dir("hunyuan3d-dit-v2-mv-turbo")
    args = ["--view", f"left={files / 'left.png'}", "--view", f"front={files / 'front.png'}",
            "--view-masks", f"front={files / 'front_labels.png'}", "--view-masks", f"left={files / 'left_labels.png'}"]
    code, out = run("generate", *args, "-o", tmp_path / "mv.glb", "--model", d, *FAST)
    assert code == 0, out
    assert "2 instance(s): label_1, label_2" in out and (tmp_path / "mv.glb").stat().st_size > 0
    # the Python API gives the latents of TIMIPipeline on the same dicts
    opts = GenerateOptions(image=None, masks=[], out=tmp_path / "mv2.glb", model=str(d), steps=3, guided_layers=2,
                           octree_resolution=16, progress=False,
                           views={"front": files / "front.png", "left": files / "left.png"},
                           view_masks={"front": files / "front_labels.png", "left": files / "left_labels.png"})
    result = generate(opts, log=lambda m: None)
    images = {v: str(files / f"{v}.png") for v in ("front", "left")}
    masks = {v: str(files / f"{v}_labels.png") for v in ("front", "left")}
    ref = TIMIPipeline(variant_base("hunyuan3d-dit-v2-mv-turbo"), TIMIConfig(guided_layers=2))(
        images, masks, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent",
        enable_pbar=False)
    assert torch.equal(result.latents, ref.latents)


def test_multiview_cli_errors_are_one_line(variant_dir, files, tmp_path):
    mv, single = variant_dir("hunyuan3d-dit-v2-mv"), variant_dir("hunyuan3d-dit-v2-0-fast")
    front = f"front={files / 'front.png'}"
    cases = [
        (["generate", files / "image.png", "--masks", files / "labels.png", "--model", mv], "is multi-view"),
        (["generate", "--view", front, "--view-masks", f"front={files / 'front_labels.png'}", "--model", single],
         "takes one picture"),
        (["generate", "--view", front, "--model", mv], "one mask source per view"),
        (["generate", "--view", "front", "--view-masks", "front=x", "--model", mv], "write it as VIEW=PATH"),
        (["generate", "--view", f"top={files / 'front.png'}", "--view-masks", f"top={files / 'front_labels.png'}",
          "--model", mv], "unknown view"),
        (["generate", "--model", mv], "give IMAGE --masks MASKS"),
        (["generate", "--view", front, "--view-masks", f"front={files / 'front_labels.png'}", "--model", mv,
          "--split-instances"], "--split-instances takes one picture"),
    ]
    for args, words in cases:
        code, out = run(*args, "-o", tmp_path / "x.glb", "--quiet")
        errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(errors) == 1 and words in errors[0], (args, out)
    assert not (tmp_path / "x.glb").exists()


def test_flashvdm_changes_the_decoding_only(variant_dir, files, tmp_path):
    from timi.generate import GenerateOptions, generate
    from timi_torch.testing import write_tiny_vae_dir

    d = variant_dir("hunyuan3d-dit-v2-0-turbo")
    common = dict(image=files / "image.png", masks=[files / "labels.png"], model=str(d), steps=3, guided_layers=2,
                  octree_resolution=64, progress=False)
    code, out = run("generate", files / "image.png", "--masks", files / "labels.png", "-o", tmp_path / "f.glb",
                    "--model", d, "--flashvdm", *FAST)
    assert code == 2 and "--flashvdm needs the turbo VAE (hunyuan3d-vae-v2-0-turbo" in out, out
    write_tiny_vae_dir(d.parent / "hunyuan3d-vae-v2-0-turbo", d)
    plain = generate(GenerateOptions(out=tmp_path / "plain.ply", **common), log=lambda m: None)
    flash = generate(GenerateOptions(out=tmp_path / "flash.ply", flashvdm=True, mc_algo="mc", **common), log=lambda m: None)
    assert torch.equal(plain.latents, flash.latents) and plain.diagnostics == flash.diagnostics
    assert len(flash.mesh.faces) > 0 and len(flash.mesh.faces) != len(plain.mesh.faces)   # another volume decoder
    for bad, words in (("nope", "--mc-algo 'nope': choose one of mc, dmc"), ("dmc", "--mc-algo dmc")):
        code, out = run("generate", files / "image.png", "--masks", files / "labels.png", "-o", tmp_path / "m.glb",
                        "--model", d, "--mc-algo", bad, *FAST)
        if bad == "dmc" and code == 0:      # diso installed (a CUDA machine)
            continue
        assert code == 2 and words in out, out

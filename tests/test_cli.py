"""``timi generate`` / ``timi inspect`` through the real entry point (typer's CliRunner on
``timi.cli.app``) on a tiny random-weight hy3dgen model written to disk and loaded by hy3dgen."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

import hy3dgen.shapegen  # noqa: F401  (binds hy3dgen's log handler to the real stderr, not the runner's)
from typer.testing import CliRunner

from timi.cli import app
from torch_helpers import tiny_model  # noqa: F401  (fixture)

EXAMPLE = Path(__file__).resolve().parents[1] / "timi" / "assets" / "example"
FAST = ["--steps", "2", "--guided-steps", "2", "--octree-resolution", "16", "--quiet"]

pytestmark = pytest.mark.skipif(not (EXAMPLE / "masks.png").exists(), reason="example scene not present")




@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict:
    """The example image and its masks in every supported format."""
    d = tmp_path_factory.mktemp("scene")
    shutil.copy(EXAMPLE / "image.png", d / "image.png")
    labels = np.asarray(Image.open(EXAMPLE / "masks.png"))
    K = int(labels.max())
    masks = np.stack([labels == k + 1 for k in range(K)])
    shutil.copy(EXAMPLE / "masks.png", d / "labels.png")
    (d / "folder").mkdir()
    for k in range(K):
        Image.fromarray(masks[k].astype(np.uint8) * 255).save(d / "folder" / f"obj_{k + 1}.png")
    np.save(d / "masks.npy", masks)
    (d / "sam.json").write_text(json.dumps([{"segmentation": _rle(m)} for m in masks]))
    rgb = d / "image_rgb.png"  # no alpha: the union of the masks is the foreground
    Image.open(d / "image.png").convert("RGB").save(rgb)
    return {"dir": d, "image": d / "image.png", "image_rgb": rgb, "masks": masks, "K": K}


def _rle(mask: np.ndarray) -> dict:
    flat = mask.T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], change])).tolist()}


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output  # stdout and stderr, interleaved (click >= 8.2)


def generate(model, image, masks, out, *extra):
    mask_args = [x for m in (masks if isinstance(masks, list) else [masks]) for x in ("--masks", m)]
    return run("generate", image, *mask_args, "--out", out, "--model", model, *FAST, *extra)


# ---------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["labels.png", "folder", "list", "masks.npy", "sam.json"])
def test_generate_accepts_each_mask_format(tiny_model, scene, tmp_path, fmt):
    d = scene["dir"]
    masks = sorted((d / "folder").glob("*.png")) if fmt == "list" else d / fmt
    if fmt == "list":  # `--masks a.png b.png c.png`, as people type it
        code, out = run("generate", scene["image"], "--masks", *masks, "--out", tmp_path / "scene.glb", "--model",
                        tiny_model, *FAST, "--steps", "1", "--guided-steps", "1")
    else:
        code, out = generate(tiny_model, scene["image"], masks, tmp_path / "scene.glb", "--steps", "1", "--guided-steps", "1")
    assert code == 0, out
    assert f"{scene['K']} instance(s)" in out
    mesh = trimesh.load(tmp_path / "scene.glb", force="mesh")
    assert len(mesh.faces) > 0
    assert "denoise" in out and "mesh" in out and "total" in out  # the end summary's stages


@pytest.mark.parametrize("ext", [".obj", ".ply"])
def test_generate_rgb_image_and_other_formats(tiny_model, scene, tmp_path, ext):
    code, out = generate(tiny_model, scene["image_rgb"], scene["dir"] / "labels.png", tmp_path / f"scene{ext}", "--no-timi")
    assert code == 0, out
    assert "TIMI guidance: off" in out
    assert len(trimesh.load(tmp_path / f"scene{ext}", force="mesh").faces) > 0


def test_model_by_hy3dgen_id_under_hy3dgen_models(tiny_model, scene, tmp_path, monkeypatch):
    root = tmp_path / "models"
    shutil.copytree(tiny_model, root / "acme" / "Tiny-3D" / "hunyuan3d-dit-v2-0")
    monkeypatch.setenv("HY3DGEN_MODELS", str(root))
    code, out = run("generate", scene["image"], "--masks", scene["dir"] / "labels.png", "--out", tmp_path / "s.glb",
                    "--model", "acme/Tiny-3D", *FAST, "--steps", "1", "--guided-steps", "1")
    assert code == 0, out
    assert "condition grid 8x8" in out  # the geometry came from the id's config.yaml, not the 37x37 default


def test_default_model_is_the_shipped_one(tiny_model, scene, tmp_path, monkeypatch):
    import timi.testbed

    monkeypatch.setattr(timi.testbed, "default_model_path", lambda: tiny_model)
    code, out = run("generate", scene["image"], "--masks", scene["dir"] / "labels.png", "--out", tmp_path / "s.glb",
                    *FAST, "--steps", "1", "--guided-steps", "1")
    assert code == 0, out
    assert "condition grid 8x8" in out

    def missing():
        raise FileNotFoundError("the shipped testbed model is missing at X")

    monkeypatch.setattr(timi.testbed, "default_model_path", missing)
    code, out = run("generate", scene["image"], "--masks", scene["dir"] / "labels.png", "--out", tmp_path / "t.glb")
    assert code == 2 and "pass --model" in out and "missing at X" in out


def test_same_seed_same_mesh_and_python_api(tiny_model, scene, tmp_path):
    from timi.generate import GenerateOptions, generate as generate_py

    code, out = generate(tiny_model, scene["image"], scene["dir"] / "masks.npy", tmp_path / "a.ply", "--seed", "3")
    assert code == 0, out
    opts = GenerateOptions(image=scene["image"], masks=[scene["dir"] / "masks.npy"], out=tmp_path / "b.ply",
                           model=str(tiny_model), steps=2, guided_steps=2, octree_resolution=16, seed=3, progress=False)
    result = generate_py(opts, log=lambda m: None)
    assert len(result.diagnostics) == 2 and result.masks.count == scene["K"]
    a, b = trimesh.load(tmp_path / "a.ply"), trimesh.load(tmp_path / "b.ply")
    np.testing.assert_array_equal(a.vertices, b.vertices)


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_jax_backend_matches_torch(tiny_model, scene, tmp_path):
    """--backend jax samples with timi_jax (same noise, condition and masks) and lands on the torch
    backend's latents and L_sep values."""
    timi_jax = pytest.importorskip("timi_jax")
    if not hasattr(timi_jax, "sample"):
        pytest.skip("timi_jax has no sampler")
    from timi.generate import GenerateOptions, generate as generate_py

    runs = {}
    for backend in ("torch", "jax"):
        opts = GenerateOptions(image=scene["image"], masks=[scene["dir"] / "labels.png"], out=tmp_path / f"{backend}.ply",
                               model=str(tiny_model), backend=backend, steps=3, guided_steps=2, octree_resolution=16,
                               progress=False)
        runs[backend] = generate_py(opts, log=lambda m: None)
    t, j = runs["torch"], runs["jax"]
    np.testing.assert_allclose(j.latents.numpy(), t.latents.numpy(), atol=2e-5)
    np.testing.assert_allclose([d.loss[0] for d in j.diagnostics], [d.loss[0] for d in t.diagnostics], rtol=1e-5)
    assert len(j.diagnostics) == 2


# ----------------------------------------------------------------------------------- errors


def _bad(tmp_path, name, array):
    p = tmp_path / name
    np.save(p, array)
    return p


def test_bad_inputs_give_one_line_and_exit_2(tiny_model, scene, tmp_path):
    m = scene["masks"]
    out = tmp_path / "scene.glb"
    cases = {
        "size": (_bad(tmp_path, "small.npy", m[:, :-3]), "differs from image"),
        "empty": (_bad(tmp_path, "empty.npy", np.concatenate([m, np.zeros_like(m[:1])])), "is empty"),
        "overlap": (_bad(tmp_path, "overlap.npy", np.concatenate([m, m[:1]])), "--overlap first|last"),
        "unreadable": (tmp_path / "broken.png", "cannot read it as an image"),
        "missing": (tmp_path / "nothere.png", "file not found"),
    }
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    for name, (masks, needle) in cases.items():
        code, text = generate(tiny_model, scene["image"], masks, out)
        assert code == 2, (name, text)
        err_lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
        assert len(err_lines) == 1 and needle in err_lines[0] and Path(masks).name in err_lines[0], (name, text)
    assert not out.exists()


def test_overlap_first_resolves(tiny_model, scene, tmp_path):
    m = scene["masks"]
    grown = m.copy()
    cols = np.nonzero(m[1])[1]
    half = m[1] & (np.arange(m.shape[2]) <= np.median(cols))[None, :]
    grown[0] = m[0] | half  # instance 0 spills over half of instance 1
    assert (grown.sum(0) > 1).any()
    p = _bad(tmp_path, "grown.npy", grown)
    code, _ = generate(tiny_model, scene["image"], p, tmp_path / "x.glb")
    assert code == 2
    code, text = generate(tiny_model, scene["image"], p, tmp_path / "x.glb", "--overlap", "first")
    assert code == 0, text


def test_too_many_instances_for_the_token_grid(tiny_model, scene, tmp_path):
    H, W = scene["masks"].shape[1:]
    many = np.zeros((65, H, W), bool)  # the tiny model's grid is 8 x 8 = 64 tokens
    for k in range(65):
        many[k, 10 + 2 * (k // 20), 10 + 2 * (k % 20)] = True
    code, text = generate(tiny_model, scene["image"], _bad(tmp_path, "many.npy", many), tmp_path / "x.glb")
    assert code == 2 and "65 instances" in text and "64 tokens" in text


def test_bad_options(tiny_model, scene, tmp_path):
    masks = scene["dir"] / "labels.png"
    code, text = generate(tiny_model, scene["image"], masks, tmp_path / "scene.fbx")
    assert code == 2 and "unknown mesh format '.fbx'" in text
    code, text = generate(tiny_model, scene["image"], masks, tmp_path / "s.glb", "--backend", "tf")
    assert code == 2 and "--backend 'tf'" in text
    code, text = generate(tiny_model, tmp_path / "nope.png", masks, tmp_path / "s.glb")
    assert code == 2 and "nope.png" in text
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    code, text = generate(tiny_model, tmp_path / "broken.jpg", masks, tmp_path / "s.glb")
    assert code == 2 and "broken.jpg: cannot read the image" in text
    code, text = generate(tmp_path / "no_model_here", scene["image"], masks, tmp_path / "s.glb")
    assert code == 2 and "no_model_here" in text
    assert list(tmp_path.glob("s.glb*")) == [] and list(tmp_path.glob(".s.glb*")) == []


def test_failed_write_leaves_previous_file(tiny_model, scene, tmp_path, monkeypatch):
    out = tmp_path / "scene.glb"
    out.write_bytes(b"previous")

    def broken_export(self, *a, **k):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(trimesh.Trimesh, "export", broken_export)
    code, text = generate(tiny_model, scene["image"], scene["dir"] / "labels.png", out)
    assert code == 1 and "exporter crashed" in text
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.glb"]


# -------------------------------------------------------------------- instances and reports


def test_split_instances_one_node_per_instance_on_a_known_scene(tiny_model, scene, tmp_path, monkeypatch):
    """The random tiny model's shape means nothing, so its mesher is replaced by the example's
    ground-truth instance meshes (rendered into the image with a known camera): the CLI must then
    give each ground-truth object to its own mask through the fitted front view."""
    from hy3dgen.shapegen.pipelines import Hunyuan3DDiTFlowMatchingPipeline

    gt = [trimesh.load(p) for p in sorted((EXAMPLE / "gt").glob("instance_*.ply"))]
    monkeypatch.setattr(Hunyuan3DDiTFlowMatchingPipeline, "_export",
                        lambda self, *a, **k: [trimesh.util.concatenate(gt)])
    out = tmp_path / "scene.glb"
    code, text = generate(tiny_model, scene["image"], scene["dir"] / "folder", out, "--split-instances")
    assert code == 0, text
    assert f"instances found: {scene['K']}/{scene['K']}" in text
    loaded = trimesh.load(out)
    assert sorted(loaded.graph.nodes_geometry) == [f"obj_{k + 1}" for k in range(scene["K"])]
    for k, g in enumerate(gt):
        node = loaded.geometry[f"obj_{k + 1}"]
        np.testing.assert_allclose(node.bounds, g.bounds, atol=1e-5)


def test_report_files(tiny_model, scene, tmp_path):
    rep = tmp_path / "report"
    code, text = generate(tiny_model, scene["image"], scene["dir"] / "labels.png", tmp_path / "s.glb", "--report", rep)
    assert code == 0, text
    names = sorted(p.name for p in rep.iterdir())
    assert names == ["guidance.png", "instance_maps_layer0.png", "instance_maps_layer1.png",
                     "masks_on_tokens.png", "summary.json", "views.png"]
    for p in rep.glob("*.png"):
        img = np.asarray(Image.open(p).convert("L"))
        assert img.std() > 5, p  # a picture, not a blank page
    summary = json.loads((rep / "summary.json").read_text())
    assert len(summary["diagnostics"]) == 2
    assert {(r["step"], r["layer"]) for r in summary["purity"]} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for r in summary["purity"]:
        assert len(r["purity"]) == scene["K"] and all(0 <= v <= 1 for v in r["purity"])


def test_report_without_timi_records_the_same_maps(tiny_model, scene, tmp_path):
    rep = tmp_path / "report"
    code, text = generate(tiny_model, scene["image"], scene["dir"] / "labels.png", tmp_path / "s.glb",
                          "--report", rep, "--no-timi")
    assert code == 0, text
    summary = json.loads((rep / "summary.json").read_text())
    assert summary["diagnostics"] == [] and len(summary["purity"]) == 4


# ------------------------------------------------------------------------------------ inspect


def test_inspect_overlay_and_small_instance_warning(tiny_model, scene, tmp_path):
    code, text = run("inspect", scene["image"], "--masks", scene["dir"] / "labels.png", "--out", tmp_path / "o.png",
                     "--model", tiny_model)
    assert code == 0, text
    assert "8x8 token grid" in text and "warning" not in text
    assert np.asarray(Image.open(tmp_path / "o.png")).std() > 5

    m = scene["masks"].copy()
    free = ~m.any(0)
    H, W = free.shape  # an 8 x 8 block of background near the image centre
    y, x = min(((y, x) for y in range(0, H - 8, 4) for x in range(0, W - 8, 4) if free[y:y + 8, x:x + 8].all()),
               key=lambda p: abs(p[0] - H // 2) + abs(p[1] - W // 2))
    small = np.zeros_like(m[0])
    small[y:y + 8, x:x + 8] = True
    assert not (small & ~free).any()
    p = _bad(tmp_path, "small.npy", np.concatenate([m, small[None]]))
    code, text = run("inspect", scene["image"], "--masks", p, "--out", tmp_path / "o2.png", "--model", tiny_model)
    assert code == 2 and "instance 3 (small_3) lies entirely outside the picture's foreground" in text, text
    # without alpha the masks' union is the foreground, so the block is an object: too small, a warning
    code, text = run("inspect", scene["image_rgb"], "--masks", p, "--out", tmp_path / "o2.png", "--model", tiny_model)
    assert code == 0, text
    assert "warning: instance 3" in text and "may not survive pooling" in text
    assert "has no alpha channel: the union of the masks is used as the foreground" in text

    speck = np.zeros_like(m[0])
    speck[y, x] = True  # one pixel: gone at the conditioner's resolution -> an error, not a warning
    p = _bad(tmp_path, "speck.npy", np.concatenate([m, speck[None]]))
    code, text = run("inspect", scene["image_rgb"], "--masks", p, "--out", tmp_path / "o3.png", "--model", tiny_model)
    assert code == 2 and "speck.npy" in text and "instance 3 (speck_3)" in text and "too small" in text, text
    assert not (tmp_path / "o3.png").exists()


def test_inspect_matches_the_loaded_pipeline(tiny_model, scene):
    """The weight-free geometry stand-in gives exactly the tokens of the real loaded pipeline."""
    import torch
    import timi_torch

    from timi.pipelines import geometry_pipeline

    pipe = timi_torch.TIMIPipeline.from_pretrained(str(tiny_model), device="cpu")
    real = timi_torch.condition_token_masks(str(scene["image"]), scene["masks"], pipe)
    light = timi_torch.condition_token_masks(str(scene["image"]), scene["masks"], geometry_pipeline(tiny_model))
    assert torch.equal(real.tokens, light.tokens) and light.grid == (8, 8)
    # every field, so that `timi generate` can use the checked masks for the loaded model as they are
    np.testing.assert_array_equal(real.frame_masks, light.frame_masks)
    np.testing.assert_array_equal(real.frame_image, light.frame_image)
    np.testing.assert_array_equal(np.asarray(real.image), np.asarray(light.image))
    assert (real.grid, real.prefix_tokens) == (light.grid, light.prefix_tokens)
    default = geometry_pipeline(None).geometry
    assert (default["image_size"], default["patch_size"]) == (518, 14)  # Hunyuan3D 2.0's 37 x 37 grid


# ------------------------------------------------------------------------ the latent-token route


def test_point_probabilities_equal_the_explicit_decoder_attention(tiny_model, scene):
    """Through the VAE decoder's processor hook, SDPA with the token map as values equals the
    explicit softmax attention of the decoder's own q/k (rebuilt from its layers) times the map."""
    import torch

    import timi_torch
    from timi.instances import point_instance_probabilities

    pipe = timi_torch.TIMIPipeline.from_pretrained(str(tiny_model), device="cpu")
    vae = pipe.base.vae
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((1, *vae.latent_shape), generator=g)
    L = latents.shape[1]
    tmap = torch.rand((L, 3), generator=g)
    tmap /= tmap.sum(-1, keepdim=True)
    points = np.random.default_rng(0).uniform(-1, 1, (50, 3))
    got = point_instance_probabilities(vae, latents, tmap, points)

    dec = vae.geo_decoder
    block, cross = dec.cross_attn_decoder, dec.cross_attn_decoder.attn
    with torch.no_grad():
        lat = vae(latents / vae.scale_factor)
        x = dec.query_proj(dec.fourier_embedder(torch.as_tensor(points, dtype=torch.float32)[None]))
        q = cross.c_q(block.ln_1(x))
        kv = cross.c_kv(block.ln_2(lat))
        H = cross.heads
        q = cross.attention.q_norm(q.view(1, len(points), H, -1))
        k = cross.attention.k_norm(kv.view(1, L, H, -1)[..., : kv.shape[-1] // H // 2])
        a = torch.einsum("bnhd,blhd->bhnl", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)   # (1, H, N, L)
        expected = (a.mean(1)[0] @ tmap).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    assert type(vae.geo_decoder.cross_attn_decoder.attn.attention.attn_processor).__name__ == "CrossAttentionProcessor"


def test_split_by_tokens_follows_the_token_map(tiny_model, scene):
    """With every latent token given to instance 1, every part goes to instance 1."""
    import torch

    import timi_torch
    from timi.instances import split_instances_by_tokens, token_instance_map

    pipe = timi_torch.TIMIPipeline.from_pretrained(str(tiny_model), device="cpu")
    cond = pipe.condition_masks(str(scene["image"]), scene["masks"])
    latents = pipe(str(scene["image"]), scene["masks"], num_inference_steps=1, generator=torch.manual_seed(0),
                   output_type="latent", enable_pbar=False).latents
    tmap = token_instance_map(pipe, latents, cond)
    assert tmap.shape == (latents.shape[1], scene["K"])
    np.testing.assert_allclose(tmap.sum(-1).numpy(), 1.0, atol=1e-5)
    mesh = trimesh.util.concatenate([trimesh.creation.box(extents=(0.3, 0.3, 0.3)),
                                     trimesh.creation.icosphere(radius=0.1).apply_translation((0.6, 0, 0))])
    one_hot = torch.zeros_like(tmap)
    one_hot[:, 1] = 1
    split = split_instances_by_tokens(mesh, pipe, latents, cond, token_map=one_hot, samples_per_part=200)
    assert [a.instance for a in split.assignments] == [1, 1]
    assert split.meshes[0] is None and split.meshes[2] is None and split.unclaimed == []


def test_generate_split_by_tokens(tiny_model, scene, tmp_path):
    out = tmp_path / "scene.glb"
    code, text = generate(tiny_model, scene["image"], scene["dir"] / "folder", out, "--split-instances", "--assign", "tokens")
    assert code == 0, text
    assert "instances found:" in text
    loaded = trimesh.load(out)
    nodes = set(loaded.graph.nodes_geometry)
    assert nodes and nodes <= {"obj_1", "obj_2", "obj_3", "unclaimed"}
    code, text = generate(tiny_model, scene["image"], scene["dir"] / "folder", out, "--assign", "nearest")
    assert code == 2 and "--assign 'nearest'" in text

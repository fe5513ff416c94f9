"""Grid testbed (issue 36): the fixed 8 x 16^3 occupancy encoding, TRELLIS's flow-matching pair, and
a tiny train-grid run that resumes and exports the TRELLIS layout."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from timi.testbed import grid


def test_encoding_is_invertible_and_groups_each_block():
    g = torch.Generator().manual_seed(0)
    occ = torch.rand(2, 32, 32, 32, generator=g) > 0.7
    z = grid.encode(occ)
    assert z.shape == (2, 8, 16, 16, 16)
    assert torch.equal(grid.decode(z), occ.float()[:, None] * 2 - 1)
    one = torch.zeros(1, 32, 32, 32, dtype=torch.bool)
    one[0, 5, 2, 7] = True  # block (2, 1, 3), offset (1, 0, 1) -> channel 1*4 + 0*2 + 1
    assert torch.nonzero(grid.encode(one) > 0).tolist() == [[0, 5, 2, 1, 3]]


def test_decode_of_encoded_ground_truth_gives_back_its_occupancy_and_mesh():
    from timi.metrics import score_scene
    from timi.testbed.scenes import generate_scene

    scene = generate_scene(0, "test", 1000, num_instances=1)
    occ = grid.occupancy_grid(scene.primitives)
    assert 0.01 < occ.mean() < 0.5
    z = grid.encode(occ[None])
    assert z.shape == (1, 8, 16, 16, 16) and set(z.unique().tolist()) == {-1.0, 1.0}
    logits = grid.decode(z)
    assert logits.shape == (1, 1, 32, 32, 32)
    assert np.array_equal(logits[0, 0].numpy() > 0, occ)
    mesh = grid.logits_to_mesh(logits[0, 0])
    assert mesh.is_watertight and np.all(np.abs(mesh.bounds) <= grid.BOX)
    # placed in the world frame: the centre cells the ground truth occupies are inside the mesh
    centres = grid.cell_centres()[occ][::50]
    assert mesh.contains(centres).mean() > 0.95
    assert score_scene(mesh, scene.instance_meshes()).fs_s > 0.95
    assert grid.logits_to_mesh(-torch.ones(32, 32, 32)) is None


def test_flow_pair_is_trellis_convention():
    from timi.testbed.grid_train import flow_pair

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 8, 4, 4, 4, generator=g), torch.randn(3, 8, 4, 4, 4, generator=g)
    sigma = 1e-5
    xt, _ = flow_pair(x0, eps, torch.ones(3), sigma)
    torch.testing.assert_close(xt, eps)  # t = 1: noise
    xt, _ = flow_pair(x0, eps, torch.zeros(3), sigma)
    torch.testing.assert_close(xt, x0 + sigma * eps)  # t = 0: data
    t = torch.tensor([0.2, 0.5, 0.9])
    xt, v = flow_pair(x0, eps, t, sigma)
    torch.testing.assert_close(xt - t[:, None, None, None, None] * v, x0 + sigma * eps)  # straight path to the data


@pytest.fixture(scope="module")
def grid_cache(tmp_path_factory):
    from timi.testbed.grid_train import build_grid_cache

    return build_grid_cache(tmp_path_factory.mktemp("grid") / "c.npz", 2, seed=1, progress=False)


TINY = dict(n_train=2, batch=2, steps=3, model_channels=32, num_blocks=1, num_heads=2, num_head_channels=16,
            save_every=2, warmup=1)


def test_train_grid_runs_resumes_and_exports_trellis_layout(grid_cache, tmp_path):
    import safetensors.torch

    from timi_torch.trellis.pipeline import TrellisPipeline

    from timi.testbed.grid_train import GridConfig, GridTrainer, export_grid_model

    cfg = GridConfig(seed=3, **TINY)
    a = GridTrainer(tmp_path / "a", grid_cache, cfg, progress=False)
    assert a.tokens.shape == (2, 257, 64)  # class token, then 16 x 16 patches
    summary = a.run()
    assert summary["steps"] == 3 and np.isfinite(summary["final_mse"])
    b = GridTrainer(tmp_path / "b", grid_cache, replace(cfg, steps=2), progress=False)
    b.run()
    b = GridTrainer(tmp_path / "b", grid_cache, cfg, progress=False)  # resumes from its step-2 checkpoint
    assert b.state["step"] == 2
    b.run()
    assert b.state["loss"] == a.state["loss"]
    out = export_grid_model(a, tmp_path / "model")
    spec = json.loads((out / "ckpts" / "ss_flow.json").read_text())
    assert spec["name"] == "SparseStructureFlowModel" and spec["args"]["resolution"] == 16
    keys = set(safetensors.torch.load_file(str(out / "ckpts" / "ss_flow.safetensors")))
    assert keys == set(a.flow_ema.state_dict())
    meta = json.loads((out / "testbed.json").read_text())
    assert meta["encoding"] == "space_to_depth_32" and meta["box"] == grid.BOX
    pipe = TrellisPipeline.from_pretrained(out)  # the project's loader of TRELLIS folders
    assert pipe.box == grid.BOX
    x, t = torch.randn(1, 8, 16, 16, 16), torch.tensor([500.0])
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(x, t, a.tokens[:1]), a.flow_ema(x, t, a.tokens[:1]))
        torch.testing.assert_close(pipe.decoder(x), grid.decode(x))
        images = torch.from_numpy(np.load(grid_cache)["image"][:1]).float()
        torch.testing.assert_close(pipe.conditioner(image=images)["main"], a.tokens[:1])
    with pytest.raises(ValueError, match="another seed"):
        GridTrainer(tmp_path / "a", grid_cache, replace(cfg, seed=4), progress=False)

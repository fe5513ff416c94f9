"""``timi testbed ...``: write procedural scenes, train the testbed model, export it for hy3dgen."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Procedural scenes with exact ground truth and the small shipped Hunyuan3D-architecture model.",
                  no_args_is_help=True)


@app.command()
def scenes(
    out: Path = typer.Option(..., "--out", help="Folder that receives one sub-folder per scene."),
    n: int = typer.Option(16, "--n", min=1, help="Number of scenes."),
    seed: int = typer.Option(0, "--seed", help="Base seed (scene i of a split is reproducible on its own)."),
    split: str = typer.Option("test", "--split", help="train | val | test (disjoint seed streams)."),
    start: int = typer.Option(0, "--start", min=0, help="Index of the first scene."),
    num_instances: int = typer.Option(0, "--num-instances", min=0, max=4,
                                      help="Force K instances per scene (0 = random 1..4)."),
) -> None:
    """Write N scenes: image.png, masks.png, gt/instance_XX.ply, scene.glb, layout.json."""
    from .scenes import SPLITS, make_dataset

    if split not in SPLITS:
        raise typer.BadParameter(f"unknown split {split!r}; use one of {list(SPLITS)}", param_hint="--split")
    folders = make_dataset(out, n, seed=seed, split=split, start=start, num_instances=num_instances or None)
    typer.echo(f"wrote {len(folders)} scenes to {out}")

"""``timi app``: start the page on this machine (Gradio).

Safe by default: it listens on 127.0.0.1 unless ``--host`` says otherwise (and warns when that is
not a loopback address), makes no public share link unless ``--share``, limits uploads
(``--max-upload-mb``), takes the model and the SAM checkpoint only from the command line, runs one
TIMI job at a time (Gradio's queue) each in a folder of its own, and sends nothing outside the
machine (Gradio's analytics off, system fonts).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import typer

__all__ = ["app_command", "is_loopback", "check_app_options", "launch_options"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (127.0.0.0/8, ::1, ``localhost``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_app_options(model, host: str, port: Optional[int], device, sam_checkpoint, sam_model: str,
                      max_upload_mb: float, threads: Optional[int]):
    """The command line's checks before anything starts -> (AppConfig, warnings). One-line errors."""
    from ..pipelines import resolve_device, resolve_model
    from .run import AppConfig

    if port is not None and not 0 < port < 65536:
        raise ValueError(f"--port {port}: must be from 1 to 65535.")
    if not max_upload_mb > 0:
        raise ValueError(f"--max-upload-mb {max_upload_mb}: must be above 0.")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads {threads}: must be at least 1.")
    cfg = AppConfig(model=resolve_model(model), workdir=Path(tempfile.mkdtemp(prefix="timi-app-")),
                    device=resolve_device(device), threads=threads)
    if sam_checkpoint is not None:
        from .sam import SamClicker, load_sam

        cfg.sam = SamClicker(load_sam(sam_checkpoint, sam_model, cfg.device))
    notes = []
    if not is_loopback(host):
        notes.append(f"--host {host} is not a loopback address: anyone who can reach this machine can use the page "
                     "(and its compute); use --host 127.0.0.1 unless you mean it.")
    return cfg, notes


def launch_options(host: str, port: Optional[int], share: bool, max_upload_mb: float) -> dict:
    """Keyword arguments of ``Blocks.launch`` for the safe defaults (module docstring)."""
    from .ui import theme

    return dict(server_name=host, server_port=port, share=bool(share), max_file_size=int(max_upload_mb * 2**20),
                show_error=False, enable_monitoring=False, mcp_server=False, pwa=False, ssr_mode=False,
                run_history=False, footer_links=["settings"], theme=theme(), inbrowser=False, quiet=False)


def app_command(
    model: Optional[str] = typer.Option(None, help="hy3dgen model directory or id, as for `timi generate` (default: the shipped model)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (default: this machine only)."),
    port: Optional[int] = typer.Option(None, help="Port (default: the first free one from 7860)."),
    share: bool = typer.Option(False, "--share", help="Also make a public Gradio share link (off by default)."),
    sam_checkpoint: Optional[Path] = typer.Option(None, help="A local Segment-Anything checkpoint (.pth): click points or boxes per instance."),
    sam_model: str = typer.Option("auto", help="SAM's size: auto (from the checkpoint's name), vit_b, vit_l or vit_h."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch per run (default as `timi generate`)."),
    max_upload_mb: float = typer.Option(20.0, help="Largest upload, in MiB."),
) -> None:
    """Start TIMI's page in the browser: picture in, instance masks made or painted, TIMI with
    progress, the 3D scene per instance out."""
    from rich.console import Console

    from ..cli_common import run_cli

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    err = Console(stderr=True, soft_wrap=True)
    cfg, notes = run_cli(lambda: check_app_options(model, host, port, device, sam_checkpoint, sam_model,
                                                   max_upload_mb, threads), err)
    for n in notes:
        err.print(f"warning: {n}", markup=False, highlight=False)
    if share:
        err.print("warning: --share makes a public link through Gradio's servers: anyone with it can use the page.",
                  markup=False, highlight=False)
    from .ui import build_app

    demo = build_app(cfg)
    demo.queue(default_concurrency_limit=4, max_size=32)
    err.print(f"model: {cfg.model}; work folder: {cfg.workdir} (removed on exit)", markup=False, highlight=False)
    try:
        run_cli(lambda: demo.launch(**launch_options(host, port, share, max_upload_mb)), err)
    finally:
        shutil.rmtree(cfg.workdir, ignore_errors=True)

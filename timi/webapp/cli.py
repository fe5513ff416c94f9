"""``timi app``: start the page on this machine (Gradio).

Safe by default: it listens on 127.0.0.1 unless ``--host`` says otherwise, and refuses to listen
beyond this machine or make a public ``--share`` link without a login (``--auth USER:PASS``,
``--auth-file``; ``--insecure-no-auth`` to do it anyway, with a warning); it limits uploads
(``--max-upload-mb``), the expensive settings (``--max-steps``, ``--max-octree``), a run's time
(``--max-run-seconds``) and the runs that may wait (``--runs-per-client``, ``--max-queued-runs``);
it takes the model and the SAM checkpoint only from the command line, runs one TIMI job at a time
(Gradio's queue) each in a folder of its own, keeps the last ``--keep-runs`` runs, removes its work
folder on exit (Ctrl-C or SIGTERM), and sends nothing outside the machine (Gradio's analytics off,
system fonts).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import typer

__all__ = ["app_command", "is_loopback", "check_app_options", "read_auth", "launch_options", "serve",
           "use_private_gradio_cache", "MAX_STEPS_CEILING"]

#: The most ``--max-steps`` may allow (the paper uses 50).
MAX_STEPS_CEILING = 1000


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (127.0.0.0/8, ::1, ``localhost``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_auth(auth: Optional[str], auth_file: Optional[Path]) -> list[tuple[str, str]]:
    """Logins from ``--auth USER:PASS`` and ``--auth-file`` (one ``USER:PASS`` a line; blank lines and
    ``#`` comments skipped) as Gradio's ``auth`` list. One-line errors that never echo a password."""
    pairs = []
    items = [("--auth", auth)] if auth is not None else []
    if auth_file is not None:
        try:
            text = Path(auth_file).read_text()
        except OSError as e:
            raise ValueError(f"--auth-file {auth_file}: cannot read it ({e.strerror or e}); pass a readable file.") from None
        items += [(f"--auth-file {auth_file} line {n}", line.strip()) for n, line in enumerate(text.splitlines(), 1)
                  if line.strip() and not line.strip().startswith("#")]
        if not any(where.startswith("--auth-file") for where, _ in items):
            raise ValueError(f"--auth-file {auth_file}: no USER:PASS line in it; write one login a line.")
    for where, item in items:
        user, sep, password = item.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"{where}: write the login as USER:PASS (a user name, a colon, a password).")
        pairs.append((user.strip(), password))
    return pairs


def check_app_options(model, host: str, port: Optional[int], device, sam_checkpoint, sam_model: str,
                      max_upload_mb: float, threads: Optional[int], *, share: bool = False,
                      auth: Optional[str] = None, auth_file: Optional[Path] = None, insecure_no_auth: bool = False,
                      max_steps: int = 50, max_octree: int = 384, max_run_seconds: float = 900.0,
                      runs_per_client: int = 2, max_queued_runs: int = 4, keep_runs: int = 20):
    """The command line's checks before anything starts -> (AppConfig, logins, warnings). One-line errors."""
    from ..pipelines import resolve_device, resolve_model
    from .run import MAX_OCTREE, AppConfig

    if port is not None and not 0 < port < 65536:
        raise ValueError(f"--port {port}: must be from 1 to 65535.")
    if not max_upload_mb > 0:
        raise ValueError(f"--max-upload-mb {max_upload_mb}: must be above 0.")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads {threads}: must be at least 1.")
    for flag, value, lo, hi in (("--max-steps", max_steps, 1, MAX_STEPS_CEILING), ("--max-octree", max_octree, 8, MAX_OCTREE),
                                ("--runs-per-client", runs_per_client, 1, 100), ("--max-queued-runs", max_queued_runs, 0, 1000),
                                ("--keep-runs", keep_runs, 1, 100000)):
        if not lo <= value <= hi:
            raise ValueError(f"{flag} {value}: must be from {lo} to {hi}.")
    if not max_run_seconds >= 0:
        raise ValueError(f"--max-run-seconds {max_run_seconds}: must be 0 (no limit) or more.")
    logins = read_auth(auth, auth_file)
    exposed = [f"--host {host}"] * (not is_loopback(host)) + ["--share"] * bool(share)
    if exposed and not logins and not insecure_no_auth:
        raise ValueError(f"{' and '.join(exposed)} would let anyone who reaches the page use it and its compute; "
                         "add --auth USER:PASS (or --auth-file FILE), or --insecure-no-auth if you mean it.")
    cfg = AppConfig(model=resolve_model(model), workdir=Path(tempfile.mkdtemp(prefix="timi-app-")),
                    device=resolve_device(device), threads=threads, max_steps=max_steps, max_octree=max_octree,
                    max_run_seconds=max_run_seconds or None, keep_runs=keep_runs, runs_per_client=runs_per_client,
                    max_queued_runs=max_queued_runs)
    notes = []
    try:
        if sam_checkpoint is not None:
            from .sam import SamClicker, load_sam

            cfg.sam = SamClicker(load_sam(sam_checkpoint, sam_model, cfg.device))
    except BaseException:
        shutil.rmtree(cfg.workdir, ignore_errors=True)
        raise
    if exposed and not logins:
        notes.append(f"{' and '.join(exposed)} without a login (--insecure-no-auth): anyone who can reach the page "
                     "can use it and its compute.")
    elif not is_loopback(host):
        notes.append(f"--host {host} is not a loopback address: whoever has a login and reaches this machine can use "
                     "the page; use --host 127.0.0.1 unless you mean it.")
    return cfg, logins, notes


def serve(demo, cfg) -> dict:
    """Gradio's queue for ``demo`` sized from ``cfg`` (the waiting runs plus room for the cheap
    events) -> the ``app_kwargs`` of ``Blocks.launch`` with the run limits' middleware
    (:class:`timi.webapp.limits.RunQueueLimit`)."""
    from starlette.middleware import Middleware

    from .limits import RUN_ID, RunLimits, RunQueueLimit, queue_size

    demo.queue(default_concurrency_limit=4, max_size=queue_size(cfg.max_queued_runs))
    run_fn = next(f._id for f in demo.fns.values() if getattr(f, "concurrency_id", None) == RUN_ID)
    limits = RunLimits(demo, run_fn, cfg.runs_per_client, cfg.max_queued_runs)
    return {"middleware": [Middleware(RunQueueLimit, limits=limits)]}


def use_private_gradio_cache(workdir: Path) -> Path:
    """Point Gradio's file copies (``GRADIO_TEMP_DIR``) at ``workdir/gradio`` unless the user chose a
    folder; call it before the page is built. Gradio names its copies by content under one shared
    ``/tmp/gradio``, and a server that exits deletes every copy it made, so another page on this
    machine serving the same picture lost its copy mid-request (403); in the work folder the copies
    are this page's alone and go with the folder on exit. Returns the folder in use."""
    chosen = os.environ.get("GRADIO_TEMP_DIR")
    if not chosen:
        chosen = os.environ["GRADIO_TEMP_DIR"] = str(Path(workdir) / "gradio")
    return Path(chosen)


def launch_options(host: str, port: Optional[int], share: bool, max_upload_mb: float, auth=None,
                   app_kwargs: Optional[dict] = None) -> dict:
    """Keyword arguments of ``Blocks.launch`` for the safe defaults (module docstring)."""
    from .ui import theme

    return dict(server_name=host, server_port=port, share=bool(share), max_file_size=int(max_upload_mb * 2**20),
                show_error=False, enable_monitoring=False, mcp_server=False, pwa=False, ssr_mode=False,
                run_history=False, footer_links=["settings"], theme=theme(), inbrowser=False, quiet=True,
                auth=auth or None, auth_message="TIMI: log in with the user name and password you were given.",
                app_kwargs=app_kwargs or {})


def import_native_libraries() -> None:
    """Import hy3dgen, and with it pymeshlab, in the main thread, before the page serves.

    Otherwise the first page action imports them in one of Gradio's worker threads: pymeshlab's
    static objects (its plugins, loaded with it) are then allocated in that thread's malloc arena,
    and their destructors, run by ``exit()`` after the worker threads have ended, free into an arena
    glibc has since handed on, and the process aborts (``malloc_consolidate(): unaligned fastbin
    chunk detected``, exit 134: the crash in pymeshlab's exit handler behind issue 38's report; a
    server that only served log-ins never imported it and exited 0)."""
    import hy3dgen.shapegen  # noqa: F401


def startup_lines(local_url: str, share: bool) -> list[str]:
    """What ``timi app`` prints once the page listens (Gradio's own lines are off, ``quiet``: they
    tell a Python caller to set ``share=True`` in ``launch()``)."""
    lines = [f"* Running on local URL:  {local_url}"]
    if not share:
        lines.append("* A public link: timi app --share --auth USER:PASS (see timi app --help).")
    return lines


#: How long the exit waits for the server's thread to end once the page is closed (seconds).
SERVER_STOP_SECONDS = 30.0


def _launch(demo, options: dict, before_close: Callable[[], object] = lambda: None) -> None:
    """Start the page, print :func:`startup_lines`, serve until Ctrl-C or SIGTERM, then :func:`close`."""
    demo.launch(**options, prevent_thread_lock=True)
    try:
        for line in startup_lines(demo.local_url, options["share"]):
            print(line, flush=True)
        while demo.is_running:
            time.sleep(0.1)
    except KeyboardInterrupt:   # Ctrl-C, or SIGTERM (_terminate): a requested stop, exit 0
        print("stopping (Ctrl-C or SIGTERM): closing the page.", flush=True)
    finally:
        close(demo, before_close)


def close(demo, before_close: Callable[[], object] = lambda: None) -> bool:
    """Close the page so that no server thread outlives the interpreter; whether it ended in time.

    Gradio's own Ctrl-C path (``Blocks.block_thread``) only closes the uvicorn server, waiting 5 s
    for its thread; the heartbeat stream of every open page (a browser keeps one while it shows the
    page) ends only when ``Blocks.close`` sets the app's stop event, so with a page open the server
    thread was still serving when Python finalized, and the process aborted in native code
    (``malloc_consolidate(): unaligned fastbin chunk detected``, exit 134; issue 38). Here: the
    runs under way are stopped first (``before_close``: their event streams end), then
    ``Blocks.close`` (queue, heartbeats, server), then the server's thread is waited for."""
    before_close()
    demo.close(verbose=False)
    thread = getattr(getattr(demo, "server", None), "thread", None)
    if thread is not None:
        thread.join(SERVER_STOP_SECONDS)
        return not thread.is_alive()
    return True


def _terminate(signum, frame):
    """SIGTERM as Ctrl-C: the page is closed (:func:`close`), the work folder removed, exit 0."""
    raise KeyboardInterrupt


def app_command(
    model: Optional[str] = typer.Option(None, help="hy3dgen model directory or id, as for `timi generate` (default: the shipped model)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (default: this machine only; others need --auth)."),
    port: Optional[int] = typer.Option(None, help="Port (default: the first free one from 7860)."),
    share: bool = typer.Option(False, "--share", help="Also make a public Gradio share link (off by default; needs --auth)."),
    auth: Optional[str] = typer.Option(None, help="A login USER:PASS the page asks for (visible to `ps`: prefer --auth-file)."),
    auth_file: Optional[Path] = typer.Option(None, help="A file of logins, one USER:PASS a line."),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help="Allow --host beyond this machine or --share without a login."),
    sam_checkpoint: Optional[Path] = typer.Option(None, help="A local Segment-Anything checkpoint (.pth): click points or boxes per instance."),
    sam_model: str = typer.Option("auto", help="SAM's size: auto (from the checkpoint's name), vit_b, vit_l or vit_h."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch per run (default as `timi generate`)."),
    max_upload_mb: float = typer.Option(20.0, help="Largest upload, in MiB."),
    max_steps: int = typer.Option(50, help=f"Most sampling steps a run may ask for (at most {MAX_STEPS_CEILING})."),
    max_octree: int = typer.Option(384, help="Highest octree resolution a run may ask for (at most 512)."),
    max_run_seconds: float = typer.Option(900.0, help="A run is stopped after this many seconds (0: no limit)."),
    runs_per_client: int = typer.Option(2, help="Runs one page (session) may have queued or running."),
    max_queued_runs: int = typer.Option(4, help="Runs that may wait, all pages together."),
    keep_runs: int = typer.Option(20, help="Run folders kept in the work folder (older ones are removed)."),
) -> None:
    """Start TIMI's page in the browser: picture in, instance masks made or painted, TIMI with
    progress, the 3D scene per instance out."""
    from rich.console import Console

    from ..cli_common import run_cli

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    err = Console(stderr=True, soft_wrap=True)
    cfg, logins, notes = run_cli(lambda: check_app_options(
        model, host, port, device, sam_checkpoint, sam_model, max_upload_mb, threads, share=share, auth=auth,
        auth_file=auth_file, insecure_no_auth=insecure_no_auth, max_steps=max_steps, max_octree=max_octree,
        max_run_seconds=max_run_seconds, runs_per_client=runs_per_client, max_queued_runs=max_queued_runs,
        keep_runs=keep_runs), err)
    try:
        for n in notes:
            err.print(f"warning: {n}", markup=False, highlight=False)
        if share:
            err.print("warning: --share makes a public link through Gradio's servers: anyone with it reaches the page.",
                      markup=False, highlight=False)
        from .ui import build_app

        import_native_libraries()
        use_private_gradio_cache(cfg.workdir)
        demo = build_app(cfg)
        app_kwargs = serve(demo, cfg)
        err.print(f"model: {cfg.model}; work folder: {cfg.workdir} (removed on exit)", markup=False, highlight=False)
        signal.signal(signal.SIGTERM, _terminate)
        from .run import stop_runs

        # a run under way ends at its next step (else the exit would wait for it), before the page closes
        run_cli(lambda: _launch(demo, launch_options(host, port, share, max_upload_mb, logins, app_kwargs),
                                before_close=lambda: stop_runs(cfg)), err)
    finally:
        from .run import stop_runs

        stop_runs(cfg)
        shutil.rmtree(cfg.workdir, ignore_errors=True)

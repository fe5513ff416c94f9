"""What the ``timi`` sub-commands share: positional mask paths and one-line errors with exit codes."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import typer
from typer.core import TyperGroup

from .io import OutputError
from .masks_io import MaskInputError
from .pipelines import BackendUnavailableError, ModelConfigError, ModelNotFoundError

__all__ = ["split_image_and_masks", "run_cli", "error_line", "OneLineUsageErrors", "EXIT_BAD_INPUT",
           "EXIT_INTERRUPTED", "BAD_INPUT_ERRORS", "INTERRUPTED_LINE"]

#: Exit status for bad input (as click/typer use for usage errors); 1 for failures while running.
EXIT_BAD_INPUT = 2
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130
#: Bad input: exit 2. ``FileNotFoundError`` covers missing input files; ``WriteError`` (a
#: ``RuntimeError``) and other ``OSError``s while running are failures: exit 1.
BAD_INPUT_ERRORS = (MaskInputError, OutputError, ModelNotFoundError, ModelConfigError, BackendUnavailableError,
                    FileNotFoundError, ValueError)
INTERRUPTED_LINE = "interrupted (Ctrl-C): stopped; no output was written."


def split_image_and_masks(paths: list[Path], masks: list[Path]) -> tuple[Path, list[Path]]:
    """``timi CMD IMAGE --masks A B C`` parses as IMAGE, B, C positional and A as --masks: the image is
    the first positional path, the others are masks following those given with --masks."""
    return paths[0], list(masks) + list(paths[1:])


def error_line(exc: BaseException) -> tuple[str, int] | None:
    """The one line and exit status the command line shows for ``exc``: bad input -> (``error: ...``, 2),
    other failures while running (``RuntimeError``, ``OSError``) -> (``error: ...``, 1), Ctrl-C -> 130;
    ``None`` for anything else (a bug: let it raise). ``timi app`` shows the same lines on the page."""
    if isinstance(exc, BAD_INPUT_ERRORS):
        code = EXIT_BAD_INPUT
    elif isinstance(exc, (RuntimeError, OSError)):
        code = 1
    elif isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED_LINE, EXIT_INTERRUPTED
    else:
        return None
    return f"error: {' '.join(str(exc).split())}", code


def run_cli(fn, err):
    """Run ``fn``; bad input -> one ``error:`` line and exit 2, other failures -> one line and exit 1,
    Ctrl-C -> one line and exit 130 (:func:`error_line`), on a line of its own."""
    try:
        return fn()
    except (*BAD_INPUT_ERRORS, RuntimeError, OSError, KeyboardInterrupt) as e:
        line, code = error_line(e)
        close_progress_bars()
        err.print(line, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(code)


def close_progress_bars() -> None:
    """Close the progress bars an error or Ctrl-C left open, so that the line printed next starts a
    line of its own instead of being glued to a bar's (a bar over a loop is closed by its generator's
    ``finally`` only once the traceback, which holds the loop's frame, is gone; a bar updated by hand
    is not closed at all)."""
    if "tqdm" not in sys.modules:
        return
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


#: hy3dgen's logger: it logs ``INFO - Loading model from ...`` through a handler of its own.
HY3DGEN_LOGGER = "hy3dgen.shapgen"


def quiet_hy3dgen() -> None:
    """Keep hy3dgen's INFO lines off the command line (it says what it loads itself); its warnings
    and errors still show. A filter, since importing hy3dgen sets its logger's level to INFO."""
    logging.getLogger(HY3DGEN_LOGGER).addFilter(_hy3dgen_warnings_only)  # once: addFilter skips a present one


def _hy3dgen_warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


#: click's exception classes, from wherever this typer takes click (typer >= 0.20 vendors it)
_click_exceptions = sys.modules[typer.BadParameter.__module__]


class OneLineUsageErrors(TyperGroup):
    """The root ``timi`` group: a usage error anywhere below it (an unknown option, a value that
    ``typer.BadParameter`` refuses) prints one ``error:`` line naming the command's ``--help``, exit 2,
    instead of click's boxed panel; ``timi`` without arguments still prints the help."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        quiet_hy3dgen()
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click_exceptions.ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # `timi` alone: its help, as before
                typer.echo(e.format_message(), err=True)
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            typer.echo(f"error: {' '.join(e.format_message().split())}{hint}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            close_progress_bars()
            typer.echo(INTERRUPTED_LINE, err=True)
            sys.exit(EXIT_INTERRUPTED)
        # non-standalone click returns typer.Exit's code, or the command's return value (None)
        sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)


#: ``--preset``'s help, shared by ``timi generate`` and ``timi eval``.
PRESET_HELP = ("TIMI's form. default (TIMIConfig()): the paper's Eqs.2-7 with the part of the update shared by "
               "every latent token removed before Eq.6 (common=remove): on token latents that shared part only "
               "shrinks every shape, so the default keeps the shapes' size; on the testbed's held-out scenes "
               "neither form separates instances at matched size (docs/results.md). paper "
               "(TIMIConfig.paper()): the paper's literal form, for reproducing its tables. On a TRELLIS model "
               "(grid latent) default means paper: no other form qualified there (docs/results.md).")


# ----------------------------------------------------------------------------- --engine (docs/cluster.md)
#: The engine options of the commands that generate many scenes (``timi eval``, ``timi generate`` over a
#: folder or a manifest, ``timi testbed variants|control``); :func:`engine_from_options` reads them.
ENGINE_OPTION = typer.Option("local", "--engine", help="local (here, one scene after another) | ray (a Ray cluster, "
                             "docs/cluster.md; needs timi's extra named ray).")
ADDRESS_OPTION = typer.Option(None, "--address", help="--engine ray: the cluster, auto | ray://HOST:10001 (default: "
                              "a local Ray instance on this machine's cores).")
GPUS_PER_WORKER_OPTION = typer.Option(None, "--gpus-per-worker", min=0, help="--engine ray: GPUs per generation "
                                      "worker, e.g. 0.5 for two per GPU (default: 1 when the cluster has GPUs, else 0).")
WORKERS_OPTION = typer.Option(None, "--workers", min=1, help="--engine ray: generation workers (default: as many as "
                              "the cluster's GPUs hold, else 1).")


def engine_from_options(engine: str, address, gpus_per_worker, workers):
    """``None`` (the local engine) or a :class:`timi.evaluation.ray_engine.RayEngine` (Ray is imported when it
    runs); a usage error (``typer.BadParameter``) for an unknown engine or a Ray option without ``--engine ray``."""
    if engine not in ("local", "ray"):
        raise typer.BadParameter(f"{engine!r}; use local or ray", param_hint="--engine")
    if engine == "local":
        given = [name for name, v in (("--address", address), ("--gpus-per-worker", gpus_per_worker),
                                      ("--workers", workers)) if v is not None]
        if given:
            raise typer.BadParameter(f"{given[0]} needs --engine ray", param_hint=given[0])
        return None
    from .evaluation.ray_engine import RayEngine

    return RayEngine(address=address, gpus_per_worker=gpus_per_worker, workers=workers)


@contextlib.contextmanager
def engine_errors():
    """An engine that cannot start (Ray not installed, no cluster at ``--address``): one ``error:`` line, exit 2."""
    from .evaluation.ray_engine import EngineError

    try:
        yield
    except EngineError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None

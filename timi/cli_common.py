"""What the ``timi`` sub-commands share: positional mask paths and one-line errors with exit codes."""

from __future__ import annotations

from pathlib import Path

import typer

from .io import OutputError
from .masks_io import MaskInputError
from .pipelines import BackendUnavailableError, ModelConfigError, ModelNotFoundError

__all__ = ["split_image_and_masks", "run_cli", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "BAD_INPUT_ERRORS"]

#: Exit status for bad input (as click/typer use for usage errors); 1 for failures while running.
EXIT_BAD_INPUT = 2
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130
#: Bad input: exit 2. ``FileNotFoundError`` covers missing input files; ``WriteError`` (a
#: ``RuntimeError``) and other ``OSError``s while running are failures: exit 1.
BAD_INPUT_ERRORS = (MaskInputError, OutputError, ModelNotFoundError, ModelConfigError, BackendUnavailableError,
                    FileNotFoundError, ValueError)


def split_image_and_masks(paths: list[Path], masks: list[Path]) -> tuple[Path, list[Path]]:
    """``timi CMD IMAGE --masks A B C`` parses as IMAGE, B, C positional and A as --masks: the image is
    the first positional path, the others are masks following those given with --masks."""
    return paths[0], list(masks) + list(paths[1:])


def run_cli(fn, err):
    """Run ``fn``; bad input -> one ``error:`` line and exit 2, other failures -> one line and exit 1,
    Ctrl-C -> one line and exit 130."""
    def fail(msg: str, code: int):
        err.print(f"error: {' '.join(str(msg).split())}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(code)

    try:
        return fn()
    except BAD_INPUT_ERRORS as e:
        fail(e, EXIT_BAD_INPUT)
    except (RuntimeError, OSError) as e:
        fail(e, 1)
    except KeyboardInterrupt:
        err.print("interrupted (Ctrl-C): stopped; no output was written.", markup=False, highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED)

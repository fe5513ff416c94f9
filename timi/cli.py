"""The ``timi`` command line (typer). Each sub-command lives in its own module and registers here."""

from __future__ import annotations

import typer

from timi.cli_common import OneLineUsageErrors

app = typer.Typer(
    name="timi",
    cls=OneLineUsageErrors,
    help="TIMI: training-free image-to-3D multi-instance generation on Hunyuan3D 2.0.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """TIMI: training-free image-to-3D multi-instance generation on Hunyuan3D 2.0."""


# Sub-commands register themselves below (one import per module).
from timi.testbed.cli import app as _testbed_app  # noqa: E402

app.add_typer(_testbed_app, name="testbed")
from timi.generate_cli import GENERATE_HELP as _GENERATE_HELP, generate_command as _generate_command  # noqa: E402
from timi.inspect_cmd import inspect_command as _inspect_command  # noqa: E402

app.command("generate", help=_GENERATE_HELP)(_generate_command)
app.command("inspect")(_inspect_command)
from timi.evaluation.cli import eval_command as _eval_command  # noqa: E402

app.command("eval")(_eval_command)
from timi.bench.cli import app as _bench_app  # noqa: E402

app.add_typer(_bench_app, name="bench")
from timi.webapp.cli import app_command as _app_command  # noqa: E402  (gradio is imported when it runs)

app.command("app")(_app_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""``python -m timi.bench ...`` == ``timi bench ...``."""

from timi.bench.cli import app

if __name__ == "__main__":
    app(prog_name="python -m timi.bench")

"""Start-up stays light (issue 29): ``import timi_core`` and every ``timi ... --help`` load no
framework (torch, jax, hy3dgen, gradio) and none of the heavy scientific stack they would drag in.

Each check runs in a fresh interpreter, since this test process has long imported all of them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "jax", "flax", "hy3dgen", "gradio", "trimesh", "scipy", "matplotlib", "ray", "skimage")


def _loaded_after(code: str) -> set:
    probe = (f"import sys\n{code}\nimport json\n"
             f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_timi_core_imports_no_framework():
    assert _loaded_after("import timi_core\nfrom timi_core import TIMIConfig, separation_loss") == set()


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["eval", "--help"], ["app", "--help"],
                                  ["bench", "--help"], ["testbed", "variants", "--help"], ["inspect", "--help"]])
def test_help_imports_no_framework(argv):
    code = ("from typer.testing import CliRunner\nfrom timi.cli import app\n"
            f"r = CliRunner().invoke(app, {argv!r})\nassert r.exit_code == 0, r.output\n"
            "assert 'Usage' in r.output")
    assert _loaded_after(code) == set()

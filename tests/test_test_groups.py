"""The test command's own assumption: with ``-n 2 --dist loadgroup`` (``make test``) the tests marked
``xdist_group("heavy")`` go to one worker, one after another (timing tests rely on it). pytest-xdist
marks them by a ``@heavy`` suffix on the node id; pytest 9.2 ignores that suffix (constraints/ci.txt)."""

import pytest


@pytest.mark.xdist_group("heavy")
def test_heavy_tests_are_grouped_under_loadgroup(request):
    if not request.config.getvalue("loadgroup"):
        pytest.skip("not run with --dist loadgroup")
    assert request.node.nodeid.endswith("@heavy"), (
        f"{request.node.nodeid}: pytest-xdist's group suffix is missing, so the heavy tests run beside "
        f"each other (pytest {pytest.__version__}; constraints/ci.txt keeps pytest below 9.2)")

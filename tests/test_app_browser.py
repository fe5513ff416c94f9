"""``timi app`` in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, Selenium):
start the app on a free port with the shipped model and a login (``--auth``), log in, upload a
file that is no picture (its one-line error in the status box), then the example picture, accept
the proposed masks, run (few steps, a coarse octree, guided steps left empty: the page's default),
and check that the 3D viewer fetched a GLB with one node per instance. Screenshots before and after the run go to ``$TIMI_APP_SCREENSHOTS`` (the
docs' figures: ``TIMI_APP_SCREENSHOTS=docs/figures``) or the test's temporary folder.

Skips, saying why, where Chromium, its driver or Selenium is missing; CI installs them (.ci/run).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "timi" / "assets" / "example"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
#: The flags Chromium needs here: no sandbox (root in a container), no GPU, and no network of its own.
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,2400", "--hide-scrollbars"]

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                       reason="no chromium / chromedriver on PATH (apt-get install chromium chromium-driver; CI does)"),
    pytest.mark.xdist_group("heavy"),  # a server, a browser and a run: not beside the other heavy tests
]


#: The login the test's server asks for (``--auth``).
LOGIN = "tester:not-a-real-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc, log: Path, timeout: float = 180.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            pytest.fail(f"timi app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    pytest.fail(f"timi app did not answer at {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "adapters/torch"), str(ROOT / "adapters/jax"),
                                          os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "timi.cli", "app", "--port", str(port), "--auth", LOGIN],
                                cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_http(url, proc, log)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install 'timi[app-test]')")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        opts.add_argument(f)
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot(driver, name: str, tmp_path: Path) -> Path:
    """A PNG of the page, scaled to 1000 px wide and palette-quantised (small enough for the docs)."""
    from PIL import Image

    folder = Path(os.environ.get("TIMI_APP_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(int(height) + 40, 900), 4000))
    img = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    img = img.resize((1000, round(img.height * 1000 / img.width)), Image.LANCZOS).quantize(colors=128)
    path = folder / name
    img.save(path, optimize=True)
    return path


def _value(driver, css: str) -> str:
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.value : ''", css)


def _set_number(driver, elem_id: str, value) -> None:
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("css selector", f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def _wait(driver, predicate, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        got = predicate()
        if got:
            return got
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; status: {_value(driver, '#status textarea')!r}; "
                f"masks: {_value(driver, '#notes textarea')!r}")


def _log_in(d, url: str) -> None:
    """The page asks for the login first (``--auth``); without it there is no upload box."""
    d.get(url)
    _wait(d, lambda: d.find_elements("css selector", "input[type=password]"), 60, "the login form")
    assert not d.find_elements("css selector", "#picture")
    user, password = LOGIN.split(":", 1)
    d.find_element("css selector", "input[type=text]").send_keys(user)
    d.find_element("css selector", "input[type=password]").send_keys(password)
    next(b for b in d.find_elements("css selector", "button") if b.text.strip().lower() == "login").click()


def test_upload_propose_run_and_the_viewer_gets_one_node_per_instance(server, browser, tmp_path):
    import trimesh

    url, log = server
    d = browser
    _log_in(d, url)
    _wait(d, lambda: d.find_elements("css selector", "#picture input[type=file]"), 60, "the upload box")
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    d.find_element("css selector", "#picture input[type=file]").send_keys(str(fake))
    line = _wait(d, lambda: _value(d, "#status textarea").startswith("error") and _value(d, "#status textarea"), 60,
                 "the bad picture's error")
    assert line == "error: notes.png: not a picture this page can read; upload a PNG or JPEG picture.", line
    d.get(url)                                        # a fresh page (the session's login cookie stays)
    _wait(d, lambda: d.find_elements("css selector", "#picture input[type=file]"), 60, "the upload box")
    d.find_element("css selector", "#picture input[type=file]").send_keys(str(EXAMPLE / "image.png"))
    notes = _wait(d, lambda: "instance(s)" in _value(d, "#notes textarea") and _value(d, "#notes textarea"), 120,
                  "the proposed masks")
    assert notes.startswith("3 instance(s)"), notes
    assert "error" not in notes, notes
    _wait(d, lambda: d.find_elements("css selector", "#grid-view img"), 60, "the token-grid picture")
    for elem_id, value in (("steps", 5), ("octree", 64)):
        _set_number(d, elem_id, value)
    assert _value(d, "#guided-steps textarea, #guided-steps input") == ""   # left empty: the paper's first 30 %
    time.sleep(1.0)
    before = _screenshot(d, "app_before.png", tmp_path)

    d.find_element("css selector", "#run").click()
    status = _wait(d, lambda: _value(d, "#status textarea").startswith(("done", "error")) and _value(d, "#status textarea"),
                   300, "the run to finish")
    assert status.startswith("done"), f"{status}\n{log.read_text()[-2000:]}"
    glbs = _wait(d, lambda: d.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => n.endsWith('scene.glb'))"),
        60, "the 3D viewer to fetch the scene")
    _wait(d, lambda: d.find_elements("css selector", "#scene canvas"), 30, "the 3D viewer's canvas")
    time.sleep(2.0)  # let the viewer draw before the screenshot
    after = _screenshot(d, "app_after.png", tmp_path)

    cookies = "; ".join(f"{c['name']}={c['value']}" for c in d.get_cookies())   # the login's session
    with urllib.request.urlopen(urllib.request.Request(glbs[-1], headers={"Cookie": cookies}), timeout=30) as r:
        # the very file the viewer fetched
        data = r.read()
    assert data[:4] == b"glTF"
    scene = trimesh.load(trimesh.util.wrap_as_stream(data), file_type="glb")
    nodes = sorted(scene.graph.nodes_geometry)
    instances = [n for n in nodes if n != "unclaimed"]
    assert len(instances) == 3 and len(set(instances)) == 3, nodes
    links = d.execute_script("return [...document.querySelectorAll('#downloads a')].map(a => a.href)")
    assert sum(h.endswith(".glb") for h in links) >= 1 + len(instances), links
    for p in (before, after):
        assert p.stat().st_size < 600_000, (p, p.stat().st_size)

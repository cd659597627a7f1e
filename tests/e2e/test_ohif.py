"""A real web viewer on the archive: OHIF 3 (npm ``@ohif/app``'s prebuilt ``dist/``,
fetched by ``scripts/setup`` into ``.tools/ohif``) served by ``scripts/ohif_serve.py``,
driven in Debian's headless Chromium through Playwright, against the node started as
``archive serve`` with the real FerretDB and access rules.

What a radiologist sees: opening a study shows its image (the middle of the viewport
has many grey levels, not a blank canvas), whose pixels came through WADO-RS frames --
a native CT and a JPEG 2000 MR -- with OHIF served from another origin (the archive's
CORS setting lets it call); the study list, through the same-origin proxy acting for a
restricted user, shows her study and not the other.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from acl_clients import node_with_users
from helpers import ROOT, free_port, port_open, stow
from pydicom import dcmread
from pydicom.data import get_testdata_file

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

DIST = ROOT / ".tools" / "ohif" / "package" / "dist"
CHROMIUM = "/usr/bin/chromium"
#: A native CT and a JPEG 2000 (lossless) MR of pydicom's test files.
FILES = ("CT_small.dcm", "MR_small_jp2klossless.dcm")


def patient(name: str) -> str:
    return str(dcmread(get_testdata_file(name), stop_before_pixels=True).PatientID)


@pytest.fixture(scope="module")
def viewer_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def node(module_node_factory: Any, viewer_port: int,
         tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The node: CORS for the viewer's origin; anonymous may query and retrieve all,
    ``alice`` only the CT's patient."""
    running = node_with_users(
        module_node_factory, tmp_path_factory.mktemp("ohif-users"),
        {"alice": "alice-secret"}, f"""
rules:
  - {{principal: anonymous, service: "*"}}
  - {{principal: alice, service: Query, pattern: {{PatientID: "{patient(FILES[0])}"}}}}
""", {"http": {"cors": {"allow_origins": [f"http://127.0.0.1:{viewer_port}"]}}})
    stored = stow(running, [Path(get_testdata_file(name)).read_bytes() for name in FILES])
    assert stored.status_code == 200, stored.text
    return running


def serve_ohif(port: int, archive_port: int, log: Path, *options: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "ohif_serve.py"), str(DIST),
             "--port", str(port), "--archive", f"http://127.0.0.1:{archive_port}",
             *options], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not port_open(port):
        assert server.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return server


@pytest.fixture(scope="module")
def viewer(node: Any, viewer_port: int, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[str]:
    """OHIF on its own origin, calling the archive directly (CORS)."""
    assert (DIST / "index.html").is_file(), "no OHIF dist: run scripts/setup"
    server = serve_ohif(viewer_port, node.http_port,
                        tmp_path_factory.mktemp("ohif") / "ohif.log", "--direct")
    yield f"http://127.0.0.1:{viewer_port}"
    server.terminate()
    server.wait(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader",
            "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"])
        yield chromium
        chromium.close()


def test_study_list_through_the_proxy_shows_what_the_user_may_see(
        node: Any, browser: Any, tmp_path: Path) -> None:
    port = free_port()
    server = serve_ohif(port, node.http_port, tmp_path / "proxy.log",
                        "--user", "alice:alice-secret")
    try:
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
        page.get_by_text(patient(FILES[0]), exact=True).first.wait_for(timeout=30_000)
        assert page.get_by_text(patient(FILES[1]), exact=True).count() == 0
        page.close()
    finally:
        server.terminate()
        server.wait(10)
    # anonymous, from the viewer's origin, sees both
    answer = requests.get(f"{node.http_url}/studies", timeout=30,
                          headers={"Origin": f"http://127.0.0.1:{port}"})
    assert len(answer.json()) == 2


def grey_levels(page: Any, path: Path) -> int:
    """Grey levels in the middle of the largest canvas (the viewport): no overlay text,
    no corner icons there."""
    from PIL import Image

    boxes = page.eval_on_selector_all(
        "canvas", "cs => cs.map(c => {const r = c.getBoundingClientRect();"
        " return [r.x, r.y, r.width, r.height]})")
    if not boxes:
        return 0
    x, y, w, h = max(boxes, key=lambda b: b[2] * b[3])
    if w < 8 or h < 8:
        return 0
    page.screenshot(path=str(path), clip={"x": x + w / 4, "y": y + h / 4,
                                          "width": w / 2, "height": h / 2})
    return len(Image.open(path).convert("L").getcolors(1 << 16) or [])


@pytest.mark.parametrize("name", FILES)
def test_an_image_renders_from_wado_rs_frames(viewer: str, browser: Any, name: str,
                                              tmp_path: Path) -> None:
    ds = dcmread(get_testdata_file(name), stop_before_pixels=True)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    frames: list[int] = []
    page.on("response", lambda r: frames.append(r.status) if "/frames/" in r.url else None)
    page.goto(f"{viewer}/viewer?StudyInstanceUIDs={ds.StudyInstanceUID}", wait_until="load")
    levels, deadline = 0, time.monotonic() + 90
    while levels <= 32 and time.monotonic() < deadline:
        time.sleep(1)
        levels = grey_levels(page, tmp_path / "viewport.png")
    page.close()
    assert frames and all(status == 200 for status in frames), frames
    # a blank or black canvas has a few levels (overlay text aside); an image, many
    assert levels > 32, f"{name}: {levels} grey levels in the viewport (see {tmp_path})"

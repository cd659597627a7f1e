"""A real web viewer on the archive: OHIF 3 (npm ``@ohif/app``'s prebuilt ``dist/``,
fetched by ``scripts/setup`` into ``.tools/ohif``) served by ``scripts/ohif_serve.py``,
driven in Debian's headless Chromium through Playwright, against the node started as
``archive serve`` with the real FerretDB.

What a radiologist sees: the study list shows the stored studies; opening one shows
its image (the middle of the viewport has many grey levels, not a blank canvas), whose
pixels came through WADO-RS frames -- a native CT and a JPEG 2000 MR.
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
from helpers import ROOT, free_port, port_open
from pydicom import dcmread
from pydicom.data import get_testdata_file

from archive.web.multipart import new_boundary

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

DIST = ROOT / ".tools" / "ohif" / "package" / "dist"
CHROMIUM = "/usr/bin/chromium"
#: A native CT and a JPEG 2000 (lossless) MR of pydicom's test files.
FILES = ("CT_small.dcm", "MR_small_jp2klossless.dcm")


@pytest.fixture(scope="module")
def node(module_node_factory: Any) -> Any:
    running = module_node_factory()
    boundary = new_boundary()
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + Path(get_testdata_file(name)).read_bytes() + b"\r\n" for name in FILES
    ) + f"--{boundary}--\r\n".encode()
    stored = requests.post(f"{running.http_url}/studies", data=body, timeout=60, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert stored.status_code == 200, stored.text
    return running


@pytest.fixture(scope="module")
def viewer(node: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """OHIF served on its own port, proxying /dicom-web to the node."""
    assert (DIST / "index.html").is_file(), "no OHIF dist: run scripts/setup"
    port = free_port()
    log = tmp_path_factory.mktemp("ohif") / "ohif.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "ohif_serve.py"), str(DIST),
             "--port", str(port), "--archive", f"http://127.0.0.1:{node.http_port}"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not port_open(port):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
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


def test_study_list_shows_the_stored_studies(viewer: str, browser: Any) -> None:
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(f"{viewer}/", wait_until="networkidle")
    for name in FILES:
        ds = dcmread(get_testdata_file(name), stop_before_pixels=True)
        page.get_by_text(str(ds.PatientID), exact=True).first.wait_for(timeout=30_000)
    page.close()


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

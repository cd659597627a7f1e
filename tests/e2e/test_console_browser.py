"""The web console in a browser: Debian's headless Chromium driven by Playwright,
against the node started as ``archive serve`` with the real FerretDB (the data and
users of test_console.py).

What a user sees: logged in with the browser's own Basic login, she searches, opens
a study and sees a rendered thumbnail per series, opens an instance and sees its
attribute tree, downloads the original, sees the dashboard's charts drawn; the
administrator reads the rules and the audit trail and deletes a study after
confirming, and rejects a series with a reason then purges it from the Rejected page;
a restricted user sees only her studies and her counts, no rules, no audit, no delete
or reject button (one whose Delete rules match the MR series sees it there only);
markup in the data is text (no script runs, no dialog opens).  A few page loads
only: each costs seconds here.

``CONSOLE_SCREENSHOTS=docs`` saves the README's screenshots there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import ROOT
from test_console import (
    PASSWORDS,
    XSS_NAME,
    qido_studies,
    root,
    start_node,
    store_corpus,
    store_deletable,
)

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

CHROMIUM = "/usr/bin/chromium"
TIMEOUT = 60_000
#: Pixels of a canvas that are drawn (not transparent): a chart has bars, axes, labels.
DRAWN = """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""
THUMBNAILS_LOADED = """() => { const images = [...document.querySelectorAll('img.thumb')];
  return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0); }"""


@pytest.fixture(scope="module")
def node(module_node_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return start_node(module_node_factory, tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(node: Any) -> dict[str, Any]:
    return store_corpus(node)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader",
            "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"])
        yield chromium
        chromium.close()


class Watched:
    """A logged-in page, with the dialogs opened and the errors logged on it."""

    def __init__(self, browser: Any, user: str | None) -> None:
        credentials = {"username": user, "password": PASSWORDS[user]} if user else None
        self.context = browser.new_context(http_credentials=credentials, accept_downloads=True,
                                           viewport={"width": 1400, "height": 900})
        self.context.set_default_timeout(TIMEOUT)
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("console", lambda m: self.errors.append(m.text)
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("response", lambda r: self.errors.append(f"{r.status} {r.url}")
                     if r.status >= 400 and r.status != 401 else None)

    def close(self) -> None:
        self.context.close()


def screenshot(page: Any, name: str) -> None:
    folder = os.environ.get("CONSOLE_SCREENSHOTS")
    if folder:
        page.screenshot(path=str(ROOT / folder / name))


def charts_drawn(page: Any) -> list[int]:
    page.wait_for_function("() => document.querySelectorAll('canvas[data-chart]').length == 6"
                           " && typeof Chart !== 'undefined'"
                           " && [...document.querySelectorAll('canvas[data-chart]')]"
                           ".every(c => Chart.getChart(c))")
    return page.eval_on_selector_all("canvas[data-chart]", f"cs => cs.map({DRAWN})")


def test_admin_searches_browses_downloads_and_sees_the_dashboard(
        node: Any, corpus: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    watched = Watched(browser, "admin")
    page = watched.page
    try:
        page.goto(root(node) + "/")
        assert page.locator("#studies tbody tr").count() == 4
        assert "logged in as admin" in page.inner_text("#who")
        page.fill("input[name=PatientName]", "ALICE^*")
        page.fill("input[name=StudyDateFrom]", "2024-01-01")
        page.click("button[type=submit]")
        page.wait_for_url("**StudyDateFrom=2024-01-01**")
        rows = page.locator("#studies tbody tr")
        assert rows.count() == 1 and "Alice head" in rows.inner_text()

        rows.get_by_text("ALICE^ANNA").click()  # the study
        page.wait_for_url(f"**/studies/{corpus['alice']}")
        page.wait_for_function(THUMBNAILS_LOADED)
        sizes = page.eval_on_selector_all("img.thumb", "is => is.map(i => i.naturalWidth)")
        assert len(sizes) == 2 and min(sizes) > 0
        screenshot(page, "console-study.png")

        page.locator(".card").first.click()  # the first series
        page.wait_for_url(f"**/series/{corpus['alice_series'][0]}")
        assert page.locator("#instances tbody tr").count() == 2
        page.locator("#instances tbody tr").first.locator("a").first.click()  # its instance 1
        page.wait_for_url("**/instances/*")
        tree = page.locator("#dicom-tree")
        assert "PatientName" in tree.inner_text()
        assert tree.locator("details.item").count() in (0, 2)  # instance 1 has none
        with page.expect_download() as download:
            page.click("#download")
        sop = page.url.rsplit("/", 1)[1]
        assert Path(download.value.path()).read_bytes() == corpus["files"][sop]

        page.goto(root(node) + "/dashboard")
        assert page.inner_text("#total-instances") == "8"
        drawn = charts_drawn(page)
        assert len(drawn) == 6 and min(drawn) > 500, drawn
        kinds = page.eval_on_selector_all("canvas[data-chart]",
                                          "cs => cs.map(c => Chart.getChart(c).config.type)")
        assert kinds == ["bar"] * 5 + ["line"]  # storage growth: a line
        assert page.locator("#recent-failures").is_visible()
        screenshot(page, "console-dashboard.png")
        assert watched.dialogs == [] and watched.errors == [], watched.errors
    finally:
        watched.close()


def test_the_dicom_tree_of_an_instance_with_sequences_and_private_tags(
        node: Any, corpus: dict[str, Any], browser: Any) -> None:
    watched = Watched(browser, "admin")
    page = watched.page
    try:
        page.goto(f"{root(node)}/studies/{corpus['alice']}/series/"
                  f"{corpus['alice_series'][0]}/instances/{corpus['alice_first']}")
        tree = page.locator("#dicom-tree")
        assert tree.locator("details.item").count() == 2  # AnatomicRegionSequence's items
        assert tree.get_by_text("CSA Image Header Info").is_visible()
        assert tree.locator("li.private").count() == 4
        page.wait_for_function(THUMBNAILS_LOADED)
        screenshot(page, "console-instance.png")
        assert watched.dialogs == [] and watched.errors == [], watched.errors
    finally:
        watched.close()


def test_a_restricted_user_sees_her_studies_and_counts_and_markup_as_text(
        node: Any, corpus: dict[str, Any], browser: Any) -> None:
    watched = Watched(browser, "alice")
    page = watched.page
    try:
        page.goto(root(node) + "/")
        assert page.locator("#studies tbody tr").count() == 2
        assert page.get_by_text(XSS_NAME, exact=True).is_visible()  # the name, as text
        assert "BOB" not in page.inner_text("body")

        page.goto(root(node) + "/dashboard")
        assert page.inner_text("#total-studies") == "2"
        assert page.inner_text("#total-instances") == "4"
        drawn = charts_drawn(page)
        assert min(drawn) > 500, drawn
        labels = page.eval_on_selector('canvas[data-chart="modalities"]',
                                       "c => Chart.getChart(c).data.labels")
        assert labels == ["CT"]  # the MR study is not hers
        growth = page.eval_on_selector('canvas[data-chart="growth"]',
                                       "c => Chart.getChart(c).data.datasets[0].data")
        assert growth[-1] == int(page.get_attribute("#total-bytes", "title").split()[0])
        assert "yours only" in page.inner_text("main")

        # no administration: not in her menu, refused at its address, no delete button
        assert page.locator("#nav-rules").count() == page.locator("#nav-audit").count() == 0
        page.goto(f"{root(node)}/studies/{corpus['alice']}")
        page.wait_for_function(THUMBNAILS_LOADED)
        assert page.locator("#delete").count() == page.locator("#reject").count() == 0
        assert page.locator("#nav-rejected").count() == 0
        assert watched.dialogs == [] and watched.errors == [], watched.errors
        for path in ("/rules", "/audit", "/rejected", f"/studies/{corpus['alice']}/delete",
                     f"/studies/{corpus['alice']}/reject"):
            answer = page.goto(root(node) + path)
            assert answer is not None and answer.status == 403, path
            assert page.inner_text("h1") == "Not authorized"
            assert "ALICE-*" not in page.inner_text("body")
    finally:
        watched.close()


def test_anonymous_is_asked_to_log_in(node: Any, browser: Any) -> None:
    """A browser with no login to give: the 401 would open its prompt, which headless
    Chromium cannot show, so the navigation fails on the credentials."""
    from playwright.sync_api import Error

    watched = Watched(browser, None)
    try:
        with pytest.raises(Error, match="ERR_INVALID_AUTH_CREDENTIALS"):
            watched.page.goto(root(node) + "/")
    finally:
        watched.close()


def test_an_administrator_reads_rules_and_audit_and_deletes_a_study(
        node: Any, corpus: dict[str, Any], browser: Any) -> None:
    deletable = store_deletable(node)
    refused = requests.get(root(node) + "/rules", auth=("alice", PASSWORDS["alice"]), timeout=30)
    assert refused.status_code == 403  # an entry the audit search below finds
    watched = Watched(browser, "admin")
    page = watched.page
    try:
        page.goto(root(node) + "/")
        page.click("#nav-rules")
        page.wait_for_url("**/rules")
        assert page.locator("#rules tbody tr").count() == 11
        page.fill("input[name=study]", deletable["study"])
        page.click("form.search button[type=submit]")
        page.wait_for_url("**/rules?study=*")
        carol = page.locator('#check tr[data-principal="carol"]')
        assert carol.locator('td[data-service="Delete"]').inner_text() == "2 of 3 (rule 8)"
        assert carol.locator('td[data-service="Modify"]').inner_text() == "no"
        screenshot(page, "console-rules.png")

        page.click("#nav-audit")
        page.wait_for_url("**/audit")
        page.fill("input[name=user]", "alice")
        page.select_option("select[name=event]", "CONSOLE")
        page.check("input[name=failures]")
        page.click("form.search button[type=submit]")
        page.wait_for_url("**/audit?*failures=1*")
        rows = page.locator("#entries tbody tr")
        assert rows.count() > 0  # her refused rules page
        users = page.eval_on_selector_all("#entries tbody tr td:nth-child(2)",
                                          "tds => tds.map(td => td.textContent)")
        assert set(users) == {"alice"}
        screenshot(page, "console-audit.png")

        page.goto(f"{root(node)}/studies/{deletable['study']}")
        page.click("#delete")
        page.wait_for_url("**/delete")
        assert "Deletes 3 instances in 2 series" in page.inner_text("#what")
        screenshot(page, "console-delete.png")
        page.click("#confirm-delete")
        page.wait_for_selector("#deleted")
        assert page.inner_text("#deleted") == "Deleted 3 instances (2 series, 1 study)."
        assert qido_studies(node, "admin", PatientID="DEL-1") == set()
        assert watched.dialogs == [] and watched.errors == [], watched.errors
    finally:
        watched.close()


def test_an_administrator_rejects_a_series_then_purges_it(
        node: Any, corpus: dict[str, Any], browser: Any) -> None:
    d = store_deletable(node, "REJ-B", cts=1)
    series = f"{root(node)}/studies/{d['study']}/series/"
    dora = Watched(browser, "dora")  # her Delete rules: MR only
    try:
        dora.page.goto(series + d["ct"])
        assert dora.page.locator("#reject").count() == 0
        dora.page.goto(series + d["mr"])
        assert dora.page.locator("#reject").is_visible()
    finally:
        dora.close()
    watched = Watched(browser, "admin")
    page = watched.page
    try:
        page.goto(series + d["mr"])
        page.click("#reject")
        page.wait_for_url("**/reject")
        assert "Hides 2 instances in 1 series" in page.inner_text("#what")
        page.check("#reason-113038")
        screenshot(page, "console-reject.png")
        page.click("#confirm-reject")
        page.wait_for_selector("#rejected")
        assert page.inner_text("#rejected") == (
            "Rejected 2 instances (1 series): Incorrect Modality Worklist Entry.")
        page.goto(f"{root(node)}/studies/{d['study']}")
        cards = page.eval_on_selector_all("#series a.card", "as => as.map(a => a.href)")
        assert any(d["ct"] in c for c in cards) and not any(d["mr"] in c for c in cards)
        assert "KO Rejection note" in page.inner_text("#series")  # the note: no thumbnail

        page.click("#nav-rejected")
        page.wait_for_url("**/rejected")
        page.fill("input[name=PatientID]", "REJ-B")
        page.click("form.search button[type=submit]")
        page.wait_for_url("**/rejected?*")
        assert page.locator("#rejected tbody tr").count() == 2
        assert "113038 Incorrect Modality Worklist Entry" in page.inner_text("#rejected")
        page.click("#purge")
        page.wait_for_url("**/rejected/purge?*")
        assert "Purges 2 rejected instances of 1 study" in page.inner_text("#what")
        page.click("#confirm-purge")
        page.wait_for_selector("#purged")
        assert page.inner_text("#purged") == "Purged 2 rejected instances (1 study)."
        page.goto(f"{root(node)}/rejected?PatientID=REJ-B")
        assert page.locator("#none").is_visible()
        assert watched.dialogs == [] and watched.errors == [], watched.errors
    finally:
        watched.close()

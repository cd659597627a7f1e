"""Metadata queries: the console's ``/query`` page (HTTP, then headless Chromium) and
``archive query``, on the node and data of test_console.py, with QIDO-RS (checked
against C-FIND in test_dicomweb.py) as the reference for what the counts must be.

Restricted users (``alice``: patients ALICE-*, ``carol``: MR only) get the counts of
an archive holding only what they may see; ``bob`` (no Query rule) gets nothing.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
import test_console_browser
from acl_clients import archive_cli
from test_console import XSS_PRIVATE, auth, get, root, start_node, store_corpus
from test_console_browser import Watched, screenshot

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

DESCRIPTION, MODALITY, PATIENT_ID = "0008103E", "00080060", "00100020"
#: Headless Chromium, as test_console_browser.py launches it.
browser = test_console_browser.browser


@pytest.fixture(scope="module")
def node(module_node_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return start_node(module_node_factory, tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(node: Any) -> dict[str, Any]:
    return store_corpus(node)


def qido_counts(node: Any, user: str, level: str, group: str,
                **keys: str) -> Counter[str]:
    """Entities QIDO-RS finds at ``level`` (studies, series), per value of ``group``."""
    answer = requests.get(f"{node.http_url}/{level}", auth=auth(user), timeout=30,
                          params={**keys, "includefield": group, "limit": "1000"})
    assert answer.status_code == 200, answer.text
    tag = {"SeriesDescription": DESCRIPTION, "Modality": MODALITY,
           "PatientID": PATIENT_ID}[group]
    return Counter((a.get(tag, {}).get("Value") or [""])[0] for a in answer.json())


def csv_counts(text: str) -> tuple[list[str], Counter[str]]:
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0], Counter({row[0]: int(row[1]) for row in rows[1:]})


def query(node: Any, user: str | None, **params: str) -> requests.Response:
    return get(node, "/query", user=user, **params)


# --- over HTTP --------------------------------------------------------------------------


@pytest.mark.parametrize("user,level,group,keys", [
    ("admin", "series", "SeriesDescription", {"Modality": "MR"}),
    ("admin", "studies", "PatientID", {}),
    ("alice", "studies", "PatientID", {}),
    ("carol", "series", "Modality", {}),
    ("admin", "series", "Modality", {"PatientName": "alice*"}),
])
def test_csv_counts_are_what_qido_rs_finds(node: Any, corpus: dict[str, Any], user: str,
                                           level: str, group: str,
                                           keys: dict[str, str]) -> None:
    answer = query(node, user, level=level, group=group, format="csv",
                   keys="\n".join(f"{k}={v}" for k, v in keys.items()))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "text/csv; charset=utf-8"
    assert answer.headers["content-disposition"] == \
        f'attachment; filename="{level}-by-{group}.csv"'
    header, counts = csv_counts(answer.text)
    assert header == [group, level]
    assert counts == qido_counts(node, user, level, group, **keys)
    assert counts, "the corpus has some"


def test_restricted_counts_hide_what_the_rules_hide(node: Any, corpus: dict[str, Any]
                                                    ) -> None:
    _, mine = csv_counts(query(node, "alice", level="series", group="PatientID",
                               format="csv").text)
    assert set(mine) == {"ALICE-1", "ALICE-XSS"}
    _, modalities = csv_counts(query(node, "carol", level="series", group="Modality",
                                     format="csv").text)
    assert modalities == Counter({"MR": 2})  # BOB-1's and MIXED-1's MR series only
    # a hidden patient is a patient that does not exist: the same page, word for word
    hidden = query(node, "alice", level="studies", group="StudyDescription",
                   keys="PatientID=BOB-1")
    absent = query(node, "alice", level="studies", group="StudyDescription",
                   keys="PatientID=NOBODY")
    assert hidden.status_code == absent.status_code == 200
    assert hidden.text.replace("BOB-1", "NOBODY") == absent.text
    assert '<b id="total">0</b>' in hidden.text
    wild = query(node, "alice", level="instances", keys="0009,1001=*script*", format="csv")
    assert list(csv.reader(io.StringIO(wild.text))) == [["instances"], ["1"]]  # hers


def test_studies_per_series_attribute_count_each_study_under_each_value(
        node: Any, corpus: dict[str, Any]) -> None:
    """Studies per Modality: MIXED-1 (a CT and an MR series) under both, as its
    Modalities in Study lists it; the total counts it once."""
    answer = requests.get(f"{node.http_url}/studies", auth=auth("admin"), timeout=30,
                          params={"includefield": "ModalitiesInStudy"})
    expected = Counter(m for a in answer.json() for m in a["00080061"]["Value"])
    page = query(node, "admin", level="studies", group="Modality", format="csv")
    assert csv_counts(page.text)[1] == expected and expected["CT"] + expected["MR"] == 5
    assert '<b id="total">4</b>' in query(node, "admin", level="studies",
                                          group="Modality").text


def test_private_attributes_by_tag_and_shown_as_text(node: Any, corpus: dict[str, Any]
                                                     ) -> None:
    answer = query(node, "admin", level="instances", group="0009,1001",
                   keys="(0009,0010)=ACME*")
    assert answer.status_code == 200, answer.text
    assert '<b id="total">1</b>' in answer.text
    assert html.escape(XSS_PRIVATE) in answer.text and XSS_PRIVATE not in answer.text
    header, counts = csv_counts(query(node, "admin", level="instances", group="0009,1001",
                                      keys="00090010=ACME 1.0", format="csv").text)
    assert header == ["(0009,1001)", "instances"] and counts == Counter({XSS_PRIVATE: 1})


def test_bad_queries_are_told_and_the_others_refused(node: Any, corpus: dict[str, Any]
                                                     ) -> None:
    answer = query(node, "admin", level="series", keys="Modalty=MR")
    assert answer.status_code == 400 and "neither a DICOM keyword nor a tag" in answer.text
    assert "Modalty=MR</textarea>" in answer.text  # the form keeps what was typed
    assert query(node, "admin", level="series", keys="StudyDate=2024-13-01",
                 format="csv").status_code == 400
    assert query(node, "admin", level="nothing").status_code == 400
    assert query(node, "bob", level="series").status_code == 403
    anonymous = query(node, None, level="series")
    assert anonymous.status_code == 401 and "Basic" in anonymous.headers["www-authenticate"]
    assert query(node, "admin").status_code == 200  # the empty form, still serving


# --- archive query ----------------------------------------------------------------------


def test_the_command_line_counts_what_the_page_counts(node: Any, corpus: dict[str, Any]
                                                      ) -> None:
    page = query(node, "admin", level="series", group="Modality", format="csv").text
    done = archive_cli(node, "query", "--level", "series", "--group-by", "Modality", "--csv")
    assert done.returncode == 0, done.stderr
    assert done.stdout.replace("\r\n", "\n") == page.replace("\r\n", "\n")
    done = archive_cli(node, "query", "--group-by", "SeriesDescription", "Modality=MR",
                       "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert {g["values"][0]: g["count"] for g in found["groups"]} == \
        qido_counts(node, "admin", "series", "SeriesDescription", Modality="MR")
    assert found["total"] == 2 and found["level"] == "series"
    text = archive_cli(node, "query", "--level", "studies", "PatientID=ALICE-*")
    assert text.returncode == 0 and "2 studies in all" in text.stdout
    bad = archive_cli(node, "query", "Modalty=MR")
    assert bad.returncode == 2 and "neither a DICOM keyword nor a tag" in bad.stderr


# --- in a browser -----------------------------------------------------------------------


def test_in_a_browser_query_see_the_table_and_download_the_csv(
        node: Any, corpus: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    watched = Watched(browser, "admin")
    page = watched.page
    try:
        page.goto(root(node) + "/")
        page.click("nav >> text=Metadata queries")
        page.wait_for_url("**/query")
        page.select_option("select[name=level]", "series")
        page.fill("input[name=group]", "SeriesDescription")
        page.fill("textarea[name=keys]", "Modality=MR")
        page.click("button[type=submit]")
        page.wait_for_url("**group=SeriesDescription**")
        expected = qido_counts(node, "admin", "series", "SeriesDescription", Modality="MR")
        shown = {cells[0]: int(cells[1]) for cells in page.eval_on_selector_all(
            "#counts tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.innerText))")}
        assert shown == {(k or "(none)"): n for k, n in expected.items()}
        assert page.inner_text("#total") == "2"
        screenshot(page, "console-query.png")
        with page.expect_download() as download:
            page.click("#csv")
        assert download.value.suggested_filename == "series-by-SeriesDescription.csv"
        header, counts = csv_counts(Path(download.value.path()).read_text())
        assert header == ["SeriesDescription", "series"] and counts == expected
        assert watched.dialogs == [] and watched.errors == [], watched.errors
    finally:
        watched.close()


def test_in_a_browser_a_restricted_user_sees_only_her_counts(
        node: Any, corpus: dict[str, Any], browser: Any) -> None:
    watched = Watched(browser, "carol")
    page = watched.page
    try:
        page.goto(root(node) + "/query?level=series&group=Modality")
        assert page.is_visible("#restricted")
        rows = page.eval_on_selector_all(
            "#counts tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.innerText))")
        assert rows == [["MR", "2"]]
        assert "CT" not in page.inner_text("#counts")
        assert watched.dialogs == [] and watched.errors == [], watched.errors
    finally:
        watched.close()

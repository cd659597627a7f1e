"""The web console (archive.web.console) over HTTP: the node started as ``archive
serve`` with the real FerretDB, pages fetched with ``requests`` and read as HTML,
QIDO-RS (itself checked against C-FIND in test_dicomweb.py) as the reference for
what a search finds.  The same pages in a browser: test_console_browser.py.

Users in a file (bcrypt): ``admin`` may do everything (administer and delete included),
``alice`` query and retrieve patients ``ALICE-*`` only, ``carol`` MR series only, and
delete them (one study holds both a CT and an MR series), ``dora`` store, query and
delete MR series only (so reject them: her Store rule admits a rejection note, carol's
does not), ``bob`` nothing; anonymous nothing (asked to log in).
"""

from __future__ import annotations

import datetime
import html
import json
import re
import time
from typing import Any
from urllib.parse import urlencode

import helpers
import pytest
import requests
from acl_clients import archive_cli, find_as, node_with_users
from helpers import image_dataset, to_part10
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

PASSWORDS = {"admin": "admin-secret", "alice": "alice-secret", "bob": "bob-secret",
             "carol": "carol-secret", "dora": "dora-secret"}
RULES = """
rules:
  - {principal: "*", service: Echo}
  - {principal: admin, service: "*"}
  - {principal: alice, service: Query, pattern: {PatientID: "ALICE-*"}}
  - {principal: alice, service: Retrieve, pattern: {PatientID: "ALICE-*"}}
  - {principal: carol, service: "*", pattern: {Modality: MR}}
  - {principal: admin, service: Admin}
  - {principal: admin, service: Delete}
  - {principal: carol, service: Delete, pattern: {Modality: MR}}
  - {principal: dora, service: Store}
  - {principal: dora, service: Query}
  - {principal: dora, service: Delete, pattern: {Modality: MR}}
"""
VIEWER = "http://viewer.example/viewer?StudyInstanceUIDs={StudyInstanceUID}"
XSS_NAME = "<script>alert(1)</script>"
XSS_DESCRIPTION = '<img src=x onerror="alert(2)">'
XSS_PRIVATE = "</li><script>alert(3)</script>"


@pytest.fixture(scope="module")
def node(module_node_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return start_node(module_node_factory, tmp_path_factory)


def start_node(module_node_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The node of these tests (and of test_console_browser.py)."""
    return node_with_users(module_node_factory, tmp_path_factory.mktemp("console-users"),
                           PASSWORDS, RULES, {
                               "auth": {"throttle": {"user_failures": 1000,
                                                     "peer_failures": 1000}},
                               "http": {"viewer_url": VIEWER}})


def stow(node: Any, files: list[bytes]) -> None:
    answer = helpers.stow(node, files, auth=auth("admin"), Accept="application/dicom+json")
    assert answer.status_code == 200, answer.text


def with_private_and_sequence(ds: Dataset) -> Dataset:
    """A private block pydicom's dictionary names (Siemens CSA), an unknown one holding
    markup, and a sequence of two items."""
    ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    ds.add_new(0x00291010, "OB", b"CSA\0")
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x00091001, "LO", XSS_PRIVATE)
    first, second = Dataset(), Dataset()
    first.CodeValue, first.CodingSchemeDesignator, first.CodeMeaning = "T-A0100", "SRT", "Brain"
    second.CodeValue, second.CodingSchemeDesignator, second.CodeMeaning = "T-D3000", "SRT", \
        "Chest"
    ds.AnatomicRegionSequence = [first, second]
    return ds


@pytest.fixture(scope="module")
def corpus(node: Any) -> dict[str, Any]:
    return store_corpus(node)


def store_corpus(node: Any) -> dict[str, Any]:
    """ALICE-1: a CT study of two series (two instances, one); BOB-1: an MR study
    (two instances); ALICE-XSS: a study whose name and description are markup; MIXED-1:
    a CT series and an MR series, one instance each."""
    alice, bob, xss, mixed = generate_uid(), generate_uid(), generate_uid(), generate_uid()
    alice_series, bob_series, xss_series = [generate_uid(), generate_uid()], generate_uid(), \
        generate_uid()
    files: dict[str, bytes] = {}
    datasets = []
    for n, (series, number) in enumerate([(alice_series[0], 1), (alice_series[0], 1),
                                          (alice_series[1], 2)]):
        datasets.append(image_dataset(
            patient_id="ALICE-1", patient_name="ALICE^ANNA", study_uid=alice, series_uid=series,
            InstanceNumber=2 - n if number == 1 else 1, SeriesNumber=number,
            StudyDescription="Alice head", SeriesDescription=f"Axial {number}",
            AccessionNumber="ACC-A1"))
    with_private_and_sequence(datasets[0])
    for n in range(2):
        datasets.append(image_dataset(
            patient_id="BOB-1", patient_name="BOB^BERT", study_uid=bob, series_uid=bob_series,
            InstanceNumber=n + 1, modality="MR", StudyDescription="Bob knee",
            StudyDate="20230505", AccessionNumber="ACC-B1"))
    datasets.append(image_dataset(
        patient_id="ALICE-XSS", patient_name=XSS_NAME, study_uid=xss, series_uid=xss_series,
        StudyDescription=XSS_DESCRIPTION, SeriesDescription=XSS_DESCRIPTION))
    mixed_series = [generate_uid(), generate_uid()]
    for n, modality in enumerate(("CT", "MR")):
        datasets.append(image_dataset(
            patient_id="MIXED-1", patient_name="MIXED^MAX", study_uid=mixed,
            series_uid=mixed_series[n], SeriesNumber=n + 1, modality=modality,
            StudyDescription="Mixed", SeriesDescription=f"{modality} series"))
    for ds in datasets:
        files[str(ds.SOPInstanceUID)] = to_part10(ds)
    stow(node, list(files.values()))
    return {"files": files, "alice": alice, "bob": bob, "xss": xss, "mixed": mixed,
            "mixed_series": mixed_series,
            "alice_series": alice_series, "bob_series": bob_series, "xss_series": xss_series,
            "alice_first": str(datasets[0].SOPInstanceUID),
            "bob_first": str(datasets[3].SOPInstanceUID)}


def auth(user: str) -> tuple[str, str]:
    return (user, PASSWORDS[user])


def root(node: Any) -> str:
    return f"http://127.0.0.1:{node.http_port}"


def get(node: Any, path: str, user: str | None = "admin", **params: Any) -> requests.Response:
    return requests.get(root(node) + path, params=params, timeout=60,
                        auth=auth(user) if user else None)


def linked_studies(page: str) -> set[str]:
    return set(re.findall(r'href="/studies/([^"/?]+)"', page))


def qido_studies(node: Any, user: str, **keys: str) -> set[str]:
    answer = requests.get(f"{node.http_url}/studies", params=keys, auth=auth(user), timeout=30)
    assert answer.status_code == 200, answer.text
    return {a["0020000D"]["Value"][0] for a in answer.json()}


# --- who may see the console ----------------------------------------------------------


def test_anonymous_is_asked_to_log_in(node: Any, corpus: dict[str, Any]) -> None:
    answer = get(node, "/", user=None)
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"].startswith("Basic ")
    assert "text/html" in answer.headers["content-type"]
    assert corpus["alice"] not in answer.text
    wrong = requests.get(root(node) + "/", auth=("admin", "wrong"), timeout=30)
    assert wrong.status_code == 401 and "Basic" in wrong.headers["www-authenticate"]


def test_log_in_asks_for_the_login_then_goes_to_the_search(node: Any) -> None:
    asked = get(node, "/login", user=None)
    assert asked.status_code == 401 and asked.headers["www-authenticate"].startswith("Basic ")
    answer = requests.get(root(node) + "/login", auth=auth("alice"), timeout=30,
                          allow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/"


def test_a_user_without_query_rule_is_refused(node: Any, corpus: dict[str, Any]) -> None:
    answer = get(node, "/", user="bob")
    assert answer.status_code == 403
    assert "no Query rule for bob" in answer.text
    assert get(node, "/dashboard", user="bob").status_code == 403
    assert get(node, f"/studies/{corpus['alice']}", user="bob").status_code == 403


# --- search ---------------------------------------------------------------------------


@pytest.mark.parametrize("form,keys", [
    ({}, {}),
    ({"PatientName": "alice*"}, {"PatientName": "alice*"}),
    ({"PatientID": "BOB-1"}, {"PatientID": "BOB-1"}),
    ({"StudyDateFrom": "2024-01-01", "StudyDateTo": "2024-01-31"},
     {"StudyDate": "20240101-20240131"}),
    ({"StudyDateTo": "2023-12-31"}, {"StudyDate": "-20231231"}),
    ({"AccessionNumber": "ACC-A1"}, {"AccessionNumber": "ACC-A1"}),
    ({"ModalitiesInStudy": "MR"}, {"ModalitiesInStudy": "MR"}),
    ({"StudyDescription": "*knee"}, {"StudyDescription": "*knee"}),
])
def test_search_finds_what_qido_rs_finds(node: Any, corpus: dict[str, Any],
                                         form: dict[str, str], keys: dict[str, str]) -> None:
    answer = get(node, "/", **form)
    assert answer.status_code == 200, answer.text
    found = linked_studies(answer.text)
    assert found == qido_studies(node, "admin", **keys)
    assert found, "the corpus matches"
    for value in form.values():  # the form shows what was asked
        assert f'value="{html.escape(value)}"' in answer.text


def test_search_pages(node: Any, corpus: dict[str, Any]) -> None:
    first = get(node, "/", limit=3)
    second = get(node, "/", limit=3, page=2)
    assert 'rel="next" href="?limit=3&amp;page=2"' in first.text
    assert 'rel="prev"' in second.text and 'rel="next"' not in second.text
    one, two = linked_studies(first.text), linked_studies(second.text)
    assert len(one) == 3 and len(two) == 1 and not one & two
    assert one | two == {corpus["alice"], corpus["bob"], corpus["xss"], corpus["mixed"]}


def test_a_bad_search_is_told_on_the_form(node: Any, corpus: dict[str, Any]) -> None:
    answer = get(node, "/", StudyDateFrom="2024-13-01")
    assert answer.status_code == 400
    assert "StudyDate" in answer.text and 'value="2024-13-01"' in answer.text
    assert get(node, "/", page="x").status_code == 400
    assert get(node, "/", limit="100000").status_code == 400
    assert get(node, "/studies/1.2.*").status_code == 400
    assert get(node, "/").status_code == 200  # and the console keeps serving


# --- study, series, instance ----------------------------------------------------------


def test_study_page_lists_its_series_with_thumbnails(node: Any, corpus: dict[str, Any]
                                                     ) -> None:
    study = corpus["alice"]
    answer = get(node, f"/studies/{study}")
    assert answer.status_code == 200
    page = answer.text
    assert "ALICE^ANNA" in page and "Alice head" in page and "ACC-A1" in page
    thumbnails = re.findall(r'<img class="thumb" src="([^"]+)"', page)
    assert thumbnails == [f"/studies/{study}/series/{s}/thumbnail"
                          for s in corpus["alice_series"]]  # by Series Number
    image = requests.get(root(node) + thumbnails[0], auth=auth("admin"), timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content == requests.get(  # WADO-RS's thumbnail
        node.http_url + thumbnails[0], auth=auth("admin"), timeout=30).content
    # without the login (a browser sends it unasked only below the path that asked for
    # it): 401, for the browser to send it, where DICOMweb answers anonymous 403
    anonymous = requests.get(root(node) + thumbnails[0], timeout=30)
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Basic ")
    hidden = f"/studies/{corpus['bob']}/series/{corpus['bob_series']}/thumbnail"
    assert get(node, hidden, user="alice").status_code == 404
    assert html.escape(VIEWER.replace("{StudyInstanceUID}", study)) in page


def test_series_page_lists_instances_by_number(node: Any, corpus: dict[str, Any]) -> None:
    study, series = corpus["alice"], corpus["alice_series"][0]
    answer = get(node, f"/studies/{study}/series/{series}")
    assert answer.status_code == 200
    listed = re.findall(rf'href="/studies/{study}/series/{series}/instances/([^"/]+)">\d+</a>',
                        answer.text)
    # stored as instance numbers 2 then 1: listed as 1, 2
    assert listed == [s for s in reversed([s for s in corpus["files"]][:2])]
    assert "CT Image Storage" in answer.text


def test_instance_page_shows_the_dicom_tree(node: Any, corpus: dict[str, Any]) -> None:
    study, series, sop = corpus["alice"], corpus["alice_series"][0], corpus["alice_first"]
    answer = get(node, f"/studies/{study}/series/{series}/instances/{sop}")
    assert answer.status_code == 200
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", answer.text))
    assert "(0010,0010) PatientName PN ALICE^ANNA" in text
    assert "(0028,0010) Rows US 64" in text
    assert "(7FE0,0010) PixelData OW (binary data, retrieved apart)" in text
    # private attributes: named from pydicom's private dictionary by their creator
    assert "(0029,0010) Private Creator LO SIEMENS CSA HEADER" in text
    assert "(0029,1010) CSA Image Header Info OB (binary, 4 bytes) [SIEMENS CSA HEADER]" in text
    assert "(0009,1001) (private, unknown) LO" in text
    # a sequence and its items, nested
    assert "(0008,2218) AnatomicRegionSequence SQ 2 items" in text
    assert re.search(r"Item 1 .*\(0008,0100\) CodeValue SH T-A0100.*Item 2 .*Chest", text)
    assert answer.text.count('<details open class="item">') == 2
    size = len(corpus["files"][sop])
    assert re.search(rf"File size</th><td>{size / 1000:.1f} KB<", answer.text)
    elements = re.search(r"\((\d+) elements; private ones shaded\)", text)
    assert elements is not None
    assert int(elements.group(1)) == answer.text.count('<span class="tag">')
    # markup in a value is text
    assert html.escape(XSS_PRIVATE, quote=False) in answer.text
    assert XSS_PRIVATE not in answer.text


def test_download_is_the_original_file(node: Any, corpus: dict[str, Any]) -> None:
    study, series, sop = corpus["alice"], corpus["alice_series"][0], corpus["alice_first"]
    answer = get(node, f"/studies/{study}/series/{series}/instances/{sop}/file")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/dicom"
    assert answer.headers["content-disposition"] == f'attachment; filename="{sop}.dcm"'
    assert answer.content == corpus["files"][sop]


# --- what a restricted user sees ------------------------------------------------------


def test_a_restricted_user_sees_only_her_studies(node: Any, corpus: dict[str, Any]) -> None:
    answer = get(node, "/", user="alice")
    assert answer.status_code == 200
    assert linked_studies(answer.text) == {corpus["alice"], corpus["xss"]} \
        == qido_studies(node, "alice")
    assert "BOB" not in answer.text
    # the MR study is not found, neither is its patient
    assert linked_studies(get(node, "/", user="alice", ModalitiesInStudy="MR").text) == set()


def test_hidden_is_answered_as_nonexistent(node: Any, corpus: dict[str, Any]) -> None:
    bob, series, sop = corpus["bob"], corpus["bob_series"], corpus["bob_first"]
    unknown = generate_uid()
    for path, absent in [
        (f"/studies/{bob}", f"/studies/{unknown}"),
        (f"/studies/{bob}/series/{series}", f"/studies/{bob}/series/{unknown}"),
        (f"/studies/{bob}/series/{series}/instances/{sop}",
         f"/studies/{bob}/series/{series}/instances/{unknown}"),
        (f"/studies/{bob}/series/{series}/instances/{sop}/file",
         f"/studies/{bob}/series/{series}/instances/{unknown}/file"),
    ]:
        hidden, missing = get(node, path, user="alice"), get(node, absent, user="alice")
        assert hidden.status_code == missing.status_code == 404, path
        assert hidden.text == missing.text
        assert "BOB" not in hidden.text
        assert get(node, path, user="admin").status_code == 200, path


def dashboard_totals(page: str) -> dict[str, int]:
    return {name: int(value) for name, value in
            re.findall(r'<b id="total-(patients|studies|series|instances)">(\d+)</b>', page)}


def test_dashboard_counts_what_the_user_may_see(node: Any, corpus: dict[str, Any]) -> None:
    admin = get(node, "/dashboard")
    assert admin.status_code == 200
    assert dashboard_totals(admin.text) == {"patients": 4, "studies": 4, "series": 6,
                                            "instances": 8}
    charts = re.search(r'<script type="application/json" id="chart-data">(.*?)</script>',
                       admin.text, re.S)
    assert charts is not None
    assert '"labels": ["CT", "MR"], "values": [5, 3]' in charts.group(1)
    assert '"labels": ["STOW-RS"], "values": [8]' in charts.group(1)
    assert "chart.umd.min.js" in admin.text  # the vendored library, served here:
    script = get(node, "/assets/vendor/chart.js-4.6.1/chart.umd.min.js", user=None)
    assert script.status_code == 200 and "Chart.js v4.6.1" in script.text

    alice = get(node, "/dashboard", user="alice")
    assert dashboard_totals(alice.text) == c_find_totals(node, "alice") == {
        "patients": 2, "studies": 2, "series": 3, "instances": 4}
    assert "MR" not in alice.text and "Counted over what your Query rules" in alice.text
    sizes = [len(data) for sop, data in corpus["files"].items()]
    assert f'title="{sum(sizes[:3]) + sizes[5]} bytes"' in alice.text


def c_find_totals(node: Any, user: str) -> dict[str, int]:
    """What the user's QIDO-RS (C-FIND) study answers and their counts add up to."""
    studies = requests.get(f"{node.http_url}/studies", auth=auth(user), timeout=30).json()
    return {"patients": len({s["00100020"]["Value"][0] for s in studies}),
            "studies": len(studies),
            "series": sum(s["00201206"]["Value"][0] for s in studies),
            "instances": sum(s["00201208"]["Value"][0] for s in studies)}


def test_a_study_partly_visible_shows_only_its_visible_part(node: Any,
                                                            corpus: dict[str, Any]) -> None:
    """carol sees MR only: of the mixed study, its MR series, in lists and counts."""
    search = get(node, "/", user="carol")
    assert linked_studies(search.text) == {corpus["bob"], corpus["mixed"]}
    row = re.search(rf'<a href="/studies/{corpus["mixed"]}">MIXED\^MAX</a>.*?</tr>',
                    search.text, re.S)
    assert row is not None
    assert re.findall(r"<td>([^<]*)</td>", row.group(0))[2] == "MR"  # ModalitiesInStudy
    assert re.findall(r'<td class="n">(\d+)</td>', row.group(0)) == ["1", "1"]
    study = get(node, f"/studies/{corpus['mixed']}", user="carol")
    assert "MR series" in study.text and "CT series" not in study.text
    assert f"/series/{corpus['mixed_series'][0]}" not in study.text
    assert get(node, f"/studies/{corpus['mixed']}/series/{corpus['mixed_series'][0]}",
               user="carol").status_code == 404
    dashboard = get(node, "/dashboard", user="carol")
    assert dashboard_totals(dashboard.text) == c_find_totals(node, "carol") == {
        "patients": 2, "studies": 2, "series": 2, "instances": 3}
    assert '"labels": ["MR"], "values": [3]' in dashboard.text
    assert '"labels": ["CT Image Storage"], "values": [3]' in dashboard.text  # the test
    # images' SOP class, MR ones included: 3, not the archive's 8


# --- escaping -------------------------------------------------------------------------


def test_markup_in_the_data_is_shown_as_text(node: Any, corpus: dict[str, Any]) -> None:
    for path in ("/", f"/studies/{corpus['xss']}",
                 f"/studies/{corpus['xss']}/series/{corpus['xss_series']}"):
        answer = get(node, path)
        assert answer.status_code == 200
        assert XSS_NAME not in answer.text and "<img src=x" not in answer.text
        assert html.escape(XSS_NAME, quote=False) in answer.text or \
            html.escape(XSS_DESCRIPTION, quote=False) in answer.text
        policy = answer.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    search = get(node, "/", PatientName=XSS_NAME)  # a value typed in the form, echoed
    assert linked_studies(search.text) == {corpus["xss"]}
    assert 'value="&lt;script&gt;alert(1)&lt;/script&gt;"' in search.text


def test_the_console_can_be_switched_off(node_factory: Any) -> None:
    off = node_factory.start({"http": {"console": False}})
    assert requests.get(f"http://127.0.0.1:{off.http_port}/", timeout=30).status_code == 404
    assert requests.get(f"{off.http_url}/studies", timeout=30).status_code == 200
    assert "(web console off)" in off.log()


# --- administration: rules, audit trail, recent activity, deleting -----------------------


def table(page: str, table_id: str) -> list[list[str]]:
    """The cells of a table's body rows, as text."""
    found = re.search(rf'<table[^>]* id="{table_id}">.*?<tbody>(.*?)</tbody>', page, re.S)
    assert found is not None, f"no table {table_id}"
    return [[html.unescape(re.sub(r"<[^>]+>", "", cell)).strip()
             for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", found.group(1), re.S)]


def audit_rows(node: Any, wanted: int = 1, **params: Any) -> list[list[str]]:
    """The audit page's rows (its writer batches: polled until ``wanted`` rows show)."""
    for _ in range(50):
        answer = get(node, "/audit?" + urlencode(params))  # "user" is the login of get
        assert answer.status_code == 200, answer.text
        rows = table(answer.text, "entries") if 'id="entries"' in answer.text else []
        if len(rows) >= wanted:
            return rows
        time.sleep(0.1)
    return rows


def test_only_an_administrator_sees_the_rules_and_the_audit_trail(
        node: Any, corpus: dict[str, Any]) -> None:
    """The Admin rule, named: the "*" rules of alice and carol do not give it."""
    for user in ("alice", "bob", "carol"):
        for path in ("/rules", f"/rules?study={corpus['alice']}", "/audit",
                     "/audit?user=admin"):
            answer = get(node, path, user=user)
            assert answer.status_code == 403, (user, path)
            assert f"no Admin rule for {user}" in answer.text
            assert "ALICE-*" not in answer.text and "C-FIND" not in answer.text
        if user != "bob":
            assert 'href="/rules"' not in get(node, "/", user=user).text  # not in the menu
    anonymous = get(node, "/rules", user=None)
    assert anonymous.status_code == 401 and "Basic" in anonymous.headers["www-authenticate"]
    assert 'href="/rules"' in get(node, "/").text and 'href="/audit"' in get(node, "/").text
    rules = get(node, "/rules")
    assert rules.status_code == 200
    assert [row[:4] for row in table(rules.text, "rules")] == [
        ["1", "*", "Echo", "any dataset"], ["2", "admin", "*", "any dataset"],
        ["3", "alice", "Query", "PatientID=ALICE-*"],
        ["4", "alice", "Retrieve", "PatientID=ALICE-*"],
        ["5", "carol", "*", "Modality=MR"], ["6", "admin", "Admin", "any dataset"],
        ["7", "admin", "Delete", "any dataset"], ["8", "carol", "Delete", "Modality=MR"],
        ["9", "dora", "Store", "any dataset"], ["10", "dora", "Query", "any dataset"],
        ["11", "dora", "Delete", "Modality=MR"]]


def test_the_rules_page_says_who_may_do_what_to_a_study(node: Any,
                                                        corpus: dict[str, Any]) -> None:
    """The mixed study (a CT and an MR instance), judged instance by instance as
    ``archive acl check`` judges a file."""
    answer = get(node, f"/rules?study={corpus['mixed']}&user=bob")
    assert answer.status_code == 200
    assert "2 instances in 2 series, patient MIXED-1" in answer.text
    cells = {row[0]: row[1:] for row in table(answer.text, "check")}
    services = ["Query", "Retrieve", "Store", "Delete", "Modify"]
    verdicts = {who: dict(zip(services, row, strict=True)) for who, row in cells.items()}
    assert list(verdicts) == ["admin", "alice", "bob", "carol", "dora", "anonymous",
                              "any other user"]
    assert verdicts["admin"] == {"Query": "yes (rule 2)", "Retrieve": "yes (rule 2)",
                                 "Store": "yes (rule 2)", "Delete": "yes (rule 7)",
                                 "Modify": "no"}
    assert verdicts["carol"] == {"Query": "1 of 2 (rule 5)", "Retrieve": "1 of 2 (rule 5)",
                                 "Store": "1 of 2 (rule 5)", "Delete": "1 of 2 (rule 8)",
                                 "Modify": "no"}
    for who in ("alice", "bob", "anonymous", "any other user"):
        assert set(verdicts[who].values()) == {"no"}, who
    alice = {row[0]: row[1:] for row in table(
        get(node, "/rules", study=corpus["alice"]).text, "check")}["alice"]
    assert alice[:3] == ["yes (rule 3)", "yes (rule 4)", "no"]
    missing = get(node, "/rules", study=generate_uid())
    assert missing.status_code == 404 and "no such study" in missing.text
    assert get(node, "/rules", study="1.2.*").status_code == 400


def test_the_audit_trail_is_searched_by_user_operation_time_and_failures(
        node: Any, corpus: dict[str, Any]) -> None:
    since = datetime.datetime.now(datetime.timezone.utc).isoformat()
    assert get(node, "/", user="bob").status_code == 403
    assert get(node, "/audit", user="alice").status_code == 403
    assert get(node, "/", user="alice").status_code == 200
    bob = audit_rows(node, user="bob", since=since)
    assert bob and {row[1] for row in bob} == {"bob"}
    assert bob[0][3:7] == ["CONSOLE", "Query", "DENIED", "0x0124 (HTTP 403)"]
    alice = audit_rows(node, 2, user="alice", since=since, event="CONSOLE")
    assert {(row[4], row[5]) for row in alice} == {("Admin", "DENIED"),
                                                   ("Query", "allowed (restricted)")}
    failures = audit_rows(node, user="alice", since=since, failures="1")
    assert [(row[4], row[10]) for row in failures] == [
        ("Admin", "not authorized: no Admin rule for alice")]
    assert audit_rows(node, 0, user="alice", until="2000-01-01") == []
    assert audit_rows(node, 0, user="*", since=since) == []  # a name, not a wild card
    # newest first, a page at a time: no entry twice, none left out (entries before
    # this test: each page read is an entry too)
    first = audit_rows(node, limit=3, until=since)
    second = audit_rows(node, limit=3, page=2, until=since)
    both = audit_rows(node, limit=6, until=since)
    assert len(first) == len(second) == 3 and first + second == both
    assert [row[0] for row in both] == sorted((row[0] for row in both), reverse=True)
    for bad in ({"since": "yesterday"}, {"event": "C-NOPE"}, {"page": "0"},
                {"limit": "9999"}):
        answer = get(node, "/audit?" + urlencode(bad))
        assert answer.status_code == 400, bad
    assert "to: &#39;soon&#39; is neither a date/time" in get(node, "/audit", until="soon").text


def test_the_dashboard_charts_weeks_growth_and_recent_activity(
        node: Any, corpus: dict[str, Any]) -> None:
    assert get(node, "/", user="bob").status_code == 403  # a failure, bob's
    assert get(node, "/rules", user="alice").status_code == 403  # and one of alice
    time.sleep(0.5)  # the audit writer's batch
    for user in ("admin", "alice"):
        page = get(node, "/dashboard", user=user).text
        charts = json.loads(html.unescape(re.search(
            r'<script type="application/json" id="chart-data">(.*?)</script>', page,
            re.S).group(1)))  # type: ignore[union-attr]
        totals = dashboard_totals(page)
        stored = int(re.search(r'title="(\d+) bytes"', page).group(1))  # type: ignore[union-attr]
        assert sum(charts["weeks"]["values"]) == sum(charts["days"]["values"]) == \
            totals["instances"]
        assert charts["growth"]["values"][-1] == stored
        assert charts["growth"]["values"] == sorted(charts["growth"]["values"])
        failures = table(page, "recent-failures")
        who = {row[1] for row in failures}
        if user == "admin":
            assert "everyone&#39;s" in page and {"alice", "bob"} <= who
        else:  # her own only: what others did is not hers to read
            assert "yours only" in page and who == {"alice"}
            assert "bob" not in page


def store_deletable(node: Any, patient: str = "DEL-1", cts: int = 1) -> dict[str, Any]:
    """Patient DEL-1: a study of a CT series (one instance each; ``cts`` of them) and an
    MR series (two)."""
    study, mr = generate_uid(), generate_uid()
    ct = [generate_uid() for _ in range(cts)]
    series = [*((uid, "CT", n + 1, 1) for n, uid in enumerate(ct)), (mr, "MR", cts + 1, 2)]
    datasets = [image_dataset(patient_id=patient, patient_name="DELETE^ME", study_uid=study,
                              series_uid=uid, modality=modality, SeriesNumber=n,
                              InstanceNumber=i, StudyDescription="To delete")
                for uid, modality, n, count in series for i in range(1, count + 1)]
    stow(node, [to_part10(ds) for ds in datasets])
    return {"study": study, "ct": ct[0], "cts": ct, "mr": mr,
            "sops": {uid: [str(ds.SOPInstanceUID) for ds in datasets
                           if ds.SeriesInstanceUID == uid] for uid, *_ in series}}


def post(node: Any, path: str, user: str = "admin", origin: str | None = "own",
         form: dict[str, str] | None = None, **headers: str) -> requests.Response:
    """The confirmation's form POST, from this site's page unless ``origin`` says."""
    if origin is not None:
        headers["Origin"] = root(node) if origin == "own" else origin
    return requests.post(root(node) + path, auth=auth(user), headers=headers, timeout=60,
                         data=form, allow_redirects=False)


def test_deleting_takes_a_delete_rule_and_a_confirmation_from_this_site(
        node: Any, corpus: dict[str, Any]) -> None:
    d = store_deletable(node)
    study = f"/studies/{d['study']}"
    assert f'id="delete" href="{study}/delete"' in get(node, study).text
    assert 'id="delete"' not in get(node, f"/studies/{corpus['alice']}", user="alice").text
    for user in ("alice", "bob"):  # no Delete rule: refused, whatever the study
        assert get(node, f"{study}/delete", user=user).status_code == 403
        assert post(node, f"{study}/delete", user=user).status_code == 403
    confirm = get(node, f"{study}/delete")
    assert confirm.status_code == 200
    assert confirm.headers["referrer-policy"] == "same-origin"  # the form's Origin is sent
    assert "Deletes <b>3</b> instances in 2 series of this study" in confirm.text
    assert "DELETE^ME" in confirm.text and f'action="{study}/delete"' in confirm.text
    # a forged form of another site: the browser sends the login, the archive refuses
    for origin, extra in ((None, {}), ("http://evil.example", {}), ("null", {}),
                          ("own", {"Sec-Fetch-Site": "cross-site"}),
                          ("own", {"Sec-Fetch-Site": "same-site"}),
                          ("own", {"Sec-Fetch-Site": "none"})):
        refused = post(node, f"{study}/delete", origin=origin, **extra)
        assert refused.status_code == 403 and "cross-site" in refused.text, origin
    assert qido_studies(node, "admin", PatientID="DEL-1") == {d["study"]}

    # carol deletes what her Delete rules match: the MR series, not the CT one
    assert 'id="delete"' in get(node, study, user="carol").text
    assert "Deletes <b>2</b> instances in 1 series" in get(node, f"{study}/delete",
                                                            user="carol").text
    deleted = post(node, f"{study}/delete", user="carol", **{"Sec-Fetch-Site": "same-origin"})
    assert deleted.status_code == 200
    assert "Deleted 2 instances (1 series, 1 study)" in deleted.text
    assert get(node, study, user="carol").status_code == 404
    assert get(node, f"{study}/delete", user="carol").status_code == 404  # as nonexistent
    remaining = get(node, study)
    assert "CT" in remaining.text and d["mr"] not in remaining.text

    series = f"{study}/series/{d['ct']}"
    assert 'id="delete"' in get(node, series).text
    assert post(node, f"{series}/delete").status_code == 200
    assert get(node, study).status_code == 404
    assert qido_studies(node, "admin", PatientID="DEL-1") == set()
    assert post(node, f"{series}/delete").status_code == 404
    rows = audit_rows(node, event="DELETE", user="carol")
    assert "instances=2" in rows[0][9] and f"POST {study}/delete" in rows[0][8]


def rejected_rows(node: Any, user: str = "admin", **keys: str) -> list[list[str]]:
    answer = get(node, "/rejected", user=user, **keys)
    assert answer.status_code == 200, answer.text
    return table(answer.text, "rejected") if 'id="rejected"' in answer.text else []


def study_counts(node: Any, study: str) -> tuple[int, int]:
    """(series, instances) of the study, as C-FIND answers the administrator."""
    found = helpers_find(node, study)
    return (int(found[0].NumberOfStudyRelatedSeries),
            int(found[0].NumberOfStudyRelatedInstances)) if found else (0, 0)


def helpers_find(node: Any, study: str) -> list[Dataset]:
    return find_as(node, "STUDY", "admin", PASSWORDS["admin"], StudyInstanceUID=study,
                   NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="")


def qido_series(node: Any, study: str) -> set[str]:
    answer = requests.get(f"{node.http_url}/studies/{study}/series", auth=auth("admin"),
                          timeout=30)
    assert answer.status_code in (200, 204), answer.text
    return {a["0020000E"]["Value"][0] for a in answer.json()} if answer.content else set()


def test_rejecting_takes_store_and_delete_rules_a_reason_and_this_site(
        node: Any, corpus: dict[str, Any]) -> None:
    d = store_deletable(node, "REJ-1", cts=2)
    study, ct, mr = (f"/studies/{d['study']}", *(f"/studies/{d['study']}/series/{s}"
                                                 for s in (d["ct"], d["mr"])))
    # who sees the button: Store and Delete rules matching something there
    assert f'id="reject" href="{study}/reject"' in get(node, study).text
    assert f'id="reject" href="{mr}/reject"' in get(node, mr, user="dora").text
    assert 'id="reject"' not in get(node, ct, user="dora").text  # her Delete: MR only
    assert get(node, f"{ct}/reject", user="dora").status_code == 404  # as nonexistent
    assert 'id="reject"' not in get(node, study, user="carol").text  # Store: MR only
    assert 'id="reject"' not in get(node, f"/studies/{corpus['alice']}", user="alice").text
    for user in ("alice", "bob"):  # no Delete rule: refused, whatever the study
        assert get(node, f"{study}/reject", user=user).status_code == 403
        assert post(node, f"{study}/reject", user=user,
                    form={"code": "113001"}).status_code == 403
    # a forged form of another site, a missing reason, a note carol may not store
    for origin, extra in ((None, {}), ("http://evil.example", {}),
                          ("own", {"Sec-Fetch-Site": "cross-site"})):
        refused = post(node, f"{study}/reject", origin=origin, form={"code": "113001"},
                       **extra)
        assert refused.status_code == 403 and "cross-site" in refused.text, origin
    assert post(node, f"{study}/reject").status_code == 400
    assert post(node, f"{study}/reject", form={"code": "1" * 9000}).status_code == 413
    carol = post(node, f"{study}/reject", user="carol", form={"code": "113001"})
    assert carol.status_code == 403
    assert "refused: 0x0124 not authorized: dataset outside the Store rules" in carol.text
    assert study_counts(node, d["study"]) == (3, 4)

    # dora rejects the study: her note names her instances (the MR series) only
    confirm = get(node, f"{study}/reject", user="dora")
    assert confirm.status_code == 200 and confirm.headers["referrer-policy"] == "same-origin"
    assert "Hides <b>2</b> instances in 1 series of this study" in confirm.text
    assert all(f'value="{code}"' in confirm.text
               for code in ("113001", "113037", "113038", "113039"))
    done = post(node, f"{study}/reject", user="dora", form={"code": "113037"})
    assert done.status_code == 200, done.text
    assert "Rejected 2 instances (1 series): Rejected for Patient Safety Reasons" in done.text
    note = re.search(r'id="note">([0-9.]+)<', done.text).group(1)  # type: ignore[union-attr]
    rows = rejected_rows(node, StudyInstanceUID=d["study"])
    assert sorted(r[3] for r in rows) == sorted(d["sops"][d["mr"]])
    assert {(r[4], r[6], r[7]) for r in rows} == {
        ("113037 Rejected for Patient Safety Reasons", "dora", note)}
    # the administrator rejects one CT series
    assert "Hides <b>1</b> instance in 1 series" in get(node, f"{ct}/reject").text
    done = post(node, f"{ct}/reject", form={"code": "113001"})
    assert "Rejected 1 instance (1 series): Rejected for Quality Reasons" in done.text
    page = get(node, study).text
    assert d["cts"][1] in page and d["ct"] not in page and d["mr"] not in page
    left = qido_series(node, d["study"])  # the CT series left and the two notes' series
    assert d["cts"][1] in left and not {d["ct"], d["mr"]} & left and len(left) == 3
    assert study_counts(node, d["study"]) == (3, 3)
    assert get(node, ct).status_code == 404 and get(node, f"{ct}/reject").status_code == 404
    rejects = audit_rows(node, 2, event="REJECT")
    assert {r[1] for r in rejects[:2]} == {"admin", "dora"}
    assert "instances=2" in next(r[9] for r in rejects if r[1] == "dora")


def test_the_rejected_page_lists_filters_and_purges(node: Any, corpus: dict[str, Any]
                                                    ) -> None:
    d = store_deletable(node, "REJ-2", cts=1)
    for series, code in ((d["mr"], "113039"), (d["ct"], "113001")):
        answer = post(node, f"/studies/{d['study']}/series/{series}/reject",
                      form={"code": code})
        assert answer.status_code == 200, answer.text
    assert 'id="nav-rejected"' in get(node, "/").text
    for user in ("dora", "carol", "bob"):  # no Admin rule
        assert get(node, "/rejected", user=user).status_code == 403
        assert get(node, "/rejected/purge", user=user).status_code == 403
        assert post(node, "/rejected/purge", user=user).status_code == 403
    rows = rejected_rows(node, PatientID="REJ-2")
    assert {(r[0], r[1], r[2], r[3], r[4], r[6]) for r in rows} == {
        *(("REJ-2", d["study"], d["mr"], sop, "113039 Data Retention Policy Expired", "admin")
          for sop in d["sops"][d["mr"]]),
        ("REJ-2", d["study"], d["ct"], d["sops"][d["ct"]][0],
         "113001 Rejected for Quality Reasons", "admin")}
    paged = [rejected_rows(node, PatientID="REJ-2", limit="2", page=str(n)) for n in (1, 2)]
    assert [len(p) for p in paged] == [2, 1] and paged[0] + paged[1] == rows
    assert rejected_rows(node, PatientID="NOBODY") == []
    assert get(node, "/rejected", StudyDate="yesterday").status_code == 400

    mr = {"SeriesInstanceUID": d["mr"]}
    confirm = get(node, "/rejected/purge", **mr)
    assert "Purges <b>2</b> rejected instances of 1 study" in confirm.text
    assert f'name="SeriesInstanceUID" value="{d["mr"]}"' in confirm.text
    refused = post(node, "/rejected/purge", origin="http://evil.example", form=mr)
    assert refused.status_code == 403 and "cross-site" in refused.text
    purged = post(node, "/rejected/purge", form=mr)
    assert purged.status_code == 200, purged.text
    assert "Purged 2 rejected instances (1 study)" in purged.text
    assert [r[2] for r in rejected_rows(node, PatientID="REJ-2")] == [d["ct"]]
    assert post(node, "/rejected/purge", form=mr).status_code == 404
    assert audit_rows(node, event="PURGE")[0][9] == "instances=2, studies=1"
    check = archive_cli(node, "check", "--grace", "0")
    assert check.returncode == 0, check.stdout + check.stderr

"""The web console (archive.web.console) over HTTP: the node started as ``archive
serve`` with the real FerretDB, pages fetched with ``requests`` and read as HTML,
QIDO-RS (itself checked against C-FIND in test_dicomweb.py) as the reference for
what a search finds.  The same pages in a browser: test_console_browser.py.

Users in a file (bcrypt): ``admin`` may do everything, ``alice`` query and retrieve
patients ``ALICE-*`` only, ``carol`` MR series only (one study holds both a CT and an MR
series), ``bob`` nothing; anonymous nothing (asked to log in).
"""

from __future__ import annotations

import html
import re
from typing import Any

import helpers
import pytest
import requests
from acl_clients import node_with_users
from helpers import image_dataset, to_part10
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

PASSWORDS = {"admin": "admin-secret", "alice": "alice-secret", "bob": "bob-secret",
             "carol": "carol-secret"}
RULES = """
rules:
  - {principal: "*", service: Echo}
  - {principal: admin, service: "*"}
  - {principal: alice, service: Query, pattern: {PatientID: "ALICE-*"}}
  - {principal: alice, service: Retrieve, pattern: {PatientID: "ALICE-*"}}
  - {principal: carol, service: "*", pattern: {Modality: MR}}
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

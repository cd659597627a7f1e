"""Correcting in the web console (archive.web.console.correcting) over HTTP, and once
in a browser: the node started as ``archive serve`` with the real FerretDB, pages read
as HTML, QIDO-RS and C-FIND as the reference for what is stored.

Users (those of test_console.py, rules of their own): ``admin`` may do everything,
Modify included (a rule without pattern); ``carol`` queries, and modifies MR series
only (a Modify rule with a pattern: no correcting in the console); ``bob`` only
queries.
"""

from __future__ import annotations

from typing import Any

import pytest
from acl_clients import find_as, node_with_users
from helpers import image_dataset, to_part10
from pydicom.uid import generate_uid
from test_console import PASSWORDS, audit_rows, get, qido_studies, root, stow, table
from test_console_browser import Watched, browser  # noqa: F401 - the browser fixture

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

RULES = """
rules:
  - {principal: "*", service: Echo}
  - {principal: admin, service: "*"}
  - {principal: admin, service: Admin}
  - {principal: admin, service: Modify}
  - {principal: carol, service: Query}
  - {principal: carol, service: Modify, pattern: {Modality: MR}}
  - {principal: bob, service: Query}
"""
#: What the form sends besides the corrections: the other fields as prefilled.
UNCHANGED = {"PatientID": "FIX-1", "PatientBirthDate": "1970-01-01", "PatientSex": "F",
             "AccessionNumber": "ACC-FIX", "ReferringPhysicianName": "",
             "StudyDate": "2024-01-02", "StudyTime": "101010"}


@pytest.fixture(scope="module")
def node(module_node_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return node_with_users(module_node_factory, tmp_path_factory.mktemp("modify-users"),
                           PASSWORDS, RULES, {"auth": {"throttle": {
                               "user_failures": 1000, "peer_failures": 1000}}})


def store_study(node: Any, patient_id: str = "FIX-1", name: str = "WRONG^NAME",
                count: int = 2) -> dict[str, str]:
    """One study of ``count`` CT instances in one series."""
    study, series = generate_uid(), generate_uid()
    stow(node, [to_part10(image_dataset(
        patient_id=patient_id, patient_name=name, study_uid=study, series_uid=series,
        InstanceNumber=n + 1, StudyDescription="Old description", SeriesDescription="Axial",
        PatientBirthDate="19700101", PatientSex="F", AccessionNumber="ACC-FIX",
        StudyDate="20240102", StudyTime="101010")) for n in range(count)])
    return {"study": study, "series": series, "path": f"/studies/{study}"}


def form_post(node: Any, path: str, user: str = "admin", origin: str | None = "own",
              headers: dict[str, str] | None = None, **fields: str) -> Any:
    """The form's POST (urlencoded), from this site's page unless ``origin`` says."""
    import requests

    sent = dict(headers or {})
    if origin is not None:
        sent["Origin"] = root(node) if origin == "own" else origin
    return requests.post(root(node) + path, data=fields, headers=sent, timeout=60,
                         auth=(user, PASSWORDS[user]), allow_redirects=False)


def study_values(node: Any, study: str) -> tuple[str, str]:
    """(PatientName, StudyDescription) as QIDO-RS and C-FIND answer them (the same)."""
    import requests

    answer = requests.get(f"{node.http_url}/studies", timeout=30,
                          params={"StudyInstanceUID": study, "includefield": "00081030"},
                          auth=("admin", PASSWORDS["admin"])).json()
    [qido] = answer
    [found] = find_as(node, "STUDY", "admin", PASSWORDS["admin"], StudyInstanceUID=study,
                      PatientName="", StudyDescription="")
    values = (qido["00100010"]["Value"][0]["Alphabetic"], qido["00081030"]["Value"][0])
    assert values == (str(found.PatientName), found.StudyDescription)
    return values


def test_an_administrator_corrects_a_study_after_a_review_and_restores_it(node: Any) -> None:
    s = store_study(node)
    page = get(node, s["path"])
    assert f'id="correct" href="{s["path"]}/correct"' in page.text
    assert 'id="history"' not in page.text  # nothing corrected yet
    form = get(node, f"{s['path']}/correct")
    assert form.status_code == 200 and form.headers["referrer-policy"] == "same-origin"
    assert 'value="WRONG^NAME"' in form.text and 'value="1970-01-01"' in form.text

    fields = {**UNCHANGED, "PatientName": "RIGHT^NAME", "StudyDescription": "Head CT",
              "reason": "name typed wrong at the desk"}
    review = form_post(node, f"{s['path']}/correct", step="review", **fields)
    assert review.status_code == 200, review.text
    assert "Corrects <b>2</b> instances in 1 series" in review.text
    assert table(review.text, "changes") == [["PatientName", "WRONG^NAME", "RIGHT^NAME"],
                                             ["StudyDescription", "Old description",
                                              "Head CT"]]
    assert study_values(node, s["study"]) == ("WRONG^NAME", "Old description")  # not yet

    done = form_post(node, f"{s['path']}/correct", step="apply", **fields)
    assert done.status_code == 200, done.text
    assert "Corrected 2 instances." in done.text
    assert study_values(node, s["study"]) == ("RIGHT^NAME", "Head CT")
    page = get(node, s["path"]).text
    assert 'id="patient-name">RIGHT^NAME<' in page and "<h1>Head CT</h1>" in page
    [row] = audit_rows(node, event="MODIFY", user="admin")
    assert "instances=2" in row[9]
    assert "PatientName=RIGHT^NAME" in row[8] and "name typed wrong" in row[8]

    assert f'id="history" href="{s["path"]}/history"' in page
    history = get(node, f"{s['path']}/history")
    [record] = table(history.text, "corrections")
    assert record[1:] == ["admin", "name typed wrong at the desk",
                          "PatientName was WRONG^NAME; StudyDescription was Old description",
                          "2"]
    confirm = get(node, f"{s['path']}/restore")
    assert "Makes <b>2</b> corrected instances in 1 series their originals" in confirm.text
    restored = form_post(node, f"{s['path']}/restore")
    assert restored.status_code == 200 and "Restored 2 instances." in restored.text
    assert study_values(node, s["study"]) == ("WRONG^NAME", "Old description")
    assert 'id="none"' in get(node, f"{s['path']}/history").text
    assert form_post(node, f"{s['path']}/restore").status_code == 404  # nothing left


def test_a_new_patient_id_is_reviewed_as_a_move_taking_that_patients_attributes(
        node: Any) -> None:
    store_study(node, patient_id="MOVE-TO", name="RIGHT^PATIENT", count=1)
    s = store_study(node, patient_id="MOVE-FROM", count=1)
    review = form_post(node, f"{s['path']}/correct", step="review",
                       **{**UNCHANGED, "PatientID": "MOVE-TO"})
    assert review.status_code == 200, review.text
    assert "moves to the existing patient <b>MOVE-TO</b> and takes its attributes" in \
        review.text
    assert "PatientName → RIGHT^PATIENT" in review.text
    nowhere = form_post(node, f"{s['path']}/correct", step="review",
                        **{**UNCHANGED, "PatientID": "NEW-PATIENT"})
    assert "moves to patient <b>NEW-PATIENT</b>, who has no other study" in nowhere.text


def test_a_series_description_is_corrected_on_the_series_page(node: Any) -> None:
    s = store_study(node, count=1)
    path = f"{s['path']}/series/{s['series']}"
    assert f'id="correct" href="{path}/correct"' in get(node, path).text
    assert 'value="Axial"' in get(node, f"{path}/correct").text
    done = form_post(node, f"{path}/correct", step="apply", SeriesDescription="Coronal")
    assert "Corrected 1 instance." in done.text
    import requests

    [series] = requests.get(f"{node.http_url}/studies/{s['study']}/series", timeout=30,
                            auth=("admin", PASSWORDS["admin"])).json()
    assert series["0008103E"]["Value"] == ["Coronal"]
    assert "Coronal</h1>" in get(node, path).text


def test_only_a_modify_rule_without_pattern_corrects(node: Any) -> None:
    s = store_study(node, count=1)
    for user in ("bob", "carol"):  # no Modify rule; a Modify rule with a pattern
        assert 'id="correct"' not in get(node, s["path"], user=user).text
        for method, path in (("GET", "/correct"), ("POST", "/correct"), ("GET", "/history"),
                             ("GET", "/restore"), ("POST", "/restore")):
            answer = get(node, s["path"] + path, user=user) if method == "GET" else \
                form_post(node, s["path"] + path, user=user, step="apply",
                          PatientName="X^Y")
            assert answer.status_code == 403, (user, method, path)
    assert "have patterns" in get(node, f"{s['path']}/correct", user="carol").text
    assert get(node, f"{s['path']}/correct", user=None).status_code == 401
    assert study_values(node, s["study"])[0] == "WRONG^NAME"


def test_a_cross_site_post_and_a_bad_value_change_nothing(node: Any) -> None:
    s = store_study(node, count=1)
    fields = {**UNCHANGED, "PatientName": "FORGED^NAME", "step": "apply"}
    for origin, extra in ((None, {}), ("http://evil.example", {}), ("null", {}),
                          ("own", {"Sec-Fetch-Site": "cross-site"})):
        refused = form_post(node, f"{s['path']}/correct", origin=origin, headers=extra,
                            **fields)
        assert refused.status_code == 403 and "cross-site" in refused.text, origin
    assert form_post(node, f"{s['path']}/restore", origin="http://evil.example"
                     ).status_code == 403
    for field, value, reason in (
            ("StudyDate", "2024-02-30", "StudyDate: &#39;20240230&#39; is not a date"),
            ("PatientSex", "female", "PatientSex: Invalid value for VR CS")):
        bad = form_post(node, f"{s['path']}/correct", **{**fields, field: value})
        assert bad.status_code == 400, (field, bad.text)
        assert reason in bad.text and f'value="{value}"' in bad.text  # the form again
    assert study_values(node, s["study"])[0] == "WRONG^NAME"
    assert qido_studies(node, "admin", PatientName="FORGED*") == set()


def test_an_administrator_corrects_and_restores_in_a_browser(
        node: Any, browser: Any) -> None:  # noqa: F811 - the imported fixture
    s = store_study(node)
    watched = Watched(browser, "admin")
    page = watched.page
    try:
        page.goto(root(node) + s["path"])
        page.click("#correct")
        page.wait_for_url("**/correct")
        page.fill("#f-PatientName", "BROWSER^FIXED")
        page.fill("#f-StudyDescription", "Head CT")
        page.fill("#f-reason", "wrong patient name")
        page.click("#review")
        page.wait_for_selector("#confirm")
        assert "Corrects 2 instances in 1 series" in page.inner_text("#what")
        page.click("#confirm-correct")
        page.wait_for_selector("#corrected")
        assert page.inner_text("#corrected") == "Corrected 2 instances."
        assert study_values(node, s["study"]) == ("BROWSER^FIXED", "Head CT")

        page.goto(root(node) + s["path"])
        assert page.inner_text("#patient-name") == "BROWSER^FIXED"
        page.click("#history")
        page.wait_for_url("**/history")
        assert "PatientName was WRONG^NAME" in page.inner_text("#corrections")
        page.click("#restore")
        page.wait_for_url("**/restore")
        page.click("#confirm-restore")
        page.wait_for_selector("#corrected")
        assert page.inner_text("#corrected") == "Restored 2 instances."
        assert study_values(node, s["study"]) == ("WRONG^NAME", "Old description")
        assert watched.dialogs == [] and watched.errors == [], watched.errors
    finally:
        watched.close()

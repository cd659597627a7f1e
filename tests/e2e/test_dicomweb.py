"""DICOMweb (archive.web) over the network: the node started as ``archive serve`` with
the real FerretDB, ``dicomweb-client`` as the client, C-FIND (pynetdicom) as the
reference for QIDO-RS answers, the stored documents and files for WADO-RS.

One node for the module: users in a file (bcrypt), access rules applied in-process:
``admin`` may do everything, ``alice`` query and retrieve patient ``ALICE-*`` only and
store only ``ALICE-*``, ``bob`` nothing; anonymous may query nothing either.
"""

from __future__ import annotations

import base64
import socket
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import requests
from acl_clients import find_as, node_with_users
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from helpers import echoscu, image_dataset, stow_body, to_part10
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from archive.web.multipart import parse

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

PASSWORDS = {"admin": "admin-secret", "alice": "alice-secret", "bob": "bob-secret"}
RULES = """
rules:
  - {principal: "*", service: Echo}
  - {principal: admin, service: "*"}
  - {principal: alice, service: Query, pattern: {PatientID: "ALICE-*"}}
  - {principal: alice, service: Retrieve, pattern: {PatientID: "ALICE-*"}}
  - {principal: alice, service: Store, pattern: {PatientID: "ALICE-*"}}
"""
ANY_SYNTAX = (("application/dicom", "*"),)
DICOM_IN = 'multipart/related; type="application/dicom"; transfer-syntax='



@pytest.fixture(scope="module")
def node(module_node_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return node_with_users(module_node_factory, tmp_path_factory.mktemp("web-users"),
                           PASSWORDS, RULES, {"auth": {"throttle": {
                               "user_failures": 1000, "peer_failures": 1000}}})


def client(node: Any, user: str | None = "admin", password: str | None = None
           ) -> DICOMwebClient:
    session = None
    if user is not None:
        session = create_session_from_user_pass(user, password or PASSWORDS[user])
    return DICOMwebClient(node.http_url, session=session)


def auth(user: str) -> tuple[str, str]:
    return (user, PASSWORDS[user])



def c_find(node: Any, level: str, user: str = "admin", **keys: Any) -> list[Dataset]:
    """C-FIND (Study Root) answers, acting for ``user`` with her password."""
    return find_as(node, level, user, PASSWORDS[user], **keys)


def as_json(ds: Dataset) -> dict[str, Any]:
    """A C-FIND answer as QIDO-RS gives it: DICOM JSON without Query/Retrieve Level,
    Specific Character Set and Retrieve URL (which C-FIND does not have)."""
    data = ds.to_json_dict()
    for tag in ("00080052", "00080005", "00081190"):
        data.pop(tag, None)
    return {k: _plain(v) for k, v in sorted(data.items())}


def _plain(element: dict[str, Any]) -> dict[str, Any]:
    """Empty values and empty sequences written alike (pydicom omits "Value")."""
    element = dict(element)
    if element.get("Value") in ([], [None], None):
        element.pop("Value", None)
    return element


def qido_json(answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: _plain(v) for k, v in sorted(a.items()) if k != "00081190"}
            for a in answers]


# --- data -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(node: Any) -> dict[str, Any]:
    """Two patients' studies stored by STOW-RS as admin: ALICE-1 (two series, three
    instances) and BOB-1 (one series, two instances)."""
    alice_study, bob_study = generate_uid(), generate_uid()
    alice_series = [generate_uid(), generate_uid()]
    files: dict[str, bytes] = {}
    for n, series in enumerate([alice_series[0], alice_series[0], alice_series[1]]):
        ds = image_dataset(patient_id="ALICE-1", patient_name="ALICE^A", study_uid=alice_study,
                           series_uid=series, InstanceNumber=n + 1,
                           StudyDescription="Alice study", SeriesDescription=f"S{n}")
        files[str(ds.SOPInstanceUID)] = to_part10(ds)
    bob_series = generate_uid()
    for n in range(2):
        ds = image_dataset(patient_id="BOB-1", patient_name="BOB^B", study_uid=bob_study,
                           series_uid=bob_series, InstanceNumber=n + 1, modality="MR",
                           StudyDescription="Bob study")
        files[str(ds.SOPInstanceUID)] = to_part10(ds)
    body, content_type = stow_body(list(files.values()))
    answer = requests.post(f"{node.http_url}/studies", data=body, auth=auth("admin"),
                           headers={"Content-Type": content_type,
                                    "Accept": "application/dicom+json"}, timeout=60)
    assert answer.status_code == 200, answer.text
    return {"files": files, "alice_study": alice_study, "bob_study": bob_study,
            "alice_series": alice_series, "bob_series": bob_series}


# --- QIDO-RS --------------------------------------------------------------------------


def test_qido_studies_equal_c_find(node: Any, corpus: dict[str, Any]) -> None:
    web = client(node).search_for_studies(search_filters={"PatientID": "ALICE-1"})
    assert len(web) == 1
    keys = {k: v for k, v in web[0].items() if k != "00081190"}
    dimse = c_find(node, "STUDY", **{kw: "ALICE-1" if kw == "PatientID" else ""
                                     for kw in _keywords(keys)})
    assert qido_json(web) == [as_json(d) for d in dimse]
    # dicomweb-client sends "Host: 127.0.0.1" without the port: the URL gets the port
    # the service listens on back, so that the client can follow it
    [url] = web[0]["00081190"]["Value"]
    assert url == f"{node.http_url}/studies/{corpus['alice_study']}"
    assert web[0]["00201208"]["Value"] == [3]  # NumberOfStudyRelatedInstances


def _keywords(data: dict[str, Any]) -> list[str]:
    from pydicom.datadict import keyword_for_tag

    return [keyword_for_tag(int(tag, 16)) for tag in data]


@pytest.mark.parametrize("level,path,keys", [
    ("SERIES", "/series", {"Modality": "MR"}),
    ("SERIES", "/series", {"StudyDescription": "Alice*"}),
    ("IMAGE", "/instances", {"PatientName": "bob^*"}),
    ("IMAGE", "/instances", {"Rows": "64", "PatientID": "ALICE-1"}),
    ("STUDY", "/studies", {"StudyDate": "20240101-20240131"}),
])
def test_qido_answers_equal_c_find_for_the_same_keys(node: Any, corpus: dict[str, Any],
                                                     level: str, path: str,
                                                     keys: dict[str, str]) -> None:
    answer = requests.get(node.http_url + path, params=keys, auth=auth("admin"), timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/dicom+json")
    web = answer.json()
    assert web, "the corpus matches"
    returned = sorted({tag for a in web for tag in a} - {"00081190"})
    dimse = c_find(node, level, **{kw: _number(kw, keys.get(kw, "")) for kw in _keywords(
        {t: None for t in returned})})
    by_uid = "0020000D" if level == "STUDY" else "0020000E" if level == "SERIES" else "00080018"
    assert sorted(qido_json(web), key=lambda a: a[by_uid]["Value"]) == \
        sorted([as_json(d) for d in dimse], key=lambda a: a[by_uid]["Value"])


def _number(keyword: str, value: str) -> Any:
    """A key value as pydicom encodes it in a C-FIND identifier (US: a number)."""
    return int(value) if value and keyword in ("Rows", "Columns") else value


def test_qido_series_and_instances_of_a_study(node: Any, corpus: dict[str, Any]) -> None:
    web = client(node)
    series = web.search_for_series(corpus["alice_study"])
    assert sorted(s["0020000E"]["Value"][0] for s in series) == sorted(corpus["alice_series"])
    instances = web.search_for_instances(corpus["alice_study"], corpus["alice_series"][0])
    assert len(instances) == 2
    assert all(f"/dicom-web/studies/{corpus['alice_study']}/series/" in
               i["00081190"]["Value"][0] for i in instances)
    assert len(web.search_for_instances(corpus["alice_study"])) == 3


def test_qido_includefield_limit_offset(node: Any, corpus: dict[str, Any]) -> None:
    web = client(node)
    found = web.search_for_studies(search_filters={"PatientID": "*-1"},
                                   fields=["StudyDescription", "00100010"])
    assert len(found) == 2
    assert {f["00081030"]["Value"][0] for f in found} == {"Alice study", "Bob study"}
    everything = requests.get(f"{node.http_url}/studies", auth=auth("admin"), timeout=30,
                              params=[("includefield", "all"), ("PatientID", "ALICE-1")]).json()
    assert everything[0]["00081030"]["Value"] == ["Alice study"]
    first = web.search_for_instances(corpus["alice_study"], limit=2)
    rest = web.search_for_instances(corpus["alice_study"], offset=2)
    assert len(first) == 2 and len(rest) == 1
    uids = {i["00080018"]["Value"][0] for i in first + rest}
    assert len(uids) == 3
    more = requests.get(f"{node.http_url}/studies/{corpus['alice_study']}/instances",
                        params={"limit": "1"}, auth=auth("admin"), timeout=30)
    assert len(more.json()) == 1 and "additional results" in more.headers["warning"]
    huge = requests.get(f"{node.http_url}/instances", auth=auth("admin"), timeout=30,
                        params={"limit": str(10**11), "PatientID": "ALICE-1"})
    assert huge.status_code == 200 and len(huge.json()) == 3
    fuzzy = web.search_for_studies(search_filters={"PatientName": "ALICE^A"},
                                   fuzzymatching=True)
    assert len(fuzzy) == 1


def test_ohif_study_search_is_answered(node: Any, corpus: dict[str, Any]) -> None:
    """OHIF 3.13's study list asks for Modality, a SERIES attribute, in every search:
    the studies come back (without it) rather than a 400 and an empty list."""
    params = [("limit", "101"), ("offset", "0"), ("fuzzymatching", "false"),
              ("includefield", "00081030,00080060,00080090,00100030"),
              ("PatientID", "ALICE-1")]
    found = requests.get(f"{node.http_url}/studies", params=params, auth=auth("admin"),
                         timeout=30)
    assert found.status_code == 200, found.text
    (study,) = found.json()
    assert study["00081030"]["Value"] == ["Alice study"] and "00080060" not in study
    by_modality = requests.get(f"{node.http_url}/studies", params={"Modality": "CT"},
                               auth=auth("admin"), timeout=30)
    assert by_modality.status_code == 400 and "SERIES" in by_modality.text


def test_qido_no_match_is_an_empty_array(node: Any, corpus: dict[str, Any]) -> None:
    answer = requests.get(f"{node.http_url}/studies", params={"PatientID": "NOBODY"},
                          auth=auth("admin"), timeout=30)
    assert (answer.status_code, answer.json()) == (200, [])


# --- WADO-RS --------------------------------------------------------------------------


def test_wado_retrieves_the_stored_bytes(node: Any, corpus: dict[str, Any]) -> None:
    web = client(node)
    study = web.retrieve_study(corpus["alice_study"], media_types=ANY_SYNTAX)
    assert len(study) == 3
    files = corpus["files"]
    for ds in study:
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        assert dcmread(BytesIO(files[ds.SOPInstanceUID])) == ds
    # the bytes themselves, unchanged, through the raw multipart body
    answer = requests.get(f"{node.http_url}/studies/{corpus['bob_study']}",
                          auth=auth("admin"), timeout=30,
                          headers={"Accept": 'multipart/related; type="application/dicom"; '
                                             "transfer-syntax=*"})
    assert answer.status_code == 200
    boundary = answer.headers["content-type"].split("boundary=")[1]
    parts = parse(boundary, answer.content)
    assert sorted(data for _, data in parts) == sorted(
        data for uid, data in files.items() if dcmread(BytesIO(data)).PatientID == "BOB-1")
    assert all(h["content-type"].startswith("application/dicom; transfer-syntax=")
               for h, _ in parts)
    sop = next(iter(files))
    series = corpus["alice_series"][0]
    one = web.retrieve_instance(corpus["alice_study"], series, sop, media_types=ANY_SYNTAX)
    assert one.SOPInstanceUID == sop
    assert len(web.retrieve_series(corpus["alice_study"], series, media_types=ANY_SYNTAX)) == 2


def test_wado_metadata_is_the_stored_dicom_json(node: Any, corpus: dict[str, Any]) -> None:
    web = client(node)
    metadata = web.retrieve_study_metadata(corpus["alice_study"])
    stored = {doc["_id"]: doc["dataset"] for doc in node.db.instances.find(
        {"StudyInstanceUID": corpus["alice_study"]}, {"dataset": 1})}
    for sop, dataset in stored.items():  # bulk data: named by this service's URLs
        uri = dataset["7FE00010"]["BulkDataURI"]
        assert uri.startswith("gridfs:")
        dataset["7FE00010"]["BulkDataURI"] = (
            f"{node.http_url}/studies/{corpus['alice_study']}/series/"
            f"{dataset['0020000E']['Value'][0]}/instances/{sop}/bulkdata/7FE00010")
    assert {m["00080018"]["Value"][0]: m for m in metadata} == stored
    series = corpus["alice_series"][1]
    assert len(web.retrieve_series_metadata(corpus["alice_study"], series)) == 1
    sop = next(uid for uid, d in stored.items() if d["0020000E"]["Value"] == [series])
    assert web.retrieve_instance_metadata(corpus["alice_study"], series, sop) == stored[sop]


def test_wado_accept_negotiation(node: Any, corpus: dict[str, Any]) -> None:
    url = f"{node.http_url}/studies/{corpus['alice_study']}"
    for accept in ("image/jpeg", 'multipart/related; type="image/jp2"', "application/dicom"):
        answer = requests.get(url, headers={"Accept": accept}, auth=auth("admin"), timeout=30)
        assert answer.status_code == 406, (accept, answer.text)
        assert "multipart/related" in answer.text
    answer = requests.get(url, auth=auth("admin"), timeout=30,
                          headers={"Accept": DICOM_IN + "1.2.840.10008.1.2.4.50"})
    assert answer.status_code == 406 and "transfer-syntax=*" in answer.text
    answer = requests.get(url + "/metadata", headers={"Accept": "application/dicom+xml"},
                          auth=auth("admin"), timeout=30)
    assert answer.status_code == 406
    answer = requests.get(url, timeout=30, auth=auth("admin"),
                          headers={"Accept": DICOM_IN + "1.2.840.10008.1.2.1"})
    assert answer.status_code == 200  # stored explicit VR little endian


# --- STOW-RS --------------------------------------------------------------------------


def test_stow_of_pydicom_test_files_then_wado_back(node: Any, testdata_files: list[Path]
                                                   ) -> None:
    files = [p.read_bytes() for p in testdata_files]
    by_sop: dict[str, bytes] = {}
    for data in files:
        ds = dcmread(BytesIO(data), stop_before_pixels=True)
        by_sop[str(ds.SOPInstanceUID).strip()] = data  # a re-sent UID: the last copy
    web = client(node)
    stored = 0
    for start in range(0, len(files), 20):
        datasets = [dcmread(BytesIO(d)) for d in files[start:start + 20]]
        body, content_type = stow_body(files[start:start + 20])
        answer = requests.post(f"{node.http_url}/studies", data=body, auth=auth("admin"),
                               headers={"Content-Type": content_type}, timeout=120)
        assert answer.status_code in (200, 202), answer.text
        result = answer.json()
        assert "00081198" not in result, (result, [d.filename for d in datasets])
        stored += len(result["00081199"]["Value"])
    assert stored == len(files)
    for sop, data in by_sop.items():
        doc = node.db.instances.find_one({"_id": sop}, {"StudyInstanceUID": 1,
                                                         "SeriesInstanceUID": 1})
        answer = requests.get(
            f"{node.http_url}/studies/{doc['StudyInstanceUID']}/series/"
            f"{doc['SeriesInstanceUID']}/instances/{sop}", auth=auth("admin"), timeout=60)
        assert answer.status_code == 200, answer.text
        boundary = answer.headers["content-type"].split("boundary=")[1]
        [(_, back)] = parse(boundary, answer.content)
        assert back == data, sop
    assert web.search_for_studies(limit=1)


def test_stow_with_dicomweb_client_and_study_path(node: Any) -> None:
    study = generate_uid()
    datasets = [dcmread(BytesIO(to_part10(image_dataset(patient_id="WEB-1", study_uid=study))))
                for _ in range(2)]
    result = client(node).store_instances(datasets, study_instance_uid=study)
    assert len(result.ReferencedSOPSequence) == 2
    other = image_dataset(patient_id="WEB-1")  # of another study
    body, content_type = stow_body([to_part10(other)])
    answer = requests.post(f"{node.http_url}/studies/{study}", data=body, auth=auth("admin"),
                           headers={"Content-Type": content_type}, timeout=30)
    assert answer.status_code == 409, answer.text
    failed = answer.json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0xA900]
    assert failed["00081155"]["Value"] == [other.SOPInstanceUID]


def test_stow_partial_failure_is_202(node: Any) -> None:
    good = image_dataset(patient_id="WEB-2")
    body, content_type = stow_body([to_part10(good), b"not DICOM at all" * 10])
    answer = requests.post(f"{node.http_url}/studies", data=body, auth=auth("admin"),
                           headers={"Content-Type": content_type}, timeout=30)
    assert answer.status_code == 202, answer.text
    result = answer.json()
    assert result["00081199"]["Value"][0]["00081155"]["Value"] == [good.SOPInstanceUID]
    assert result["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]


# --- access rules over HTTP -----------------------------------------------------------


def _uids(answers: list[dict[str, Any]], tag: str) -> set[str]:
    return {a[tag]["Value"][0] for a in answers}


def test_restricted_user_sees_only_her_data_at_every_level(node: Any,
                                                           corpus: dict[str, Any]) -> None:
    alice = client(node, "alice")
    studies = alice.search_for_studies()
    assert _uids(studies, "0020000D") == {corpus["alice_study"]}
    assert studies[0]["00201208"]["Value"] == [3]
    assert studies[0]["00201206"]["Value"] == [2]
    assert studies[0]["00080061"]["Value"] == ["CT"]
    assert _uids(alice.search_for_series(), "0020000E") == set(corpus["alice_series"])
    assert len(alice.search_for_instances()) == 3
    assert alice.search_for_series(corpus["bob_study"]) == []
    assert alice.search_for_instances(corpus["bob_study"]) == []
    assert alice.search_for_studies(search_filters={"PatientID": "BOB-1"}) == []
    # her answers are C-FIND's answers to her
    web = requests.get(f"{node.http_url}/studies", auth=auth("alice"), timeout=30).json()
    keys = {tag for a in web for tag in a} - {"00081190"}
    dimse = c_find(node, "STUDY", "alice", **{kw: "" for kw in _keywords(
        {t: None for t in keys})})
    assert qido_json(web) == [as_json(d) for d in dimse]
    # and she retrieves what she sees
    assert len(alice.retrieve_study(corpus["alice_study"], media_types=ANY_SYNTAX)) == 3
    assert len(alice.retrieve_study_metadata(corpus["alice_study"])) == 3


@pytest.mark.parametrize("level,path", [("STUDY", "/studies"), ("SERIES", "/series"),
                                        ("IMAGE", "/instances")])
def test_restricted_answers_equal_her_c_find_at_every_level(node: Any, corpus: dict[str, Any],
                                                            level: str, path: str) -> None:
    web = requests.get(node.http_url + path, auth=auth("alice"), timeout=30).json()
    assert web
    returned = sorted({tag for a in web for tag in a} - {"00081190"})
    dimse = c_find(node, level, "alice", **{kw: "" for kw in _keywords(
        {t: None for t in returned})})
    by_uid = {"STUDY": "0020000D", "SERIES": "0020000E", "IMAGE": "00080018"}[level]
    assert sorted(qido_json(web), key=lambda a: a[by_uid]["Value"]) == \
        sorted([as_json(d) for d in dimse], key=lambda a: a[by_uid]["Value"])
    assert all(a["00100020"]["Value"][0].startswith("ALICE-") for a in web)


def test_hidden_is_answered_as_nonexistent(node: Any, corpus: dict[str, Any]) -> None:
    bob_study, bob_series = corpus["bob_study"], corpus["bob_series"]
    bob_sop = next(uid for uid, data in corpus["files"].items()
                   if dcmread(BytesIO(data)).PatientID == "BOB-1")
    hidden = [f"/studies/{bob_study}", f"/studies/{bob_study}/series/{bob_series}",
              f"/studies/{bob_study}/series/{bob_series}/instances/{bob_sop}"]
    missing = ["/studies/1.2.3.999", "/studies/1.2.3.999/series/1.2.3.998",
               "/studies/1.2.3.999/series/1.2.3.998/instances/1.2.3.997"]
    for suffix in ("", "/metadata"):
        for seen, absent in zip(hidden, missing, strict=True):
            a = requests.get(node.http_url + seen + suffix, auth=auth("alice"), timeout=30)
            b = requests.get(node.http_url + absent + suffix, auth=auth("alice"), timeout=30)
            assert (a.status_code, a.text, sorted(a.headers)) == \
                (b.status_code, b.text, sorted(b.headers)) == (404, b.text, sorted(b.headers))
            # admin does see it
            assert requests.get(node.http_url + seen + suffix, auth=auth("admin"),
                                timeout=30).status_code == 200

    def median(path: str) -> float:
        times = []
        for _ in range(15):
            started = time.perf_counter()
            requests.get(node.http_url + path, auth=auth("alice"), timeout=30)
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    assert abs(median(hidden[0]) - median(missing[0])) < 0.05


def test_wrong_password_401_no_rule_403(node: Any, corpus: dict[str, Any]) -> None:
    url = f"{node.http_url}/studies"
    wrong = requests.get(url, auth=("alice", "wrong"), timeout=30)
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Basic")
    unknown = requests.get(url, auth=("nobody", "x"), timeout=30)
    assert unknown.status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer abc"},
                        timeout=30).status_code == 401
    assert requests.get(url, headers={"Authorization": "Basic !!!"},
                        timeout=30).status_code == 401
    for method, path in (("GET", "/studies"), ("GET", f"/studies/{corpus['alice_study']}"),
                         ("GET", f"/studies/{corpus['alice_study']}/metadata"),
                         ("POST", "/studies")):
        denied = requests.request(method, node.http_url + path, auth=auth("bob"), timeout=30)
        assert denied.status_code == 403, (path, denied.text)
        assert "no " in denied.text and " rule for bob" in denied.text
    anonymous = requests.get(url, timeout=30)
    assert anonymous.status_code == 403 and "anonymous" in anonymous.text
    assert anonymous.headers["www-authenticate"].startswith("Basic")


def test_restricted_store_follows_the_store_rules(node: Any) -> None:
    mine, theirs = image_dataset(patient_id="ALICE-2"), image_dataset(patient_id="BOB-2")
    body, content_type = stow_body([to_part10(mine), to_part10(theirs)])
    answer = requests.post(f"{node.http_url}/studies", data=body, auth=auth("alice"),
                           headers={"Content-Type": content_type}, timeout=30)
    assert answer.status_code == 202, answer.text
    result = answer.json()
    assert result["00081199"]["Value"][0]["00081155"]["Value"] == [mine.SOPInstanceUID]
    failed = result["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0x0124]
    assert node.db.instances.find_one({"_id": theirs.SOPInstanceUID}) is None


def test_audit_entries(node: Any, corpus: dict[str, Any]) -> None:
    requests.get(f"{node.http_url}/studies", auth=("alice", "wrong"), timeout=30)
    requests.get(f"{node.http_url}/studies", auth=auth("alice"), timeout=30)
    requests.get(f"{node.http_url}/studies", auth=auth("bob"), timeout=30)

    def found() -> list[dict[str, Any]]:
        return list(node.db.audit.find({"event": {"$in": ["QIDO-RS", "WADO-RS",
                                                           "STOW-RS"]}}))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        entries = found()
        if any(e["principal"] == "bob" for e in entries):
            break
        time.sleep(0.2)
    events = {(e["event"], e["principal"], e["allowed"]) for e in entries}
    assert ("QIDO-RS", "alice", True) in events and ("QIDO-RS", "bob", False) in events
    assert ("STOW-RS", "admin", True) in events and ("WADO-RS", "admin", True) in events
    refused = node.db.audit.find_one({"event": "HTTP-AUTH-RJ", "user": "alice"})
    assert refused is not None and refused["established"] == "refused"
    alice = next(e for e in entries if e["principal"] == "alice" and e["event"] == "QIDO-RS")
    assert alice["restricted"] and alice["established"] == "verified-user"
    assert alice["service"] == "Query" and alice["address"] == "127.0.0.1"


# --- bad input ------------------------------------------------------------------------


def raw_get(node: Any, path: str) -> tuple[int, str]:
    """A request sent as written (clients normalise dot segments away)."""
    credentials = base64.b64encode(b"admin:" + PASSWORDS["admin"].encode()).decode()
    with socket.create_connection(("127.0.0.1", node.http_port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {credentials}"
                     "\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


@pytest.mark.parametrize("path", [
    "/dicom-web/studies/..", "/dicom-web/studies/../series",
    "/dicom-web/studies/1.2.3%2F4.5", "/dicom-web/studies/1.2.3%2f..%2f..%2fseries",
    "/dicom-web/studies/%2e%2e/metadata", "/dicom-web/studies/*",
    "/dicom-web/studies/1.2.3%5C1.2.4", "/dicom-web/studies/1.2*/series/1.2/metadata",
    "/dicom-web/studies/" + "1" * 65,
])
def test_uid_path_tricks_are_refused(node: Any, corpus: dict[str, Any], path: str) -> None:
    status, body = raw_get(node, path)
    assert 400 <= status < 500, (status, body)
    assert status != 500 and body.strip(), body


@pytest.mark.parametrize("params,message", [
    ({"limit": "-1"}, "limit: expected a non-negative integer"),
    ({"offset": "x"}, "offset: expected a non-negative integer"),
    ({"Foo": "1"}, "unknown attribute 'Foo'"),
    ({"SOPInstanceUID": "1.2"}, "not allowed at STUDY level"),
    ({"StudyDate": "20241301"}, "StudyDate"),
    ({"fuzzymatching": "maybe"}, "fuzzymatching"),
    ({"includefield": "NoSuchKeyword"}, "unknown attribute"),
])
def test_bad_queries_are_400_with_a_message(node: Any, params: dict[str, str],
                                            message: str) -> None:
    answer = requests.get(f"{node.http_url}/studies", params=params, auth=auth("admin"),
                          timeout=30)
    assert answer.status_code == 400, answer.text
    assert message in answer.text


def test_bad_stow_bodies(node: Any) -> None:
    url = f"{node.http_url}/studies"
    good = to_part10(image_dataset(patient_id="WEB-3"))
    body, content_type = stow_body([good])
    boundary = content_type.split("boundary=")[1]

    def post(data: bytes, ctype: str) -> requests.Response:
        return requests.post(url, data=data, auth=auth("admin"), timeout=30,
                             headers={"Content-Type": ctype})

    answer = post(good, "application/dicom")
    assert answer.status_code == 415 and "multipart/related" in answer.text
    answer = post(body, content_type.replace("application/dicom", "application/dicom+json"))
    assert answer.status_code == 415
    answer = post(body, 'multipart/related; type="application/dicom"')
    assert answer.status_code == 400 and "boundary" in answer.text
    answer = post(body[:-len(boundary) - 10], content_type)  # cut before the end
    assert answer.status_code == 400 and "cut short" in answer.text
    answer = post(b"garbage without any delimiter", content_type)
    assert answer.status_code == 400 and "no multipart delimiter" in answer.text
    answer = post(f"--{boundary}--\r\n".encode(), content_type)
    assert answer.status_code == 400 and "no part" in answer.text
    bad_header = f"--{boundary}\r\nno colon here\r\n\r\nxx\r\n--{boundary}--\r\n".encode()
    answer = post(bad_header, content_type)
    assert answer.status_code == 400 and "header" in answer.text
    not_dicom, ctype = stow_body([b"\0" * 128 + b"DICM" + b"junk" * 100])
    answer = post(not_dicom, ctype)
    assert answer.status_code == 409
    assert answer.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    other_type = body.replace(b"Content-Type: application/dicom", b"Content-Type: text/plain")
    answer = post(other_type, content_type)
    assert answer.status_code == 409
    # and both ports keep serving
    assert echoscu(node).returncode == 0
    assert requests.get(url, auth=auth("admin"), timeout=30).status_code == 200


def test_a_large_instance_goes_through_a_file(node: Any) -> None:
    """Above receive.in_memory_max_mb (1 MiB) a part is spooled to receive.folder, stored
    from there, and the file deleted."""
    ds = image_dataset(pixels=bytes(range(256)) * (3 * 4096), patient_id="WEB-4")
    ds.Rows, ds.Columns = 1024, 1536
    data = to_part10(ds)
    assert len(data) > 2 * 1024 * 1024
    body, content_type = stow_body([data])
    answer = requests.post(f"{node.http_url}/studies", data=body, auth=auth("admin"),
                           headers={"Content-Type": content_type}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert not list(node.incoming.glob("recv-*")) if node.incoming.is_dir() else True
    back = requests.get(f"{node.http_url}/studies/{ds.StudyInstanceUID}", auth=auth("admin"),
                        timeout=60)
    boundary = back.headers["content-type"].split("boundary=")[1]
    assert parse(boundary, back.content)[0][1] == data

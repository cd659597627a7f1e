"""FHIR R4 ImagingStudy (archive.web.fhir) over the network: the node started as
``archive serve`` with the real FerretDB, data stored by STOW-RS, every answer parsed
by the FHIR R4 models of ``fhir.resources`` and compared with C-FIND (pynetdicom)
acting for the same user.

Users in a file (bcrypt); ``admin`` may do everything, ``alice`` query patients
``ALICE-*`` only, ``carol`` query CT instances only (she sees part of a study), ``bob``
nothing.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import bcrypt
import pytest
import requests
from acl_clients import archive_cli, find_as, use_rules
from fhir.resources import __fhir_version__
from fhir.resources.bundle import Bundle
from fhir.resources.capabilitystatement import CapabilityStatement
from fhir.resources.imagingstudy import ImagingStudy
from fhir.resources.operationoutcome import OperationOutcome
from fhir.resources.patient import Patient
from helpers import image_dataset, stow, to_part10, wait_for
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from acl.users import write_users

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

PASSWORDS = {"admin": "admin-secret", "alice": "alice-secret", "bob": "bob-secret",
             "carol": "carol-secret"}
RULES = """
rules:
  - {principal: admin, service: "*"}
  - {principal: alice, service: Query, pattern: {PatientID: "ALICE-*"}}
  - {principal: carol, service: Query, pattern: {Modality: CT}}
"""
DCM = "http://dicom.nema.org/resources/ontology/DCM"
FHIR_JSON = "application/fhir+json"


def test_the_models_are_r4() -> None:
    assert __fhir_version__ == "4.0.1"


@pytest.fixture(scope="module")
def node(module_node_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    users = tmp_path_factory.mktemp("fhir-users") / "users.yaml"
    write_users(users, {name: bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()
                        for name, p in PASSWORDS.items()})
    running = module_node_factory({
        "acl": {"enabled": True, "refresh_seconds": 0.2},
        "auth": {"backend": "file", "users_file": str(users),
                 "throttle": {"user_failures": 1000, "peer_failures": 1000}},
        "http": {"fhir_timezone": "+01:00"},
    })
    use_rules(running, RULES)
    return running


def fhir_url(node: Any) -> str:
    return f"http://127.0.0.1:{node.http_port}/fhir"


@pytest.fixture(scope="module")
def corpus(node: Any) -> dict[str, str]:
    """Three studies stored by STOW-RS as admin: A of ALICE-1 (two CT series, 2 + 1
    instances), B of ALICE-2 (one MR instance), C of BOB-1 (a CT instance and two MR
    instances, in two series)."""
    uids = {name: generate_uid() for name in "ABC"}
    plan = [  # study, patient, series number, modality, instances, date, accession
        ("A", "ALICE-1", 1, "CT", 2, "20240102", "ACC-A"),
        ("A", "ALICE-1", 2, "CT", 1, "20240102", "ACC-A"),
        ("B", "ALICE-2", 1, "MR", 1, "20230615", "ACC-B"),
        ("C", "BOB-1", 1, "CT", 1, "20240110", "ACC-C"),
        ("C", "BOB-1", 2, "MR", 2, "20240110", "ACC-C"),
    ]
    files = []
    for study, patient, number, modality, count, date, accession in plan:
        series = generate_uid()
        for n in range(count):
            name = "BJØRN^Ærø" if patient == "BOB-1" else f"{patient[:-2]}^X"
            ds = image_dataset(patient_id=patient, patient_name=name,
                               study_uid=uids[study], series_uid=series, modality=modality,
                               SeriesNumber=number, InstanceNumber=n + 1, StudyDate=date,
                               AccessionNumber=accession, StudyDescription=f"study {study}",
                               SeriesDescription=f"{modality} {number}",
                               BodyPartExamined="CHEST")
            files.append(to_part10(ds))
    answer = stow(node, files, auth=("admin", PASSWORDS["admin"]))
    assert answer.status_code == 200, answer.text
    return uids


# -- clients ---------------------------------------------------------------------------


def get(node: Any, path: str, user: str | None = "admin", params: Any = None,
        headers: dict[str, str] | None = None) -> requests.Response:
    auth = (user, PASSWORDS[user]) if user else None
    return requests.get(fhir_url(node) + path, params=params, auth=auth, headers=headers,
                        timeout=60)


def search(node: Any, params: Any = None, user: str = "admin") -> dict[str, Any]:
    """A searchset Bundle, checked by the R4 models."""
    answer = get(node, "/ImagingStudy", user, params)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith(FHIR_JSON)
    bundle = answer.json()
    Bundle.parse_obj(bundle)  # raises on anything R4 does not allow
    assert bundle["type"] == "searchset"
    return bundle


def outcome(answer: requests.Response, status: int) -> str:
    """The diagnostics of an OperationOutcome answered with ``status``."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(FHIR_JSON)
    parsed = OperationOutcome.parse_obj(answer.json())
    return parsed.issue[0].diagnostics


def c_find(node: Any, level: str, user: str = "admin", **keys: Any) -> list[Dataset]:
    """C-FIND (Study Root) answers, acting for ``user`` with her password."""
    return find_as(node, level, user, PASSWORDS[user], **keys)


def assert_equals_c_find(node: Any, bundle: dict[str, Any], user: str,
                         **keys: str) -> None:
    """The Bundle holds the studies, series and instances C-FIND shows ``user``."""
    returned = {"StudyInstanceUID": "", "ModalitiesInStudy": "", "PatientID": "",
                "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": ""}
    studies = c_find(node, "STUDY", user, **{**returned, **keys})
    assert bundle["total"] == len(studies)
    resources = {e["resource"]["id"]: e["resource"] for e in bundle.get("entry", [])}
    assert set(resources) == {str(s.StudyInstanceUID) for s in studies}
    for study in studies:
        uid = str(study.StudyInstanceUID)
        resource = resources[uid]
        assert resource["identifier"][0] == {"use": "official", "system": "urn:dicom:uid",
                                             "value": f"urn:oid:{uid}"}
        assert resource["subject"]["reference"] == f"Patient/{study.PatientID}"
        assert resource["numberOfSeries"] == study.NumberOfStudyRelatedSeries
        assert resource["numberOfInstances"] == study.NumberOfStudyRelatedInstances
        assert sorted(c["code"] for c in resource["modality"]) == \
            sorted(study.ModalitiesInStudy if study["ModalitiesInStudy"].VM > 1
                   else [study.ModalitiesInStudy])
        series = c_find(node, "SERIES", user, StudyInstanceUID=uid, SeriesInstanceUID="",
                        Modality="", NumberOfSeriesRelatedInstances="")
        listed = {s["uid"]: s for s in resource["series"]}
        assert set(listed) == {str(s.SeriesInstanceUID) for s in series}
        for answer in series:
            item = listed[str(answer.SeriesInstanceUID)]
            assert item["modality"] == {"system": DCM, "code": answer.Modality}
            assert item["numberOfInstances"] == answer.NumberOfSeriesRelatedInstances
            instances = c_find(node, "IMAGE", user, StudyInstanceUID=uid,
                               SeriesInstanceUID=str(answer.SeriesInstanceUID),
                               SOPInstanceUID="", SOPClassUID="")
            assert sorted(i["uid"] for i in item["instance"]) == \
                sorted(str(i.SOPInstanceUID) for i in instances)
            assert {i["sopClass"]["code"] for i in item["instance"]} == \
                {f"urn:oid:{i.SOPClassUID}" for i in instances}


# -- searches --------------------------------------------------------------------------


def _cases(uids: dict[str, str]) -> list[tuple[list[tuple[str, str]], dict[str, str]]]:
    """FHIR parameters and the C-FIND keys they stand for."""
    return [
        ([], {}),
        ([("patient", "Patient/ALICE-1")], {"PatientID": "ALICE-1"}),
        ([("patient", "BOB-1")], {"PatientID": "BOB-1"}),
        ([("patient", "ALICE-1,BOB-1")], {"PatientID": "ALICE-1\\BOB-1"}),
        ([("identifier", f"urn:dicom:uid|urn:oid:{uids['C']}")],
         {"StudyInstanceUID": uids["C"]}),
        ([("identifier", "ACC-B")], {"AccessionNumber": "ACC-B"}),
        ([("started", "ge2024-01-01")], {"StudyDate": "20240101-"}),
        ([("started", "ge2024-01"), ("started", "lt2024-01-05")],
         {"StudyDate": "20240101-20240104"}),
        ([("started", "2023")], {"StudyDate": "20230101-20231231"}),
        ([("modality", f"{DCM}|MR")], {"ModalitiesInStudy": "MR"}),
        ([("modality", "CT"), ("patient", "BOB-1")],
         {"ModalitiesInStudy": "CT", "PatientID": "BOB-1"}),
        ([("_id", f"{uids['A']},{uids['B']}")], {"StudyInstanceUID": f"{uids['A']}\\"
                                                                      f"{uids['B']}"}),
    ]


@pytest.mark.parametrize("user", ["admin", "alice", "carol"])
def test_searches_equal_c_find_for_the_same_keys(node: Any, corpus: dict[str, str],
                                                 user: str) -> None:
    matched = 0
    for params, keys in _cases(corpus):
        bundle = search(node, params, user)
        assert_equals_c_find(node, bundle, user, **keys)
        matched += bundle["total"]
    assert matched > 5, "the cases match something"


def test_a_restricted_user_sees_only_her_studies(node: Any, corpus: dict[str, str]
                                                 ) -> None:
    bundle = search(node, [], "alice")
    assert bundle["total"] == 2
    assert {e["resource"]["id"] for e in bundle["entry"]} == {corpus["A"], corpus["B"]}
    assert {e["resource"]["subject"]["reference"] for e in bundle["entry"]} == \
        {"Patient/ALICE-1", "Patient/ALICE-2"}
    assert search(node, [("patient", "BOB-1")], "alice")["total"] == 0
    assert search(node, [("identifier", "ACC-C")], "alice")["total"] == 0
    # carol sees the CT series of BOB-1's study, not its MR series
    [entry] = search(node, [("patient", "BOB-1")], "carol")["entry"]
    study = entry["resource"]
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (1, 1)
    assert [c["code"] for c in study["modality"]] == ["CT"]
    assert [s["modality"]["code"] for s in study["series"]] == ["CT"]
    assert search(node, [("modality", "MR")], "carol")["total"] == 0


def test_a_study_is_read_by_its_id(node: Any, corpus: dict[str, str]) -> None:
    answer = get(node, f"/ImagingStudy/{corpus['A']}", "alice")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith(FHIR_JSON)
    study = ImagingStudy.parse_obj(answer.json())
    assert study.id == corpus["A"]
    assert study.status == "available"
    assert study.started.isoformat() == "2024-01-02T10:15:00+01:00"  # http.fhir_timezone
    assert study.description == "study A"
    assert [(i.type.coding[0].code, i.value) for i in study.identifier if i.type] == \
        [("ACSN", "ACC-A")]
    assert [(s.number, s.numberOfInstances, [i.number for i in s.instance])
            for s in study.series] == [(1, 2, [1, 2]), (2, 1, [1])]
    assert study.series[0].bodySite.display == "CHEST"
    # the endpoint is the DICOMweb service: the series it names can be retrieved there
    [endpoint] = study.contained
    assert study.endpoint[0].reference == f"#{endpoint.id}"
    assert endpoint.connectionType.code == "dicom-wado-rs"
    assert endpoint.address == node.http_url
    metadata = requests.get(
        f"{endpoint.address}/studies/{corpus['A']}/series/{study.series[0].uid}/metadata",
        auth=("alice", PASSWORDS["alice"]), timeout=30)
    assert metadata.status_code == 403  # alice may query, not retrieve: its own rules
    metadata = requests.get(
        f"{endpoint.address}/studies/{corpus['A']}/series/{study.series[0].uid}/metadata",
        auth=("admin", PASSWORDS["admin"]), timeout=30)
    assert metadata.status_code == 200 and len(metadata.json()) == 2


def test_a_hidden_study_is_not_found_as_one_that_does_not_exist(
        node: Any, corpus: dict[str, str]) -> None:
    hidden = get(node, f"/ImagingStudy/{corpus['C']}", "alice")
    absent = get(node, f"/ImagingStudy/{generate_uid()}", "alice")
    assert outcome(hidden, 404) == outcome(absent, 404)
    assert hidden.content == absent.content
    drop = {"date", "content-length"}
    assert {k: v for k, v in hidden.headers.items() if k.lower() not in drop} == \
        {k: v for k, v in absent.headers.items() if k.lower() not in drop}
    seen = get(node, f"/ImagingStudy/{corpus['C']}", "admin")
    assert seen.status_code == 200
    assert seen.json()["subject"]["display"] == "Ærø BJØRN"  # UTF-8 names as stored
    assert get(node, f"/ImagingStudy/{corpus['C']}", "carol").status_code == 200

    def median(path: str) -> float:
        times = []
        for _ in range(15):
            started = time.perf_counter()
            get(node, path, "alice")
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    unknown = generate_uid()
    assert abs(median(f"/ImagingStudy/{corpus['C']}") - median(f"/ImagingStudy/{unknown}")
               ) < 0.05
    assert abs(median("/Patient/BOB-1") - median("/Patient/NOBODY-1")) < 0.05


def test_subjects_are_patients_she_may_read(node: Any, corpus: dict[str, str]) -> None:
    for entry in search(node, [], "alice")["entry"]:
        reference = entry["resource"]["subject"]["reference"]
        answer = get(node, f"/{reference}", "alice")
        assert answer.status_code == 200, answer.text
        patient = Patient.parse_obj(answer.json())
        assert f"Patient/{patient.id}" == reference
        assert patient.identifier[0].value == patient.id
        assert (patient.name[0].family, patient.name[0].given) == ("ALICE", ["X"])
    hidden = get(node, "/Patient/BOB-1", "alice")
    absent = get(node, "/Patient/NOBODY-1", "alice")
    assert outcome(hidden, 404) == outcome(absent, 404)
    assert hidden.content == absent.content
    assert get(node, "/Patient/BOB-1", "admin").status_code == 200


def test_the_capability_statement_names_what_is_served(node: Any) -> None:
    answer = get(node, "/metadata", "alice")
    assert answer.status_code == 200, answer.text
    statement = CapabilityStatement.parse_obj(answer.json())
    assert statement.fhirVersion == "4.0.1"
    [rest] = statement.rest
    served = {r.type: {i.code for i in r.interaction} for r in rest.resource}
    assert served == {"ImagingStudy": {"read", "search-type"}, "Patient": {"read"}}
    names = {p.name for p in rest.resource[0].searchParam}
    assert names == {"patient", "identifier", "started", "modality", "status", "_id"}
    outcome(get(node, "/metadata", "bob"), 403)


def test_pages_follow_next_links_as_qido_offsets(node: Any, corpus: dict[str, str]) -> None:
    url: str | None = fhir_url(node) + "/ImagingStudy?_count=1&started=ge2000"
    ids, totals = [], set()
    while url:
        answer = requests.get(url, auth=("admin", PASSWORDS["admin"]), timeout=30)
        assert answer.status_code == 200, answer.text
        bundle = answer.json()
        Bundle.parse_obj(bundle)
        totals.add(bundle["total"])
        ids += [e["resource"]["id"] for e in bundle.get("entry", [])]
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        assert dict(parse_qsl(urlsplit(links["self"]).query))["started"] == "ge2000"
        url = links.get("next")
        assert len(ids) <= 3
    assert totals == {3}
    assert sorted(ids) == sorted(corpus.values())
    # page k holds what QIDO-RS answers at offset k: the same C-FIND, the same order
    qido = [requests.get(f"{node.http_url}/studies",
                         params={"StudyDate": "20000101-", "limit": 1, "offset": k},
                         auth=("admin", PASSWORDS["admin"]), timeout=30).json()
            for k in range(3)]
    assert ids == [q[0]["0020000D"]["Value"][0] for q in qido]
    counted = search(node, [("_summary", "count")])
    assert counted["total"] == 3 and "entry" not in counted


def test_a_bearer_token_acts_for_its_user(node: Any, corpus: dict[str, str]) -> None:
    done = archive_cli(node, "token", "issue", "alice")
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    answer = requests.get(fhir_url(node) + "/ImagingStudy",
                          headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["total"] == 2

    def audited() -> Any:
        return node.db.audit.find_one({"event": "FHIR", "principal": "alice",
                                       "established": "bearer-token", "http_status": 200})
    entry = wait_for(audited, 10)
    assert entry["restricted"] and entry["request"].startswith("GET /fhir/ImagingStudy")
    wrong = requests.get(fhir_url(node) + "/ImagingStudy",
                         headers={"Authorization": f"Bearer {token[:-2]}xx"}, timeout=30)
    outcome(wrong, 401)
    assert "invalid_token" in wrong.headers["www-authenticate"]


# -- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize("params,message", [
    ([("name", "DOE")], "unknown search parameter 'name'"),
    ([("started", "2024-13-01")], "not a calendar date"),
    ([("started", "2024-01-01T10:00:00Z")], "only dates"),
    ([("started", "ne2024")], "prefix 'ne'"),
    ([("patient", "ALICE-*")], "exact"),
    ([("_count", "-1")], "non-negative integer"),
    ([("patient", "A"), ("patient", "B")], "more than once"),
    ([("identifier", "urn:oid:1.2,ACC-A")], "not both"),
    ([("_id", "1_2")], "not an ImagingStudy id"),
    ([("patient", "")], "empty value"),
])
def test_bad_searches_are_400_with_an_operation_outcome(
        node: Any, corpus: dict[str, str], params: list[tuple[str, str]], message: str
        ) -> None:
    assert message in outcome(get(node, "/ImagingStudy", "admin", params), 400)


def test_unknown_parameters_are_left_out_when_lenient_handling_is_preferred(
        node: Any, corpus: dict[str, str]) -> None:
    params = [("name", "DOE"), ("patient", "ALICE-1")]
    outcome(get(node, "/ImagingStudy", "admin", params), 400)
    answer = get(node, "/ImagingStudy", "admin", params, {"Prefer": "handling=lenient"})
    assert answer.status_code == 200, answer.text
    assert [e["resource"]["id"] for e in answer.json()["entry"]] == [corpus["A"]]


def test_refusals_are_operation_outcomes(node: Any, corpus: dict[str, str]) -> None:
    anonymous = get(node, "/ImagingStudy", None)
    outcome(anonymous, 403)  # anonymous: no Query rule
    wrong = requests.get(fhir_url(node) + "/ImagingStudy", auth=("alice", "wrong"),
                         timeout=30)
    outcome(wrong, 401)
    assert "Basic" in wrong.headers["www-authenticate"]
    assert "no Query rule for bob" in outcome(get(node, "/ImagingStudy", "bob"), 403)
    outcome(get(node, "/ImagingStudy", headers={"Accept": "application/fhir+xml"}), 406)
    outcome(get(node, "/ImagingStudy", params={"_format": "xml"}), 406)
    outcome(get(node, "/Observation/1"), 404)  # no such resource type here
    assert "dot segment" in outcome(get(node, "/ImagingStudy/%2e%2e"), 400)
    outcome(requests.post(fhir_url(node) + "/ImagingStudy",
                          auth=("admin", PASSWORDS["admin"]), timeout=30), 405)
    # and the service goes on
    assert search(node)["total"] == 3

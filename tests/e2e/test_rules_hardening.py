"""Access rules that cannot be walked around (a real node on FerretDB, pynetdicom users).

- A Store rule covers what a store overwrites or joins: another patient's SOP Instance
  UID or study cannot be taken over, by a restricted user (0x0124) nor by anyone
  (0xC409, hierarchy conflict), and nothing changes.
- A study shared by a visible and a hidden patient (``hierarchy_conflicts: accept``):
  the restricted user's answers -- entities, attributes, counts -- are those of an
  archive holding only what she may see, and a retrieve naming the hidden patient
  sends nothing, exactly as for a patient that does not exist.
- Retrieve rules may name the Move Destinations they allow.
- A wild card built to make a back-tracking matcher explode is answered at once, and
  the node keeps answering others meanwhile.
"""

from __future__ import annotations

import threading
import time
from io import BytesIO
from typing import Any

import pytest
from acl_clients import REFRESH, by_key, c_find, c_get, c_move, scu, use_rules
from helpers import CT_IMAGE, MR_IMAGE, StoreSCP, make_dataset, to_part10
from pydicom import dcmread
from pydicom.dataset import Dataset

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

UID = "1.2.826.0.1.3680043.10.3031"
RULES = """\
rules:
  - {principal: "*", service: Echo}
  - {principal: admin, service: "*"}
  - {principal: alice, service: Query, pattern: {PatientID: "TRIAL42-*"}}
  - principal: alice
    service: Retrieve
    pattern: {PatientID: "TRIAL42-*"}
    destinations: [CAPTURE]
  - {principal: alice, service: Store, pattern: {PatientID: "TRIAL42-*"}}
"""


def dataset(patient: str, study: str, series: str, number: int, *, modality: str = "CT",
            description: str = "PROJECT", name: str = "") -> Dataset:
    ds = make_dataset(patient_id=patient, patient_name=name or f"{patient}^NAME",
                      study_uid=f"{UID}.{study}", series_uid=f"{UID}.{study}.{series}",
                      sop_uid=f"{UID}.{study}.{series}.{number}", modality=modality,
                      sop_class=CT_IMAGE if modality == "CT" else MR_IMAGE,
                      StudyDescription=description, InstanceNumber=number)
    return dcmread(BytesIO(to_part10(ds)))


#: A study shared by TRIAL42-1 and the hidden OTHER-9 (one series each, and one series
#: holding both), stored in this order; OTHER-9's are stored last, so the study document
#: holds OTHER-9's attributes.
SHARED = [
    ("TRIAL42-1", "1", "1", 1, "CT", "PROJECT"),
    ("TRIAL42-1", "1", "3", 1, "CT", "PROJECT"),
    ("OTHER-9", "1", "2", 1, "MR", "SECRET"),
    ("OTHER-9", "1", "3", 2, "MR", "SECRET"),
    ("TRIAL42-2", "2", "1", 1, "CT", "PROJECT " + "A" * 56),  # LO at its longest
    ("OTHER-9", "3", "1", 1, "MR", "SECRET"),
]


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Any:
    scp = StoreSCP(tmp_path_factory.mktemp("rules-capture") / "in").start()
    yield scp
    scp.stop()


def start(factory: Any, capture: StoreSCP, rows: list[tuple[Any, ...]]) -> Any:
    node = factory.start({
        "acl": {"enabled": True, "refresh_seconds": REFRESH},
        "auth": {"backend": "none"},
        "hierarchy_conflicts": "accept",
        "destinations": {"CAPTURE": {"host": "127.0.0.1", "port": capture.port},
                         "ELSEWHERE": {"host": "127.0.0.1", "port": capture.port}},
    })
    use_rules(node, RULES)
    with scu(node, "admin") as admin:
        for row in rows:
            patient, study, series, number, modality, description = row
            assert admin.send_c_store(dataset(patient, study, series, number,
                                              modality=modality,
                                              description=description)).Status == 0
    return node


@pytest.fixture(scope="module")
def shared(module_node_factory: Any, capture: StoreSCP) -> Any:
    """The archive with the hidden patient's instances."""
    return start(module_node_factory, capture, SHARED)


@pytest.fixture(scope="module")
def alone(module_node_factory: Any, capture: StoreSCP) -> Any:
    """The same archive without them: what alice must not be able to tell apart."""
    return start(module_node_factory, capture, [r for r in SHARED if r[0] != "OTHER-9"])


QUERIES = [
    ("PATIENT", {"PatientID": "", "PatientName": "", "NumberOfPatientRelatedStudies": "",
                 "NumberOfPatientRelatedSeries": "", "NumberOfPatientRelatedInstances": ""}),
    ("STUDY", {"StudyInstanceUID": "", "PatientID": "", "PatientName": "",
               "StudyDescription": "", "ModalitiesInStudy": "",
               "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": ""}),
    ("STUDY", {"StudyInstanceUID": "", "StudyDescription": "SECRET"}),
    ("STUDY", {"StudyInstanceUID": "", "ModalitiesInStudy": "MR"}),
    ("STUDY", {"StudyInstanceUID": "", "PatientName": "OTHER*"}),
    ("STUDY", {"StudyInstanceUID": "", "NumberOfStudyRelatedInstances": "4"}),
    ("SERIES", {"StudyInstanceUID": f"{UID}.1", "SeriesInstanceUID": "", "Modality": "",
                "PatientID": "", "NumberOfSeriesRelatedInstances": ""}),
    ("IMAGE", {"StudyInstanceUID": f"{UID}.1", "SOPInstanceUID": "", "PatientID": ""}),
    ("PATIENT", {"PatientID": "OTHER-9", "NumberOfPatientRelatedInstances": ""}),
]


def rows(matches: list[Dataset]) -> list[str]:
    out = []
    for ds in matches:
        row = ds.to_json_dict()
        if row.get("00080061", {}).get("Value"):
            row["00080061"]["Value"] = sorted(row["00080061"]["Value"])
        out.append(repr(sorted(row.items())))
    return sorted(out)


@pytest.mark.parametrize(("level", "keys"), QUERIES,
                         ids=[f"{lvl}-{'-'.join(k for k, v in keys.items() if v) or 'all'}"
                              for lvl, keys in QUERIES])
def test_a_restricted_user_cannot_tell_hidden_data_is_there(shared: Any, alone: Any,
                                                            level: str,
                                                            keys: dict[str, str]) -> None:
    with scu(shared, "alice") as there, scu(alone, "alice") as absent:
        seen, expected = c_find(there, level, **keys), c_find(absent, level, **keys)
    assert seen[0] == expected[0] == 0x0000
    assert rows(seen[1]) == rows(expected[1])


def test_her_study_keeps_her_patient_and_counts(shared: Any) -> None:
    with scu(shared, "alice") as alice:
        _, studies, _ = c_find(alice, "STUDY", PatientID="", StudyInstanceUID=f"{UID}.1",
                               PatientName="", StudyDescription="", ModalitiesInStudy="",
                               NumberOfStudyRelatedInstances="")
    assert by_key(studies, "StudyInstanceUID", "PatientID", "StudyDescription",
                  "ModalitiesInStudy", "NumberOfStudyRelatedInstances") == {
        f"{UID}.1": {"PatientID": "TRIAL42-1", "StudyDescription": "PROJECT",
                     "ModalitiesInStudy": ["CT"], "NumberOfStudyRelatedInstances": "2"}}


def test_a_retrieve_naming_a_hidden_patient_selects_nothing(shared: Any) -> None:
    hidden = c_get(shared, "alice", "PATIENT", PatientID="OTHER-9")
    missing = c_get(shared, "alice", "PATIENT", PatientID="NOBODY-0")
    assert hidden == missing
    assert hidden[1:] == (0, [])
    # her own patient, in the shared study too, comes whole -- and only hers
    status, completed, received = c_get(shared, "alice", "STUDY", PatientID="TRIAL42-1",
                                        StudyInstanceUID=f"{UID}.1")
    assert (status, completed) == (0x0000, 2)
    assert sorted(received) == [f"{UID}.1.1.1", f"{UID}.1.3.1"]
    assert c_get(shared, "alice", "STUDY", StudyInstanceUID=f"{UID}.3")[1:] == (0, [])


def test_retrieve_rules_name_their_destinations(shared: Any) -> None:
    assert c_move(shared, "alice", "CAPTURE", "PATIENT", PatientID="TRIAL42-2") == (0, 1)
    status, completed = c_move(shared, "alice", "ELSEWHERE", "PATIENT",
                               PatientID="TRIAL42-2")
    assert (status, completed) == (0x0124, 0)
    assert c_move(shared, "admin", "ELSEWHERE", "PATIENT", PatientID="TRIAL42-2") == (0, 1)


def test_a_store_cannot_take_over_another_patients_instance_or_study(shared: Any) -> None:
    db = shared.db
    before = {d["_id"]: d["file_id"] for d in db.instances.find({}, {"file_id": 1})}
    # a TRIAL42 dataset re-using OTHER-9's SOP Instance UID, and one joining its study
    reused = dataset("TRIAL42-7", "3", "1", 1)
    joining = dataset("TRIAL42-7", "3", "1", 5)
    with scu(shared, "alice") as alice:
        for ds in (reused, joining):
            rsp = alice.send_c_store(ds)
            assert rsp.Status == 0x0124
            assert rsp.ErrorComment == "not authorized: stored data outside the Store rules"
    after = {d["_id"]: d["file_id"] for d in db.instances.find({}, {"file_id": 1})}
    assert after == before  # the other patient's instance and file untouched


def test_anyone_storing_into_another_patients_study_gets_a_conflict(
        module_node_factory: Any, capture: StoreSCP) -> None:
    node = module_node_factory.start({"acl": {"enabled": False}})
    with scu(node) as assoc:
        assert assoc.send_c_store(dataset("P-A", "8", "1", 1)).Status == 0
        for ds, comment in (
                (dataset("P-B", "8", "2", 1), "Study Instance UID belongs to another patient"),
                (dataset("P-B", "8", "1", 1), "SOP Instance UID belongs to another patient"),
                (dataset("P-A", "9", "1", 2), "Series Instance UID belongs to another study")):
            # (the last: series 8.1's UID is reused under another study UID)
            if comment.startswith("Series"):
                ds.SeriesInstanceUID = f"{UID}.8.1"
            rsp = assoc.send_c_store(ds)
            assert (rsp.Status, rsp.ErrorComment) == (0xC409, comment)
    assert [d["_id"] for d in node.db.instances.find()] == [f"{UID}.8.1.1"]


def test_a_pathological_wild_card_does_not_hold_the_node(shared: Any) -> None:
    """``*?*?*?...b`` against long values: exponential for a back-tracking matcher,
    which froze every association; answered at once now, echoes meanwhile too."""
    value = "*?" * 24 + "b"
    echoes: list[float] = []
    done = threading.Event()

    def echo() -> None:
        with scu(shared) as assoc:
            while not done.is_set():
                started = time.perf_counter()
                assert assoc.send_c_echo().Status == 0
                echoes.append(time.perf_counter() - started)
                time.sleep(0.05)

    thread = threading.Thread(target=echo)
    thread.start()
    try:
        started = time.perf_counter()
        # by Study Instance UID (the archive walks to the study and matches it itself),
        # and as a restricted user (her keys are matched by the node after the rules)
        with scu(shared, "admin") as admin, scu(shared, "alice") as alice:
            for user, study in ((admin, f"{UID}.2"), (alice, ""), (admin, "")):
                for keyword in ("StudyDescription", "PatientName", "PatientID"):
                    status, matches, _ = c_find(user, "STUDY", StudyInstanceUID=study,
                                                **{keyword: value})
                    assert (status, matches) == (0x0000, [])
        elapsed = time.perf_counter() - started
    finally:
        done.set()
        thread.join(30)
    assert elapsed < 5, elapsed
    assert echoes and max(echoes) < 2, echoes

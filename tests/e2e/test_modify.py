"""Correcting stored instances, over the wire: ``archive modify`` on a running node's
database (the node a subprocess on the real FerretDB), checked with DCMTK storescu /
storescp, pynetdicom C-FIND / C-GET, WADO-RS and ``archive check``.

- a correction is served at once by C-FIND, C-MOVE, C-GET and WADO-RS; the file is
  the original but for the corrected values and its Original Attributes Sequence;
- a study moved to another patient takes that patient's attributes, and every count,
  child list and ModalitiesInStudy is what the instances make them;
- --history lists the correction, --restore brings back the original bytes exactly;
- corrections racing with C-STORE and C-FIND leave an exact archive;
- the database killed in the middle of a correction: once it is back, the journal
  replay completes it (no study half-moved), and nothing is orphaned.
"""

from __future__ import annotations

import getpass
import json
import random
import subprocess
import sys
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import requests
from acl_clients import archive_cli, c_find, scu
from conftest import FerretDB, node_environment
from helpers import (
    CT_IMAGE,
    ROOT,
    StoreSCP,
    association,
    consistency_problems,
    identifier,
    make_dataset,
    settled_counters,
    to_part10,
    wait_for,
)
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import build_role, evt
from pynetdicom.sop_class import CTImageStorage
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE
from test_delete import check_clean, find_open, send, write_study

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Any:
    scp = StoreSCP(tmp_path_factory.mktemp("modify-capture") / "in").start()
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def node(module_node_factory: Any, capture: StoreSCP) -> Any:
    return module_node_factory({"destinations": {
        capture.ae_title: {"host": "127.0.0.1", "port": capture.port}}})


def stored_bytes(node: Any, sop: str) -> bytes:
    """The Part-10 file an instance document names, read from GridFS."""
    doc = node.db.instances.find_one({"_id": sop}, {"file_id": 1})
    return gridfs_bytes(node, doc["file_id"])


def gridfs_bytes(node: Any, file_id: Any) -> bytes:
    chunks = node.db["fs.chunks"].find({"files_id": file_id}).sort("n", 1)
    return b"".join(bytes(c["data"]) for c in chunks)


def c_get_datasets(node: Any, level: str, **keys: Any) -> dict[str, Any]:
    """The datasets a C-GET delivers, by SOP Instance UID."""
    received: dict[str, Any] = {}

    def on_store(event: Any) -> int:
        received[str(event.dataset.SOPInstanceUID)] = event.dataset
        return 0x0000
    with association(node, [(GET, ExplicitVRLittleEndian),
                            (CTImageStorage, ExplicitVRLittleEndian),
                            (CTImageStorage, ImplicitVRLittleEndian)],
                     ext_neg=[build_role(CTImageStorage, scp_role=True)],
                     evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
        for status, _ in assoc.send_c_get(identifier(level, **keys), GET):
            assert status is not None and status.Status in (0x0000, 0xFF00), status
    return received


def c_move(node: Any, destination: str, level: str, **keys: Any) -> int:
    final = 0xFFFF
    with association(node, [(MOVE, ExplicitVRLittleEndian)]) as assoc:
        for status, _ in assoc.send_c_move(identifier(level, **keys), destination, MOVE):
            final = int(status.Status)
    return final


def find_patients(node: Any, **keys: Any) -> list[Any]:
    """C-FIND at PATIENT level (Patient Root)."""
    with scu(node) as assoc:
        status, found, _ = c_find(assoc, "PATIENT", **keys)
    assert status == 0x0000
    return found


def modify(node: Any, *args: str) -> subprocess.CompletedProcess:
    return archive_cli(node, "modify", *args)


# --- a correction, served -----------------------------------------------------------


def test_a_correction_is_served_by_find_move_get_and_wado_with_the_rest_of_the_file_kept(
        node: Any, capture: StoreSCP, tmp_path: Path) -> None:
    study, files = write_study(tmp_path / "a", 4, patient_id="FIX-1", series=2)
    send(node, files)
    wait_for(lambda: settled_counters(node.db) == [], 30)
    sops = sorted(d["_id"] for d in node.db.instances.find({"StudyInstanceUID": study}))
    before = {sop: stored_bytes(node, sop) for sop in sops}

    dry = modify(node, f"StudyInstanceUID={study}", "--set", "PatientName=ROE^JANE",
                 "--set", "StudyDescription=Head CT", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "PatientName -> 'ROE^JANE'" in dry.stdout and "nothing changed" in dry.stdout
    assert stored_bytes(node, sops[0]) == before[sops[0]]

    done = modify(node, f"StudyInstanceUID={study}", "--set", "PatientName=ROE^JANE",
                  "--set", "StudyDescription=Head CT", "--reason", "wrong name at the desk")
    assert done.returncode == 0, done.stderr
    assert "corrected 4 instances" in done.stdout

    # C-FIND: the study and the patient answer the corrected values
    [answer] = find_open(node, "STUDY", StudyInstanceUID=study, PatientName="",
                         StudyDescription="", NumberOfStudyRelatedInstances="")
    assert (str(answer.PatientName), answer.StudyDescription,
            answer.NumberOfStudyRelatedInstances) == ("ROE^JANE", "Head CT", 4)
    assert [str(p.PatientName) for p in find_patients(node, PatientID="FIX-1",
                                                      PatientName="")] == ["ROE^JANE"]
    # C-GET and WADO-RS: the corrected datasets
    got = c_get_datasets(node, "STUDY", StudyInstanceUID=study)
    assert sorted(got) == sops
    assert {(str(ds.PatientName), ds.StudyDescription) for ds in got.values()} == {
        ("ROE^JANE", "Head CT")}
    metadata = requests.get(f"{node.http_url}/studies/{study}/metadata", timeout=30,
                            headers={"Accept": "application/dicom+json"}).json()
    assert {m["00100010"]["Value"][0]["Alphabetic"] for m in metadata} == {"ROE^JANE"}
    # C-MOVE (storescp keeps the bytes as they arrive): the corrected files
    capture.take()
    assert c_move(node, capture.ae_title, "STUDY", StudyInstanceUID=study) == 0x0000
    moved = capture.take()
    assert sorted(moved) == sops

    # the stored file: the same transfer syntax, the same elements but the corrected
    # ones, the old values in its Original Attributes Sequence
    for sop in sops:
        old, new = dcmread(BytesIO(before[sop])), dcmread(BytesIO(stored_bytes(node, sop)))
        assert new.file_meta.TransferSyntaxUID == old.file_meta.TransferSyntaxUID
        assert dcmread(BytesIO(moved[sop])).PatientName == "ROE^JANE"
        changed = {0x00100010, 0x00081030, 0x04000561}
        assert {e.tag for e in old if e.tag not in changed} == \
            {e.tag for e in new if e.tag not in changed}
        for elem in old:
            if elem.tag not in changed:
                assert new[elem.tag] == elem
        [item] = new.OriginalAttributesSequence
        assert item.ReasonForTheAttributeModification == "CORRECT"
        [previous] = item.ModifiedAttributesSequence
        assert str(previous.PatientName) == "DOE^JOHN" and "StudyDescription" in previous

    history = modify(node, f"StudyInstanceUID={study}", "--history", "--json")
    rows = json.loads(history.stdout)
    assert len(rows) == 4 and {r["by"] for r in rows} == {getpass.getuser()}
    assert rows[0]["changed"] == {"PatientName": "DOE^JOHN", "StudyDescription": None}
    assert rows[0]["reason"] == "wrong name at the desk"
    audit = archive_cli(node, "audit", "--user", getpass.getuser(), "--limit", "1")
    assert "MODIFY Modify allowed 0x0000 instances=4" in audit.stdout
    assert "PatientName=ROE^JANE" in audit.stdout
    check_clean(node)

    # restore: the original bytes exactly, served again
    restored = modify(node, f"StudyInstanceUID={study}", "--restore")
    assert restored.returncode == 0, restored.stderr
    assert {sop: stored_bytes(node, sop) for sop in sops} == before
    assert [str(a.PatientName) for a in find_open(node, "STUDY", StudyInstanceUID=study,
                                                  PatientName="")] == ["DOE^JOHN"]
    assert node.db.instances.count_documents({"StudyInstanceUID": study,
                                              "history": {"$exists": True}}) == 0
    assert_exact(node)  # the corrected files are gone with their history


# --- moving to another patient ---------------------------------------------------------


def test_a_study_moved_to_another_patient_takes_its_attributes_and_every_count_is_exact(
        node: Any, tmp_path: Path) -> None:
    moving, moving_files = write_study(tmp_path / "a", 5, patient_id="MOVE-A", series=2)
    staying, staying_files = write_study(tmp_path / "b", 2, patient_id="MOVE-A",
                                         modality="MR")
    target, target_files = [], []
    ds = make_dataset(patient_id="MOVE-B", patient_name="RIGHT^PATIENT",
                      PatientBirthDate="19700101", PatientSex="F", modality="MR")
    (tmp_path / "c.dcm").write_bytes(to_part10(ds))
    target, target_files = [str(ds.StudyInstanceUID)], [tmp_path / "c.dcm"]
    send(node, moving_files + staying_files + target_files)
    wait_for(lambda: settled_counters(node.db) == [], 30)

    # part of a study cannot go to another patient; UIDs are never changed
    series = node.db.instances.find_one({"StudyInstanceUID": moving})["SeriesInstanceUID"]
    partial = modify(node, f"SeriesInstanceUID={series}", "--set", "PatientID=MOVE-B")
    assert partial.returncode == 1 and "whole studies" in partial.stderr
    uid = modify(node, f"StudyInstanceUID={moving}", "--set", f"StudyInstanceUID={generate_uid()}")
    assert uid.returncode == 2 and "cannot be changed" in uid.stderr
    assert "Traceback" not in partial.stderr + uid.stderr

    done = modify(node, f"StudyInstanceUID={moving}", "--set", "PatientID=MOVE-B")
    assert done.returncode == 0, done.stderr
    patients = {str(p.PatientID): p for p in find_patients(
        node, PatientID="MOVE-*", PatientName="", PatientBirthDate="",
        NumberOfPatientRelatedStudies="", NumberOfPatientRelatedSeries="",
        NumberOfPatientRelatedInstances="")}
    counts = {pid: (str(p.PatientName), p.NumberOfPatientRelatedStudies,
                    p.NumberOfPatientRelatedSeries, p.NumberOfPatientRelatedInstances)
              for pid, p in patients.items()}
    assert counts == {"MOVE-A": ("DOE^JOHN", 2 - 1, 1, 2),
                      "MOVE-B": ("RIGHT^PATIENT", 2, 3, 6)}
    assert patients["MOVE-B"].PatientBirthDate == "19700101"
    studies = {s.StudyInstanceUID: s for s in find_open(
        node, "STUDY", PatientID="MOVE-B", StudyInstanceUID="", PatientName="",
        ModalitiesInStudy="", NumberOfStudyRelatedSeries="",
        NumberOfStudyRelatedInstances="")}
    assert set(studies) == {moving, *target}
    assert (studies[moving].NumberOfStudyRelatedSeries,
            studies[moving].NumberOfStudyRelatedInstances,
            studies[moving].ModalitiesInStudy, str(studies[moving].PatientName)) == (
        2, 5, "CT", "RIGHT^PATIENT")
    # the patient is one consistent entity: no variant left from before
    doc = node.db.patients.find_one({"_id": "MOVE-B"})
    assert len(doc["variants"]["PATIENT"]) == 1 and sorted(doc["studies"]) == sorted(
        [moving, *target])
    assert node.db.studies.find_one({"_id": moving})["PatientID"] == "MOVE-B"
    check_clean(node)
    # the level documents are what a rebuild from the instances makes them
    assert_levels_as_rebuilt(node, [moving, staying, *target])

    # restore moves it back: both patients as they were
    assert modify(node, f"StudyInstanceUID={moving}", "--restore").returncode == 0
    assert {str(p.PatientID): p.NumberOfPatientRelatedInstances for p in find_patients(
        node, PatientID="MOVE-*", NumberOfPatientRelatedInstances="")} == {
        "MOVE-A": 7, "MOVE-B": 1}
    assert_exact(node)


def assert_exact(node: Any) -> None:
    """check_clean without its command (~2 s): every count exact, no orphan file."""
    assert settled_counters(node.db) == []
    assert consistency_problems(node.db) == []


def assert_levels_as_rebuilt(node: Any, studies: list[str]) -> None:
    """Each study's level documents equal those an exact rebuild computes."""
    from archive.levels import Levels

    levels = Levels(node.db)
    for uid in studies:
        study = node.db.studies.find_one({"_id": uid})
        want = levels.study_fields(uid, study["series"])
        for key in ("series", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                    "ModalitiesInStudy", "SOPClassesInStudy", "PatientID", "variants",
                    "dataset"):
            got = sorted(study[key]) if key == "series" else study[key]
            assert got == (sorted(want[key]) if key == "series" else want[key]), key
        patient = node.db.patients.find_one({"_id": study["PatientID"]})
        want = levels.patient_fields(patient["_id"], patient["studies"])
        for key in ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                    "NumberOfPatientRelatedInstances", "variants", "dataset"):
            assert patient[key] == want[key], key


# --- concurrency and failures ----------------------------------------------------------


def test_corrections_racing_with_stores_and_queries_leave_an_exact_archive(
        node: Any) -> None:
    """C-STORE streams into the study being corrected while C-FIND asks and the study's
    description is corrected again and again: every store is acknowledged and counted,
    every C-FIND succeeds, every instance the last correction saw carries its value."""
    study, series = generate_uid(), generate_uid()
    first = make_dataset(patient_id="RACE-M", study_uid=study, series_uid=series)
    with association(node, [(CT_IMAGE, ExplicitVRLittleEndian)]) as assoc:
        assert assoc.send_c_store(dcmread(BytesIO(to_part10(first)))).Status == 0x0000
    stop = threading.Event()
    acknowledged: list[str] = [str(first.SOPInstanceUID)]
    errors: list[str] = []

    def store() -> None:
        with association(node, [(CT_IMAGE, ExplicitVRLittleEndian)]) as assoc:
            n = 0
            while not stop.is_set():
                n += 1
                ds = make_dataset(patient_id="RACE-M", study_uid=study, series_uid=series,
                                  InstanceNumber=n + 1)
                status = assoc.send_c_store(dcmread(BytesIO(to_part10(ds)))).Status
                if status == 0x0000:
                    acknowledged.append(str(ds.SOPInstanceUID))
                else:
                    errors.append(f"C-STORE 0x{status:04X}")
                time.sleep(0.05)  # a modality's pace: the study grows as it is corrected

    def query() -> None:
        with association(node, [(FIND, ExplicitVRLittleEndian)]) as assoc:
            while not stop.is_set():
                for status, _ in assoc.send_c_find(identifier(
                        "STUDY", StudyInstanceUID=study, NumberOfStudyRelatedInstances=""),
                        FIND):
                    if status.get("Status") not in (0xFF00, 0x0000):  # (none: no answer)
                        errors.append(f"C-FIND {status.get('Status')}")

    threads = [threading.Thread(target=store), threading.Thread(target=query)]
    for thread in threads:
        thread.start()
    try:
        for n in range(2):
            result = modify(node, f"StudyInstanceUID={study}", "--set",
                            f"StudyDescription=pass {n}")
            assert result.returncode == 0, result.stderr
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert errors == [] and len(acknowledged) > 5
    wait_for(lambda: not node.journal_pending(), 30)
    stored = {d["_id"]: d for d in node.db.instances.find({"StudyInstanceUID": study})}
    assert set(stored) == set(acknowledged)
    corrected = [d for d in stored.values() if d.get("history")]
    assert corrected and {d["dataset"]["00081030"]["Value"][0] for d in corrected
                          if len(d["history"]) == 2} <= {"pass 1"}
    [answer] = find_open(node, "STUDY", StudyInstanceUID=study,
                         NumberOfStudyRelatedInstances="")
    assert answer.NumberOfStudyRelatedInstances == len(acknowledged)
    check_clean(node)


def test_a_database_killed_in_the_middle_of_a_move_leaves_no_study_half_moved(
        node_factory: Any, private_ferretdb: FerretDB, tmp_path: Path) -> None:
    node = node_factory(ferret=private_ferretdb)
    study, files = write_study(tmp_path / "big", 60, patient_id="KILL-A", series=3)
    kept, kept_files = write_study(tmp_path / "kept", 2, patient_id="KILL-A")
    send(node, files + kept_files)
    wait_for(lambda: settled_counters(node.db) == [], 60)

    command = subprocess.Popen(
        [sys.executable, "-m", "archive", "modify", f"StudyInstanceUID={study}", "--set",
         "PatientID=KILL-B", "--config", str(node.config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=node_environment())
    deadline = time.monotonic() + 60
    while not list(node.journal.glob("modify-*.json")):
        assert command.poll() is None, command.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.001)
    delay = random.uniform(0, 1.0)  # new files, then documents, then levels: ~1 s here
    print(f"database killed {delay:.2f} s after the modify's journal entry appeared")
    time.sleep(delay)
    private_ferretdb.stop(kill=True)
    out, err = command.communicate(timeout=120)
    private_ferretdb.start()
    wait_for(lambda: not node.journal_pending(), 60)
    patients = {d["PatientID"] for d in node.db.instances.find({"StudyInstanceUID": study})}
    if command.returncode == 0:  # it finished before the kill
        assert patients == {"KILL-B"}, out + err
    else:
        assert patients in ({"KILL-A"}, {"KILL-B"}), patients  # never half-moved
    assert node.db.instances.count_documents({"StudyInstanceUID": study}) == 60
    assert node.db.instances.count_documents({"StudyInstanceUID": kept,
                                              "PatientID": "KILL-A"}) == 2
    check_clean(node)

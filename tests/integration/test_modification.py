"""Correcting on a real FerretDB, the database failing at each step of a move: the
journal replay leaves the study wholly under one patient (the old one before every new
file was written, the new one after), every count exact, no file orphaned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import FerretDB, unique_name
from helpers import make_dataset, to_part10
from pydicom.uid import generate_uid
from pymongo.errors import AutoReconnect
from test_deletion import _exact, _keys, _store

from archive.modification import ModifyIncomplete
from archive.rewrite import parse_change
from archive.storage import Archive, ensure_indexes

pytestmark = [pytest.mark.ferretdb, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture
def archive(ferretdb: FerretDB, tmp_path: Path) -> Any:
    name = unique_name("mod")
    db = ferretdb.client[name]
    ensure_indexes(db)
    yield Archive(db, "fs", "replace", tmp_path / "journal")
    ferretdb.client.drop_database(name)


def _failing_after(calls: int, real: Any) -> Any:
    """``real``, failing as a dropped connection does from its ``calls``-th call on."""
    count = {"n": 0}

    def call(*args: Any, **kwargs: Any) -> Any:
        count["n"] += 1
        if count["n"] > calls:
            raise AutoReconnect("connection closed")
        return real(*args, **kwargs)
    return call


@pytest.mark.parametrize("step, where, calls, moved", [
    ("files", "put", 2, False),            # some new files written, not all
    ("documents", "replace_one", 2, True),  # some instance documents replaced
    ("levels", "fold", 1, True),          # taken out of the old place, half counted in
])
def test_a_move_the_database_interrupts_is_finished_whole_by_the_journal(
        archive: Archive, monkeypatch: pytest.MonkeyPatch, step: str, where: str,
        calls: int, moved: bool) -> None:
    study = generate_uid()
    _store(archive, 3, study_uid=study, patient_id="A")
    _store(archive, 2, study_uid=study, patient_id="A", modality="MR")
    other = _store(archive, 1, patient_id="A")
    selected = archive.select(_keys(StudyInstanceUID=study)).instances
    if where == "replace_one":  # a collection's methods cannot be patched: a stand-in
        archive.levels.instances = _Collection(archive.levels.instances, calls)
    else:
        target = archive.files if where == "put" else archive.levels
        monkeypatch.setattr(target, where, _failing_after(calls, getattr(target, where)))
    changes = {0x00100020: parse_change("PatientID=B")}
    with pytest.raises(ModifyIncomplete):
        archive.modify(selected, changes, "tester", "", "TEST")
    monkeypatch.undo()
    # a later process (a restarted node, the next command) replays the journal
    again = Archive(archive.db, "fs", "replace", archive.journal.folder)
    again.reconcile()
    assert len(again.journal) == 0
    patients = {d["PatientID"] for d in again.instances.find({"StudyInstanceUID": study})}
    assert patients == ({"B"} if moved else {"A"}), step
    assert again.instances.count_documents({"StudyInstanceUID": study}) == 5
    assert [d["_id"] for d in again.instances.find({"PatientID": "A",
                                                     "StudyInstanceUID": {"$ne": study}})
            ] == other
    assert _exact(again) == []


class _Collection:
    """An instances collection whose ``replace_one`` fails from the n-th call on."""

    def __init__(self, real: Any, calls: int) -> None:
        self._real = real
        self.replace_one = _failing_after(calls, real.replace_one)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_a_corrected_instance_sent_again_keeps_its_originals_and_a_delete_takes_them(
        archive: Archive) -> None:
    study = generate_uid()
    ds = make_dataset(study_uid=study, patient_id="A")
    part10 = to_part10(ds)
    assert archive.store(part10).ok
    _store(archive, 1, study_uid=study, patient_id="A")
    selected = archive.select(_keys(StudyInstanceUID=study)).instances
    assert archive.modify(selected, {0x00100010: parse_change("PatientName=X^Y")}, "tester",
                          "typo", "TEST") == (2, 0, 0)
    files = archive.db["fs.files"].count_documents({})
    # the same correction again changes nothing: no new file, no history
    selected = archive.select(_keys(StudyInstanceUID=study)).instances
    assert archive.modify(selected, {0x00100010: parse_change("PatientName=X^Y")}, "tester",
                          "", "TEST") == (0, 0, 2)
    assert archive.db["fs.files"].count_documents({}) == files
    assert len(archive.instances.find_one({"_id": ds.SOPInstanceUID})["history"]) == 1
    original = archive.instances.find_one({"_id": ds.SOPInstanceUID})["history"][0]
    assert archive.files.read(original["file_id"]) == part10
    # the modality sends the uncorrected instance again: stored as sent, history kept
    assert archive.store(part10).replaced
    again = archive.instances.find_one({"_id": ds.SOPInstanceUID})
    assert again["history"] == [original]
    assert again["dataset"]["00100010"]["Value"] == [{"Alphabetic": "DOE^JOHN"}]
    assert _exact(archive) == []
    # a delete takes the originals with the instances: no file left behind
    assert archive.delete(archive.select(_keys(StudyInstanceUID=study)).instances) == 2
    assert archive.db["fs.files"].count_documents({}) == 0
    assert _exact(archive) == []


def test_a_store_claiming_the_old_patient_after_a_move_is_counted_exactly(
        archive: Archive) -> None:
    """A node batches the level updates of a series it knows; a correction in another
    process moves that series to another patient: the node's next batch for the old
    patient must not count into the moved documents (it fails, the journal rebuilds)."""
    node = Archive(archive.db, "fs", "replace", archive.journal.folder, write_behind=60)
    study, series = generate_uid(), generate_uid()
    for _ in range(3):  # the first one teaches the node the series, the next are batched
        assert node.store(to_part10(make_dataset(study_uid=study, series_uid=series,
                                                 patient_id="A"))).ok
    node.flush()
    _store(archive, 1, patient_id="A")  # A keeps a study: its document stays
    selected = archive.select(_keys(StudyInstanceUID=study)).instances
    assert archive.modify(selected, {0x00100020: parse_change("PatientID=B")}, "tester",
                          "", "TEST") == (3, 0, 0)
    late = node.store(to_part10(make_dataset(study_uid=study, series_uid=series,
                                             patient_id="A")))
    assert late.ok
    node.flush()
    node.reconcile()
    assert _exact(node) == []
    assert node.instances.count_documents({"StudyInstanceUID": study}) == 4


def test_a_study_moved_to_an_existing_patient_takes_all_its_patient_attributes(
        archive: Archive) -> None:
    """Name, sex, a sequence of other IDs: the patient's; a birth date it lacks: gone."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    other_id = Dataset()
    other_id.PatientID = "HOSP-9"
    other_id.TypeOfPatientID = "TEXT"
    target = make_dataset(patient_id="B", patient_name="RIGHT^NAME", PatientSex="F",
                          OtherPatientIDsSequence=Sequence([other_id]))
    assert archive.store(to_part10(target)).ok
    study = generate_uid()
    _store(archive, 2, study_uid=study, patient_id="A", PatientBirthDate="19990101",
           PatientSex="M")
    selected = archive.select(_keys(StudyInstanceUID=study)).instances
    changes = archive.modifier.adopted({0x00100020: parse_change("PatientID=B")})
    assert archive.modify(selected, changes, "tester", "", "TEST") == (2, 0, 0)
    patient = archive.patients.find_one({"_id": "B"})
    assert len(patient["variants"]["PATIENT"]) == 1  # one consistent patient
    assert patient["NumberOfPatientRelatedInstances"] == 3
    moved = archive.instances.find_one({"StudyInstanceUID": study})
    assert moved["dataset"]["00100010"]["Value"] == [{"Alphabetic": "RIGHT^NAME"}]
    assert "00100030" not in moved["dataset"]  # the birth date B does not have
    assert moved["dataset"]["00101002"]["Value"][0]["00100020"]["Value"] == ["HOSP-9"]
    assert moved["history"][0]["changed"]["PatientBirthDate"] == "19990101"
    assert _exact(archive) == []

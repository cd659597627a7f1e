"""Storing instances (mongomock): documents, counters, GridFS, duplicates, failures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mongomock
import pytest
from bson import ObjectId
from helpers import (
    CT_IMAGE,
    MR_IMAGE,
    consistency_problems,
    counter_problems,
    make_dataset,
    part10_with_raw_dataset,
    to_part10,
)
from pymongo.errors import AutoReconnect

from archive.check import check
from archive.gridstore import CHUNK_SIZE, GridStore
from archive.storage import (
    CANNOT_UNDERSTAND,
    DUPLICATE_SOP_INSTANCE,
    OUT_OF_RESOURCES,
    SUCCESS,
    Archive,
    StoreRefused,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PIXELS = bytes(range(256)) * 32  # 8 KiB: bulk data


@pytest.fixture
def db() -> Any:
    return mongomock.MongoClient().archive


@pytest.fixture
def archive(db: Any, tmp_path: Path) -> Archive:
    return Archive(db, "fs", "replace", tmp_path / "journal")


STUDY, SERIES = "1.2.826.0.1.9", "1.2.826.0.1.9.1"


def instance(**kwargs: Any) -> bytes:
    """A Part-10 CT image; all in one study and series unless told otherwise."""
    kwargs.setdefault("PixelData", PIXELS)
    kwargs.setdefault("study_uid", STUDY)
    kwargs.setdefault("series_uid", SERIES)
    ds = make_dataset(**kwargs)
    if "PixelData" in ds:
        ds["PixelData"].VR = "OW"
    return to_part10(ds)


def nothing_written(db: Any) -> bool:
    return all(db[c].count_documents({}) == 0 for c in
               ("instances", "series", "studies", "patients", "fs.files", "fs.chunks"))


class Flaky:
    """A collection whose ``method`` raises AutoReconnect (the database went away).

    ``after`` calls succeed first; then ``times`` calls fail (None: all of them).
    ``applied``: the call reaches the database before the error (a reply lost after
    the write was done).
    """

    def __init__(self, target: Any, method: str, *, after: int = 0, times: int | None = None,
                 applied: bool = False) -> None:
        self._target, self._method = target, method
        self._after, self._times, self._applied = after, times, applied
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name != self._method:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._after > 0:
                self._after -= 1
                return attr(*args, **kwargs)
            if self._times is None or self.failures < self._times:
                self.failures += 1
                if self._applied:
                    attr(*args, **kwargs)
                raise AutoReconnect(f"injected: {name} failed")
            return attr(*args, **kwargs)
        return call


# --- GridFS ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1,
                                  2 * CHUNK_SIZE + 12345])
def test_gridstore_round_trip_is_byte_identical(db: Any, size: int) -> None:
    data = os.urandom(size)
    store = GridStore(db, "fs")

    file_id = store.put(data, "x.dcm", {"SOPInstanceUID": "1.2.3"})

    assert store.read(file_id) == data
    info = db["fs.files"].find_one({"_id": file_id})
    assert info["length"] == size
    assert info["chunkSize"] == CHUNK_SIZE
    assert info["filename"] == "x.dcm"
    assert info["metadata"] == {"SOPInstanceUID": "1.2.3"}
    chunks = list(db["fs.chunks"].find({"files_id": file_id}).sort("n", 1))
    assert [c["n"] for c in chunks] == list(range(max(-(-size // CHUNK_SIZE), 1)))
    assert all(len(c["data"]) <= CHUNK_SIZE for c in chunks)
    assert b"".join(bytes(c["data"]) for c in chunks) == data


@pytest.mark.parametrize("size", [0, 10, 3 * CHUNK_SIZE + 1])
def test_gridstore_delete_removes_the_files_document_and_every_chunk(db: Any,
                                                                     size: int) -> None:
    store = GridStore(db, "fs")
    keep = store.put(b"other file", "keep.dcm", {})
    file_id = store.put(os.urandom(size), "x.dcm", {})

    store.delete(file_id)

    assert db["fs.files"].count_documents({"_id": file_id}) == 0
    assert db["fs.chunks"].count_documents({"files_id": file_id}) == 0
    assert not store.exists(file_id)
    with pytest.raises(FileNotFoundError):
        store.read(file_id)
    assert store.read(keep) == b"other file"


def test_gridstore_delete_with_length_removes_chunks_of_an_upload_cut_short(db: Any) -> None:
    store = GridStore(db, "fs")
    file_id = ObjectId()
    for n in range(3):
        db["fs.chunks"].insert_one({"_id": store.chunk_id(file_id, n), "files_id": file_id,
                                    "n": n, "data": b"x"})

    store.delete(file_id, 3 * CHUNK_SIZE)

    assert db["fs.chunks"].count_documents({}) == 0


def test_gridstore_missing_chunk_is_an_error_not_a_short_file(db: Any) -> None:
    store = GridStore(db, "fs")
    file_id = store.put(os.urandom(2 * CHUNK_SIZE + 1), "x", {})
    db["fs.chunks"].delete_one({"_id": store.chunk_id(file_id, 1)})
    with pytest.raises(FileNotFoundError, match="chunk 1"):
        store.read(file_id)


# --- storing -----------------------------------------------------------------------


def test_store_creates_instance_series_study_patient_documents(archive: Archive,
                                                               db: Any) -> None:
    study_a, study_b = "1.2.826.0.1.1", "1.2.826.0.1.2"
    ct_series, mr_series, b_series = "1.2.826.0.1.1.1", "1.2.826.0.1.1.2", "1.2.826.0.1.2.1"
    sent = {
        "1.2.826.0.1.1.1.1": instance(study_uid=study_a, series_uid=ct_series,
                                      sop_uid="1.2.826.0.1.1.1.1", InstanceNumber=1),
        "1.2.826.0.1.1.1.2": instance(study_uid=study_a, series_uid=ct_series,
                                      sop_uid="1.2.826.0.1.1.1.2", InstanceNumber=2),
        "1.2.826.0.1.1.2.1": instance(study_uid=study_a, series_uid=mr_series,
                                      sop_uid="1.2.826.0.1.1.2.1", modality="MR",
                                      sop_class=MR_IMAGE),
        "1.2.826.0.1.2.1.1": instance(study_uid=study_b, series_uid=b_series,
                                      sop_uid="1.2.826.0.1.2.1.1", patient_name="Doe^John"),
    }
    for uid, data in sent.items():
        outcome = archive.store(data, source="MODALITY")
        assert (outcome.status, outcome.sop_instance_uid, outcome.replaced) == \
            (SUCCESS, uid, False)

    assert db.instances.count_documents({}) == 4
    doc = db.instances.find_one({"_id": "1.2.826.0.1.1.1.2"})
    assert doc["SOPInstanceUID"] == "1.2.826.0.1.1.1.2"
    assert (doc["SeriesInstanceUID"], doc["StudyInstanceUID"], doc["PatientID"]) == \
        (ct_series, study_a, "PAT-1")
    assert (doc["SOPClassUID"], doc["Modality"]) == (CT_IMAGE, "CT")
    assert doc["TransferSyntaxUID"] == "1.2.840.10008.1.2.1"
    assert doc["size"] == len(sent["1.2.826.0.1.1.1.2"])
    assert doc["source"] == "MODALITY"
    assert doc["dataset"]["00200013"] == {"vr": "IS", "Value": [2]}
    assert doc["dataset"]["7FE00010"] == {"vr": "OW",
                                          "BulkDataURI": f"gridfs:{doc['file_id']}#7FE00010"}
    assert archive.files.read(doc["file_id"]) == sent["1.2.826.0.1.1.1.2"]

    series = db.series.find_one({"_id": ct_series})
    assert series["NumberOfSeriesRelatedInstances"] == 2
    assert sorted(series["instances"]) == ["1.2.826.0.1.1.1.1", "1.2.826.0.1.1.1.2"]
    assert series["Modality"] == "CT"
    assert series["dataset"]["00080060"] == {"vr": "CS", "Value": ["CT"]}
    assert series["dataset"]["0020000D"] == {"vr": "UI", "Value": [study_a]}
    assert "00200013" not in series["dataset"]  # Instance Number is an IMAGE attribute
    assert db.series.find_one({"_id": mr_series})["NumberOfSeriesRelatedInstances"] == 1

    study = db.studies.find_one({"_id": study_a})
    assert study["NumberOfStudyRelatedSeries"] == 2
    assert study["NumberOfStudyRelatedInstances"] == 3
    assert sorted(study["ModalitiesInStudy"]) == ["CT", "MR"]
    assert sorted(study["SOPClassesInStudy"]) == sorted([CT_IMAGE, MR_IMAGE])
    assert sorted(study["series"]) == sorted([ct_series, mr_series])
    assert study["StudyDate"] == "20240102"
    assert "00080060" not in study["dataset"]  # Modality is a SERIES attribute
    study_b_doc = db.studies.find_one({"_id": study_b})
    assert (study_b_doc["NumberOfStudyRelatedSeries"],
            study_b_doc["NumberOfStudyRelatedInstances"],
            study_b_doc["ModalitiesInStudy"]) == (1, 1, ["CT"])

    patient = db.patients.find_one({"_id": "PAT-1"})
    assert patient["NumberOfPatientRelatedStudies"] == 2
    assert patient["NumberOfPatientRelatedSeries"] == 3
    assert patient["NumberOfPatientRelatedInstances"] == 4
    assert sorted(patient["studies"]) == [study_a, study_b]
    assert patient["PatientName"] == "DOE^JOHN"  # normalised for matching
    assert db.patients.count_documents({}) == 1
    assert consistency_problems(db) == []
    assert counter_problems(db) == []


def test_store_keeps_the_original_bytes(archive: Archive, db: Any) -> None:
    data = instance(PixelData=os.urandom(3 * CHUNK_SIZE // 2))
    outcome = archive.store(data)
    doc = db.instances.find_one({"_id": outcome.sop_instance_uid})
    assert archive.files.read(doc["file_id"]) == data
    assert db["fs.chunks"].count_documents({"files_id": doc["file_id"]}) == 2


def test_stats_counts_levels_modalities_and_sop_classes(archive: Archive) -> None:
    study, series = "1.2.3.1", "1.2.3.1.1"
    for _ in range(3):
        archive.store(instance(study_uid=study, series_uid=series))
    archive.store(instance(patient_id="PAT-2", modality="MR", sop_class=MR_IMAGE,
                           study_uid="1.2.3.2", series_uid="1.2.3.2.1"))

    stats = archive.stats()

    assert {k: stats[k] for k in ("patients", "studies", "series", "instances")} == \
        {"patients": 2, "studies": 2, "series": 2, "instances": 4}
    assert stats["modalities"] == {"CT": 3, "MR": 1}
    assert stats["sop_classes"] == {CT_IMAGE: 3, MR_IMAGE: 1}
    assert list(stats["modalities"]) == ["CT", "MR"]  # most frequent first


# --- duplicates --------------------------------------------------------------------


def test_replace_keeps_one_copy_and_deletes_the_old_file(archive: Archive, db: Any) -> None:
    first = instance(sop_uid="1.2.3.4", InstanceNumber=1)
    second = instance(sop_uid="1.2.3.4", InstanceNumber=2, PixelData=os.urandom(9000))
    archive.store(first)
    old_file = db.instances.find_one()["file_id"]

    outcome = archive.store(second)

    assert (outcome.status, outcome.replaced) == (SUCCESS, True)
    assert db.instances.count_documents({}) == 1
    doc = db.instances.find_one()
    assert doc["file_id"] != old_file
    assert doc["dataset"]["00200013"]["Value"] == [2]
    assert archive.files.read(doc["file_id"]) == second
    assert db["fs.files"].count_documents({}) == 1
    assert db["fs.chunks"].count_documents({"files_id": old_file}) == 0
    assert db.series.find_one()["NumberOfSeriesRelatedInstances"] == 1
    study = db.studies.find_one()
    assert (study["NumberOfStudyRelatedSeries"], study["NumberOfStudyRelatedInstances"]) == (1, 1)
    patient = db.patients.find_one()
    assert (patient["NumberOfPatientRelatedStudies"], patient["NumberOfPatientRelatedSeries"],
            patient["NumberOfPatientRelatedInstances"]) == (1, 1, 1)


def test_replace_moving_an_instance_to_another_series_rebuilds_both(archive: Archive,
                                                                    db: Any) -> None:
    study = "1.2.3.1"
    archive.store(instance(sop_uid="1.2.3.1.1.1", study_uid=study, series_uid="1.2.3.1.1"))
    archive.store(instance(sop_uid="1.2.3.1.1.2", study_uid=study, series_uid="1.2.3.1.1"))

    outcome = archive.store(instance(sop_uid="1.2.3.1.1.2", study_uid=study,
                                     series_uid="1.2.3.1.2", modality="MR",
                                     sop_class=MR_IMAGE))

    assert outcome.replaced
    assert db.series.find_one({"_id": "1.2.3.1.1"})["NumberOfSeriesRelatedInstances"] == 1
    assert db.series.find_one({"_id": "1.2.3.1.2"})["NumberOfSeriesRelatedInstances"] == 1
    doc = db.studies.find_one({"_id": study})
    assert doc["NumberOfStudyRelatedInstances"] == 2
    assert doc["NumberOfStudyRelatedSeries"] == 2
    assert counter_problems(db) == []
    assert consistency_problems(db) == []


def test_keep_policy_answers_success_and_keeps_the_first_copy(db: Any, tmp_path: Path) -> None:
    archive = Archive(db, "fs", "keep", tmp_path / "journal")
    first = instance(sop_uid="1.2.3.4", InstanceNumber=1)
    archive.store(first)

    outcome = archive.store(instance(sop_uid="1.2.3.4", InstanceNumber=2))

    assert outcome.status == SUCCESS
    assert not outcome.replaced
    assert db.instances.count_documents({}) == 1
    doc = db.instances.find_one()
    assert doc["dataset"]["00200013"]["Value"] == [1]
    assert archive.files.read(doc["file_id"]) == first
    assert db["fs.files"].count_documents({}) == 1
    assert db.series.find_one()["NumberOfSeriesRelatedInstances"] == 1


def test_reject_policy_answers_0111_and_changes_nothing(db: Any, tmp_path: Path) -> None:
    archive = Archive(db, "fs", "reject", tmp_path / "journal")
    first = instance(sop_uid="1.2.3.4", InstanceNumber=1)
    assert archive.store(first).ok

    outcome = archive.store(instance(sop_uid="1.2.3.4", InstanceNumber=2))

    assert outcome.status == DUPLICATE_SOP_INSTANCE == 0x0111
    assert outcome.comment
    assert db.instances.count_documents({}) == 1
    assert archive.files.read(db.instances.find_one()["file_id"]) == first
    assert db["fs.files"].count_documents({}) == 1
    assert db["fs.chunks"].count_documents({}) == 1
    assert db.series.find_one()["NumberOfSeriesRelatedInstances"] == 1


# --- refusals ----------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"",
    b"this is not DICOM at all" * 20,
    b"\x00" * 128 + b"DICM" + os.urandom(200),
    part10_with_raw_dataset(b"\xde\xad\xbe\xef" * 50),
], ids=["empty", "text", "prefix-then-noise", "meta-then-noise"])
def test_garbage_is_refused_with_c000_and_nothing_is_written(archive: Archive, db: Any,
                                                             data: bytes) -> None:
    outcome = archive.store(data)
    assert outcome.status == CANNOT_UNDERSTAND == 0xC000
    assert outcome.comment
    assert len(outcome.comment) <= 64  # fits an Error Comment (LO)
    assert nothing_written(db)


@pytest.mark.parametrize("missing,named", [
    ("SOPInstanceUID", "0008,0018"), ("SOPClassUID", "0008,0016"),
    ("StudyInstanceUID", "0020,000D"), ("SeriesInstanceUID", "0020,000E"),
])
def test_dataset_without_a_key_uid_is_refused(archive: Archive, db: Any, missing: str,
                                              named: str) -> None:
    ds = make_dataset()
    delattr(ds, missing)

    outcome = archive.store(to_part10(ds))

    assert outcome.status == CANNOT_UNDERSTAND
    assert named in outcome.comment
    assert nothing_written(db)
    with pytest.raises(StoreRefused):
        Archive.parse(to_part10(ds))


def test_blank_sop_instance_uid_is_refused(archive: Archive, db: Any) -> None:
    outcome = archive.store(to_part10(make_dataset(sop_uid=" ")))
    assert outcome.status == CANNOT_UNDERSTAND
    assert nothing_written(db)


def test_check_repairs_a_study_without_counts_per_value(archive: Archive, db: Any) -> None:
    """Studies count their instances per modality and SOP class (what Modalities / SOP
    Classes in Study follow); `archive check --repair` gives those counts to a study
    stored by an earlier version, which had none."""
    archive.store(instance(sop_uid="1.2.3.1"))
    archive.store(instance(sop_uid="1.2.3.2", modality="MR", sop_class=MR_IMAGE))
    assert check(archive, grace=0).problems == []
    db.studies.update_one({"_id": STUDY}, {"$unset": {"modality_counts": "",
                                                      "sop_class_counts": ""}})
    assert any("modality_counts" in p for p in check(archive, grace=0).problems)
    check(archive, repair=True, grace=0)
    assert check(archive, grace=0).problems == []
    assert db.studies.find_one()["modality_counts"] == {"vCT": 1, "vMR": 1}


def test_a_study_without_counts_per_value_gets_them_when_a_store_touches_it(
        archive: Archive, db: Any) -> None:
    """A study stored by an earlier version counts nothing per value: the first store
    that changes its counts rebuilds them from its series rather than take a value out
    of Modalities in Study that other instances still have."""
    for n in (1, 2):
        archive.store(instance(sop_uid=f"1.2.3.{n}"))
    archive.store(instance(sop_uid="1.2.3.3", modality="MR", sop_class=MR_IMAGE,
                           series_uid=f"{SERIES}.3"))
    db.studies.update_one({"_id": STUDY}, {"$unset": {"modality_counts": "",
                                                      "sop_class_counts": ""}})
    # a re-send moves one CT instance to another series of the study
    archive.store(instance(sop_uid="1.2.3.1", series_uid=f"{SERIES}.2"))
    assert check(archive, grace=0).problems == []
    study = db.studies.find_one()
    assert sorted(study["ModalitiesInStudy"]) == ["CT", "MR"]
    assert study["modality_counts"] == {"vCT": 2, "vMR": 1}


def test_a_batch_into_a_study_without_counts_per_value_rebuilds_it(db: Any,
                                                                   tmp_path: Path) -> None:
    archive = Archive(db, "fs", "replace", tmp_path / "journal", write_behind=3600)
    archive.store(instance(sop_uid="1.2.3.1"))  # the node now batches this series
    db.studies.update_one({"_id": STUDY}, {"$unset": {"modality_counts": "",
                                                      "sop_class_counts": ""}})
    archive.store(instance(sop_uid="1.2.3.2"))
    archive.flush()
    assert check(archive, grace=0).problems == []
    assert db.studies.find_one()["modality_counts"] == {"vCT": 2}


def test_a_new_series_waits_for_batches_only_when_their_attributes_differ(
        db: Any, tmp_path: Path) -> None:
    """A C-STORE starting a series of a known study updates its series at once and
    batches the rest, while batches of the same study and patient wait (their updates
    commute); one whose study or patient attributes differ has the batches written
    first and folds its instance at once, so the documents show the newest instance's
    attributes, as a rebuild would."""
    archive = Archive(db, "fs", "replace", tmp_path / "journal", write_behind=3600)
    assert archive.batches is not None

    def description(collection: str, tag: str) -> str:
        return db[collection].find_one()["dataset"][tag]["Value"][0]

    archive.store(instance(sop_uid="1.2.3.1", StudyDescription="HEAD"))
    archive.store(instance(sop_uid="1.2.3.2", StudyDescription="HEAD"))  # batched
    archive.store(instance(sop_uid="1.2.3.3", series_uid=f"{SERIES}.2",
                           StudyDescription="HEAD"))
    assert archive.batches.pending() == 2  # left to the writer
    archive.store(instance(sop_uid="1.2.3.4", series_uid=f"{SERIES}.3",
                           StudyDescription="CHEST"))
    assert archive.batches.pending() == 0
    assert description("studies", "00081030") == "CHEST"

    archive.store(instance(sop_uid="1.2.3.5", series_uid=f"{SERIES}.3",
                           StudyDescription="CHEST"))  # batched
    archive.store(instance(sop_uid="1.2.3.6", study_uid=f"{STUDY}.2",
                           series_uid=f"{SERIES}.4", patient_name="ROE^R"))
    assert archive.batches.pending() == 0
    assert description("patients", "00100010")["Alphabetic"] == "ROE^R"

    archive.flush()
    assert check(archive, grace=0).problems == []
    assert counter_problems(db) == [] and consistency_problems(db) == []


def test_an_instance_its_series_batch_cannot_take_is_folded_after_the_batch(
        db: Any, tmp_path: Path) -> None:
    """A series whose instances disagree on a series attribute (one MR image among CT
    ones): the batch of the CT images waiting is written before the MR image is folded,
    so the series shows the newest instance's attributes, as a rebuild and an archive
    without batches do."""
    archive = Archive(db, "fs", "replace", tmp_path / "journal", write_behind=3600)
    assert archive.batches is not None
    archive.store(instance(sop_uid="1.2.3.1"))
    archive.store(instance(sop_uid="1.2.3.2"))  # batched
    assert archive.batches.pending() == 1
    archive.store(instance(sop_uid="1.2.3.3", modality="MR", sop_class=MR_IMAGE))
    archive.flush()
    series = db.series.find_one()
    assert series["Modality"] == "MR"
    assert series["dataset"]["00080060"]["Value"] == ["MR"]
    assert check(archive, grace=0).problems == []
    assert counter_problems(db) == [] and consistency_problems(db) == []


def test_a_new_series_of_a_known_study_waits_only_for_its_series_update(
        db: Any, tmp_path: Path) -> None:
    """The first instance of a new series in a study this node has stored into: its
    series document is written before the store is answered, its study and patient
    updates (one more series, one more instance) go with the series' batch."""
    archive = Archive(db, "fs", "replace", tmp_path / "journal", write_behind=3600)
    assert archive.batches is not None
    assert archive.store(instance(sop_uid="1.2.3.1")).ok
    assert archive.store(instance(sop_uid="1.2.3.2", series_uid=f"{SERIES}.2",
                                  modality="MR", sop_class=MR_IMAGE)).ok
    series = db.series.find_one({"_id": f"{SERIES}.2"})
    assert series["NumberOfSeriesRelatedInstances"] == 1 and series["instances"] == ["1.2.3.2"]
    study, patient = db.studies.find_one(), db.patients.find_one()
    assert (study["NumberOfStudyRelatedSeries"], study["NumberOfStudyRelatedInstances"],
            patient["NumberOfPatientRelatedSeries"]) == (1, 1, 1)  # not yet
    assert archive.batches.pending() == 1
    assert archive.store(instance(sop_uid="1.2.3.3", series_uid=f"{SERIES}.2",
                                  modality="MR", sop_class=MR_IMAGE)).ok
    assert archive.batches.pending() == 2  # the series' next instances: batched whole
    archive.flush()
    study, patient = db.studies.find_one(), db.patients.find_one()
    assert (study["NumberOfStudyRelatedSeries"], study["NumberOfStudyRelatedInstances"],
            patient["NumberOfPatientRelatedSeries"],
            patient["NumberOfPatientRelatedInstances"]) == (2, 3, 2, 3)
    assert sorted(study["series"]) == [SERIES, f"{SERIES}.2"]
    assert sorted(study["ModalitiesInStudy"]) == ["CT", "MR"]
    assert db.series.find_one({"_id": f"{SERIES}.2"})["NumberOfSeriesRelatedInstances"] == 2
    assert check(archive, grace=0).problems == []
    assert counter_problems(db) == [] and consistency_problems(db) == []


def test_a_new_series_of_a_known_study_that_belongs_to_another_study_is_refused(
        db: Any, tmp_path: Path) -> None:
    """The series UID names a series another node stored into another study: the
    store is refused as without batches (0xC409), and nothing of it is batched."""
    here = Archive(db, "fs", "replace", tmp_path / "here", write_behind=3600)
    elsewhere = Archive(db, "fs", "replace", tmp_path / "elsewhere", write_behind=3600)
    assert here.batches is not None
    assert here.store(instance(sop_uid="1.2.3.1")).ok  # this node knows STUDY
    assert elsewhere.store(instance(sop_uid="1.2.3.2", study_uid=f"{STUDY}.2",
                                    series_uid=f"{SERIES}.9")).ok
    outcome = here.store(instance(sop_uid="1.2.3.3", series_uid=f"{SERIES}.9"))
    assert outcome.status == 0xC409, outcome
    assert here.batches.pending() == 0 and not here.pending()
    assert db.instances.find_one({"_id": "1.2.3.3"}) is None
    here.flush()
    elsewhere.flush()
    assert check(here, grace=0).problems == []
    assert counter_problems(db) == [] and consistency_problems(db) == []


# --- database failures -------------------------------------------------------------


def test_a_new_series_failing_in_an_outage_does_not_write_the_batches_first(
        db: Any, tmp_path: Path) -> None:
    """The database gone while a store starts a series: the failure is answered at once
    and left to the journal, without trying the waiting batches (each would wait out
    the driver's timeouts first); they are written with the rebuild once it is back."""
    archive = Archive(db, "fs", "replace", tmp_path / "journal", write_behind=3600)
    assert archive.batches is not None
    archive.store(instance(sop_uid="1.2.3.1"))
    archive.store(instance(sop_uid="1.2.3.2"))  # batched
    real = archive.series
    archive.series = Flaky(real, "update_one", times=None)  # type: ignore[assignment]
    archive.health.check = lambda: False  # type: ignore[method-assign]
    outcome = archive.store(instance(sop_uid="1.2.3.3", series_uid=f"{SERIES}.2"))
    assert outcome.status == OUT_OF_RESOURCES
    assert archive.batches.pending() == 1 and archive.pending()

    archive.series = real  # type: ignore[assignment]
    del archive.health.check
    archive.reconcile()
    assert archive.batches.pending() == 0 and not archive.pending()
    assert check(archive, grace=0).problems == []
    assert counter_problems(db) == [] and consistency_problems(db) == []
    assert db.series.count_documents({}) == 1


@pytest.mark.parametrize("collection,method", [
    ("series", "update_one"), ("studies", "find_one_and_update"), ("patients", "update_one"),
])
def test_database_error_in_level_updates_leaves_nothing(archive: Archive, db: Any,
                                                        collection: str, method: str) -> None:
    setattr(archive, collection, Flaky(getattr(archive, collection), method, times=1))

    outcome = archive.store(instance())

    assert outcome.status == OUT_OF_RESOURCES
    assert "AutoReconnect" in outcome.comment
    assert nothing_written(db)
    assert not archive.pending()


def test_database_error_for_a_second_instance_restores_the_counters(archive: Archive,
                                                                    db: Any) -> None:
    study, series = "1.2.3.1", "1.2.3.1.1"
    first = instance(study_uid=study, series_uid=series, sop_uid="1.2.3.1.1.1")
    archive.store(first)
    archive.patients = Flaky(archive.patients, "update_one", times=1)

    outcome = archive.store(instance(study_uid=study, series_uid=series,
                                     sop_uid="1.2.3.1.1.2"))

    assert outcome.status == OUT_OF_RESOURCES
    assert [d["_id"] for d in db.instances.find()] == ["1.2.3.1.1.1"]
    assert db["fs.files"].count_documents({}) == 1
    assert db.series.find_one()["NumberOfSeriesRelatedInstances"] == 1
    assert db.studies.find_one()["NumberOfStudyRelatedInstances"] == 1
    assert db.patients.find_one()["NumberOfPatientRelatedInstances"] == 1
    assert consistency_problems(db) == []
    assert counter_problems(db) == []


def test_database_error_while_replacing_restores_the_previous_version(archive: Archive,
                                                                      db: Any) -> None:
    first = instance(sop_uid="1.2.3.4", InstanceNumber=1)
    archive.store(first)
    old_file = db.instances.find_one()["file_id"]
    archive.studies = Flaky(archive.studies, "find_one_and_update", times=1)

    outcome = archive.store(instance(sop_uid="1.2.3.4", InstanceNumber=2))

    assert outcome.status == OUT_OF_RESOURCES
    doc = db.instances.find_one()
    assert doc["file_id"] == old_file
    assert doc["dataset"]["00200013"]["Value"] == [1]
    assert archive.files.read(old_file) == first
    assert db["fs.files"].count_documents({}) == 1
    assert consistency_problems(db) == []
    assert counter_problems(db) == []


def test_database_error_writing_the_instance_removes_the_file(archive: Archive,
                                                              db: Any) -> None:
    archive.instances = Flaky(archive.instances, "insert_one", times=1)
    outcome = archive.store(instance())
    assert outcome.status == OUT_OF_RESOURCES
    assert nothing_written(db)


@pytest.mark.parametrize("resend", [False, True], ids=["new-instance", "re-send"])
def test_instance_write_applied_but_unacknowledged_leaves_no_dangling_document(
        archive: Archive, db: Any, resend: bool) -> None:
    first = instance(sop_uid="1.2.3.4", InstanceNumber=1)
    if resend:
        archive.store(first)
    method = "find_one_and_replace" if resend else "insert_one"
    archive.instances = Flaky(archive.instances, method, times=1, applied=True)
    outcome = archive.store(instance(sop_uid="1.2.3.4", InstanceNumber=2))
    assert outcome.status == OUT_OF_RESOURCES
    assert consistency_problems(db) == []
    assert counter_problems(db) == []
    if resend:  # the first copy is still the one stored
        doc = db.instances.find_one()
        assert doc["dataset"]["00200013"]["Value"] == [1]
        assert archive.files.read(doc["file_id"]) == first
    else:
        assert db.instances.count_documents({}) == 0


def test_interrupted_upload_leaves_no_chunks(archive: Archive, db: Any) -> None:
    archive.files.chunks = Flaky(archive.files.chunks, "insert_one", after=1, times=1)
    outcome = archive.store(instance(PixelData=os.urandom(2 * CHUNK_SIZE + 10)))
    assert outcome.status == OUT_OF_RESOURCES
    assert nothing_written(db)
    assert not archive.pending()


@pytest.mark.parametrize("names_the_instance", [True, False])
def test_a_store_journaled_before_its_conversion_is_finished_from_its_instance_document(
        archive: Archive, db: Any, names_the_instance: bool) -> None:
    """A crash right after the instance document was written, before its level
    documents: the journal entry on disk has no hierarchy (written before the dataset
    was converted), nor a SOP Instance UID if written before the parse; the replay
    finds the instance document by its file, reads the hierarchy there and counts it."""
    archive.store(instance(sop_uid="1.2.3.10", study_uid="1.2.3", series_uid="1.2.3.1"))
    doc = db.instances.find_one({"_id": "1.2.3.10"})
    for name in ("series", "studies", "patients"):
        db[name].delete_many({})
    key = str(doc["file_id"])
    entry = {"kind": "store", "pid": os.getpid(), "file_id": key, "length": doc["size"]}
    if names_the_instance:
        entry["sop"] = "1.2.3.10"
    archive.journal.write(key, entry)
    assert archive.reconcile() == 1
    assert db.series.find_one({"_id": "1.2.3.1"})["NumberOfSeriesRelatedInstances"] == 1
    assert db.studies.find_one({"_id": "1.2.3"})["NumberOfStudyRelatedInstances"] == 1
    assert db.patients.find_one({"_id": "PAT-1"})["NumberOfPatientRelatedInstances"] == 1
    assert db["fs.files"].count_documents({"_id": doc["file_id"]}) == 1


def test_a_chunk_journaled_before_the_parse_and_never_stored_is_deleted(
        archive: Archive, db: Any) -> None:
    """A crash after the chunk went ahead, before any instance document: the replay
    deletes the chunk."""
    file_id = ObjectId()
    archive.files.begin(b"x" * 100, file_id, ahead=False).sent.finish()
    key = str(file_id)
    archive.journal.write(key, {"kind": "store", "pid": os.getpid(), "file_id": key,
                                "length": 100})
    assert db["fs.chunks"].count_documents({}) == 1
    assert archive.reconcile() == 1
    assert nothing_written(db)


def test_failed_rollback_is_journaled_and_reconcile_removes_the_orphans(
        archive: Archive, db: Any, tmp_path: Path) -> None:
    kept = instance(sop_uid="1.2.3.9", study_uid="1.2.3", series_uid="1.2.3.1")
    archive.store(kept)
    real = {name: getattr(archive, name) for name in ("patients", "instances")}
    # The database "goes away" during the level updates and stays away for the rollback.
    archive.patients = Flaky(real["patients"], "update_one")
    archive.instances = Flaky(real["instances"], "delete_one")

    outcome = archive.store(instance(sop_uid="1.2.3.10", study_uid="1.2.3",
                                     series_uid="1.2.3.1"))

    assert outcome.status == OUT_OF_RESOURCES
    assert archive.pending()
    entries = [entry for _, entry in archive.journal.entries()]
    assert len(entries) == 1
    assert entries[0]["kind"] == "undo"
    assert entries[0]["sop"] == "1.2.3.10"
    assert entries[0]["hierarchy"] == ["1.2.3.1", "1.2.3", "PAT-1"]
    failed_file = ObjectId(entries[0]["file_id"])
    assert db["fs.files"].count_documents({"_id": failed_file}) == 1  # not yet undone

    for name, collection in real.items():  # the database is back
        setattr(archive, name, collection)
    assert archive.reconcile() == 1

    assert not archive.pending()
    assert [d["_id"] for d in db.instances.find()] == ["1.2.3.9"]
    assert db["fs.files"].count_documents({"_id": failed_file}) == 0
    assert db["fs.chunks"].count_documents({"files_id": failed_file}) == 0
    assert archive.files.read(db.instances.find_one()["file_id"]) == kept
    assert consistency_problems(db) == []
    assert counter_problems(db) == []
    assert archive.reconcile() == 0


def test_failed_rollback_of_a_replacement_restores_the_previous_version_on_reconcile(
        archive: Archive, db: Any) -> None:
    first = instance(sop_uid="1.2.3.4", InstanceNumber=1)
    archive.store(first)
    old_file = db.instances.find_one()["file_id"]
    real = {name: getattr(archive, name) for name in ("patients", "instances")}
    archive.patients = Flaky(real["patients"], "update_one")
    archive.instances = Flaky(real["instances"], "replace_one")

    outcome = archive.store(instance(sop_uid="1.2.3.4", InstanceNumber=2))

    assert outcome.status == OUT_OF_RESOURCES
    assert archive.pending()
    for name, collection in real.items():
        setattr(archive, name, collection)
    archive.reconcile()

    doc = db.instances.find_one()
    assert db.instances.count_documents({}) == 1
    assert doc["file_id"] == old_file
    assert doc["dataset"]["00200013"]["Value"] == [1]
    assert archive.files.read(old_file) == first
    assert db["fs.files"].count_documents({}) == 1
    assert consistency_problems(db) == []
    assert counter_problems(db) == []


def test_old_file_left_by_a_replacement_is_journaled_and_reconciled(archive: Archive,
                                                                    db: Any) -> None:
    archive.store(instance(sop_uid="1.2.3.4", InstanceNumber=1))
    old_file = db.instances.find_one()["file_id"]
    real_files = archive.files.files
    archive.files.files = Flaky(real_files, "delete_one", times=1)

    outcome = archive.store(instance(sop_uid="1.2.3.4", InstanceNumber=2))

    assert (outcome.status, outcome.replaced) == (SUCCESS, True)
    assert archive.pending()
    assert consistency_problems(db) == [f"GridFS file {old_file} belongs to no instance"]
    archive.files.files = real_files
    assert archive.reconcile() == 1
    assert consistency_problems(db) == []
    assert db["fs.chunks"].count_documents({"files_id": old_file}) == 0


def test_interrupted_upload_whose_cleanup_fails_is_reconciled(archive: Archive,
                                                              db: Any) -> None:
    real_chunks = archive.files.chunks
    flaky = Flaky(real_chunks, "insert_one", after=2)
    archive.files.chunks = flaky
    real_chunks_delete = Flaky(flaky, "delete_one")
    archive.files.chunks = real_chunks_delete

    outcome = archive.store(instance(PixelData=os.urandom(3 * CHUNK_SIZE)))

    assert outcome.status == OUT_OF_RESOURCES
    assert db["fs.chunks"].count_documents({}) == 2  # left behind
    assert archive.pending()
    archive.files.chunks = real_chunks
    archive.reconcile()
    assert nothing_written(db)


def test_reconcile_keeps_the_journal_while_the_database_is_away(archive: Archive,
                                                                db: Any) -> None:
    archive.store(instance(sop_uid="1.2.3.4"))
    real_files = archive.files.files
    archive.files.files = Flaky(real_files, "delete_one")
    archive.store(instance(sop_uid="1.2.3.4"))  # old file left: journaled
    assert archive.pending()

    archive.instances = Flaky(archive.instances, "find_one")
    with pytest.raises(AutoReconnect):
        archive.reconcile()
    assert archive.pending()

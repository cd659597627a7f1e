"""Rejection notes in the core (mongomock): which notes are applied, and what a failure
half-way leaves once the journal is replayed.

- generated notes over a small archive: a note is applied exactly when every reference
  names a stored instance of the note's study and patient, in the series and with the
  SOP class it names, that the sender may delete; then exactly those instances leave
  the counts and keep their files; otherwise nothing changes at all;
- the database failing after the note is stored, or the process dying before it is
  stored, or in the middle of a purge: the journal replay leaves both or neither.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import mongomock
import pytest
from helpers import (
    CT_IMAGE,
    MR_IMAGE,
    Raising,
    consistency_problems,
    counter_problems,
    make_dataset,
    to_part10,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pymongo.errors import AutoReconnect

from acl.patterns import compile_pattern, to_json
from archive.rejection import (
    KEY_OBJECT_SELECTION,
    REASONS,
    Refused,
    note_dataset,
    note_of,
    note_part10,
)
from archive.storage import Archive

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PATIENTS = ("P1", "P2")


def new_archive(folder: Path) -> tuple[Archive, list[Dataset]]:
    """Two patients, one study each, two series of two instances each."""
    archive = Archive(mongomock.MongoClient().archive, "fs", "replace", folder / "journal")
    stored = []
    for patient in PATIENTS:
        study = generate_uid()
        for _ in range(2):
            series = generate_uid()
            for n in range(2):
                ds = make_dataset(patient_id=patient, study_uid=study, series_uid=series,
                                  InstanceNumber=n + 1)
                assert archive.store(to_part10(ds)).ok
                stored.append(ds)
    return archive, stored


def rejection_note(patient: str, study: str, refs: list[tuple[str, str, str, str]],
                   code: str = "113001") -> Dataset:
    """A KOS titled ``code`` referencing (study, series, class, instance) tuples."""
    ds = make_dataset(patient_id=patient, study_uid=study, sop_class=KEY_OBJECT_SELECTION,
                      modality="KO")
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator = code, "DCM"
    ds.ConceptNameCodeSequence = [title]
    evidence = []
    for ref_study, series, sop_class, sop in refs:
        item, series_item, sop_item = Dataset(), Dataset(), Dataset()
        item.StudyInstanceUID = ref_study
        series_item.SeriesInstanceUID = series
        sop_item.ReferencedSOPClassUID, sop_item.ReferencedSOPInstanceUID = sop_class, sop
        series_item.ReferencedSOPSequence = [sop_item]
        item.ReferencedSeriesSequence = [series_item]
        evidence.append(item)
    ds.CurrentRequestedProcedureEvidenceSequence = evidence
    return ds


def store_note(archive: Archive, kos: Dataset, may_delete: dict[str, Any] | None = None,
               store: Any = None) -> Any:
    note = note_of(kos)
    assert note is not None
    part10 = to_part10(kos)
    return archive.rejecter.store_note(
        note, may_delete, "tester", store or (lambda: archive.store(part10)))


def snapshot(archive: Archive) -> dict[str, Any]:
    return {name: sorted(map(str, archive.db[name].find({}))) for name in (
        "instances", "series", "studies", "patients", "rejected", "fs.files")}


#: How a reference may differ from the instance it is built on ("none" most often).
FLAWS = ("none", "none", "none", "unknown", "other series", "other study", "other class",
         "other patient")

reference = st.tuples(st.integers(0, 3), st.sampled_from(FLAWS))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(refs=st.lists(reference, min_size=1, max_size=3), patient=st.sampled_from(PATIENTS),
       note_claims_another_patient=st.booleans(), restricted=st.booleans())
def test_a_note_is_applied_whole_or_not_at_all(
        tmp_path_factory: pytest.TempPathFactory, refs: list[tuple[int, str]], patient: str,
        note_claims_another_patient: bool, restricted: bool) -> None:
    archive, stored = new_archive(tmp_path_factory.mktemp("rejection"))
    mine = [ds for ds in stored if ds.PatientID == patient]
    theirs = [ds for ds in stored if ds.PatientID != patient]
    note_study = str(mine[0].StudyInstanceUID)
    # restricted: her Delete rule matches the first instance of each series only
    pattern = compile_pattern(to_json({"InstanceNumber": "1"}))
    assert pattern is not None
    may_delete = pattern.filters["IMAGE"] if restricted else None
    built, valid, targets = [], not note_claims_another_patient, set()
    for index, flaw in refs:
        ds = (theirs if flaw == "other patient" else mine)[index]
        study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        sop_class, sop = CT_IMAGE, str(ds.SOPInstanceUID)
        if flaw == "unknown":
            sop = generate_uid()
        elif flaw == "other series":
            series = next(str(d.SeriesInstanceUID) for d in mine
                          if d.SeriesInstanceUID != ds.SeriesInstanceUID)
        elif flaw == "other study":
            study = str(theirs[0].StudyInstanceUID)
        elif flaw == "other class":
            sop_class = MR_IMAGE
        built.append((study, series, sop_class, sop))
        valid &= flaw == "none" and (not restricted or ds.InstanceNumber == 1)
        targets.add(sop)
    note_patient = next(p for p in PATIENTS if p != patient) \
        if note_claims_another_patient else patient
    kos = rejection_note(note_patient, note_study, built)
    before = snapshot(archive)
    event("applied" if valid else "refused")

    try:
        outcome, done = store_note(archive, kos, may_delete)
    except Refused as exc:
        assert not valid, exc.comment
        assert exc.status in (0xA772, 0xA773) and exc.comment.startswith("rejection failed")
        assert snapshot(archive) == before  # nothing written, the note not stored
        assert not archive.pending()
        return
    assert valid
    assert outcome.ok and done.instances == len(targets)
    remaining = {d["_id"] for d in archive.instances.find({})}
    assert remaining == {str(ds.SOPInstanceUID) for ds in stored} - targets | {
        str(kos.SOPInstanceUID)}
    rejected = list(archive.db.rejected.find({}))
    assert {d["_id"] for d in rejected} == targets
    assert all(d["rejection"]["code"] == "113001" and d["rejection"]["by"] == "tester"
               for d in rejected)
    assert counter_problems(archive.db) == []
    assert consistency_problems(archive.db) == []  # the files kept, owned by rejected
    assert archive.db["fs.files"].count_documents({}) == len(stored) + 1
    assert not archive.pending()


def test_a_note_that_references_nothing_or_misses_a_uid_is_refused_as_such() -> None:
    with pytest.raises(Refused) as empty:
        note_of(rejection_note("P1", generate_uid(), []))
    assert (empty.value.status, empty.value.comment) == (
        0xC000, "rejection note references no instance")
    with pytest.raises(Refused) as partial:
        note_of(rejection_note("P1", generate_uid(), [("1.2", "1.3", CT_IMAGE, "")]))
    assert partial.value.status == 0xC000
    other_title = rejection_note("P1", generate_uid(), [("1.2", "1.3", CT_IMAGE, "1.4")],
                                 code="113000")  # "Of Interest": an ordinary KOS
    assert note_of(other_title) is None




def _first_series(stored: list[Dataset]) -> list[Dataset]:
    return [ds for ds in stored if ds.SeriesInstanceUID == stored[0].SeriesInstanceUID]


def _note_for(members: list[Dataset]) -> Dataset:
    return rejection_note(str(members[0].PatientID), str(members[0].StudyInstanceUID), [
        (str(d.StudyInstanceUID), str(d.SeriesInstanceUID), CT_IMAGE, str(d.SOPInstanceUID))
        for d in members])


@pytest.mark.parametrize("step", ["copied", "taken out"])
def test_the_database_failing_after_the_note_is_stored_is_finished_by_the_journal(
        tmp_path: Path, step: str) -> None:
    """The copies to ``rejected`` not written, or written and the instance documents
    not deleted yet: the replay finishes either."""
    archive, stored = new_archive(tmp_path)
    members = _first_series(stored)
    rejecter = archive.rejecter
    if step == "copied":
        rejecter.rejected = Raising(rejecter.rejected, "insert_many", AutoReconnect("gone"))
    else:
        archive.instances = Raising(archive.instances, "delete_many", AutoReconnect("gone"))

    outcome, done = store_note(archive, _note_for(members))

    assert outcome.ok and done.deferred  # answered once the journal holds the rest
    assert archive.pending()
    assert archive.reconcile() == 1
    assert archive.instances.count_documents(
        {"SeriesInstanceUID": str(members[0].SeriesInstanceUID)}) == 0
    assert archive.db.rejected.count_documents({}) == len(members)
    assert counter_problems(archive.db) == [] and consistency_problems(archive.db) == []


def test_a_note_never_stored_rejects_nothing_after_the_replay(tmp_path: Path) -> None:
    archive, stored = new_archive(tmp_path)
    before = snapshot(archive)

    def killed() -> Any:  # the process dies before the note is written
        raise SystemExit("killed")

    with pytest.raises(SystemExit):
        store_note(archive, _note_for(_first_series(stored)), store=killed)
    assert archive.pending()
    assert archive.reconcile() == 1
    assert snapshot(archive) == before


def test_a_purge_interrupted_is_finished_by_the_journal(tmp_path: Path) -> None:
    archive, stored = new_archive(tmp_path)
    members = _first_series(stored)
    store_note(archive, _note_for(members))
    files = archive.db["fs.files"].count_documents({})
    archive.files.files = Raising(archive.files.files, "delete_many", AutoReconnect("gone"))
    rejected = archive.rejecter.select(None)

    with pytest.raises(AutoReconnect):
        archive.rejecter.purge(rejected)
    assert archive.pending()
    archive.reconcile()
    assert archive.db.rejected.count_documents({}) == 0
    assert archive.db["fs.files"].count_documents({}) == files - len(members)
    assert consistency_problems(archive.db) == [] and counter_problems(archive.db) == []


BASIC_TEXT_SR, TWELVE_LEAD_ECG = "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.9.1.1"
#: TID 2010: an image is an IMAGE item, a waveform a WAVEFORM, anything else COMPOSITE.
VALUE_TYPES = {CT_IMAGE: "IMAGE", MR_IMAGE: "IMAGE", BASIC_TEXT_SR: "COMPOSITE",
               TWELVE_LEAD_ECG: "WAVEFORM"}


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       code=st.sampled_from(sorted(c for c, _ in REASONS)),
       name=st.sampled_from(["DOE^JANE", "Ærøskøbing^Åse", ""]))
def test_a_made_note_is_a_rejection_note_of_its_instances(sizes: list[int], code: str,
                                                          name: str) -> None:
    """The console's note, as a receiver reads it: the title, every instance by series
    with its class, the study's patient, a series of its own, a content item each."""
    study = make_dataset(patient_id="P1", study_uid=generate_uid())
    study.PatientName = name
    classes = (CT_IMAGE, MR_IMAGE, BASIC_TEXT_SR, TWELVE_LEAD_ECG)
    docs = [{"_id": generate_uid(), "SOPClassUID": classes[n % len(classes)],
             "SeriesInstanceUID": series}
            for series, size in ((generate_uid(), size) for size in sizes)
            for n in range(size)]
    read = dcmread(BytesIO(note_part10(note_dataset(study, docs, code))))
    note = note_of(read)
    assert note is not None and (note.code, note.study, note.patient) == (
        code, study.StudyInstanceUID, "P1")
    assert [(r.series, r.sop_class, r.sop) for r in note.references] == [
        (d["SeriesInstanceUID"], d["SOPClassUID"], d["_id"]) for d in docs]
    assert len(read.CurrentRequestedProcedureEvidenceSequence[0]
               .ReferencedSeriesSequence) == len(sizes)
    assert [(i.ValueType, i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for i in read.ContentSequence] == [
        (VALUE_TYPES[d["SOPClassUID"]], d["_id"]) for d in docs]
    assert str(read.PatientName) == name and read.Modality == "KO"
    assert read.SeriesInstanceUID not in {d["SeriesInstanceUID"] for d in docs}
    assert read.file_meta.MediaStorageSOPClassUID == KEY_OBJECT_SELECTION

"""Rejecting instances (IHE IOCM): a rejection note hides what it references; a purge
deletes it.

A *rejection note* is a Key Object Selection document (SOP class
1.2.840.10008.5.1.4.1.1.88.59) whose title (Concept Name Code Sequence) is a code of
CID 7011 (:data:`REASONS`); the instances it references (Current Requested Procedure
Evidence Sequence > Referenced Series Sequence > Referenced SOP Sequence) are
*rejected*: they leave the ``instances`` collection and their series, study and
patient documents (counts, child lists, Modalities in Study: as a delete leaves them),
so no query nor retrieve path sees them, and their documents move to the ``rejected``
collection (with the code, the note, when and by whom) while their GridFS files stay.
The note itself is stored as any instance.  ``archive rejected purge`` deletes what
was rejected (documents and files), and so does a delete of the study
(:mod:`archive.deletion`); a re-sent rejected instance is refused until then.

**Judging** (:meth:`Rejecter.judge`, before anything is written).  Every reference must
name an instance of the note's own study and patient, in the series it names, with the
SOP class it names, and one the sender may delete (its Delete rules' filter); else
nothing is rejected and the note is not stored.  The statuses are dcm4chee-arc's:
0xA772 *no such instance* (also for one the sender may not delete, and for one of
another study or patient: a restricted sender learns nothing about what she may not
touch), 0xA773 *class-instance conflict*, 0xA774 *already rejected* (for another
reason; the same reason again is nothing to do), 0xA770 *duplicate rejection note*,
0xA771 *subsequent occurrence of a rejected object* (a re-send).

**Order of writes** (:meth:`Rejecter.store_note`):

0. a journal entry ``reject-<id>`` naming the note and each instance (SOP Instance UID,
   file id) with its hierarchy (:mod:`archive.journal`);
1. the note stored (its own store journal entry, as any C-STORE);
2. the ``rejected`` documents (copies of the instance documents, with ``rejection``);
3. the instance documents, each only with the file the entry names;
4. the series, study and patient documents (:meth:`Levels.remove`);
5. the entry removed; then the store is answered.

**Making a note** (:func:`note_dataset`, for the console): the Key Object Selection
Document IOD (PS3.3 A.35.4) of TID 2010 titled with the reason, in a new series of the
referenced study, referencing each instance in the evidence and in the content; it is
then stored as any received note.

A failure or a crash leaves the entry; its replay (:meth:`Rejecter.settle`, from
:meth:`archive.storage.Archive.reconcile`) rolls the rejection *forward* when the note
was stored (or some instance already moved), else drops it: the note and its
rejections happen together or not at all.  A purge is journaled the same way
(``purge-<id>``: the documents, then the files).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pymongo
from bson import ObjectId
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid
from pymongo.database import Database

from archive.find import FIND_BATCH, fields_read, narrowest, projection, server_filter
from archive.gridstore import GridStore
from archive.journal import Journal
from archive.levels import HIERARCHY_PROJECTION, Levels, hierarchy_of
from archive.modification import HISTORY
from archive.query import evaluate

log = logging.getLogger(__name__)

KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
#: CID 7011 "Rejected Instances": (Code Value, Coding Scheme Designator) -> meaning.
REASONS: dict[tuple[str, str], str] = {
    ("113001", "DCM"): "Rejected for Quality Reasons",
    ("113037", "DCM"): "Rejected for Patient Safety Reasons",
    ("113038", "DCM"): "Incorrect Modality Worklist Entry",
    ("113039", "DCM"): "Data Retention Policy Expired",
}

# C-STORE failure statuses of dcm4chee-arc (StoreService), which IOCM actors know.
DUPLICATE_REJECTION_NOTE = 0xA770
SUBSEQUENT_OCCURRENCE = 0xA771
NO_SUCH_INSTANCE = 0xA772
CLASS_INSTANCE_CONFLICT = 0xA773
ALREADY_REJECTED = 0xA774
#: a rejection note that names nothing to reject, or names it incompletely
CANNOT_UNDERSTAND = 0xC000

COLLECTION = "rejected"
REJECT_KIND, PURGE_KIND = "reject", "purge"
KINDS = frozenset({REJECT_KIND, PURGE_KIND})
#: MongoDB's (and FerretDB's) duplicate key error code.
DUPLICATE_KEY = 11000
#: Rejected documents per purge journal entry.
PURGE_BATCH = 1000
#: Seconds a node trusts that nothing was ever rejected (re-sends are then not looked
#: up); another node's first rejection is seen within this delay.
EMPTY_CHECK_SECONDS = 1.0


#: What a note copies from the referenced study (PS3.3 A.35.4: the Patient and General
#: Study modules; type 2 attributes are written empty when the study has none).
NOTE_PATIENT_STUDY = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                      "PatientSex", "OtherPatientIDsSequence", "StudyInstanceUID",
                      "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                      "AccessionNumber", "IssuerOfAccessionNumberSequence",
                      "StudyDescription")
_TYPE_2 = frozenset({"PatientName", "PatientBirthDate", "PatientSex", "StudyDate",
                     "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"})


class Refused(Exception):
    """The rejection note cannot be applied: the C-STORE status and Error Comment (the
    instance at fault, if any, is logged: a UID does not fit in the 64 characters)."""

    def __init__(self, status: int, comment: str, sop: str = "") -> None:
        super().__init__(comment)
        self.status, self.comment, self.sop = status, comment[:64], sop


@dataclass(frozen=True)
class Reference:
    study: str
    series: str
    sop_class: str
    sop: str


@dataclass(frozen=True)
class Note:
    """A rejection note, as its dataset says (nothing checked against the archive)."""

    sop: str
    study: str
    patient: str
    code: str
    meaning: str
    references: tuple[Reference, ...]


@dataclass(frozen=True)
class Rejection:
    """What applying a note came to: the instances it rejected now."""

    note: Note
    instances: int
    series: int
    #: the database failed after the note was stored: the journal finishes it
    deferred: bool = False


def _text(value: Any) -> str:
    return str(value or "").strip()


def note_of(ds: Dataset) -> Note | None:
    """The rejection note ``ds`` is, None when it is none.  Raises Refused (0xC000) for
    a note that references nothing, or an item without its UIDs."""
    if _text(ds.get("SOPClassUID")) != KEY_OBJECT_SELECTION:
        return None
    title = ds.get("ConceptNameCodeSequence") or []
    if not title:
        return None
    code = (_text(title[0].get("CodeValue")), _text(title[0].get("CodingSchemeDesignator")))
    if code not in REASONS:
        return None
    references: dict[Reference, None] = {}  # in order; a repeated one counted once
    for study_item in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
        study = _text(study_item.get("StudyInstanceUID"))
        for series_item in study_item.get("ReferencedSeriesSequence") or []:
            series = _text(series_item.get("SeriesInstanceUID"))
            for item in series_item.get("ReferencedSOPSequence") or []:
                ref = Reference(study, series, _text(item.get("ReferencedSOPClassUID")),
                                _text(item.get("ReferencedSOPInstanceUID")))
                if not all((ref.study, ref.series, ref.sop_class, ref.sop)):
                    raise Refused(CANNOT_UNDERSTAND, "rejection note: a reference lacks "
                                                     "a UID")
                references[ref] = None
    if not references:
        raise Refused(CANNOT_UNDERSTAND, "rejection note references no instance")
    return Note(_text(ds.get("SOPInstanceUID")), _text(ds.get("StudyInstanceUID")),
                _text(ds.get("PatientID")), code[0], REASONS[code],
                tuple(references))


def _code(value: str, meaning: str, scheme: str = "DCM") -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def note_dataset(study: Dataset, instances: Sequence[Mapping[str, Any]], code: str,
                 now: datetime.datetime | None = None) -> Dataset:
    """A rejection note titled with the CID 7011 ``code`` (a key of :data:`REASONS`)
    referencing ``instances`` (documents with ``_id``, ``SOPClassUID`` and
    ``SeriesInstanceUID``) of ``study`` (its Patient and General Study attributes):
    its own new series, the evidence grouped by series, one content item each."""
    meaning = REASONS[(code, "DCM")]
    now = now or datetime.datetime.now(datetime.timezone.utc)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = KEY_OBJECT_SELECTION, generate_uid()
    for keyword in NOTE_PATIENT_STUDY:
        if keyword in study and not study[keyword].is_empty:
            ds[keyword] = study[keyword]
        elif keyword in _TYPE_2:
            setattr(ds, keyword, "")
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "KO", generate_uid(), 1
    ds.SeriesDescription = "Rejection note"
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.Manufacturer = "dicom-archive"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code(code, meaning)]
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = [template]
    by_series: dict[str, list[Mapping[str, Any]]] = {}
    for doc in instances:
        by_series.setdefault(str(doc["SeriesInstanceUID"]), []).append(doc)
    evidence = Dataset()
    evidence.StudyInstanceUID = ds.StudyInstanceUID
    evidence.ReferencedSeriesSequence = []
    content = []
    for series, members in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series
        item.ReferencedSOPSequence = [_reference(doc) for doc in members]
        evidence.ReferencedSeriesSequence.append(item)
        for doc in members:
            entry = Dataset()
            entry.RelationshipType, entry.ValueType = "CONTAINS", _value_type(doc)
            entry.ReferencedSOPSequence = [_reference(doc)]
            content.append(entry)
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    ds.ContentSequence = content
    return ds


def _value_type(doc: Mapping[str, Any]) -> str:
    """A content item's Value Type for the instance (TID 2010): IMAGE, WAVEFORM, or
    COMPOSITE for any other class (a report, a plan, a presentation state)."""
    name = UID(str(doc["SOPClassUID"])).name
    return "IMAGE" if "Image Storage" in name else "WAVEFORM" if "Waveform" in name \
        else "COMPOSITE"


def _reference(doc: Mapping[str, Any]) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = str(doc["SOPClassUID"])
    ref.ReferencedSOPInstanceUID = str(doc["_id"])
    return ref


def note_part10(ds: Dataset) -> bytes:
    """The note as a Part-10 file (Explicit VR Little Endian), as a sender sends it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (ds.SOPClassUID,
                                                                     ds.SOPInstanceUID)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def listed(doc: Mapping[str, Any]) -> dict[str, Any]:
    """One rejected instance (a document of :meth:`Rejecter.select`) as a row: where
    it was, why, when, by whom (``archive rejected list`` and the console's page)."""
    rejection = doc.get("rejection") or {}
    at = rejection.get("at")
    return {"PatientID": doc["PatientID"], "StudyInstanceUID": doc["StudyInstanceUID"],
            "SeriesInstanceUID": doc["SeriesInstanceUID"], "SOPInstanceUID": doc["_id"],
            "code": rejection.get("code", ""), "meaning": rejection.get("meaning", ""),
            "at": at.strftime("%Y-%m-%dT%H:%M:%SZ") if hasattr(at, "strftime") else str(at),
            "by": rejection.get("by", ""), "note": rejection.get("note", "")}


class Rejecter:
    """Rejects, lists and purges instances of one archive (see the module docstring)."""

    def __init__(self, db: Database, levels: Levels, files: GridStore, journal: Journal,
                 active: set[str]) -> None:
        self.rejected = db[COLLECTION]
        self.levels, self.files, self.journal = levels, files, journal
        #: journal keys of work running in this process (the archive's, shared)
        self.active = active
        self._any: bool | None = None
        self._checked = -float("inf")
        self._lock = threading.Lock()

    @staticmethod
    def ensure_indexes(db: Database) -> None:
        for key in ("StudyInstanceUID", "PatientID", "file_id"):
            db[COLLECTION].create_index([(key, pymongo.ASCENDING)])

    # -- re-sends -----------------------------------------------------------------------

    def rejection_of(self, sop: str) -> dict[str, Any] | None:
        """The ``rejection`` of a rejected SOP Instance UID (None: not rejected).  No
        lookup while the collection is known to be empty (:data:`EMPTY_CHECK_SECONDS`)."""
        if not self._maybe_any():
            return None
        found = self.rejected.find_one({"_id": sop}, {"rejection": 1})
        return found.get("rejection") or {} if found is not None else None

    def _maybe_any(self) -> bool:
        now = time.monotonic()
        if self._any is None or now - self._checked >= EMPTY_CHECK_SECONDS:
            with self._lock:
                self._any = self.rejected.find_one({}, {"_id": 1}) is not None
                self._checked = now
        return bool(self._any)

    # -- rejecting ----------------------------------------------------------------------

    def judge(self, note: Note, may_delete: dict[str, Any] | None) -> list[dict[str, Any]]:
        """The instance documents the note rejects now; raises Refused (see the module
        docstring).  ``may_delete``: the filter of what the sender may delete (None:
        everything)."""
        if self.levels.instances.find_one({"_id": note.sop}, {"_id": 1}) is not None:
            raise Refused(DUPLICATE_REJECTION_NOTE, "rejection note already received")
        for ref in note.references:
            if ref.study != note.study:
                raise Refused(NO_SUCH_INSTANCE, "rejection failed: reference outside the "
                                                "note's study", ref.sop)
        sops = list(dict.fromkeys(ref.sop for ref in note.references))
        fields = projection({*fields_read(may_delete or {}), *HIERARCHY_PROJECTION,
                             "SOPClassUID"})
        found = {d["_id"]: d for d in self.levels.instances.find({"_id": {"$in": sops}},
                                                                 fields)}
        counted: set[str] = set()  # instances their series counts (not a store in flight)
        for doc in self.levels.series.find(
                {"_id": {"$in": list({d["SeriesInstanceUID"] for d in found.values()})}},
                {"instances": 1}):
            counted.update(doc.get("instances") or ())
        earlier = {d["_id"]: d for d in self.rejected.find(
            {"_id": {"$in": sops}}, {**fields, "rejection": 1})}

        def visible(doc: dict[str, Any] | None, ref: Reference) -> bool:
            return doc is not None and hierarchy_of(doc) == (
                ref.series, ref.study, note.patient) and (
                may_delete is None or evaluate(may_delete, doc))

        taken = []
        for ref in note.references:
            doc = found.get(ref.sop)
            if visible(doc, ref) and ref.sop in counted:
                assert doc is not None
                if doc.get("SOPClassUID") != ref.sop_class:
                    raise Refused(CLASS_INSTANCE_CONFLICT,
                                  "rejection failed: class-instance conflict", ref.sop)
                taken.append(doc)
            elif visible(earlier.get(ref.sop), ref):
                if earlier[ref.sop].get("rejection", {}).get("code") != note.code:
                    raise Refused(ALREADY_REJECTED, "rejection failed: already rejected",
                                  ref.sop)
            else:
                raise Refused(NO_SUCH_INSTANCE, "rejection failed: no such instance", ref.sop)
        return taken

    def store_note(self, note: Note, may_delete: dict[str, Any] | None, by: str,
                   store: Callable[[], Any]) -> tuple[Any, Rejection | None]:
        """Judge the note, journal its rejections, ``store`` it (answers an outcome with
        ``ok``), then reject: the outcome and what was rejected.  Raises Refused (nothing
        written) and the database's errors before the note is stored (nothing done)."""
        try:
            taken = self.judge(note, may_delete)
        except Refused as exc:
            log.warning("rejection note %s by %s refused: 0x%04X %s%s", note.sop, by,
                        exc.status, exc.comment, f" ({exc.sop})" if exc.sop else "")
            raise
        key = f"{REJECT_KIND}-{ObjectId()}"
        entry = {"kind": REJECT_KIND, "pid": os.getpid(), "note": note.sop,
                 "code": note.code, "meaning": note.meaning, "by": by,
                 "at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                 "instances": [[d["_id"], str(d["file_id"])] for d in taken],
                 "hierarchies": [list(h) for h in dict.fromkeys(map(hierarchy_of, taken))]}
        self.active.add(key)
        try:
            self.journal.write(key, entry)
            outcome = store()
            if not outcome.ok:  # the note is not stored: nothing is rejected
                self.journal.remove(key)
                return outcome, None
            rejection = Rejection(note, len(taken), len({d["SeriesInstanceUID"]
                                                         for d in taken}))
            try:
                self._apply(entry, taken)
            except pymongo.errors.PyMongoError as exc:
                log.error("rejection by note %s interrupted (%s): the journal finishes it "
                          "when the database answers", note.sop, type(exc).__name__)
                return outcome, Rejection(note, rejection.instances, rejection.series, True)
            self.journal.remove(key)
            return outcome, rejection
        finally:
            self.active.discard(key)

    def _apply(self, entry: dict[str, Any], taken: list[dict[str, Any]]) -> None:
        if not taken:
            return
        self._any = True
        moved = self._move(entry)
        again = list(self.levels.instances.find({"_id": {"$in": [d["_id"] for d in taken]}},
                                                HIERARCHY_PROJECTION))
        if moved == len(taken) and not again:
            self.levels.remove(taken)
        else:  # replaced, re-sent or deleted meanwhile: rebuilt from their members
            self.levels.recompute(*map(hierarchy_of, taken), *map(hierarchy_of, again))

    def _move(self, entry: dict[str, Any]) -> int:
        """The entry's instances (those still with its file) copied to ``rejected``,
        then taken out of ``instances``; how many."""
        pairs = [(str(sop), ObjectId(file_id)) for sop, file_id in entry["instances"]]
        if not pairs:
            return 0
        stamp = {"code": entry["code"], "meaning": entry["meaning"], "note": entry["note"],
                 "by": entry["by"], "at": datetime.datetime.fromisoformat(entry["at"])}
        docs = list(self.levels.instances.find({"_id": {"$in": [p[0] for p in pairs]},
                                                "file_id": {"$in": [p[1] for p in pairs]}}))
        if docs:  # one round trip; a replay finds those it had copied already
            try:
                self.rejected.insert_many([{**doc, "rejection": stamp} for doc in docs],
                                          ordered=False)
            except pymongo.errors.BulkWriteError as exc:
                if any(e.get("code") != DUPLICATE_KEY for e in
                       exc.details.get("writeErrors", ())) or exc.details.get(
                        "writeConcernErrors"):
                    raise
        return self.levels.instances.delete_many(
            {"_id": {"$in": [d["_id"] for d in docs]},
             "file_id": {"$in": [d["file_id"] for d in docs]}}).deleted_count

    # -- listing and purging ------------------------------------------------------------

    def select(self, exact: dict[str, Any] | None) -> list[dict[str, Any]]:
        """The rejected documents ``exact`` (a filter as :mod:`archive.deletion` takes;
        None: all) selects, without their datasets but StudyDate and descriptions."""
        fields = projection({*fields_read(exact or {}), *HIERARCHY_PROJECTION,
                             "rejection", "StudyDate", "SOPClassUID", HISTORY})
        cursor = self.rejected.find(narrowest(server_filter(exact)) if exact else {},
                                    fields, batch_size=FIND_BATCH)
        found = [d for d in cursor if exact is None or evaluate(exact, d)]
        return sorted(found, key=lambda d: (d["PatientID"], d["StudyInstanceUID"],
                                            d["SeriesInstanceUID"], d["_id"]))

    def purge(self, docs: Iterable[dict[str, Any]]) -> int:
        """Delete rejected documents and their files, journaled; how many."""
        done = 0
        docs = list(docs)
        for start in range(0, len(docs), PURGE_BATCH):
            batch = docs[start:start + PURGE_BATCH]
            key = f"{PURGE_KIND}-{ObjectId()}"
            entry = {"kind": PURGE_KIND, "pid": os.getpid(),
                     "instances": [[d["_id"], str(d["file_id"])] for d in batch],
                     # the originals of corrected instances go with them
                     "originals": [str(h["file_id"]) for d in batch
                                   for h in d.get(HISTORY) or []]}
            self.active.add(key)
            try:
                self.journal.write(key, entry)
                self._purge(entry)
                self.journal.remove(key)
            finally:
                self.active.discard(key)
            done += len(batch)
        return done

    def _purge(self, entry: dict[str, Any]) -> None:
        pairs = [(str(sop), ObjectId(file_id)) for sop, file_id in entry["instances"]]
        self.rejected.delete_many({"_id": {"$in": [p[0] for p in pairs]},
                                   "file_id": {"$in": [p[1] for p in pairs]}})
        self.files.delete_many([p[1] for p in pairs]
                               + [ObjectId(f) for f in entry.get("originals", [])])

    # -- journal replay -----------------------------------------------------------------

    def settle(self, entry: dict[str, Any]) -> list[tuple[str, str, str]]:
        """Finish an interrupted rejection or purge (journal replay); the hierarchies
        whose level documents the caller rebuilds.  A rejection whose note was never
        stored (and moved nothing yet) is dropped."""
        if entry.get("kind") == PURGE_KIND:
            self._purge(entry)
            return []
        sops = [str(sop) for sop, _ in entry.get("instances", [])]
        stored = self.levels.instances.find_one({"_id": entry["note"]}, {"_id": 1})
        if stored is None and not self.rejected.find_one(
                {"_id": {"$in": sops}, "rejection.note": entry["note"]}, {"_id": 1}):
            log.info("rejection by note %s dropped: the note was not stored", entry["note"])
            return []
        self._move(entry)
        return [tuple(h) for h in entry.get("hierarchies", [])]  # type: ignore[misc]

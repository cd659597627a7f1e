"""Storing an instance: original bytes in GridFS, metadata documents in MongoDB.

The instance document is the commit point.  Order of writes:

1. the Part-10 bytes into GridFS (chunks, then the files document);
2. the instance document (upsert by SOP Instance UID, so a re-send never duplicates);
3. the series, study and patient documents (attributes, child lists, counters);
4. on replacement, the previous GridFS file is deleted.

A failure at any step undoes what the steps before it wrote.  If the undo itself fails
(the database went away), what is left to undo is appended to a local journal and
replayed by :meth:`Archive.reconcile` once the database answers again, so no orphan
survives the outage and no half-stored instance is ever acknowledged.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pymongo
from bson import ObjectId
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pymongo.database import Database
from pymongo.errors import ConnectionFailure, DuplicateKeyError, OperationFailure, PyMongoError

from archive import dicomjson, identifiers, model
from archive import part10 as part10_check
from archive.gridstore import ChunkWriteFailed as _ChunkWriteFailed
from archive.gridstore import GridStore
from archive.model import IMAGE, PATIENT, SERIES, STUDY

log = logging.getLogger(__name__)

# DIMSE statuses of C-STORE (PS3.4 B.2.3) used here.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DUPLICATE_SOP_INSTANCE = 0x0111
CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    comment: str = ""
    sop_instance_uid: str = ""
    replaced: bool = False

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


class _AlreadyStored(Exception):
    """The instance is stored already and the duplicate policy keeps the first copy."""


class StoreRefused(Exception):
    """The dataset cannot be stored; carries the DIMSE status and Error Comment."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status, self.comment = status, comment


def connect(uri: str, timeout_seconds: float) -> pymongo.MongoClient:
    """A client that fails fast: a dead database must turn into a failure status
    within seconds, not hold a modality's association for the driver's 30 s default."""
    ms = int(timeout_seconds * 1000)
    return pymongo.MongoClient(
        uri, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=ms * 4,
        tz_aware=True, appname="dicom-archive",
    )


def ensure_indexes(db: Database) -> None:
    for collection, indexes in model.INDEXES.items():
        for keys in indexes:
            db[collection].create_index([(k, pymongo.ASCENDING) for k in keys])


# --- reading values out of DICOM JSON ---------------------------------------------


def json_string(data: dict[str, Any], tag: int) -> str:
    """First value of an attribute as text ('' when absent); PN as its alphabetic group."""
    elem = data.get(f"{tag:08X}")
    if not elem or not elem.get("Value"):
        return ""
    value = elem["Value"][0]
    if isinstance(value, dict):
        return str(value.get("Alphabetic", ""))
    return str(value)


def normalised_fields(level: str, data: dict[str, Any]) -> dict[str, Any]:
    """The indexed top-level fields of a level document, from its DICOM JSON.

    An empty or absent value leaves its field out (an empty StudyTime must not read as
    midnight), except the hierarchy keys, which are always present.
    """
    fields: dict[str, Any] = {}
    for tag, spec in model.NORMALISED[level].items():
        if tag in model.COMPUTED_KEYS:
            continue
        raw = json_string(data, tag)
        if raw.strip() or spec.name in _HIERARCHY_FIELDS:
            fields[spec.name] = spec.normalise(raw)
    return fields


_HIERARCHY_FIELDS = frozenset(model.UNIQUE_KEY.values())
_HIERARCHY_PROJECTION = {"file_id": 1, "SeriesInstanceUID": 1, "StudyInstanceUID": 1,
                         "PatientID": 1}


def level_dataset(level: str, data: dict[str, Any]) -> dict[str, Any]:
    keep = model.STORED_KEYS[level]
    return {k: v for k, v in data.items() if k in keep}


# --- the archive -------------------------------------------------------------------


class Archive:
    """Storage operations shared by C-STORE and ``archive import``."""

    def __init__(self, db: Database, bucket: str = "fs", duplicate_policy: str = "replace",
                 journal: str | Path = "data/journal.jsonl") -> None:
        self.db = db
        self.files = GridStore(db, bucket)
        self.policy = duplicate_policy
        self.journal = Path(journal)
        self._journal_lock = threading.Lock()
        self.instances = db[model.COLLECTION[IMAGE]]
        self.series = db[model.COLLECTION[SERIES]]
        self.studies = db[model.COLLECTION[STUDY]]
        self.patients = db[model.COLLECTION[PATIENT]]

    # -- parsing ----------------------------------------------------------------------

    @staticmethod
    def parse(part10: bytes) -> Dataset:
        """Decode the metadata of a Part-10 file, refusing what cannot be stored.

        Refused with 0xC000: what pydicom cannot read, a file cut short (pydicom reads
        it without a word: :mod:`archive.part10` checks every declared length), a
        missing key UID, and key values that would corrupt the documents' keys
        (:mod:`archive.identifiers`).
        """
        ds: Dataset | None = None
        try:
            ds = dcmread(BytesIO(part10), force=False)
            part10_check.check(part10, ds)
            ds.SOPInstanceUID  # noqa: B018 - force decoding of the element now
        except part10_check.Incomplete as exc:
            raise StoreRefused(CANNOT_UNDERSTAND, str(exc)[:64]) from None
        except (InvalidDicomError, EOFError) as exc:
            _refuse_if_incomplete(part10, ds)
            raise StoreRefused(CANNOT_UNDERSTAND, f"not a DICOM dataset: {exc}"[:64]) from None
        except AttributeError:
            raise StoreRefused(CANNOT_UNDERSTAND, "no SOP Instance UID (0008,0018)") from None
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on garbage
            _refuse_if_incomplete(part10, ds)
            raise StoreRefused(CANNOT_UNDERSTAND, f"cannot parse dataset: {exc}"[:64]) from None
        for keyword, tag in identifiers.KEYS:  # the values documents are keyed on
            try:
                vr = str(ds[keyword].VR) if keyword in ds else ""
                value = ds.get(keyword)
                problem = identifiers.problem(keyword, tag, value, vr)
                if not problem and keyword != "PatientID" and not str(value or "").strip():
                    problem = f"no {keyword} ({tag})"
            except Exception as exc:  # noqa: BLE001 - a value pydicom cannot decode
                problem = f"{keyword} ({tag}) cannot be read: {exc}"[:64]
            if problem:
                raise StoreRefused(CANNOT_UNDERSTAND, problem)
        return ds

    # -- store ------------------------------------------------------------------------

    def store(self, part10: bytes, source: str = "", ds: Dataset | None = None) -> StoreOutcome:
        """Store one Part-10 file; the outcome's status is what C-STORE answers."""
        try:
            ds = ds if ds is not None else self.parse(part10)
        except StoreRefused as exc:
            return StoreOutcome(exc.status, exc.comment)
        sop_uid = str(ds.SOPInstanceUID).strip()
        try:
            return self._store(part10, ds, sop_uid, source)
        except StoreRefused as exc:
            return StoreOutcome(exc.status, exc.comment, sop_uid)
        except Exception as exc:  # noqa: BLE001 - taken back already; the sender is told
            if _refused_data(exc):
                log.error("store %s refused: cannot store this dataset: %s: %s", sop_uid,
                          type(exc).__name__, _reason(exc)[:200])
                return StoreOutcome(CANNOT_UNDERSTAND, f"cannot store this dataset: "
                                    f"{_reason(exc)}"[:64], sop_uid)
            log.error("store %s failed: database error: %s", sop_uid, exc)
            return StoreOutcome(OUT_OF_RESOURCES, f"database error: {type(exc).__name__}"[:64],
                                sop_uid)

    def _store(self, part10: bytes, ds: Dataset, sop_uid: str, source: str) -> StoreOutcome:
        transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
        entry: dict[str, Any] = {"sop": sop_uid, "length": len(part10)}
        try:
            file_id = self.files.put(part10, f"{sop_uid}.dcm", {
                "SOPInstanceUID": sop_uid, "TransferSyntaxUID": transfer_syntax})
        except _ChunkWriteFailed as exc:
            failed_id = exc.file_id
            self._undo(lambda: self.files.delete(failed_id, len(part10)),
                       {**entry, "kind": "orphan", "file_id": str(failed_id)}, exc.cause)
            raise exc.cause from None
        entry.update(kind="orphan", file_id=str(file_id))
        try:
            previous = self._index(ds, file_id, transfer_syntax, len(part10), source, entry)
        except _AlreadyStored:
            self._undo(lambda: self.files.delete(file_id, len(part10)), entry)
            if self.policy == "reject":
                raise StoreRefused(DUPLICATE_SOP_INSTANCE, "SOP Instance already stored") from None
            return StoreOutcome(SUCCESS, "already stored, kept", sop_uid)
        if previous is not None:
            try:
                self.files.delete(previous["file_id"])
            except PyMongoError:
                self._journal_append({"kind": "orphan", "sop": sop_uid,
                                      "file_id": str(previous["file_id"])})
        return StoreOutcome(SUCCESS, "", sop_uid, replaced=previous is not None)

    def _index(self, ds: Dataset, file_id: ObjectId, transfer_syntax: str, size: int,
               source: str, entry: dict[str, Any]) -> dict[str, Any] | None:
        """Write the instance and level documents for a file already in GridFS.

        Returns the instance document it replaced, if any.  On failure it takes back
        everything (its own writes and the file) exactly as the journal replay would,
        then re-raises.
        """
        try:
            data = dicomjson.to_json(ds, file_id)
            doc = self.instance_document(data, file_id, transfer_syntax, size, source)
        except Exception as exc:  # nothing indexed yet: the file alone is taken back
            self._undo(lambda: self._replay(entry), entry, exc)
            raise
        undo: dict[str, Any] = {**entry, "kind": "undo", "hierarchy": list(_hierarchy(doc))}
        try:
            try:
                self.instances.insert_one(doc)  # a new instance: one round trip
                previous = None
            except DuplicateKeyError:
                if self.policy != "replace":
                    raise _AlreadyStored from None
                previous = self._replace(doc, undo)
            moved = previous is not None and _hierarchy(previous) != _hierarchy(doc)
            self._update_levels(doc, data, is_new=previous is None or moved)
            if moved:
                self.recompute(_hierarchy(previous))
        except _AlreadyStored:
            raise
        except Exception as exc:  # any failure, not only the database's: take it all back
            self._undo(lambda: self._replay(undo), undo, exc)
            raise
        return previous

    def _replace(self, doc: dict[str, Any], undo: dict[str, Any]) -> dict[str, Any] | None:
        """Replace a stored instance document; the one replaced (None if it vanished)."""
        # Read first what an undo needs should the replace be applied but its reply be
        # lost: find_one_and_replace's answer would then never reach us.
        prior = self.instances.find_one({"_id": doc["_id"]}, _HIERARCHY_PROJECTION)
        if prior is not None:
            undo["previous_file_id"] = str(prior["file_id"])
            undo["previous_hierarchy"] = list(_hierarchy(prior))
        # (no projection: FerretDB 1.24 does not implement findAndModify "fields")
        return self.instances.find_one_and_replace(
            {"_id": doc["_id"]}, doc, upsert=True, return_document=pymongo.ReturnDocument.BEFORE)

    @staticmethod
    def instance_document(data: dict[str, Any], file_id: ObjectId, transfer_syntax: str,
                          size: int, source: str) -> dict[str, Any]:
        doc = normalised_fields(IMAGE, data)
        doc.update({
            "_id": doc["SOPInstanceUID"],
            "Modality": json_string(data, 0x00080060),
            "TransferSyntaxUID": transfer_syntax,
            "file_id": file_id, "size": size, "source": source,
            "stored_at": datetime.datetime.now(datetime.timezone.utc),
            "dataset": data,
        })
        return doc

    def _update_levels(self, doc: dict[str, Any], data: dict[str, Any], is_new: bool) -> None:
        """Fold one instance into its series, study and patient documents."""
        series_uid, study_uid, patient_id = (doc["SeriesInstanceUID"], doc["StudyInstanceUID"],
                                             doc["PatientID"])
        inc = 1 if is_new else 0
        result = self.series.update_one({"_id": series_uid}, {
            "$set": {**normalised_fields(SERIES, data), "dataset": level_dataset(SERIES, data)},
            "$addToSet": {"instances": doc["_id"]},
            "$inc": {"NumberOfSeriesRelatedInstances": inc,
                     f"{SOP_CLASS_COUNTS}.{_field_name(doc['SOPClassUID'])}": inc},
        }, upsert=True)
        new_series = 1 if result.upserted_id is not None else 0
        result = self.studies.update_one({"_id": study_uid}, {
            "$set": {**normalised_fields(STUDY, data), "dataset": level_dataset(STUDY, data)},
            "$addToSet": {"series": series_uid, "ModalitiesInStudy": doc["Modality"],
                          "SOPClassesInStudy": doc["SOPClassUID"]},
            "$inc": {"NumberOfStudyRelatedSeries": new_series,
                     "NumberOfStudyRelatedInstances": inc},
        }, upsert=True)
        new_study = 1 if result.upserted_id is not None else 0
        self.patients.update_one({"_id": patient_id}, {
            "$set": {**normalised_fields(PATIENT, data), "dataset": level_dataset(PATIENT, data)},
            "$addToSet": {"studies": study_uid},
            "$inc": {"NumberOfPatientRelatedStudies": new_study,
                     "NumberOfPatientRelatedSeries": new_series,
                     "NumberOfPatientRelatedInstances": inc},
        }, upsert=True)

    # -- consistency ------------------------------------------------------------------

    def recompute(self, hierarchy: tuple[str, str, str]) -> None:
        """Rebuild the level documents of one series/study/patient from the instances.

        Only used after a failure or a re-send that moved an instance: the counters are
        otherwise maintained incrementally on store.
        """
        series_uid, study_uid, patient_id = hierarchy
        members = list(self.instances.find(
            {"SeriesInstanceUID": series_uid}, {"_id": 1, "SOPClassUID": 1, "Modality": 1}))
        if members:
            classes = Counter(_field_name(m["SOPClassUID"]) for m in members)
            self.series.update_one({"_id": series_uid}, {"$set": {
                "instances": [m["_id"] for m in members],
                "NumberOfSeriesRelatedInstances": len(members),
                SOP_CLASS_COUNTS: dict(classes)}})
        else:
            self.series.delete_one({"_id": series_uid})
        study_series = list(self.series.find(
            {"StudyInstanceUID": study_uid},
            {"_id": 1, "Modality": 1, "NumberOfSeriesRelatedInstances": 1}))
        if study_series:
            classes = self.instances.distinct("SOPClassUID", {"StudyInstanceUID": study_uid})
            self.studies.update_one({"_id": study_uid}, {"$set": {
                "series": [s["_id"] for s in study_series],
                "NumberOfStudyRelatedSeries": len(study_series),
                "NumberOfStudyRelatedInstances": sum(
                    s["NumberOfSeriesRelatedInstances"] for s in study_series),
                "ModalitiesInStudy": sorted({s["Modality"] for s in study_series}),
                "SOPClassesInStudy": sorted(classes)}})
        else:
            self.studies.delete_one({"_id": study_uid})
        studies = list(self.studies.find(
            {"PatientID": patient_id},
            {"_id": 1, "NumberOfStudyRelatedSeries": 1, "NumberOfStudyRelatedInstances": 1}))
        if studies:
            self.patients.update_one({"_id": patient_id}, {"$set": {
                "studies": [s["_id"] for s in studies],
                "NumberOfPatientRelatedStudies": len(studies),
                "NumberOfPatientRelatedSeries": sum(
                    s["NumberOfStudyRelatedSeries"] for s in studies),
                "NumberOfPatientRelatedInstances": sum(
                    s["NumberOfStudyRelatedInstances"] for s in studies)}})
        else:
            self.patients.delete_one({"_id": patient_id})

    def _undo(self, restore: Callable[[], None], entry: dict[str, Any],
              cause: Exception | None = None) -> None:
        """Roll back a failed store now, or journal it for :meth:`reconcile`.

        When the failure was the connection and the database does not answer a short
        ping, the rollback is journalled at once: trying it would only wait out the same
        timeout again, for every store of an outage.
        """
        if isinstance(cause, ConnectionFailure) and not self._answers():
            log.warning("rollback of %s deferred to the journal: %s", entry.get("sop"), cause)
            self._journal_append(entry)
            return
        try:
            restore()
        except PyMongoError as exc:
            log.warning("rollback of %s deferred to the journal: %s", entry.get("sop"), exc)
            self._journal_append(entry)

    def _answers(self, seconds: float = 1.0) -> bool:
        try:
            with pymongo.timeout(seconds):
                self.db.command("ping")
        except PyMongoError:
            return False
        return True

    def _journal_append(self, entry: dict[str, Any]) -> None:
        with self._journal_lock:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            with self.journal.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def pending(self) -> bool:
        return self.journal.exists() and self.journal.stat().st_size > 0

    def reconcile(self) -> int:
        """Replay the journal once the database answers again.

        ``orphan``: a file no instance document refers to any more is deleted.
        ``undo``: a store answered with a failure is taken back: its instance document
        (if it got written) and file are deleted, the previous version, if there was one,
        is indexed again from its own original, and the level documents are rebuilt.
        Raises PyMongoError, keeping the journal, while the database is unreachable.
        """
        with self._journal_lock:
            if not self.pending():
                return 0
            lines = self.journal.read_text(encoding="utf-8").splitlines()
            entries = [json.loads(line) for line in lines if line.strip()]
            for entry in entries:
                self._replay(entry)
            self.journal.write_text("", encoding="utf-8")
        log.info("journal replayed: %d entries", len(entries))
        return len(entries)

    def _replay(self, entry: dict[str, Any]) -> None:
        file_id = ObjectId(entry["file_id"])
        current = self.instances.find_one({"_id": entry["sop"]}, {"file_id": 1})
        if entry["kind"] == "undo":
            if current is not None and current["file_id"] == file_id:
                self.instances.delete_one({"_id": entry["sop"], "file_id": file_id})
                current = None
            previous = entry.get("previous_file_id")
            if current is None and previous and self.files.exists(ObjectId(previous)):
                self._reindex(ObjectId(previous))
                current = {"file_id": ObjectId(previous)}
        if not entry.get("keep_file") and (current is None or current["file_id"] != file_id):
            self.files.delete(file_id, entry.get("length"))
        for key in ("hierarchy", "previous_hierarchy"):
            if key in entry:
                self.recompute(tuple(entry[key]))  # type: ignore[arg-type]

    def _reindex(self, file_id: ObjectId) -> None:
        """Index an original already in GridFS again (its metadata was lost)."""
        part10 = self.files.read(file_id)
        ds = self.parse(part10)
        self._index(ds, file_id, str(ds.file_meta.get("TransferSyntaxUID", "")),
                    len(part10), "reindex",
                    {"sop": str(ds.SOPInstanceUID), "kind": "orphan", "file_id": str(file_id),
                     "keep_file": True})

    # -- reading ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counts per level, instances per modality and per SOP class.

        Read from the series documents' counters: summing over instance documents
        would make FerretDB decode every one of them (minutes for a large archive).
        """
        modalities: Counter[str] = Counter()
        classes: Counter[str] = Counter()
        series = 0
        for doc in self.series.find({}, {"Modality": 1, "NumberOfSeriesRelatedInstances": 1,
                                         SOP_CLASS_COUNTS: 1}):
            series += 1
            modalities[doc.get("Modality", "")] += doc.get("NumberOfSeriesRelatedInstances", 0)
            for key, count in doc.get(SOP_CLASS_COUNTS, {}).items():
                classes[key.replace("_", ".")] += count
        return {
            "patients": self.patients.count_documents({}),
            "studies": self.studies.count_documents({}),
            "series": series,
            "instances": sum(modalities.values()),
            "modalities": dict(modalities.most_common()),
            "sop_classes": {uid: n for uid, n in classes.most_common() if n},
        }


#: Server error codes meaning "this document can never be stored", not "try later":
#: BadValue (FerretDB: infinity, '$' or '.' in a key), FailedToParse, TypeMismatch,
#: PathNotViable, DollarPrefixedFieldName, EmptyFieldName, DottedFieldName,
#: BSONObjectTooLarge, KeyTooLong.
_DATA_ERROR_CODES = frozenset({2, 9, 14, 28, 52, 56, 57, 10334, 17280})


def _refused_data(exc: BaseException) -> bool:
    """Whether a failure is the data's (0xC000: sending it again cannot help) rather
    than the database's (0xA700: it may work later).

    The data's: anything not from the database (BSON refusing to encode the document,
    an OverflowError, a value the code cannot handle: it would fail again), and the
    server refusing the document as invalid.  A lost connection is never the data's
    -- FerretDB drops the connection on a NaN, which is why none reaches it.
    """
    if isinstance(exc, PyMongoError):
        return isinstance(exc, OperationFailure) and exc.code in _DATA_ERROR_CODES
    return True


def _reason(exc: BaseException) -> str:
    """A short reason for an Error Comment: the first line, printable ASCII only."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in text)


def _refuse_if_incomplete(part10: bytes, ds: Dataset | None) -> None:
    """A file pydicom failed on because it is cut short is refused as truncated."""
    if ds is None:
        try:
            part10_check.check(part10, None)
        except part10_check.Incomplete as exc:
            raise StoreRefused(CANNOT_UNDERSTAND, str(exc)[:64]) from None


#: Series field counting its instances per SOP Class (keys: the UID with "_" for ".",
#: since field names cannot hold dots).
SOP_CLASS_COUNTS = "sop_class_counts"


def _field_name(uid: str) -> str:
    return uid.replace(".", "_")


def _hierarchy(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc["SeriesInstanceUID"], doc["StudyInstanceUID"], doc["PatientID"]

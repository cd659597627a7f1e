"""Storing an instance: original bytes in GridFS, metadata documents in MongoDB.

The instance document is the commit point.  Order of writes:

0. a journal entry naming what is about to be written (:mod:`archive.journal`);
1. the Part-10 bytes into GridFS (chunks, then the files document);
2. the instance document (insert; a re-send replaces the stored one by SOP Instance UID);
3. the series, study and patient documents (attributes, child lists, counters);
4. on replacement, the previous GridFS file is deleted;
5. the journal entry is removed, then the store is answered.

A failure at any step undoes what the steps before it wrote.  If the undo itself fails
(the database went away) or the node dies, the journal entry is still there and
:meth:`Archive.reconcile` finishes the work once the database answers again, so no
orphan survives and no half-stored instance is ever acknowledged.

**Hierarchy conflicts.**  A Study Instance UID belongs to one patient and a Series
Instance UID to one study.  A store that would put an instance into a series of another
study is refused; one that would put it into a study (or series) of another patient, or
re-send a SOP Instance UID under another patient, is a *patient conflict* that the site
decides (``hierarchy_conflicts``): ``refuse`` (the default, status 0xC409) or ``accept``
(the instance joins the existing study: a *mixed* study whose counters stay exact).
The check costs no read: the level documents are upserted on a filter naming the
study and patient the instance claims, which a conflicting document fails with a
duplicate key.

**Counters.**  Each level document keeps counters, child lists and the sets of values
its instances carry (modalities, SOP classes, and a hash of its level attributes per
distinct variant: a document whose instances disagree on them is *mixed*, which the
access rules must know).  A new instance updates them incrementally (atomic per
document); a re-send that moves an instance or changes what it contributes, an accepted
conflict, a rollback and the journal replay rebuild the affected documents exactly
from their members (:meth:`Archive.recompute`), by navigation through the child lists
(lookups by ``_id``, cheap on every database) and with a compare-and-set on each
document's ``rev`` so that a rebuild never overwrites a concurrent store's update.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pymongo
from bson import ObjectId
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import ConnectionFailure, DuplicateKeyError, OperationFailure, PyMongoError

from archive import dicomjson, identifiers, model
from archive import part10 as part10_check
from archive.gridstore import ChunkWriteFailed as _ChunkWriteFailed
from archive.gridstore import GridStore
from archive.health import DatabaseHealth
from archive.journal import Journal
from archive.model import IMAGE, PATIENT, SERIES, STUDY

log = logging.getLogger(__name__)

# DIMSE statuses of C-STORE (PS3.4 B.2.3) used here.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DUPLICATE_SOP_INSTANCE = 0x0111
CANNOT_UNDERSTAND = 0xC000
#: Error: Cannot understand (Cxxx), here: the instance contradicts the stored hierarchy
#: (a study of another patient, a series of another study).  A permanent failure: a
#: sender must not retry it as it would an 0xA7xx "out of resources".
HIERARCHY_CONFLICT = 0xC409

CONFLICT_POLICIES = ("refuse", "accept")


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    comment: str = ""
    sop_instance_uid: str = ""
    replaced: bool = False

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


class StoreRefused(Exception):
    """The dataset cannot be stored; carries the DIMSE status and Error Comment."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status, self.comment = status, comment


@dataclass(frozen=True)
class Existing:
    """What a store would replace or join, as stored now (None: not stored).

    Read only when a caller asks to judge it (a principal restricted by Store rules).
    """

    instance: dict[str, Any] | None
    series: dict[str, Any] | None
    study: dict[str, Any] | None


#: Judges a store against what it would replace or join; raises StoreRefused to refuse.
Admit = Callable[[Existing], None]


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


def level_dataset(level: str, data: dict[str, Any]) -> dict[str, Any]:
    keep = model.STORED_KEYS[level]
    return {k: v for k, v in data.items() if k in keep}


def attribute_hashes(data: dict[str, Any]) -> dict[str, str]:
    """A short hash of the attributes each level document would hold for ``data``.

    Two instances of one study with different hashes at STUDY disagree on a patient or
    study attribute: the study is *mixed*, and no single document describes it.
    """
    return {level: hashlib.sha1(json.dumps(level_dataset(level, data), sort_keys=True)
                                .encode("utf-8")).hexdigest()[:16]
            for level in (PATIENT, STUDY, SERIES)}


def field_key(text: str) -> str:
    """A value usable as a MongoDB field name (no ``.``, no leading ``$``, never empty)."""
    return "v" + quote(text, safe="").replace(".", "%2E")


def from_field_key(key: str) -> str:
    return unquote(key[1:]) if key.startswith("v") else key.replace("_", ".")


#: Per-value counters of a series document: instances per SOP Class / per Modality.
SOP_CLASS_COUNTS = "sop_class_counts"
MODALITY_COUNTS = "modality_counts"
#: Distinct attribute hashes under a level document, per level (see attribute_hashes).
VARIANTS = "variants"
#: GridFS file id of the instance whose attributes a level document holds.
LATEST = "latest"
#: Incremented by every write of a level document (compare-and-set of rebuilds).
REV = "rev"

#: What a rebuild reads of each member instance.
_MEMBER_PROJECTION = {"file_id": 1, "SeriesInstanceUID": 1, "StudyInstanceUID": 1,
                      "PatientID": 1, "SOPClassUID": 1, "Modality": 1, "hashes": 1}
_HIERARCHY_PROJECTION = {"file_id": 1, "SeriesInstanceUID": 1, "StudyInstanceUID": 1,
                         "PatientID": 1, "Modality": 1, "SOPClassUID": 1, "hashes": 1}
#: Level documents without their (long) child lists of instances.
_NO_INSTANCES = {"instances": 0}


def hierarchy_of(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc["SeriesInstanceUID"], doc["StudyInstanceUID"], doc["PatientID"]


def is_mixed(doc: dict[str, Any], level: str) -> bool:
    """Whether the instances under a level document disagree on its attributes."""
    return len((doc.get(VARIANTS) or {}).get(level, ())) > 1


def mixed_filter(level: str) -> dict[str, Any]:
    """The filter selecting mixed documents of ``level``."""
    return {f"{VARIANTS}.{level}.1": {"$exists": True}}


# --- the archive -------------------------------------------------------------------


class Archive:
    """Storage operations shared by C-STORE, ``archive import`` and ``archive check``."""

    def __init__(self, db: Database, bucket: str = "fs", duplicate_policy: str = "replace",
                 journal: str | Path = "data/journal",
                 hierarchy_conflicts: str = "refuse",
                 health: DatabaseHealth | None = None) -> None:
        if hierarchy_conflicts not in CONFLICT_POLICIES:
            raise ValueError(f"hierarchy_conflicts: {hierarchy_conflicts!r}")
        self.db = db
        self.health = health or DatabaseHealth(db)
        self.files = GridStore(db, bucket)
        self.policy = duplicate_policy
        self.conflicts = hierarchy_conflicts
        self.journal = Journal(journal)
        #: Journal keys of the stores running in this process (reconcile leaves them).
        self._active: set[str] = set()
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

    def store(self, part10: bytes, source: str = "", ds: Dataset | None = None,
              admit: Admit | None = None) -> StoreOutcome:
        """Store one Part-10 file; the outcome's status is what C-STORE answers.

        ``admit`` judges what the store would replace or join before anything is
        written (see :class:`Existing`).
        """
        try:
            ds = ds if ds is not None else self.parse(part10)
        except StoreRefused as exc:
            return StoreOutcome(exc.status, exc.comment)
        sop_uid = str(ds.SOPInstanceUID).strip()
        if not self.health.up:  # refused at once, not after the driver's timeouts
            return StoreOutcome(OUT_OF_RESOURCES, "database unavailable", sop_uid)
        try:
            return self._store(part10, ds, sop_uid, source, admit)
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

    def existing(self, ds: Dataset, sop_uid: str) -> Existing:
        """The stored instance, series and study this dataset would replace or join."""
        series_uid = str(ds.SeriesInstanceUID).strip()
        study_uid = str(ds.StudyInstanceUID).strip()
        return Existing(self.instances.find_one({"_id": sop_uid}),
                        self.series.find_one({"_id": series_uid}, _NO_INSTANCES),
                        self.studies.find_one({"_id": study_uid}))

    def _store(self, part10: bytes, ds: Dataset, sop_uid: str, source: str,
               admit: Admit | None) -> StoreOutcome:
        if admit is not None:
            admit(self.existing(ds, sop_uid))
        file_id = ObjectId()
        key = str(file_id)
        data = dicomjson.to_json(ds, file_id)
        doc = self.instance_document(data, file_id, _transfer_syntax(ds), len(part10), source)
        entry: dict[str, Any] = {"kind": "store", "pid": os.getpid(), "sop": sop_uid,
                                 "file_id": key, "length": len(part10),
                                 "hierarchy": list(hierarchy_of(doc))}
        self._active.add(key)
        try:
            self.journal.write(key, entry)
            try:
                return self._write(part10, doc, data, entry)
            except BaseException as exc:
                self._undo(entry, exc)
                raise
        finally:
            self._active.discard(key)

    def _write(self, part10: bytes, doc: dict[str, Any], data: dict[str, Any],
               entry: dict[str, Any]) -> StoreOutcome:
        """Steps 1 to 5; an exception leaves the undo to the caller (the entry says what)."""
        sop_uid, file_id = doc["_id"], doc["file_id"]
        try:
            self.files.put(part10, f"{sop_uid}.dcm", {
                "SOPInstanceUID": sop_uid, "TransferSyntaxUID": doc["TransferSyntaxUID"]},
                file_id=file_id)
        except _ChunkWriteFailed as exc:
            raise exc.cause from None
        try:
            self.instances.insert_one(doc)  # a new instance: one round trip
            previous = None
        except DuplicateKeyError:
            if self.policy != "replace":
                self._discard(entry)
                if self.policy == "reject":
                    return StoreOutcome(DUPLICATE_SOP_INSTANCE, "SOP Instance already stored",
                                        sop_uid)
                return StoreOutcome(SUCCESS, "already stored, kept", sop_uid)
            previous = self._replace(doc, entry)
        rebuild = self._update_levels(doc, data, previous)
        if previous is not None and hierarchy_of(previous) != hierarchy_of(doc):
            if previous["PatientID"] != doc["PatientID"]:  # an accepted conflict
                rebuild += [hierarchy_of(previous), hierarchy_of(doc)]
            else:
                self._leave(previous, hierarchy_of(doc))
        if rebuild:
            self.recompute(*rebuild, extra_instance=sop_uid)
        outcome = StoreOutcome(SUCCESS, "", sop_uid, replaced=previous is not None)
        if previous is not None and previous["file_id"] != file_id:
            try:
                self.files.delete(previous["file_id"])
            except PyMongoError as exc:  # stored: the journal entry deletes it later
                log.warning("replaced file of %s not deleted yet: %s", sop_uid, exc)
                return outcome
        self.journal.remove(entry["file_id"])
        return outcome

    def _discard(self, entry: dict[str, Any]) -> None:
        """The file of a store that ends without indexing it (duplicate kept/refused)."""
        self.files.delete(ObjectId(entry["file_id"]), entry["length"])
        self.journal.remove(entry["file_id"])

    def _replace(self, doc: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any] | None:
        """Replace a stored instance document; the one replaced (None if it vanished)."""
        # Read first what an undo needs should the replace be applied but its reply be
        # lost: find_one_and_replace's answer would then never reach us.
        prior = self.instances.find_one({"_id": doc["_id"]}, _HIERARCHY_PROJECTION)
        if prior is not None:
            self._check_patient(prior["PatientID"], doc["PatientID"], "SOP Instance UID")
            entry["previous_file_id"] = str(prior["file_id"])
            entry["previous_hierarchy"] = list(hierarchy_of(prior))
            self.journal.write(entry["file_id"], entry)
        # (no projection: FerretDB 1.24 does not implement findAndModify "fields")
        return self.instances.find_one_and_replace(
            {"_id": doc["_id"]}, doc, upsert=True, return_document=pymongo.ReturnDocument.BEFORE)

    def _check_patient(self, stored: str, claimed: str, what: str) -> None:
        """A patient conflict: refused unless the site accepts them."""
        if stored != claimed and self.conflicts == "refuse":
            raise StoreRefused(HIERARCHY_CONFLICT, f"{what} belongs to another patient")

    @staticmethod
    def instance_document(data: dict[str, Any], file_id: ObjectId | None, transfer_syntax: str,
                          size: int, source: str) -> dict[str, Any]:
        doc = normalised_fields(IMAGE, data)
        doc.update({
            "_id": doc["SOPInstanceUID"],
            "Modality": json_string(data, 0x00080060),
            "TransferSyntaxUID": transfer_syntax,
            "file_id": file_id, "size": size, "source": source,
            "stored_at": datetime.datetime.now(datetime.timezone.utc),
            "hashes": attribute_hashes(data),
            "dataset": data,
        })
        return doc

    # -- level documents --------------------------------------------------------------

    def _update_levels(self, doc: dict[str, Any], data: dict[str, Any],
                       previous: dict[str, Any] | None) -> list[tuple[str, str, str]]:
        """Fold one instance into its series, study and patient documents.

        ``previous`` is the instance document a re-send replaced.  Returns the
        hierarchies to rebuild exactly afterwards (an accepted patient conflict).
        """
        hierarchy = hierarchy_of(doc)
        series_uid, study_uid, patient_id = hierarchy
        rebuild: list[tuple[str, str, str]] = []
        # Counted anew where the instance was not counted before (a re-send that
        # moved it is taken out of its old places by _leave or a rebuild).
        before = hierarchy_of(previous) if previous is not None else (None, None, None)
        inc, study_inc, patient_inc = (int(old != new) for old, new in zip(before, hierarchy,
                                                                            strict=True))
        stays = previous is not None and before[0] == series_uid
        counts: dict[str, int] = {
            f"{SOP_CLASS_COUNTS}.{field_key(doc['SOPClassUID'])}": inc,
            f"{MODALITY_COUNTS}.{field_key(doc['Modality'])}": inc}
        changed = False
        if stays and previous is not None:  # a re-send in its series: move its own counts
            for field, old, new in ((SOP_CLASS_COUNTS, previous.get("SOPClassUID", ""),
                                     doc["SOPClassUID"]),
                                    (MODALITY_COUNTS, previous.get("Modality", ""),
                                     doc["Modality"])):
                if old != new:
                    counts[f"{field}.{field_key(old)}"] = -1
                    counts[f"{field}.{field_key(new)}"] = 1
                    changed = True
        hashes = doc["hashes"]
        common = {LATEST: doc["file_id"]}
        new_series = self._upsert(self.series, SERIES, series_uid, {
            "$set": {**normalised_fields(SERIES, data), "dataset": level_dataset(SERIES, data),
                     **common},
            "$addToSet": {"instances": doc["_id"], **_variants(hashes, PATIENT, STUDY, SERIES)},
            "$inc": {"NumberOfSeriesRelatedInstances": inc, REV: 1, **counts},
        }, {"StudyInstanceUID": study_uid, "PatientID": patient_id}, rebuild, hierarchy)
        new = 1 if new_series else 0
        new_study = self._upsert(self.studies, STUDY, study_uid, {
            "$set": {**normalised_fields(STUDY, data), "dataset": level_dataset(STUDY, data),
                     **common},
            "$addToSet": {"series": series_uid, "ModalitiesInStudy": doc["Modality"],
                          "SOPClassesInStudy": doc["SOPClassUID"],
                          **_variants(hashes, PATIENT, STUDY)},
            "$inc": {"NumberOfStudyRelatedSeries": new,
                     "NumberOfStudyRelatedInstances": study_inc, REV: 1},
        }, {"PatientID": patient_id}, rebuild, hierarchy)
        self._upsert(self.patients, PATIENT, patient_id, {
            "$set": {**normalised_fields(PATIENT, data), "dataset": level_dataset(PATIENT, data),
                     **common},
            "$addToSet": {"studies": study_uid, **_variants(hashes, PATIENT)},
            "$inc": {"NumberOfPatientRelatedStudies": 1 if new_study else 0,
                     "NumberOfPatientRelatedSeries": new,
                     "NumberOfPatientRelatedInstances": patient_inc, REV: 1},
        }, {}, rebuild, hierarchy)
        if changed and hierarchy not in rebuild:  # a modality or SOP class left the study
            self._rebuild(self.studies, study_uid, "series", [series_uid], self._study_fields)
        return list(dict.fromkeys(rebuild))

    def _leave(self, previous: dict[str, Any], now: tuple[str, str, str]) -> None:
        """Take a re-sent instance out of the series (and study) it was moved from,
        the patient being the same (``now``: where it is now).

        Counters are decremented and emptied documents deleted, one update per level;
        a level document whose instances disagree (mixed) is rebuilt from its members
        instead, since its attributes may have come from the instance that left.
        """
        hierarchy = hierarchy_of(previous)
        series_uid, study_uid, patient_id = hierarchy
        after = pymongo.ReturnDocument.AFTER
        series = self.series.find_one_and_update({"_id": series_uid}, {
            "$pull": {"instances": previous["_id"]},
            "$inc": {"NumberOfSeriesRelatedInstances": -1, REV: 1,
                     f"{SOP_CLASS_COUNTS}.{field_key(previous.get('SOPClassUID', ''))}": -1,
                     f"{MODALITY_COUNTS}.{field_key(previous.get('Modality', ''))}": -1}},
            return_document=after)
        if series is None or any(is_mixed(series, lvl) for lvl in (PATIENT, STUDY, SERIES)):
            self.recompute(hierarchy)
            return
        series_gone = series.get("NumberOfSeriesRelatedInstances", 0) <= 0
        if series_gone:
            self.series.delete_one({"_id": series_uid, REV: series.get(REV)})
        study_left = study_uid != now[1]
        study = self.studies.find_one_and_update({"_id": study_uid}, {
            "$inc": {"NumberOfStudyRelatedInstances": -1 if study_left else 0,
                     "NumberOfStudyRelatedSeries": -1 if series_gone else 0, REV: 1},
            **({"$pull": {"series": series_uid}} if series_gone else {})},
            return_document=after)
        if study is None or any(is_mixed(study, lvl) for lvl in (PATIENT, STUDY)):
            self.recompute(hierarchy)
            return
        study_gone = study.get("NumberOfStudyRelatedInstances", 0) <= 0
        if study_gone:
            self.studies.delete_one({"_id": study_uid, REV: study.get(REV)})
        else:  # Modalities / SOP Classes in Study from what its series still count
            self._rebuild(self.studies, study_uid, "series", [], self._study_fields)
        patient = self.patients.find_one_and_update({"_id": patient_id}, {
            "$inc": {"NumberOfPatientRelatedSeries": -1 if series_gone else 0,
                     "NumberOfPatientRelatedStudies": -1 if study_gone else 0, REV: 1},
            **({"$pull": {"studies": study_uid}} if study_gone else {})},
            return_document=after)
        if patient is None or is_mixed(patient, PATIENT):
            self._rebuild(self.patients, patient_id, "studies", [study_uid],
                          self._patient_fields)

    def _upsert(self, collection: Collection, level: str, uid: str, update: dict[str, Any],
                claims: dict[str, str], rebuild: list[tuple[str, str, str]],
                hierarchy: tuple[str, str, str]) -> bool:
        """Update (or create) one level document if it agrees with ``claims``.

        True when the document was created.  A document that exists with other values of
        the claimed keys fails the upsert with a duplicate key: a conflict, refused or
        (patient conflicts the site accepts) applied anyway and rebuilt afterwards.
        """
        try:
            result = collection.update_one({"_id": uid, **claims}, update, upsert=True)
        except DuplicateKeyError:
            stored = collection.find_one({"_id": uid}, {"StudyInstanceUID": 1, "PatientID": 1})
            if stored is None:  # deleted meanwhile: try again as a new document
                result = collection.update_one({"_id": uid, **claims}, update, upsert=True)
                return result.upserted_id is not None
            if level == SERIES and stored.get("StudyInstanceUID") != claims["StudyInstanceUID"]:
                raise StoreRefused(HIERARCHY_CONFLICT,
                                   "Series Instance UID belongs to another study") from None
            what = "Study Instance UID" if level == STUDY else "Series Instance UID"
            self._check_patient(stored.get("PatientID", ""), claims["PatientID"], what)
            collection.update_one({"_id": uid}, update)
            rebuild.append(hierarchy)
            return False
        return result.upserted_id is not None

    # -- exact rebuilds ---------------------------------------------------------------

    def recompute(self, *hierarchies: Iterable[str], extra_instance: str | None = None
                  ) -> None:
        """Rebuild the series, study and patient documents of hierarchies exactly.

        Members are found through the child lists plus ``extra_instance`` (an instance
        a failed or interrupted store may have written without listing it), checked
        against their own documents.  Level by level -- every series, then every
        study, then every patient -- since a study is summed from its series and a
        patient from its studies: an instance that moved between two hierarchies must
        have left the old series before the study above it is counted.
        """
        triples = list(dict.fromkeys(tuple(h) for h in hierarchies))
        for series_uid in dict.fromkeys(t[0] for t in triples):
            self._rebuild(self.series, series_uid, "instances", [extra_instance],
                          self._series_fields)
        all_series = [t[0] for t in triples]
        for study_uid in dict.fromkeys(t[1] for t in triples):
            self._rebuild(self.studies, study_uid, "series", all_series, self._study_fields)
        all_studies = [t[1] for t in triples]
        for patient_id in dict.fromkeys(t[2] for t in triples):
            self._rebuild(self.patients, patient_id, "studies", all_studies,
                          self._patient_fields)

    def _rebuild(self, collection: Collection, uid: str, children: str,
                 extra: list[str | None],
                 compute: Callable[[str, list[str]], dict[str, Any] | None]) -> None:
        """Compare-and-set the fields ``compute`` derives; delete the document if empty."""
        for _ in range(10):
            current = collection.find_one({"_id": uid}, {children: 1, REV: 1})
            candidates = list(dict.fromkeys(
                [*(current or {}).get(children, []), *(x for x in extra if x)]))
            fields = compute(uid, candidates)
            if current is None:
                if fields is None:
                    return
                try:
                    collection.insert_one({"_id": uid, REV: 0, **fields})
                    return
                except DuplicateKeyError:
                    continue
            condition = {"_id": uid, REV: current.get(REV)}
            if fields is None:
                if collection.delete_one(condition).deleted_count:
                    return
            elif collection.update_one(condition, {"$set": fields, "$inc": {REV: 1}}
                                       ).matched_count:
                return
        raise PyMongoError(f"{collection.name} {uid} kept changing while being rebuilt")

    def _fetch(self, collection: Collection, ids: Iterable[str],
               projection: dict[str, Any] | None) -> list[dict[str, Any]]:
        return [d for d in (collection.find_one({"_id": i}, projection) for i in ids) if d]

    def _series_fields(self, uid: str, candidates: list[str]) -> dict[str, Any] | None:
        members = [m for m in self._fetch(self.instances, candidates, _MEMBER_PROJECTION)
                   if m.get("SeriesInstanceUID") == uid]
        if not members:
            return None
        latest = max(members, key=lambda m: m["file_id"])
        full = self.instances.find_one({"_id": latest["_id"]}, {"dataset": 1}) or {}
        data = full.get("dataset", {})
        return {
            **normalised_fields(SERIES, data), "dataset": level_dataset(SERIES, data),
            LATEST: latest["file_id"],
            "instances": [m["_id"] for m in members],
            "NumberOfSeriesRelatedInstances": len(members),
            SOP_CLASS_COUNTS: _counts(m.get("SOPClassUID", "") for m in members),
            MODALITY_COUNTS: _counts(m.get("Modality", "") for m in members),
            VARIANTS: {lvl: sorted({m.get("hashes", {}).get(lvl, "") for m in members})
                       for lvl in (PATIENT, STUDY, SERIES)},
        }

    def _study_fields(self, uid: str, candidates: list[str]) -> dict[str, Any] | None:
        members = [s for s in self._fetch(self.series, candidates, _NO_INSTANCES)
                   if s.get("StudyInstanceUID") == uid]
        if not members:
            return None
        latest = max(members, key=lambda s: s.get(LATEST) or ObjectId("0" * 24))
        data = latest.get("dataset", {})
        return {
            **normalised_fields(STUDY, data), "dataset": level_dataset(STUDY, data),
            LATEST: latest.get(LATEST),
            "series": [s["_id"] for s in members],
            "NumberOfStudyRelatedSeries": len(members),
            "NumberOfStudyRelatedInstances": sum(
                s.get("NumberOfSeriesRelatedInstances", 0) for s in members),
            "ModalitiesInStudy": _present(members, MODALITY_COUNTS),
            "SOPClassesInStudy": _present(members, SOP_CLASS_COUNTS),
            VARIANTS: {lvl: sorted({h for s in members for h in s.get(VARIANTS, {}).get(lvl, [])})
                       for lvl in (PATIENT, STUDY)},
        }

    def _patient_fields(self, uid: str, candidates: list[str]) -> dict[str, Any] | None:
        """The patient's share of each candidate study: all of a study that holds only
        this patient's instances, else counted below it."""
        studies = series = instances = 0
        listed: list[str] = []
        best: tuple[ObjectId, dict[str, Any]] | None = None
        variants: set[str] = set()
        for study in self._fetch(self.studies, candidates, None):
            share = self._share(study, STUDY, uid)
            if share is None:
                continue
            n_series, n_instances, latest, data, hashes = share
            studies += 1
            series += n_series
            instances += n_instances
            listed.append(study["_id"])
            variants |= hashes
            if best is None or latest > best[0]:
                best = (latest, data)
        if not instances or best is None:
            return None
        data = best[1]
        return {
            **normalised_fields(PATIENT, data), "dataset": level_dataset(PATIENT, data),
            LATEST: best[0], "studies": listed,
            "NumberOfPatientRelatedStudies": studies,
            "NumberOfPatientRelatedSeries": series,
            "NumberOfPatientRelatedInstances": instances,
            VARIANTS: {PATIENT: sorted(variants)},
        }

    def _share(self, doc: dict[str, Any], level: str, patient_id: str
               ) -> tuple[int, int, ObjectId, dict[str, Any], set[str]] | None:
        """(series, instances, latest file id, attributes, patient hashes) of one patient
        under a study or series document; None when it holds none of the patient's."""
        hashes = set(doc.get(VARIANTS, {}).get(PATIENT, []))
        if len(hashes) <= 1:  # every instance below carries the same patient attributes
            if doc.get("PatientID") != patient_id:
                return None
            counter = ("NumberOfStudyRelatedInstances" if level == STUDY
                       else "NumberOfSeriesRelatedInstances")
            n_series = doc.get("NumberOfStudyRelatedSeries", 0) if level == STUDY else 1
            return (n_series, doc.get(counter, 0), doc.get(LATEST) or ObjectId("0" * 24),
                    doc.get("dataset", {}), hashes)
        if level == STUDY:  # mixed: count series by series
            total: tuple[int, int, ObjectId, dict[str, Any], set[str]] | None = None
            for series in self._fetch(self.series, doc.get("series", []), None):
                share = self._share(series, SERIES, patient_id)
                if share is None:
                    continue
                if total is None:
                    total = share
                else:
                    newer = share if share[2] > total[2] else total
                    total = (total[0] + share[0], total[1] + share[1], newer[2], newer[3],
                             total[4] | share[4])
            return total
        members = [m for m in self._fetch(self.instances, doc.get("instances", []),
                                          _MEMBER_PROJECTION)
                   if m.get("PatientID") == patient_id]
        if not members:
            return None
        latest = max(members, key=lambda m: m["file_id"])
        full = self.instances.find_one({"_id": latest["_id"]}, {"dataset": 1}) or {}
        return (1, len(members), latest["file_id"], full.get("dataset", {}),
                {m.get("hashes", {}).get(PATIENT, "") for m in members})

    # -- failures ---------------------------------------------------------------------

    def _undo(self, entry: dict[str, Any], cause: BaseException) -> None:
        """Take back a failed store now, or leave its journal entry for :meth:`reconcile`.

        When the failure was the connection and the database does not answer a short
        ping, the undo is left to the journal at once: trying it would only wait out the
        same timeout again, for every store of an outage.
        """
        entry["kind"] = "undo"
        try:
            self.journal.write(entry["file_id"], entry)
        except OSError as exc:  # the journal folder is unusable: try the undo anyway
            log.error("journal entry of %s not written: %s", entry.get("sop"), exc)
        if isinstance(cause, ConnectionFailure) and not self.health.check():
            log.warning("rollback of %s deferred to the journal: %s", entry.get("sop"), cause)
            return
        try:
            self._resolve(entry)
        except PyMongoError as exc:
            log.warning("rollback of %s deferred to the journal: %s", entry.get("sop"), exc)
            return
        self.journal.remove(entry["file_id"])

    def pending(self) -> bool:
        """Whether unfinished work of past stores waits in the journal."""
        return any(key not in self._active for key, _ in self.journal.entries())

    def reconcile(self) -> int:
        """Finish the work of stores the journal names, once the database answers.

        ``store`` (the node died during the store): if its instance document was
        written, the store is completed (level documents rebuilt, a replaced file
        deleted), else taken back.  ``undo`` (the store was answered with a failure):
        taken back -- its instance document and file deleted, the previous version, if
        there was one, indexed again from its own original, the level documents rebuilt.
        Entries of stores still running (in this process, or another live one) are left.
        Raises PyMongoError, keeping the journal, while the database is unreachable.
        """
        done = 0
        for key, entry in list(self.journal.entries()):
            if key in self._active or _alive_elsewhere(entry):
                continue
            self._resolve(entry)
            self.journal.remove(key)
            done += 1
        if done:
            log.info("journal replayed: %d entries", done)
        return done

    def _resolve(self, entry: dict[str, Any]) -> None:
        """Bring the archive to the state the entry's store should leave (see reconcile)."""
        file_id = ObjectId(entry["file_id"])
        sop = entry["sop"]
        current = self.instances.find_one({"_id": sop}, {"file_id": 1})
        committed = current is not None and current["file_id"] == file_id
        if entry["kind"] == "undo" and committed:
            self.instances.delete_one({"_id": sop})
            current, committed = None, False
        previous = entry.get("previous_file_id")
        if committed:
            if previous and ObjectId(previous) != file_id:
                self.files.delete(ObjectId(previous))
        else:
            if current is None and previous and self.files.exists(ObjectId(previous)):
                self._reindex(ObjectId(previous))
            self.files.delete(file_id, entry.get("length"))
        hierarchies = [tuple(entry[k]) for k in ("hierarchy", "previous_hierarchy")
                       if entry.get(k)]
        if hierarchies:
            self.recompute(*hierarchies, extra_instance=sop)

    def _reindex(self, file_id: ObjectId) -> None:
        """Index an original already in GridFS again (its metadata was lost)."""
        part10 = self.files.read(file_id)
        ds = self.parse(part10)
        data = dicomjson.to_json(ds, file_id)
        doc = self.instance_document(data, file_id, _transfer_syntax(ds), len(part10),
                                     "reindex")
        self.instances.replace_one({"_id": doc["_id"]}, doc, upsert=True)
        self.recompute(hierarchy_of(doc), extra_instance=doc["_id"])

    # -- reading ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counts per level, instances per modality and per SOP class.

        Read from the series documents' counters: summing over instance documents
        would make FerretDB decode every one of them (minutes for a large archive).
        """
        modalities: Counter[str] = Counter()
        classes: Counter[str] = Counter()
        series = instances = 0
        for doc in self.series.find({}, {"NumberOfSeriesRelatedInstances": 1,
                                         SOP_CLASS_COUNTS: 1, MODALITY_COUNTS: 1}):
            series += 1
            instances += doc.get("NumberOfSeriesRelatedInstances", 0)
            for key, count in doc.get(MODALITY_COUNTS, {}).items():
                modalities[from_field_key(key)] += count
            for key, count in doc.get(SOP_CLASS_COUNTS, {}).items():
                classes[from_field_key(key)] += count
        return {
            "patients": self.patients.count_documents({}),
            "studies": self.studies.count_documents({}),
            "series": series,
            "instances": instances,
            "modalities": {m: n for m, n in modalities.most_common() if n},
            "sop_classes": {uid: n for uid, n in classes.most_common() if n},
        }


def _transfer_syntax(ds: Dataset) -> str:
    return str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", ""))


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


def _variants(hashes: dict[str, str], *levels: str) -> dict[str, str]:
    """``$addToSet`` of the attribute hashes of ``levels``."""
    return {f"{VARIANTS}.{level}": hashes[level] for level in levels}


def _counts(values: Iterable[str]) -> dict[str, int]:
    return {field_key(value): n for value, n in Counter(values).items()}


def _present(members: list[dict[str, Any]], field: str) -> list[str]:
    """Values counted at least once in the members' per-value counters, sorted."""
    return sorted({from_field_key(k) for m in members
                   for k, n in (m.get(field) or {}).items() if n > 0})


def _alive_elsewhere(entry: dict[str, Any]) -> bool:
    """Whether the entry belongs to a store still running in another process."""
    pid = entry.get("pid")
    if not isinstance(pid, int) or pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

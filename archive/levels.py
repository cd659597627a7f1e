"""The series, study and patient documents: kept exact as instances come and go.

Each level document keeps counters, child lists and the sets of values its instances
carry (modalities, SOP classes, and a hash of its level attributes per distinct
variant: a document whose instances disagree on them is *mixed*, which the access
rules must know).  A new instance updates them incrementally (atomic per document,
:meth:`Levels.fold`); a re-send that moves an instance is taken out of its old place
(:meth:`Levels.leave`); an accepted conflict, a mixed entity, a rollback and the
journal replay rebuild the affected documents exactly from their members
(:meth:`Levels.recompute`), by navigation through the child lists (lookups by
``_id``, cheap on every database) and with a compare-and-set on each document's
``rev`` so that a rebuild never overwrites a concurrent store's update.  Nothing else
rebuilds: the compare-and-set does not see a store that has updated the series and
not yet the study (the rebuild would count its instance twice; this process keeps its
own stores and rebuilds apart, :meth:`Levels.rebuilding`, another node's it cannot),
and a document that stores keep changing makes it fail.  Hence the per-value counts of
a study too (Modalities / SOP Classes in Study follow them,
:meth:`Levels.drop_uncounted`), so that a re-send changing a modality needs no rebuild.

Hierarchy conflicts are found here too, without an extra read: level documents are
upserted on the keys the instance claims (its study, its patient), which a document of
another study or patient fails with a duplicate key (:class:`Conflict`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import pymongo
from bson import ObjectId
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

from archive import model
from archive.model import IMAGE, PATIENT, SERIES, STUDY

CONFLICT_POLICIES = ("refuse", "accept")


class Conflict(Exception):
    """An instance contradicting the stored hierarchy; the message says which UID."""


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
#: How long a rebuild tries again while stores keep changing its document, and the
#: longest pause between two attempts (seconds).
REBUILD_SECONDS = 10.0
REBUILD_PAUSE = 0.02
#: Documents a rebuild reads per query (a ``$in`` of ``_id``).
FETCH_BATCH = 1000

#: What a rebuild reads of each member instance.
_MEMBER_PROJECTION = {"file_id": 1, "SeriesInstanceUID": 1, "StudyInstanceUID": 1,
                      "PatientID": 1, "SOPClassUID": 1, "Modality": 1, "hashes": 1}
HIERARCHY_PROJECTION = {"file_id": 1, "SeriesInstanceUID": 1, "StudyInstanceUID": 1,
                         "PatientID": 1, "Modality": 1, "SOPClassUID": 1, "hashes": 1}
#: The field of a level document listing the ``_id`` of its children.
CHILDREN = {PATIENT: "studies", STUDY: "series", SERIES: "instances"}
#: The list of a study document that holds the values its per-value counts count.
_IN_STUDY = {MODALITY_COUNTS: "ModalitiesInStudy", SOP_CLASS_COUNTS: "SOPClassesInStudy"}
#: Level documents without their (long) child lists of instances.
NO_INSTANCES = {CHILDREN[SERIES]: 0}


def hierarchy_of(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc["SeriesInstanceUID"], doc["StudyInstanceUID"], doc["PatientID"]


def is_mixed(doc: dict[str, Any], level: str) -> bool:
    """Whether the instances under a level document disagree on its attributes."""
    return len((doc.get(VARIANTS) or {}).get(level, ())) > 1


def counts_per_value(study: dict[str, Any]) -> bool:
    """Whether a study document counts its instances per modality and SOP class: one
    stored by an earlier version does not, and is rebuilt by the first store that
    changes it (then ``archive check`` finds it right)."""
    return all(field in study for field in _IN_STUDY)


def mixed_filter(level: str) -> dict[str, Any]:
    """The filter selecting mixed documents of ``level``."""
    return {f"{VARIANTS}.{level}.1": {"$exists": True}}




# --- the level documents -----------------------------------------------------------


class Levels:
    """The level documents of one database (``conflicts``: refuse or accept patient
    conflicts; a series of another study is always refused)."""

    def __init__(self, db: Database, conflicts: str = "refuse") -> None:
        if conflicts not in CONFLICT_POLICIES:
            raise ValueError(f"hierarchy_conflicts: {conflicts!r}")
        self.conflicts = conflicts
        self.instances = db[model.COLLECTION[IMAGE]]
        self.series = db[model.COLLECTION[SERIES]]
        self.studies = db[model.COLLECTION[STUDY]]
        self.patients = db[model.COLLECTION[PATIENT]]
        #: Level documents this process is rebuilding, and storing into (see
        #: :meth:`rebuilding`)
        self._rebuilding: Counter[str] = Counter()
        self._storing: Counter[str] = Counter()
        self._apart = threading.Condition()

    def check_patient(self, stored: str, claimed: str, what: str) -> None:
        """A patient conflict: refused unless the site accepts them."""
        if stored != claimed and self.conflicts == "refuse":
            raise Conflict(f"{what} belongs to another patient")

    def fold(self, doc: dict[str, Any], data: dict[str, Any],
             previous: dict[str, Any] | None,
             defer: Callable[[bool], bool] | None = None) -> list[tuple[str, str, str]]:
        """Fold one instance into its series, study and patient documents.

        ``previous`` is the instance document a re-send replaced.  Returns the
        hierarchies to rebuild exactly afterwards (an accepted patient conflict).
        ``defer``: offered the study and patient updates of a new instance once its
        series document is updated without conflict (told whether that created the
        series); True when it took them (:meth:`WriteBehind.open`).
        """
        with self.storing(hierarchy_of(doc)):
            return self._fold(doc, data, previous, defer)

    def _fold(self, doc: dict[str, Any], data: dict[str, Any],
              previous: dict[str, Any] | None,
              defer: Callable[[bool], bool] | None = None) -> list[tuple[str, str, str]]:
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
        if stays and previous is not None:  # a re-send in its series: move its own counts
            for field, old, new in ((SOP_CLASS_COUNTS, previous.get("SOPClassUID", ""),
                                     doc["SOPClassUID"]),
                                    (MODALITY_COUNTS, previous.get("Modality", ""),
                                     doc["Modality"])):
                if old != new:
                    counts[f"{field}.{field_key(old)}"] = -1
                    counts[f"{field}.{field_key(new)}"] = 1
        hashes = doc["hashes"]
        common = {LATEST: doc["file_id"]}
        new_series, _ = self._upsert(self.series, SERIES, series_uid, {
            "$set": {**normalised_fields(SERIES, data), "dataset": level_dataset(SERIES, data),
                     **common},
            "$addToSet": {"instances": doc["_id"], **_variants(hashes, PATIENT, STUDY, SERIES)},
            "$inc": {"NumberOfSeriesRelatedInstances": inc, REV: 1, **counts},
        }, {"StudyInstanceUID": study_uid, "PatientID": patient_id}, rebuild, hierarchy)
        if defer is not None and previous is None and not rebuild and defer(new_series):
            return []
        new = 1 if new_series else 0
        # the study counts per value what its series count (Modalities / SOP Classes in
        # Study follow from those counts, see drop_uncounted)
        new_study, before = self._upsert(self.studies, STUDY, study_uid, {
            "$set": {**normalised_fields(STUDY, data), "dataset": level_dataset(STUDY, data),
                     **common},
            "$addToSet": {"series": series_uid, "ModalitiesInStudy": doc["Modality"],
                          "SOPClassesInStudy": doc["SOPClassUID"],
                          **_variants(hashes, PATIENT, STUDY)},
            "$inc": {"NumberOfStudyRelatedSeries": new,
                     "NumberOfStudyRelatedInstances": study_inc, REV: 1, **counts},
        }, {"PatientID": patient_id}, rebuild, hierarchy, returning=True)
        self._upsert(self.patients, PATIENT, patient_id, {
            "$set": {**normalised_fields(PATIENT, data), "dataset": level_dataset(PATIENT, data),
                     **common},
            "$addToSet": {"studies": study_uid, **_variants(hashes, PATIENT)},
            "$inc": {"NumberOfPatientRelatedStudies": 1 if new_study else 0,
                     "NumberOfPatientRelatedSeries": new,
                     "NumberOfPatientRelatedInstances": patient_inc, REV: 1},
        }, {}, rebuild, hierarchy)
        if before is not None and not counts_per_value(before):
            rebuild.append(hierarchy)
        if hierarchy not in rebuild:  # (a rebuild derives them anyway)
            self.drop_uncounted(study_uid, before, counts)
        return list(dict.fromkeys(rebuild))

    def leave(self, previous: dict[str, Any], now: tuple[str, str, str]) -> None:
        """Take a re-sent instance out of the series (and study) it was moved from,
        the patient being the same (``now``: where it is now).

        Counters are decremented and emptied documents deleted, one update per level;
        a level document whose instances disagree (mixed) is rebuilt from its members
        instead, since its attributes may have come from the instance that left.
        """
        hierarchy = hierarchy_of(previous)
        series_uid, study_uid, patient_id = hierarchy
        after = pymongo.ReturnDocument.AFTER
        counts = {f"{SOP_CLASS_COUNTS}.{field_key(previous.get('SOPClassUID', ''))}": -1,
                  f"{MODALITY_COUNTS}.{field_key(previous.get('Modality', ''))}": -1}
        series = self.series.find_one_and_update({"_id": series_uid}, {
            "$pull": {"instances": previous["_id"]},
            "$inc": {"NumberOfSeriesRelatedInstances": -1, REV: 1, **counts}},
            return_document=after)
        if series is None or any(is_mixed(series, lvl) for lvl in (PATIENT, STUDY, SERIES)):
            self.recompute(hierarchy)
            return
        # gone only if deleted: a store (here or on another node) may have put an
        # instance into the series since, which the study and patient must keep
        series_gone = series.get("NumberOfSeriesRelatedInstances", 0) <= 0 and \
            self.series.delete_one({"_id": series_uid, REV: series.get(REV)}).deleted_count == 1
        left = -1 if study_uid != now[1] else 0
        before = self.studies.find_one_and_update({"_id": study_uid}, {
            "$inc": {"NumberOfStudyRelatedInstances": left,
                     "NumberOfStudyRelatedSeries": -1 if series_gone else 0, REV: 1,
                     **counts},
            **({"$pull": {"series": series_uid}} if series_gone else {})})
        if before is None or any(is_mixed(before, lvl) for lvl in (PATIENT, STUDY)) or \
                not counts_per_value(before):
            self.recompute(hierarchy)
            return
        study_gone = before.get("NumberOfStudyRelatedInstances", 0) + left <= 0 and \
            self.studies.delete_one({"_id": study_uid, REV: before.get(REV, 0) + 1}
                                    ).deleted_count == 1
        if not study_gone:  # Modalities / SOP Classes in Study: what its series still count
            self.drop_uncounted(study_uid, before, counts)
        patient = self.patients.find_one_and_update({"_id": patient_id}, {
            "$inc": {"NumberOfPatientRelatedSeries": -1 if series_gone else 0,
                     "NumberOfPatientRelatedStudies": -1 if study_gone else 0, REV: 1},
            **({"$pull": {"studies": study_uid}} if study_gone else {})},
            return_document=after)
        if patient is None or is_mixed(patient, PATIENT):
            self.rebuild(self.patients, patient_id, "studies", [study_uid],
                          self.patient_fields)

    def remove(self, members: list[dict[str, Any]]) -> None:
        """Take deleted instances out of their series, study and patient documents.

        ``members`` are the instance documents (:data:`HIERARCHY_PROJECTION` and
        ``_id``) a delete removed, each counted by its series when it was selected.
        One update per document, grouped: decrements and ``$pullAll`` (FerretDB 1.24
        ignores a ``$pull`` with a condition), which commute with
        the increments and ``$addToSet`` of stores running meanwhile, so a concurrent
        store into the same series or study is counted exactly.  A document is deleted
        only when emptied -- no count and no child left: a store updates the series, then
        the study, then the patient, and one between two of them has counted its
        instance below a document that does not count it yet -- and only if nothing
        changed it since (the ``rev`` it had when emptied).
        A mixed document (its attributes may be those of a deleted instance) and a
        study or patient stored by an earlier version are rebuilt from their members.
        """
        after = pymongo.ReturnDocument.AFTER
        rebuild: list[tuple[str, str, str]] = []
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for member in members:
            groups.setdefault(hierarchy_of(member), []).append(member)
        studies: dict[str, _Taken] = {}
        for hierarchy, group in groups.items():
            series_uid, study_uid, _ = hierarchy
            counts = _decrements(group)
            series = self.series.find_one_and_update({"_id": series_uid}, {
                "$pullAll": {"instances": [m["_id"] for m in group]},
                "$inc": {"NumberOfSeriesRelatedInstances": -len(group), REV: 1, **counts}},
                return_document=after)
            if series is None or any(is_mixed(series, lvl) for lvl in (PATIENT, STUDY, SERIES)):
                rebuild.append(hierarchy)
                continue
            taken = studies.setdefault(study_uid, _Taken())
            taken.instances += len(group)
            taken.counts.update(counts)
            taken.hierarchies.append(hierarchy)
            if series.get("NumberOfSeriesRelatedInstances", 0) <= 0 and \
                    not series.get("instances") and self.series.delete_one(
                    {"_id": series_uid, REV: series.get(REV)}).deleted_count == 1:
                taken.series.append(series_uid)
        patients: dict[str, _Taken] = {}
        for study_uid, taken in studies.items():
            counts = dict(taken.counts)
            before = self.studies.find_one_and_update({"_id": study_uid}, {
                "$inc": {"NumberOfStudyRelatedInstances": -taken.instances,
                         "NumberOfStudyRelatedSeries": -len(taken.series), REV: 1, **counts},
                **({"$pullAll": {"series": taken.series}} if taken.series else {})})
            if before is None or any(is_mixed(before, lvl) for lvl in (PATIENT, STUDY)) or \
                    not counts_per_value(before):
                rebuild += taken.hierarchies
                continue
            # emptied only if no series is left either: a store may have counted its
            # instance in a series of this study and not yet in the study itself
            study_gone = before.get("NumberOfStudyRelatedInstances", 0) - taken.instances <= 0 \
                and not set(before.get("series") or ()) - set(taken.series) \
                and self.studies.delete_one({"_id": study_uid, REV: before.get(REV, 0) + 1}
                                            ).deleted_count == 1
            if not study_gone:  # Modalities / SOP Classes in Study: what is still counted
                self.drop_uncounted(study_uid, before, counts)
            # not mixed: every instance below the study is of one patient
            patient = patients.setdefault(taken.hierarchies[0][2], _Taken())
            patient.instances += taken.instances
            patient.series += taken.series
            patient.studies += [study_uid] if study_gone else []
        for patient_id, taken in patients.items():
            doc = self.patients.find_one_and_update({"_id": patient_id}, {
                "$inc": {"NumberOfPatientRelatedInstances": -taken.instances,
                         "NumberOfPatientRelatedSeries": -len(taken.series),
                         "NumberOfPatientRelatedStudies": -len(taken.studies), REV: 1},
                **({"$pullAll": {"studies": taken.studies}} if taken.studies else {})},
                return_document=after)
            if doc is None or is_mixed(doc, PATIENT):
                self.rebuild(self.patients, patient_id, "studies", list(taken.studies),
                             self.patient_fields)
            elif doc.get("NumberOfPatientRelatedInstances", 0) <= 0 and not doc.get("studies"):
                self.patients.delete_one({"_id": patient_id, REV: doc.get(REV)})
        if rebuild:
            self.recompute(*rebuild)

    def _upsert(self, collection: Collection, level: str, uid: str, update: dict[str, Any],
                claims: dict[str, str], rebuild: list[tuple[str, str, str]],
                hierarchy: tuple[str, str, str], returning: bool = False
                ) -> tuple[bool, dict[str, Any] | None]:
        """Update (or create) one level document if it agrees with ``claims``.

        Answers whether the document was created and, if ``returning``, the document
        as it was before the update (None when created).  A document that exists with
        other values of the claimed keys fails the upsert with a duplicate key: a
        conflict, refused or (patient conflicts the site accepts) applied anyway and
        rebuilt afterwards.  One created or deleted by another store between the
        upsert's lookup and its insert (two nodes storing a new series at once) is
        simply upserted again: a rebuild there would race with the stores going on.
        """
        for _ in range(5):
            try:
                if returning:
                    before = collection.find_one_and_update(
                        {"_id": uid, **claims}, update, upsert=True,
                        return_document=pymongo.ReturnDocument.BEFORE)
                    return before is None, before
                result = collection.update_one({"_id": uid, **claims}, update, upsert=True)
                return result.upserted_id is not None, None
            except DuplicateKeyError:
                stored = collection.find_one({"_id": uid}, {"StudyInstanceUID": 1,
                                                            "PatientID": 1})
                if stored is None or all(stored.get(k) == v for k, v in claims.items()):
                    continue  # deleted or created meanwhile: upsert again
                if level == SERIES and stored.get("StudyInstanceUID") != claims[
                        "StudyInstanceUID"]:
                    raise Conflict("Series Instance UID belongs to another study") from None
                what = "Study Instance UID" if level == STUDY else "Series Instance UID"
                self.check_patient(stored.get("PatientID", ""), claims["PatientID"], what)
                collection.update_one({"_id": uid}, update)
                rebuild.append(hierarchy)
                return False, None
        raise PyMongoError(f"{collection.name} {uid}: upsert kept colliding")

    def drop_uncounted(self, study_uid: str, doc: dict[str, Any] | None,
                        counts: dict[str, int]) -> None:
        """Take out of Modalities / SOP Classes in Study the values whose count in the
        study this store's update (``counts``) brought to zero.

        ``doc`` is the study as it was before the update (None: created by it).  Each
        value is pulled by one update that holds only while its count is still zero or
        less, and every update counting a value also adds it: stores on any node may
        interleave, the set stays what the counts say, without rebuilding the study
        under a compare-and-set that concurrent stores would keep failing.  (A count
        goes below zero for a moment when a re-send, on another association or node,
        takes an instance out of its value before the store it replaced has counted it.)
        """
        for path, delta in counts.items():
            if not delta:
                continue
            field, key = path.split(".", 1)
            count = ((doc or {}).get(field) or {}).get(key, 0) + delta
            if count > 0:
                continue
            self.studies.update_one({"_id": study_uid, path: {"$lte": 0}}, {
                "$pull": {_IN_STUDY[field]: from_field_key(key)}, "$inc": {REV: 1}})

    # -- exact rebuilds ---------------------------------------------------------------

    def recompute(self, *hierarchies: Iterable[str], extra_instances: Iterable[str] = ()
                  ) -> None:
        """Rebuild the series, study and patient documents of hierarchies exactly.

        Members are found through the child lists plus ``extra_instances`` (instances
        a failed or interrupted store may have written without listing them), checked
        against their own documents.  Level by level -- every series, then every
        study, then every patient -- since a study is summed from its series and a
        patient from its studies: an instance that moved between two hierarchies must
        have left the old series before the study above it is counted.
        """
        triples = list(dict.fromkeys(tuple(h) for h in hierarchies))
        with self.rebuilding(uid for t in triples for uid in t):
            for series_uid in dict.fromkeys(t[0] for t in triples):
                self.rebuild(self.series, series_uid, "instances", list(extra_instances),
                             self.series_fields)
            all_series = [t[0] for t in triples]
            for study_uid in dict.fromkeys(t[1] for t in triples):
                self.rebuild(self.studies, study_uid, "series", all_series,
                             self.study_fields)
            all_studies = [t[1] for t in triples]
            for patient_id in dict.fromkeys(t[2] for t in triples):
                self.rebuild(self.patients, patient_id, "studies", all_studies,
                              self.patient_fields)

    def refresh_variants(self, *hierarchies: Iterable[str]) -> None:
        """Bring the attribute variants of the hierarchies' documents up to date with
        their members, the rest of each document left as it is (a correction changed
        the attributes of instances that stay counted where they are).

        Safe while stores run: a variant set is a union, which a concurrent store's
        ``$addToSet`` only extends, and each document is set under a compare-and-set
        on its ``rev`` (:meth:`_until_set`); series first, then studies, then patients,
        each from the level below.
        """
        triples = list(dict.fromkeys(tuple(h) for h in hierarchies))
        with self.rebuilding(uid for t in triples for uid in t):
            for collection, position, children, compute in (
                    (self.series, 0, "instances", self.series_fields),
                    (self.studies, 1, "series", self.study_fields),
                    (self.patients, 2, "studies", self.patient_fields)):
                for uid in dict.fromkeys(t[position] for t in triples):
                    self._until_set(collection, uid, functools.partial(
                        self._refresh, collection, uid, children, compute))

    def _refresh(self, collection: Collection, uid: str, children: str,
                 compute: Callable[[str, list[str]], dict[str, Any] | None]) -> bool:
        current = collection.find_one({"_id": uid}, {children: 1, REV: 1, VARIANTS: 1})
        fields = compute(uid, list((current or {}).get(children, [])))
        if current is None or fields is None or fields[VARIANTS] == current.get(VARIANTS):
            return True
        return collection.update_one({"_id": uid, REV: current.get(REV)}, {
            "$set": {VARIANTS: fields[VARIANTS]}, "$inc": {REV: 1}}).matched_count == 1

    def rebuild(self, collection: Collection, uid: str, children: str,
                 extra: list[str | None],
                 compute: Callable[[str, list[str]], dict[str, Any] | None]) -> None:
        """Compare-and-set the fields ``compute`` derives; delete the document if empty."""
        self._until_set(collection, uid, functools.partial(
            self._rebuild, collection, uid, children, extra, compute))

    def _rebuild(self, collection: Collection, uid: str, children: str,
                 extra: list[str | None],
                 compute: Callable[[str, list[str]], dict[str, Any] | None]) -> bool:
        current = collection.find_one({"_id": uid}, {children: 1, REV: 1})
        candidates = list(dict.fromkeys(
            [*(current or {}).get(children, []), *(x for x in extra if x)]))
        fields = compute(uid, candidates)
        if current is None:
            if fields is None:
                return True
            try:
                collection.insert_one({"_id": uid, REV: 0, **fields})
                return True
            except DuplicateKeyError:
                return False
        condition = {"_id": uid, REV: current.get(REV)}
        if fields is None:
            return collection.delete_one(condition).deleted_count == 1
        return collection.update_one(condition, {"$set": fields, "$inc": {REV: 1}}
                                     ).matched_count == 1

    def _until_set(self, collection: Collection, uid: str, attempt: Callable[[], bool]
                   ) -> None:
        """Run ``attempt`` -- one read of a level document and one compare-and-set on
        its ``rev``; True once done -- until it succeeds.

        A store changing the document between the read and the write makes it start
        again, and stores coming faster than an attempt reads the members (40 ms for a
        series of 400 on FerretDB) would starve it: this process's stores wait for it
        (:meth:`rebuilding`); another node's mostly come in batches
        (``write_behind_seconds``), between which it tries again for some seconds.
        Another node storing without batches (re-sends, ``write_behind_seconds: 0``)
        can still starve it: it raises, and the caller's journal entry has it done
        again later."""
        with self.rebuilding([uid]):
            deadline = time.monotonic() + REBUILD_SECONDS
            while not attempt():
                if time.monotonic() > deadline:
                    raise PyMongoError(f"{collection.name} {uid} kept changing while being "
                                       f"rebuilt for {REBUILD_SECONDS:.0f} s")
                time.sleep(random.uniform(0, REBUILD_PAUSE))

    # -- this process's rebuilds and stores, kept apart -------------------------------

    @contextmanager
    def rebuilding(self, uids: Iterable[str]) -> Iterator[None]:
        """Around rebuilds of these documents: this process's stores into them wait
        until it ends, and those under way end first -- a store between its series
        and its study update would otherwise be counted twice by a study rebuilt then
        (the compare-and-set cannot see it).  At most :data:`REBUILD_SECONDS` waited."""
        uids = list(dict.fromkeys(uids))
        with self._apart:
            self._rebuilding.update(uids)
            self._apart.wait_for(lambda: not any(u in self._storing for u in uids),
                                 REBUILD_SECONDS)
        try:
            yield
        finally:
            with self._apart:
                self._rebuilding -= Counter(uids)
                self._apart.notify_all()

    @contextmanager
    def storing(self, hierarchy: tuple[str, str, str]) -> Iterator[None]:
        """Around a store's updates of the documents of ``hierarchy``: after this
        process's rebuilds of them (:meth:`rebuilding`).  Nothing inside may rebuild."""
        with self._apart:
            self._apart.wait_for(lambda: not any(u in self._rebuilding for u in hierarchy),
                                 REBUILD_SECONDS)
            self._storing.update(hierarchy)
        try:
            yield
        finally:
            with self._apart:
                self._storing -= Counter(hierarchy)
                self._apart.notify_all()

    def _fetch(self, collection: Collection, ids: Iterable[str],
               projection: dict[str, Any] | None) -> list[dict[str, Any]]:
        """The documents of ``ids`` that exist, in the order of ``ids``: one query per
        thousand (an embedded database searches its index for a ``$in`` that long)."""
        ids = list(ids)
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), FETCH_BATCH):
            for doc in collection.find({"_id": {"$in": ids[start:start + FETCH_BATCH]}},
                                       projection):
                found[doc["_id"]] = doc
        return [found[i] for i in ids if i in found]

    def series_fields(self, uid: str, candidates: list[str]) -> dict[str, Any] | None:
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

    def study_fields(self, uid: str, candidates: list[str]) -> dict[str, Any] | None:
        members = [s for s in self._fetch(self.series, candidates, NO_INSTANCES)
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
            MODALITY_COUNTS: _summed(members, MODALITY_COUNTS),
            SOP_CLASS_COUNTS: _summed(members, SOP_CLASS_COUNTS),
            VARIANTS: {lvl: sorted({h for s in members for h in s.get(VARIANTS, {}).get(lvl, [])})
                       for lvl in (PATIENT, STUDY)},
        }

    def patient_fields(self, uid: str, candidates: list[str]) -> dict[str, Any] | None:
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



def _variants(hashes: dict[str, str], *levels: str) -> dict[str, str]:
    """``$addToSet`` of the attribute hashes of ``levels``."""
    return {f"{VARIANTS}.{level}": hashes[level] for level in levels}


@dataclass
class _Taken:
    """What a delete takes from one study or patient document."""

    instances: int = 0
    series: list[str] = field(default_factory=list)  # emptied and deleted
    studies: list[str] = field(default_factory=list)  # emptied and deleted
    counts: Counter[str] = field(default_factory=Counter)
    hierarchies: list[tuple[str, str, str]] = field(default_factory=list)


def _decrements(members: list[dict[str, Any]]) -> dict[str, int]:
    """``$inc`` of the per-value counters for instances taken away."""
    counts: Counter[str] = Counter()
    for member in members:
        counts[f"{SOP_CLASS_COUNTS}.{field_key(member.get('SOPClassUID', ''))}"] -= 1
        counts[f"{MODALITY_COUNTS}.{field_key(member.get('Modality', ''))}"] -= 1
    return dict(counts)


def _counts(values: Iterable[str]) -> dict[str, int]:
    return {field_key(value): n for value, n in Counter(values).items()}


def _summed(members: list[dict[str, Any]], field: str) -> dict[str, int]:
    """The members' per-value counters added up (those counting something)."""
    total: Counter[str] = Counter()
    for member in members:
        total.update(member.get(field) or {})
    return {key: n for key, n in total.items() if n > 0}


def _present(members: list[dict[str, Any]], field: str) -> list[str]:
    """Values counted at least once in the members' per-value counters, sorted."""
    return sorted({from_field_key(k) for m in members
                   for k, n in (m.get(field) or {}).items() if n > 0})




# --- write-behind of the updates of new instances -------------------------------------


class _Batch:
    """What the new instances of one series add to its level documents."""

    def __init__(self, hierarchy: tuple[str, str, str]) -> None:
        self.hierarchy = hierarchy
        self.keys: list[str] = []
        self.sops: list[str] = []
        self.classes: Counter[str] = Counter()
        self.modalities: Counter[str] = Counter()
        self.latest: tuple[ObjectId, dict[str, Any]] | None = None
        #: the attribute hashes every instance of the batch has (WriteBehind.take)
        self.hashes: dict[str, str] = {}
        #: instances the series document counts already, their SOP classes and
        #: modalities (the first of a series this node opened: WriteBehind.open)
        self.counted: list[tuple[str, str, str]] = []
        #: whether opening the series created it (the study and patient count it)
        self.created = False

    def add(self, doc: dict[str, Any], data: dict[str, Any], key: str) -> None:
        self.hashes = doc["hashes"]
        self.keys.append(key)
        self.sops.append(doc["_id"])
        self.classes[doc["SOPClassUID"]] += 1
        self.modalities[doc["Modality"]] += 1
        if self.latest is None or doc["file_id"] > self.latest[0]:
            self.latest = (doc["file_id"], data)

    def series_counts(self) -> tuple[int, Counter[str], Counter[str]]:
        """Instances, SOP classes and modalities the series document has yet to count."""
        return (len(self.sops) - len(self.counted),
                self.classes - Counter(c for _, c, _ in self.counted),
                self.modalities - Counter(m for _, _, m in self.counted))


class WriteBehind:
    """Coalesces the level updates of new instances into series this node knows.

    FerretDB rewrites a whole document for every update (~3-5 ms each): three per
    instance were half of a store's time.  A new instance whose series this node has
    updated before with the same study, patient and attribute hashes (so nothing can
    conflict nor change the variants) is counted in a batch instead, and so are the
    study and patient updates of the first instance of a new series in a study this
    node knows so (its series document is upserted at once: conflicts are found before
    the store is answered, :meth:`open`); a batch is written
    as one update per level document when it is ``max_batch`` long, every ``linger``
    seconds, and before any read of the level documents on this node (:meth:`flush`,
    the barrier C-FIND, C-MOVE and C-GET call).  Each instance's journal entry stays
    until its batch is written: a crash or a failed write leaves the entries, whose
    replay rebuilds the documents exactly, so the archive never depends on this memory.
    """

    def __init__(self, levels: Levels, written: Callable[[list[str]], None],
                 failed: Callable[[list[str]], None], max_batch: int = 64,
                 linger: float = 0.2, known: int = 10_000) -> None:
        self.levels = levels
        self.written, self.failed = written, failed
        self.max_batch, self.linger, self.known_limit = max_batch, linger, known
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._batches: dict[str, _Batch] = {}
        self._known: OrderedDict[str, tuple[str, str, tuple[str, ...]]] = OrderedDict()
        #: studies of the known series: their patient, and their patient and study
        #: attribute hashes (what a new series must claim to be opened: :meth:`open`)
        self._studies: OrderedDict[str, tuple[str, str, str]] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def learn(self, doc: dict[str, Any]) -> None:
        """The instance's level documents were just updated one by one, without
        conflict: its series' next instances may be batched."""
        with self._lock:
            self._learn(doc)

    def _learn(self, doc: dict[str, Any]) -> None:
        """The instance's series and study known (under the lock), the oldest dropped."""
        for known, key, value in ((self._known, doc["SeriesInstanceUID"], _claims(doc)),
                                  (self._studies, doc["StudyInstanceUID"], _study_claims(doc))):
            known[key] = value  # type: ignore[index]
            known.move_to_end(key)
            while len(known) > self.known_limit:
                known.popitem(last=False)

    def forget(self) -> None:
        """Level documents may have changed otherwise (a move, a rebuild): batch nothing
        more until stores have learnt their series again."""
        with self._lock:
            self._known.clear()
            self._studies.clear()

    def opens(self, doc: dict[str, Any]) -> bool:
        """Whether the instance would open a series of a study this node knows as it
        claims (:meth:`open`)."""
        with self._lock:
            return doc["SeriesInstanceUID"] not in self._known and \
                self._studies.get(doc["StudyInstanceUID"]) == _study_claims(doc)

    def open(self, doc: dict[str, Any], data: dict[str, Any], key: str, created: bool) -> bool:
        """Batch the study and patient updates of the first instance of a series of a
        known study, its series document updated already (``created`` or not by that
        update); the series' next instances are batched whole (:meth:`take`).

        The series document was upserted on the study and patient the instance claims
        before the store was answered, so a conflict is found as without batches; the
        study and patient, known as it claims, are where earlier batches of that study
        went.  False (nothing batched) if the study is no longer known so.
        """
        with self._lock:
            if self._studies.get(doc["StudyInstanceUID"]) != _study_claims(doc):
                return False
            batch = self._batches.setdefault(doc["SeriesInstanceUID"],
                                             _Batch(hierarchy_of(doc)))
            batch.add(doc, data, key)
            batch.counted.append((doc["_id"], doc["SOPClassUID"], doc["Modality"]))
            batch.created = batch.created or created
            self._learn(doc)
        return True  # (no flush here: the caller is storing, which a flush waits for)

    def take(self, doc: dict[str, Any], data: dict[str, Any], key: str) -> bool:
        """Batch a new instance's level updates, if its series is known as it claims."""
        series = doc["SeriesInstanceUID"]
        with self._lock:
            if self._known.get(series) != _claims(doc):
                return False
            batch = self._batches.setdefault(series, _Batch(hierarchy_of(doc)))
            batch.add(doc, data, key)
            full = len(batch.keys) >= self.max_batch
        if full:
            self.flush()
        return True

    def agrees(self, doc: dict[str, Any]) -> bool:
        """Whether every batch waiting under the instance's study or patient has its
        attributes at those levels, so that its fold need not wait for them.

        A fold and a batch then commute: counters are increments, child lists and value
        sets unions, and both set the same attributes on the documents they share.  Any
        difference (a study becoming mixed, a study of two patients) keeps the order of
        arrival: the batches are written first, as before.  So does a batch of the
        instance's own series, which it could not join: its attributes at some level
        differ, and the batch written after the fold would put an older instance's
        attributes over the newer one's.
        """
        hashes = doc["hashes"]
        series, study, patient = hierarchy_of(doc)
        with self._lock:
            for batch in self._batches.values():
                batch_series, batch_study, batch_patient = batch.hierarchy
                if batch_series == series:
                    return False
                if batch_study == study:
                    if batch_patient != patient:
                        return False
                    shared: tuple[str, ...] = (PATIENT, STUDY)
                elif batch_patient == patient:
                    shared = (PATIENT,)
                else:
                    continue
                if any(batch.hashes.get(level) != hashes.get(level) for level in shared):
                    return False
        return True

    def flush(self) -> None:
        """Write every batch (the barrier before reading level documents)."""
        with self._flushing:
            with self._lock:
                batches, self._batches = list(self._batches.values()), {}
            for batch in batches:
                try:
                    self._write(batch)
                except Exception:  # noqa: BLE001 - the journal rebuilds exactly
                    with self._lock:
                        self._known.pop(batch.hierarchy[0], None)
                        self._studies.pop(batch.hierarchy[1], None)
                    self.failed(batch.keys)
                else:
                    self.written(batch.keys)

    def pending(self) -> int:
        with self._lock:
            return sum(len(b.keys) for b in self._batches.values())

    def _write(self, batch: _Batch) -> None:
        with self.levels.storing(batch.hierarchy):  # (nothing in _update rebuilds)
            results, legacy = self._update(batch)
        if any(matched != 1 for matched in results):
            raise PyMongoError(f"level documents of series {batch.hierarchy[0]} gone "
                               "meanwhile")
        if legacy:
            self.levels.recompute(batch.hierarchy)

    def _update(self, batch: _Batch) -> tuple[list[int], bool]:
        """The batch's three updates; how many documents each matched, and whether
        the study is a legacy one (to rebuild)."""
        assert batch.latest is not None
        series_uid, study_uid, patient_id = batch.hierarchy
        file_id, data = batch.latest
        n = len(batch.keys)
        common = {LATEST: file_id}
        # Each document must still be there: one emptied and deleted meanwhile (a
        # re-send moved its instances away, here or on another node) makes the batch
        # fail, and the journal rebuilds its documents exactly.  The batch adds its
        # attribute hashes although this node has written them before: another node's
        # rebuild may have dropped them since (with the instances that carried them).
        hashes = batch.hashes
        results: list[int] = []
        counts = _value_counts(batch.classes, batch.modalities)
        in_series, classes, modalities = batch.series_counts()
        # ... and still claim the batch's study and patient: a correction in another
        # process may have moved the series to another patient (archive.modification)
        results.append(self.levels.series.update_one({
                "_id": series_uid, "StudyInstanceUID": study_uid, "PatientID": patient_id}, {
            "$set": {**normalised_fields(SERIES, data), "dataset": level_dataset(SERIES, data),
                     **common},
            "$addToSet": {"instances": {"$each": batch.sops},
                          **_variants(hashes, PATIENT, STUDY, SERIES)},
            "$inc": {"NumberOfSeriesRelatedInstances": in_series, REV: 1,
                     **_value_counts(classes, modalities)}}).matched_count)
        opened = {"series": series_uid} if batch.counted else {}
        created = 1 if batch.created else 0
        # (a count below zero: a re-send on another node moved one of these instances
        # before the batch counted it; see Levels.drop_uncounted)
        study = self.levels.studies.find_one_and_update({"_id": study_uid,
                                                         "PatientID": patient_id}, {
            "$set": {**normalised_fields(STUDY, data), "dataset": level_dataset(STUDY, data),
                     **common},
            "$addToSet": {"ModalitiesInStudy": {"$each": sorted(batch.modalities)},
                          "SOPClassesInStudy": {"$each": sorted(batch.classes)},
                          **opened, **_variants(hashes, PATIENT, STUDY)},
            "$inc": {"NumberOfStudyRelatedInstances": n, "NumberOfStudyRelatedSeries": created,
                     REV: 1, **counts}})
        results.append(0 if study is None else 1)
        legacy = study is not None and not counts_per_value(study)
        if study is not None and not legacy:
            self.levels.drop_uncounted(study_uid, study, counts)
        results.append(self.levels.patients.update_one({"_id": patient_id}, {
            "$set": {**normalised_fields(PATIENT, data), "dataset": level_dataset(PATIENT, data),
                     **common},
            "$addToSet": _variants(hashes, PATIENT),
            "$inc": {"NumberOfPatientRelatedInstances": n, "NumberOfPatientRelatedSeries": created,
                     REV: 1}}).matched_count)
        return results, legacy

    # -- the writer thread --------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="level-writer",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.linger):
            self.flush()


def _value_counts(classes: Counter[str], modalities: Counter[str]) -> dict[str, int]:
    """Counter increments per SOP class and modality."""
    return {**{f"{SOP_CLASS_COUNTS}.{field_key(k)}": c for k, c in classes.items()},
            **{f"{MODALITY_COUNTS}.{field_key(k)}": c for k, c in modalities.items()}}


def _study_claims(doc: dict[str, Any]) -> tuple[str, str, str]:
    """What an instance opening a series must share with its study's known series."""
    hashes = doc.get("hashes") or {}
    return doc["PatientID"], hashes.get(PATIENT, ""), hashes.get(STUDY, "")


def _claims(doc: dict[str, Any]) -> tuple[str, str, tuple[str, ...]]:
    """What a batched instance must share with its series' known instances."""
    hashes = doc.get("hashes") or {}
    return (doc["StudyInstanceUID"], doc["PatientID"],
            tuple(hashes.get(level, "") for level in (PATIENT, STUDY, SERIES)))

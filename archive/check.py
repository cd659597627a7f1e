"""``archive check``: the whole database against its instances, and repairs.

The instance documents and the GridFS files are the truth; everything else is derived
from them and can be rebuilt:

- every GridFS file belongs to an instance document (or a rejected one, kept until
  purged: :mod:`archive.rejection`), and has all its chunks; every instance document
  names a whole file;
- every series, study and patient document exists exactly when an instance is below
  it, with the counters, child lists, Modalities / SOP Classes in Study, per-value
  counts and attribute variants its instances give.

A node repairs what its own crashes leave at start (its journal, :mod:`archive.journal`);
this check finds everything else (a lost journal after a power failure, a database
restored from a backup, a bug) and, with ``repair``, fixes it: orphan files and chunks
deleted, level documents rebuilt.  An instance whose file is missing cannot be repaired
(its original is gone); it is reported.

It reads every instance document once (with a projection) and every level document:
minutes for a large archive on FerretDB, which decodes whole documents.  Files younger
than ``grace`` seconds are not judged: a running node may be storing them.
"""

from __future__ import annotations

import datetime
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bson import ObjectId

from archive.levels import MODALITY_COUNTS, SOP_CLASS_COUNTS, VARIANTS, field_key
from archive.model import PATIENT, SERIES, STUDY
from archive.modification import HISTORY
from archive.storage import Archive

_MEMBER = {"file_id": 1, "SeriesInstanceUID": 1, "StudyInstanceUID": 1, "PatientID": 1,
           "SOPClassUID": 1, "Modality": 1, "hashes": 1, HISTORY: 1}


@dataclass
class Report:
    """What the check found and, when repairing, what it fixed."""

    instances: int = 0
    files: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unrepairable: list[str] = field(default_factory=list)
    skipped_recent: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"instances": self.instances, "files": self.files, "problems": self.problems,
                "notes": self.notes,
                "repaired": self.repaired, "unrepairable": self.unrepairable,
                "skipped_recent_files": self.skipped_recent, "clean": self.clean}


@dataclass
class _Expected:
    """A level document as its members make it."""

    members: set[str] = field(default_factory=set)
    children: set[str] = field(default_factory=set)
    classes: Counter[str] = field(default_factory=Counter)
    modalities: Counter[str] = field(default_factory=Counter)
    variants: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    series: set[str] = field(default_factory=set)


def check(archive: Archive, repair: bool = False, grace: float = 300.0) -> Report:
    """Check (and with ``repair``, fix) the archive; see the module docstring."""
    report = Report()
    if repair and archive.pending():
        archive.reconcile()
        report.repaired.append("journal replayed")
    instances = list(archive.instances.find({}, _MEMBER))
    report.instances = len(instances)
    _check_files(archive, instances, report, repair, grace)
    _check_levels(archive, instances, report, repair)
    return report


# --- GridFS ------------------------------------------------------------------------------


def _check_files(archive: Archive, instances: list[dict[str, Any]], report: Report,
                 repair: bool, grace: float) -> None:
    files = {f["_id"]: f for f in archive.files.files.find({}, {"length": 1, "chunkSize": 1,
                                                                 "uploadDate": 1})}
    report.files = len(files)
    chunks: dict[Any, set[int]] = defaultdict(set)
    for chunk in archive.files.chunks.find({}, {"files_id": 1, "n": 1}):
        chunks[chunk["files_id"]].add(chunk["n"])
    # an instance's files: its own and the originals a correction kept; a rejected
    # instance's too, until purged
    kept = [*instances, *archive.rejecter.rejected.find({}, {"file_id": 1, HISTORY: 1})]
    referenced = {inst["file_id"] for inst in kept} | {
        h["file_id"] for inst in kept for h in inst.get(HISTORY) or []}
    cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=grace)
    for inst in instances:
        if inst["file_id"] not in files:
            report.problems.append(f"instance {inst['_id']}: its file {inst['file_id']} "
                                   "is missing")
            report.unrepairable.append(inst["_id"])
        for earlier in inst.get(HISTORY) or []:
            if earlier["file_id"] not in files:
                report.problems.append(f"instance {inst['_id']}: its original "
                                       f"{earlier['file_id']} is missing")
    for file_id, info in files.items():
        expected = set(range(-(-info["length"] // info["chunkSize"]))) if info["length"] \
            else {0}
        missing = expected - chunks.get(file_id, set())
        if file_id in referenced:
            if missing and info["length"]:
                report.problems.append(f"file {file_id}: chunks {sorted(missing)} missing")
                report.unrepairable.append(str(file_id))
            continue
        if _recent(info.get("uploadDate"), file_id, cutoff):
            report.skipped_recent += 1
            continue
        report.problems.append(f"file {file_id}: belongs to no instance")
        if repair:
            archive.files.delete(file_id)
            archive.files.chunks.delete_many({"files_id": file_id})
            report.repaired.append(f"file {file_id} deleted")
    for file_id in set(chunks) - set(files):
        if _recent(None, file_id, cutoff):
            report.skipped_recent += 1
            continue
        report.problems.append(f"chunks of {file_id}: no files document")
        if repair:
            archive.files.chunks.delete_many({"files_id": file_id})
            report.repaired.append(f"chunks of {file_id} deleted")


def _recent(uploaded: Any, file_id: Any, cutoff: datetime.datetime) -> bool:
    moment = uploaded if isinstance(uploaded, datetime.datetime) else (
        file_id.generation_time if isinstance(file_id, ObjectId) else None)
    if moment is None:
        return False
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment > cutoff


# --- level documents ---------------------------------------------------------------------


def expected_levels(instances: Iterable[dict[str, Any]]
                    ) -> dict[str, dict[str, _Expected]]:
    """Each level document as the instance documents make it."""
    levels: dict[str, dict[str, _Expected]] = {SERIES: defaultdict(_Expected),
                                                STUDY: defaultdict(_Expected),
                                                PATIENT: defaultdict(_Expected)}
    for inst in instances:
        series = levels[SERIES][inst["SeriesInstanceUID"]]
        study = levels[STUDY][inst["StudyInstanceUID"]]
        patient = levels[PATIENT][inst["PatientID"]]
        hashes = inst.get("hashes") or {}
        for doc, owned in ((series, (PATIENT, STUDY, SERIES)), (study, (PATIENT, STUDY)),
                           (patient, (PATIENT,))):
            doc.members.add(inst["_id"])
            doc.classes[inst.get("SOPClassUID", "")] += 1
            doc.modalities[inst.get("Modality", "")] += 1
            for level in owned:
                doc.variants[level].add(hashes.get(level, ""))
        series.children.add(inst["_id"])
        study.children.add(inst["SeriesInstanceUID"])
        patient.children.add(inst["StudyInstanceUID"])
        patient.series.add(inst["SeriesInstanceUID"])
    return levels


def _differences(level: str, doc: dict[str, Any], want: _Expected) -> list[str]:
    """How a stored level document differs from what its members make it."""
    got: dict[str, Any]
    if level == SERIES:
        got = {"NumberOfSeriesRelatedInstances": len(want.members),
               "instances": want.children,
               SOP_CLASS_COUNTS: {field_key(k): n for k, n in want.classes.items()},
               MODALITY_COUNTS: {field_key(k): n for k, n in want.modalities.items()}}
        stored = {"NumberOfSeriesRelatedInstances": doc.get("NumberOfSeriesRelatedInstances"),
                  "instances": set(doc.get("instances", [])), **_value_counts(doc)}
        owned: tuple[str, ...] = (PATIENT, STUDY, SERIES)
    elif level == STUDY:
        got = {"NumberOfStudyRelatedInstances": len(want.members),
               "NumberOfStudyRelatedSeries": len(want.children), "series": want.children,
               "ModalitiesInStudy": set(want.modalities),
               "SOPClassesInStudy": set(want.classes),
               SOP_CLASS_COUNTS: {field_key(k): n for k, n in want.classes.items()},
               MODALITY_COUNTS: {field_key(k): n for k, n in want.modalities.items()}}
        stored = {"NumberOfStudyRelatedInstances": doc.get("NumberOfStudyRelatedInstances"),
                  "NumberOfStudyRelatedSeries": doc.get("NumberOfStudyRelatedSeries"),
                  "series": set(doc.get("series", [])),
                  "ModalitiesInStudy": set(doc.get("ModalitiesInStudy", [])),
                  "SOPClassesInStudy": set(doc.get("SOPClassesInStudy", [])),
                  **_value_counts(doc)}
        owned = (PATIENT, STUDY)
    else:
        got = {"NumberOfPatientRelatedInstances": len(want.members),
               "NumberOfPatientRelatedSeries": len(want.series),
               "NumberOfPatientRelatedStudies": len(want.children), "studies": want.children}
        stored = {key: doc.get(key) for key in got if key != "studies"}
        stored["studies"] = set(doc.get("studies", []))
        owned = (PATIENT,)
    problems = [f"{key} {_short(stored[key])} != {_short(value)}"
                for key, value in got.items() if stored[key] != value]
    variants = doc.get(VARIANTS) or {}
    for lvl in owned:  # fewer variants than the members have would hide a mixed entity
        if not want.variants[lvl] <= set(variants.get(lvl, [])):
            problems.append(f"{VARIANTS}.{lvl} lacks variants of its instances")
    return problems


def _value_counts(doc: dict[str, Any]) -> dict[str, dict[str, int]]:
    """A series' or study's instances per SOP class and per modality, zeros left out."""
    return {field: {k: n for k, n in (doc.get(field) or {}).items() if n}
            for field in (SOP_CLASS_COUNTS, MODALITY_COUNTS)}


def _stale(level: str, doc: dict[str, Any], want: _Expected) -> bool:
    """Variants of instances no longer there (a re-send changed their attributes):
    harmless, but restricted queries then take the slower path for this entity."""
    variants = doc.get(VARIANTS) or {}
    return any(set(variants.get(lvl, [])) > want.variants[lvl] for lvl in want.variants)


def _short(value: Any) -> str:
    if isinstance(value, set | list) and len(value) > 4:
        return f"<{len(value)} values>"
    if isinstance(value, set):
        return str(sorted(value))
    return str(value)


def _check_levels(archive: Archive, instances: list[dict[str, Any]], report: Report,
                  repair: bool) -> None:
    levels = expected_levels(instances)
    collections = {SERIES: archive.series, STUDY: archive.studies, PATIENT: archive.patients}
    wrong: dict[str, set[str]] = {SERIES: set(), STUDY: set(), PATIENT: set()}
    for level, collection in collections.items():
        stored = {doc["_id"]: doc for doc in collection.find({})}
        for uid in set(stored) | set(levels[level]):
            name = f"{level.lower()} {uid}"
            if uid not in levels[level]:
                report.problems.append(f"{name}: no instance below it")
                wrong[level].add(uid)
            elif uid not in stored:
                report.problems.append(f"{name}: missing")
                wrong[level].add(uid)
            else:
                for difference in _differences(level, stored[uid], levels[level][uid]):
                    report.problems.append(f"{name}: {difference}")
                    wrong[level].add(uid)
                if uid not in wrong[level] and _stale(level, stored[uid], levels[level][uid]):
                    report.notes.append(f"{name}: variants of replaced instances kept")
                    wrong[level].add(uid)
    if not repair:
        return
    for level, children, compute in ((SERIES, "instances", archive.levels.series_fields),
                                     (STUDY, "series", archive.levels.study_fields),
                                     (PATIENT, "studies", archive.levels.patient_fields)):
        for uid in sorted(wrong[level]):
            want = levels[level].get(uid)
            members = sorted(want.children) if want is not None else []
            archive.levels.rebuild(collections[level], uid, children, list(members), compute)
            report.repaired.append(f"{level.lower()} {uid} rebuilt")

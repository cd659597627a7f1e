"""Correcting stored instances: new Part-10 files, the originals kept, the levels moved.

``archive modify`` uses this module; who may modify what is decided before (the
caller's selection), never here.

**A correction** replaces a few attribute values of the selected instances (PatientID,
PatientName, StudyDescription...): each stored file is rewritten with the new values
and nothing else changed (:mod:`archive.rewrite`: same transfer syntax, the old values
in its Original Attributes Sequence), the instance document is rebuilt from the new
file, and the original file stays in GridFS, listed in the instance document's
``history`` (file id, when, by whom, why, the old values) -- never served, never
deleted but with the instance.  A correction of PatientID moves whole studies to
another patient: its studies must be selected whole, and when that patient exists,
the instances take its patient attributes (name, birth date, sex...) unless the
correction sets them, so that the patient stays one consistent entity.  UIDs are
never changed; an instance that has the values already is left as it is.
**A restore** makes an instance its original again (the first file of its history)
and deletes the corrected files.

**Order of writes**, per batch of whole studies (up to :data:`BATCH` instances, a
larger study alone):

0. a journal entry ``modify-<id>`` naming, per instance, the file it has, the file it
   gets, whether that one is new, and the files to delete once it has it; and the
   hierarchies before and after;
1. the new files (GridFS);
2. the instance documents, each only if it still has the file the entry names (one
   re-sent meanwhile is left as it was sent: its new file is deleted);
3. the level documents: an instance staying in its series is re-counted as a re-send
   is (:meth:`Levels.fold`), instances moving to another patient are taken out of
   their old documents (:meth:`Levels.remove`) and counted into the new ones, both
   commuting with concurrent stores; then the attribute variants of the documents
   whose attributes changed are brought up to date (:meth:`Levels.refresh_variants`);
4. files to delete (a restore's corrected files), then the entry removed.

A failure or a crash leaves the entry: its replay (:meth:`archive.storage.Archive.
reconcile`, at start and while the node runs) completes the batch once all its new
files were made (the entry says so: each instance still on its old file gets its new
one, so a study is never left half-moved), else deletes the new files made so far
(nothing was committed yet); then it rebuilds the level documents of every hierarchy
the entry names.
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from bson import ObjectId
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from archive import dicomjson
from archive.gridstore import GridStore
from archive.journal import Journal, Unfinished
from archive.levels import Conflict, Levels, hierarchy_of
from archive.model import PATIENT, STORED_KEYS
from archive.rewrite import BadChange, rewrite, text_of

log = logging.getLogger(__name__)

#: Instances per journal entry: whole studies, one larger study alone.
BATCH = 500
KEY_PREFIX = "modify-"
KIND = "modify"
#: The field of an instance document listing its earlier files (oldest first).
HISTORY = "history"
PATIENT_ID = 0x00100020

#: Builds the instance document (and its DICOM JSON and dataset) of a Part-10 file
#: stored under a file id, from a given source: what a store would write.
Index = Callable[[Path, ObjectId, str], tuple[dict[str, Any], dict[str, Any], Dataset]]
Changes = dict[int, DataElement | None]


class ModifyIncomplete(Unfinished):
    """A modify stopped by a database failure: its journal entry finishes it later."""


def changed_patient(changes: Changes) -> str | None:
    elem = changes.get(PATIENT_ID)
    return None if elem is None else str(elem.value or "")


class Modifier:
    """Corrects and restores instances of one archive (see the module docstring)."""

    def __init__(self, levels: Levels, files: GridStore, journal: Journal,
                 active: set[str], index: Index) -> None:
        self.levels, self.files, self.journal, self.index = levels, files, journal, index
        #: journal keys of work running in this process (the archive's, shared)
        self.active = active

    # -- planning -------------------------------------------------------------------

    def adopted(self, changes: Changes) -> Changes:
        """``changes`` completed with the patient attributes of the patient that a new
        PatientID names, when it exists (those ``changes`` sets stay as given; those
        the patient lacks are removed from the instances)."""
        patient_id = changed_patient(changes)
        if not patient_id:
            return changes
        target = self.levels.patients.find_one({"_id": patient_id}, {"dataset": 1})
        if target is None:
            return changes
        data = target.get("dataset") or {}
        ds = dicomjson.from_json({k: v for k, v in data.items() if k in STORED_KEYS[PATIENT]})
        completed: Changes = dict(changes)
        for key in sorted(STORED_KEYS[PATIENT]):
            tag = int(key, 16)
            if tag not in completed:
                completed[tag] = ds.get(tag, None)
        return completed

    def refusal(self, instances: list[dict[str, Any]], changes: Changes) -> str | None:
        """Why this correction of these instances is refused, or None.

        A new PatientID takes whole studies: part of a study under another patient
        would split it between two.
        """
        if changed_patient(changes) is None:
            return None
        selected: dict[str, int] = {}
        for doc in instances:
            selected[doc["StudyInstanceUID"]] = selected.get(doc["StudyInstanceUID"], 0) + 1
        for uid, count in selected.items():
            study = self.levels.studies.find_one({"_id": uid},
                                                 {"NumberOfStudyRelatedInstances": 1}) or {}
            total = study.get("NumberOfStudyRelatedInstances", count)
            if count < total:
                return (f"PatientID changes whole studies: {count} of the {total} "
                        f"instances of study {uid} selected (select it by "
                        "StudyInstanceUID or PatientID)")
        return None

    # -- correcting and restoring -----------------------------------------------------

    def modify(self, instances: list[dict[str, Any]], changes: Changes, by: str,
               reason: str, system: str) -> tuple[int, int, int]:
        """Correct the instances (their documents as selected); (corrected, left
        because re-sent meanwhile, left because they have these values already).
        Raises BadChange (nothing of the batch changed) or ModifyIncomplete (the
        journal finishes the batch)."""
        when = datetime.datetime.now(datetime.timezone.utc)
        stamp = when.strftime("%Y%m%d%H%M%S.%f+0000")
        new_patient = changed_patient(changes)

        def prepare(doc: dict[str, Any], item: dict[str, Any], folder: Path
                    ) -> dict[str, Any] | None:
            original, corrected = folder / "original.dcm", folder / "corrected.dcm"
            self._fetch(doc["file_id"], original)
            with open(corrected, "wb") as out:
                old, effective = rewrite(original, out, changes, system, stamp)
            if not effective:  # it has these values already: nothing to correct
                item["unchanged"] = True
                return None
            file_id = ObjectId(item["to"])
            new, _, ds = self.index(corrected, file_id, doc.get("source", ""))
            for tag, elem in effective.items():  # (sequences come from a patient's JSON)
                if elem is not None and elem.VR == "SQ":
                    continue
                wanted = None if elem is None else text_of(elem.value)
                got = text_of(ds[tag].value) if tag in ds else None
                if got != wanted and not (wanted == "" and got in ("", None)):
                    raise BadChange(f"{keyword_for_tag(tag)}: {wanted!r} cannot be written "
                                    f"in the character set of instance {doc['_id']}")
            self.files.put(corrected, f"{doc['_id']}.dcm", {
                "SOPInstanceUID": doc["_id"], "TransferSyntaxUID": new["TransferSyntaxUID"]},
                file_id=file_id)
            item["record"] = {
                "file_id": str(doc["file_id"]), "size": doc.get("size"),
                "replaced_at": when.isoformat(), "by": by, "reason": reason,
                "changed": {keyword_for_tag(tag) or f"{tag:08X}": _old_text(old, tag)
                            for tag in sorted(effective)}}
            new[HISTORY] = [*(doc.get(HISTORY) or []), _record(item["record"])]
            return new

        def plan(doc: dict[str, Any]) -> dict[str, Any]:
            after = list(hierarchy_of(doc))
            if new_patient is not None:
                after[2] = new_patient
            return {"sop": doc["_id"], "from": str(doc["file_id"]), "to": str(ObjectId()),
                    "created": True, "drop": [], "after": after}

        return self._run(instances, plan, prepare)

    def restore(self, instances: list[dict[str, Any]]) -> tuple[int, int, int]:
        """Make corrected instances their originals again; the corrected files are
        deleted.  (restored, left because re-sent meanwhile, 0)."""
        def plan(doc: dict[str, Any]) -> dict[str, Any]:
            history = doc[HISTORY]
            return {"sop": doc["_id"], "from": str(doc["file_id"]),
                    "to": str(history[0]["file_id"]), "created": False,
                    "drop": [str(doc["file_id"]), *(str(h["file_id"]) for h in history[1:])],
                    "after": _original_hierarchy(doc)}

        def prepare(doc: dict[str, Any], item: dict[str, Any], folder: Path
                    ) -> dict[str, Any]:
            original = folder / "original.dcm"
            self._fetch(ObjectId(item["to"]), original)
            new, _, _ = self.index(original, ObjectId(item["to"]), doc.get("source", ""))
            return new

        return self._run(instances, plan, prepare, only=lambda doc: bool(doc.get(HISTORY)))

    def _run(self, instances: list[dict[str, Any]],
             plan: Callable[[dict[str, Any]], dict[str, Any]],
             prepare: Callable[[dict[str, Any], dict[str, Any], Path], dict[str, Any] | None],
             only: Callable[[dict[str, Any]], bool] = lambda doc: True
             ) -> tuple[int, int, int]:
        done = left = unchanged = 0
        for batch in _batches(instances):
            docs = {d["_id"]: d for d in self.levels.instances.find(
                {"_id": {"$in": [d["_id"] for d in batch]}}, {"dataset": 0})}
            current = [docs[d["_id"]] for d in batch if d["_id"] in docs
                       and docs[d["_id"]]["file_id"] == d["file_id"]]
            left += len(batch) - len(current)
            current = [doc for doc in current if only(doc)]
            if not current:
                continue
            key = f"{KEY_PREFIX}{ObjectId()}"
            items = [plan(doc) for doc in current]
            hierarchies = [list(hierarchy_of(d)) for d in current]
            entry = {"kind": KIND, "pid": os.getpid(), "instances": items,
                     "hierarchies": [list(h) for h in dict.fromkeys(
                         tuple(h) for h in hierarchies + [i["after"] for i in items
                                                          if i["after"]])]}
            self.active.add(key)
            try:
                self.journal.write(key, entry)
                try:
                    new_docs = self._files(current, items, prepare)
                    entry["ready"] = True  # every new file made: a replay completes
                    self.journal.write(key, entry)
                except BadChange as exc:
                    self._settle_now(key, entry)
                    raise BadChange(f"{exc}: nothing changed" if not done else
                                    f"{exc}: {done} instances corrected before it, the "
                                    "others unchanged") from None
                except Exception as exc:
                    self._settle_now(key, entry)
                    raise ModifyIncomplete(
                        f"{done} instances done; writing the new files of {len(current)} "
                        f"failed ({type(exc).__name__}): those are unchanged") from exc
                try:
                    committed, skipped = self._commit(current, items, new_docs)
                except Exception as exc:
                    log.error("modify of %d instances interrupted (%s: %s): the journal "
                              "finishes it when the database answers", len(current),
                              type(exc).__name__, str(exc)[:200])
                    raise ModifyIncomplete(
                        f"{done} instances done, {len(current)} being changed when the "
                        f"database failed: {type(exc).__name__}") from exc
            finally:
                self.active.discard(key)
            self.journal.remove(key)
            done += committed
            left += skipped
            unchanged += sum(1 for item in items if item.get("unchanged"))
        return done, left, unchanged

    def _files(self, current: list[dict[str, Any]], items: list[dict[str, Any]],
               prepare: Callable[[dict[str, Any], dict[str, Any], Path], dict[str, Any] | None]
               ) -> list[dict[str, Any] | None]:
        """Step 1: each instance's new document (and, for a correction, its new file);
        None for one that would not change."""
        new_docs: list[dict[str, Any] | None] = []
        with tempfile.TemporaryDirectory(prefix="archive-modify-") as folder:
            for doc, item in zip(current, items, strict=True):
                new_docs.append(prepare(doc, item, Path(folder)))
        return new_docs

    def _commit(self, current: list[dict[str, Any]], items: list[dict[str, Any]],
                new_docs: list[dict[str, Any] | None]) -> tuple[int, int]:
        """Steps 2 to 4; (committed, left because re-sent meanwhile)."""
        kept: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = []
        changing = 0
        for old, item, new in zip(current, items, new_docs, strict=True):
            if new is None:
                continue
            changing += 1
            replaced = self.levels.instances.replace_one(
                {"_id": old["_id"], "file_id": old["file_id"]}, new).matched_count
            if replaced:
                kept.append((old, new, item))
            elif item["created"]:
                self.files.delete(ObjectId(item["to"]))
        moved = [(o, n) for o, n, _ in kept if hierarchy_of(o) != hierarchy_of(n)]
        stays = [(o, n) for o, n, _ in kept if hierarchy_of(o) == hierarchy_of(n)]
        touched = [hierarchy_of(d) for o, n, _ in kept for d in (o, n)]
        rebuild: list[tuple[str, str, str]] = []
        try:
            if moved:
                self.levels.remove([o for o, _ in moved])
                for _, new in moved:
                    rebuild += self.levels.fold(new, new["dataset"], None)
            for old, new in stays:
                rebuild += self.levels.fold(new, new["dataset"], old)
        except Conflict as exc:  # a store into the old place meanwhile: rebuilt exactly
            log.info("modify: %s meanwhile; the level documents are rebuilt", exc)
            rebuild = touched
        if rebuild:
            self.levels.recompute(*rebuild, extra_instances=[o["_id"] for o, _, _ in kept])
        self.levels.refresh_variants(*(hierarchy_of(d) for o, n, _ in kept
                                       if o.get("hashes") != n.get("hashes")
                                       for d in (o, n)))
        drop = [ObjectId(f) for _, _, item in kept for f in item["drop"]]
        self.files.delete_many(drop)
        return len(kept), changing - len(kept)

    def _settle_now(self, key: str, entry: dict[str, Any]) -> None:
        """Take back a batch whose files could not all be made: nothing committed."""
        try:
            self.settle(entry)
            self.journal.remove(key)
        except Exception as exc:  # noqa: BLE001 - the journal entry does it later
            log.warning("modify: clean-up deferred to the journal: %s", exc)

    def settle(self, entry: dict[str, Any]) -> list[tuple[str, str, str]]:
        """Finish an interrupted modify (journal replay); the hierarchies whose level
        documents the caller then rebuilds.

        Once every new file was made (``ready``) the batch is completed: each instance
        that still has the file the entry names gets its new one (a study is never
        left half-moved), and the files a restore drops are deleted.  Before that,
        nothing was committed: the new files made so far are deleted.
        """
        for item in entry.get("instances", []):
            if item.get("unchanged"):
                continue
            to = ObjectId(item["to"])
            current = self.levels.instances.find_one({"_id": item["sop"]},
                                                     {"file_id": 1, "source": 1, HISTORY: 1})
            committed = current is not None and current["file_id"] == to
            if not committed and entry.get("ready") and current is not None and \
                    current["file_id"] == ObjectId(item["from"]):
                committed = self._complete(item, current)
            if committed:
                self.files.delete_many([ObjectId(f) for f in item.get("drop", [])])
            elif item.get("created"):
                self.files.delete(to)
        return [tuple(h) for h in entry.get("hierarchies", [])]  # type: ignore[misc]

    def _complete(self, item: dict[str, Any], current: dict[str, Any]) -> bool:
        """Give an instance the new file its journal entry names (replay)."""
        with tempfile.TemporaryDirectory(prefix="archive-modify-") as folder:
            path = Path(folder) / "new.dcm"
            self._fetch(ObjectId(item["to"]), path)
            new, _, _ = self.index(path, ObjectId(item["to"]), current.get("source", ""))
        if item.get("record"):
            new[HISTORY] = [*(current.get(HISTORY) or []), _record(item["record"])]
        return self.levels.instances.replace_one(
            {"_id": item["sop"], "file_id": ObjectId(item["from"])}, new).matched_count == 1

    def _fetch(self, file_id: ObjectId, path: Path) -> None:
        with open(path, "wb") as out:
            for chunk in self.files.stream(file_id):
                out.write(chunk)


def _old_text(old: Dataset, tag: int) -> str | None:
    """What an attribute was, for the history (None: absent)."""
    if tag not in old:
        return None
    elem = old[tag]
    return f"({len(elem.value)} items)" if elem.VR == "SQ" else text_of(elem.value)


def _original_hierarchy(doc: dict[str, Any]) -> list[str]:
    """Where an instance's original belongs: its hierarchy with the PatientID the first
    correction of PatientID replaced (UIDs are never corrected)."""
    series, study, patient = hierarchy_of(doc)
    for record in doc.get(HISTORY) or []:
        if "PatientID" in (record.get("changed") or {}):
            patient = record["changed"]["PatientID"] or ""
            break
    return [series, study, patient]


def _record(journaled: dict[str, Any]) -> dict[str, Any]:
    """A history record as the instance document keeps it, from its journal form."""
    return {**journaled, "file_id": ObjectId(journaled["file_id"]),
            "replaced_at": datetime.datetime.fromisoformat(journaled["replaced_at"])}


def _batches(instances: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Whole studies, up to BATCH instances together (a larger study alone): a study
    moved to another patient is never split between two entries."""
    studies: dict[str, list[dict[str, Any]]] = {}
    for doc in instances:
        studies.setdefault(doc["StudyInstanceUID"], []).append(doc)
    batch: list[dict[str, Any]] = []
    for uid in sorted(studies):
        members = sorted(studies[uid], key=lambda d: (d["SeriesInstanceUID"], d["_id"]))
        if batch and len(batch) + len(members) > BATCH:
            yield batch
            batch = []
        batch += members
    if batch:
        yield batch


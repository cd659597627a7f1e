"""Deleting instances: GridFS files, instance documents and level documents together.

Both front ends use this module (``archive delete`` and DICOMweb ``DELETE``); who may
delete what is decided before (the Delete rules give the filter), never here.

**Selection.**  A filter on instance documents (C-FIND keys as
:func:`archive.query.pattern_filter` translates them, or a resource's unique keys, and
the principal's Delete rules) selects instances the way a retrieve does (each instance
judged on its own document).  Only instances their series already counts are taken: one
whose store is still in flight (its instance document written, its level updates not
yet, or waiting in a write-behind batch) is left to finish, and reported as kept.

**Rejected copies** (:mod:`archive.rejection`) the same filter selects go with the
instances: a delete of a study leaves nothing of it behind, and a re-send of one of its
rejected instances is no longer refused.  They are purged first (journaled as
``archive rejected purge`` does), so that an interrupted delete, run again, still finds
the study.  A filter selecting only rejected copies deletes nothing: ``archive rejected
purge`` is the command for those.

**Order of writes**, per batch of up to :data:`BATCH` instances (study by study):

0. a journal entry ``delete-<id>`` naming each instance (SOP Instance UID, file id) and
   its hierarchy (:mod:`archive.journal`);
1. the instance documents, each only with the file the entry names (a re-send that
   replaced one meanwhile is a new instance: kept);
2. the series, study and patient documents: decrements (:meth:`Levels.remove`), the
   emptied ones deleted;
3. the GridFS files (with the originals of corrected instances);
4. the entry removed.

A failure (the database went away) or a crash leaves the entry, and its replay
(:meth:`archive.storage.Archive.reconcile`, at start and while the node runs) rolls the
delete *forward*: what is left of its instance documents and files is deleted and the
level documents of its hierarchies are rebuilt exactly.  Nothing is ever half-deleted
once the database answers again: no file without an instance, no instance without its
file, no level document counting a deleted instance.

**A C-STORE into what is being deleted** ends stored, counted and visible: the
delete's decrements and ``$pull`` commute with the store's increments and
``$addToSet``, and an emptied document is deleted only if no store changed it since it
was emptied (compare-and-set on its ``rev``).  The store is simply ordered after the
delete.  A re-send of an instance at the instant it is deleted (its document replaced
or re-created between the selection and the delete) makes the batch rebuild its level
documents from their members instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bson import ObjectId

from archive.find import FIND_BATCH, fields_read, narrowest, projection, server_filter
from archive.gridstore import GridStore
from archive.journal import Journal, Unfinished
from archive.levels import HIERARCHY_PROJECTION, Levels, hierarchy_of
from archive.modification import HISTORY
from archive.query import evaluate

log = logging.getLogger(__name__)

#: Instances per journal entry (and per group of level updates).
BATCH = 1000
#: Journal keys of deletes start with this (those of stores are file ids).
KEY_PREFIX = "delete-"
KIND = "delete"


@dataclass
class Selection:
    """The instances a filter selects, counted by their series: what a delete takes."""

    instances: list[dict[str, Any]] = field(default_factory=list)
    #: selected but not yet counted by their series (a store in flight): left alone
    in_flight: int = 0
    #: rejected copies the filter selects (archive.rejection): a delete purges them
    rejected: list[dict[str, Any]] = field(default_factory=list)

    def studies(self) -> dict[str, dict[str, Any]]:
        """Per study: its patient, the series and the number of instances selected."""
        found: dict[str, dict[str, Any]] = {}
        for doc in self.instances:
            series, study, patient = hierarchy_of(doc)
            entry = found.setdefault(study, {"PatientID": patient, "series": set(),
                                             "instances": 0})
            entry["series"].add(series)
            entry["instances"] += 1
        return found

    def counts(self) -> dict[str, int]:
        """Instances, series, studies and patients selected, and the rejected copies
        purged with them when there are some."""
        counts = {"instances": len(self.instances),
                  "series": len({d["SeriesInstanceUID"] for d in self.instances}),
                  "studies": len({d["StudyInstanceUID"] for d in self.instances}),
                  "patients": len({d["PatientID"] for d in self.instances})}
        if self.rejected:
            counts["rejected"] = len(self.rejected)
        return counts


class DeleteIncomplete(Unfinished):
    """A delete stopped by a database failure: its journal entry finishes it later."""


class Deleter:
    """Deletes selected instances of one archive (see the module docstring)."""

    def __init__(self, levels: Levels, files: GridStore, journal: Journal,
                 active: set[str]) -> None:
        self.levels, self.files, self.journal = levels, files, journal
        #: journal keys of work running in this process (the archive's, shared)
        self.active = active

    def select(self, exact: dict[str, Any]) -> Selection:
        """The instances ``exact`` (a filter on instance documents) selects.

        ``exact`` comes from the caller's translation of keys: values are data, never
        operators (:func:`archive.query.pattern_filter`, ``unique_key_filter``).
        """
        fields = projection({*fields_read(exact), *HIERARCHY_PROJECTION})
        found = [doc for doc in self.levels.instances.find(
            narrowest(server_filter(exact)), fields, batch_size=FIND_BATCH)
            if evaluate(exact, doc)]
        selection = Selection()
        listed: dict[str, set[str]] = {}
        for doc in found:
            series = doc["SeriesInstanceUID"]
            if series not in listed:
                stored = self.levels.series.find_one({"_id": series}, {"instances": 1}) or {}
                listed[series] = set(stored.get("instances") or ())
            if doc["_id"] in listed[series]:
                selection.instances.append(doc)
            else:
                selection.in_flight += 1
        return selection

    def delete(self, instances: list[dict[str, Any]]) -> int:
        """Delete selected instances, batch by batch; how many were deleted.

        Raises DeleteIncomplete when the database fails: what was deleted stays
        deleted, the batch under way is finished by its journal entry's replay, the
        batches after it are not started.
        """
        done = 0
        for batch in _batches(instances):
            key = f"{KEY_PREFIX}{ObjectId()}"
            earlier = self._earlier_files(batch)
            entry = {"kind": KIND, "pid": os.getpid(),
                     "instances": [[d["_id"], str(d["file_id"]),
                                    [str(f) for f in earlier.get(d["_id"], [])]]
                                   for d in batch],
                     "hierarchies": [list(h) for h in dict.fromkeys(map(hierarchy_of, batch))]}
            self.active.add(key)
            try:
                self.journal.write(key, entry)
                self._apply(batch, earlier)
            except Exception as exc:
                log.error("delete of %d instances interrupted (%s: %s): the journal "
                          "finishes it when the database answers", len(batch),
                          type(exc).__name__, str(exc)[:200])
                raise DeleteIncomplete(f"{done} instances deleted, {len(batch)} being "
                                       f"deleted when the database failed: "
                                       f"{type(exc).__name__}") from exc
            finally:
                self.active.discard(key)
            self.journal.remove(key)
            done += len(batch)
        return done

    def _earlier_files(self, batch: list[dict[str, Any]]) -> dict[str, list[ObjectId]]:
        """The files of instances' earlier versions (originals of corrected instances,
        :mod:`archive.modification`): deleted with them."""
        found = self.levels.instances.find(
            {"_id": {"$in": [d["_id"] for d in batch]}, HISTORY: {"$exists": True}},
            {HISTORY: 1})
        return {doc["_id"]: [h["file_id"] for h in doc.get(HISTORY) or []] for doc in found}

    def _apply(self, batch: list[dict[str, Any]], earlier: dict[str, list[ObjectId]]
               ) -> None:
        sops = [d["_id"] for d in batch]
        file_ids = [d["file_id"] for d in batch]
        deleted = self.levels.instances.delete_many(
            {"_id": {"$in": sops}, "file_id": {"$in": file_ids}}).deleted_count
        again = list(self.levels.instances.find({"_id": {"$in": sops}}, HIERARCHY_PROJECTION))
        if deleted == len(batch) and not again:
            self.levels.remove(batch)
        else:  # replaced or re-sent meanwhile, or taken by another delete: rebuilt
            log.info("delete: %d of %d instances changed meanwhile; their level documents "
                     "are rebuilt", len(batch) - deleted + len(again), len(batch))
            self.levels.recompute(*map(hierarchy_of, batch), *map(hierarchy_of, again))
        remaining = {d["_id"] for d in again}  # a re-send carries the history over
        self.files.delete_many(file_ids + [f for sop, files in earlier.items()
                                           if sop not in remaining for f in files])

    def settle(self, entry: dict[str, Any]) -> list[tuple[str, str, str]]:
        """Finish an interrupted delete (journal replay): what is left of its instance
        documents and files deleted; the hierarchies whose level documents the caller
        then rebuilds."""
        listed = entry.get("instances", [])
        pairs = [(str(item[0]), ObjectId(item[1])) for item in listed]
        if pairs:
            self.levels.instances.delete_many({"_id": {"$in": [p[0] for p in pairs]},
                                               "file_id": {"$in": [p[1] for p in pairs]}})
            remaining = {d["_id"] for d in self.levels.instances.find(
                {"_id": {"$in": [p[0] for p in pairs]}}, {"_id": 1})}
            earlier = [ObjectId(f) for item in listed if len(item) > 2
                       and item[0] not in remaining for f in item[2]]
            self.files.delete_many([p[1] for p in pairs] + earlier)
        return [tuple(h) for h in entry.get("hierarchies", [])]  # type: ignore[misc]


def _batches(instances: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Up to BATCH instances each, study after study and series after series: the
    level documents of a study are updated once per batch, not once per series."""
    ordered = sorted(instances, key=lambda d: (d["StudyInstanceUID"], d["SeriesInstanceUID"]))
    for start in range(0, len(ordered), BATCH):
        yield ordered[start:start + BATCH]

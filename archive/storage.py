"""Storing an instance: original bytes in GridFS, metadata documents in MongoDB.

The instance document is the commit point.  Order of writes:

0. a journal entry naming what is about to be written (:mod:`archive.journal`);
1. the Part-10 bytes into GridFS (chunks, then the files document);
2. the instance document (insert; a re-send replaces the stored one by SOP Instance UID);
3. the series, study and patient documents (attributes, child lists, counters);
4. on replacement, the previous GridFS file is deleted;
5. the journal entry is removed, then the store is answered.

The Part-10 file is given as bytes or, for a dataset too large to hold in memory, as
the path of a file (a C-STORE received to disk, a file ``archive import`` reads): it is
then parsed with its large values left in the file (:data:`DEFER_SIZE`), checked whole
a window at a time and copied into GridFS one chunk at a time, with the same checks,
the same documents and the same GridFS file as from bytes.

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
document), a re-send moves what it contributes; an accepted conflict, a move out of a
mixed entity, a rollback and the journal replay rebuild the affected documents exactly
from their members (:meth:`Levels.recompute`), by navigation through the child lists
(lookups by ``_id``, cheap on every database) and with a compare-and-set on each
document's ``rev`` so that a rebuild never overwrites a concurrent store's update.
Nothing else rebuilds: a rebuild races with the increments of stores in flight, on
this node or another one sharing the database.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
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
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pymongo.database import Database
from pymongo.errors import ConnectionFailure, DuplicateKeyError, OperationFailure, PyMongoError

from archive import dicomjson, identifiers, model
from archive import part10 as part10_check
from archive.bulkwrite import InsertFailed
from archive.deletion import KIND as DELETE_KIND
from archive.deletion import Deleter, Selection
from archive.gridstore import CHUNK_SIZE, Description, GridStore, PendingFile
from archive.gridstore import ChunkWriteFailed as _ChunkWriteFailed
from archive.health import DatabaseHealth
from archive.journal import Journal, alive_elsewhere
from archive.levels import (
    HIERARCHY_PROJECTION,
    MODALITY_COUNTS,
    NO_INSTANCES,
    SOP_CLASS_COUNTS,
    Conflict,
    Levels,
    WriteBehind,
    attribute_hashes,
    from_field_key,
    hierarchy_of,
    json_string,
    normalised_fields,
)
from archive.model import IMAGE
from archive.modification import HISTORY, Modifier
from archive.modification import KIND as MODIFY_KIND
from archive.rejection import KINDS as REJECTION_KINDS
from archive.rejection import SUBSEQUENT_OCCURRENCE, Note, Rejecter, Rejection
from archive.rewrite import BadChange

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

#: A Part-10 file: its bytes, or the path of a file holding them (a large dataset).
Part10 = part10_check.Source
#: Values longer than this (bytes) stay in the file when a dataset is parsed from one:
#: Pixel Data and other bulk values are then never read into memory (see dicomjson).
DEFER_SIZE = 64 * 1024
assert DEFER_SIZE >= dicomjson.MIN_DEFER_SIZE
#: Meta group elements a file is named from before its dataset is parsed.
MEDIA_STORAGE_SOP_INSTANCE_UID, TRANSFER_SYNTAX_UID = 0x00020003, 0x00020010
#: What a meta group UID must be to name a file before the parse: a UID's characters
#: and length (PS3.5 9.1), nothing a file name or a log line could be abused with.
_PLAIN_UID = re.compile(r"[0-9.]{1,64}")


def part10_size(part10: Part10) -> int:
    """The file's length in bytes."""
    return part10.stat().st_size if isinstance(part10, Path) else len(part10)


def _read(part10: Part10) -> Dataset:
    """pydicom's dataset of the file; from a path, with large values left in the file.

    A deflated data set is read whole: pydicom inflates it in memory, and would look
    for deferred values in the compressed file.
    """
    if not isinstance(part10, Path):
        return dcmread(BytesIO(part10), force=False)
    deflated = part10_check.meta_syntax(part10) == DeflatedExplicitVRLittleEndian
    return dcmread(str(part10), force=False, defer_size=None if deflated else DEFER_SIZE)


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    comment: str = ""
    sop_instance_uid: str = ""
    replaced: bool = False

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


class Ahead:
    """A file's chunk (and files document, where its meta group names it) sent before
    its dataset was parsed (:meth:`Archive.send_ahead`): journaled, and held by this
    process until a store takes it or :meth:`release` takes it back."""

    def __init__(self, archive: Archive, key: str, entry: dict[str, Any],
                 pending: PendingFile) -> None:
        self.archive, self.key, self.entry, self.pending = archive, key, entry, pending
        self.taken = False

    def release(self) -> None:
        """Unless a store took it: the file waited for and deleted, the entry removed
        (left to the journal's replay if the database does not answer)."""
        if self.taken:
            return
        self.taken = True
        archive = self.archive
        try:
            self.pending.abandon()
            archive.files.delete(self.pending.file_id, self.pending.size)
            archive.journal.remove(self.key)
        except Exception as exc:  # noqa: BLE001 - the entry deletes it later
            log.warning("file sent ahead of a refused store not deleted yet: %s", exc)
        finally:
            archive._active.discard(self.key)


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


def ensure_indexes(db: Database, bucket: str = "fs") -> None:
    """The query indexes, and the two a GridFS bucket has for other tools (mongofiles,
    drivers' GridFS readers query chunks by ``{files_id, n}``)."""
    for collection, indexes in model.INDEXES.items():
        for keys in indexes:
            db[collection].create_index([(k, pymongo.ASCENDING) for k in keys])
    db[f"{bucket}.chunks"].create_index([("files_id", pymongo.ASCENDING),
                                         ("n", pymongo.ASCENDING)], unique=True)
    db[f"{bucket}.files"].create_index([("filename", pymongo.ASCENDING),
                                        ("uploadDate", pymongo.ASCENDING)])
    Rejecter.ensure_indexes(db)


# --- the archive -------------------------------------------------------------------


class Archive:
    """Storage operations shared by C-STORE, ``archive import`` and ``archive check``."""

    def __init__(self, db: Database, bucket: str = "fs", duplicate_policy: str = "replace",
                 journal: str | Path = "data/journal",
                 hierarchy_conflicts: str = "refuse",
                 health: DatabaseHealth | None = None, write_behind: float = 0.0) -> None:
        self.db = db
        self.health = health or DatabaseHealth(db)
        self.files = GridStore(db, bucket)
        self.policy = duplicate_policy
        #: the series, study and patient documents (and conflicts)
        self.levels = Levels(db, hierarchy_conflicts)
        self.journal = Journal(journal)
        #: Journal keys of the stores running in this process, or whose level updates
        #: wait in a batch (reconcile leaves them).
        self._active: set[str] = set()
        #: deletes (archive.deletion), journaled as stores are
        self.deleter = Deleter(self.levels, self.files, self.journal, self._active)
        #: rejections (archive.rejection): deletes that keep the files, until purged
        self.rejecter = Rejecter(db, self.levels, self.files, self.journal, self._active)
        #: corrections and restores (archive.modification), journaled as deletes are
        self.modifier = Modifier(self.levels, self.files, self.journal, self._active,
                                 self._index)
        #: Batched level updates of new instances (write_behind: seconds a batch may
        #: wait; 0: every store updates its level documents itself).
        self.batches = WriteBehind(self.levels, self._batch_written, self._batch_failed,
                                   linger=write_behind) if write_behind > 0 else None

    # The collections, one reference each (tests put failing stand-ins in their place).
    instances = property(lambda self: self.levels.instances,
                         lambda self, value: setattr(self.levels, "instances", value))
    series = property(lambda self: self.levels.series,
                      lambda self, value: setattr(self.levels, "series", value))
    studies = property(lambda self: self.levels.studies,
                       lambda self, value: setattr(self.levels, "studies", value))
    patients = property(lambda self: self.levels.patients,
                        lambda self, value: setattr(self.levels, "patients", value))

    # -- parsing ----------------------------------------------------------------------

    @staticmethod
    def parse(part10: Part10) -> Dataset:
        """Decode the metadata of a Part-10 file, refusing what cannot be stored.

        Refused with 0xC000: what pydicom cannot read, a file cut short (pydicom reads
        it without a word: :mod:`archive.part10` checks every declared length), a
        missing key UID, and key values that would corrupt the documents' keys
        (:mod:`archive.identifiers`).
        """
        ds: Dataset | None = None
        try:
            ds = _read(part10)
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

    def send_ahead(self, part10: Part10) -> Ahead | None:
        """The file's chunk sent now, with its files document named from the meta group
        (:func:`_described_by_meta`), for the database to write while the dataset is
        parsed; journaled first.  Where that helps only: a file in memory
        of one chunk, a database known to take ``bulkWrite`` (:mod:`archive.bulkwrite`).
        The caller gives it to :meth:`store` and releases it whatever happens."""
        inserter = self.files.inserter
        if not (isinstance(part10, bytes) and len(part10) <= CHUNK_SIZE
                and inserter.supported and inserter.sends_ahead and self.health.up):
            return None
        file_id = ObjectId()
        key = str(file_id)
        entry: dict[str, Any] = {"kind": "store", "pid": os.getpid(), "file_id": key,
                                 "length": len(part10)}
        self._active.add(key)
        try:
            self.journal.write(key, entry)  # no SOP Instance UID yet: see _settle
            pending = self.files.begin(part10, file_id, len(part10),
                                       described=_described_by_meta(part10))
        except Exception:  # noqa: BLE001 - nothing sent: the store does it all
            self.journal.remove(key)
            self._active.discard(key)
            return None
        if pending.sent.answer is None:  # not sent after all (the connection): if part
            self._active.discard(key)    # of it went, the entry's replay deletes it
            return None
        return Ahead(self, key, entry, pending)

    def store(self, part10: Part10, source: str = "", ds: Dataset | None = None,
              admit: Admit | None = None, ahead: Ahead | None = None) -> StoreOutcome:
        """Store one Part-10 file; the outcome's status is what C-STORE answers.

        ``admit`` judges what the store would replace or join before anything is
        written (see :class:`Existing`).  ``ahead``: the file's chunk already sent
        (:meth:`send_ahead`), taken by the store once it is admitted.
        """
        try:
            ds = ds if ds is not None else self.parse(part10)
        except StoreRefused as exc:
            return StoreOutcome(exc.status, exc.comment)
        sop_uid = str(ds.SOPInstanceUID).strip()
        if not self.health.up:  # refused at once, not after the driver's timeouts
            return StoreOutcome(OUT_OF_RESOURCES, "database unavailable", sop_uid)
        try:
            return self._store(part10, ds, sop_uid, source, admit, ahead)
        except StoreRefused as exc:
            return StoreOutcome(exc.status, exc.comment, sop_uid)
        except Conflict as exc:  # taken back already
            return StoreOutcome(HIERARCHY_CONFLICT, str(exc), sop_uid)
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
                        self.series.find_one({"_id": series_uid}, NO_INSTANCES),
                        self.studies.find_one({"_id": study_uid}))

    def _store(self, part10: Part10, ds: Dataset, sop_uid: str, source: str,
               admit: Admit | None, ahead: Ahead | None = None) -> StoreOutcome:
        if admit is not None:
            admit(self.existing(ds, sop_uid))
        rejected = self.rejecter.rejection_of(sop_uid)
        if rejected is not None:  # until purged (dcm4chee-arc answers the same)
            raise StoreRefused(SUBSEQUENT_OCCURRENCE, f"subsequent occurrence of rejected "
                               f"object ({rejected.get('code', '?')})")
        size = part10_size(part10)
        syntax = _transfer_syntax(ds)
        # Journaled before anything is written.  The entry on disk has no hierarchy
        # (the file is sent before the dataset is converted), nor, when the chunk went
        # before the parse, the SOP Instance UID: a replay reads them from the instance
        # document, if there is one (_settle).
        pending: PendingFile | None = None
        if ahead is not None:  # the chunk went before the parse: this store's now
            ahead.taken = True  # (its entry on disk names no instance: see _settle)
            key, entry, pending = ahead.key, ahead.entry, ahead.pending
            entry["sop"] = sop_uid
        else:
            key = str(ObjectId())
            entry = {"kind": "store", "pid": os.getpid(), "sop": sop_uid, "file_id": key,
                     "length": size}
            self._active.add(key)
        file_id = ObjectId(key)
        batched = False
        try:
            if pending is None:
                self.journal.write(key, entry)
            try:
                try:
                    if pending is None:
                        pending = self.files.begin(part10, file_id, size)
                    pending.describe(*_description(sop_uid, syntax))
                except _ChunkWriteFailed as exc:
                    raise exc.cause from None
                data = dicomjson.to_json(ds, file_id)  # while the database writes the file
                doc = self.instance_document(data, file_id, syntax, size, source)
                entry["hierarchy"] = list(hierarchy_of(doc))
                outcome, batched = self._write(pending, doc, data, entry)
                return outcome
            except BaseException as exc:
                if pending is not None:
                    pending.abandon()  # the file's writes over before they are undone
                self._undo(entry, exc)
                raise
        finally:
            if not batched:  # else the batch's writer finishes the entry
                self._active.discard(key)

    def _write(self, pending: PendingFile, doc: dict[str, Any], data: dict[str, Any],
               entry: dict[str, Any]) -> tuple[StoreOutcome, bool]:
        """Steps 1 to 5; an exception leaves the undo to the caller (the entry says what).

        Also answers whether the level updates went into a batch (the entry stays until
        the batch is written)."""
        sop_uid, file_id = doc["_id"], doc["file_id"]
        try:  # the file whole (it appears), then the new instance
            pending.finish(then=[(self.instances, doc)])
            previous = None
        except _ChunkWriteFailed as exc:
            raise exc.cause from None
        except InsertFailed as exc:
            if not isinstance(exc.cause, DuplicateKeyError):
                raise exc.cause from None
            if self.policy != "replace":
                self._discard(entry)
                if self.policy == "reject":
                    return StoreOutcome(DUPLICATE_SOP_INSTANCE, "SOP Instance already stored",
                                        sop_uid), False
                return StoreOutcome(SUCCESS, "already stored, kept", sop_uid), False
            previous = self._replace(doc, entry)
        batches, opened = self.batches, False
        if batches is not None:
            if previous is None and batches.take(doc, data, entry["file_id"]):
                return StoreOutcome(SUCCESS, "", sop_uid), True
            if previous is not None or not batches.agrees(doc):
                batches.flush()  # what was batched before is written before this one

        def defer(created: bool) -> bool:  # a new series of a known study: see open
            nonlocal opened
            assert batches is not None
            opened = batches.open(doc, data, entry["file_id"], created)
            return opened

        rebuild = self.levels.fold(doc, data, previous, defer if (
            batches is not None and previous is None and batches.opens(doc)) else None)
        if opened:
            return StoreOutcome(SUCCESS, "", sop_uid), True
        if self.batches is not None:
            if previous is None and not rebuild:
                self.batches.learn(doc)
            else:  # a re-send or a rebuild may delete or change level documents
                self.batches.forget()
        # A store still running here, or whose batch waits, counts its instance itself
        # (as one on another node does): only one whose undo waits in the journal
        # leaves the level documents to a rebuild.
        unfinished = (self.journal.read(str(previous["file_id"]))
                      if previous and str(previous["file_id"]) not in self._active else None)
        if unfinished is not None:
            # it replaced a store still unfinished (its undo waits in the journal): the
            # level documents may count the instance where that store found it
            rebuild += [hierarchy_of(previous), hierarchy_of(doc),
                        *(tuple(unfinished[k]) for k in ("hierarchy", "previous_hierarchy")
                          if unfinished.get(k))]
        elif previous is not None and hierarchy_of(previous) != hierarchy_of(doc):
            if previous["PatientID"] != doc["PatientID"]:  # an accepted conflict
                rebuild += [hierarchy_of(previous), hierarchy_of(doc)]
            else:
                self.levels.leave(previous, hierarchy_of(doc))
        if rebuild:
            # rebuilds read the instances: unfinished stores are settled first
            self.reconcile()
            self._recompute(*rebuild, extra_instances=[sop_uid])
        outcome = StoreOutcome(SUCCESS, "", sop_uid, replaced=previous is not None)
        if previous is not None and previous["file_id"] != file_id:
            try:
                self.files.delete(previous["file_id"])
            except PyMongoError as exc:  # stored: the journal entry deletes it later
                log.warning("replaced file of %s not deleted yet: %s", sop_uid, exc)
                return outcome, False
        self.journal.remove(entry["file_id"])
        return outcome, False

    # -- delete -------------------------------------------------------------------------

    def select(self, exact: dict[str, Any], rejected: bool = False) -> Selection:
        """The instances a delete of ``exact`` (a filter on instance documents) takes;
        with ``rejected``, the rejected copies it purges too (:mod:`archive.deletion`).

        What this process acknowledged is counted first, so that it is taken: its
        batched level updates are written, and the journal replayed if some were not
        (a batch fails when a delete emptied its series meanwhile)."""
        self.flush()
        if self.pending():
            self.reconcile()
        selection = self.deleter.select(exact)
        if rejected:
            selection.rejected = self.rejecter.select(exact)
        return selection

    def delete(self, instances: list[dict[str, Any]],
               rejected: list[dict[str, Any]] | None = None) -> int:
        """Delete selected instances (:mod:`archive.deletion`), after purging the
        ``rejected`` copies selected with them; how many instances.  Raises
        DeleteIncomplete when the database fails (the journal finishes the delete);
        PyMongoError when it fails during the purge (the journal finishes the purge, no
        instance is deleted yet)."""
        try:
            if rejected:
                self.rejecter.purge(rejected)
            return self.deleter.delete(instances)
        finally:
            if self.batches is not None:  # level documents may be gone: learn again
                self.batches.forget()

    def store_note(self, note: Note, may_delete: dict[str, Any] | None, by: str,
                   part10: Part10, source: str, ds: Dataset, admit: Admit | None
                   ) -> tuple[StoreOutcome, Rejection | None]:
        """Store a rejection note and reject what it references, both or neither
        (:meth:`Rejecter.store_note`; raises rejection.Refused, PyMongoError)."""
        self.flush()  # what this process acknowledged is counted: it can be judged
        try:
            return self.rejecter.store_note(
                note, may_delete, by, lambda: self.store(part10, source=source, ds=ds,
                                                         admit=admit))
        finally:
            if self.batches is not None:  # level documents may be gone: learn again
                self.batches.forget()


    # -- modify -------------------------------------------------------------------------

    def modify(self, instances: list[dict[str, Any]], changes: dict[int, Any], by: str,
               reason: str, system: str) -> tuple[int, int, int]:
        """Correct selected instances (:mod:`archive.modification`); (corrected, left as
        re-sent meanwhile, left as they have these values already).  Raises BadChange
        before anything of a batch changed, and ModifyIncomplete when the database
        fails (the journal finishes the batch)."""
        try:
            return self.modifier.modify(instances, changes, by, reason, system)
        finally:
            if self.batches is not None:  # level documents moved: learn again
                self.batches.forget()

    def restore(self, instances: list[dict[str, Any]]) -> tuple[int, int, int]:
        """Make corrected instances their originals again (:mod:`archive.modification`)."""
        try:
            return self.modifier.restore(instances)
        finally:
            if self.batches is not None:
                self.batches.forget()

    def _index(self, path: Path, file_id: ObjectId, source: str
               ) -> tuple[dict[str, Any], dict[str, Any], Dataset]:
        """The instance document a store of this file under ``file_id`` would write;
        BadChange when a store would refuse it (a corrected key value it cannot hold)."""
        try:
            ds = self.parse(path)
        except StoreRefused as exc:
            raise BadChange(exc.comment) from None
        data = dicomjson.to_json(ds, file_id)
        return (self.instance_document(data, file_id, _transfer_syntax(ds),
                                       path.stat().st_size, source), data, ds)

    # -- batched level updates ----------------------------------------------------------

    def flush(self) -> None:
        """Write the batched level updates: the barrier before reading level documents."""
        if self.batches is not None:
            self.batches.flush()

    def start(self) -> None:
        """Write batches in the background (a node; a one-shot command flushes at close)."""
        if self.batches is not None:
            self.batches.start()

    def close(self) -> None:
        """Write what is batched and stop the background writer."""
        if self.batches is not None:
            self.batches.stop()

    def _batch_written(self, keys: list[str]) -> None:
        for key in keys:
            self.journal.remove(key)
            self._active.discard(key)

    def _batch_failed(self, keys: list[str]) -> None:
        log.warning("batched level updates of %d instances not written: the journal "
                    "rebuilds them", len(keys))
        for key in keys:
            self._active.discard(key)  # reconcile finishes them

    def _discard(self, entry: dict[str, Any]) -> None:
        """The file of a store that ends without indexing it (duplicate kept/refused)."""
        self.files.delete(ObjectId(entry["file_id"]), entry["length"])
        self.journal.remove(entry["file_id"])

    def _replace(self, doc: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any] | None:
        """Replace a stored instance document; the one replaced (None if it vanished)."""
        # Read first what an undo needs should the replace be applied but its reply be
        # lost: find_one_and_replace's answer would then never reach us.
        prior = self.instances.find_one({"_id": doc["_id"]},
                                        {**HIERARCHY_PROJECTION, HISTORY: 1})
        if prior is not None:
            if prior.get(HISTORY):  # a corrected instance sent again: originals kept
                doc[HISTORY] = prior[HISTORY]
            self.levels.check_patient(prior["PatientID"], doc["PatientID"], "SOP Instance UID")
            entry["previous_file_id"] = str(prior["file_id"])
            entry["previous_hierarchy"] = list(hierarchy_of(prior))
            self.journal.write(entry["file_id"], entry)
        # (no projection: FerretDB 1.24 does not implement findAndModify "fields")
        return self.instances.find_one_and_replace(
            {"_id": doc["_id"]}, doc, upsert=True, return_document=pymongo.ReturnDocument.BEFORE)

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

    # -- failures ---------------------------------------------------------------------

    def _undo(self, entry: dict[str, Any], cause: BaseException) -> None:
        """Take back a failed store now, or leave its journal entry for :meth:`reconcile`.

        When the failure was the connection and the database does not answer a short
        ping, the undo is left to the journal at once: trying it would only wait out the
        same timeout again, for every store of an outage.  Otherwise the journal is
        replayed, this entry with the others it holds: an instance document that an
        earlier unfinished store left must not be counted by this undo's rebuilds.
        """
        entry["kind"] = "undo"
        try:
            self.journal.write(entry["file_id"], entry)
        except OSError as exc:  # the journal folder is unusable: try the undo anyway
            log.error("journal entry of %s not written: %s", entry.get("sop"), exc)
        if isinstance(cause, ConnectionFailure) and not self.health.check():
            log.warning("rollback of %s deferred to the journal: %s", entry.get("sop"), cause)
            return
        written = self.journal.read(entry["file_id"]) is not None
        try:
            if written:  # with whatever else the journal holds, newest first
                self._active.discard(entry["file_id"])
                self.reconcile()
            else:
                self._resolve(entry)
        except PyMongoError as exc:
            log.warning("rollback of %s deferred to the journal: %s", entry.get("sop"), exc)

    def pending(self) -> bool:
        """Whether unfinished work of past stores waits in the journal."""
        return any(key not in self._active for key, _ in self.journal.entries())

    def reconcile(self) -> int:
        """Finish the work of stores (and deletes) the journal names, once the database
        answers.

        ``store`` (the node died during the store): if its instance document was
        written, the store is completed (level documents rebuilt, a replaced file
        deleted), else taken back.  ``undo`` (the store was answered with a failure):
        taken back -- its instance document and file deleted, the previous version, if
        there was one, indexed again from its own original, the level documents rebuilt.
        ``delete``: finished (:meth:`Deleter.settle`), the level documents rebuilt.
        ``reject`` / ``purge``: finished, or a rejection whose note was never stored
        dropped (:meth:`Rejecter.settle`).
        Entries of stores still running (in this process, or another live one) are left.
        Raises PyMongoError, keeping the journal, while the database is unreachable.
        """
        entries = [(key, entry) for key, entry in self.journal.entries()
                   if key not in self._active and not alive_elsewhere(entry.get("pid"))]
        if not entries:
            return 0
        if self.batches is not None:
            self.batches.forget()
        hierarchies: list[tuple[str, str, str]] = []
        for _, entry in reversed(entries):  # newest first: each undo reveals the older state
            hierarchies += self._settle(entry)
        # then the level documents once, over the instances as they now are
        # (the members a store or a correction may have left out of every child list)
        extra = [e["sop"] for _, e in entries if "sop" in e] + [
            item["sop"] for _, e in entries if e.get("kind") == MODIFY_KIND
            for item in e.get("instances", [])]
        self._recompute(*hierarchies, extra_instances=extra)
        for key, _ in entries:
            self.journal.remove(key)
        log.info("journal replayed: %d entries", len(entries))
        return len(entries)

    def _resolve(self, entry: dict[str, Any]) -> None:
        """Bring the archive to the state the entry's store should leave (see reconcile)."""
        self._recompute(*self._settle(entry), extra_instances=[entry["sop"]])

    def _recompute(self, *hierarchies: tuple[str, str, str],
                   extra_instances: list[str]) -> None:
        """Level documents rebuilt from their members, this node's batches written
        first: a store starting a series does not wait for them (:meth:`_write`), and
        a rebuild between a batch's series update and its study update would count the
        batch twice."""
        self.flush()
        self.levels.recompute(*hierarchies, extra_instances=extra_instances)

    def _settle(self, entry: dict[str, Any]) -> list[tuple[str, str, str]]:
        """The instance and files as the entry's store should leave them (a delete's:
        all deleted, :meth:`Deleter.settle`); the hierarchies whose level documents
        must then be rebuilt."""
        if entry.get("kind") == DELETE_KIND:
            return self.deleter.settle(entry)
        if entry.get("kind") in REJECTION_KINDS:
            return self.rejecter.settle(entry)
        if entry.get("kind") == MODIFY_KIND:
            return self.modifier.settle(entry)
        file_id = ObjectId(entry["file_id"])
        if "sop" in entry:
            current = self.instances.find_one({"_id": entry["sop"]}, HIERARCHY_PROJECTION)
        else:  # journaled before the parse: its instance document, if any, by its file
            current = self.instances.find_one({"file_id": file_id}, HIERARCHY_PROJECTION)
            if current is None:
                self.files.delete(file_id, entry.get("length"))
                return []
            entry["sop"] = current["_id"]  # (reconcile counts it among the members)
        sop = entry["sop"]
        committed = current is not None and current["file_id"] == file_id
        hierarchies = [tuple(entry[k]) for k in ("hierarchy", "previous_hierarchy")
                       if entry.get(k)]
        if committed and not entry.get("hierarchy"):  # journaled before its conversion
            hierarchies.append(hierarchy_of(current))
        if entry["kind"] == "undo" and committed:
            self.instances.delete_one({"_id": sop})
            current, committed = None, False
        previous = entry.get("previous_file_id")
        if committed:
            if previous and ObjectId(previous) != file_id:
                self.files.delete(ObjectId(previous))
        else:
            if current is None and previous and self.files.exists(ObjectId(previous)):
                hierarchies.append(self._reindex(ObjectId(previous)))
            elif current is not None and previous and current["file_id"] != ObjectId(previous):
                # a later store replaced the instance since: the version this one would
                # have restored belongs to nothing now (a file holds one instance)
                self.files.delete(ObjectId(previous))
            self.files.delete(file_id, entry.get("length"))
        return hierarchies  # type: ignore[return-value]

    def _reindex(self, file_id: ObjectId) -> tuple[str, str, str]:
        """Index an original already in GridFS again (its metadata was lost); its
        hierarchy, whose level documents the caller rebuilds."""
        part10 = self.files.read(file_id)
        ds = self.parse(part10)
        data = dicomjson.to_json(ds, file_id)
        doc = self.instance_document(data, file_id, _transfer_syntax(ds), len(part10),
                                     "reindex")
        self.instances.replace_one({"_id": doc["_id"]}, doc, upsert=True)
        return hierarchy_of(doc)

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


def _description(sop_uid: str, syntax: str) -> Description:
    """The name and metadata of an instance's GridFS file."""
    return f"{sop_uid}.dcm", {"SOPInstanceUID": sop_uid, "TransferSyntaxUID": syntax}


def _described_by_meta(part10: bytes) -> Description | None:
    """:func:`_description` from the meta group's Media Storage SOP Instance UID
    and Transfer Syntax UID (what a C-STORE request names), for the files document to
    go with the chunk before the dataset is parsed; the store renames the file if the
    dataset says otherwise.  None unless both are plain UIDs."""
    uids = part10_check.meta_uids(part10, MEDIA_STORAGE_SOP_INSTANCE_UID, TRANSFER_SYNTAX_UID)
    sop, syntax = uids.get(MEDIA_STORAGE_SOP_INSTANCE_UID, ""), uids.get(TRANSFER_SYNTAX_UID, "")
    if not (_PLAIN_UID.fullmatch(sop) and _PLAIN_UID.fullmatch(syntax)):
        return None
    return _description(sop, syntax)


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


def _refuse_if_incomplete(part10: Part10, ds: Dataset | None) -> None:
    """A file pydicom failed on because it is cut short is refused as truncated."""
    if ds is None:
        try:
            part10_check.check(part10, None)
        except part10_check.Incomplete as exc:
            raise StoreRefused(CANNOT_UNDERSTAND, str(exc)[:64]) from None

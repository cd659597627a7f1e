"""Storage commitment: which referenced instances the archive holds safely (PS3.4 J.3).

A modality asks whether the instances it sent are kept; the archive commits to an
instance only when its instance document exists (the commit point of a store, see
:mod:`archive.storage`) with the SOP class the modality names, and its original is
whole in GridFS: the files document exists with the length the instance document
recorded, and every chunk is there with the bytes that length needs.  The archive
keeps no checksum of the original, so "the bytes match" means the stored length, read
back chunk by chunk.

:func:`judge` and :func:`files_to_check` are pure: which references are committed and
the reason of each failure, from the documents found, what the requester may see and
which files are whole.  :func:`verify` reads the database around them.  An instance the
requester may not see is answered exactly as one that does not exist (its file is not
even read), so the report tells her nothing about what is hidden.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pymongo.errors import PyMongoError

from archive.find import fields_read, projection
from archive.query import evaluate
from archive.storage import Archive

# Failure Reason (0008,1197) values (PS3.4 J.3.3.2, PS3.7 C).
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
SOP_CLASS_NOT_SUPPORTED = 0x0122

#: Instance documents looked up per query (a request may name tens of thousands).
LOOKUP_BATCH = 500
#: What a check reads of an instance document (besides what a restriction reads).
_FIELDS = ("SOPClassUID", "file_id", "size")


@dataclass(frozen=True, slots=True)
class Reference:
    """One item of the Referenced SOP Sequence: what the modality asks about."""

    sop_class: str
    sop_instance: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """A reference and the archive's answer: ``reason`` None when committed, else the
    Failure Reason."""

    reference: Reference
    reason: int | None = None

    @property
    def committed(self) -> bool:
        return self.reason is None


def unique(references: Iterable[Reference]) -> list[Reference]:
    """The references in order, each once (a modality may repeat one)."""
    return list(dict.fromkeys(references))


def _candidate(reference: Reference, documents: Mapping[str, Mapping[str, Any]],
               visible: Callable[[Mapping[str, Any]], bool]) -> Mapping[str, Any] | None:
    """The document of a visible instance of the referenced class, else None."""
    doc = documents.get(reference.sop_instance)
    if doc is None or not visible(doc):
        return None
    return doc if str(doc.get("SOPClassUID", "")) == reference.sop_class else None


def files_to_check(references: Iterable[Reference],
                   documents: Mapping[str, Mapping[str, Any]],
                   visible: Callable[[Mapping[str, Any]], bool]) -> dict[Any, int]:
    """The files whose integrity decides: those of visible instances of the referenced
    class, with the length their instance document recorded (never a hidden one's)."""
    files: dict[Any, int] = {}
    for reference in references:
        doc = _candidate(reference, documents, visible)
        if doc is not None and doc.get("file_id") is not None:
            files[doc["file_id"]] = int(doc.get("size") or 0)
    return files


def judge(references: Sequence[Reference], documents: Mapping[str, Mapping[str, Any]],
          visible: Callable[[Mapping[str, Any]], bool], whole: Collection[Any],
          supported: Callable[[str], bool]) -> list[Verdict]:
    """One verdict per reference, in order.

    - not found, or hidden from the requester: 0x0122 when the archive does not take
      its SOP class at all, else 0x0112 (no such object instance) -- decided from the
      reference alone, so hidden and absent instances get the same answer;
    - found with another SOP class: 0x0119 (class / instance conflict);
    - its file missing, short or with chunks missing (not in ``whole``): 0x0110;
    - otherwise committed.
    """
    verdicts = []
    for reference in references:
        doc = documents.get(reference.sop_instance)
        if doc is None or not visible(doc):
            reason: int | None = NO_SUCH_OBJECT_INSTANCE if supported(reference.sop_class) \
                else SOP_CLASS_NOT_SUPPORTED
        elif str(doc.get("SOPClassUID", "")) != reference.sop_class:
            reason = CLASS_INSTANCE_CONFLICT
        elif doc.get("file_id") is None or doc["file_id"] not in whole:
            reason = PROCESSING_FAILURE
        else:
            reason = None
        verdicts.append(Verdict(reference, reason))
    return verdicts


def whole_files(archive: Archive, files: Mapping[Any, int]) -> set[Any]:
    """The files that are whole: every chunk there, their bytes the recorded length.

    Read in batches (:meth:`archive.gridstore.GridStore.stream_many`): one query per
    64 files documents, one for the chunks of the small ones; a large file one chunk
    at a time.
    """
    whole = set()
    for file_id, chunks in archive.files.stream_many(files):
        try:
            length = sum(len(chunk) for chunk in chunks)
        except FileNotFoundError:
            continue
        if length == files[file_id]:
            whole.add(file_id)
    return whole


def verify(archive: Archive, references: Sequence[Reference],
           restriction: Mapping[str, Any] | None, supported: Callable[[str], bool],
           ) -> list[Verdict]:
    """The verdicts of ``references`` (each once) for a requester restricted to the
    instance documents ``restriction`` matches (None: all).

    A database failure makes every reference not yet decided a processing failure
    (0x0110): the modality may ask again.
    """
    references = unique(references)
    fields = set(_FIELDS) | (fields_read(restriction) if restriction else set())
    uids = list(dict.fromkeys(r.sop_instance for r in references))
    try:
        documents = {doc["_id"]: doc
                     for start in range(0, len(uids), LOOKUP_BATCH)
                     for doc in archive.instances.find(
                         {"_id": {"$in": uids[start:start + LOOKUP_BATCH]}},
                         projection(fields))}

        def visible(doc: Mapping[str, Any]) -> bool:
            return restriction is None or evaluate(restriction, doc)

        whole = whole_files(archive, files_to_check(references, documents, visible))
    except PyMongoError as exc:
        archive.health.suspect(exc)
        return [Verdict(r, PROCESSING_FAILURE) for r in references]
    return judge(references, documents, visible, whole, supported)

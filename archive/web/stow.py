"""STOW-RS (PS3.18 10.5): each part of a ``multipart/related; type="application/dicom"``
request stored through the path of C-STORE.

Every part is judged and stored as a C-STORE dataset is, by the same core function
(:meth:`archive.context.Context.store_as`): the Store rule (:func:`acl.rules.admit_store`
for a restricted principal: the dataset, and what it would replace or join, must match
a Store pattern), :meth:`archive.storage.Archive.store` (parse checks, journal, GridFS,
duplicate policy, hierarchy conflicts), counted in flight (``begin_store`` /
``end_store``) so that a stop lets it finish; a part of another study than the
request's path is refused before it is stored.  Each part's
outcome is its C-STORE status: success goes to ReferencedSOPSequence, anything else to
FailedSOPSequence with that status as Failure Reason (0xC000 cannot understand, 0xA700
out of resources, 0x0124 not authorized, 0xC409 hierarchy conflict, 0x0111 duplicate).

Memory is bounded: a part is held in memory up to ``receive.in_memory_max_mb``, then
written to a file of ``receive.folder`` as it arrives (named like the DICOM front end's
``recv-<pid>-*.dcm``, so what a crash leaves is deleted at the next start) and stored
from that file, a chunk at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import Dataset

from acl.rules import Decision, Rule
from archive.context import Context
from archive.rejection import Rejection
from archive.storage import CANNOT_UNDERSTAND, Part10, StoreOutcome

log = logging.getLogger("archive.web.stow")

#: Source recorded in instance documents stored over HTTP (C-STORE: the calling AE).
SOURCE = "STOW-RS"
#: Failure Reason of a part whose Study Instance UID is not the one of the request's
#: path (PS3.18 10.5.3.2: Referenced SOP Instance is not in the target study).
STUDY_MISMATCH = 0xA900

PREFIX, SUFFIX = "recv-", ".dcm"

_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_CLASS, _INSTANCE, _URL = "00081150", "00081155", "00081190"
_FAILURE_REASON, _WARNING_REASON = "00081197", "00081196"


class Spool:
    """One part's bytes: memory up to ``limit``, then a file of ``folder``."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder, self.limit = folder, limit
        self.size = 0
        self._memory: BytesIO | None = BytesIO()
        self._file: BinaryIO | None = None
        self.path: Path | None = None

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._memory is not None:
            if self._memory.tell() + len(data) <= self.limit:
                self._memory.write(data)
                return
            self._spill()
        assert self._file is not None
        self._file.write(data)

    def _spill(self) -> None:
        assert self._memory is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}{SUFFIX}"
        self.path = self.folder / name
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb")
        self._file.write(self._memory.getbuffer())
        self._memory = None

    def part10(self) -> Part10:
        """The bytes, or the path of the (closed) file holding them."""
        if self._memory is not None:
            return self._memory.getvalue()
        assert self._file is not None and self.path is not None
        self._file.close()
        return self.path

    def discard(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._memory = None


@dataclass
class Result:
    """One part's outcome."""

    status: int
    comment: str = ""
    sop_class: str = ""
    sop_instance: str = ""
    study: str = ""
    series: str = ""
    rule: Rule | None = None
    #: a rejection note stored: what it rejected (archive.rejection)
    rejection: Rejection | None = None

    @property
    def ok(self) -> bool:
        return self.status == 0 or 0xB000 <= self.status <= 0xBFFF


def _uid(ds: Dataset | None, keyword: str) -> str:
    try:
        return str(ds.get(keyword, "") or "").strip() if ds is not None else ""
    except Exception:  # noqa: BLE001 - a value pydicom cannot decode
        return ""


def store(context: Context, decision: Decision, part10: Part10, study: str | None,
          source: str = SOURCE) -> Result:
    """Store one part as C-STORE would (runs in a worker thread: it blocks); the
    console stores the rejection notes it makes this way too."""

    def same_study(ds: Dataset) -> StoreOutcome | None:
        if study is not None and _uid(ds, "StudyInstanceUID") != study:
            return StoreOutcome(STUDY_MISMATCH,
                                "Study Instance UID is not the study of the request")
        return None

    stored = context.store_as(decision, part10, source, same_study)
    if stored.error is not None:
        log.error("STOW-RS: unexpected error storing a part", exc_info=stored.error)
    ds, outcome = stored.ds, stored.outcome
    return Result(outcome.status, outcome.comment, _uid(ds, "SOPClassUID"),
                  _uid(ds, "SOPInstanceUID"), _uid(ds, "StudyInstanceUID"),
                  _uid(ds, "SeriesInstanceUID"), stored.rule, stored.rejection)


def not_dicom(content_type: str) -> Result:
    """The outcome of a part that is not ``application/dicom``."""
    return Result(CANNOT_UNDERSTAND, f"part of type {content_type[:40]!r}, not "
                  "application/dicom")


def response(results: list[Result], base_url: str, study: str | None) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 10.5.3.2) as DICOM JSON."""
    body: dict[str, Any] = {}
    studies = {r.study for r in results if r.ok and r.study}
    target = study or (next(iter(studies)) if len(studies) == 1 else None)
    if target:
        body[_URL] = {"vr": "UR", "Value": [f"{base_url}/studies/{target}"]}
    referenced, failed = [], []
    for r in results:
        item: dict[str, Any] = {}
        if r.sop_class:
            item[_CLASS] = {"vr": "UI", "Value": [r.sop_class]}
        if r.sop_instance:
            item[_INSTANCE] = {"vr": "UI", "Value": [r.sop_instance]}
        if r.ok:
            item[_URL] = {"vr": "UR", "Value": [
                f"{base_url}/studies/{r.study}/series/{r.series}/instances/{r.sop_instance}"]}
            if r.status:
                item[_WARNING_REASON] = {"vr": "US", "Value": [r.status]}
            referenced.append(dict(sorted(item.items())))
        else:
            item[_FAILURE_REASON] = {"vr": "US", "Value": [r.status]}
            failed.append(dict(sorted(item.items())))
    if failed:
        body[_FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
    if referenced:
        body[_REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": referenced}
    return dict(sorted(body.items()))


def status_code(results: list[Result]) -> int:
    """200 all stored, 202 some, 409 none (PS3.18 Table 10.5.3-1)."""
    stored = sum(r.ok for r in results)
    if stored == len(results):
        return 200
    return 202 if stored else 409

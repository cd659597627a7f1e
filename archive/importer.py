"""``archive import``: files and folders into the archive through the C-STORE checks.

What becomes of each path, one :class:`Result` each:

- **stored**: a DICOM file the archive accepted (as C-STORE would have);
- **skipped**: a file found *in a folder* that is not DICOM (a README, an empty file):
  folders hold such files, so this is no failure;
- **failed**: a path that does not exist, a broken symbolic link, a file or folder that
  cannot be read, a file *named on the command line* that is not DICOM, a DICOM file the
  archive refuses (cut short, a key UID missing, a hierarchy conflict...: the status
  C-STORE would answer), a store that failed.

Bare datasets (no preamble, no meta group; older tools write them) are wrapped in a
Part-10 header in the encoding they were read with.  So is a file with the ``DICM``
preamble whose meta group names no Transfer Syntax UID (none at all, or one without
(0002,0010)): its dataset is read as a bare one, never stored without a transfer syntax.

A file larger than ``receive.in_memory_max_mb`` whose meta group names its transfer
syntax is stored from its path, as a large C-STORE is (never read whole: see
:mod:`archive.storage`); a bare one is read whole to be wrapped.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pymongo.errors import PyMongoError

from archive import rejection
from archive.part10 import Incomplete, check_bare, meta_end, meta_syntax
from archive.storage import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    Archive,
    Part10,
    StoreOutcome,
    StoreRefused,
)

STORED, SKIPPED, FAILED = "stored", "skipped", "failed"


class NotDicom(Exception):
    """The file is not DICOM at all (skipped in a folder, failed when named)."""


@dataclass(frozen=True)
class Candidate:
    """A path to import: ``named`` on the command line or found in a folder, and
    ``problem`` when it cannot even be read."""

    path: Path
    named: bool
    problem: str = ""


@dataclass(frozen=True)
class Result:
    """What became of one path."""

    path: str
    outcome: str  # STORED, SKIPPED or FAILED
    reason: str = ""
    sop_instance_uid: str = ""
    status: int | None = None  # the C-STORE status the archive answered, if it judged

    def line(self) -> str:
        return f"{self.outcome} {self.path}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = None if self.status is None else f"0x{self.status:04X}"
        return data


# --- which files ------------------------------------------------------------------------


def walk(paths: Iterable[str]) -> Iterator[Candidate]:
    """Every file the paths name, folders walked in name order.

    Symbolic links are followed, to folders too, each folder once (a link back up
    cannot loop); a broken one is a failure, never dropped.
    """
    seen: set[tuple[int, int]] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from _folder(path, seen, named=True)
        else:
            yield _entry(path, named=True)


def _entry(path: Path, named: bool) -> Candidate:
    if path.is_symlink() and not path.exists():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return Candidate(path, named, f"broken symbolic link to {target}")
    if not path.exists():
        return Candidate(path, named, "no such file or directory")
    if not path.is_file():
        return Candidate(path, named, "not a regular file")
    return Candidate(path, named)


def _folder(folder: Path, seen: set[tuple[int, int]], named: bool) -> Iterator[Candidate]:
    try:
        stat = folder.stat()
        if (stat.st_dev, stat.st_ino) in seen:
            return
        seen.add((stat.st_dev, stat.st_ino))
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as exc:
        yield Candidate(folder, named, f"cannot list the folder: {exc.strerror or exc}")
        return
    for entry in entries:
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir()  # through a symbolic link too
        except OSError:
            is_dir = False
        if is_dir:
            yield from _folder(path, seen, named=False)
        else:
            yield _entry(path, named=False)


# --- reading ----------------------------------------------------------------------------


def read_part10(path: Path, in_memory_max_bytes: int | None = None
                ) -> tuple[Part10, Dataset]:
    """The Part-10 file to store (its bytes, or its path when it is larger than
    ``in_memory_max_bytes``) and its parsed dataset.

    Raises NotDicom, or StoreRefused with the status C-STORE would answer.
    """
    try:
        large = in_memory_max_bytes is not None and path.stat().st_size > in_memory_max_bytes
        found = _from_file(path) if large else None
    except OSError as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, f"cannot read: {exc.strerror or exc}") from None
    if found is not None:
        return found
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, f"cannot read: {exc.strerror or exc}") from None
    start = meta_end(data) if data[128:132] == b"DICM" and meta_syntax(data) is None \
        else None
    if start is not None:  # the meta group says nothing of the encoding: a bare dataset
        return _bare(data[start:])
    try:
        return data, Archive.parse(data)
    except StoreRefused as refused:
        if "not a DICOM" not in refused.comment:
            raise
    return _bare(data)


def _from_file(path: Path) -> tuple[Path, Dataset] | None:
    """A Part-10 file whose meta group names its transfer syntax, parsed from its path;
    None when it must be read whole (bare, no transfer syntax, not DICOM)."""
    if meta_syntax(path) is None:
        return None
    try:
        return path, Archive.parse(path)
    except StoreRefused as refused:
        if "not a DICOM" not in refused.comment:
            raise
    return None


def _bare(data: bytes) -> tuple[bytes, Dataset]:
    """A dataset without meta group, checked whole as read, then wrapped."""
    try:
        ds = dcmread(BytesIO(data), force=True)
        if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
            raise ValueError
    except Exception:  # noqa: BLE001 - anything unreadable is simply not DICOM
        raise NotDicom("not a DICOM file") from None
    try:  # re-encoding would hide a dataset cut short: check it as read
        check_bare(data, *(bool(flag) for flag in ds.original_encoding))
    except Incomplete as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, str(exc)[:64]) from None
    part10 = _wrap(ds)
    return part10, Archive.parse(part10)


def _wrap(ds: Dataset) -> bytes:
    """Give a dataset read without File Meta Information a Part-10 header, re-encoded
    once in the encoding it was read with."""
    implicit, little = ds.original_encoding
    syntax = (ImplicitVRLittleEndian if implicit else
              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=implicit, little_endian=little)
    return buffer.getvalue()


# --- storing ----------------------------------------------------------------------------


def import_one(archive: Archive, candidate: Candidate,
               in_memory_max_bytes: int | None = None) -> Result:
    """Read and store one file (from its path when larger than ``in_memory_max_bytes``);
    what became of it."""
    path = str(candidate.path)
    if candidate.problem:
        return Result(path, FAILED, candidate.problem)
    try:
        part10, ds = read_part10(candidate.path, in_memory_max_bytes)
    except NotDicom as exc:
        return Result(path, FAILED if candidate.named else SKIPPED, str(exc))
    except StoreRefused as exc:
        reason = exc.comment if exc.comment.startswith("cannot read") \
            else f"0x{exc.status:04X} {exc.comment}"
        return Result(path, FAILED, reason, status=exc.status)
    outcome = _store(archive, part10, ds)
    uid = outcome.sop_instance_uid or str(ds.get("SOPInstanceUID", "")).strip()
    if outcome.ok:
        return Result(path, STORED, "", uid, outcome.status)
    return Result(path, FAILED, f"0x{outcome.status:04X} {outcome.comment}".strip(), uid,
                  outcome.status)


def _store(archive: Archive, part10: Part10, ds: Dataset) -> StoreOutcome:
    """Store one dataset; a rejection note rejects what it references (the local
    administrator may reject anything: :mod:`archive.rejection`)."""
    try:
        note = rejection.note_of(ds)
        if note is None:
            return archive.store(part10, source="import", ds=ds)
        outcome, _ = archive.store_note(note, None, f"archive import ({_os_user()})",
                                        part10, "import", ds, None)
        return outcome
    except rejection.Refused as exc:
        return StoreOutcome(exc.status, exc.comment, str(ds.get("SOPInstanceUID", "")))
    except PyMongoError as exc:  # before the note was stored: nothing done
        return StoreOutcome(OUT_OF_RESOURCES, f"database error: {type(exc).__name__}",
                            str(ds.get("SOPInstanceUID", "")))


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no name for this uid (a container)
        return f"uid {os.getuid()}"

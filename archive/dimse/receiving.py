"""C-STORE datasets received into files, not memory.

pynetdicom (``_config.STORE_RECV_CHUNKED_DATASET``) writes each dataset it receives, as
it arrives, PDU by PDU, into a temporary file it makes with ``NamedTemporaryFile``: the
preamble, the meta group it builds (the one ``event.encoded_dataset(include_meta=True)``
builds), then the dataset bytes as sent.  The C-STORE handler gets the file's path;
pynetdicom deletes it when the handler returns.

The node gives pynetdicom a :class:`Spool` instead: the same bytes, kept in memory up to
``receive.in_memory_max_mb``, written to a file of ``receive.folder`` from the first byte
beyond.  A typical CT or MR image is received and stored from memory as before, with no
file made (a file per instance cost 0.5 ms more CPU); a larger dataset costs the node
one PDU of memory to receive and is stored from its file
(:meth:`archive.storage.Archive.store` takes either): :meth:`Receiver.dataset`.

The files are named ``recv-<pid of the node>-<random>.dcm``, in ``receive.folder`` (not
the system's temporary folder: it may be a small tmpfs).  What could leave one behind,
and what removes it:

- an association that ends in the middle of a dataset (A-ABORT, a lost connection, a
  timeout, a full disk): pynetdicom drops the half-written file without deleting it;
  the node deletes it when the connection closes (:meth:`Receiver.discard_partial`,
  bound to EVT_CONN_CLOSE), and whenever pynetdicom lets go of a spool it did not
  delete (when it is collected);
- the death of the node (kill -9, a power cut): at start, the node deletes the files
  of every node that no longer runs (:meth:`Receiver.prepare`); files of another live
  node sharing the folder are left alone.  Nothing else in the folder is touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import struct
import weakref
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from pydicom.filewriter import write_file_meta_info
from pynetdicom import _config, dimse_messages
from pynetdicom.dsutils import create_file_meta
from pynetdicom.events import Event

from archive.journal import alive_elsewhere

log = logging.getLogger(__name__)

PREFIX = "recv-"
SUFFIX = ".dcm"
_NAME = re.compile(rf"{PREFIX}(\d+)-.+{re.escape(SUFFIX)}")


class Spool:
    """Where pynetdicom writes one received dataset, in place of its
    ``NamedTemporaryFile(delete=False)``: memory up to ``limit`` bytes, then the file
    ``name`` (reserved now, created at the first byte beyond the limit).

    pynetdicom uses ``write``, ``file.flush``, ``name`` (the handler's
    ``event.dataset_path``), ``close``, then ``os.unlink(name)``, which it lets fail.
    """

    def __init__(self, folder: Path, limit: int) -> None:
        self.name = f"{folder}{os.sep}{PREFIX}{os.getpid()}-{secrets.token_hex(8)}{SUFFIX}"
        self.limit = limit
        self.closed = False
        self._memory: BytesIO | None = BytesIO()
        self._file: BinaryIO | None = None

    @property
    def file(self) -> Spool:
        return self

    def write(self, data: bytes) -> int:
        if self._memory is not None:
            if self._memory.tell() + len(data) <= self.limit:
                return self._memory.write(data)
            self._spill()
        assert self._file is not None
        return self._file.write(data)

    def _spill(self) -> None:
        """Move what memory holds to the file, and write there from now on."""
        assert self._memory is not None
        fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        weakref.finalize(self, _remove, self.name)  # deleted when pynetdicom drops it
        self._file = os.fdopen(fd, "wb")
        self._file.write(self._memory.getbuffer())
        self._memory = None

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        self.closed = True
        if self._file is not None:
            self._file.close()

    def in_memory(self) -> bytes | None:
        """The bytes received, if they never went to the file."""
        return self._memory.getvalue() if self._memory is not None else None


class Receiver:
    """Where and how the node receives C-STORE datasets (one per process)."""

    def __init__(self, folder: str | Path, in_memory_max_bytes: int) -> None:
        self.folder = Path(folder)
        #: Datasets (as Part-10 files) up to this size are received and stored in memory.
        self.in_memory_max_bytes = in_memory_max_bytes

    def prepare(self) -> int:
        """Create the folder and delete what nodes no longer running left in it;
        how many files were deleted."""
        self.folder.mkdir(parents=True, exist_ok=True)
        removed = 0
        for path in self.folder.iterdir():
            match = _NAME.fullmatch(path.name)
            if match is None or alive_elsewhere(int(match.group(1))):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        if removed:
            log.info("removed %d partly received datasets left in %s", removed, self.folder)
        return removed

    def install(self) -> None:
        """Make pynetdicom receive C-STORE datasets into spools of this folder, their
        meta group encoded by :func:`meta_group`."""
        _config.STORE_RECV_CHUNKED_DATASET = True
        dimse_messages.NamedTemporaryFile = self._spool  # type: ignore[attr-defined]
        dimse_messages.create_file_meta = _MetaValues  # type: ignore[attr-defined]
        dimse_messages.write_file_meta_info = _write_meta  # type: ignore[attr-defined]

    def _spool(self, *args: Any, **kwargs: Any) -> Spool:
        """What pynetdicom calls as ``NamedTemporaryFile(delete=False, mode="wb", ...)``."""
        return Spool(self.folder, self.in_memory_max_bytes)

    def dataset(self, event: Event) -> bytes | Path:
        """The received Part-10 file: its bytes when it was received in memory, else
        its path (valid until the handler returns)."""
        spool = getattr(event.request, "_dataset_file", None)
        received = spool.in_memory() if isinstance(spool, Spool) else None
        return received if received is not None else Path(event.dataset_path)

    def discard_partial(self, event: Event) -> None:
        """EVT_CONN_CLOSE: delete the file of a dataset the connection ended in."""
        message = getattr(getattr(event.assoc, "dimse", None), "message", None)
        spool = getattr(message, "_data_set_file", None)
        if spool is None:
            return
        with contextlib.suppress(OSError):
            spool.close()
        if _remove(spool.name):
            log.info("connection closed during a C-STORE: partly received dataset deleted")


# --- the meta group of a received dataset -------------------------------------------

#: pynetdicom's Implementation Class UID and Version Name, as create_file_meta writes them.
_IMPLEMENTATION = create_file_meta.__kwdefaults__ or {}
#: What a UID made of digits and dots is (PS3.5 9.1), which the fast path encodes.
_UID = re.compile(r"[0-9.]{1,64}")


class _MetaValues(NamedTuple):
    """What pynetdicom passes ``create_file_meta`` for a received dataset, kept for
    :func:`_write_meta` instead of a pydicom ``FileMetaDataset``: building, validating
    and writing one cost the thread reading the sender's PDUs 0.4 ms per instance."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element with a 2-byte length."""
    return struct.pack("<HH2sH", 2, tag, vr, len(value)) + value


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def meta_group(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes | None:
    """The File Meta Information group pynetdicom writes before a received dataset
    (``create_file_meta`` then pydicom's ``write_file_meta_info``), the same bytes, for
    UIDs of digits and dots; None for anything else, which pydicom encodes."""
    texts = [str(uid) for uid in (sop_class_uid, sop_instance_uid, transfer_syntax,
                                  _IMPLEMENTATION.get("implementation_uid", ""))]
    name = str(_IMPLEMENTATION.get("implementation_version", ""))
    if not all(_UID.fullmatch(text) for text in texts) or not name.isascii() \
            or not 0 < len(name.strip()) <= len(name) <= 16:
        return None
    uids, version = [text.encode("ascii") for text in texts], name.encode("ascii")
    body = b"".join((
        struct.pack("<HH2s2xL", 2, 0x0001, b"OB", 2), b"\x00\x01",
        *(_element(tag, b"UI", _even(uid, b"\x00"))
          for tag, uid in zip((0x0002, 0x0003, 0x0010, 0x0012), uids, strict=True)),
        _element(0x0013, b"SH", _even(version, b" "))))
    return struct.pack("<HH2sHL", 2, 0x0000, b"UL", 4, len(body)) + body


def _write_meta(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    """``write_file_meta_info`` as pynetdicom calls it for a received dataset."""
    if isinstance(file_meta, _MetaValues):
        encoded = meta_group(*file_meta)
        if encoded is not None:
            fp.write(encoded)
            return
        file_meta = create_file_meta(**file_meta._asdict())
    write_file_meta_info(fp, file_meta, enforce_standard)


def _remove(name: str) -> bool:
    """Delete a file if it exists; whether it did."""
    try:
        os.unlink(name)
    except FileNotFoundError:
        return False
    return True

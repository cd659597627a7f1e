"""C-STORE datasets received into files, not memory.

pynetdicom (``_config.STORE_RECV_CHUNKED_DATASET``) writes each dataset it receives to a
temporary file as it arrives, PDU by PDU: the preamble, the meta group it builds (the
one ``event.encoded_dataset(include_meta=True)`` builds), then the dataset bytes as
sent.  The C-STORE handler gets the file's path; pynetdicom deletes it when the handler
returns.  So receiving a dataset costs the node one PDU of memory whatever its size,
and the handler decides (:meth:`Receiver.dataset`): a small dataset is read back and
stored from memory as before, a large one is stored from its file
(:meth:`archive.storage.Archive.store` takes either).

The files go to ``receive.folder`` (not the system's temporary folder: it may be a small
tmpfs), named ``recv-<pid of the node>-<random>.dcm``.  What could leave one behind, and
what removes it:

- an association that ends in the middle of a dataset (A-ABORT, a lost connection, a
  timeout): pynetdicom drops the half-written file without deleting it; the node
  deletes it when the connection closes (:meth:`Receiver.discard_partial`, bound to
  EVT_CONN_CLOSE), and whenever pynetdicom lets go of a file it did not delete;
- the death of the node (kill -9, a power cut): at start, the node deletes the files
  of every node that no longer runs (:meth:`Receiver.prepare`); files of another live
  node sharing the folder are left alone.  Nothing else in the folder is touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import weakref
from pathlib import Path
from typing import Any

from pynetdicom import _config, dimse_messages
from pynetdicom.events import Event

log = logging.getLogger(__name__)

PREFIX = "recv-"
SUFFIX = ".dcm"
_NAME = re.compile(rf"{PREFIX}(\d+)-.+{re.escape(SUFFIX)}")


class Receiver:
    """Where and how the node receives C-STORE datasets (one per process)."""

    def __init__(self, folder: str | Path, in_memory_max_bytes: int) -> None:
        self.folder = Path(folder)
        #: Datasets up to this size are read back and stored from memory.
        self.in_memory_max_bytes = in_memory_max_bytes

    def prepare(self) -> int:
        """Create the folder and delete what nodes no longer running left in it;
        how many files were deleted."""
        self.folder.mkdir(parents=True, exist_ok=True)
        removed = 0
        for path in self.folder.iterdir():
            match = _NAME.fullmatch(path.name)
            if match is None or _alive_elsewhere(int(match.group(1))):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        if removed:
            log.info("removed %d partly received datasets left in %s", removed, self.folder)
        return removed

    def install(self) -> None:
        """Make pynetdicom receive C-STORE datasets into files of this folder."""
        _config.STORE_RECV_CHUNKED_DATASET = True
        dimse_messages.NamedTemporaryFile = self._temporary  # type: ignore[attr-defined]

    def _temporary(self, *args: Any, **kwargs: Any) -> Any:
        """pynetdicom's NamedTemporaryFile(delete=False, ...), in this folder, with a
        name that says which node owns it, deleted when pynetdicom drops it."""
        kwargs.update(dir=self.folder, prefix=f"{PREFIX}{os.getpid()}-", suffix=SUFFIX)
        handle = tempfile.NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115 - pynetdicom closes it
        weakref.finalize(handle, _remove, handle.name)
        return handle

    def dataset(self, event: Event) -> bytes | Path:
        """The received Part-10 file: its bytes when it is small enough to store from
        memory (the faster path), else its path (valid until the handler returns)."""
        path = Path(event.dataset_path)
        if path.stat().st_size <= self.in_memory_max_bytes:
            return path.read_bytes()
        return path

    def discard_partial(self, event: Event) -> None:
        """EVT_CONN_CLOSE: delete the file of a dataset the connection ended in."""
        message = getattr(getattr(event.assoc, "dimse", None), "message", None)
        handle = getattr(message, "_data_set_file", None)
        if handle is None:
            return
        with contextlib.suppress(OSError):
            handle.close()
        _remove(handle.name)
        log.info("connection closed during a C-STORE: partly received dataset deleted")


def _remove(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def _alive_elsewhere(pid: int) -> bool:
    """Whether ``pid`` is another running process (this one's files are a previous
    process's: pids repeat, in a container the node is often pid 1 every time)."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

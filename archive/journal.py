"""The store journal: one small file per store that is not finished yet.

A store writes several documents that no database transaction ties together (FerretDB
has none, and the GridFS file, the instance document and the level documents are
separate writes on MongoDB too).  Before its first write, a store records what it is
about to write in ``<journal>/<file id>.json``; it removes the entry once everything
is written (or taken back).  An entry that outlives its store means the node died, or
the database went away, in the middle: :meth:`archive.storage.Archive.reconcile`
finishes its work from what the entry says, so a crash at any instant leaves the
archive exact after restart.

Entries are written with ``write`` + ``rename`` and not ``fsync``-ed: they survive the
death of the process (kill -9), which is what they are for; after a power loss the
database's own durability decides, and ``archive check --repair`` finds what an
entry would have named.  Creating and removing an entry costs ~50 microseconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Unfinished(Exception):
    """Work stopped by a database failure after its journal entry was written: the
    journal finishes it when the database answers again (:meth:`Archive.reconcile`)."""


class Journal:
    """Entries of unfinished stores, one JSON file each, in one folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._created = False

    def _path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad journal key {key!r}")
        return self.folder / f"{key}.json"

    def write(self, key: str, entry: dict[str, Any]) -> None:
        """Create or replace the entry ``key`` atomically (never half-written)."""
        path = self._path(key)
        if not self._created:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._created = True
        temporary = path.with_name(f".{path.name}.{threading.get_ident()}")
        with open(temporary, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(entry))
        os.replace(temporary, path)

    def read(self, key: str) -> dict[str, Any] | None:
        """The entry ``key``, None when there is none (or it is unreadable)."""
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def entries(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """The entries left, oldest first; unreadable ones are logged and skipped."""
        if not self.folder.is_dir():
            return
        paths = sorted((p for p in self.folder.glob("*.json")), key=_mtime)
        for path in paths:
            try:
                entry = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                continue  # finished meanwhile
            except (OSError, ValueError) as exc:
                log.error("journal entry %s unreadable, left in place: %s", path, exc)
                continue
            yield path.stem, entry

    def pending(self) -> bool:
        return self.folder.is_dir() and any(self.folder.glob("*.json"))

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*.json")) if self.folder.is_dir() else 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def alive_elsewhere(pid: Any) -> bool:
    """Whether ``pid`` is another running process: whose journal entries or received
    files are not this process's to finish (this one's are a previous process's: pids
    repeat, and in a container the node is often pid 1 every time)."""
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""The database a command works on: the embedded FerretDB started (or the running
node's shared) and named, or the configured one.

In the core, not in the command line: acl's commands open the database too, and the
command line imports them, never the other way round.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from archive.config import Config, display_uri
from archive.ferretdb import EmbeddedFerretDB


class NoArchive(Exception):
    """A command that reads was pointed at a database that does not exist."""


@dataclass(frozen=True)
class Opened:
    """Which database a command works on, so that it can say so."""

    name: str
    uri: str  # as shown: without password
    data_dir: str | None  # the embedded FerretDB's data folder, None for an external one
    node_pid: int | None  # the running node whose embedded FerretDB is shared

    def where(self) -> str:
        if self.data_dir is None:
            return self.uri
        owner = f"shared with the running node pid {self.node_pid}" if self.node_pid \
            else "started for this command: no node is running on it"
        return f"embedded FerretDB on {self.uri}, data in {self.data_dir}, {owner}"

    def describe(self) -> str:
        return f"database {self.name} ({self.where()})"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def database(cfg: Config, on_down: Callable[[str], None] | None = None, *,
             existing: bool = False) -> Iterator[Opened]:
    """Start the embedded FerretDB when configured (or share the running node's), and
    point the config at it.

    With ``on_down`` (the node), FerretDB is also restarted whenever it exits, and
    ``on_down(reason)`` is told at once; one-shot commands have no need of either.
    ``existing`` (commands that only read): raise NoArchive rather than create an
    empty data folder or report on a database nothing was ever stored in.
    """
    embedded = EmbeddedFerretDB(cfg.database.embedded) if cfg.database.embedded.enabled else None
    if embedded is not None:
        if existing and not embedded.data_dir.is_dir():
            raise NoArchive(f"no embedded database in {embedded.data_dir} (database.embedded."
                            "data_dir: the folder does not exist); run from the archive's "
                            "folder or give its --config")
        cfg.database.uri = embedded.start()
        if on_down is not None:
            embedded.supervise(on_down)
    try:
        opened = Opened(cfg.database.name, display_uri(cfg.database.uri),
                        str(embedded.data_dir) if embedded else None,
                        embedded.shared_with if embedded else None)
        if existing:
            _require_database(cfg, opened)
        yield opened
    finally:
        if embedded is not None:
            embedded.stop()


def _require_database(cfg: Config, opened: Opened) -> None:
    from archive.storage import connect

    client = connect(cfg.database.uri, cfg.database.timeout_seconds)
    try:
        collections = client[cfg.database.name].list_collection_names()
    finally:
        client.close()
    if not collections:
        raise NoArchive(f"no {opened.describe()}: nothing was ever stored there (wrong "
                        "--config, database.name or data folder?)")

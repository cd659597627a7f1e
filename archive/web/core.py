"""What the HTTP front end needs of the core: the names of ``archive.context.Context``.

A Protocol rather than the class itself, so that the web package imports nothing of
the DICOM front end and any object with these attributes serves it (a test double,
the node's adapter until the Context exists).
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from pymongo import MongoClient
from pymongo.database import Database

from acl.audit import AuditLog
from acl.auth import Authenticator, Guard
from acl.rules import Decision, RuleStore
from archive.config import Config
from archive.find import Finder
from archive.health import DatabaseHealth
from archive.storage import Archive


class Core(Protocol):
    """The archive's core as one object (see ``archive.context.Context``)."""

    cfg: Config
    client: MongoClient
    db: Database
    health: DatabaseHealth
    archive: Archive
    finder: Finder
    rules: RuleStore
    audit: AuditLog
    authenticator: Authenticator
    guard: Guard
    ae_bindings: Any
    stopping: threading.Event

    def authorize(self, principal: str, service: str) -> Decision:
        """What the access rules say about ``principal`` using ``service``."""

    def begin_store(self) -> bool:
        """Count a store in flight; False once the archive is stopping."""

    def end_store(self) -> None: ...

    def start(self) -> None: ...

    def stop(self, grace: float = 30.0) -> None: ...

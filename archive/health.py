"""Whether the database answers: one shared state the request paths look at first.

While the database is away, every pymongo operation waits out its server selection
timeout before failing, and a store makes several of them: a C-STORE took ~16 s to be
refused.  A modality waiting that long per instance may time out its association, and
the node's threads pile up.  So the node keeps one state, marked *down* as soon as a
failure shows it (a connection failure confirmed by a ping, a periodic ping unanswered,
the embedded FerretDB exiting), and *up* again when a background ping answers.  While it
is down, requests needing the database are refused at once (C-STORE and C-FIND 0xA700,
C-MOVE/C-GET 0xA701) and the journal replay waits.
"""

from __future__ import annotations

import logging
import threading
import time

import pymongo
from pymongo.database import Database
from pymongo.errors import ConnectionFailure, PyMongoError

log = logging.getLogger("archive.health")

#: Seconds between pings while the database is down (how soon it is seen back) ...
DOWN_INTERVAL = 0.5
#: ... and while it is up (how soon an outage is seen when no request meets it first).
UP_INTERVAL = 5.0
#: How long a ping may take while down: the database is back when it answers at all.
DOWN_PING_TIMEOUT = 1.0
#: How long a ping may take while up: a busy database is not a dead one.
UP_PING_TIMEOUT = 3.0


class DatabaseHealth:
    """The last known state of the database, and the watcher that keeps it current.

    Without :meth:`start` (``archive import``, tests) there is no watcher: while down,
    reading :attr:`up` pings again, at most every ``DOWN_INTERVAL``.
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._up = True  # a node only starts once the database answered
        self._reason = ""
        self._down_since = 0.0
        self._outages = 0  # a ping that began before the last mark_down proves nothing
        self._last_ping = 0.0
        self._cond = threading.Condition()
        self._wake = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the state ---------------------------------------------------------------------

    @property
    def up(self) -> bool:
        if (not self._up and self._thread is None
                and time.monotonic() - self._last_ping >= DOWN_INTERVAL):
            self._probe()
        return self._up

    @property
    def reason(self) -> str:
        """Why the database is down ("" while up)."""
        return "" if self._up else self._reason

    def mark_down(self, reason: str, logged: bool = False) -> None:
        """The database is known to be away: one log line per outage, unless the caller
        ``logged`` the event already."""
        with self._cond:
            if not self._up:
                return
            self._up, self._reason = False, reason
            self._down_since = time.monotonic()
            self._outages += 1
            self._cond.notify_all()
        if not logged:
            log.warning("database unavailable (%s): requests needing it are refused until "
                        "it answers again", reason)

    def _mark_up(self, outages: int) -> None:
        with self._cond:
            if self._up or outages != self._outages:
                return
            self._up, self._reason = True, ""
            down = time.monotonic() - self._down_since
            self._cond.notify_all()
        log.info("database available again after %.1f s", down)

    def check(self) -> bool:
        """Whether the database answers now: False at once while it is known to be down,
        else a short ping, whose failure marks it down."""
        if not self.up:
            return False
        return self._probe(DOWN_PING_TIMEOUT)

    def suspect(self, exc: BaseException) -> None:
        """A request failed with ``exc``: after a connection failure, ping now rather
        than at the next interval."""
        if isinstance(exc, ConnectionFailure):
            with self._cond:
                self._wake = True
                self._cond.notify_all()

    def wait_up(self, timeout: float) -> bool:
        """Wait until the database is up (or ``timeout`` seconds); whether it is."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._up and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._up

    def _probe(self, timeout: float | None = None) -> bool:
        """Ping the database; mark it up or down by the answer."""
        if timeout is None:
            timeout = UP_PING_TIMEOUT if self._up else DOWN_PING_TIMEOUT
        self._last_ping = time.monotonic()
        outages = self._outages
        try:
            with pymongo.timeout(timeout):
                self._db.command("ping")
        except PyMongoError as exc:
            self.mark_down(f"no answer to a ping: {type(exc).__name__}")
            return False
        self._mark_up(outages)
        return self._up

    # -- the watcher -------------------------------------------------------------------

    def start(self) -> None:
        """Ping in the background: every DOWN_INTERVAL while down, UP_INTERVAL while up."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="database-health",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(UP_PING_TIMEOUT + 1)

    def _watch(self) -> None:
        while True:
            with self._cond:
                interval = UP_INTERVAL if self._up else DOWN_INTERVAL
                deadline = self._last_ping + interval
                while not (self._stopping or self._wake) and time.monotonic() < deadline:
                    # a mark_down wakes us too: ping at the down pace from then on
                    self._cond.wait(min(deadline - time.monotonic(), DOWN_INTERVAL))
                    if not self._up:
                        deadline = min(deadline, self._last_ping + DOWN_INTERVAL)
                if self._stopping:
                    return
                self._wake = False
            self._probe()

"""Audit trail: every association and every operation, in the ``audit`` collection.

Handlers only build a small document and put it on a bounded queue; a background
thread inserts what has accumulated in batches (``insert_many``, unordered), so a
C-STORE pays a queue put, not a database round trip.  Nothing is lost while the
database answers: a full queue makes the handler wait (up to ``put_timeout``) for the
writer rather than drop, a failed insert is retried, and :meth:`AuditLog.stop`
drains the queue at shutdown.  Only a database that stays away longer than the queue
can absorb costs entries, each loss counted and logged.

Entry fields: ``time`` (UTC), ``kind`` (association | operation), ``event``
(A-ASSOCIATE, A-RELEASE, A-ABORT, A-ASSOCIATE-RJ, C-ECHO, C-STORE, C-FIND, C-MOVE,
C-GET, N-ACTION: a storage commitment request; REJECT: a rejection note applied, PURGE:
``archive rejected purge``; QIDO-RS, WADO-RS, STOW-RS, DELETE,
HTTP-AUTH-RJ; CONSOLE: a page of the web console), ``principal``, ``established`` (how
the principal was established: verified-user, claimed-user, ae-title, bearer-token,
anonymous, refused, os-user) and ``basis`` (on what: backend, token id, AE title and
address, certificate), ``address``/``port`` of the peer,
``calling_ae``, ``called_ae``, ``service``, ``request`` (identifier summary or SOP Instance UID),
``allowed``, ``rule`` (index of the deciding rule), ``restricted``, ``status``,
``comment``, ``counts``, ``ms``; and ``at``, the ``time`` as text (:func:`at_text`) for
searches.

**Searching** (:func:`search`, the console's Audit page, ``archive audit``).  The
embedded FerretDB cannot search a range of dates in an index, nor sort by one without
decoding the whole trail (2.4 s per 100,000 entries); a range of strings it searches in
the index (patch 05).  So each entry also holds its time as fixed-width text, ``at``,
indexed, and a search of the newest entries looks in the last hour first, then the
last day, week, month and year (:data:`WINDOWS`), none reaching back before the
search's own start: the first window holding enough
entries answers, after reading only those; the whole trail is searched only when none
does (entries written before ``at`` existed are found then).

**Recent activity.**  The writer also copies each association entry and each failure
into a small collection, ``audit_recent``, trimmed back to the newest
:data:`RECENT_KEPT` of each once :data:`RECENT_TRIM_EVERY` copies were written: the
dashboard's recent associations and failures are read there (:func:`recent`: 20 ms,
where a search of a trail of 50,000 entries takes 0.7 s).  The embedded FerretDB cannot
read the newest entries of the trail without decoding and sorting all of them (about
2 s per 100,000 entries), and the trail grows by one entry per C-STORE.  The copies
cost the writer about 1 s per 50,000 entries (one in ten an association's, one in fifty
a failure).  Every process writing the trail writes the copies, so
several nodes on one database share them; losing one (the database away) costs only a
line of the dashboard, never an entry of the trail.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import queue
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import PyMongoError

from acl.identity import ATTRIBUTE as PRINCIPAL_ATTRIBUTE
from acl.identity import TOKEN

if TYPE_CHECKING:
    from archive.rejection import Rejection

log = logging.getLogger("acl.audit")

COLLECTION = "audit"
RECENT_COLLECTION = "audit_recent"
#: Association entries and failures kept in ``audit_recent`` (each), and how many
#: copies are written between two trims.
RECENT_KEPT = 1000
RECENT_TRIM_EVERY = 1000
ASSOCIATION, FAILURE = "association", "failure"
_STOP = object()
_SUMMARY_LENGTH = 256


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def at_text(moment: datetime.datetime) -> str:
    """A time as ``at`` holds it: UTC, to the millisecond as BSON keeps ``time``, fixed
    width, so that texts sort as the times do (years 1000 to 9999)."""
    if moment.tzinfo is None:  # pymongo reads dates back naive, in UTC
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    utc = moment.astimezone(datetime.timezone.utc)
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z"


def stamp(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry with ``at``, its ``time`` as text (what a search reads in an index)."""
    moment = entry.get("time")
    if isinstance(moment, datetime.datetime):
        entry["at"] = at_text(moment)
    return entry


# --- entries ---------------------------------------------------------------------------


def association_entry(assoc: Any, event: str, principal: str, **extra: Any) -> dict[str, Any]:
    """An entry about an association (``assoc``: a pynetdicom Association; whatever
    it lacks is left empty, auditing never fails a service)."""
    requestor = getattr(assoc, "requestor", None)
    acceptor = getattr(assoc, "acceptor", None)
    entry = {
        "time": now(), "kind": "association", "event": event, "principal": principal,
        "address": getattr(requestor, "address", ""), "port": getattr(requestor, "port", 0),
        "calling_ae": str(getattr(requestor, "ae_title", "")).strip(),
        "called_ae": str(getattr(acceptor, "ae_title", "")).strip(),
    }
    resolved = getattr(assoc, PRINCIPAL_ATTRIBUTE, None)  # acl.identity.Principal
    if resolved is not None:
        entry["established"] = resolved.established
        entry["basis"] = resolved.basis
    entry.update(extra)
    return stamp(entry)


def requested_user(assoc: Any) -> str | None:
    """The user name an association proposed in its User Identity: types 1 and 2 only,
    whose primary field is a name (Kerberos, SAML and JWT ones are credentials)."""
    identity = getattr(getattr(assoc, "requestor", None), "user_identity", None)
    field = getattr(identity, "primary_field", None)
    if not field or getattr(identity, "user_identity_type", None) not in (1, 2):
        return None
    return bytes(field)[:64].decode("utf-8", "backslashreplace")


def operation_entry(assoc: Any, event: str, principal: str, service: str, *,
                    allowed: bool, status: int, request: str = "", rule: int | None = None,
                    restricted: bool = False, comment: str = "",
                    counts: Mapping[str, int] | None = None,
                    started: float | None = None) -> dict[str, Any]:
    """An entry about one DIMSE operation; ``started`` is a ``time.perf_counter()``."""
    entry = association_entry(assoc, event, principal)
    entry.update({"kind": "operation", "service": service, "request": request[:_SUMMARY_LENGTH],
                  "allowed": allowed, "rule": rule, "restricted": restricted,
                  "status": status, "comment": comment, "counts": dict(counts or {})})
    if started is not None:
        entry["ms"] = round((time.perf_counter() - started) * 1000, 1)
    return entry


def rejection_entry(peer: Any, principal: str, done: Rejection,
                    started: float | None = None) -> dict[str, Any]:
    """The entry of a rejection note applied (event REJECT, service Delete): the note,
    the reason and what it rejected; ``peer`` as for :func:`operation_entry`."""
    note = done.note
    return operation_entry(
        peer, "REJECT", principal, "Delete", allowed=True, status=0x0000,
        request=f"note={note.sop} study={note.study}",
        comment=f"{note.code} {note.meaning}" + ("; finished by the journal"
                                                 if done.deferred else ""),
        counts={"instances": done.instances, "series": done.series}, started=started)


def summarize(identifier: Dataset | None) -> str:
    """An identifier in one line: level first, then the keys that have a value."""
    if identifier is None:
        return ""
    parts = []
    level = identifier.get("QueryRetrieveLevel")
    if level:
        parts.append(str(level))
    for elem in identifier:
        if elem.keyword in ("QueryRetrieveLevel", "SpecificCharacterSet") or elem.is_empty:
            continue
        if elem.VR == "SQ":
            parts.append(f"{elem.keyword or elem.tag}=[...]")
            continue
        try:
            value = elem.value
            text = "\\".join(map(str, value)) if isinstance(value, list | tuple) or (
                elem.VM > 1 and not isinstance(value, str | bytes)) else str(value)
        except Exception:  # noqa: BLE001 - a value pydicom cannot render
            text = "?"
        parts.append(f"{elem.keyword or elem.tag}={text}")
    return " ".join(parts)[:_SUMMARY_LENGTH]


# --- writer ----------------------------------------------------------------------------


class AuditLog:
    """Background, batched writer of audit entries."""

    def __init__(self, db: Database, max_queue: int = 20_000, batch: int = 500,
                 put_timeout: float = 2.0, linger: float = 0.2,
                 recent_kept: int = RECENT_KEPT,
                 recent_trim_every: int = RECENT_TRIM_EVERY) -> None:
        self.collection: Collection = db[COLLECTION]
        self.recent: Collection = db[RECENT_COLLECTION]
        self.recent_kept = recent_kept
        self.recent_trim_every = recent_trim_every
        self._copies = 0  # written since the last trim
        self.batch = batch
        #: How long a batch waits for more entries: each insert costs the database a
        #: round trip that competes with the stores, whatever the batch size.
        self.linger = linger
        self.put_timeout = put_timeout
        self.lost = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._give_up_at = float("inf")

    def start(self) -> None:
        try:  # for `archive audit` on MongoDB; FerretDB scans anyway
            self.collection.create_index([("time", 1)])
            self.collection.create_index([("principal", 1), ("time", 1)])
            self.collection.create_index([("at", 1)])
            self.recent.create_index([("time", 1)])
        except PyMongoError as exc:
            log.warning("audit indexes not created: %s", exc)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
            self._thread.start()

    def record(self, entry: dict[str, Any]) -> None:
        """Queue one entry (never raises: auditing must not break a service)."""
        try:
            self._queue.put(entry, timeout=self.put_timeout)
        except queue.Full:
            self.lost += 1
            log.error("audit queue full, entry lost (%d so far): %s %s %s", self.lost,
                      entry.get("event"), entry.get("principal"), entry.get("request", ""))

    def stop(self, timeout: float = 10.0, grace: float = 3.0) -> None:
        """Write everything queued, then stop the writer.  Entries still unwritten
        ``grace`` seconds from now are given up (logged as lost): a database that is
        away must not hold the node's shutdown."""
        if self._thread is None:
            return
        self._give_up_at = time.monotonic() + grace
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        done = False
        while not done:
            items = [self._queue.get()]  # wait for the first entry
            # Then let the others come without waiting on the queue: each entry would
            # wake this thread, a futex that py-spy put at 0.1-0.2 ms of the recording
            # thread on this VM (an interrupt to the other CPU).
            if items[0] is not _STOP:
                self._stopping.wait(self.linger)
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self._queue.get_nowait())
            if _STOP in items:
                done = True
                items = items[:items.index(_STOP)]
            for start in range(0, len(items), self.batch):
                batch = items[start:start + self.batch]
                if not self._write(batch):
                    self.lost += len(batch)
                    log.error("audit: %d entries lost, the database did not answer at "
                              "shutdown", len(batch))

    def _write(self, entries: list[dict[str, Any]]) -> bool:
        """Insert a batch, retrying while the database is away; False: gave up, which
        happens only when stopping."""
        delay = 0.1
        while True:
            if self._stopping.is_set() and time.monotonic() > self._give_up_at:
                return False
            try:
                self.collection.insert_many(entries, ordered=False)
                self._remember(entries)
                return True
            except PyMongoError as exc:
                details = getattr(exc, "details", None) or {}
                if details.get("nInserted"):  # partly written: retry only the rest
                    failed = {e.get("index") for e in details.get("writeErrors", [])}
                    entries[:] = [e for i, e in enumerate(entries) if i in failed]
                if self._stopping.is_set() and time.monotonic() > self._give_up_at:
                    return False
                log.warning("audit: %d entries not written yet: %s", len(entries), exc)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


    def _remember(self, entries: list[dict[str, Any]]) -> None:
        """Copy the association entries and failures into ``audit_recent``, trimmed
        now and then (never raises: the trail itself is written)."""
        copies = []  # one per list an entry belongs to: each list trimmed on its own
        for entry in entries:
            for kind, belongs in ((ASSOCIATION, entry.get("event") in ASSOCIATION_EVENTS),
                                  (FAILURE, is_failure(entry))):
                if belongs:
                    copies.append({**{k: v for k, v in entry.items() if k != "_id"},
                                   "recent": kind})
        if not copies:
            return
        try:
            self.recent.insert_many(copies, ordered=False)
            self._copies += len(copies)
            if self._copies >= self.recent_trim_every:
                self._copies = 0
                for kind in (ASSOCIATION, FAILURE):
                    cut = list(self.recent.find({"recent": kind}, {"time": 1})
                               .sort("time", -1).skip(self.recent_kept).limit(1))
                    if cut:
                        self.recent.delete_many({"recent": kind,
                                                 "time": {"$lte": cut[0]["time"]}})
        except PyMongoError as exc:
            log.warning("audit: recent activity not updated: %s", exc)


# --- reading ---------------------------------------------------------------------------

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, reference: datetime.datetime | None = None) -> datetime.datetime:
    """``2024-05-01``, ``2024-05-01T10:00`` (UTC unless an offset is given) or a
    duration back from now: ``90s``, ``15m``, ``2h``, ``7d``, ``1w``."""
    text = text.strip()
    found = _RELATIVE.fullmatch(text)
    if found:
        seconds = float(found.group(1)) * _UNITS[found.group(2)]
        return (reference or now()) - datetime.timedelta(seconds=seconds)
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r}: expected an ISO date/time or a duration "
                         "such as 15m, 2h, 7d") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


def entries(db: Database, user: str | None = None, since: datetime.datetime | None = None,
            limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` entries matching, oldest first."""
    return list(reversed(search(db, user=user, since=since, limit=limit)))


#: The events an entry may have, for a search by operation.
EVENTS = ("A-ASSOCIATE", "A-RELEASE", "A-ABORT", "A-ASSOCIATE-RJ", "C-ECHO", "C-STORE",
          "C-FIND", "C-MOVE", "C-GET", "N-ACTION", "QIDO-RS", "WADO-RS", "STOW-RS", "DELETE",
          "REJECT", "PURGE", "MODIFY", "FHIR", "HTTP-AUTH-RJ", "CONSOLE")
#: Association events (an HTTP request has no association: its refused login is one).
ASSOCIATION_EVENTS = ("A-ASSOCIATE", "A-RELEASE", "A-ABORT", "A-ASSOCIATE-RJ",
                      "HTTP-AUTH-RJ")
#: Events that are failures whatever their status.
_FAILED_EVENTS = ("A-ABORT", "A-ASSOCIATE-RJ", "HTTP-AUTH-RJ")
#: DIMSE status ranges that are failures (PS3.7 C.1.4), and the warnings among them
#: (0x0107, 0x0116); warnings 0x0001, 0xB000-0xBFFF, Cancel 0xFE00 and Pending
#: 0xFF00-0xFF01 are not failures either.
_FAILURE_STATUSES = ((0x0100, 0x02FF), (0xA000, 0xAFFF), (0xC000, 0xCFFF))
_WARNINGS = (0x0107, 0x0116)
#: The filter of failures (refused, or a failure status, or an aborted or rejected
#: association): :func:`is_failure` as the database runs it.
FAILURES: dict[str, Any] = {"$or": [
    {"allowed": False}, {"event": {"$in": list(_FAILED_EVENTS)}},
    *({"status": {"$gte": low, "$lte": high, "$nin": list(_WARNINGS)}}
      for low, high in _FAILURE_STATUSES)]}


def is_failure(entry: Mapping[str, Any]) -> bool:
    """Whether an entry records a refusal or a failure (what :data:`FAILURES` selects)."""
    status = entry.get("status")
    return entry.get("allowed") is False or entry.get("event") in _FAILED_EVENTS or (
        isinstance(status, int) and not isinstance(status, bool) and status not in _WARNINGS
        and any(low <= status <= high for low, high in _FAILURE_STATUSES))


def search(db: Database, *, user: str | None = None, event: str | None = None,
           since: datetime.datetime | None = None, until: datetime.datetime | None = None,
           failures: bool = False, associations: bool = False, offset: int = 0,
           limit: int = 100, windows: bool = True) -> list[dict[str, Any]]:
    """Entries matching, newest first, ``offset`` of them skipped.  Every value is
    compared as data (a string, a date): never an operator from the caller.
    ``windows=False``: one search of the whole trail (what a benchmark compares)."""
    conditions: list[dict[str, Any]] = []
    if user is not None:
        conditions.append({"principal": str(user)})
    if event is not None:
        conditions.append({"event": str(event)})
    if associations:
        conditions.append({"event": {"$in": list(ASSOCIATION_EVENTS)}})
    span = {**({"$gte": since} if since is not None else {}),
            **({"$lt": until} if until is not None else {})}
    if span:
        conditions.append({"time": span})
    if failures:
        conditions.append(FAILURES)

    def newest(window: dict[str, Any] | None) -> list[dict[str, Any]]:
        found = [*conditions, window] if window else conditions
        condition = found[0] if len(found) == 1 else {"$and": found} if found else {}
        cursor = db[COLLECTION].find(condition, {"_id": 0, "at": 0}) \
            .sort([("time", -1), ("_id", -1)]).skip(offset)
        return list(cursor.limit(limit)) if limit else list(cursor)

    if limit and windows:  # the module docstring: the newest entries are looked for nearby first
        end = until or now()
        starts = [end - window for window in WINDOWS if since is None or end - window > since]
        for start in [*starts, *([since] if since is not None else [])]:
            found = newest({"at": {"$gte": at_text(start)}})
            if len(found) == limit:
                return found
    return newest(None)


#: Spans back from the end of a search (now, or its ``until``) tried one after the
#: other for the newest entries before the whole trail (module docstring).
WINDOWS = tuple(datetime.timedelta(days=days) for days in (1 / 24, 1, 7, 31, 366))


def recent(db: Database, kind: str, user: str | None = None,
           limit: int = 10) -> list[dict[str, Any]]:
    """The newest association entries (``kind`` ASSOCIATION) or failures (FAILURE) of
    ``audit_recent``, of one principal or everyone's, newest first."""
    condition: dict[str, Any] = {"recent": kind}
    if user is not None:
        condition["principal"] = str(user)
    return list(db[RECENT_COLLECTION].find(condition, {"_id": 0, "recent": 0, "at": 0})
                .sort("time", -1).limit(limit))


def format_entry(entry: Mapping[str, Any]) -> str:
    """One line per entry, for ``archive audit``."""
    moment = entry.get("time")
    when = moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z" \
        if isinstance(moment, datetime.datetime) else str(moment)
    peer = f"{entry.get('calling_ae', '')}@{entry.get('address', '')}:{entry.get('port', '')}"
    parts = [when, entry.get("principal", "?"), peer, str(entry.get("event", ""))]
    if entry.get("kind") == "operation":
        verdict = "allowed" if entry.get("allowed") else "DENIED"
        if entry.get("allowed") and entry.get("restricted"):
            verdict = "allowed(restricted)"
        parts += [str(entry.get("service", "")), verdict]
    status = entry.get("status")
    if isinstance(status, int):
        parts.append(f"0x{status:04X}")
    parts += [f"{k}={v}" for k, v in (entry.get("counts") or {}).items()]
    if entry.get("rule"):
        parts.append(f"rule={entry['rule']}")
    if entry.get("user") and entry.get("user") != entry.get("principal"):
        parts.append(f"user={entry['user']!r}")
    if entry.get("established"):
        parts.append(f"established={entry['established']}")
    if entry.get("token"):  # refused bearer credentials: the token id they named
        parts.append(f"token={entry['token']}")
    if entry.get("basis") and (entry.get("kind") == "association"
                               or entry.get("established") == TOKEN):  # which token
        parts.append(f"basis={entry['basis']!r}")
    if entry.get("ms") is not None:
        parts.append(f"{entry['ms']}ms")
    for key in ("request", "comment"):
        if entry.get(key):
            parts.append(f"{key}={entry[key]!r}")
    return " ".join(str(p) for p in parts)


def format_entries(rows: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    for row in rows:
        yield format_entry(row)

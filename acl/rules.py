"""Access rules: who may use which service on which datasets, and where they live.

A rule names a principal (a user name, or ``*`` for anyone including ``anonymous``), a
service (Echo, Store, Query, Retrieve, Delete, Modify, Admin, or ``*``) and optionally a
dataset pattern (:mod:`acl.patterns`).  ``*`` stands for the four services that destroy
nothing (Echo, Store, Query, Retrieve): Delete and Modify are given only by a rule naming
them, and so is Admin (reading the rules in force and the whole audit trail, which names
every patient anyone asked for: no pattern can narrow it, so an Admin rule has none).
Deny unless a rule allows: a request is allowed when a rule applies to its principal
and service; the patterns of all applicable rules are OR-ed,
and one rule without a pattern lifts the restriction.  :func:`decide` is pure.

Storage (:class:`RuleStore`).  FerretDB has no transactions, so a ruleset is replaced
without ever being seen half-written: the new rules are inserted under a new ruleset
id, then the single pointer document ``acl_state {_id: "active"}`` is switched to it
with one compare-and-swap update, then the old rules are deleted.  Readers only read
the rules of the active ruleset, and check they got as many as the pointer says (the
old ruleset may vanish between the two reads; they then read the pointer again).
A node re-reads the pointer (one ``_id`` lookup) at most every ``refresh_seconds``,
so applied rules take effect within that delay on open associations too.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

from acl.patterns import Compiled, compile_pattern, describe
from archive import dicomjson
from archive.levels import is_mixed
from archive.model import IMAGE, SERIES, STUDY
from archive.query import evaluate
from archive.storage import Admit, Archive, Existing, Part10, StoreRefused, part10_size

log = logging.getLogger("acl.rules")

ECHO, STORE, QUERY, RETRIEVE = "Echo", "Store", "Query", "Retrieve"
#: Services that change or remove what is stored (Modify: the vocabulary only, for now).
DELETE, MODIFY = "Delete", "Modify"
#: Reading the rules in force and the audit trail (the console's admin pages).
ADMIN = "Admin"
SERVICES: tuple[str, ...] = (ECHO, STORE, QUERY, RETRIEVE, DELETE, MODIFY, ADMIN)
#: Services a ``*`` rule does not give: they destroy data or reveal everything, so a
#: rule must name them.
NAMED_ONLY = frozenset({DELETE, MODIFY, ADMIN})
#: Services whose rules take no pattern (nothing they give is a dataset).
UNPATTERNED = frozenset({ADMIN})
ANY = "*"

#: General DIMSE status "Refused: Not authorized" (PS3.7 C.5.x), for every service.
NOT_AUTHORIZED = 0x0124

RULES, STATE, ACTIVE = "acl_rules", "acl_state", "active"
REFRESH_SECONDS = 1.0


# --- rules and decisions (pure) --------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One rule; ``index`` is its 1-based position in its ruleset, ``source`` where it
    was written (``file:line``), for the messages that say which rule decided."""

    principal: str
    service: str
    pattern: dict[str, Any] | None = None
    index: int = 0
    source: str = ""
    #: Move Destinations (AE titles) a Retrieve rule allows C-MOVE to; () = any.
    destinations: tuple[str, ...] = ()
    compiled: Compiled | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compiled", compile_pattern(self.pattern))
        object.__setattr__(self, "destinations", tuple(self.destinations))

    def applies(self, principal: str, service: str) -> bool:
        return self.principal in (ANY, principal) and (
            self.service == service or (self.service == ANY and service not in NAMED_ONLY))

    def reaches(self, destination: str) -> bool:
        """Whether the rule lets a C-MOVE send to ``destination``."""
        return not self.destinations or destination in self.destinations

    @property
    def key(self) -> tuple[str, str, str, tuple[str, ...]]:
        """What makes two rules the same rule, whatever their position."""
        return (self.principal, self.service, json.dumps(self.pattern or {}, sort_keys=True),
                tuple(sorted(self.destinations)))

    def describe(self) -> str:
        where = f", {self.source}" if self.source else ""
        to = f" to {', '.join(self.destinations)}" if self.destinations else ""
        return (f"rule {self.index} ({self.principal} {self.service}{to}: "
                f"{describe(self.pattern)}{where})")


@dataclass(frozen=True)
class Decision:
    """What the rules say about one principal using one service.

    ``patterns`` is empty when ``unrestricted_by`` (a rule without pattern) lifts the
    restriction; then the request takes the archive's ordinary path.
    """

    principal: str
    service: str
    rules: tuple[Rule, ...]
    unrestricted_by: Rule | None
    patterns: tuple[Compiled, ...]

    @property
    def allowed(self) -> bool:
        return bool(self.rules)

    @property
    def restricted(self) -> bool:
        return self.allowed and self.unrestricted_by is None

    def to_destination(self, destination: str) -> Decision:
        """The decision for a C-MOVE to ``destination``: the rules that reach it."""
        return decide(tuple(r for r in self.rules if r.reaches(destination)),
                      self.principal, self.service)

    def instance_filter(self) -> dict[str, Any] | None:
        """Filter of the instance documents this request may touch; None: all."""
        if not self.restricted:
            return None
        filters = [p.filters["IMAGE"] for p in self.patterns]
        return filters[0] if len(filters) == 1 else {"$or": filters}

    def deciding_rule(self, document: Mapping[str, Any] | None = None) -> Rule | None:
        """The first rule allowing this request for an instance document (or for
        the service at all when ``document`` is None); None: denied."""
        if self.unrestricted_by is not None or (document is None and self.rules):
            return self.unrestricted_by or self.rules[0]
        for rule in self.rules:
            if rule.compiled is not None and evaluate(rule.compiled.filters["IMAGE"],
                                                      document or {}):
                return rule
        return None

    def comment(self, document_refused: bool = False, joined: bool = False,
                destination: str = "") -> str:
        """The Error Comment (LO, 64 characters) of a refusal."""
        if destination:
            text = f"not authorized: no {self.service} rule for {self.principal} to {destination}"
        elif joined:
            text = f"not authorized: stored data outside the {self.service} rules"
        elif document_refused:
            text = f"not authorized: dataset outside the {self.service} rules of {self.principal}"
        else:
            text = f"not authorized: no {self.service} rule for {self.principal}"
        return error_comment(text)


def error_comment(text: str) -> str:
    """Error Comment (0000,0902) is LO: 64 characters, no control characters."""
    return "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in text)[:64]


def decide(rules: Iterable[Rule], principal: str, service: str) -> Decision:
    """The decision of the rules for a principal and a service (deny unless allowed)."""
    applicable = tuple(rule for rule in rules if rule.applies(principal, service))
    unrestricted = next((rule for rule in applicable if rule.compiled is None), None)
    patterns = () if unrestricted else tuple(
        rule.compiled for rule in applicable if rule.compiled is not None)
    return Decision(principal, service, applicable, unrestricted, patterns)


#: The rule in force when access control is off (``acl.enabled: false``).
OPEN = Rule(ANY, ANY, None, 0, "acl.enabled: false")


def allow_all(principal: str, service: str) -> Decision:
    """The decision when access control is off: allowed, unrestricted."""
    return Decision(principal, service, (OPEN,), OPEN, ())


def admit_store(decision: Decision, part10: Part10, source: str = ""
                ) -> tuple[Dataset | None, Rule | None, Admit | None]:
    """Whether a C-STORE is allowed: the rule allowing it (None: refused), the dataset
    parsed to judge it (to store without parsing twice) and, for a principal restricted
    by Store patterns, the judge of what the store would replace or join.

    A restricted principal may store a dataset that matches a Store pattern, into a
    series and a study that match it too, replacing only an instance that matches it:
    re-using another patient's SOP Instance UID, or joining another patient's study,
    must not let her overwrite or reveal what she may not store.
    Raises :class:`archive.storage.StoreRefused` for a dataset that cannot be parsed.
    """
    if not decision.restricted:
        return None, decision.deciding_rule(), None
    ds = Archive.parse(part10)
    document = instance_document(ds, part10_size(part10), source)
    rules = [rule for rule in decision.rules if rule.compiled is not None
             and evaluate(rule.compiled.filters[IMAGE], document)]
    if not rules:
        return ds, None, None

    def admit(existing: Existing) -> None:
        if not any(_admits(rule.compiled, existing) for rule in rules  # type: ignore[arg-type]
                   ):
            raise StoreRefused(NOT_AUTHORIZED, decision.comment(joined=True))

    return ds, rules[0], admit


def _admits(pattern: Compiled, existing: Existing) -> bool:
    """Whether what a store replaces or joins is within one Store pattern."""
    if existing.instance is not None and not evaluate(pattern.filters[IMAGE],
                                                      existing.instance):
        return False
    for level, doc in ((SERIES, existing.series), (STUDY, existing.study)):
        if doc is None:
            continue
        if is_mixed(doc, level) or not evaluate(pattern.partial(level), doc):
            return False
    return True


def instance_document(ds: Dataset, size: int = 0, source: str = "") -> dict[str, Any]:
    """The instance document storing ``ds`` would write: what Store rules judge."""
    data = dicomjson.to_json(ds, None)
    transfer_syntax = str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", ""))
    return Archive.instance_document(data, None, transfer_syntax, size, source)


@dataclass(frozen=True)
class Change:
    """What applying a ruleset changes: rules added, rules removed, order changed."""

    added: tuple[Rule, ...]
    removed: tuple[Rule, ...]
    reordered: bool

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.reordered)


def diff(old: Sequence[Rule], new: Sequence[Rule]) -> Change:
    """Rules are compared by principal, service and pattern, as multisets."""
    old_keys, new_keys = Counter(r.key for r in old), Counter(r.key for r in new)
    added_keys, removed_keys = new_keys - old_keys, old_keys - new_keys
    added = _take(new, added_keys)
    removed = _take(old, removed_keys)
    reordered = not added and not removed and [r.key for r in old] != [r.key for r in new]
    return Change(added, removed, reordered)


def _take(rules: Sequence[Rule], keys: Counter[tuple[Any, ...]]) -> tuple[Rule, ...]:
    wanted, taken = Counter(keys), []
    for rule in rules:
        if wanted[rule.key] > 0:
            wanted[rule.key] -= 1
            taken.append(rule)
    return tuple(taken)


# --- storage ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Ruleset:
    """The rules of one ruleset id (None: no ruleset was ever applied)."""

    id: str | None
    rules: tuple[Rule, ...] = ()
    applied_at: datetime.datetime | None = None
    source: str = ""


class ConcurrentApply(Exception):
    """Another ``acl apply`` switched the active ruleset first."""


class RuleStore:
    """The rules in MongoDB: the active ruleset, cached, and its atomic replacement."""

    def __init__(self, db: Database, refresh_seconds: float = REFRESH_SECONDS,
                 available: Callable[[], bool] = lambda: True) -> None:
        self.rules = db[RULES]
        self.state = db[STATE]
        self.refresh_seconds = refresh_seconds
        #: whether the database is worth asking (False: known to be away)
        self.available = available
        self._current = Ruleset(None)
        self._checked = -float("inf")
        self._lock = threading.Lock()
        self._decisions: dict[tuple[str | None, str, str], Decision] = {}

    # -- reading ------------------------------------------------------------------------

    def load(self) -> Ruleset:
        """The active ruleset as stored now (uncached)."""
        for _ in range(5):
            pointer = self.state.find_one({"_id": ACTIVE})
            if pointer is None or pointer.get("ruleset") is None:
                return Ruleset(None)
            docs = list(self.rules.find({"ruleset": pointer["ruleset"]}))
            if len(docs) == pointer.get("count", len(docs)):
                return Ruleset(pointer["ruleset"], self._rules(docs),
                               pointer.get("applied_at"), pointer.get("source", ""))
        raise PyMongoError("the active ruleset kept changing while being read")

    @staticmethod
    def _rules(docs: list[dict[str, Any]]) -> tuple[Rule, ...]:
        rules = []
        for doc in sorted(docs, key=lambda d: d.get("index", 0)):
            try:
                rules.append(Rule(str(doc["principal"]), str(doc["service"]),
                                  doc.get("pattern") or None, int(doc.get("index", 0)),
                                  str(doc.get("source", "")),
                                  tuple(str(d) for d in doc.get("destinations") or ())))
            except Exception as exc:  # noqa: BLE001 - PatternError, or JSON edited by hand
                # Unusable: dropping it only denies more.
                log.error("ignoring unusable rule %s: %s", doc.get("_id"), exc)
        return tuple(rules)

    def current(self) -> Ruleset:
        """The active ruleset, re-reading the pointer at most every refresh_seconds.

        While the database does not answer the last known rules stay in force; before
        they were ever read, there are none (everything denied).  While it is known to be
        away it is not asked: a request would wait out the driver's timeout for nothing.
        """
        if time.monotonic() - self._checked < self.refresh_seconds or not self.available():
            return self._current
        if not self._lock.acquire(blocking=False):
            return self._current  # another thread is refreshing
        try:
            pointer = self.state.find_one({"_id": ACTIVE}, {"ruleset": 1})
            active = pointer.get("ruleset") if pointer else None
            if active != self._current.id:
                ruleset = self.load()
                self._current, self._decisions = ruleset, {}
                log.info("access rules: ruleset %s active, %d rules", ruleset.id,
                         len(ruleset.rules))
        except Exception as exc:  # noqa: BLE001 - database away: the last rules stay
            log.warning("access rules not refreshed, keeping ruleset %s: %s",
                        self._current.id, exc)
        finally:
            self._checked = time.monotonic()
            self._lock.release()
        return self._current

    def decide(self, principal: str, service: str) -> Decision:
        """:func:`decide` over the current rules, memoised per ruleset.

        Never raises: whatever goes wrong denies (a C-ECHO handler that raises would
        be answered Success by pynetdicom).
        """
        try:
            return self._decide(principal, service)
        except Exception:  # noqa: BLE001 - fail closed
            log.exception("access decision failed for %s %s: denied", principal, service)
            return decide((), principal, service)

    def _decide(self, principal: str, service: str) -> Decision:
        ruleset = self.current()
        key = (ruleset.id, principal, service)
        decision = self._decisions.get(key)
        if decision is None:
            decision = decide(ruleset.rules, principal, service)
            if len(self._decisions) > 10000:
                self._decisions = {}
            self._decisions[key] = decision
        return decision

    # -- replacing ----------------------------------------------------------------------

    def apply(self, rules: Sequence[Rule], source: str = "",
              dry_run: bool = False) -> Change:
        """Make ``rules`` the active ruleset, atomically for readers; what changed.

        Nothing is written when nothing changes (``apply(export())`` is a no-op) or
        on a dry run.  Raises ConcurrentApply when another apply won the race.
        """
        current = self.load()
        change = diff(current.rules, rules)
        if dry_run or not change:
            return change
        ruleset = uuid.uuid4().hex
        now = datetime.datetime.now(datetime.timezone.utc)
        docs = [{"ruleset": ruleset, "index": i, "principal": r.principal,
                 "service": r.service, "pattern": r.pattern, "source": r.source,
                 **({"destinations": list(r.destinations)} if r.destinations else {})}
                for i, r in enumerate(rules, 1)]
        if docs:
            self.rules.insert_many(docs)
        pointer = {"ruleset": ruleset, "count": len(docs), "applied_at": now, "source": source}
        try:
            result = self.state.update_one({"_id": ACTIVE, "ruleset": current.id},
                                           {"$set": pointer}, upsert=current.id is None)
            switched = result.matched_count == 1 or result.upserted_id is not None
        except DuplicateKeyError:
            switched = False
        if not switched:
            self.rules.delete_many({"ruleset": ruleset})
            raise ConcurrentApply("another apply changed the rules meanwhile; nothing changed")
        # Old rulesets and leftovers of interrupted applies: readers no longer see them.
        self.rules.delete_many({"ruleset": {"$ne": ruleset}})
        return change

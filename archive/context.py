"""The core context: what every front end of one archive process serves, built once.

The DICOM node (:mod:`archive.dimse.node`) and the HTTP front end receive one
:class:`Context` from the command line instead of building storage, the finder, the
access rules and the audit trail each: both then see the same database health, the same
cached rules, the same stores in flight, and stopping one archive stops them all.  It
knows no front end: a front end starts after it and stops before it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pymongo.errors import PyMongoError

from acl import auth, identity, tokens, visibility, yamlrules
from acl.audit import AuditLog
from acl.rules import DELETE, NOT_AUTHORIZED, Decision, Rule, RuleStore, admit_store, allow_all
from archive import rejection
from archive.answers import Syntax
from archive.config import Config
from archive.deletion import Selection
from archive.find import Finder, unique_key_filter
from archive.health import DatabaseHealth
from archive.modification import HISTORY
from archive.query import Query
from archive.storage import (
    OUT_OF_RESOURCES,
    Admit,
    Ahead,
    Archive,
    Part10,
    StoreOutcome,
    StoreRefused,
    connect,
    ensure_indexes,
)

log = logging.getLogger("archive.node")  # what the node logged when it built these


@dataclass(frozen=True)
class Stored:
    """What storing one Part-10 file for a principal came to (:meth:`Context.store_as`)."""

    #: the status the front end answers (C-STORE status, STOW-RS Failure Reason)
    outcome: StoreOutcome
    #: the Store rule that let it through (None: refused before, or an error)
    rule: Rule | None = None
    #: the dataset as parsed (None: it could not be)
    ds: Dataset | None = None
    #: refused because the archive is stopping (nothing was read)
    stopping: bool = False
    #: an unexpected failure, for the front end to log (the outcome says 0xA700)
    error: Exception | None = None
    #: a rejection note stored: what it rejected (archive.rejection)
    rejection: rejection.Rejection | None = None

    @property
    def outside_rules(self) -> bool:
        """Refused by the principal's Store patterns: the dataset matches none."""
        return self.rule is None and self.outcome.status == NOT_AUTHORIZED


@dataclass(frozen=True)
class Deleted:
    """What a delete for a principal came to (:meth:`Context.delete_as`)."""

    #: the instances selected (those of the principal's Delete rules), all deleted
    selection: Selection
    #: refused because the archive is stopping (nothing was read)
    stopping: bool = False


@dataclass(frozen=True)
class Corrected:
    """What a correction or restore for a principal came to (:meth:`Context.modify_as`,
    :meth:`Context.restore_as`)."""

    #: the instances selected (a restore: those corrected)
    selection: Selection
    #: the values set, the patient attributes a new PatientID adopts included
    changes: dict[int, Any] = field(default_factory=dict)
    #: why the correction is refused, nothing changed (a PatientID for part of a study)
    refusal: str = ""
    #: corrected (restored), left as re-sent meanwhile, left as they had the values
    done: int = 0
    left: int = 0
    unchanged: int = 0
    #: refused because the archive is stopping (nothing was read)
    stopping: bool = False


class Context:
    """Database, storage, finder, access rules, audit trail, authentication and bearer
    tokens of one archive process, and its bookkeeping of stores in flight."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.client = connect(cfg.database.uri, cfg.database.timeout_seconds)
        self.db = self.client[cfg.database.name]
        #: whether the database answers; requests needing it are refused while it does not
        self.health = DatabaseHealth(self.db)
        self.archive = Archive(self.db, cfg.database.gridfs_bucket, cfg.duplicate_policy,
                               cfg.journal, cfg.hierarchy_conflicts, self.health,
                               write_behind=cfg.write_behind_seconds)
        #: set when the archive stops: stores are refused from then on
        self.stopping = threading.Event()
        self._in_flight = 0
        self._in_flight_cond = threading.Condition()
        #: queries read level documents after the batched updates are written
        self.finder = Finder(self.db, cfg.ae_title, barrier=self.archive.flush)
        #: Access rules (cached, re-read every acl.refresh_seconds) and the audit trail.
        self.rules = RuleStore(self.db, cfg.acl.refresh_seconds,
                               available=lambda: self.health.up)
        self.audit = AuditLog(self.db)
        self.authenticator = auth.from_config(cfg.auth)
        log.info("authentication: %s", self.authenticator.describe())
        #: Wrong-passcode limits and check slots around the backend (acl.throttle).
        self.guard = auth.Guard(cfg.auth.throttle)
        #: Bearer tokens ``archive token`` issued, for DICOMweb (acl.tokens).
        self.tokens = tokens.TokenStore(self.db)
        #: auth.ae_principals, bound to addresses / certificates (acl.identity).
        self.ae_bindings = identity.bindings(cfg.auth)
        self._mappings_checked: object = ()
        #: the options of archive.query.translate, the same for every front end
        self.query_options: dict[str, Any] = {
            "pn_case_insensitive": cfg.query.pn_case_insensitive,
            "combined_datetime": cfg.query.combined_datetime}

    # -- who may do what --------------------------------------------------------------

    def authorize(self, principal: str, service: str) -> Decision:
        """What the access rules say about ``principal`` using ``service`` (Echo, Store,
        Query, Retrieve); everything is allowed with ``acl.enabled: false``."""
        if not self.cfg.acl.enabled:
            return allow_all(principal, service)
        return self.rules.decide(principal, service)

    def warn_about_mappings(self) -> None:
        """One warning per AE-title mapping granting broad rights, open to wide
        networks, or inactive; again whenever the active ruleset changes."""
        if not self.ae_bindings:
            return
        if not self.cfg.acl.enabled:
            ruleset_id: object = "acl disabled"
            rules: tuple[Rule, ...] = tuple(Rule(b.principal, "*", None, 0, "acl.enabled: false")
                                            for b in self.ae_bindings.values())
        else:
            ruleset = self.rules.current()
            ruleset_id, rules = ruleset.id, ruleset.rules
        if ruleset_id == self._mappings_checked:
            return
        self._mappings_checked = ruleset_id
        for line in identity.broad_mappings(self.ae_bindings, rules, self.authenticator.name,
                                            self.cfg.auth.ae_principals_without_password):
            log.warning("%s", line)

    # -- what a front end asks for ---------------------------------------------------

    def store_as(self, decision: Decision, part10: Part10, source: str,
                 check: Callable[[Dataset], StoreOutcome | None] | None = None) -> Stored:
        """Store one Part-10 file (bytes, or the path of its file) for the principal
        ``decision`` is about, allowed to store: counted in flight, parsed, judged by its
        Store patterns when restricted (:func:`acl.rules.admit_store`), then ``check``
        (the front end's own condition: an outcome refuses), then stored.  Never raises.
        """
        if not self.begin_store():
            return Stored(StoreOutcome(OUT_OF_RESOURCES, "archive is shutting down"),
                          stopping=True)
        ds: Dataset | None = None
        ahead: Ahead | None = None
        try:
            # the file written while the dataset is parsed (taken back if refused)
            ahead = self.archive.send_ahead(part10) if decision.allowed else None
            try:
                if decision.restricted:  # the dataset must match a Store rule's pattern
                    ds, rule, admit = admit_store(decision, part10, source)
                else:
                    ds, rule, admit = Archive.parse(part10), decision.deciding_rule(), None
            except StoreRefused as exc:
                return Stored(StoreOutcome(exc.status, exc.comment))
            assert ds is not None
            sop_uid = str(ds.SOPInstanceUID).strip()
            if rule is None:
                return Stored(StoreOutcome(NOT_AUTHORIZED, decision.comment(
                    document_refused=True), sop_uid), None, ds)
            refused = check(ds) if check is not None else None
            if refused is not None:
                return Stored(refused, rule, ds)
            try:
                note = rejection.note_of(ds)
            except rejection.Refused as exc:
                return Stored(StoreOutcome(exc.status, exc.comment, sop_uid), rule, ds)
            if note is not None:
                return self._store_note(decision, note, part10, source, ds, rule, admit)
            return Stored(self.archive.store(part10, source=source, ds=ds, admit=admit,
                                             ahead=ahead), rule, ds)
        except Exception as exc:  # noqa: BLE001 - the front end keeps serving
            return Stored(StoreOutcome(OUT_OF_RESOURCES,
                                       f"internal error: {type(exc).__name__}"),
                          ds=ds, error=exc)
        finally:
            if ahead is not None:
                ahead.release()
            self.end_store()

    def _store_note(self, decision: Decision, note: rejection.Note, part10: Part10,
                    source: str, ds: Dataset, rule: Rule, admit: Admit | None) -> Stored:
        """Store a rejection note and reject what it references, both or neither
        (:mod:`archive.rejection`): the sender needs a Delete rule; restricted by its
        patterns, what they do not match is answered as what does not exist."""
        may = self.authorize(decision.principal, DELETE)
        if not may.allowed:
            return Stored(StoreOutcome(NOT_AUTHORIZED, may.comment(), note.sop), rule, ds)
        if not self.health.up:
            return Stored(StoreOutcome(OUT_OF_RESOURCES, "database unavailable", note.sop),
                          rule, ds)
        try:
            outcome, done = self.archive.store_note(note, may.instance_filter(),
                                                    decision.principal, part10, source, ds,
                                                    admit)
        except rejection.Refused as exc:
            return Stored(StoreOutcome(exc.status, exc.comment, note.sop), rule, ds)
        except PyMongoError as exc:  # before the note was stored: nothing done
            self.health.suspect(exc)
            return Stored(StoreOutcome(OUT_OF_RESOURCES, f"database error: "
                                       f"{type(exc).__name__}"[:64], note.sop), rule, ds)
        return Stored(outcome, rule, ds, rejection=done)

    def answers(self, decision: Decision, query: Query, identifier: Dataset, model: str,
                syntax: Syntax | None = None) -> Iterator[Dataset]:
        """The C-FIND answers to ``query`` (``identifier`` translated for ``model`` with
        :attr:`query_options`) that the principal of ``decision`` may see: all of them,
        or, when restricted, those of her patterns (:func:`acl.visibility.responses`)."""
        if decision.restricted:
            return visibility.responses(self.finder, query, identifier, decision.patterns,
                                        model, syntax, **self.query_options)
        return self.finder.responses(query, identifier, syntax=syntax)

    def delete_as(self, decision: Decision, level: str, identifier: Dataset) -> Deleted:
        """Delete what a resource's unique keys (``identifier`` at ``level``) name, of
        what the principal of ``decision`` (allowed to delete) may delete: every
        instance, or when restricted those her Delete patterns match -- the others are
        neither deleted nor told of.  Counted in flight as a store is (a stopping
        archive lets it finish).  Raises DeleteIncomplete, PyMongoError."""
        if not self.begin_store():
            return Deleted(Selection(), stopping=True)
        try:
            selection = self.deletable(decision, level, identifier)
            if selection.instances:
                self.archive.delete(selection.instances, selection.rejected)
            return Deleted(selection)
        finally:
            self.end_store()

    def deletable(self, decision: Decision, level: str, identifier: Dataset) -> Selection:
        """What :meth:`delete_as` would delete now, deleting nothing (a confirmation
        names it).  Raises PyMongoError."""
        keys = unique_key_filter(identifier, level)
        restriction = decision.instance_filter()
        return self.archive.select(keys if restriction is None
                                   else {"$and": [restriction, keys]}, rejected=True)

    # -- corrections ------------------------------------------------------------------

    def correctable(self, decision: Decision, level: str, identifier: Dataset,
                    corrected: bool = False) -> Selection:
        """The instances a correction (``corrected``: a restore) of what a resource's
        unique keys name would take: all of them, for a principal with a Modify rule
        without pattern -- the only one who corrects (what a restricted one may do is
        left undecided: :mod:`archive.web.console.correcting`).  Raises PermissionError,
        PyMongoError."""
        if not decision.allowed or decision.restricted:
            raise PermissionError("corrections take a Modify rule without pattern")
        selection = self.archive.select(unique_key_filter(identifier, level))
        if corrected:
            with_history = {d["_id"] for d in self.archive.instances.find(
                {"_id": {"$in": [d["_id"] for d in selection.instances]},
                 HISTORY: {"$exists": True}}, {"_id": 1})}
            selection = Selection([d for d in selection.instances if d["_id"] in with_history],
                                  selection.in_flight)
        return selection

    def correction(self, selection: Selection, changes: dict[int, Any]) -> Corrected:
        """What correcting ``selection`` with ``changes`` would do, changing nothing (a
        confirmation names it): the changes completed with the patient attributes a
        new PatientID adopts, or why it is refused."""
        adopted = self.archive.modifier.adopted(changes)
        return Corrected(selection, adopted,
                         self.archive.modifier.refusal(selection.instances, adopted) or "")

    def modify_as(self, decision: Decision, level: str, identifier: Dataset,
                  changes: dict[int, Any], reason: str, system: str) -> Corrected:
        """Correct what a resource's unique keys name (:meth:`correctable`) as
        ``archive modify`` does (:meth:`archive.storage.Archive.modify`), for the
        principal of ``decision``, recorded in each instance's history.  Counted in
        flight as a store is.  Raises BadChange, ModifyIncomplete, PermissionError,
        PyMongoError."""
        if not self.begin_store():
            return Corrected(Selection(), stopping=True)
        try:
            planned = self.correction(self.correctable(decision, level, identifier), changes)
            if planned.refusal or not planned.selection.instances:
                return planned
            done, left, same = self.archive.modify(
                planned.selection.instances, planned.changes, decision.principal, reason,
                system)
            return Corrected(planned.selection, planned.changes, "", done, left, same)
        finally:
            self.end_store()

    def restore_as(self, decision: Decision, level: str, identifier: Dataset) -> Corrected:
        """Make the corrected instances a resource names their originals again
        (:meth:`archive.storage.Archive.restore`).  Raises ModifyIncomplete,
        PermissionError, PyMongoError."""
        if not self.begin_store():
            return Corrected(Selection(), stopping=True)
        try:
            selection = self.correctable(decision, level, identifier, corrected=True)
            if not selection.instances:
                return Corrected(selection)
            done, left, _ = self.archive.restore(selection.instances)
            return Corrected(selection, done=done, left=left)
        finally:
            self.end_store()

    # -- stores in flight -------------------------------------------------------------

    def begin_store(self) -> bool:
        """Count a store (or delete) in flight; False once the archive is stopping."""
        with self._in_flight_cond:
            if self.stopping.is_set():
                return False
            self._in_flight += 1
            return True

    def end_store(self) -> None:
        with self._in_flight_cond:
            self._in_flight -= 1
            self._in_flight_cond.notify_all()

    def drain(self, grace_seconds: float) -> None:
        """Wait, ``grace_seconds`` at most, for the stores in flight to finish (a front
        end stopping: after it refused new work, before it closes its connections)."""
        deadline = time.monotonic() + grace_seconds
        with self._in_flight_cond:
            while self._in_flight and time.monotonic() < deadline:
                self._in_flight_cond.wait(0.2)

    def maybe_reconcile(self) -> None:
        """Replay the journal if a past failure left work there (cheap when empty)."""
        if self.archive.pending():
            try:
                self.archive.reconcile()
            except Exception as exc:  # noqa: BLE001 - database still away: retry later
                self.health.suspect(exc)
                log.warning("journal replay postponed: %s", exc)

    # -- running ----------------------------------------------------------------------

    def _initial_rules(self) -> None:
        """On a database that never had a ruleset, apply ``acl.initial_rules`` once."""
        path = self.cfg.acl.initial_rules
        if not path or self.rules.load().id is not None:
            return
        try:
            rules = yamlrules.load(path)
        except yamlrules.RulesFileError as exc:
            log.warning("initial access rules %s not applied: %s", path, exc)
            return
        self.rules.apply(rules, source=path)
        log.info("first start: applied the %d access rules of %s", len(rules), path)

    def start(self) -> None:
        """Indexes, health checks, journal replay, audit writer, batched level updates,
        initial rules, then the housekeeping (and startup check) threads: before any
        front end takes requests."""
        ensure_indexes(self.db, self.cfg.database.gridfs_bucket)
        self.health.start()
        self.maybe_reconcile()
        self.audit.start()
        self.archive.start()  # the writer of batched level updates
        if self.cfg.acl.enabled:
            self._initial_rules()
            ruleset = self.rules.current()
            log.info("access control: %d rules (ruleset %s)%s", len(ruleset.rules),
                     ruleset.id, "" if ruleset.rules else
                     ": every request is denied until `archive acl apply` gives rules")
        else:
            log.warning("access control disabled (acl.enabled: false): everything allowed")
        self.warn_about_mappings()
        threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True).start()
        if self.cfg.startup_check == "full":
            threading.Thread(target=self._full_check, name="startup-check", daemon=True).start()

    def _full_check(self) -> None:
        """``archive check --repair`` while serving (startup_check: full): finds what a
        lost journal left behind; files of stores in flight are younger than the grace."""
        from archive.check import check

        try:
            report = check(self.archive, repair=True)
        except Exception as exc:  # noqa: BLE001 - the database away: the next start
            log.warning("startup check not completed: %s", exc)
            return
        (log.info if report.clean else log.warning)(
            "startup check: %d instances, %d files, %d problems found, %d repaired%s",
            report.instances, report.files, len(report.problems), len(report.repaired),
            "".join(f"; {p}" for p in report.problems[:5]))

    def _housekeeping(self) -> None:
        while not self.stopping.wait(5.0):
            # While the database is away the replay would only wait out its timeouts.
            if self.health.up:
                self.maybe_reconcile()
            self.warn_about_mappings()

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Refuse new stores, let those in flight finish, write the batched level updates,
        then close the audit trail, the health checks and the database connection (after
        the front ends stopped)."""
        self.stopping.set()
        self.drain(grace_seconds)
        self.archive.close()  # batched level updates written before the database goes
        self.audit.stop()
        self.health.stop()
        self.client.close()
        log.info("stopped")

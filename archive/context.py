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

from acl import auth, identity, yamlrules
from acl.audit import AuditLog
from acl.rules import Decision, Rule, RuleStore, allow_all
from archive.config import Config
from archive.find import Finder
from archive.health import DatabaseHealth
from archive.storage import Archive, connect, ensure_indexes

log = logging.getLogger("archive.node")  # what the node logged when it built these


class Context:
    """Database, storage, finder, access rules, audit trail and authentication of one
    archive process, and its bookkeeping of stores in flight."""

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
        #: auth.ae_principals, bound to addresses / certificates (acl.identity).
        self.ae_bindings = identity.bindings(cfg.auth)
        self._mappings_checked: object = ()

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

    # -- stores in flight -------------------------------------------------------------

    def begin_store(self) -> bool:
        """Count a store in flight; False once the archive is stopping."""
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

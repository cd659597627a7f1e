"""The DICOM node: an Application Entity serving the archive's services.

It wires configuration, storage and the service handlers together, sets TCP_NODELAY on
every association socket, logs each association, and stops gracefully: on SIGINT or
SIGTERM it refuses new work, lets the stores in flight finish, then closes.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationServer

from acl import auth, identity, yamlrules
from acl.audit import AuditLog
from acl.rules import Decision, Rule, RuleStore, allow_all
from archive import answers
from archive.config import Config, display_uri
from archive.dimse import connections, find_messages, negotiation, retrieve, services
from archive.dimse.receiving import Receiver
from archive.find import Finder
from archive.health import DatabaseHealth
from archive.storage import Archive, connect, ensure_indexes

log = logging.getLogger("archive.node")

ANONYMOUS = identity.ANONYMOUS


class _DeferredHandshake(ssl.SSLContext):
    """A server context whose handshake happens on the first read.

    pynetdicom wraps accepted sockets inside its accept loop, on a socket without a
    timeout: one client that connects and stays silent would stall every later
    association.  Deferred, the handshake runs in the association's own thread.
    """

    def wrap_socket(self, sock: Any, server_side: bool = False,  # type: ignore[override]
                    do_handshake_on_connect: bool = True, *args: Any, **kwargs: Any) -> Any:
        return super().wrap_socket(sock, server_side, False, *args, **kwargs)


def _ssl_context(cfg: Config) -> ssl.SSLContext | None:
    if not cfg.tls.certificate:
        return None
    context = _DeferredHandshake(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cfg.tls.certificate, cfg.tls.private_key or None)
    if cfg.tls.ca_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cfg.tls.ca_certificate)
    return context


class Node:
    """A running archive node (one per process)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.client = connect(cfg.database.uri, cfg.database.timeout_seconds)
        self.db = self.client[cfg.database.name]
        #: whether the database answers; requests needing it are refused while it does not
        self.health = DatabaseHealth(self.db)
        self.archive = Archive(self.db, cfg.database.gridfs_bucket, cfg.duplicate_policy,
                               cfg.journal, cfg.hierarchy_conflicts, self.health,
                               write_behind=cfg.write_behind_seconds)
        #: C-STORE datasets arrive in memory, or in files of receive.folder when large
        #: (archive.receiving).
        self.receiver = Receiver(cfg.receive.folder, cfg.receive.in_memory_max_bytes)
        self.stopping = threading.Event()
        self._in_flight = 0
        self._in_flight_cond = threading.Condition()
        #: queries read level documents after the batched updates are written
        self.finder = Finder(self.db, cfg.ae_title, barrier=self.archive.flush)
        #: Verified user identity of each association, keyed by id(association); filled
        #: by the EVT_USER_ID handler, emptied when the association ends.
        self.identities: dict[int, str] = {}
        self.server: AssociationServer | None = None
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
        #: Slots per peer and the deadline of every connection phase (archive.connections).
        self.connections = connections.ConnectionGuard(cfg.connections, cfg.max_associations)
        self.ae = self._make_ae()

    # -- set-up -----------------------------------------------------------------------

    def _make_ae(self) -> AE:
        cfg = self.cfg
        ae = AE(ae_title=cfg.ae_title)
        # The guard counts associations (max_associations) and connections awaiting one
        # (connections.max_pending) apart; pynetdicom counts both against its maximum.
        limits = cfg.connections
        ae.maximum_associations = cfg.max_associations + limits.max_pending
        ae.network_timeout = limits.network_timeout
        ae.dimse_timeout = limits.dimse_timeout
        ae.acse_timeout = limits.acse_timeout
        # Sub-associations (C-MOVE destinations): give up on a silent host in bounded
        # time, and send stored files as they are, never decoded (archive.retrieve).
        ae.connection_timeout = retrieve.CONNECT_TIMEOUT
        _config.STORE_SEND_CHUNKED_DATASET = True
        self.receiver.install()  # and received into a file when large, never assembled
        syntaxes = (list(ALL_TRANSFER_SYNTAXES) if cfg.accept.transfer_syntaxes == "all"
                    else list(cfg.accept.transfer_syntaxes))
        if cfg.accept.sop_classes == "all":
            classes = [cx.abstract_syntax for cx in AllStoragePresentationContexts]
        else:
            classes = list(cfg.accept.sop_classes)
        for uid in classes:  # roles: a C-GET requestor takes the SCP role (PS3.7 D.3.3.4)
            ae.add_supported_context(uid, syntaxes, scu_role=True, scp_role=True)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES[:4])
        for uid in services.MODELS:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES[:4])
        _config.UNRESTRICTED_STORAGE_SERVICE = cfg.accept.unknown_sop_classes
        # pynetdicom formats every identifier (C-FIND answers included) and every message
        # for its log even when its logger drops them: only when it keeps them.
        pynetdicom_log = logging.getLogger("pynetdicom")
        verbose = pynetdicom_log.isEnabledFor(logging.INFO)
        _config.LOG_REQUEST_IDENTIFIERS = verbose
        _config.LOG_RESPONSE_IDENTIFIERS = pynetdicom_log.isEnabledFor(logging.DEBUG)
        _config.LOG_HANDLER_LEVEL = "standard" if verbose else "none"
        answers.install()  # C-FIND answers written without pydicom's writer
        find_messages.install(not verbose)  # and their command sets
        negotiation.install()
        auth.install()
        self.transfer_syntaxes = syntaxes
        return ae

    def handlers(self) -> list[tuple[Any, Any]]:
        return services.handlers(self)

    # -- who asks ---------------------------------------------------------------------

    def principal(self, assoc: Any) -> str:
        """Who an association acts for: its user identity, else the principal its calling
        AE title is mapped to *from that address* (acl.identity), else ``anonymous``."""
        return auth.principal_of(assoc, self).name

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

    def authorize(self, assoc: Any, service: str) -> tuple[str, Decision]:
        """The principal of an association and what the access rules say about its
        using ``service`` (Echo, Store, Query, Retrieve)."""
        principal = self.principal(assoc)
        if not self.cfg.acl.enabled:
            return principal, allow_all(principal, service)
        return principal, self.rules.decide(principal, service)

    # -- bookkeeping used by the handlers ---------------------------------------------

    def begin_store(self) -> bool:
        """Count a store in flight; False once the node is stopping."""
        with self._in_flight_cond:
            if self.stopping.is_set():
                return False
            self._in_flight += 1
            return True

    def end_store(self) -> None:
        with self._in_flight_cond:
            self._in_flight -= 1
            self._in_flight_cond.notify_all()

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
        self.receiver.prepare()  # what a crash left of datasets being received
        self.server = connections.start_server(
            self.ae, self.connections, (self.cfg.bind_address, self.cfg.port),
            evt_handlers=self.handlers(), ssl_context=_ssl_context(self.cfg))
        negotiation.share_contexts(self.server)
        threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True).start()
        if self.cfg.startup_check == "full":
            threading.Thread(target=self._full_check, name="startup-check", daemon=True).start()
        log.info("%s listening on %s:%d (database %s at %s)", self.cfg.ae_title,
                 self.cfg.bind_address, self.cfg.port, self.cfg.database.name,
                 display_uri(self.cfg.database.uri))

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
        """Refuse new work, let stores in flight finish, then close every association."""
        self.stopping.set()
        log.info("stopping: waiting for stores in flight")
        if self.server is not None:
            self.server.shutdown()
        deadline = time.monotonic() + grace_seconds
        with self._in_flight_cond:
            while self._in_flight and time.monotonic() < deadline:
                self._in_flight_cond.wait(0.2)
        self.connections.close_unassociated()  # nothing for an abort to wait on
        assocs = list(self.server.active_associations) if self.server else []
        for assoc in assocs:
            assoc.abort()
        self.ae.shutdown()
        self.connections.stop()
        self.archive.close()  # batched level updates written before the database goes
        self.audit.stop()
        self.health.stop()
        self.client.close()
        log.info("stopped")

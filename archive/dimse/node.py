"""The DICOM node: an Application Entity serving the archive's core over DIMSE.

It receives the core :class:`~archive.context.Context` (storage, finder, rules, audit,
authentication) from the command line and adds what DICOM alone needs: the AE and its
presentation contexts, the slots and deadlines of connections, TLS, the user identities
of associations and the service handlers.  It sets TCP_NODELAY on every association
socket, logs each association, and stops gracefully: it refuses new work, lets the
stores in flight finish, then closes its associations (the context stops after it).
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationServer

from acl import identity
from acl.rules import Decision
from archive.config import Config, display_uri
from archive.context import Context
from archive.dimse import (
    answer_writer,
    commitment,
    connections,
    negotiation,
    reactors,
    responses,
    retrieve,
    services,
    user_identity,
)
from archive.dimse.common import MODELS, set_nodelay
from archive.dimse.receiving import Receiver

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
    """The DICOM front end of a running archive (one per process)."""

    def __init__(self, context: Context) -> None:
        self.context = context
        cfg = context.cfg
        #: C-STORE datasets arrive in memory, or in files of receive.folder when large
        #: (archive.dimse.receiving).
        self.receiver = Receiver(cfg.receive.folder, cfg.receive.in_memory_max_bytes)
        #: Verified user identity of each association, keyed by id(association); filled
        #: by the EVT_USER_ID handler, emptied when the association ends.
        self.identities: dict[int, str] = {}
        self.server: AssociationServer | None = None
        #: Slots per peer and the deadline of every connection phase
        #: (archive.dimse.connections).
        self.connections = connections.ConnectionGuard(cfg.connections, cfg.max_associations)
        self.ae = self._make_ae()
        #: Storage commitment requests being checked or reported (archive.dimse.commitment)
        self.commitments = commitment.Committer(self)

    # -- set-up -----------------------------------------------------------------------

    def _make_ae(self) -> AE:
        cfg = self.context.cfg
        ae = AE(ae_title=cfg.ae_title)
        # The guard counts associations (max_associations) and connections awaiting one
        # (connections.max_pending) apart; pynetdicom counts both against its maximum.
        limits = cfg.connections
        ae.maximum_associations = cfg.max_associations + limits.max_pending
        ae.maximum_pdu_size = cfg.max_pdu_length
        ae.network_timeout = limits.network_timeout
        ae.dimse_timeout = limits.dimse_timeout
        ae.acse_timeout = limits.acse_timeout
        # Sub-associations (C-MOVE destinations): give up on a silent host in bounded
        # time, and send stored files as they are, never decoded (archive.dimse.retrieve).
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
        for uid in MODELS:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES[:4])
        ae.add_supported_context(commitment.PUSH_MODEL, ALL_TRANSFER_SYNTAXES[:4])
        _config.UNRESTRICTED_STORAGE_SERVICE = cfg.accept.unknown_sop_classes
        # pynetdicom formats every identifier (C-FIND answers included) and every message
        # for its log even when its logger drops them: only when it keeps them.
        pynetdicom_log = logging.getLogger("pynetdicom")
        verbose = pynetdicom_log.isEnabledFor(logging.INFO)
        _config.LOG_REQUEST_IDENTIFIERS = verbose
        _config.LOG_RESPONSE_IDENTIFIERS = pynetdicom_log.isEnabledFor(logging.DEBUG)
        _config.LOG_HANDLER_LEVEL = "standard" if verbose else "none"
        answer_writer.install()  # C-FIND answers written without pydicom's writer
        responses.install(not verbose)  # and their command sets
        negotiation.install()
        user_identity.install()
        reactors.install()  # reactor threads woken by work, not polling every 1 ms
        self.transfer_syntaxes = syntaxes
        return ae

    def handlers(self) -> list[tuple[Any, ...]]:
        """Event bindings for :meth:`pynetdicom.AE.start_server`: each handler is given
        this node (:class:`archive.dimse.common.Serving`)."""
        return [
            (evt.EVT_C_ECHO, services.handle_echo, [self]),
            (evt.EVT_C_STORE, services.handle_store, [self]),
            (evt.EVT_C_FIND, services.handle_find, [self]),
            (evt.EVT_C_MOVE, retrieve.handle_move, [self]),
            (evt.EVT_C_GET, retrieve.handle_get, [self]),
            (evt.EVT_N_ACTION, commitment.handle_action, [self.commitments]),
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_CONN_CLOSE, self.receiver.discard_partial),
            (evt.EVT_ACCEPTED, services.association_logger("accepted"), [self]),
            (evt.EVT_RELEASED, services.association_logger("released"), [self]),
            (evt.EVT_ABORTED, services.association_logger("aborted"), [self]),
            (evt.EVT_REJECTED, services.association_logger("rejected"), [self]),
            # EVT_USER_ID, and forgetting identities at the end
            *user_identity.handlers(self),
        ]

    # -- who asks ---------------------------------------------------------------------

    def principal(self, assoc: Any) -> str:
        """Who an association acts for: its user identity, else the principal its calling
        AE title is mapped to *from that address* (acl.identity), else ``anonymous``."""
        return user_identity.principal_of(assoc, self).name

    def authorize(self, assoc: Any, service: str) -> tuple[str, Decision]:
        """The principal of an association and what the access rules say about its
        using ``service`` (Echo, Store, Query, Retrieve)."""
        principal = self.principal(assoc)
        return principal, self.context.authorize(principal, service)

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        """Take associations (after :meth:`Context.start`)."""
        cfg = self.context.cfg
        self.receiver.prepare()  # what a crash left of datasets being received
        self.server = connections.start_server(
            self.ae, self.connections, (cfg.bind_address, cfg.port),
            evt_handlers=self.handlers(), ssl_context=_ssl_context(cfg))
        negotiation.share_contexts(self.server)
        log.info("%s listening on %s:%d (database %s at %s)", cfg.ae_title,
                 cfg.bind_address, cfg.port, cfg.database.name,
                 display_uri(cfg.database.uri))

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Refuse new work, let stores in flight finish, then close every association
        (before :meth:`Context.stop`, which writes what is batched and closes the
        database)."""
        self.context.stopping.set()
        log.info("stopping: waiting for stores in flight")
        if self.server is not None:
            self.server.shutdown()
        self.context.drain(grace_seconds)
        self.commitments.stop()  # reports waiting to be retried are given up, logged
        self.connections.close_unassociated()  # nothing for an abort to wait on
        assocs = list(self.server.active_associations) if self.server else []
        for assoc in assocs:
            assoc.abort()
        self.ae.shutdown()
        self.connections.stop()

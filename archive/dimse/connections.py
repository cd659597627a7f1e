"""Connection slots and deadlines: what one peer may hold, and for how long.

pynetdicom 3.0 lets a hostile peer hold the node.  It counts every acceptor thread
against ``maximum_associations``, connections that never sent an A-ASSOCIATE-RQ
included; accepted sockets have no timeout, so a partial PDU blocks the reading thread
for as long as the peer keeps the connection open; and its ARTIM and idle timers are
only looked at between whole PDUs.  Ten connections sending half an A-ASSOCIATE-RQ took
every slot for good.

Here every accepted connection is a :class:`Connection` in one phase at a time, each
with a deadline that a watchdog thread enforces by shutting the socket down (which also
wakes a thread blocked in ``recv`` or ``send``):

===========  ============================================  ==============================
phase        while                                         closed after
===========  ============================================  ==============================
request      TCP connected (TLS handshake included), no    ``request_timeout`` from the
             complete A-ASSOCIATE-RQ yet                   connection, however it trickles
negotiation  the node decides (authentication)             ``acse_timeout``
idle         associated, no message in progress            ``network_timeout`` since the
                                                           last message or answer
message      a DIMSE message partly received               ``dimse_timeout`` since its last
                                                           whole PDU
handling     the node serves a request                     (no limit on the node's work)
release      A-RELEASE, A-ABORT or A-ASSOCIATE-RJ, until   ``acse_timeout``
             the connection closes
===========  ============================================  ==============================

and, once associated, in any phase: a PDU started but not whole after ``dimse_timeout``
(a trickle), or a PDU the peer has not taken for ``network_timeout`` (it stopped
reading).  Every socket also has a timeout a little longer than both, in case.  A PDU
announced longer than the node reads (:data:`MAX_PDU_LENGTH`, or the maximum length
the node announced for P-DATA-TF) closes the connection at once.

Slots: a connection is *pending* until its A-ASSOCIATE-RQ arrives, then *associated*.
A peer (IP address) may have ``pending_per_peer`` pending connections (more are closed
as they are accepted, before any thread starts) and ``associations_per_peer``
associations (more get A-ASSOCIATE-RJ rejected-transient, local-limit-exceeded); all
peers together ``max_pending`` and ``max_associations``.  A slot is given back when the
connection's association thread has ended and its socket is closed, whatever ended it.

Each refusal, each deadline and each connection that ends before an A-ASSOCIATE-RQ
for bad data gives one log line (peer, phase, reason); pynetdicom's own lines about
those connections are dropped, and its tracebacks about network data and errors are
cut to their message.

Threads: pynetdicom starts a thread per connection, which builds an association and
starts its thread, which starts the DUL thread, all before the A-ASSOCIATE-RQ is read.
Here the connection's thread runs the association itself, and is reused: once its
connection has ended it builds its next association and waits, unless
:data:`SPARE_WORKERS` threads already wait (:class:`Workers`).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from archive.config import Connections

log = logging.getLogger("archive.connections")

#: PDU types (PS3.8 9.3.1), the first byte of every PDU.
A_ASSOCIATE_RQ, P_DATA_TF, A_RELEASE_RQ, A_ABORT = 0x01, 0x04, 0x05, 0x07

#: Longest PDU read, but for P-DATA-TF: an A-ASSOCIATE-RQ with 128 presentation
#: contexts of 20 transfer syntaxes each and a 64 KiB user identity is some 250 KiB.
MAX_PDU_LENGTH = 1 << 20
#: P-DATA-TF may exceed the maximum length the node announced by this much (sloppy
#: peers), no more.
PDU_LENGTH_TOLERANCE = 1024

#: A-ASSOCIATE-RJ result, source, reason: rejected-transient, DUL service provider
#: (presentation related), local-limit-exceeded (PS3.8 9.3.4).
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)


class Phase(str, Enum):
    """Where a connection is (see the module docstring): named in log lines."""

    REQUEST = "request"
    NEGOTIATION = "negotiation"
    IDLE = "idle"
    MESSAGE = "message"
    HANDLING = "handling"
    RELEASE = "release"


# --- slots -------------------------------------------------------------------------


class Slots:
    """Pending connections and associations, counted per peer and in all.

    Not thread-safe: :class:`ConnectionGuard` holds its lock around every call.
    """

    def __init__(self, limits: Connections, max_associations: int) -> None:
        self.limits = limits
        self.max_associations = max_associations
        self.pending: Counter[str] = Counter()
        self.associated: Counter[str] = Counter()

    def admit(self, host: str) -> str | None:
        """Count a new connection from ``host`` as pending; else why it is refused."""
        if self.pending[host] >= self.limits.pending_per_peer:
            return (f"{self.pending[host]} connections from {host} await association "
                    f"(connections.pending_per_peer)")
        if sum(self.pending.values()) >= self.limits.max_pending:
            return (f"{self.limits.max_pending} connections await association "
                    f"(connections.max_pending)")
        self.pending[host] += 1
        return None

    def associate(self, host: str) -> str | None:
        """Move one of ``host``'s pending connections to an association slot; else why
        not (the connection then stays pending until it closes)."""
        if self.associated[host] >= self.limits.associations_per_peer:
            return (f"{self.associated[host]} associations from {host} "
                    f"(connections.associations_per_peer)")
        if sum(self.associated.values()) >= self.max_associations:
            return f"{self.max_associations} associations (max_associations)"
        self.pending[host] -= 1
        if self.pending[host] <= 0:
            del self.pending[host]
        self.associated[host] += 1
        return None

    def release(self, host: str, associated: bool) -> None:
        counter = self.associated if associated else self.pending
        counter[host] -= 1
        if counter[host] <= 0:
            del counter[host]


# --- one connection ----------------------------------------------------------------


@dataclass(eq=False)
class Connection:
    """One accepted TCP connection and what the guard knows of it.

    Times are readings of the guard's clock; the fields change under the guard's lock.
    """

    host: str
    port: int
    sock: socket.socket
    opened: float
    #: the last sign of progress: a whole PDU received, an association accepted, a
    #: request served
    progress: float = 0.0
    assoc: Any = None
    requested: bool = False      # a whole, decoded A-ASSOCIATE-RQ arrived
    associated: bool = False     # holds an association slot (else a pending one)
    refused: bool = False        # A-ASSOCIATE-RJ for want of a slot (and said so)
    established: bool = False
    in_message: bool = False     # a DIMSE message partly received
    handling: int = 0            # requests being served
    reading_since: float | None = None   # a PDU partly received
    sending_since: float | None = None   # a PDU being sent
    closing_since: float | None = None
    cut: bool = False            # the guard closed it (and said why)
    received: int = 0            # bytes read from the peer
    first_byte: int | None = None
    eof: bool = False            # the peer closed its side
    error: str = ""              # what a read raised (a TLS handshake failure...)
    threads: tuple[int, ...] = ()  # idents of its association and DUL threads

    def __post_init__(self) -> None:
        self.progress = self.progress or self.opened

    def label(self) -> str:
        """``CALLING_AE@host:port``, or ``host:port`` before an A-ASSOCIATE-RQ."""
        calling = ""
        if self.requested and self.assoc is not None:
            with contextlib.suppress(Exception):
                calling = str(self.assoc.requestor.ae_title or "").strip()
        return f"{calling}@{self.host}:{self.port}" if calling else f"{self.host}:{self.port}"

    def phase(self) -> Phase:
        if self.closing_since is not None:
            return Phase.RELEASE
        if not self.requested:
            return Phase.REQUEST
        if not self.established:
            return Phase.NEGOTIATION
        if self.handling:
            return Phase.HANDLING
        return Phase.MESSAGE if self.in_message else Phase.IDLE

    def deadline(self, limits: Connections) -> tuple[float, str] | None:
        """When the connection runs out of time, and what the peer failed to do by then
        (the earliest of the deadlines that apply now)."""
        phase = self.phase()
        if phase is Phase.REQUEST:
            return (self.opened + limits.request_timeout,
                    f"no complete A-ASSOCIATE-RQ within {limits.request_timeout:g} s")
        if phase is Phase.RELEASE:
            assert self.closing_since is not None
            return (self.closing_since + limits.acse_timeout,
                    f"connection still open {limits.acse_timeout:g} s after the "
                    "association ended")
        candidates: list[tuple[float, str]] = []
        if phase is Phase.NEGOTIATION:
            candidates.append((self.progress + limits.acse_timeout,
                               f"association not negotiated within {limits.acse_timeout:g} s"))
        elif phase is Phase.IDLE:
            candidates.append((self.progress + limits.network_timeout,
                               f"idle for {limits.network_timeout:g} s"))
        elif phase is Phase.MESSAGE:
            candidates.append((self.progress + limits.dimse_timeout,
                               f"DIMSE message incomplete, no PDU for {limits.dimse_timeout:g} s"))
        if self.reading_since is not None:
            candidates.append((self.reading_since + limits.dimse_timeout,
                               f"a PDU still incomplete after {limits.dimse_timeout:g} s"))
        if self.sending_since is not None:
            candidates.append((self.sending_since + limits.network_timeout,
                               "peer not reading: a PDU not taken in "
                               f"{limits.network_timeout:g} s"))
        return min(candidates, default=None)

    def refusal(self) -> str:
        """Why a connection that never associated ended before its deadline."""
        if self.error:
            return self.error
        if self.first_byte == 0x16 and not isinstance(self.sock, ssl.SSLSocket):
            return f"a TLS handshake ({self.received} bytes), and this node has no TLS"
        if self.received:
            kind = f"PDU type 0x{self.first_byte:02X}, " if self.first_byte is not None else ""
            return f"not an A-ASSOCIATE-RQ ({kind}{self.received} bytes)"
        return "closed"


#: SO_LINGER on, 0 s: close() resets the connection and drops unsent data.
_RESET = struct.pack("ii", 1, 0)


def _shutdown(sock: socket.socket) -> None:
    """Shut a socket down from any thread; a thread blocked reading it wakes up.

    ``socket.socket.shutdown`` and not the SSLSocket method: that one drops the SSL
    object under the feet of the thread reading it.
    """
    with contextlib.suppress(OSError, ValueError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


# --- the guard ---------------------------------------------------------------------


class ConnectionGuard:
    """Admits connections, tracks each one's phase and closes it at its deadline."""

    def __init__(self, limits: Connections, max_associations: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.slots = Slots(limits, max_associations)
        #: the maximum P-DATA-TF length the node announces (0: unlimited); set by
        #: :func:`start_server` from the AE
        self.max_pdu_length = 0
        self.tick = min(0.2, min(limits.request_timeout, limits.acse_timeout,
                                 limits.dimse_timeout, limits.network_timeout) / 10)
        self._lock = threading.Lock()
        self._by_socket: dict[socket.socket, Connection] = {}
        self._by_assoc: dict[int, Connection] = {}
        self._by_thread: dict[int, Connection] = {}
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._filter = _PynetdicomFilter(self._by_thread)

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        for logger in _pynetdicom_loggers():
            logger.addFilter(self._filter)
        self._watchdog = threading.Thread(target=self._watch, name="connection-watchdog",
                                          daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.join(5)
        for logger in _pynetdicom_loggers():
            logger.removeFilter(self._filter)

    def close_unassociated(self) -> None:
        """On shutdown: close what pynetdicom's abort could wait on (connections not
        yet associated, or in the middle of a PDU)."""
        with self._lock:
            doomed = [c for c in self._by_socket.values()
                      if c.phase() not in (Phase.IDLE, Phase.HANDLING)
                      or c.reading_since is not None or c.sending_since is not None]
            for conn in doomed:
                conn.cut = True
        for conn in doomed:
            self._cut(conn)

    def counts(self) -> dict[str, int]:
        """Pending connections and associations now."""
        with self._lock:
            return {"pending": sum(self.slots.pending.values()),
                    "associated": sum(self.slots.associated.values())}

    # -- a connection's life (accept loop, then its own thread) ----------------------------

    def admit(self, sock: socket.socket, address: Any) -> bool:
        """Accept loop: take the connection, or refuse it with one log line."""
        host, port = str(address[0]), int(address[1])
        with self._lock:
            refusal = self.slots.admit(host)
            if refusal is None:
                self._by_socket[sock] = Connection(host, port, sock, self.clock())
        if refusal is not None:
            log.warning("connection %s:%d refused in phase %s: %s", host, port,
                        Phase.REQUEST.value, refusal)
            return False
        return True

    def connection(self, sock: socket.socket) -> Connection | None:
        with self._lock:
            return self._by_socket.get(sock)

    def attach(self, conn: Connection, assoc: Any) -> None:
        """Bind a new acceptor association to its connection, before it starts."""
        conn.assoc = assoc
        # pynetdicom's wait for the A-ASSOCIATE-RQ and its ARTIM timer end with ours
        assoc.acse_timeout = self.limits.request_timeout
        # Idleness is the guard's: pynetdicom's idle timer counts received PDUs only,
        # and aborts an association right after a request served for longer than it.
        assoc.network_timeout = None
        serve = assoc._serve_request

        def serving(msg: Any, context_id: int) -> None:
            self._handling(conn, +1)
            try:
                serve(msg, context_id)
            finally:
                self._handling(conn, -1)

        assoc._serve_request = serving  # where the association's reactor serves requests
        self._watch_io(conn, assoc.dul.socket)
        with self._lock:
            self._by_assoc[id(assoc)] = conn

    def started(self, conn: Connection) -> None:
        """The calling thread runs the connection's association: its log lines are the
        connection's."""
        ident = threading.get_ident()
        with self._lock:
            conn.threads += (ident,)
            self._by_thread[ident] = conn

    def associations(self) -> list[Any]:
        """The associations of the connections open now."""
        with self._lock:
            return [c.assoc for c in self._by_socket.values() if c.assoc is not None]

    def _watch_io(self, conn: Connection, transport: Any) -> None:
        """Note when the DUL starts reading a PDU (it reads only once bytes are there,
        so a read in progress is a PDU begun), what it read, and while it sends one."""
        recv, send = transport.recv, transport.send

        def receiving(nr_bytes: int) -> bytearray:
            with self._lock:
                if not conn.received and conn.reading_since is None:
                    ident = threading.get_ident()  # the DUL thread, now known
                    conn.threads += (ident,)
                    self._by_thread[ident] = conn
                header = conn.reading_since is None  # a PDU begins: its 6-byte header
                if header:
                    conn.reading_since = self.clock()
            try:
                data = recv(nr_bytes)
            except Exception as exc:
                with self._lock:
                    conn.error = conn.error or f"{type(exc).__name__}: {exc}"
                raise
            with self._lock:
                if data and conn.first_byte is None:
                    conn.first_byte = data[0]
                conn.received += len(data)
                conn.eof = conn.eof or len(data) < nr_bytes
            if header and len(data) == 6 and not self._admit_pdu(conn, data):
                return bytearray()  # what a closed connection gives the DUL
            return data  # EVT_DATA_RECV ends the PDU

        def sending(data: bytes) -> None:
            with self._lock:
                conn.sending_since = self.clock()
            try:
                send(data)
            finally:
                with self._lock:
                    conn.sending_since = None

        transport.recv, transport.send = receiving, sending

    def _admit_pdu(self, conn: Connection, header: bytes) -> bool:
        """Whether a PDU of the announced length may be read.  pynetdicom reads whatever
        length a header announces, up to 4 GiB, into memory: a peer streaming such PDUs
        on a few connections would exhaust the node's memory within its deadlines."""
        kind, length = header[0], struct.unpack(">L", header[2:6])[0]
        most = MAX_PDU_LENGTH
        if kind == P_DATA_TF and self.max_pdu_length:
            most = self.max_pdu_length + PDU_LENGTH_TOLERANCE
        if length <= most:
            return True
        with self._lock:
            if conn.cut:
                return False
            conn.cut = True
            phase = conn.phase()
        log.warning("connection %s closed in phase %s: a PDU of %d bytes announced "
                    "(type 0x%02X), more than %d", conn.label(), phase.value, length, kind,
                    most)
        self._cut(conn)
        return False

    def release(self, conn: Connection) -> None:
        """The connection's association thread has ended: close everything, give the
        slot back, and say why it ended if a deadline or bad data did it unsaid."""
        assoc = conn.assoc
        dul = getattr(assoc, "dul", None)
        if dul is not None:
            dul.kill_dul()  # on some error paths the DUL reactor outlives the association
        _shutdown(conn.sock)
        if dul is not None and dul.is_alive():
            dul.join(2)
        with contextlib.suppress(OSError):
            conn.sock.close()
        now = self.clock()
        with self._lock:
            self.slots.release(conn.host, conn.associated)
            self._by_socket.pop(conn.sock, None)
            if assoc is not None:
                self._by_assoc.pop(id(assoc), None)
            for ident in conn.threads:
                self._by_thread.pop(ident, None)
            said = conn.cut or conn.refused
            deadline = conn.deadline(self.limits)
            phase = conn.phase()
        if said:
            return
        if deadline is not None and now >= deadline[0] - self.tick:
            # pynetdicom's own timer (ARTIM) got there as the watchdog was about to
            log.warning("connection %s closed in phase %s: %s", conn.label(), phase.value,
                        deadline[1])
        elif phase is Phase.REQUEST and conn.eof and not conn.received:
            log.debug("connection %s closed by the peer before an A-ASSOCIATE-RQ",
                      conn.label())
        elif phase is Phase.REQUEST:
            log.warning("connection %s closed in phase %s: %s", conn.label(), phase.value,
                        conn.refusal())

    # -- events (pynetdicom's threads) ----------------------------------------------------

    def handlers(self) -> list[tuple[Any, ...]]:
        """Event bindings for the server (see :func:`start_server`)."""
        return [
            (evt.EVT_DATA_RECV, self._on_data),
            (evt.EVT_PDU_RECV, self._on_pdu),
            (evt.EVT_DIMSE_RECV, self._on_message),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_REJECTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]

    def _conn(self, event: Event) -> Connection | None:
        return self._by_assoc.get(id(event.assoc))

    def _on_data(self, event: Event) -> None:
        """A whole PDU arrived, not decoded yet (the DUL thread)."""
        conn = self._conn(event)
        if conn is None:
            return
        kind = event.data[0] if event.data else 0
        with self._lock:
            conn.progress = self.clock()
            conn.reading_since = None
            if kind == P_DATA_TF:
                conn.in_message = True
            elif kind in (A_RELEASE_RQ, A_ABORT) and conn.closing_since is None:
                conn.closing_since = conn.progress

    def _on_pdu(self, event: Event) -> None:
        """A PDU decoded (the DUL thread): the request phase ends with a valid RQ."""
        conn = self._conn(event)
        if conn is not None and event.pdu.pdu_type == A_ASSOCIATE_RQ:
            with self._lock:
                conn.requested = True
                conn.progress = self.clock()
            event.assoc.acse_timeout = self.limits.acse_timeout  # release, ARTIM

    def _on_message(self, event: Event) -> None:
        """A whole DIMSE message arrived (the DUL thread)."""
        conn = self._conn(event)
        if conn is not None:
            with self._lock:
                conn.in_message = False
                conn.progress = self.clock()

    def _handling(self, conn: Connection, delta: int) -> None:
        with self._lock:
            conn.handling += delta
            conn.progress = self.clock()

    def _on_requested(self, event: Event) -> None:
        """A-ASSOCIATE-RQ (the association thread, before negotiation): take an
        association slot, or answer A-ASSOCIATE-RJ rejected-transient,
        local-limit-exceeded."""
        conn = self._conn(event)
        if conn is None:
            return
        with self._lock:
            conn.requested = True
            refusal = self.slots.associate(conn.host)
            if refusal is None:
                conn.associated = True
            else:
                conn.refused = True
                conn.closing_since = self.clock()
        if refusal is None:
            return
        log.warning("association %s refused in phase %s: %s (A-ASSOCIATE-RJ "
                    "rejected-transient, local-limit-exceeded)", conn.label(),
                    Phase.NEGOTIATION.value, refusal)
        assoc = event.assoc
        assoc.acse.send_reject(*LOCAL_LIMIT_EXCEEDED)
        assoc.kill()  # returns once the A-ASSOCIATE-RJ is sent and the connection closed

    def _on_accepted(self, event: Event) -> None:
        conn = self._conn(event)
        if conn is not None:
            with self._lock:
                conn.established = True
                conn.progress = self.clock()

    def _on_ended(self, event: Event) -> None:
        conn = self._conn(event)
        if conn is not None:
            with self._lock:
                if conn.closing_since is None:
                    conn.closing_since = self.clock()

    def _on_closed(self, event: Event) -> None:
        """The transport closed (the DUL thread).  Before an A-ASSOCIATE-RQ the
        association thread would wait out ``request_timeout`` for one: wake it now, so
        the slot comes back at once (``None`` is what its wait returns on time-out)."""
        conn = self._conn(event)
        if conn is None:
            return
        with self._lock:
            if not conn.requested:
                event.assoc.dul.to_user_queue.put(None)

    # -- the watchdog -------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stopping.wait(self.tick):
            try:
                self.enforce()
            except Exception:  # noqa: BLE001 - the watchdog must outlive any surprise
                log.exception("connection watchdog: unexpected error")

    def enforce(self) -> list[Connection]:
        """Close every connection past its deadline, each with one log line; the ones
        closed."""
        now = self.clock()
        expired: list[tuple[Connection, Phase, str]] = []
        with self._lock:
            for conn in self._by_socket.values():
                if conn.cut:
                    continue
                deadline = conn.deadline(self.limits)
                if deadline is not None and now >= deadline[0]:
                    conn.cut = True
                    expired.append((conn, conn.phase(), deadline[1]))
        for conn, phase, reason in expired:
            log.warning("connection %s closed in phase %s: %s", conn.label(), phase.value,
                        reason)
            self._cut(conn)
        return [conn for conn, _, _ in expired]

    def _cut(self, conn: Connection) -> None:
        """Close a connection the guard gives up on: reset, not a graceful close, so
        that what the node still had to send (to a peer that does not read) is dropped
        at once instead of lingering in the kernel."""
        with contextlib.suppress(OSError, ValueError):
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        _shutdown(conn.sock)


class _PynetdicomFilter(logging.Filter):
    """What pynetdicom logs about a connection that the guard reports itself (closed by
    the guard, or not associated yet) is dropped; its tracebacks about data from the
    network (the DUL's) or network errors keep their message only."""

    def __init__(self, by_thread: dict[int, Connection]) -> None:
        super().__init__()
        self.by_thread = by_thread

    def filter(self, record: logging.LogRecord) -> bool:
        conn = self.by_thread.get(record.thread)
        if conn is not None and (conn.cut or not conn.requested):
            return False
        if record.exc_info and (record.name == "pynetdicom.dul"
                                or isinstance(record.exc_info[1], OSError)):
            record.exc_info = None
            record.exc_text = None
        return True


def _pynetdicom_loggers() -> Iterable[logging.Logger]:
    """pynetdicom's module loggers: a filter applies only to the logger it is on."""
    names = [name for name in logging.root.manager.loggerDict
             if name == "pynetdicom" or name.startswith("pynetdicom.")]
    return [logging.getLogger(name) for name in names]


# --- the server --------------------------------------------------------------------


class GuardedRequestHandler(RequestHandler):
    """Runs one connection's association to its end, in this thread, then gives its
    slot back.

    pynetdicom's handler starts the association's own thread and returns; running it
    here instead saves a thread start and a thread contending for the GIL on every
    association, and makes the end of a connection one place, whatever path ended it.
    The association comes built (``prepared``) when the thread had one ready.
    """

    server: GuardedServer

    def __init__(self, request: Any, client_address: Any, server: GuardedServer,
                 prepared: Association | None = None) -> None:
        self.prepared = prepared
        super().__init__(request, client_address, server)

    def handle(self) -> None:
        guard = self.server.guard
        self.conn = guard.connection(self.request)
        self.assoc: Any = None
        try:
            assoc = self._create_association()
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            if self.conn is not None:
                guard.started(self.conn)
            assoc.run()  # Thread.run: the association's reactor, here
        finally:
            if self.conn is not None:
                guard.release(self.conn)

    def _create_association(self) -> Any:
        assoc = self.prepared or prepared_association(self.server)
        connect(assoc, self.request, self.client_address)
        if self.conn is not None:
            self.server.guard.attach(self.conn, assoc)
        self.assoc = assoc
        return assoc


def prepared_association(server: ThreadedAssociationServer) -> Association:
    """An acceptor association of ``server``, all but its connection: pynetdicom
    3.0's ``RequestHandler._create_association`` up to the socket.  Building one takes
    some 0.3 ms of Python (its DUL provider, queues, timers, the server's handlers
    bound), which a peer no longer waits for when a thread built it beforehand."""
    ae = server.ae
    assoc = Association(ae, MODE_ACCEPTOR)
    assoc._server = server
    acceptor = assoc.acceptor
    acceptor.maximum_length = ae.maximum_pdu_size
    acceptor.ae_title = server.ae_title
    acceptor.address_info = AddressInformation.from_tuple(server.server_address)
    acceptor.implementation_class_uid = ae.implementation_class_uid
    acceptor.implementation_version_name = ae.implementation_version_name
    acceptor.supported_contexts = deepcopy(server.contexts)
    for event, handlers in server._handlers.items():
        if event.is_intervention and handlers:
            assoc.bind(event, *handlers)
        elif isinstance(event, evt.NotificationEvent):
            for handler, args in handlers:
                assoc.bind(event, handler, args)
    return assoc


def connect(assoc: Association, request: socket.socket, client_address: Any) -> None:
    """Give a prepared association its connection (the rest of
    ``_create_association``)."""
    assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
    assoc.set_socket(AssociationSocket(assoc, client_socket=request))
    assoc.requestor.address_info = AddressInformation.from_tuple(client_address)


#: Threads kept waiting for a connection, each with an association built.
SPARE_WORKERS = 2


class Workers:
    """The threads that serve connections, reused: when one has served its connection
    it builds its next association and waits for a connection, unless
    :data:`SPARE_WORKERS` already wait.  A connection goes to a waiting thread, else to
    a new one.  Starting a thread and building an association were 0.4-0.7 ms of the
    1.4-2.3 ms from a peer's connection to its A-ASSOCIATE-AC (pynetdicom starts a
    thread per connection, then builds its association there)."""

    def __init__(self, server: Any, spares: int = SPARE_WORKERS) -> None:
        """``server`` has ``prepare()`` (an association) and ``serve(request,
        client_address, prepared)`` (one connection to its end; never raises)."""
        self.server = server
        self.spares = spares
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._idle = 0
        self._stopped = False

    def idle(self) -> int:
        with self._lock:
            return self._idle

    def hand(self, request: Any, client_address: Any) -> None:
        """Serve a connection on a waiting thread, else on a new one (which raises if
        no thread can be started)."""
        with self._lock:
            waiting = self._idle > 0
            if waiting:
                self._idle -= 1
        if waiting:
            self._jobs.put((request, client_address))
            return
        threading.Thread(target=self._run, args=(request, client_address),
                         name="association-worker", daemon=True).start()

    def stop(self) -> None:
        """Let the waiting threads end (the server has stopped accepting)."""
        with self._lock:
            self._stopped, idle, self._idle = True, self._idle, 0
        for _ in range(idle):
            self._jobs.put(None)

    def _run(self, request: Any, client_address: Any) -> None:
        prepared: Association | None = None
        while True:
            self.server.serve(request, client_address, prepared)
            with self._lock:
                if self._stopped or self._idle >= self.spares:
                    return
            try:
                prepared = self.server.prepare()
            except Exception:  # noqa: BLE001 - the next connection builds its own
                log.exception("association worker: could not prepare an association")
                return
            with self._lock:
                if self._stopped or self._idle >= self.spares:
                    return
                self._idle += 1
            job = self._jobs.get()
            if job is None:
                return
            request, client_address = job


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with admission, socket timeouts, deadlines, and
    threads reused (:class:`Workers`)."""

    # A connection's thread now lives as long as its association: stopping the server
    # must not wait for them (the node aborts associations itself), nor must exiting.
    daemon_threads = True
    block_on_close = False
    #: socketserver listens with a backlog of 5: a burst of connections would leave the
    #: next peers' SYNs unanswered for a second (the accept loop is quick, not instant).
    request_queue_size = 128

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        self.guard = guard
        self.workers = Workers(self)
        super().__init__(*args, request_handler=GuardedRequestHandler, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        # Every single send and receive is bounded, in case; the guard's deadlines
        # (shorter) close a stalled connection first, and say why.
        limits = self.guard.limits
        sock.settimeout(max(limits.network_timeout, limits.dimse_timeout) + 1)
        if self.ssl_context:
            sock = self.ssl_context.wrap_socket(sock, server_side=True)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.guard.admit(request, client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            self.workers.hand(request, client_address)
        except BaseException:  # no thread: nothing else will give the slot back
            conn = self.guard.connection(request)
            if conn is not None:
                self.guard.release(conn)
            raise

    @property
    def active_associations(self) -> list[Any]:
        """The associations being served (pynetdicom looks for their threads, but
        they run in the connections' threads: :class:`GuardedRequestHandler`)."""
        return self.guard.associations()

    def prepare(self) -> Association:
        return prepared_association(self)

    def serve(self, request: Any, client_address: Any, prepared: Association | None) -> None:
        """One connection, to its end (``process_request_thread`` of pynetdicom's
        server, with the association built beforehand if there is one)."""
        try:
            GuardedRequestHandler(request, client_address, self, prepared)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        self.workers.stop()


def start_server(ae: Any, guard: ConnectionGuard, address: tuple[str, int],
                 evt_handlers: list[tuple[Any, ...]],
                 ssl_context: ssl.SSLContext | None = None) -> GuardedServer:
    """``ae.start_server(address, block=False, ...)`` with a :class:`GuardedServer`."""
    guard.max_pdu_length = ae.maximum_pdu_size
    server = ae.make_server(address, evt_handlers=[*evt_handlers, *guard.handlers()],
                            ssl_context=ssl_context, server_class=GuardedServer, guard=guard)
    guard.start()
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # as AE.start_server does: AE.shutdown() stops it
    return server

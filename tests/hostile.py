"""Hostile DICOM peers: connections that try to hold a node's association slots.

Each :class:`Siege` opens connections of one kind from one source address (all of
127/8 reaches the node on loopback, so 127.0.0.2, 127.0.0.3... are distinct peers to
it) and records, without reading what the node sends, when the node closed each one.
Used by ``tests/e2e/test_slots.py`` and ``benchmarks/bench_slots.py``.

Kinds (:data:`KINDS`; the ``tls_`` ones need a node with TLS):

``silent``         connect, send nothing
``partial_rq``     the first half of an A-ASSOCIATE-RQ, then nothing
``random_bytes``   200 random bytes (seeded), then nothing
``huge_pdu``       an A-ASSOCIATE-RQ header announcing 64 MiB, 1000 random bytes of it
``trickle``        an A-ASSOCIATE-RQ one byte every 0.3 s, never finished in time
``stalled_store``  associated; a C-STORE command and two of its dataset's five PDUs
``deaf``           associated; a C-GET of a large instance, no byte of it ever read
                   (needs ``retrieve``: an instance the node holds)
``tls_hello``      a TLS ClientHello, then nothing
``tls_partial_rq`` a TLS handshake, then the first half of an A-ASSOCIATE-RQ
"""

from __future__ import annotations

import contextlib
import queue
import random
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO

from pydicom.dataset import Dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.dimse_messages import C_GET_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_GET, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context
from pynetdicom.transport import AddressInformation

VERIFICATION = "1.2.840.10008.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"

#: What ``huge_pdu`` announces.
HUGE = 64 << 20

#: Kinds that need no association and no TLS, those that associate, those over TLS.
PRE_ASSOCIATION = ("silent", "partial_rq", "random_bytes", "huge_pdu", "trickle")
ASSOCIATED = ("stalled_store", "deaf")
TLS = ("tls_hello", "tls_partial_rq")
KINDS = PRE_ASSOCIATION + ASSOCIATED + TLS


# --- PDUs --------------------------------------------------------------------------


def a_associate_rq(called: str = "ARCHIVE", calling: str = "HOSTILE",
                   contexts: tuple[str | tuple[str, str], ...] = (VERIFICATION,
                                                                  SECONDARY_CAPTURE),
                   scp_roles: tuple[str, ...] = ()) -> bytes:
    """An encoded A-ASSOCIATE-RQ proposing ``contexts`` (SOP class, or SOP class and
    transfer syntax; implicit VR little endian by default; IDs 1, 3, 5...), offering to
    be the SCP of the SOP classes ``scp_roles`` (C-GET)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    primitive.calling_presentation_address = AddressInformation("127.0.0.1", 0)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", 104)
    proposed = []
    for n, proposed_context in enumerate(contexts):
        uid, syntax = (proposed_context if isinstance(proposed_context, tuple)
                       else (proposed_context, IMPLICIT_VR_LE))
        context = build_context(uid, [syntax])
        context.context_id = 2 * n + 1
        proposed.append(context)
    primitive.presentation_context_definition_list = proposed
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16382
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    roles = []
    for uid in scp_roles:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = uid
        role.scu_role, role.scp_role = False, True
        roles.append(role)
    primitive.user_information = [max_length, implementation, *roles]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _p_data_tf(message: C_GET_RQ | C_STORE_RQ, context_id: int) -> list[bytes]:
    message.context_id = context_id
    pdus = []
    for primitive in message.encode_msg(context_id, 16382):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(bytes(pdu.encode()))
    return pdus


def c_store_rq(dataset_size: int = 60_000, context_id: int = 3) -> list[bytes]:
    """P-DATA-TF PDUs of a C-STORE-RQ (secondary capture): command, then dataset."""
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = SECONDARY_CAPTURE
    request.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    request.Priority = 2
    request.DataSet = BytesIO(b"\x00" * dataset_size)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return _p_data_tf(message, context_id)


def c_get_rq(identifier: Dataset, context_id: int = 5) -> bytes:
    """A Study Root C-GET-RQ for ``identifier`` (implicit VR little endian)."""
    request = C_GET()
    request.MessageID = 1
    request.AffectedSOPClassUID = STUDY_ROOT_GET
    request.Priority = 2
    request.Identifier = BytesIO(encode(identifier, True, True))
    message = C_GET_RQ()
    message.primitive_to_message(request)
    return b"".join(_p_data_tf(message, context_id))


def read_pdu(sock: socket.socket, timeout: float = 10) -> tuple[int, bytes]:
    """(PDU type, body) of the next PDU the node sends."""
    sock.settimeout(timeout)
    header = _read_exactly(sock, 6)
    kind, _, length = struct.unpack(">BBL", header)
    return kind, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


#: PDU types of the node's answer to an A-ASSOCIATE-RQ.
A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x02, 0x03


# --- one hostile connection --------------------------------------------------------


@dataclass(eq=False)
class Hostile:
    """One connection and what became of it (times from ``time.monotonic``)."""

    kind: str
    sock: socket.socket
    opened: float
    #: when the hostile side last sent something: the node's deadline runs from here
    #: (or from ``opened`` for the phases timed from the connection)
    last_sent: float = 0.0
    #: PDU type the node answered the A-ASSOCIATE-RQ with (associated kinds)
    answer: int | None = None
    #: A-ASSOCIATE-RJ (result, source, reason)
    rejection: tuple[int, int, int] | None = None
    closed: float | None = None
    error: str = ""

    def __post_init__(self) -> None:
        self.last_sent = self.last_sent or self.opened

    @property
    def open(self) -> bool:
        return self.closed is None


def connect(port: int, source: str, host: str = "127.0.0.1", rcvbuf: int | None = None,
            timeout: float = 5) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if rcvbuf is not None:  # before connect: it sets the window the node sees
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.settimeout(timeout)
    sock.connect((host, port))
    return sock


def client_hello(server_hostname: str = "localhost") -> bytes:
    """The bytes of a TLS ClientHello (what a client sends first)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@dataclass
class Siege:
    """``count`` connections of ``kind`` from ``source`` to ``port``.

    :meth:`start` opens them (associated kinds one after the other, each waiting for
    the node's answer; the others at once); a watcher thread notes when the node
    closes each one, by polling for hang-up without reading.
    """

    port: int
    kind: str
    source: str
    count: int = 12
    called: str = "ARCHIVE"
    seed: int = 0
    tls_context: ssl.SSLContext | None = None
    #: for ``deaf``: the SOP class of an instance the node holds, and a C-GET
    #: identifier (IMAGE level) that names it
    retrieve: tuple[str, Dataset] | None = None
    connections: list[Hostile] = field(default_factory=list)
    refused_at_connect: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._random = random.Random(f"{self.kind}-{self.seed}")
        self._watched: queue.SimpleQueue[Hostile] = queue.SimpleQueue()
        self._hello = client_hello() if self.kind == "tls_hello" else b""

    # -- opening -------------------------------------------------------------------

    def start(self) -> Siege:
        watcher = threading.Thread(target=self._watch, daemon=True, name=f"siege-{self.kind}")
        watcher.start()
        self._threads.append(watcher)
        for _ in range(self.count):
            try:
                hostile = self._open()
            except OSError as exc:  # refused before the connection was up
                self.refused_at_connect += 1
                self.connections.append(Hostile(self.kind, socket.socket(), time.monotonic(),
                                                closed=time.monotonic(), error=str(exc)))
                continue
            self.connections.append(hostile)
        return self

    def _open(self) -> Hostile:
        rcvbuf = 4096 if self.kind == "deaf" else None
        sock = connect(self.port, self.source, rcvbuf=rcvbuf)
        hostile = Hostile(self.kind, sock, time.monotonic())
        behave: Callable[[Hostile], None] = getattr(self, f"_{self.kind}")
        try:
            behave(hostile)
        except OSError as exc:  # the node closed it while we were talking
            hostile.closed = time.monotonic()
            hostile.error = str(exc)
        else:
            self._watched.put(hostile)
        return hostile

    def _send(self, hostile: Hostile, data: bytes) -> None:
        hostile.sock.sendall(data)
        hostile.last_sent = time.monotonic()

    def _silent(self, hostile: Hostile) -> None:
        pass

    def _partial_rq(self, hostile: Hostile) -> None:
        rq = a_associate_rq(self.called)
        self._send(hostile, rq[:len(rq) // 2])

    def _random_bytes(self, hostile: Hostile) -> None:
        self._send(hostile, self._random.randbytes(200))

    def _huge_pdu(self, hostile: Hostile) -> None:
        self._send(hostile, struct.pack(">BBL", 0x01, 0, HUGE) + self._random.randbytes(1000))

    def _trickle(self, hostile: Hostile) -> None:
        rq = a_associate_rq(self.called)

        def drip() -> None:
            for byte in rq:
                if self._stop.wait(0.3) or not hostile.open:
                    return
                try:
                    self._send(hostile, bytes([byte]))
                except OSError:
                    return
        thread = threading.Thread(target=drip, daemon=True, name="trickle")
        thread.start()
        self._threads.append(thread)

    def _associate(self, hostile: Hostile, rq: bytes | None = None) -> bool:
        """Send an A-ASSOCIATE-RQ and read the answer: True when accepted."""
        self._send(hostile, rq or a_associate_rq(self.called))
        kind, body = read_pdu(hostile.sock)
        hostile.answer = kind
        if kind == A_ASSOCIATE_RJ:
            hostile.rejection = (body[1], body[2], body[3])
        return kind == A_ASSOCIATE_AC

    def _stalled_store(self, hostile: Hostile) -> None:
        if self._associate(hostile):
            pdus = c_store_rq()
            self._send(hostile, b"".join(pdus[:3]))  # command, 2 of 4 dataset PDUs

    def _deaf(self, hostile: Hostile) -> None:
        if self.retrieve is None:
            raise ValueError("the deaf kind needs retrieve=(SOP class, identifier)")
        sop_class, identifier = self.retrieve
        # the instance's own transfer syntax, so that the node sends it unconverted
        rq = a_associate_rq(self.called, scp_roles=(sop_class,), contexts=(
            VERIFICATION, (sop_class, EXPLICIT_VR_LE), STUDY_ROOT_GET))
        if self._associate(hostile, rq):
            self._send(hostile, c_get_rq(identifier))

    def _tls_hello(self, hostile: Hostile) -> None:
        self._send(hostile, self._hello)

    def _tls_partial_rq(self, hostile: Hostile) -> None:
        context = self.tls_context or ssl.create_default_context()
        tls = context.wrap_socket(hostile.sock, server_hostname="localhost")
        hostile.sock = tls
        rq = a_associate_rq(self.called)
        self._send(hostile, rq[:len(rq) // 2])

    # -- watching --------------------------------------------------------------------

    def _watch(self) -> None:
        """Poll for hang-up (a FIN or a reset), never for data: nothing is read."""
        poller = select.poll()
        by_fd: dict[int, Hostile] = {}
        while not self._stop.is_set():
            while not self._watched.empty():
                hostile = self._watched.get()
                fd = hostile.sock.fileno()
                by_fd[fd] = hostile
                poller.register(fd, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            for fd, _ in poller.poll(20):
                hostile = by_fd.pop(fd)
                poller.unregister(fd)
                if hostile.closed is None:
                    hostile.closed = time.monotonic()

    def held(self) -> list[Hostile]:
        """Connections the node took (not closed at once, not rejected)."""
        return [h for h in self.connections if h.rejection is None and h.error == ""
                and (h.closed is None or h.closed - h.opened > 0.5)]

    def wait_closed(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(not h.open for h in self.connections):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        for hostile in self.connections:
            with contextlib.suppress(OSError):
                hostile.sock.close()
        for thread in self._threads:
            thread.join(2)

"""archive.dimse.connections without a node: slot counting, deadlines per phase, the watchdog
on real sockets, and what reaches the log.  The network behaviour is in
tests/e2e/test_slots.py."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archive.config import Connections
from archive.dimse.connections import (
    SPARE_WORKERS,
    Connection,
    ConnectionGuard,
    Phase,
    Slots,
    Workers,
)

LIMITS = Connections(associations_per_peer=2, pending_per_peer=2, max_pending=3,
                     request_timeout=10, acse_timeout=30, dimse_timeout=20,
                     network_timeout=60)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- slots ---------------------------------------------------------------------------


def test_a_peer_gets_its_pending_share_and_others_theirs() -> None:
    slots = Slots(LIMITS, max_associations=4)
    assert slots.admit("10.0.0.1") is None
    assert slots.admit("10.0.0.1") is None
    refusal = slots.admit("10.0.0.1")
    assert refusal is not None and "connections.pending_per_peer" in refusal
    assert slots.admit("10.0.0.2") is None  # another peer still gets in
    refusal = slots.admit("10.0.0.3")  # ... until max_pending (3), all peers together
    assert refusal is not None and "connections.max_pending" in refusal


def test_associating_frees_the_pending_slot() -> None:
    slots = Slots(LIMITS, max_associations=4)
    for _ in range(2):
        assert slots.admit("10.0.0.1") is None
        assert slots.associate("10.0.0.1") is None
    # two associations, no pending connection: the peer may connect again...
    assert slots.admit("10.0.0.1") is None
    # ... but not hold a third association
    refusal = slots.associate("10.0.0.1")
    assert refusal is not None and "connections.associations_per_peer" in refusal


def test_max_associations_is_shared() -> None:
    slots = Slots(LIMITS, max_associations=3)
    for host in ("a", "a", "b"):
        assert slots.admit(host) is None and slots.associate(host) is None
    assert slots.admit("c") is None
    refusal = slots.associate("c")
    assert refusal is not None and "max_associations" in refusal
    slots.release("c", associated=False)  # refused: it was still counted as pending
    slots.release("a", associated=True)
    assert slots.admit("c") is None and slots.associate("c") is None


def test_release_gives_every_slot_back() -> None:
    slots = Slots(LIMITS, max_associations=4)
    taken = []
    for host in ("a", "b", "a"):
        assert slots.admit(host) is None
        taken.append((host, slots.associate(host) is None))
    for host, associated in taken:
        slots.release(host, associated)
    assert not slots.pending and not slots.associated


# --- deadlines ---------------------------------------------------------------------------


_SOCKETS: list[socket.socket] = []


def conn(opened: float = 0.0, **state: Any) -> Connection:
    _SOCKETS.append(socket.socket())
    return Connection("10.0.0.1", 1234, _SOCKETS[-1], opened, **state)


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    yield
    while _SOCKETS:
        _SOCKETS.pop().close()


def test_the_request_phase_runs_from_the_connection_whatever_arrives() -> None:
    c = conn(opened=0.0)
    c.progress = c.reading_since = 9.0  # a trickle: bytes keep coming
    assert c.phase() is Phase.REQUEST
    when, reason = c.deadline(LIMITS)
    assert when == 10.0 and "A-ASSOCIATE-RQ" in reason


@pytest.mark.parametrize("state,phase,when", [
    ({"requested": True}, Phase.NEGOTIATION, 5 + 30),
    ({"requested": True, "established": True}, Phase.IDLE, 5 + 60),
    ({"requested": True, "established": True, "in_message": True}, Phase.MESSAGE, 5 + 20),
    ({"requested": True, "established": True, "handling": 1}, Phase.HANDLING, None),
    ({"requested": True, "established": True, "closing_since": 7.0}, Phase.RELEASE, 7 + 30),
], ids=lambda v: v.value if isinstance(v, Phase) else "")
def test_each_phase_has_its_deadline(state: dict[str, Any], phase: Phase,
                                     when: float | None) -> None:
    c = conn(progress=5.0, **state)
    assert c.phase() is phase
    deadline = c.deadline(LIMITS)
    assert (deadline[0] if deadline else None) == when


def test_a_pdu_that_never_completes_times_out_while_the_node_works() -> None:
    c = conn(progress=5.0, requested=True, established=True, handling=1,
             reading_since=8.0)
    assert c.deadline(LIMITS) == (8.0 + 20, "a PDU still incomplete after 20 s")


def test_a_peer_that_does_not_read_times_out_while_the_node_works() -> None:
    c = conn(progress=5.0, requested=True, established=True, handling=1,
             sending_since=9.0)
    when, reason = c.deadline(LIMITS)
    assert when == 9.0 + 60 and "peer not reading" in reason


def test_the_earliest_deadline_applies() -> None:
    c = conn(progress=5.0, requested=True, established=True, reading_since=6.0)
    assert c.deadline(LIMITS)[0] == 6.0 + 20  # before idle's 5 + 60


# --- the watchdog, on real sockets -------------------------------------------------------


@pytest.fixture
def guard() -> Iterator[tuple[ConnectionGuard, Clock]]:
    clock = Clock()
    yield ConnectionGuard(LIMITS, max_associations=4, clock=clock), clock


def test_the_watchdog_closes_what_is_past_its_deadline(
        guard: tuple[ConnectionGuard, Clock], caplog: pytest.LogCaptureFixture) -> None:
    watchdog, clock = guard
    late_ours, late_theirs = socket.socketpair()
    fresh_ours, fresh_theirs = socket.socketpair()
    try:
        assert watchdog.admit(late_ours, ("10.0.0.1", 1111))
        clock.now += 5
        assert watchdog.admit(fresh_ours, ("10.0.0.2", 2222))
        clock.now += 5.5  # the first one's request_timeout (10 s) is over
        with caplog.at_level(logging.WARNING, "archive.connections"):
            closed = watchdog.enforce()
            assert watchdog.enforce() == []  # said once
        assert [c.sock for c in closed] == [late_ours]
        late_theirs.settimeout(1)
        assert late_theirs.recv(1) == b""  # the peer sees the connection end
        fresh_theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            fresh_theirs.recv(1)  # still open
        assert [r.getMessage() for r in caplog.records] == [
            "connection 10.0.0.1:1111 closed in phase request: no complete "
            "A-ASSOCIATE-RQ within 10 s"]
    finally:
        for s in (late_ours, late_theirs, fresh_ours, fresh_theirs):
            s.close()


def test_refusals_are_one_line_each(guard: tuple[ConnectionGuard, Clock],
                                    caplog: pytest.LogCaptureFixture) -> None:
    watchdog, _ = guard
    socks = [socket.socket() for _ in range(3)]
    try:
        with caplog.at_level(logging.WARNING, "archive.connections"):
            admitted = [watchdog.admit(s, ("10.0.0.9", 4000 + n)) for n, s in enumerate(socks)]
        assert admitted == [True, True, False]
        assert [r.getMessage() for r in caplog.records] == [
            "connection 10.0.0.9:4002 refused in phase request: 2 connections from "
            "10.0.0.9 await association (connections.pending_per_peer)"]
        assert watchdog.counts() == {"pending": 2, "associated": 0}
        for sock in socks[:2]:
            connection = watchdog.connection(sock)
            assert connection is not None
            watchdog.release(connection)
        assert watchdog.counts() == {"pending": 0, "associated": 0}
    finally:
        for s in socks:
            s.close()


# --- pynetdicom's lines --------------------------------------------------------------------


def record(name: str, thread: int, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    rec = logging.LogRecord(name, logging.ERROR, __file__, 1, "message", (), exc_info)
    rec.thread = thread
    return rec


def test_pynetdicom_lines_about_reported_connections_are_dropped(
        guard: tuple[ConnectionGuard, Clock]) -> None:
    watchdog, _ = guard
    pending, cut, busy = (conn(), conn(requested=True, cut=True),
                          conn(requested=True, established=True))
    watchdog._by_thread.update({1: pending, 2: cut, 3: busy})
    keep = watchdog._filter.filter
    assert not keep(record("pynetdicom.dul", 1))  # before the A-ASSOCIATE-RQ: ours to say
    assert not keep(record("pynetdicom.dul", 2))  # closed by the guard, which said why
    assert keep(record("pynetdicom.dul", 3))
    assert keep(record("pynetdicom.dul", 99))  # not a guarded connection


def test_network_tracebacks_keep_their_message_only(
        guard: tuple[ConnectionGuard, Clock]) -> None:
    keep = guard[0]._filter.filter
    reset = record("pynetdicom.transport", 7, ConnectionResetError(104, "reset"))
    assert keep(reset) and reset.exc_info is None
    undecodable = record("pynetdicom.dul", 7, ValueError("bad PDU"))
    assert keep(undecodable) and undecodable.exc_info is None
    bug = record("pynetdicom.events", 7, KeyError("x"))  # a handler's bug keeps its trace
    assert keep(bug) and bug.exc_info is not None and bug.exc_info[0] is KeyError


# --- PDU lengths ---------------------------------------------------------------------------


class Transport:
    """What the guard wraps: pynetdicom's AssociationSocket, reading from ``data``."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def recv(self, n: int) -> bytearray:
        chunk, self.data = self.data[:n], self.data[n:]
        return bytearray(chunk)

    def send(self, data: bytes) -> None:
        pass


@pytest.mark.parametrize("kind,length,allowed", [
    (0x01, 200_000, True),          # a large A-ASSOCIATE-RQ
    (0x01, (1 << 20) + 1, False),   # more than MAX_PDU_LENGTH
    (0x04, 16382 + 1024, True),     # P-DATA-TF: the announced maximum, and some slack
    (0x04, 16382 + 1025, False),
    (0x04, 0xFFFFFFFF, False),      # 4 GiB, which pynetdicom would try to read
], ids=lambda v: hex(v) if isinstance(v, int) else "")
def test_a_pdu_longer_than_the_node_reads_closes_the_connection(
        guard: tuple[ConnectionGuard, Clock], caplog: pytest.LogCaptureFixture, kind: int,
        length: int, allowed: bool) -> None:
    watchdog, _ = guard
    watchdog.max_pdu_length = 16382
    ours, theirs = socket.socketpair()
    try:
        assert watchdog.admit(ours, ("10.0.0.7", 7777))
        connection = watchdog.connection(ours)
        assert connection is not None
        header = bytes([kind, 0]) + length.to_bytes(4, "big")
        transport = Transport(header + b"\x00" * 16)
        watchdog._watch_io(connection, transport)
        with caplog.at_level(logging.WARNING, "archive.connections"):
            read = transport.recv(6)
        assert (read == header) is allowed
        assert connection.cut is not allowed
        if not allowed:
            assert read == b""  # what a closed connection gives pynetdicom
            theirs.settimeout(1)
            assert theirs.recv(1) == b""  # the peer sees the connection end
            assert [r.getMessage() for r in caplog.records] == [
                f"connection 10.0.0.7:7777 closed in phase request: a PDU of {length} bytes "
                f"announced (type 0x{kind:02X}), more than "
                f"{16382 + 1024 if kind == 0x04 else 1 << 20}"]
    finally:
        ours.close()
        theirs.close()


# --- threads reused --------------------------------------------------------------------


class Server:
    """What :class:`Workers` needs of a server; each connection is held until its burst
    is let go."""

    def __init__(self) -> None:
        self.served: list[tuple[Any, Any]] = []   # (connection, prepared association)
        self.threads: set[threading.Thread] = set()
        self.go = threading.Event()
        self.prepared = 0
        self._lock = threading.Lock()

    def prepare(self) -> str:
        with self._lock:
            self.prepared += 1
            return f"association {self.prepared}"

    def serve(self, request: Any, client_address: Any, prepared: Any) -> None:
        with self._lock:
            self.served.append((request, prepared))
            self.threads.add(threading.current_thread())
        self.go.wait(10)


def until(condition: Any, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_connection_threads_are_reused_and_no_more_than_the_spares_wait(
        bursts: list[int]) -> None:
    """Bursts of simultaneous connections: each is served once; one that comes while a
    thread waits is served there, with an association built beforehand; afterwards
    no more than SPARE_WORKERS threads wait, and stopping ends them."""
    server = Server()
    workers = Workers(server)
    handed = 0
    try:
        for size in bursts:
            server.go.clear()
            waiting = workers.idle()
            before = len(server.served)
            for n in range(size):
                workers.hand(f"connection {handed + n}", ("10.0.0.1", 1000 + n))
            assert until(lambda n=before + size: len(server.served) == n)
            handed += size
            burst = server.served[before:]
            # the threads that waited took the first connections, with associations
            # built while they waited; the others were new threads that build their own
            prepared = [p for _, p in burst if p is not None]
            assert len(prepared) == min(waiting, size)
            assert len(set(prepared)) == len(prepared)
            server.go.set()
            spares = min(SPARE_WORKERS, max(size, waiting))
            assert until(lambda n=spares: workers.idle() == n)
            assert until(lambda n=spares: sum(t.is_alive() for t in server.threads) == n)
        assert sorted(r for r, _ in server.served) == sorted(
            f"connection {n}" for n in range(handed))
    finally:
        server.go.set()
        workers.stop()
    assert until(lambda: not any(t.is_alive() for t in server.threads))

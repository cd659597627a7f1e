"""Slot exhaustion, over the network: hostile peers cannot hold the node.

The node runs as a subprocess with short deadlines (``LIMITS``).  From one peer per
kind (127.0.0.10, .11, ... on loopback), more than ``max_associations`` connections of
each hostile kind of ``tests/hostile.py`` at once: silent, half an A-ASSOCIATE-RQ,
random bytes, a PDU header announcing 64 MiB, a one-byte trickle, a C-STORE stalled
mid-dataset, a C-GET whose responses are never read, and on a TLS node a ClientHello or
half an A-ASSOCIATE-RQ after the handshake.  Meanwhile 127.0.0.1 is served at once.

What a user would notice, per kind: the peer holds its share of slots
(``pending_per_peer`` or ``associations_per_peer``) and no more, every other connection
is refused at once (closed, or A-ASSOCIATE-RJ rejected-transient local-limit-exceeded);
the held ones are closed by their phase's deadline; each refusal and each closing is one
log line naming peer, phase and reason, and no traceback; afterwards the same peer gets
its slots back.  Then the global limits (``max_pending``, ``max_associations``) and an
association that outlives a request longer than ``network_timeout``.
"""

from __future__ import annotations

import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningNode
from helpers import CT_IMAGE, identifier, image_dataset, wait_for
from hostile import ASSOCIATED, KINDS, PRE_ASSOCIATION, TLS, Siege
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet, Verification

pytestmark = pytest.mark.network

#: Per-peer shares below max_associations (10), deadlines of a few seconds.
LIMITS = {"associations_per_peer": 3, "pending_per_peer": 3, "max_pending": 40,
          "request_timeout": 3, "acse_timeout": 3, "dimse_timeout": 3,
          "network_timeout": 2}
MAX_ASSOCIATIONS = 10
#: Hostile connections per kind, from one peer: more than max_associations.
COUNT = 12
#: How late past its deadline a connection may close (the watchdog ticks every 0.2 s;
#: this machine is shared).
SLACK = 1.5
#: Longest a C-ECHO or C-STORE of the other peer may take, association included (it
#: takes some 30 ms on a quiet machine; the node's database is busy with the C-GETs of
#: the siege); both together below the hostile connections' deadlines.
LATENCY = {"echo": 1.0, "store": 1.5}
#: Refused connections close at once.
AT_ONCE = 0.5

SOURCES = {kind: f"127.0.0.{10 + n}" for n, kind in enumerate(KINDS)}
#: Kinds the node drops as soon as it reads them (the rest wait for their deadline).
DROPPED = ("random_bytes", "huge_pdu")


# --- the sieges ------------------------------------------------------------------------


@dataclass
class Served:
    """What the other peer (127.0.0.1) got during a siege: per operation (echo, store)
    its status, its time, and how many hostile connections of each kind were still
    open once it was answered."""

    status: dict[str, int | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    still_open: dict[str, dict[str, int]] = field(default_factory=dict)
    answered: dict[str, float] = field(default_factory=dict)  # time.monotonic()


@dataclass
class Outcome:
    node: RunningNode
    sieges: dict[str, Siege]
    served: Served
    tls: ssl.SSLContext | None = None  # what a client needs to talk to the node
    log: str = ""


def timed(action: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = action()
    return result, time.monotonic() - started


def echo(node: RunningNode, source: str | None = None,
         tls: ssl.SSLContext | None = None) -> int | None:
    """C-ECHO on a new association from ``source``; the status, None if refused."""
    ae = AE(ae_title="PEER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title,
                         bind_address=(source, 0) if source else None,
                         tls_args=(tls, "localhost") if tls else None)
    try:
        if not assoc.is_established:
            return None
        status = assoc.send_c_echo()
        assoc.release()
        return int(status.Status) if "Status" in status else None
    finally:
        ae.shutdown()


def store(node: RunningNode, ds: Dataset, tls: ssl.SSLContext | None = None) -> int | None:
    ae = AE(ae_title="PEER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title,
                         tls_args=(tls, "localhost") if tls else None)
    try:
        if not assoc.is_established:
            return None
        status = assoc.send_c_store(ds)
        assoc.release()
        return int(status.Status) if "Status" in status else None
    finally:
        ae.shutdown()


def ct_image(rows: int = 64, columns: int = 64) -> Dataset:
    ds = image_dataset(pixels=bytes(rows * columns * 2))
    ds.Rows, ds.Columns = rows, columns
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def besiege(node: RunningNode, kinds: tuple[str, ...], tls: ssl.SSLContext | None = None,
            retrieve: tuple[str, Dataset] | None = None) -> Outcome:
    """Every kind at once, each from its own peer; the other peer served meanwhile."""
    sieges: dict[str, Siege] = {}
    # associated kinds first (their deadlines run from their last PDU), then the
    # kinds timed from the connection, then the other peer at once
    for kind in sorted(kinds, key=lambda k: k not in ASSOCIATED):
        sieges[kind] = Siege(node.port, kind, SOURCES[kind], count=COUNT,
                             tls_context=tls, retrieve=retrieve).start()
    served = Served()
    operations = {"echo": lambda: echo(node, tls=tls),
                  "store": lambda: store(node, ct_image(), tls)}
    for name, operation in operations.items():
        served.status[name], served.seconds[name] = timed(operation)
        served.answered[name] = time.monotonic()
        served.still_open[name] = {kind: sum(h.open for h in siege.connections)
                                   for kind, siege in sieges.items()}
    try:
        longest = max(LIMITS["request_timeout"], LIMITS["dimse_timeout"]) + 8
        for siege in sieges.values():
            siege.wait_closed(longest)
    finally:
        for siege in sieges.values():
            siege.close()
    return Outcome(node, sieges, served, tls)


@pytest.fixture(scope="module")
def plain(module_node_factory: Any) -> Outcome:
    node = module_node_factory({"max_associations": MAX_ASSOCIATIONS, "connections": LIMITS})
    large = ct_image(1536, 2048)  # 6 MiB: more than the socket buffers hold
    assert store(node, large) == 0x0000
    keys = identifier("IMAGE", StudyInstanceUID=large.StudyInstanceUID,
                      SeriesInstanceUID=large.SeriesInstanceUID,
                      SOPInstanceUID=large.SOPInstanceUID)
    outcome = besiege(node, PRE_ASSOCIATION + ASSOCIATED, retrieve=(CT_IMAGE, keys))
    outcome.log = node.log()
    return outcome


@pytest.fixture(scope="module")
def tls(module_node_factory: Any, certificate: tuple[Path, Path]) -> Outcome:
    cert, key = certificate
    node = module_node_factory({
        "max_associations": MAX_ASSOCIATIONS, "connections": LIMITS,
        "tls": {"certificate": str(cert), "private_key": str(key)}})
    context = ssl.create_default_context(cafile=str(cert))
    outcome = besiege(node, ("silent", *TLS), tls=context)
    outcome.log = node.log()
    return outcome


@pytest.fixture(params=KINDS)
def siege(request: pytest.FixtureRequest) -> tuple[Outcome, Siege]:
    kind = request.param
    outcome: Outcome = request.getfixturevalue("tls" if kind in TLS else "plain")
    return outcome, outcome.sieges[kind]


# --- the other peer ---------------------------------------------------------------------


@pytest.mark.parametrize("node", ["plain", "tls"])
def test_another_peer_is_served_at_once(request: pytest.FixtureRequest, node: str) -> None:
    outcome: Outcome = request.getfixturevalue(node)
    served = outcome.served
    for operation, bound in LATENCY.items():
        assert served.status[operation] == 0x0000, outcome.log[-3000:]
        assert served.seconds[operation] < bound, served
        # ... while the sieges were on: every kind still held what it had taken. By
        # when each connection closed: the siege's poller notices the connections the
        # node refused at once a little later, and may not have when the peer is served.
        for kind, siege in outcome.sieges.items():
            if kind not in DROPPED:
                dropped = [h for h in siege.held()
                           if h.closed is not None and h.closed < served.answered[operation]]
                assert siege.held() and not dropped, (operation, kind, served)


# --- each hostile kind ---------------------------------------------------------------


def test_one_peer_holds_its_share_and_no_more(siege: tuple[Outcome, Siege]) -> None:
    _, hostile = siege
    if hostile.kind in ASSOCIATED:
        accepted = [h for h in hostile.connections if h.answer == 0x02]
        refused = [h for h in hostile.connections if h.answer != 0x02]
        assert len(accepted) == LIMITS["associations_per_peer"]
        for h in refused:  # A-ASSOCIATE-RJ rejected-transient, local-limit-exceeded
            assert h.rejection == (0x02, 0x03, 0x02) or h.closed - h.opened < AT_ONCE, h
        assert any(h.rejection == (0x02, 0x03, 0x02) for h in refused)
        return
    held = hostile.held()
    refused = [h for h in hostile.connections if h not in held]
    if hostile.kind in DROPPED:
        assert len(held) <= LIMITS["pending_per_peer"]
    else:
        assert len(held) == LIMITS["pending_per_peer"], hostile.connections
    assert len(refused) >= COUNT - LIMITS["pending_per_peer"]
    for h in refused:
        assert h.closed is not None and h.closed - h.opened < AT_ONCE, h


def deadline_of(h: Any) -> float:
    """When the node must have closed a hostile connection it took."""
    if h.kind == "stalled_store":  # from its last PDU: dimse_timeout
        return h.last_sent + LIMITS["dimse_timeout"] + SLACK
    if h.kind == "deaf":  # the node first reads 6 MiB, then network_timeout to send it
        return h.last_sent + LIMITS["network_timeout"] + SLACK + 3
    return h.opened + LIMITS["request_timeout"] + SLACK  # however it trickles


def test_hostile_connections_are_closed_by_their_deadline(siege: tuple[Outcome,
                                                                       Siege]) -> None:
    _, hostile = siege
    for h in hostile.connections:
        assert h.closed is not None, f"{h.kind} connection never closed by the node"
        assert h.closed <= deadline_of(h), (h, h.closed - h.opened)


#: What the node's line says about each held connection of a kind.
CLOSED_LINE = {kind: r"closed in phase request: no complete A-ASSOCIATE-RQ within 3 s"
               for kind in (*PRE_ASSOCIATION, *TLS)}
CLOSED_LINE["huge_pdu"] = (r"closed in phase request: a PDU of 67108864 bytes announced "
                           r"\(type 0x01\), more than 1048576")
CLOSED_LINE["stalled_store"] = r"closed in phase message: DIMSE message incomplete"
CLOSED_LINE["deaf"] = r"closed in phase handling: peer not reading"


def test_each_refusal_and_closing_is_one_log_line(siege: tuple[Outcome, Siege]) -> None:
    outcome, hostile = siege
    source = re.escape(hostile.source)
    lines = [line for line in outcome.log.splitlines()
             if "archive.connections" in line and re.search(rf"\b{source}:\d+", line)]
    refused = [line for line in lines if re.search(r"refused in phase (request|negotiation)",
                                                   line)]
    closed = [line for line in lines if "closed in phase" in line]
    assert len(lines) == COUNT, "\n".join(lines)  # one per connection, no more
    assert len(refused) + len(closed) == COUNT, "\n".join(lines)
    if hostile.kind != "random_bytes":  # garbage may also end as "not an A-ASSOCIATE-RQ"
        for line in closed:
            assert re.search(CLOSED_LINE[hostile.kind], line), line
    assert all(" WARNING " in line for line in lines)


@pytest.mark.parametrize("node", ["plain", "tls"])
def test_no_traceback_in_the_log(request: pytest.FixtureRequest, node: str) -> None:
    outcome: Outcome = request.getfixturevalue(node)
    assert "Traceback" not in outcome.log
    assert "Exception in" not in outcome.log


def test_the_peer_gets_its_slots_back(siege: tuple[Outcome, Siege]) -> None:
    """Every path (refusal, A-ASSOCIATE-RJ, deadline, reset) gave its slot back: the
    same peer has all its association slots, hence all its pending ones too, at once."""
    outcome, hostile = siege
    statuses: list[int | None] = []
    barrier = threading.Barrier(LIMITS["associations_per_peer"])

    def hold() -> None:
        ae = AE(ae_title="AGAIN")
        ae.add_requested_context(Verification)
        barrier.wait(10)
        assoc = ae.associate("127.0.0.1", outcome.node.port, ae_title="ARCHIVE",
                             bind_address=(hostile.source, 0),
                             tls_args=(outcome.tls, "localhost") if outcome.tls else None)
        try:
            statuses.append(int(assoc.send_c_echo().Status) if assoc.is_established
                            else None)
            barrier.wait(10)  # all established at once before any releases
            if assoc.is_established:
                assoc.release()
        finally:
            ae.shutdown()

    threads = [threading.Thread(target=hold) for _ in range(LIMITS["associations_per_peer"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert statuses == [0x0000] * LIMITS["associations_per_peer"]


# --- the global limits -------------------------------------------------------------------


def test_max_pending_bounds_all_peers_together(node_factory: Any) -> None:
    node = node_factory({"connections": {**LIMITS, "max_pending": 5}})
    time.sleep(AT_ONCE)  # the connection by which the fixture saw the port open is gone
    sieges = [Siege(node.port, "silent", f"127.0.0.{n}", count=3).start()
              for n in (20, 21, 22)]
    try:
        time.sleep(AT_ONCE)
        held = sum(h.open for s in sieges for h in s.connections)
        assert held == 5, node.log()
        assert all(s.wait_closed(LIMITS["request_timeout"] + SLACK + 1) for s in sieges)
    finally:
        for s in sieges:
            s.close()
    log = node.log()
    assert log.count("connections await association (connections.max_pending)") == 4, log
    assert echo(node, "127.0.0.20") == 0x0000  # all given back


def test_max_associations_is_shared_by_all_peers(node_factory: Any) -> None:
    """Two associations each from three peers, four allowed in all: the last two get
    A-ASSOCIATE-RJ rejected-transient, local-limit-exceeded."""
    node = node_factory({"max_associations": 4,
                         "connections": {**LIMITS, "associations_per_peer": 2}})
    ae = AE(ae_title="MANY")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assocs = []
    try:
        for n in (30, 30, 31, 31, 32, 32):
            assocs.append(ae.associate("127.0.0.1", node.port, ae_title="ARCHIVE",
                                       bind_address=(f"127.0.0.{n}", 0)))
        established = [a.is_established for a in assocs]
        assert established == [True] * 4 + [False] * 2
        for assoc in assocs[4:]:
            rj = assoc.acceptor.primitive
            assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    finally:
        for assoc in assocs:
            if assoc.is_established:
                assoc.release()
        ae.shutdown()
    assert node.log().count("4 associations (max_associations)") == 2


# --- a long request is not idleness ---------------------------------------------------------


def test_an_association_outlives_a_request_longer_than_network_timeout(
        node_factory: Any) -> None:
    """A C-GET whose requestor takes 1.25 × network_timeout to store the instance: the
    association is still there for a C-ECHO afterwards (pynetdicom's own idle timer
    counts only received PDUs, and would abort it at once)."""
    node = node_factory({"connections": LIMITS})
    ds = ct_image()
    assert store(node, ds) == 0x0000
    slow = LIMITS["network_timeout"] * 1.25
    assert slow < LIMITS["dimse_timeout"]  # the node waits that long for the answer

    def on_store(event: Any) -> int:
        time.sleep(slow)
        return 0x0000

    ae = AE(ae_title="SLOWGET")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ARCHIVE",
                         ext_neg=[build_role(CT_IMAGE, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        assert assoc.is_established
        keys = identifier("IMAGE", StudyInstanceUID=ds.StudyInstanceUID,
                          SeriesInstanceUID=ds.SeriesInstanceUID,
                          SOPInstanceUID=ds.SOPInstanceUID)
        started = time.monotonic()
        statuses = [int(status.Status) for status, _ in
                    assoc.send_c_get(keys, StudyRootQueryRetrieveInformationModelGet)
                    if status is not None and "Status" in status]
        assert time.monotonic() - started > LIMITS["network_timeout"]
        assert statuses[-1] == 0x0000, statuses
        time.sleep(0.5)  # what an idle timer checked after the request would see
        assert assoc.is_established, node.log()[-2000:]
        assert int(assoc.send_c_echo().Status) == 0x0000
        assoc.release()
    finally:
        ae.shutdown()
    wait_for(lambda: "association released SLOWGET" in node.log(), 5,
             message="the release")


def test_the_node_stops_at_once_whatever_its_connections_do(node_factory: Any) -> None:
    """SIGTERM with half-open, trickling and stalled connections and an idle association,
    all far from their deadlines: the node closes them and exits at once."""
    node = node_factory({"connections": {**LIMITS, "request_timeout": 60,
                                         "dimse_timeout": 60, "network_timeout": 60}})
    sieges = [Siege(node.port, kind, f"127.0.0.{40 + n}", count=3).start()
              for n, kind in enumerate(("partial_rq", "trickle", "stalled_store"))]
    ae = AE(ae_title="IDLE")
    ae.add_requested_context(Verification)
    idle = ae.associate("127.0.0.1", node.port, ae_title="ARCHIVE")
    try:
        assert idle.is_established
        time.sleep(AT_ONCE)
        (status, seconds) = timed(node.stop)
        assert status == 0, node.log()[-3000:]
        assert seconds < 5, node.log()[-3000:]
        assert all(s.wait_closed(1) for s in sieges)
        assert "Traceback" not in node.log()
        # the association was ended with an A-ABORT, not dropped with the process
        assert "association aborted IDLE@" in node.log(), node.log()[-3000:]
    finally:
        for s in sieges:
            s.close()
        ae.shutdown()

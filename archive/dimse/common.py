"""What the DIMSE handlers share, below them all: how a peer and a status are written,
TCP_NODELAY, the Query/Retrieve models, the client side of associations the node opens
(TLS, a paused reactor), and :class:`Serving`, the node as they see it.

The node binds the handlers (:meth:`archive.dimse.node.Node.handlers`); they take it as
a :class:`Serving` so that none of them imports the node, nor one another.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from pydicom.dataset import Dataset
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from archive.model import PATIENT, STUDY

if TYPE_CHECKING:
    from pynetdicom import AE

    from acl.rules import Decision
    from archive.config import Config
    from archive.context import Context
    from archive.dimse.receiving import Receiver


class Serving(Protocol):
    """What a handler is given: the core context, and the node's own DICOM parts."""

    context: Context
    receiver: Receiver  # C-STORE datasets as received
    ae: AE  # sub-associations of C-MOVE
    identities: dict[int, str]  # verified user identity per id(association)

    def principal(self, assoc: Any) -> str: ...

    def authorize(self, assoc: Any, service: str) -> tuple[str, Decision]: ...


def peer(event: Event) -> str:
    """``CALLING_AE@host:port`` of the association an event belongs to."""
    requestor = event.assoc.requestor
    return f"{requestor.ae_title}@{requestor.address}:{requestor.port}"


def status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def set_nodelay(event: Event) -> None:
    """EVT_CONN_OPEN handler disabling Nagle on the association's socket.

    pynetdicom leaves Nagle on; a C-STORE round trip then waits ~40-90 ms for delayed
    ACKs.  Bound on the server and on every association the node requests (C-MOVE).
    """
    try:
        sock = event.assoc.dul.socket.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


#: Query/Retrieve information model of each C-FIND/C-MOVE/C-GET SOP class.
MODELS = {
    PatientRootQueryRetrieveInformationModelFind: PATIENT,
    StudyRootQueryRetrieveInformationModelFind: STUDY,
    PatientRootQueryRetrieveInformationModelMove: PATIENT,
    StudyRootQueryRetrieveInformationModelMove: STUDY,
    PatientRootQueryRetrieveInformationModelGet: PATIENT,
    StudyRootQueryRetrieveInformationModelGet: STUDY,
}


def client_tls(cfg: Config) -> ssl.SSLContext:
    """The TLS context of an association the node opens (``tls: true`` destinations):
    the node's certificate, peers checked against ``tls.ca_certificate``."""
    tls = cfg.tls
    context = ssl.create_default_context(cafile=tls.ca_certificate or None)
    if tls.certificate:
        context.load_cert_chain(tls.certificate, tls.private_key or None)
    return context


class _HeldCheckpoint(threading.Event):
    """A reactor checkpoint that pynetdicom's ``send_*`` cannot reopen."""

    def set(self) -> None:
        pass


@contextlib.contextmanager
def reactor_held(assoc: Any, wait: float = 1.0) -> Iterator[bool]:
    """Keep an association's reactor thread paused while the node sends on it from
    another thread; yields whether the reactor was seen paused within ``wait`` seconds.

    pynetdicom pauses the reactor for each request it sends by clearing an event and
    polling a flag the reactor sets just *before* waiting on it, and reopens it after
    the response: a request that follows its predecessor at once can find the flag
    stale, and the reactor then takes the response off the queue ("Received unexpected
    C-STORE service message") while the send waits out the DIMSE timeout.  A Move
    Destination sends no requests, so its reactor has nothing to do until release; a
    reactor paused at its checkpoint has answered the request it was serving (a storage
    commitment report goes after the N-ACTION response).
    """
    real = getattr(assoc, "_reactor_checkpoint", None)
    if not isinstance(real, threading.Event):  # not pynetdicom's (a test's stand-in)
        yield True
        return
    held = _HeldCheckpoint()
    assoc._reactor_checkpoint = held
    paused = False
    try:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:  # until it blocks on the held checkpoint
            if not getattr(assoc, "is_established", True):
                break  # its reactor has ended
            if assoc._is_paused:
                time.sleep(0.005)  # several of its 1 ms turns: waiting, not passing by
                if assoc._is_paused:
                    paused = True
                    break
            time.sleep(0.0005)
        yield paused
    finally:
        assoc._reactor_checkpoint = real
        threading.Event.set(held)  # it may be waiting on the held one
        real.set()

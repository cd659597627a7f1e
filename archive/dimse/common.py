"""What the DIMSE handlers share, below them all: how a peer and a status are written,
TCP_NODELAY, the Query/Retrieve models, and :class:`Serving`, the node as they see it.

The node binds the handlers (:meth:`archive.dimse.node.Node.handlers`); they take it as
a :class:`Serving` so that none of them imports the node, nor one another.
"""

from __future__ import annotations

import socket
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

"""DIMSE service handlers: thin adapters between pynetdicom events and the archive.

Each handler logs one line per operation (who, what, outcome) and never lets an
exception escape: pynetdicom would answer a generic failure without an Error Comment.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pymongo.errors import PyMongoError
from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from archive.model import PATIENT, STUDY
from archive.query import QueryError, translate
from archive.storage import OUT_OF_RESOURCES

if TYPE_CHECKING:
    from archive.node import Node

log = logging.getLogger("archive.services")


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


def handle_echo(event: Event, node: Node) -> int:
    log.info("C-ECHO %s -> 0x0000", peer(event))
    return 0x0000


def handle_store(event: Event, node: Node) -> Dataset:
    started = time.perf_counter()
    if not node.begin_store():
        log.warning("C-STORE %s refused: node stopping", peer(event))
        return status(OUT_OF_RESOURCES, "archive is shutting down")
    try:
        try:
            part10 = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # noqa: BLE001 - a malformed request
            log.warning("C-STORE %s: cannot read the dataset: %s", peer(event), exc)
            return status(0xC000, "cannot read the dataset")
        outcome = node.archive.store(part10, source=event.assoc.requestor.ae_title)
    except Exception as exc:  # noqa: BLE001 - the node keeps serving whatever happens
        log.exception("C-STORE %s: unexpected error", peer(event))
        return status(OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}")
    finally:
        node.end_store()
    elapsed = (time.perf_counter() - started) * 1000
    line = "C-STORE %s sop=%s -> 0x%04X%s (%.1f ms)"
    args = (peer(event), outcome.sop_instance_uid or "?", outcome.status,
            f" {outcome.comment}" if outcome.comment else "", elapsed)
    (log.info if outcome.ok else log.warning)(line, *args)
    return status(outcome.status, outcome.comment)


#: Query/Retrieve information model of each C-FIND/C-MOVE/C-GET SOP class.
MODELS = {
    PatientRootQueryRetrieveInformationModelFind: PATIENT,
    StudyRootQueryRetrieveInformationModelFind: STUDY,
}


def _identifier(event: Event) -> Dataset:
    """The request identifier, decoded (pynetdicom decodes it lazily)."""
    identifier = event.identifier
    identifier.decode()
    return identifier


def handle_find(event: Event, node: Node) -> Iterator[tuple[Any, Dataset | None]]:
    started = time.perf_counter()
    who = peer(event)
    try:
        identifier = _identifier(event)
        query = translate(identifier, MODELS[event.request.AffectedSOPClassUID],
                          pn_case_insensitive=node.cfg.query.pn_case_insensitive,
                          combined_datetime=node.cfg.query.combined_datetime)
    except QueryError as exc:
        log.warning("C-FIND %s refused: 0x%04X %s", who, exc.status, exc.comment)
        yield status(exc.status, exc.comment), None
        return
    except Exception as exc:  # noqa: BLE001 - an identifier pydicom cannot decode
        log.warning("C-FIND %s: cannot decode the identifier: %s", who, exc)
        yield status(0xC000, "cannot decode the identifier"), None
        return
    count, outcome = 0, "0x0000"
    try:
        for response in node.finder.responses(query, identifier):
            if event.is_cancelled:
                outcome = "0xFE00 cancelled"
                yield 0xFE00, None
                return
            count += 1
            yield 0xFF00, response
    except PyMongoError as exc:
        outcome = f"0xA700 database error {type(exc).__name__}"
        yield status(OUT_OF_RESOURCES, "database unavailable, query not completed"), None
        return
    except Exception as exc:  # noqa: BLE001 - the node keeps serving whatever happens
        outcome = f"0xC001 internal error {type(exc).__name__}"
        log.exception("C-FIND %s: unexpected error", who)
        yield status(0xC001, f"internal error: {type(exc).__name__}"), None
        return
    finally:
        log.info("C-FIND %s level=%s keys=%d -> %d matches, %s (%.1f ms)", who, query.level,
                 len(query.keys), count, outcome, (time.perf_counter() - started) * 1000)
    yield 0x0000, None


def _assoc_logger(kind: str) -> Any:
    def handler(event: Event, node: Node) -> None:
        assoc = event.assoc
        contexts = len(assoc.accepted_contexts) if kind == "accepted" else ""
        log.info("association %s %s%s", kind, peer(event),
                 f" ({contexts} contexts)" if contexts else "")
    return handler


def handlers(node: Node) -> list[tuple[Any, ...]]:
    """Event bindings for :meth:`pynetdicom.AE.start_server`."""
    return [
        (evt.EVT_C_ECHO, handle_echo, [node]),
        (evt.EVT_C_STORE, handle_store, [node]),
        (evt.EVT_C_FIND, handle_find, [node]),
        (evt.EVT_CONN_OPEN, set_nodelay),
        (evt.EVT_ACCEPTED, _assoc_logger("accepted"), [node]),
        (evt.EVT_RELEASED, _assoc_logger("released"), [node]),
        (evt.EVT_ABORTED, _assoc_logger("aborted"), [node]),
        (evt.EVT_REJECTED, _assoc_logger("rejected"), [node]),
    ]

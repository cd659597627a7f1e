"""DIMSE service handlers: thin adapters between pynetdicom events and the archive.

Each handler logs one line per operation (who, what, outcome) and never lets an
exception escape: pynetdicom would answer a generic failure without an Error Comment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pymongo.errors import OperationFailure, PyMongoError
from pynetdicom.events import Event

from acl.audit import (
    association_entry,
    operation_entry,
    rejection_entry,
    requested_user,
    summarize,
)
from acl.rules import ECHO, NOT_AUTHORIZED, QUERY, STORE, Decision, Rule
from archive.answers import Syntax
from archive.dimse.common import MODELS, Serving, peer, status
from archive.dimse.user_identity import principal_of
from archive.query import QueryError, translate
from archive.rejection import Rejection
from archive.storage import OUT_OF_RESOURCES

log = logging.getLogger("archive.services")


def _audit(node: Serving, event: Event, operation: str, principal: str, decision: Decision,
           code: int, rule: Rule | None = None, **details: Any) -> None:
    """Queue the audit entry of one operation (no database round trip here)."""
    rule = rule or decision.deciding_rule()
    node.context.audit.record(operation_entry(
        event.assoc, operation, principal, decision.service, allowed=code != NOT_AUTHORIZED,
        status=code, restricted=decision.restricted,
        rule=rule.index if rule is not None and code != NOT_AUTHORIZED else None, **details))


def _deny(node: Serving, event: Event, operation: str, principal: str, decision: Decision,
          started: float, request: str = "", outside_rules: bool = False) -> Dataset:
    """Refused: Not authorized (0x0124), logged, audited."""
    comment = decision.comment(document_refused=outside_rules)
    log.warning("%s %s denied to %s: 0x%04X %s", operation, peer(event),
                principal_of(event.assoc, node).describe(), NOT_AUTHORIZED, comment)
    _audit(node, event, operation, principal, decision, NOT_AUTHORIZED, request=request,
           comment=comment, started=started)
    return status(NOT_AUTHORIZED, comment)


def handle_echo(event: Event, node: Serving) -> Dataset | int:
    started = time.perf_counter()
    principal, decision = node.authorize(event.assoc, ECHO)
    if not decision.allowed:
        return _deny(node, event, "C-ECHO", principal, decision, started)
    log.info("C-ECHO %s -> 0x0000", peer(event))
    _audit(node, event, "C-ECHO", principal, decision, 0x0000, started=started)
    return 0x0000


def handle_store(event: Event, node: Serving) -> Dataset:
    started = time.perf_counter()
    principal, decision = node.authorize(event.assoc, STORE)
    sop = str(event.request.AffectedSOPInstanceUID or "")

    def answer(code: int, comment: str = "", rule: Rule | None = None) -> Dataset:
        _audit(node, event, "C-STORE", principal, decision, code, rule, request=sop,
               comment=comment, started=started)
        return status(code, comment)

    if not decision.allowed:
        return _deny(node, event, "C-STORE", principal, decision, started, sop)
    try:  # as received: its bytes, or the path of its file when it is large
        part10 = node.receiver.dataset(event)
    except Exception as exc:  # noqa: BLE001 - a malformed request
        log.warning("C-STORE %s: cannot read the dataset: %s", peer(event), exc)
        return answer(0xC000, "cannot read the dataset")
    stored = node.context.store_as(decision, part10, event.assoc.requestor.ae_title)
    outcome = stored.outcome
    if stored.stopping:
        log.warning("C-STORE %s refused: node stopping", peer(event))
        return answer(outcome.status, outcome.comment)
    if stored.outside_rules:
        return _deny(node, event, "C-STORE", principal, decision, started, sop, True)
    if stored.error is not None:
        log.error("C-STORE %s: unexpected error", peer(event), exc_info=stored.error)
        return answer(outcome.status, outcome.comment)
    elapsed = (time.perf_counter() - started) * 1000
    line = "C-STORE %s sop=%s -> 0x%04X%s (%.1f ms)"
    args = (peer(event), outcome.sop_instance_uid or "?", outcome.status,
            f" {outcome.comment}" if outcome.comment else "", elapsed)
    (log.info if outcome.ok else log.warning)(line, *args)
    if stored.rejection is not None:
        _audit_rejection(node, event, principal, stored.rejection, started)
    return answer(outcome.status, outcome.comment, stored.rule)


def _audit_rejection(node: Serving, event: Event, principal: str, done: Rejection,
                     started: float) -> None:
    """A rejection note stored: one line and one audit entry saying what it rejected."""
    log.info("REJECT %s note=%s %s: %d instances of %d series rejected%s", peer(event),
             done.note.sop, done.note.code, done.instances, done.series,
             " (finished by the journal)" if done.deferred else "")
    node.context.audit.record(rejection_entry(event.assoc, principal, done, started))


def _identifier(event: Event) -> Dataset:
    """The request identifier.  Its elements stay raw until read, and pydicom converts
    each with the identifier's Specific Character Set then: ``Dataset.decode()``, a
    walk over every element, was some 6% of the node's Python in a small C-FIND."""
    return event.identifier


def _summary(event: Event) -> str:
    """The identifier in one line for the audit trail ("?" when it does not decode)."""
    try:
        return summarize(_identifier(event))
    except Exception:  # noqa: BLE001 - the handler reports the decoding failure itself
        return "?"


def _syntax(event: Event) -> Syntax | None:
    """(implicit VR, little endian) of the request's presentation context."""
    try:
        ts = UID(event.context.transfer_syntax)
        return bool(ts.is_implicit_VR), bool(ts.is_little_endian)
    except Exception:  # noqa: BLE001 - a private syntax: answers built the plain way
        return None


def handle_find(event: Event, node: Serving) -> Iterator[tuple[Any, Dataset | None]]:
    started = time.perf_counter()
    who = peer(event)
    principal, decision = node.authorize(event.assoc, QUERY)
    request = _summary(event)

    def audit(code: int, **details: Any) -> None:
        _audit(node, event, "C-FIND", principal, decision, code, request=request,
               started=started, **details)

    if not decision.allowed:
        yield _deny(node, event, "C-FIND", principal, decision, started, request), None
        return
    try:
        identifier = _identifier(event)
        model = MODELS[event.request.AffectedSOPClassUID]
        query = translate(identifier, model, **node.context.query_options)
    except QueryError as exc:
        log.warning("C-FIND %s refused: 0x%04X %s", who, exc.status, exc.comment)
        audit(exc.status, comment=exc.comment)
        yield status(exc.status, exc.comment), None
        return
    except Exception as exc:  # noqa: BLE001 - an identifier pydicom cannot decode
        log.warning("C-FIND %s: cannot decode the identifier: %s", who, exc)
        audit(0xC000, comment="cannot decode the identifier")
        yield status(0xC000, "cannot decode the identifier"), None
        return
    if not node.context.health.up:  # refused at once, not after the driver's timeouts
        comment = "database unavailable, query not completed"  # as when it fails midway
        log.warning("C-FIND %s refused: 0x%04X %s", who, OUT_OF_RESOURCES, comment)
        audit(OUT_OF_RESOURCES, comment=comment)
        yield status(OUT_OF_RESOURCES, comment), None
        return
    syntax = _syntax(event)  # answers are encoded for it as they are built
    # only what the principal's patterns let it see, when restricted
    results = node.context.answers(decision, query, identifier, model, syntax)
    count, outcome, code = 0, "0x0000", 0x0000
    try:
        for response in results:
            if event.is_cancelled:
                outcome, code = "0xFE00 cancelled", 0xFE00
                yield 0xFE00, None
                return
            count += 1
            yield 0xFF00, response
    except OperationFailure as exc:  # the database answered, refusing the query
        outcome, code = f"0xC001 query refused by the database: {exc.code}", 0xC001
        log.error("C-FIND %s: the database refused the query: %s", who, exc)
        yield status(0xC001, "the database cannot run this query"), None
        return
    except PyMongoError as exc:
        node.context.health.suspect(exc)
        outcome, code = f"0xA700 database error {type(exc).__name__}", OUT_OF_RESOURCES
        yield status(OUT_OF_RESOURCES, "database unavailable, query not completed"), None
        return
    except Exception as exc:  # noqa: BLE001 - the node keeps serving whatever happens
        outcome, code = f"0xC001 internal error {type(exc).__name__}", 0xC001
        log.exception("C-FIND %s: unexpected error", who)
        yield status(0xC001, f"internal error: {type(exc).__name__}"), None
        return
    finally:
        log.info("C-FIND %s level=%s keys=%d -> %d matches, %s (%.1f ms)", who, query.level,
                 len(query.keys), count, outcome, (time.perf_counter() - started) * 1000)
        audit(code, counts={"matches": count})
    yield 0x0000, None


#: Audit event name of each association event.
_ASSOCIATION_EVENTS = {"accepted": "A-ASSOCIATE", "released": "A-RELEASE",
                       "aborted": "A-ABORT", "rejected": "A-ASSOCIATE-RJ"}


def association_logger(kind: str) -> Any:
    """A handler logging and auditing one kind of association event (accepted, ...)."""
    def handler(event: Event, node: Serving) -> None:
        assoc = event.assoc
        contexts = len(assoc.accepted_contexts) if kind == "accepted" else ""
        log.info("association %s %s%s", kind, peer(event),
                 f" ({contexts} contexts)" if contexts else "")
        node.context.audit.record(association_entry(
            assoc, _ASSOCIATION_EVENTS[kind], node.principal(assoc),
            allowed=kind != "rejected", user=requested_user(assoc)))
    return handler

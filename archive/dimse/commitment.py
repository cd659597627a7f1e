"""Storage Commitment Push Model SCP (PS3.4 J.3): N-ACTION in, N-EVENT-REPORT out.

A modality sends an N-ACTION (Action Type 1, Storage Commitment Request) naming, by
SOP class and instance, what it sent, under a Transaction UID.  The node answers the
N-ACTION at once (0x0000: the request is taken, nothing is committed yet), then, in a
worker thread, checks each instance (:func:`archive.commitment.verify`: stored, of
that class, its original whole in GridFS) and reports in an N-EVENT-REPORT: Event Type
1 when every instance is committed, 2 with the Failed SOP Sequence otherwise.

Who may ask: a principal the access rules let Store (a modality asks about what it
sent).  Restricted by Store patterns, she is answered about instances within them;
any other is reported as not existing (0x0112), exactly like an unknown UID.

Where the report goes: on the requesting association when it is still open (the
reactor paused while the node sends, :func:`reactor_held`), else on a new association
to the requester's AE title in ``destinations:``, proposing the SOP class with the node
in the SCP role (SCP/SCU Role Selection), retried ``storage_commitment.attempts`` times
``retry_seconds`` apart.  A report that cannot be delivered (no destination for the AE
title, every attempt failed, the node stopping) is logged with its transaction and
outcome, and the audit entry of the request keeps them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AllStoragePresentationContexts, build_context, build_role, evt
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.dsutils import encode
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE

from acl.audit import operation_entry
from acl.rules import NOT_AUTHORIZED, STORE, Decision, error_comment
from archive import identifiers
from archive.commitment import Reference, Verdict, verify
from archive.dimse.common import Serving, client_tls, peer, reactor_held, set_nodelay, status

log = logging.getLogger("archive.commitment")

#: Storage Commitment Push Model SOP Class and its well-known SOP Instance.
PUSH_MODEL = "1.2.840.10008.1.20.1"
PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST = 1  # Action Type ID: Request Storage Commitment
ALL_COMMITTED, SOME_FAILED = 1, 2  # Event Type IDs

# N-ACTION statuses (PS3.7 C.4).
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_SOP_INSTANCE = 0x0112
INVALID_ARGUMENT_VALUE = 0x0115
NO_SUCH_ACTION = 0x0123
RESOURCE_LIMITATION = 0x0213

#: References one request may hold (a report beyond would be megabytes).
MAX_REFERENCES = 0xFFFF
#: Requests checked or waiting for their report at once; more get 0x0213.
MAX_PENDING = 256
#: Seconds a report waits for the requesting association's reactor to finish what it
#: serves (the N-ACTION response first) before going on a new association.
SAME_ASSOCIATION_WAIT = 10.0
#: Message ID of a report (the archive invokes one N-EVENT-REPORT at a time per
#: association), and how often its answer is looked for.
REPORT_MESSAGE_ID = 1
REPORT_POLL = 0.005


class Invalid(Exception):
    """The N-ACTION is refused: its status and Error Comment."""

    def __init__(self, code: int, comment: str) -> None:
        super().__init__(comment)
        self.status, self.comment = code, comment


def _uid(value: Any, what: str) -> str:
    """A UID of the request, checked as the archive checks the UIDs it stores
    (:mod:`archive.identifiers`: unusual ones are fine, control characters and more
    than 64 characters are not).  It is only ever compared, as data."""
    text = value.strip("\x00 ") if isinstance(value, str) else ""
    if not text or identifiers.problem("UID", "", text) is not None:
        raise Invalid(INVALID_ARGUMENT_VALUE, f"{what} missing or not a UID")
    return text


def parse(action: Dataset) -> tuple[str, list[Reference]]:
    """The Transaction UID and the references of a commitment request; raises Invalid."""
    try:
        transaction = _uid(action.get("TransactionUID"), "Transaction UID (0008,1195)")
        items = action.get("ReferencedSOPSequence")
        if not items:
            raise Invalid(INVALID_ARGUMENT_VALUE, "Referenced SOP Sequence (0008,1199) empty")
        if len(items) > MAX_REFERENCES:
            raise Invalid(RESOURCE_LIMITATION, f"more than {MAX_REFERENCES} references")
        references = [Reference(_uid(item.get("ReferencedSOPClassUID"),
                                     f"item {n}: Referenced SOP Class UID"),
                                _uid(item.get("ReferencedSOPInstanceUID"),
                                     f"item {n}: Referenced SOP Instance UID"))
                      for n, item in enumerate(items, 1)]
    except Invalid:
        raise
    except Exception as exc:  # noqa: BLE001 - a dataset pydicom cannot decode
        raise Invalid(INVALID_ARGUMENT_VALUE, f"cannot decode the request: {exc}") from None
    return transaction, references


def event_information(transaction: str, verdicts: list[Verdict],
                      ae_title: str) -> tuple[int, Dataset]:
    """The Event Type ID and Event Information of the report (PS3.4 J.3.3.1)."""
    ds = Dataset()
    ds.TransactionUID = transaction
    ds.RetrieveAETitle = ae_title
    committed, failed = [], []
    for verdict in verdicts:
        item = Dataset()
        item.ReferencedSOPClassUID = verdict.reference.sop_class
        item.ReferencedSOPInstanceUID = verdict.reference.sop_instance
        if verdict.committed:
            committed.append(item)
        else:
            item.FailureReason = verdict.reason
            failed.append(item)
    if committed:
        ds.ReferencedSOPSequence = committed
    if failed:
        ds.FailedSOPSequence = failed
    return (SOME_FAILED if failed else ALL_COMMITTED), ds


@dataclass
class Request:
    """One accepted commitment request, from its check to its report's delivery."""

    assoc: Any
    who: str
    calling_ae: str
    principal: str
    decision: Decision
    transaction: str
    references: list[Reference]
    started: float = field(default_factory=time.perf_counter)
    verdicts: list[Verdict] = field(default_factory=list)
    event_type: int = 0
    report: Dataset | None = None
    attempts: int = 0
    #: the worker's task (its check, or an attempt), to know one the node never ran
    task: Future[None] | None = None

    @property
    def summary(self) -> str:
        failed = sum(not v.committed for v in self.verdicts)
        return f"{len(self.verdicts) - failed} committed, {failed} failed"


class Committer:
    """The node's storage commitment: checks in worker threads, reports, retries."""

    def __init__(self, node: Serving) -> None:
        self.node = node
        cfg = node.context.cfg
        self.settings = cfg.storage_commitment
        if cfg.accept.unknown_sop_classes:
            self.supported: Callable[[str], bool] = lambda uid: True
        else:
            classes = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts) \
                if cfg.accept.sop_classes == "all" else frozenset(cfg.accept.sop_classes)
            self.supported = classes.__contains__
        self._workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="commitment")
        self._lock = threading.Lock()
        #: requests checked or waiting for their report to be delivered, by id
        self._requests: dict[int, Request] = {}
        self._timers: dict[int, threading.Timer] = {}
        self.stopping = threading.Event()

    # -- the N-ACTION -----------------------------------------------------------------

    def take(self, event: Event) -> Dataset:
        """Check the request, queue it, and answer the N-ACTION (never raises)."""
        started = time.perf_counter()
        assoc = event.assoc
        principal, decision = self.node.authorize(assoc, STORE)
        request = event.request
        try:
            if not decision.allowed:
                raise Invalid(NOT_AUTHORIZED, decision.comment())
            if request.ActionTypeID != REQUEST:
                raise Invalid(NO_SUCH_ACTION, f"no action type {request.ActionTypeID}")
            if str(request.RequestedSOPInstanceUID or "") != PUSH_MODEL_INSTANCE:
                raise Invalid(NO_SUCH_SOP_INSTANCE,
                              f"SOP Instance UID must be {PUSH_MODEL_INSTANCE}")
            transaction, references = parse(event.action_information)
            if self.stopping.is_set():
                raise Invalid(RESOURCE_LIMITATION, "archive is shutting down")
            if not self.node.context.health.up:
                raise Invalid(PROCESSING_FAILURE, "database unavailable")
        except Invalid as exc:
            comment = error_comment(exc.comment)
            log.warning("N-ACTION %s storage commitment refused: 0x%04X %s", peer(event),
                        exc.status, comment)
            self._audit_entry(assoc, principal, decision, exc.status, "", comment, None,
                              started)
            return status(exc.status, comment)
        job = Request(assoc, peer(event), str(assoc.requestor.ae_title).strip(), principal,
                      decision, transaction, references, started)
        with self._lock:
            taken = len(self._requests) < MAX_PENDING
            if taken:
                self._requests[id(job)] = job
        if not taken:
            comment = "too many storage commitment requests pending"
            log.warning("N-ACTION %s storage commitment refused: 0x%04X %s", peer(event),
                        RESOURCE_LIMITATION, comment)
            self._audit_entry(assoc, principal, decision, RESOURCE_LIMITATION, "", comment,
                              None, started)
            return status(RESOURCE_LIMITATION, comment)
        log.info("N-ACTION %s storage commitment transaction=%s references=%d -> 0x0000",
                 job.who, transaction, len(references))
        job.task = self._workers.submit(self._check, job)
        return status(SUCCESS)

    # -- the check and the report -----------------------------------------------------

    def _check(self, job: Request) -> None:
        try:
            restriction = job.decision.instance_filter()
            job.verdicts = verify(self.node.context.archive, job.references, restriction,
                                  self.supported)
            job.event_type, job.report = event_information(
                job.transaction, job.verdicts, self.node.context.cfg.ae_title)
            log.info("storage commitment %s transaction=%s: %s", job.who, job.transaction,
                     job.summary)
            if self._on_same_association(job):
                return
            self._attempt(job)
        except Exception:  # noqa: BLE001 - the node keeps serving
            log.exception("storage commitment %s transaction=%s: unexpected error", job.who,
                          job.transaction)
            self._finish(job, "report not sent: internal error")

    def _send(self, assoc: Any, job: Request) -> int | None:
        """Send the report; the peer's status, None without an answer.

        As pynetdicom's ``send_n_event_report``, but the answer is awaited a few
        milliseconds at a time: a peer that asks to release or aborts meanwhile will
        never answer, and the report then goes on a new association at once rather
        than after the DIMSE timeout.  Called with the reactor held.
        """
        assert job.report is not None
        context = assoc._get_valid_context(PUSH_MODEL, "", None)
        syntax = context.transfer_syntax[0]
        req = N_EVENT_REPORT()
        req.MessageID = REPORT_MESSAGE_ID
        req.AffectedSOPClassUID = PUSH_MODEL
        req.AffectedSOPInstanceUID = PUSH_MODEL_INSTANCE
        req.EventTypeID = job.event_type
        req.EventInformation = BytesIO(encode(job.report, syntax.is_implicit_VR,
                                              syntax.is_little_endian, syntax.is_deflated))
        assoc.dimse.send_msg(req, context.context_id)
        deadline = time.monotonic() + float(assoc.dimse_timeout or 60)
        while time.monotonic() < deadline:
            _, rsp = assoc.dimse.peek_msg()
            if rsp is not None:
                if not isinstance(rsp, N_EVENT_REPORT) or \
                        rsp.MessageIDBeingRespondedTo != REPORT_MESSAGE_ID:
                    return None  # a request of the peer's: not the answer
                assoc.dimse.get_msg(block=False)
                return int(rsp.Status) if rsp.Status is not None else None
            if not assoc.is_established or _closing(assoc):
                return None
            time.sleep(REPORT_POLL)
        return None

    def _on_same_association(self, job: Request) -> bool:
        """Report on the requesting association if it is still open; whether it was."""
        assoc = job.assoc
        if not assoc.is_established:
            return False
        with reactor_held(assoc, SAME_ASSOCIATION_WAIT) as paused:
            if not paused or not assoc.is_established or _closing(assoc):
                return False
            code = self._send(assoc, job)
        if code is None:
            log.warning("storage commitment %s transaction=%s: the requesting association "
                        "did not take the report (released, aborted or no answer)", job.who,
                        job.transaction)
            return False
        self._delivered(job, code, "the requesting association")
        return True

    def _attempt(self, job: Request) -> None:
        """One attempt on a new association to the requester's destination."""
        if self.stopping.is_set():
            self._finish(job, "report not sent: node stopping")
            return
        cfg = self.node.context.cfg
        dest = cfg.destinations.get(job.calling_ae)
        if dest is None:
            log.error("storage commitment %s transaction=%s (%s): report not sent: %r is "
                      "not in destinations", job.who, job.transaction, job.summary,
                      job.calling_ae)
            self._finish(job, f"report not sent: no destination {job.calling_ae}")
            return
        job.attempts += 1
        where = f"{job.calling_ae}@{dest.host}:{dest.port}"
        try:
            failure = self._associate_and_send(job, dest, where)
        except Exception as exc:  # noqa: BLE001 - a network or TLS error: retried
            failure = f"{type(exc).__name__}: {exc}"
        if failure is None:
            return
        if job.attempts >= self.settings.attempts:
            log.error("storage commitment %s transaction=%s (%s): report not sent to %s "
                      "after %d attempts: %s", job.who, job.transaction, job.summary, where,
                      job.attempts, failure)
            self._finish(job, f"report not sent after {job.attempts} attempts: {failure}")
            return
        log.warning("storage commitment transaction=%s: report to %s failed (%s); attempt "
                    "%d of %d in %.0f s", job.transaction, where, failure, job.attempts + 1,
                    self.settings.attempts, self.settings.retry_seconds)
        timer = threading.Timer(self.settings.retry_seconds, self._retry, [job])
        timer.daemon = True
        with self._lock:
            self._timers[id(job)] = timer
        timer.start()

    def _retry(self, job: Request) -> None:
        with self._lock:
            self._timers.pop(id(job), None)
        if self.stopping.is_set():
            self._finish(job, "report not sent: node stopping")
            return
        try:
            job.task = self._workers.submit(self._attempt, job)
        except RuntimeError:  # the workers have stopped
            self._finish(job, "report not sent: node stopping")

    def _associate_and_send(self, job: Request, dest: Any, where: str) -> str | None:
        """Open an association to ``dest`` and send; None when done, else why not."""
        tls_args = (client_tls(self.node.context.cfg), dest.host) if dest.tls else None
        assoc = self.node.ae.associate(
            dest.host, dest.port, ae_title=job.calling_ae, tls_args=tls_args,
            contexts=[build_context(PUSH_MODEL, [ExplicitVRLittleEndian,
                                                 ImplicitVRLittleEndian])],
            ext_neg=[build_role(PUSH_MODEL, scp_role=True)],
            evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
        if not assoc.is_established:
            return "association rejected" if assoc.is_rejected else \
                "association not established"
        try:
            if not any(str(cx.abstract_syntax) == PUSH_MODEL for cx in assoc.accepted_contexts):
                return "Storage Commitment Push Model not accepted"
            with reactor_held(assoc):  # or it takes the answer off the queue
                code = self._send(assoc, job)
            if code is None:
                return "no answer to the report"
            self._delivered(job, code, f"a new association to {where}")
            return None
        finally:
            if assoc.is_established:
                assoc.release()

    def _delivered(self, job: Request, code: int, how: str) -> None:
        (log.info if code == SUCCESS else log.warning)(
            "storage commitment %s transaction=%s: event type %d (%s) reported on %s -> "
            "0x%04X", job.who, job.transaction, job.event_type, job.summary, how, code)
        self._finish(job, f"event type {job.event_type} reported on {how}: 0x{code:04X}")

    def _finish(self, job: Request, comment: str) -> None:
        """The request's one audit entry; it is no longer pending."""
        with self._lock:
            if self._requests.pop(id(job), None) is None:
                return  # finished already (stopping raced with an attempt)
            self._timers.pop(id(job), None)
        counts = {"requested": len(job.references),
                  "committed": sum(v.committed for v in job.verdicts),
                  "failed": sum(not v.committed for v in job.verdicts)}
        self._audit_entry(job.assoc, job.principal, job.decision, SUCCESS,
                          f"transaction={job.transaction} references={len(job.references)}",
                          comment, counts, job.started)

    def _audit_entry(self, assoc: Any, principal: str, decision: Decision, code: int,
                     request: str, comment: str, counts: dict[str, int] | None,
                     started: float) -> None:
        rule = decision.deciding_rule() if code != NOT_AUTHORIZED else None
        try:
            self.node.context.audit.record(operation_entry(
                assoc, "N-ACTION", principal, STORE, allowed=code != NOT_AUTHORIZED,
                status=code, request=request, restricted=decision.restricted,
                rule=rule.index if rule is not None else None, comment=comment,
                counts=counts, started=started))
        except Exception:  # noqa: BLE001 - auditing never fails the operation
            log.exception("storage commitment: audit entry not recorded")

    # -- stopping ---------------------------------------------------------------------

    def stop(self) -> None:
        """Refuse new requests; give up the reports waiting for a retry or for a worker
        (logged and audited); those being checked or sent finish on their own."""
        self.stopping.set()
        with self._lock:
            timers = list(self._timers.values())
        for timer in timers:
            timer.cancel()
        self._workers.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            waiting = [job for key, job in self._requests.items()
                       if key in self._timers or job.task is None or job.task.cancelled()]
        for job in waiting:
            log.error("storage commitment %s transaction=%s: report not sent: node "
                      "stopping", job.who, job.transaction)
            self._finish(job, "report not sent: node stopping")


def _closing(assoc: Any) -> bool:
    """The peer asked to release or abort: its next primitive says so.  (Only looked
    at: pynetdicom's ``is_release_requested`` takes the request off the queue, and
    the reactor would then never answer it.)"""
    primitive = assoc.dul.peek_next_pdu()
    return isinstance(primitive, A_ABORT | A_P_ABORT) or (
        isinstance(primitive, A_RELEASE) and primitive.result is None)


def handle_action(event: Event, committer: Committer) -> tuple[Dataset, None]:
    """EVT_N_ACTION handler (Storage Commitment Push Model only is accepted)."""
    return committer.take(event), None

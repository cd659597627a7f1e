"""Storage Commitment Push Model over the network: the node as a subprocess on FerretDB,
pynetdicom as the modality (N-ACTION, then the N-EVENT-REPORT it receives).

A modality stores instances then asks for commitment: Event Type 1 on the same
association; unknown UIDs, a class mismatch, an unsupported class, an original damaged
in GridFS behind the archive's back give Event Type 2 with the right Failure Reasons;
released right after the N-ACTION, the report arrives on a new association to the
requester's AE title in ``destinations:`` (retried until it listens); a principal
restricted by Store patterns gets "no such object instance" for what she may not see,
exactly as for a UID that does not exist; one without a Store rule is refused.  One
audit entry per request.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from typing import Any

import pytest
from acl_clients import REFRESH, use_rules
from helpers import CT_IMAGE, MR_IMAGE, free_port, image_dataset, to_part10, wait_for
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

#: The modality's AE title, configured in the node's destinations; and one that is not.
MODALITY, NOWHERE = "MODALITY", "NOWHERE"
RETRY_SECONDS = 1.0

RULES = """
rules:
  - {principal: admin, service: "*"}
  - {principal: ct-modality, service: Store, pattern: {PatientID: "CT-*"}}
  - {principal: viewer, service: Query}
"""


@pytest.fixture(scope="module")
def modality_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def node(module_node_factory: Any, modality_port: int) -> Any:
    running = module_node_factory({
        "acl": {"enabled": True, "refresh_seconds": REFRESH},
        "destinations": {MODALITY: {"host": "127.0.0.1", "port": modality_port}},
        "storage_commitment": {"attempts": 3, "retry_seconds": RETRY_SECONDS},
    })
    use_rules(running, RULES)
    return running


class Reports:
    """N-EVENT-REPORTs a modality received: (event type, event information, assoc)."""

    def __init__(self) -> None:
        self.received: list[tuple[int, Dataset, Any]] = []
        self._lock = threading.Lock()

    def handler(self, event: Any) -> tuple[int, None]:
        with self._lock:
            self.received.append((int(event.event_type), event.event_information,
                                  event.assoc))
        return 0x0000, None

    def wait(self, count: int = 1, timeout: float = 20) -> list[tuple[int, Dataset, Any]]:
        wait_for(lambda: len(self.received) >= count, timeout,
                 message=f"{count} N-EVENT-REPORT(s)")
        return list(self.received)


def _user(name: str) -> list[Any]:
    item = UserIdentityNegotiation()
    item.user_identity_type = 1
    item.primary_field = name.encode()
    return [item]


@contextlib.contextmanager
def modality(node: Any, reports: Reports, user: str = "admin",
             ae_title: str = MODALITY) -> Iterator[Any]:
    """A modality's association: stores CT/MR, requests storage commitment."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for context in (CTImageStorage, MRImageStorage, StorageCommitmentPushModel):
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, ext_neg=_user(user),
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])
    assert assoc.is_established
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


@contextlib.contextmanager
def listening_modality(port: int, reports: Reports) -> Iterator[Any]:
    """The modality's SCP side: takes the report on an association the archive opens,
    the archive in the SCP role of the Push Model (role selection)."""
    ae = AE(ae_title=MODALITY)
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])
    try:
        yield server
    finally:
        server.shutdown()


def stored(assoc: Any, count: int, *, patient_id: str = "CT-1",
           sop_class: str = CT_IMAGE) -> list[tuple[str, str]]:
    """Store ``count`` new images; their (SOP class, SOP instance) pairs."""
    pairs = []
    study = generate_uid()
    for n in range(count):
        ds = dcmread(BytesIO(to_part10(image_dataset(
            patient_id=patient_id, study_uid=study, sop_class=sop_class,
            modality="CT" if sop_class == CT_IMAGE else "MR", InstanceNumber=n + 1))))
        answer = assoc.send_c_store(ds)
        assert answer.Status == 0x0000, answer
        pairs.append((sop_class, str(ds.SOPInstanceUID)))
    return pairs


def request(pairs: list[tuple[str, str]], transaction: str | None = None) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction or generate_uid()
    items = []
    for sop_class, sop_instance in pairs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def n_action(assoc: Any, ds: Dataset, action_type: int = 1) -> Dataset:
    answer, _ = assoc.send_n_action(ds, action_type, StorageCommitmentPushModel,
                                    StorageCommitmentPushModelInstance)
    return answer


def committed(info: Dataset) -> list[tuple[str, str]]:
    return [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
            for i in info.get("ReferencedSOPSequence", [])]


def failed(info: Dataset) -> dict[tuple[str, str], int]:
    return {(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)):
            int(i.FailureReason) for i in info.get("FailedSOPSequence", [])}


def audit_entry(node: Any, transaction: str, timeout: float = 10) -> dict[str, Any]:
    entries: list[dict[str, Any]] = []

    def found() -> bool:
        entries[:] = list(node.db.audit.find({"event": "N-ACTION",
                                              "request": {"$regex": transaction}}))
        return bool(entries)

    wait_for(found, timeout, message="the audit entry")
    time.sleep(0.5)  # and no second one
    found()
    assert len(entries) == 1, entries
    return entries[0]


# --- the report on the requesting association ------------------------------------------


def test_stored_instances_are_committed_on_the_same_association(node: Any) -> None:
    reports = Reports()
    with modality(node, reports) as assoc:
        pairs = stored(assoc, 3)
        ask = request(pairs)
        answer = n_action(assoc, ask)
        assert answer.Status == 0x0000
        [(event_type, info, on)] = reports.wait()
        assert on is assoc  # the requesting association, still open
    assert event_type == 1
    assert str(info.TransactionUID) == str(ask.TransactionUID)
    assert committed(info) == pairs
    assert "FailedSOPSequence" not in info
    assert info.RetrieveAETitle == node.ae_title
    entry = audit_entry(node, str(ask.TransactionUID))
    assert entry["principal"] == "admin" and entry["service"] == "Store"
    assert entry["counts"] == {"requested": 3, "committed": 3, "failed": 0}
    assert "requesting association: 0x0000" in entry["comment"]


def test_unknown_uids_a_class_mismatch_and_an_unsupported_class_fail(node: Any) -> None:
    reports = Reports()
    with modality(node, reports) as assoc:
        good, other = stored(assoc, 2)
        unknown = (CT_IMAGE, generate_uid())
        mismatch = (MR_IMAGE, other[1])  # stored as CT
        unsupported = ("1.2.3.4.5.6", generate_uid())  # no storage SOP class
        ask = request([good, unknown, mismatch, unsupported, good])  # repeated once
        assert n_action(assoc, ask).Status == 0x0000
        [(event_type, info, _)] = reports.wait()
    assert event_type == 2
    assert committed(info) == [good]
    assert failed(info) == {unknown: 0x0112, mismatch: 0x0119, unsupported: 0x0122}
    assert audit_entry(node, str(ask.TransactionUID))["counts"] == {
        "requested": 5, "committed": 1, "failed": 3}


def test_an_original_damaged_in_gridfs_is_a_processing_failure(node: Any) -> None:
    """Deleted behind the archive's back: 0x0110 (the instance document exists, its
    original does not: the modality should send it again), not 0x0112."""
    reports = Reports()
    with modality(node, reports) as assoc:
        intact, deleted, cut = stored(assoc, 3)
        files = node.db["fs.files"]
        chunks = node.db["fs.chunks"]
        for pair, damage in ((deleted, "file"), (cut, "chunk")):
            file_id = node.db.instances.find_one({"_id": pair[1]})["file_id"]
            if damage == "file":
                files.delete_one({"_id": file_id})
            else:  # the files document stays, its bytes are short
                chunk = chunks.find_one({"files_id": file_id, "n": 0})
                chunks.update_one({"_id": chunk["_id"]},
                                  {"$set": {"data": bytes(chunk["data"])[:100]}})
        ask = request([intact, deleted, cut])
        assert n_action(assoc, ask).Status == 0x0000
        [(event_type, info, _)] = reports.wait()
    assert event_type == 2
    assert committed(info) == [intact]
    assert failed(info) == {deleted: 0x0110, cut: 0x0110}


# --- the report on a new association ---------------------------------------------------


def test_released_at_once_the_report_goes_to_the_configured_destination(
        node: Any, modality_port: int) -> None:
    reports, later = Reports(), Reports()
    with listening_modality(modality_port, later):
        with modality(node, reports) as assoc:
            pairs = stored(assoc, 2)
            ask = request(pairs)
            assert n_action(assoc, ask).Status == 0x0000
            assoc.release()  # at once, as many modalities do
        [(event_type, info, on)] = later.wait()
    assert reports.received == []
    assert event_type == 1 and committed(info) == pairs
    assert str(info.TransactionUID) == str(ask.TransactionUID)
    assert on.requestor.ae_title == node.ae_title  # the archive opened it
    assert on.acceptor.ae_title == MODALITY
    assert f"new association to {MODALITY}@127.0.0.1:{modality_port}: 0x0000" in \
        audit_entry(node, str(ask.TransactionUID))["comment"]


def test_a_destination_not_listening_yet_gets_the_report_when_it_does(
        node: Any, modality_port: int) -> None:
    reports, later = Reports(), Reports()
    with modality(node, reports) as assoc:
        pairs = stored(assoc, 1)
        ask = request(pairs)
        assert n_action(assoc, ask).Status == 0x0000
    wait_for(lambda: f"transaction={ask.TransactionUID}: report to MODALITY@127.0.0.1:"
             f"{modality_port} failed (association not established)" in node.log(), 10,
             message="the first attempt, finding nobody")
    with listening_modality(modality_port, later):
        [(event_type, info, _)] = later.wait(timeout=RETRY_SECONDS * 3 + 10)
    assert event_type == 1 and committed(info) == pairs
    assert "attempt 2 of 3" in node.log()


def test_without_a_destination_the_outcome_is_logged_and_audited(node: Any) -> None:
    reports = Reports()
    with modality(node, reports, ae_title=NOWHERE) as assoc:
        pairs = stored(assoc, 1)
        ask = request(pairs + [(CT_IMAGE, generate_uid())])
        assert n_action(assoc, ask).Status == 0x0000
    entry = audit_entry(node, str(ask.TransactionUID))
    assert entry["comment"] == f"report not sent: no destination {NOWHERE}"
    assert entry["counts"] == {"requested": 2, "committed": 1, "failed": 1}
    assert f"transaction={ask.TransactionUID} (1 committed, 1 failed): report not sent: " \
        f"'{NOWHERE}' is not in destinations" in node.log()


# --- who may ask ------------------------------------------------------------------------


def test_a_restricted_principal_learns_nothing_about_hidden_instances(node: Any) -> None:
    """Store patterns {PatientID: CT-*}: another patient's instance is 'no such object
    instance', exactly as a UID that does not exist -- whatever class is named."""
    with modality(node, Reports()) as assoc:
        hidden = stored(assoc, 1, patient_id="OTHER")[0]
    reports = Reports()
    with modality(node, reports, user="ct-modality") as assoc:
        mine = stored(assoc, 1, patient_id="CT-7")[0]
        unknown = (CT_IMAGE, generate_uid())
        hidden_as_mr = (MR_IMAGE, hidden[1])
        unknown_as_mr = (MR_IMAGE, generate_uid())
        ask = request([mine, hidden, unknown, hidden_as_mr, unknown_as_mr])
        assert n_action(assoc, ask).Status == 0x0000
        [(event_type, info, _)] = reports.wait()
    assert event_type == 2
    assert committed(info) == [mine]
    assert failed(info) == {hidden: 0x0112, unknown: 0x0112, hidden_as_mr: 0x0112,
                            unknown_as_mr: 0x0112}
    entry = audit_entry(node, str(ask.TransactionUID))
    assert entry["principal"] == "ct-modality" and entry["restricted"] is True


def test_a_principal_without_a_store_rule_is_refused(node: Any) -> None:
    reports = Reports()
    with modality(node, reports, user="viewer") as assoc:
        answer = n_action(assoc, request([(CT_IMAGE, generate_uid())]))
        assert answer.Status == 0x0124
        assert answer.ErrorComment == "not authorized: no Store rule for viewer"
        time.sleep(1)
    assert reports.received == []


@pytest.mark.parametrize(("change", "action_type", "code", "comment"), [
    ("no transaction", 1, 0x0115, "Transaction UID (0008,1195) missing or not a UID"),
    ("no references", 1, 0x0115, "Referenced SOP Sequence (0008,1199) empty"),
    ("item without instance", 1, 0x0115,
     "item 1: Referenced SOP Instance UID missing or not a UID"),
    ("", 2, 0x0123, "no action type 2"),
])
def test_a_malformed_request_is_refused_and_the_node_keeps_serving(
        node: Any, change: str, action_type: int, code: int, comment: str) -> None:
    ask = request([(CT_IMAGE, generate_uid())])
    if change == "no transaction":
        del ask.TransactionUID
    elif change == "no references":
        ask.ReferencedSOPSequence = []
    elif change == "item without instance":
        del ask.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    reports = Reports()
    with modality(node, reports) as assoc:
        answer = n_action(assoc, ask, action_type)
        assert (answer.Status, answer.ErrorComment) == (code, comment)
        pairs = stored(assoc, 1)
        assert n_action(assoc, request(pairs)).Status == 0x0000
        [(event_type, _, _)] = reports.wait()
    assert event_type == 1


def test_a_report_waiting_for_a_retry_when_the_node_stops_is_logged_and_audited(
        node_factory: Any) -> None:
    silent = free_port()  # nothing listens there
    stopping = node_factory({
        "acl": {"enabled": False},
        "destinations": {MODALITY: {"host": "127.0.0.1", "port": silent}},
        "storage_commitment": {"attempts": 5, "retry_seconds": 600},
    })
    with modality(stopping, Reports()) as assoc:
        ask = request(stored(assoc, 1))
        assert n_action(assoc, ask).Status == 0x0000
    wait_for(lambda: "attempt 2 of 5 in 600 s" in stopping.log(), 10,
             message="the first attempt to fail")
    db = stopping.db
    started = time.monotonic()
    assert stopping.stop() == 0
    assert time.monotonic() - started < 15  # not the 600 s of the retry
    assert f"transaction={ask.TransactionUID}: report not sent: node stopping" in \
        stopping.log()
    [entry] = list(db.audit.find({"event": "N-ACTION"}))
    assert entry["comment"] == "report not sent: node stopping"
    assert entry["counts"] == {"requested": 1, "committed": 1, "failed": 0}

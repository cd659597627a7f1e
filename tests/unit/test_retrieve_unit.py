"""C-MOVE/C-GET pieces without a network: contexts, choice of transfer syntax, spooling
the stored bytes, conversion, statuses, and memory staying flat over 10,000 instances."""

from __future__ import annotations

import queue
import threading
import time
import tracemalloc
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from bson import ObjectId
from helpers import CT_IMAGE, MR_IMAGE, dataset_bytes, make_dataset, to_part10
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu_primitives import P_DATA

from acl.rules import allow_all, decide
from archive.config import Config, Destination
from archive.dimse.retrieve import (
    GET,
    MOVE,
    Counts,
    Item,
    Retrieve,
    Unsendable,
    choose,
    convert,
    dul_polled_every,
    pending_response,
    proposal,
    send_message,
    spool,
    store_request,
    store_response,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TESTDATA = Path(pydicom.__file__).parent / "data" / "test_files"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"


def image(pixels: bytes) -> Dataset:
    return make_dataset(Rows=1, Columns=len(pixels) // 2, BitsAllocated=16, BitsStored=16,
                        HighBit=15, PixelRepresentation=0, SamplesPerPixel=1,
                        PhotometricInterpretation="MONOCHROME2", PixelData=pixels)


def item(sop_class: str = CT_IMAGE, syntax: str = ExplicitVRLittleEndian,
         uid: str | None = None) -> Item:
    return Item(uid or pydicom.uid.generate_uid(), sop_class, syntax, ObjectId())


# --- proposal and choice ---------------------------------------------------------------


def test_proposal_exact_contexts_plus_uncompressed_fallbacks() -> None:
    items = [item(CT_IMAGE, ExplicitVRLittleEndian), item(CT_IMAGE, ExplicitVRLittleEndian),
             item(MR_IMAGE, ImplicitVRLittleEndian), item(SC_IMAGE, JPEG2000),
             item(US_IMAGE, MPEG2MPML)]
    contexts = {(cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in proposal(items)}
    assert contexts == {
        (CT_IMAGE, (ExplicitVRLittleEndian,)), (CT_IMAGE, (ImplicitVRLittleEndian,)),
        (MR_IMAGE, (ImplicitVRLittleEndian,)), (MR_IMAGE, (ExplicitVRLittleEndian,)),
        # compressed: the fallbacks it can be decompressed to
        (SC_IMAGE, (JPEG2000,)), (SC_IMAGE, (ExplicitVRLittleEndian,)),
        (SC_IMAGE, (ImplicitVRLittleEndian,)),
        (US_IMAGE, (MPEG2MPML,)),  # no decoder here: no fallback
    }


def test_proposal_stays_within_128_contexts() -> None:
    classes = [f"1.2.3.{n}" for n in range(100)]
    items = [item(cls, syntax) for cls in classes
             for syntax in (ExplicitVRLittleEndian, RLELossless)]
    contexts = proposal(items)
    assert len(contexts) == 128
    assert all(cx.transfer_syntax[0] in (ExplicitVRLittleEndian, RLELossless)
               for cx in contexts)
    folded = [cx for cx in contexts if cx.transfer_syntax[0] == ExplicitVRLittleEndian]
    assert all(cx.transfer_syntax == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
               for cx in folded)


def test_choose_prefers_the_stored_syntax_then_transcodes_what_it_can_decode() -> None:
    accepted = {CT_IMAGE: {ImplicitVRLittleEndian, ExplicitVRLittleEndian},
                MR_IMAGE: {ImplicitVRLittleEndian}, US_IMAGE: {JPEG2000},
                SC_IMAGE: {JPEG2000, ExplicitVRLittleEndian}}
    assert choose(item(CT_IMAGE, ExplicitVRLittleEndian), accepted) == ExplicitVRLittleEndian
    assert choose(item(MR_IMAGE, ExplicitVRLittleEndian), accepted) == ImplicitVRLittleEndian
    assert choose(item(MR_IMAGE, DeflatedExplicitVRLittleEndian), accepted) \
        == ImplicitVRLittleEndian
    assert choose(item(CT_IMAGE, ExplicitVRBigEndian), accepted) == ExplicitVRLittleEndian
    assert choose(item(MR_IMAGE, JPEG2000), accepted) == ImplicitVRLittleEndian
    assert choose(item(SC_IMAGE, JPEG2000), accepted) == JPEG2000  # as stored first
    assert choose(item(SC_IMAGE, RLELossless), accepted) == ExplicitVRLittleEndian
    with pytest.raises(Unsendable, match="MPEG2 .* not accepted, no decoder for it"):
        choose(item(MR_IMAGE, MPEG2MPML), accepted)
    with pytest.raises(Unsendable, match="not accepted, nor an uncompressed syntax"):
        choose(item(US_IMAGE, RLELossless), accepted)
    with pytest.raises(Unsendable, match="SOP class not accepted"):
        choose(item(RT_DOSE, ExplicitVRLittleEndian), accepted)


# --- the bytes -------------------------------------------------------------------------


def _chunks(data: bytes, size: int = 1000) -> Any:
    return iter([data[i:i + size] for i in range(0, len(data), size)])


def test_spool_copies_the_dataset_bytes_and_rewrites_the_meta(tmp_path: Path) -> None:
    ds = image(bytes(range(256)) * 40)
    stored = to_part10(ds, ImplicitVRLittleEndian)
    it = Item(str(ds.SOPInstanceUID), CT_IMAGE, ImplicitVRLittleEndian, ObjectId())
    path = tmp_path / "out.dcm"
    assert spool(_chunks(stored), it, path) == ImplicitVRLittleEndian
    written = path.read_bytes()
    assert dataset_bytes(written) == dataset_bytes(stored)
    meta = pydicom.filereader.read_file_meta_info(path)
    assert meta.MediaStorageSOPInstanceUID == it.uid
    assert meta.MediaStorageSOPClassUID == CT_IMAGE
    with pytest.raises(Unsendable, match="not a DICOM Part-10"):
        spool(iter([b"garbage" * 100]), it, path)


def _write(ds: Dataset, syntax: str, path: Path) -> Path:
    path.write_bytes(to_part10(ds, syntax))
    return path


@pytest.mark.parametrize(("source", "target"), [
    (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
    (ImplicitVRLittleEndian, ExplicitVRLittleEndian),
    (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian),
    (DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian),
])
def test_convert_between_little_endian_syntaxes(tmp_path: Path, source: str,
                                                target: str) -> None:
    ds = image(bytes(range(32)))
    src = _write(ds, source, tmp_path / "in.dcm")
    convert(src, tmp_path / "out.dcm", target)
    got = pydicom.dcmread(tmp_path / "out.dcm")
    assert got.file_meta.TransferSyntaxUID == target
    assert got.original_encoding == (UID(target).is_implicit_VR, True)
    assert got.PixelData == ds.PixelData
    assert [e.tag for e in got] == [e.tag for e in ds]


def test_convert_big_endian_swaps_words(tmp_path: Path) -> None:
    convert(TESTDATA / "MR_small_bigendian.dcm", tmp_path / "out.dcm", ImplicitVRLittleEndian)
    got = pydicom.dcmread(tmp_path / "out.dcm")
    reference = pydicom.dcmread(TESTDATA / "MR_small.dcm")
    assert got.PixelData == reference.PixelData
    assert (got.Rows, got.Columns, got.BitsAllocated) == (reference.Rows, reference.Columns,
                                                          reference.BitsAllocated)


def test_convert_decompresses_and_says_why_it_cannot(tmp_path: Path) -> None:
    convert(TESTDATA / "JPEG2000.dcm", tmp_path / "out.dcm", ExplicitVRLittleEndian)
    got = pydicom.dcmread(tmp_path / "out.dcm")
    assert (got.pixel_array == pydicom.dcmread(TESTDATA / "JPEG2000.dcm").pixel_array).all()
    with pytest.raises(Unsendable, match="cannot decode JPEG Extended"):
        convert(TESTDATA / "JPEG-lossy.dcm", tmp_path / "out.dcm", ExplicitVRLittleEndian)


# --- a Retrieve against fakes ----------------------------------------------------------


class FakeAssociation:
    """Enough of a pynetdicom Association for :class:`Retrieve` (requestor or sub): the
    messages sent are read back from the P-DATA PDUs given to its DUL."""

    def __init__(self, accepted: dict[str, set[str]] | None = None,
                 store_status: int = 0x0000, keep: bool = True) -> None:
        self.is_established = True
        self.requestor = SimpleNamespace(ae_title="SCU", address="127.0.0.1", port=1234)
        self.responses: list[Any] = []
        self.response_count = 0
        self.keep = keep
        self.replies: queue.Queue[Any] = queue.Queue()
        self.dimse = SimpleNamespace(send_msg=self._send_msg, maximum_pdu_size=16_384,
                                     get_msg=lambda block: (1, self.replies.get_nowait()))
        self.dul = SimpleNamespace(send_pdu=self._send_pdu, to_provider_queue=queue.Queue())
        self.dimse_timeout = 30.0
        self.acse = SimpleNamespace(is_aborted=lambda: False)
        self.accepted_contexts = [
            SimpleNamespace(abstract_syntax=cls, transfer_syntax=[ts], as_scu=True)
            for cls, syntaxes in (accepted or {}).items() for ts in syntaxes]
        self.store_status = store_status
        self.stored: list[tuple[str, int]] = []
        self.command = b""
        self.dataset_size = 0
        self.current: Dataset | None = None

    def _get_valid_context(self, sop_class: str, syntax: str, role: str,
                           allow_conversion: bool) -> Any:
        assert syntax in self.accepted.get(sop_class, ()) and not allow_conversion
        return SimpleNamespace(context_id=3)

    @property
    def accepted(self) -> dict[str, set[str]]:
        return {cx.abstract_syntax: {*cx.transfer_syntax} for cx in self.accepted_contexts}

    def _send_msg(self, primitive: Any, context_id: int) -> None:
        self.response_count += 1
        if self.keep:
            self.responses.append(primitive)

    def _send_pdu(self, pdata: P_DATA) -> None:
        for _, pdv in pdata.presentation_data_value_list:
            assert len(pdv) <= self.dimse.maximum_pdu_size - 4
            if pdv[0] & 1:  # command
                self.command += pdv[1:]
                if pdv[0] & 2:
                    command = decode(BytesIO(self.command), True, True)
                    self.command = b""
                    if command.CommandDataSetType == 0x0101:
                        self._send_msg(command, 1)  # a pending response
                    else:
                        self.current, self.dataset_size = command, 0
            else:
                self.dataset_size += len(pdv) - 1
                if pdv[0] & 2 and self.current is not None:
                    if self.keep:
                        self.stored.append((self.current.AffectedSOPInstanceUID,
                                            self.dataset_size))
                    rsp = C_STORE()
                    rsp.MessageIDBeingRespondedTo = self.current.MessageID
                    rsp.AffectedSOPClassUID = self.current.AffectedSOPClassUID
                    rsp.AffectedSOPInstanceUID = self.current.AffectedSOPInstanceUID
                    rsp.Status = self.store_status
                    self.replies.put(rsp)
                    self.current = None


class FakeFiles:
    def __init__(self, files: dict[ObjectId, bytes]) -> None:
        self.files = files

    def stream(self, file_id: ObjectId) -> Any:
        data = self.files[file_id]
        return iter([data[:4096], data[4096:]])

    def stream_many(self, file_ids: Any) -> Any:
        return ((file_id, self.stream(file_id)) for file_id in file_ids)


class FakeEvent:
    """What :class:`Retrieve` reads of a pynetdicom C-MOVE/C-GET event."""

    def __init__(self, assoc: FakeAssociation, request: Dataset, destination: str = "",
                 cancelled: Any = lambda: False) -> None:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

        self.assoc, self.identifier, self.move_destination = assoc, request, destination
        self.request = SimpleNamespace(
            MessageID=7, AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelMove)
        self.context = SimpleNamespace(context_id=1,
                                       transfer_syntax=UID(ExplicitVRLittleEndian))
        self._cancelled = cancelled

    @property
    def is_cancelled(self) -> bool:
        return bool(self._cancelled())


def fake_node(docs: list[dict[str, Any]], files: dict[ObjectId, bytes],
              decision: Any = None, **cfg: Any) -> Any:
    config = Config(**cfg)
    context = SimpleNamespace(
        cfg=config, stopping=threading.Event(),
        archive=SimpleNamespace(files=FakeFiles(files)),
        finder=SimpleNamespace(instances=lambda level, identifier, restriction=None,
                               projection=None: iter(docs)),
        audit=SimpleNamespace(record=lambda entry: None),
        health=SimpleNamespace(up=True, suspect=lambda exc: None),
    )
    return SimpleNamespace(
        context=context,
        authorize=lambda assoc, service: ("anonymous", decision
                                          or allow_all("anonymous", service)),
    )


def study_request(study: str = "1.2.3") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study
    return ds


def final(assoc: FakeAssociation) -> Any:
    return assoc.responses[-1]


def test_unknown_destination_refused_with_comment_before_matching() -> None:
    assoc = FakeAssociation()
    node = fake_node([], {})
    node.context.finder.instances = \
        lambda *a, **k: pytest.fail("matched for an unknown destination")
    Retrieve(FakeEvent(assoc, study_request(), "NOWHERE"), node, MOVE).run()
    assert len(assoc.responses) == 1
    assert final(assoc).Status == 0xA801
    assert "NOWHERE" in final(assoc).ErrorComment


@pytest.mark.parametrize("kind", [MOVE, GET])
def test_database_known_down_is_answered_a701_without_matching(kind: str) -> None:
    assoc = FakeAssociation()
    node = fake_node([], {}, destinations={"DEST": Destination("127.0.0.1", 104)})
    node.context.health.up = False
    node.context.finder.instances = \
        lambda *a, **k: pytest.fail("matched while the database is down")
    Retrieve(FakeEvent(assoc, study_request(), "DEST"), node, kind).run()
    assert len(assoc.responses) == 1
    assert (final(assoc).Status, final(assoc).ErrorComment) == (0xA701, "database unavailable")


def test_missing_unique_key_refused() -> None:
    assoc = FakeAssociation()
    request = Dataset()
    request.QueryRetrieveLevel = "SERIES"
    request.StudyInstanceUID = "1.2.3"
    Retrieve(FakeEvent(assoc, request), fake_node([], {}), GET).run()
    assert final(assoc).Status == 0xA900
    assert "SeriesInstanceUID" in final(assoc).ErrorComment


def test_denied_by_access_rules() -> None:
    assoc = FakeAssociation()
    denied = decide([], "anonymous", "Retrieve")
    Retrieve(FakeEvent(assoc, study_request()), fake_node([], {}, denied), GET).run()
    assert final(assoc).Status == 0x0124


def _corpus(n: int, syntax: str = ExplicitVRLittleEndian,
            pixels: int = 8_192) -> tuple[list[dict[str, Any]], dict[ObjectId, bytes]]:
    """``n`` instance documents sharing one stored file (its bytes are built once)."""
    ds = image(b"\x01" * pixels)
    data = to_part10(ds, syntax)
    file_id = ObjectId()
    docs = [{"_id": f"1.2.3.{k}", "SOPClassUID": CT_IMAGE, "TransferSyntaxUID": syntax,
             "file_id": file_id} for k in range(n)]
    return docs, {file_id: data}


def _stored(name: str, uid: str) -> tuple[dict[str, Any], bytes]:
    """A pydicom test file as a CT instance document and its stored bytes."""
    ds = pydicom.dcmread(TESTDATA / name)
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, uid
    out = BytesIO()
    ds.save_as(out)
    doc = {"_id": uid, "SOPClassUID": CT_IMAGE,
           "TransferSyntaxUID": str(ds.file_meta.TransferSyntaxUID), "file_id": ObjectId()}
    return doc, out.getvalue()


def test_get_counts_conversions_and_failures() -> None:
    docs, files = _corpus(3)
    (jpeg, jpeg_data), (bad, bad_data) = (_stored("JPEG2000.dcm", "1.2.3.98"),
                                          _stored("JPEG-lossy.dcm", "1.2.3.99"))
    files.update({jpeg["file_id"]: jpeg_data, bad["file_id"]: bad_data})
    assoc = FakeAssociation({CT_IMAGE: {ImplicitVRLittleEndian}})
    op = Retrieve(FakeEvent(assoc, study_request()), fake_node([*docs, jpeg, bad], files),
                  GET)
    op.run()
    pending, last = assoc.responses[:-1], final(assoc)
    assert [p.NumberOfRemainingSuboperations for p in pending] == [4, 3, 2, 1]
    assert (last.Status, last.NumberOfCompletedSuboperations,
            last.NumberOfFailedSuboperations) == (0xB000, 4, 1)
    assert last.ErrorComment.startswith("cannot decode JPEG Extended")
    failed = pydicom.dcmread(BytesIO(last.Identifier.getvalue()), force=True)
    assert failed.FailedSOPInstanceUIDList == "1.2.3.99"
    assert op.counts.converted == 4


def test_destination_failure_statuses_counted() -> None:
    docs, files = _corpus(2)
    assoc = FakeAssociation({CT_IMAGE: {ExplicitVRLittleEndian}}, store_status=0xA700)
    Retrieve(FakeEvent(assoc, study_request()), fake_node(docs, files), GET).run()
    assert (final(assoc).Status, final(assoc).NumberOfFailedSuboperations) == (0xA702, 2)


def test_cancel_stops_with_counts() -> None:
    docs, files = _corpus(5)
    assoc = FakeAssociation({CT_IMAGE: {ExplicitVRLittleEndian}})
    calls = {"n": 0}

    def cancelled() -> bool:
        calls["n"] += 1
        return calls["n"] == 3  # reported once, as pynetdicom does

    event = FakeEvent(assoc, study_request(), cancelled=cancelled)
    Retrieve(event, fake_node(docs, files), GET).run()
    last = final(assoc)
    assert last.Status == 0xFE00
    assert (last.NumberOfRemainingSuboperations, last.NumberOfCompletedSuboperations) == (3, 2)


def test_memory_stays_flat_over_5000_instances(tmp_path: Path) -> None:
    """Instances are streamed one at a time: the transfer's peak allocation does not grow
    with their number (only the list of ids does, which is built before)."""

    def peak_during_transfer(n: int) -> int:
        docs, files = _corpus(n, pixels=32_768)
        assoc = FakeAssociation({CT_IMAGE: {ExplicitVRLittleEndian}}, keep=False)
        op = Retrieve(FakeEvent(assoc, study_request()), fake_node(docs, files), GET)
        items = [Item(d["_id"], d["SOPClassUID"], d["TransferSyntaxUID"], d["file_id"])
                 for d in docs]
        op.counts.total = len(items)
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            op._transfer(assoc, items, tmp_path)
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()
        assert op.counts.completed == n and assoc.response_count == n
        return peak

    small, large = peak_during_transfer(100), peak_during_transfer(5_000)
    assert large < 4 * 1024 * 1024, large
    assert large - small < 1024 * 1024, (small, large)


def test_long_move_keeps_the_requesting_association_alive() -> None:
    """A C-MOVE requestor sends nothing while it waits: the move must restart the
    association's network timer, or pynetdicom aborts it after the final response."""
    from helpers import free_port
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE_RQ

    from archive.dimse.retrieve import handle_move

    received: list[str] = []

    def store(event: Any) -> int:
        time.sleep(0.3)
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    docs, files = _corpus(5)
    dest_port, port = free_port(), free_port()
    node = fake_node(docs, files, destinations={"DEST": Destination("127.0.0.1", dest_port)})
    node.ae = AE("ARCHIVE")
    node.ae.network_timeout = 1  # shorter than the move
    node.ae.add_supported_context(MOVE_RQ, ExplicitVRLittleEndian)
    destination = AE("DEST")
    destination.add_supported_context(CT_IMAGE, ExplicitVRLittleEndian)
    scp = destination.start_server(("127.0.0.1", dest_port), block=False,
                                   evt_handlers=[(evt.EVT_C_STORE, store)])
    server = node.ae.start_server(("127.0.0.1", port), block=False,
                                  evt_handlers=[(evt.EVT_C_MOVE, handle_move, [node])])
    requestor = AE("SCU")
    requestor.add_requested_context(MOVE_RQ, ExplicitVRLittleEndian)
    try:
        assoc = requestor.associate("127.0.0.1", port, ae_title="ARCHIVE")
        statuses = [int(status.Status) for status, _ in
                    assoc.send_c_move(study_request(), "DEST", MOVE_RQ)]
        time.sleep(0.3)  # the node's reactor would abort now
        assert statuses == [0xFF00] * 4 + [0x0000]
        assert len(received) == 5
        assert assoc.is_established and not assoc.is_aborted
        assoc.release()
    finally:
        server.shutdown()
        scp.shutdown()
        requestor.shutdown()


# --- what the identifier names and what is found ----------------------------------------


def image_request(*uids: str, alias: str | None = None) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    if uids:
        ds.SOPInstanceUID = list(uids)
    if alias is not None:
        ds.add_new(0x00020003, "UI", alias)  # Media Storage SOP Instance UID, as Orthanc
    return ds


@pytest.mark.parametrize("kind", [MOVE, GET])
def test_nothing_found_is_a_failure_that_says_so(kind: str) -> None:
    """Unknown and hidden look the same from here: the finder yields nothing."""
    assoc = FakeAssociation()
    node = fake_node([], {}, destinations={"DEST": Destination("127.0.0.1", 1)})
    Retrieve(FakeEvent(assoc, image_request("9.9.9"), "DEST"), node, kind).run()
    assert len(assoc.responses) == 1  # no pending response, no sub-association
    last = final(assoc)
    assert (last.Status, last.ErrorComment) == (0xC000, "no instance matches the identifier")
    assert last.OffendingElement == [0x00080018]
    assert last.NumberOfCompletedSuboperations is None


def test_named_instances_not_found_are_failed_sub_operations() -> None:
    docs, files = _corpus(2)
    assoc = FakeAssociation({CT_IMAGE: {ExplicitVRLittleEndian}})
    request = image_request("1.2.3.0", "9.9.9", "1.2.3.1", "9.9.8")
    Retrieve(FakeEvent(assoc, request), fake_node(docs, files), GET).run()
    pending, last = assoc.responses[:-1], final(assoc)
    assert [p.NumberOfRemainingSuboperations for p in pending] == [1]
    assert (last.Status, last.NumberOfCompletedSuboperations,
            last.NumberOfFailedSuboperations) == (0xB000, 2, 2)
    assert last.ErrorComment == "SOP Instance not found"
    failed = pydicom.dcmread(BytesIO(last.Identifier.getvalue()), force=True)
    assert list(failed.FailedSOPInstanceUIDList) == ["9.9.9", "9.9.8"]


def test_media_storage_sop_instance_uid_names_the_instance() -> None:
    """Orthanc's IMAGE-level identifier: (0002,0003) is enough as the unique key."""
    docs, files = _corpus(1)
    assoc = FakeAssociation({CT_IMAGE: {ExplicitVRLittleEndian}})
    seen: list[Dataset] = []
    node = fake_node(docs, files)
    node.context.finder.instances = lambda level, ident, *a, **k: seen.append(ident) or iter(docs)
    Retrieve(FakeEvent(assoc, image_request(alias="1.2.3.0")), node, GET).run()
    assert final(assoc).Status == 0x0000
    assert final(assoc).NumberOfCompletedSuboperations == 1
    assert seen and 0x00020003 in seen[0]


def test_study_root_patient_level_retrieve_is_read_as_patient_root() -> None:
    """Orthanc sends its patient-level C-MOVE in Study Root."""
    docs, files = _corpus(2)
    assoc = FakeAssociation({CT_IMAGE: {ExplicitVRLittleEndian}})
    levels: list[str] = []
    node = fake_node(docs, files)
    node.context.finder.instances = lambda level, *a, **k: levels.append(level) or iter(docs)
    request = Dataset()
    request.QueryRetrieveLevel = "PATIENT"
    request.PatientID = "P1"
    Retrieve(FakeEvent(assoc, request), node, GET).run()  # FakeEvent: Study Root MOVE
    assert (final(assoc).Status, final(assoc).NumberOfCompletedSuboperations) == (0x0000, 2)
    assert levels == ["PATIENT"]


# --- messages encoded without pydicom -----------------------------------------------------


@pytest.mark.parametrize(("sop_class", "uid", "msg_id", "aet", "originator"), [
    (CT_IMAGE, "1.2.3", 5, "SCU", 7),
    (MR_IMAGE, "1.2.34", 0xFFFF, "ABCDEFGHIJKLMNOP", 1),
    ("1.2", "1.23", 1, None, None),
])
def test_store_request_is_encoded_as_pynetdicom_would(sop_class: str, uid: str, msg_id: int,
                                                      aet: str | None,
                                                      originator: int | None) -> None:
    from pynetdicom.dimse_messages import C_STORE_RQ

    rq = C_STORE()
    rq.MessageID, rq.Priority = msg_id, 2
    rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = sop_class, uid
    rq.MoveOriginatorApplicationEntityTitle, rq.MoveOriginatorMessageID = aet, originator
    rq.DataSet = BytesIO(b"\0\0")
    message = C_STORE_RQ()
    message.primitive_to_message(rq)
    assert store_request(sop_class, uid, msg_id, aet, originator) == \
        encode(message.command_set, True, True)


@pytest.mark.parametrize("kind", [MOVE, GET])
def test_pending_response_is_encoded_as_pynetdicom_would(kind: str) -> None:
    from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP
    from pynetdicom.dimse_primitives import C_GET, C_MOVE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as SOP_CLASS

    counts = Counts(total=70_000 % 0xFFFF, completed=300, failed=2, warning=1)
    rsp = C_MOVE() if kind == MOVE else C_GET()
    rsp.MessageID = rsp.MessageIDBeingRespondedTo = 9
    rsp.AffectedSOPClassUID, rsp.Status = SOP_CLASS, 0xFF00
    rsp.NumberOfRemainingSuboperations = counts.remaining
    rsp.NumberOfCompletedSuboperations, rsp.NumberOfFailedSuboperations = 300, 2
    rsp.NumberOfWarningSuboperations = 1
    message = C_MOVE_RSP() if kind == MOVE else C_GET_RSP()
    message.primitive_to_message(rsp)
    assert pending_response(kind, SOP_CLASS, 9, counts) == \
        encode(message.command_set, True, True)


def _store_rsp_command(status: int, comment: str | None = None) -> bytes:
    from pynetdicom.dimse_messages import C_STORE_RSP

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 12, status
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = CT_IMAGE, "1.2.3"
    rsp.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    return encode(message.command_set, True, True)


def test_a_successful_store_response_is_read_without_pydicom() -> None:
    rsp = store_response(_store_rsp_command(0x0000))
    assert rsp is not None and rsp.is_valid_response
    assert (rsp.MessageIDBeingRespondedTo, rsp.Status) == (12, 0x0000)


@pytest.mark.parametrize("command", [
    _store_rsp_command(0xB000), _store_rsp_command(0xA700, "out of space"),
    _store_rsp_command(0x0000)[:-2], b"", store_request(CT_IMAGE, "1.2.3", 12)])
def test_any_other_message_is_left_to_pynetdicom(command: bytes) -> None:
    assert store_response(command) is None


def test_a_large_dataset_is_read_as_its_pdus_are_sent_and_a_stalled_peer_times_out(
        tmp_path: Path) -> None:
    """At most a few PDUs wait for the DUL thread (pynetdicom queues a whole dataset);
    a peer that reads nothing for the DIMSE timeout ends the send."""
    path = tmp_path / "big.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 4096)  # 1 MiB dataset
    dul_queue: queue.Queue[Any] = queue.Queue()
    sent: list[bytes] = []
    deepest = 0

    def dul_thread(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                sent.append(dul_queue.get(timeout=0.01).presentation_data_value_list[0][1])
            except queue.Empty:
                continue
            time.sleep(0.0005)

    def send_pdu(pdata: P_DATA) -> None:
        nonlocal deepest
        dul_queue.put(pdata)
        deepest = max(deepest, dul_queue.qsize())

    assoc = SimpleNamespace(dimse=SimpleNamespace(maximum_pdu_size=16_384),
                            dul=SimpleNamespace(send_pdu=send_pdu, to_provider_queue=dul_queue),
                            dimse_timeout=0.3, is_established=True)
    stop = threading.Event()
    reader = threading.Thread(target=dul_thread, args=(stop,))
    reader.start()
    try:
        send_message(assoc, 1, store_request(CT_IMAGE, "1.2.3", 1), (path, 132))
        while not dul_queue.empty():
            time.sleep(0.01)
    finally:
        stop.set()
        reader.join()
    assert deepest <= 9
    assert sent[0][:1] == b"\x03" and [pdv[:1] for pdv in sent[1:-1]] == [b"\x00"] * 64
    assert sent[-1][:1] == b"\x02" and all(len(pdv) <= 16_384 - 5 for pdv in sent)
    assert b"".join(pdv[1:] for pdv in sent[1:]) == path.read_bytes()[132:]

    dul_queue.queue.clear()  # nobody reads any more
    started = time.monotonic()
    with pytest.raises(OSError, match="read no PDU"):
        send_message(assoc, 1, store_request(CT_IMAGE, "1.2.3", 2), (path, 132))
    assert 0.3 <= time.monotonic() - started < 3 and dul_queue.qsize() <= 9


def test_an_association_polls_at_its_own_pace_again_after_a_retrieve() -> None:
    """The fast polls last while instances are sent: an association left open (a
    viewer's) must not keep a thread waking every 0.2 ms, even after a failure."""
    assoc = SimpleNamespace(dul=SimpleNamespace(_run_loop_delay=0.001))
    with dul_polled_every(assoc, 0.0002):  # type: ignore[arg-type]
        assert assoc.dul._run_loop_delay == 0.0002
    assert assoc.dul._run_loop_delay == 0.001
    with pytest.raises(RuntimeError), dul_polled_every(assoc, 0.0002):  # type: ignore[arg-type]
        raise RuntimeError("destination lost")
    assert assoc.dul._run_loop_delay == 0.001

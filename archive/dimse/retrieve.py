"""C-MOVE and C-GET SCP: sending the stored originals (PS3.4 C.4.2, C.4.3).

What is sent.  Each instance goes out as the dataset the archive received, byte for
byte: its Part-10 file is streamed from GridFS into a temporary file (one instance at
a time, one GridFS chunk in memory) and pynetdicom sends that file's dataset in
PDU-sized pieces without decoding it (``_config.STORE_SEND_CHUNKED_DATASET``), over a
presentation context whose transfer syntax is the stored one.  Only when the peer
accepted no such context is the instance transcoded (:mod:`archive.transcode`), to
Explicit or Implicit VR Little Endian if the peer accepted one for its SOP class:
re-encoded (Implicit <-> Explicit, Deflated, Explicit VR Big Endian) or decompressed
(JPEG, JPEG-LS, JPEG 2000, RLE; lossy ones stay flagged lossy), one instance in memory
at a time.  What has no decoder here, or whose stream does not decode, is counted
failed, with the reason logged and in the Error Comment.

pynetdicom's own C-MOVE/C-GET loop cannot do that -- it only sends ``Dataset``
objects, which it re-encodes -- and it cannot put an Error Comment on a refusal nor
count the sub-operations of a destination that refuses the association.  So the
handlers run the whole operation themselves on the first step of the generator
pynetdicom drives (matching, sub-association, C-STORE sub-operations, pending and
final responses, C-CANCEL), then yield "no sub-operations" so that pynetdicom
finishes; the one closing response pynetdicom then builds is dropped (:class:`_Mute`),
the real final response having been sent already.

Sub-operations: C-MOVE opens one association to the Move Destination proposing only
the contexts needed (SOP class x stored transfer syntax, plus Explicit/Implicit VR
Little Endian for SOP classes with instances that can be transcoded); C-GET sends on the
requesting association, over the storage contexts the requestor accepted in the SCP
role.  Every wait is bounded by the AE's ACSE/DIMSE/network timeouts and a connection
timeout, so a destination that vanishes ends the operation with its instances counted
failed, never with a hung association.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from bson import ObjectId
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID
from pymongo.errors import PyMongoError
from pynetdicom import build_context, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from acl.audit import operation_entry, summarize
from acl.rules import NOT_AUTHORIZED, RETRIEVE, Decision
from archive import model, transcode
from archive.config import Destination
from archive.dimse.common import MODELS, Serving, client_tls, reactor_held, set_nodelay
from archive.find import exact_values
from archive.query import Query, QueryError, translate

log = logging.getLogger("archive.retrieve")

MOVE, GET = "C-MOVE", "C-GET"

# Statuses (PS3.4 C.4.2.1.5 and C.4.3.1.4).
SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
WARNING = 0xB000  # sub-operations complete, one or more failures or warnings
OUT_OF_RESOURCES_MATCHES = 0xA701  # unable to calculate number of matches
OUT_OF_RESOURCES_SUBOPS = 0xA702  # unable to perform sub-operations
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
#: The identifier selects no instance (unknown, or hidden by the access rules: the two
#: are answered alike).  PS3.4 has no status for it; 0xC000 is Orthanc's answer, and the
#: one its C-MOVE SCU reports as "unable to process - resource not found ?".
NOTHING_FOUND = UNABLE_TO_PROCESS
NOTHING_FOUND_COMMENT = "no instance matches the identifier"
INTERNAL_ERROR = 0xC001

#: Number of ... Sub-operations are US: no more matches can be reported.
MAX_SUBOPERATIONS = 0xFFFF
#: pynetdicom (and PS3.8) allow at most 128 proposed presentation contexts.
MAX_CONTEXTS = 128
#: Seconds to wait for the TCP connection to a Move Destination.
CONNECT_TIMEOUT = 10.0

#: What an instance the peer does not take as stored is transcoded to, in order of
#: preference.
TARGETS = transcode.UNCOMPRESSED

_PREAMBLE = b"\x00" * 128


class Refused(Exception):
    """The operation ends without (further) sub-operations: its final status and comment."""

    def __init__(self, status: int, comment: str, offending: tuple[int, ...] = ()) -> None:
        super().__init__(f"0x{status:04X} {comment}")
        self.status, self.comment, self.offending = status, comment, offending


class Unsendable(Exception):
    """One instance cannot be sent: the reason is the message."""


@dataclass(frozen=True, slots=True)
class Item:
    """One instance to send: what the instance document says about it."""

    uid: str
    sop_class: str
    transfer_syntax: str
    file_id: ObjectId


@dataclass
class Counts:
    """Sub-operation tallies (PS3.4 C.4.2.1.4)."""

    total: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    converted: int = 0
    failed_uids: list[str] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)

    @property
    def remaining(self) -> int:
        return self.total - self.completed - self.failed - self.warning

    def fail(self, item: Item | str, reason: str) -> None:
        uid = item if isinstance(item, str) else item.uid
        self.failed += 1
        self.failed_uids.append(uid)
        if not self.reasons[reason]:
            log.warning("sub-operation failed for %s: %s", uid, reason)
        self.reasons[reason] += 1

    def final_status(self) -> int:
        if not self.failed and not self.warning:
            return SUCCESS
        return OUT_OF_RESOURCES_SUBOPS if self.failed == self.total else WARNING


# --- what to propose, which context to use --------------------------------------------


def proposal(items: list[Item]) -> list[PresentationContext]:
    """Presentation contexts for a sub-association sending ``items``.

    One context per (SOP class, stored transfer syntax), so the destination can accept
    each original as it is, plus one per SOP class and fallback syntax for the classes
    with instances that can be transcoded.  Past 128 contexts the fallbacks are folded into the
    exact contexts, then the rarest pairs are left out (their instances fail).
    """
    pairs = Counter((item.sop_class, item.transfer_syntax) for item in items)
    exact = [pair for pair, _ in pairs.most_common()]
    classes = dict.fromkeys(cls for cls, ts in exact if transcode.decodable(ts))
    fallback = [(cls, ts) for cls in classes for ts in TARGETS if (cls, ts) not in pairs]
    if len(exact) + len(fallback) <= MAX_CONTEXTS:
        return [build_context(cls, [ts]) for cls, ts in exact + fallback]
    contexts = []
    for cls, ts in exact[:MAX_CONTEXTS]:
        syntaxes = [ts] + ([t for t in TARGETS if t != ts] if transcode.decodable(ts)
                           else [])
        contexts.append(build_context(cls, syntaxes))
    return contexts


def accepted_syntaxes(assoc: Association) -> dict[str, set[str]]:
    """Transfer syntaxes the peer accepted per SOP class, for us as storage SCU."""
    accepted: dict[str, set[str]] = {}
    for cx in assoc.accepted_contexts:
        if cx.as_scu and cx.transfer_syntax:
            accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
    return accepted


def choose(item: Item, accepted: dict[str, set[str]]) -> str:
    """The transfer syntax to send ``item`` in; raises Unsendable with the reason.

    The stored one if accepted (sent as is), else an uncompressed one it can be
    transcoded to.
    """
    syntaxes = accepted.get(item.sop_class, set())
    if item.transfer_syntax in syntaxes:
        return item.transfer_syntax
    if not item.transfer_syntax:
        raise Unsendable("stored file has no transfer syntax")
    decodable = transcode.decodable(item.transfer_syntax)
    if decodable:
        for target in TARGETS:
            if target in syntaxes:
                return target
    syntax, sop_class = _name(item.transfer_syntax), _name(item.sop_class)
    if not syntaxes:
        raise Unsendable(f"SOP class not accepted: {sop_class}")
    if not decodable:
        raise Unsendable(f"{syntax} not accepted, no decoder for it: {sop_class}")
    raise Unsendable(f"{syntax} not accepted, nor an uncompressed syntax: {sop_class}")


def _name(uid: str) -> str:
    return transcode.name(uid)


# --- the bytes -------------------------------------------------------------------------


def spool(stream: Iterator[bytes], item: Item, path: Path) -> str:
    """Write the stored file to ``path``; return the transfer syntax of its dataset
    (which starts at :func:`dataset_offset`).

    The dataset bytes are copied unchanged, chunk by chunk.  The file meta is rewritten
    from the instance document so that the Media Storage SOP Class/Instance UIDs --
    which pynetdicom puts in the C-STORE request -- are the archive's.
    """
    head = next(stream, b"")
    offset, stored_syntax = _stored_meta(head)
    transfer_syntax = stored_syntax or item.transfer_syntax
    if not transfer_syntax:
        raise Unsendable("stored file has no transfer syntax")
    with _overwrite(path) as out:
        out.write(_PREAMBLE + b"DICM")
        out.write(file_meta(item.sop_class, item.uid, transfer_syntax))
        assert out.tell() == dataset_offset(item, transfer_syntax)
        out.write(memoryview(head)[offset:])
        del head
        for chunk in stream:
            out.write(chunk)
    return transfer_syntax


#: pynetdicom's logging handlers, bound to every association: per PDU and message.
_STANDARD_HANDLERS = (
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler), (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler))


@contextlib.contextmanager
def store_responses_read_here(assoc: Association, notify: bool = False) -> Iterator[None]:
    """While instances are sent on ``assoc``, its successful C-STORE-RSPs are read by
    :func:`store_response` rather than decoded as pydicom Datasets, and pynetdicom's
    logging handlers are unbound -- unless its debug log is on.

    Either costs as much node CPU as the rest of a sub-operation.  Any other message
    (a failure status, a C-CANCEL, a response in several fragments) goes the usual
    way.  ``notify``: the responses read here are still told to EVT_DIMSE_RECV's
    handlers (the connection guard's, on a requestor's association), without a message.
    """
    if not isinstance(getattr(assoc, "dimse", None), DIMSEServiceProvider) \
            or logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        yield  # a test's stand-in, or everything logged
        return
    dimse = assoc.dimse
    usual = dimse.receive_primitive

    def receive(primitive: P_DATA) -> None:
        pdvs = primitive.presentation_data_value_list
        if dimse.message is None and len(pdvs) == 1 and pdvs[0][1][:1] == b"\x03":
            rsp = store_response(pdvs[0][1][1:])
            if rsp is not None:
                dimse.msg_queue.put((pdvs[0][0], rsp))
                if notify:
                    evt.trigger(assoc, evt.EVT_DIMSE_RECV, {"message": None})
                return
        usual(primitive)

    unbound = [(event, handler) for event, handler in _STANDARD_HANDLERS
               if any(bound is handler for bound, _ in assoc.get_handlers(event))]
    for event, handler in unbound:
        assoc.unbind(event, handler)
    dimse.receive_primitive = receive
    try:
        yield
    finally:
        del dimse.receive_primitive
        for event, handler in unbound:
            assoc.bind(event, handler)


def store_response(command: bytes) -> C_STORE | None:
    """A C-STORE-RSP command set with status Success, as the primitive pynetdicom would
    make of it (the Message ID Being Responded To and the Status: what is read of it);
    None for anything else."""
    fields: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, offset)
        if group != 0:
            return None
        fields[element] = command[offset + 8:offset + 8 + length]
        offset += 8 + length
    if offset != len(command):
        return None
    if any(len(fields.get(element, b"")) != 2 for element in (0x0100, 0x0120, 0x0800, 0x0900)):
        return None
    (field,), (msg_id,), (dataset,), (status,) = (
        struct.unpack("<H", fields[element]) for element in (0x0100, 0x0120, 0x0800, 0x0900))
    if field != _C_STORE_RSP or dataset != _NO_DATASET or status != SUCCESS:
        return None
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = msg_id, status
    return rsp


#: Seconds a DUL thread sleeps between polls of its socket and queue (pynetdicom: 1 ms)
#: during a retrieve.  The C-MOVE requestor waits on nothing then: it sends the pending
#: responses queued meanwhile (all of them each turn) and notices a C-CANCEL 4 ms later
#: at most; its polls were a tenth of the node's CPU per sub-operation.
MOVE_REQUESTOR_POLL = 0.005
#: The association the instances are sent on (C-GET: the requestor's; C-MOVE: the
#: destination's): each sub-operation waits for a response this thread reads, and a
#: 1 ms sleep before each send and each read was a fifth of a C-GET's time (C-GET of a
#: 30-instance study 183-204 -> 150-160 ms, C-MOVE 220-225 -> 190-195 ms, the node's CPU
#: unchanged: the polls replace waiting, and last only while instances are sent).
SENDING_POLL = 0.0002
#: With :mod:`archive.dimse.reactors` in place (pynetdicom 3.0.x), a DUL thread waits on
#: its socket and its queue instead of sleeping: these delays then apply only while it
#: has no connected socket, and the waits they were tuned for are gone.


@contextlib.contextmanager
def dul_polled_every(assoc: Association, seconds: float) -> Iterator[None]:
    """``assoc``'s DUL thread polls every ``seconds`` for the duration."""
    dul = getattr(assoc, "dul", None)
    previous = getattr(dul, "_run_loop_delay", None)
    if not isinstance(previous, float):  # a test's stand-in
        yield
        return
    dul._run_loop_delay = seconds
    try:
        yield
    finally:
        dul._run_loop_delay = previous


class Spooler:
    """Spools each instance's stored file while the one before it is sent.

    The database (FerretDB: another process) reads the next file on the second core
    while pynetdicom sends the current one and waits for its response.  Files are read
    in batches (:meth:`GridStore.stream_many`: two queries for many small files); two
    files in ``tmp`` take turns.  Items are taken in order, each once.
    """

    def __init__(self, files: Any, items: list[Item], tmp: Path) -> None:
        self.files, self.items, self.tmp = files, items, tmp
        self.streams: Iterator[tuple[ObjectId, Iterator[bytes]]] | None = None
        self.position = 0  # index of the item ``streams`` yields next
        self.paths = (tmp / "instance-0.dcm", tmp / "instance-1.dcm")
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self.ahead: Future[tuple[Path, str]] | None = self._submit(0)

    def _submit(self, index: int) -> Future[tuple[Path, str]] | None:
        if index >= len(self.items):
            return None
        item, path = self.items[index], self.paths[index % 2]
        return self.pool.submit(lambda: (path, spool(self._stream(index), item, path)))

    def _stream(self, index: int) -> Iterator[bytes]:
        """Item ``index``'s file, from the batches read (in the spooling thread, in
        order; skipped items are passed over).  After a database error the next item
        starts new batches."""
        if self.streams is None or self.position > index:
            self.streams = self.files.stream_many(item.file_id for item in self.items[index:])
            self.position = index
        try:
            while True:
                _, stream = next(self.streams)
                self.position += 1
                if self.position > index:
                    return stream
        except BaseException:
            self.streams = None
            raise

    def take(self, index: int) -> tuple[Path, str]:
        """Item ``index`` spooled (its path and stored transfer syntax), or what its
        spooling raised; the next item starts spooling."""
        return self._advance(index).result()

    def skip(self, index: int) -> None:
        """Item ``index`` will not be sent: its file is not wanted."""
        self._advance(index).cancel()

    def _advance(self, index: int) -> Future[tuple[Path, str]]:
        current, self.ahead = self.ahead, self._submit(index + 1)
        assert current is not None, "items are taken in order, each once"
        return current

    def __enter__(self) -> Spooler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


#: Explicit VR elements whose length is on 4 bytes (after 2 reserved ones).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})


def _stored_meta(head: bytes) -> tuple[int, str]:
    """Where the dataset starts in a Part-10 file, and its Transfer Syntax UID.

    The file meta group is always explicit VR little endian (PS3.10 7.1); it is walked
    element by element, so its group length need not be right.
    """
    if len(head) < 132 or head[128:132] != b"DICM":
        raise Unsendable("stored file is not a DICOM Part-10 file")
    offset, syntax = 132, ""
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            return offset, syntax
        vr = head[offset + 4:offset + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", head, offset + 8)
            start = offset + 12
        elif vr.isalpha() and vr.isupper():
            (length,) = struct.unpack_from("<H", head, offset + 6)
            start = offset + 8
        else:
            raise Unsendable("stored file meta is not explicit VR little endian")
        if element == 0x0010:
            syntax = head[start:start + length].rstrip(b"\0 ").decode("ascii", "replace")
        offset = start + length
    if offset == len(head):  # a file of file meta only: an empty dataset
        return offset, syntax
    raise Unsendable("stored file meta is truncated")


def dataset_offset(item: Item, transfer_syntax: str) -> int:
    """Where the dataset starts in the file :func:`spool` writes for ``item``."""
    uids = (item.sop_class, item.uid, transfer_syntax, PYDICOM_IMPLEMENTATION_UID)
    return 132 + 12 + 14 + sum(8 + len(uid) + len(uid) % 2 for uid in uids)


def _dataset_offset_in(path: Path) -> int:
    """Where the dataset starts in a Part-10 file (a converted one: its meta as written)."""
    with open(path, "rb") as f:
        return _stored_meta(f.read(64 * 1024))[0]


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """The encoded file meta group of a Part-10 file (PS3.10 7.1)."""
    def element(tag: int, vr: bytes, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\0"
        if vr in _LONG_VRS:
            return struct.pack("<HH2s2xI", 2, tag, vr, len(value)) + value
        return struct.pack("<HH2sH", 2, tag, vr, len(value)) + value

    body = b"".join((
        element(0x0001, b"OB", b"\0\1"),
        element(0x0002, b"UI", sop_class.encode("ascii")),
        element(0x0003, b"UI", sop_instance.encode("ascii")),
        element(0x0010, b"UI", transfer_syntax.encode("ascii")),
        element(0x0012, b"UI", PYDICOM_IMPLEMENTATION_UID.encode("ascii")),
    ))
    return element(0x0000, b"UL", struct.pack("<I", len(body))) + body


@contextlib.contextmanager
def _overwrite(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened to be rewritten, truncated after writing rather than before.

    The temporary files are reused for every instance; on ext4 truncating a file on
    open (``"wb"``) forces its pending data to disk, ~2 ms per instance.
    """
    with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+b") as out:
        yield out
        out.truncate()


def convert(source: Path, target: Path, transfer_syntax: str) -> None:
    """Transcode a Part-10 file to Explicit or Implicit VR Little Endian
    (:func:`archive.transcode.write_uncompressed`: decompressed if need be); the reason
    it cannot be is Unsendable's message."""
    try:
        with open(source, "rb") as f, _overwrite(target) as out:
            transcode.write_uncompressed(f, out, transfer_syntax)
    except transcode.Undecodable as exc:
        raise Unsendable(str(exc)) from None


# --- DIMSE messages encoded here (PS3.7 9.3.1.1, 9.3.3.2, 9.3.4.2) ----------------------
#
# pynetdicom builds each message as a pydicom Dataset and encodes its command set twice
# (the second time for its group length): with the pending response that follows, most
# of the node's CPU per sub-operation.  A C-STORE request and a pending C-MOVE/C-GET
# response are encoded here instead, as pynetdicom would encode them, byte for byte.

#: Command Field values (PS3.7 E.1).
_C_STORE_RQ, _C_STORE_RSP, _C_GET_RSP, _C_MOVE_RSP = 0x0001, 0x8001, 0x8010, 0x8021
#: Command Data Set Type: a data set follows, or none does.
_DATASET, _NO_DATASET = 0x0001, 0x0101
#: Priority of the C-STORE sub-operations: pynetdicom's default (LOW).
_PRIORITY = 0x0002
#: Dataset bytes per P-DATA-TF when the peer sets no maximum PDU length.
_UNLIMITED_FRAGMENT = 1024 * 1024
#: P-DATA-TF PDUs queued for the DUL thread at most: the memory a large instance costs.
_QUEUED_PDUS = 8


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" * (len(raw) % 2)


def _command(elements: list[tuple[int, bytes]]) -> bytes:
    """An implicit VR little endian command set (PS3.7 6.3.1) with its group length."""
    body = b"".join(struct.pack("<HHI", 0, tag, len(value)) + value for tag, value in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def store_request(sop_class: str, sop_instance: str, msg_id: int,
                  originator_aet: str | None = None, originator_id: int | None = None) -> bytes:
    """The command set of a C-STORE-RQ with a data set."""
    elements = [(0x0002, _ui(sop_class)), (0x0100, _us(_C_STORE_RQ)), (0x0110, _us(msg_id)),
                (0x0700, _us(_PRIORITY)), (0x0800, _us(_DATASET)),
                (0x1000, _ui(sop_instance))]
    if originator_aet is not None:
        raw = originator_aet.strip().encode("ascii")
        elements.append((0x1030, raw + b" " * (len(raw) % 2)))
    if originator_id is not None:
        elements.append((0x1031, _us(originator_id)))
    return _command(elements)


def pending_response(kind: str, sop_class: str, msg_id: int, counts: Counts) -> bytes:
    """The command set of a pending C-MOVE-RSP or C-GET-RSP, with the counts."""
    return _command([
        (0x0002, _ui(sop_class)), (0x0100, _us(_C_MOVE_RSP if kind == MOVE else _C_GET_RSP)),
        (0x0120, _us(msg_id)), (0x0800, _us(_NO_DATASET)), (0x0900, _us(PENDING)),
        (0x1020, _us(counts.remaining)), (0x1021, _us(counts.completed)),
        (0x1022, _us(counts.failed)), (0x1023, _us(counts.warning))])


def send_message(assoc: Association, context_id: int, command: bytes,
                 dataset: tuple[Path, int] | None = None) -> None:
    """One DIMSE message: its command set, then the dataset of the file ``dataset``
    names from its offset on, in P-DATA-TF PDUs within the peer's maximum length.

    The PDUs go to the association's DUL thread, which sends them; the file is read as
    they are sent, a few PDUs ahead (pynetdicom queues a whole dataset at once).
    """
    limit = assoc.dimse.maximum_pdu_size
    size = limit - 6 if limit else _UNLIMITED_FRAGMENT  # PDV item header, control byte
    _send_fragments(assoc, context_id, BytesIO(command), len(command), size, command=True)
    if dataset is None:
        return
    path, offset = dataset
    with open(path, "rb") as f:
        length = os.fstat(f.fileno()).st_size - offset
        f.seek(offset)
        _send_fragments(assoc, context_id, f, length, size, command=False)


def _send_fragments(assoc: Association, context_id: int, source: BinaryIO, length: int,
                    size: int, *, command: bool) -> None:
    """``length`` bytes of ``source`` as PDVs of at most ``size`` bytes (PS3.8 E.2).

    A dataset's PDUs wait for the DUL thread to have fewer than ``_QUEUED_PDUS`` to
    send; a peer that reads none of them for the DIMSE timeout raises OSError.
    """
    more, last = (b"\x01", b"\x03") if command else (b"\x00", b"\x02")
    queue = assoc.dul.to_provider_queue
    timeout = assoc.dimse_timeout or 60.0
    while True:
        piece = source.read(min(size, length))
        if len(piece) < min(size, length):
            raise OSError(f"{getattr(source, 'name', 'data')}: shorter than expected")
        length -= len(piece)
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, (more if length else last)
                                                   + piece))
        if not command and queue.qsize() >= _QUEUED_PDUS:
            deadline = time.monotonic() + timeout
            while queue.qsize() >= _QUEUED_PDUS and assoc.is_established:
                if time.monotonic() > deadline:
                    raise OSError(f"peer read no PDU for {timeout:g} s")
                time.sleep(0.0005)
        assoc.dul.send_pdu(pdata)
        if not length:
            return


# --- the operation ---------------------------------------------------------------------


class _Mute:
    """Drops the closing response pynetdicom sends after a handler answered itself."""

    def __init__(self, assoc: Association, message_id: int) -> None:
        self.dimse = assoc.dimse
        self.message_id = message_id
        self.dimse.send_msg = self  # type: ignore[method-assign]

    def __call__(self, primitive: Any, context_id: int) -> None:
        if isinstance(primitive, C_MOVE | C_GET) and \
                primitive.MessageIDBeingRespondedTo == self.message_id:
            self.remove()
            return
        type(self.dimse).send_msg(self.dimse, primitive, context_id)

    def remove(self) -> None:
        if self.dimse.__dict__.get("send_msg") is self:
            del self.dimse.send_msg


class Retrieve:
    """One C-MOVE or C-GET request, from matching to the final response."""

    def __init__(self, event: Event, node: Serving, kind: str) -> None:
        self.event, self.node, self.kind = event, node, kind
        self.context = node.context
        self.assoc: Association = event.assoc
        self.request = event.request
        self.counts = Counts()
        self.level = "?"
        self.destination = ""
        self.status: int | None = None  # of the final response, once sent
        self.comment = ""
        self.cancelled = False
        self.principal = ""
        self.decision: Decision | None = None
        self.summary = ""
        #: Presentation context ID per (SOP class, transfer syntax) sent in.
        self.context_ids: dict[tuple[str, str], int] = {}
        requestor = self.assoc.requestor
        self.who = f"{requestor.ae_title}@{requestor.address}:{requestor.port}"

    # -- responses ----------------------------------------------------------------------

    def respond(self, status: int, *, comment: str = "", counts: bool = True,
                identifier: bool = False, offending: tuple[int, ...] = ()) -> bool:
        """Send one C-MOVE/C-GET response; False when the requestor is gone."""
        if self._requestor_gone():
            return False
        if status == PENDING and counts and not (comment or identifier or offending):
            send_message(self.assoc, self.event.context.context_id, pending_response(
                self.kind, self.request.AffectedSOPClassUID, self.request.MessageID,
                self.counts))
            self._keep_alive()
            return True
        rsp = C_MOVE() if self.kind == MOVE else C_GET()
        rsp.MessageID = self.request.MessageID
        rsp.MessageIDBeingRespondedTo = self.request.MessageID
        rsp.AffectedSOPClassUID = self.request.AffectedSOPClassUID
        rsp.Status = status
        if comment:
            rsp.ErrorComment = _error_comment(comment)
        if offending:
            rsp.OffendingElement = list(offending)
        c = self.counts
        if counts:
            if status in (PENDING, CANCEL):
                rsp.NumberOfRemainingSuboperations = c.remaining
            rsp.NumberOfCompletedSuboperations = c.completed
            rsp.NumberOfFailedSuboperations = c.failed
            rsp.NumberOfWarningSuboperations = c.warning
        if identifier:
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = c.failed_uids
            ts = self.event.context.transfer_syntax
            rsp.Identifier = BytesIO(encode(ds, ts.is_implicit_VR, ts.is_little_endian,
                                            ts.is_deflated) or b"")
        self.assoc.dimse.send_msg(rsp, self.event.context.context_id)
        self._keep_alive()
        return True

    def _keep_alive(self) -> None:
        """Restart the requesting association's network (idle) timer.

        pynetdicom restarts it only on data received, and checks it once the handler
        returns: a C-MOVE requestor is silent while it waits, so a move longer than the
        network timeout would be aborted right after its final response.
        """
        timer = getattr(getattr(self.assoc, "dul", None), "_idle_timer", None)
        if timer is not None:
            timer.restart()

    def finish(self, status: int, comment: str = "") -> None:
        """The final response after sub-operations started (counts and failed UIDs)."""
        c = self.counts
        if not comment and c.failed and status != CANCEL:  # the commonest reason
            comment = c.reasons.most_common(1)[0][0]
        self.status, self.comment = status, comment
        if not self.respond(status, comment=comment, identifier=status != SUCCESS):
            self.status, self.comment = None, "requestor gone"

    # -- running ------------------------------------------------------------------------

    def run(self) -> None:
        started = time.perf_counter()
        try:
            self._run()
        except Refused as exc:
            self.status, self.comment = exc.status, exc.comment
            counted = exc.status == CANCEL or (exc.status == OUT_OF_RESOURCES_SUBOPS
                                               and self.counts.total > 0)
            if not self.respond(exc.status, comment=exc.comment, counts=counted,
                                identifier=counted, offending=exc.offending):
                self.status, self.comment = None, "requestor gone"
        except Exception as exc:  # noqa: BLE001 - the node keeps serving whatever happens
            log.exception("%s %s: unexpected error", self.kind, self.who)
            self.status, self.comment = INTERNAL_ERROR, f"internal error: {type(exc).__name__}"
            counted = self.counts.total > 0
            self.respond(INTERNAL_ERROR, comment=self.comment, counts=counted,
                         identifier=counted)
        finally:
            self._log(time.perf_counter() - started)
            self._audit(started)

    def _log(self, elapsed: float) -> None:
        """The operation's line: who, level, destination, counts, outcome, time."""
        c = self.counts
        dest = f" dest={self.destination}" if self.kind == MOVE else ""
        outcome = "no final response" if self.status is None else f"0x{self.status:04X}"
        if self.comment:
            outcome += f" {self.comment}"
        reasons = "; ".join(f"{n}x {r}" for r, n in c.reasons.most_common(3))
        (log.info if self.status in (SUCCESS, CANCEL) else log.warning)(
            "%s %s level=%s%s -> %s: matched=%d completed=%d failed=%d warning=%d "
            "converted=%d%s (%.1f ms)", self.kind, self.who, self.level, dest, outcome,
            c.total, c.completed, c.failed, c.warning, c.converted,
            f" [failures: {reasons}]" if reasons else "", elapsed * 1000)

    def _audit(self, started: float) -> None:
        """The operation's entry in the audit trail of access control."""
        if self.decision is None:
            return
        status = -1 if self.status is None else self.status
        rule = self.decision.deciding_rule() if status != NOT_AUTHORIZED else None
        c = self.counts
        try:
            entry = operation_entry(
                self.assoc, self.kind, self.principal, RETRIEVE,
                allowed=status != NOT_AUTHORIZED, status=status, request=self.summary,
                restricted=self.decision.restricted,
                rule=rule.index if rule is not None else None, comment=self.comment,
                counts={"matched": c.total, "completed": c.completed, "failed": c.failed,
                        "warning": c.warning}, started=started)
            self.context.audit.record(entry)
        except Exception:  # noqa: BLE001 - auditing never fails the operation
            log.exception("%s %s: audit entry not recorded", self.kind, self.who)

    def _run(self) -> None:
        self.principal, self.decision = self.node.authorize(self.assoc, RETRIEVE)
        if not self.decision.allowed:
            raise Refused(NOT_AUTHORIZED, self.decision.comment())
        if self.context.stopping.is_set():
            raise Refused(OUT_OF_RESOURCES_SUBOPS, "archive is shutting down")
        query, identifier = self._query()
        destination = self._destination() if self.kind == MOVE else None
        if destination is not None:  # rules may name the destinations they allow
            self.decision = self.decision.to_destination(destination[0])
            if not self.decision.allowed:
                raise Refused(NOT_AUTHORIZED, self.decision.comment(destination=destination[0]))
        if not self.context.health.up:  # refused at once, not after the driver's timeouts
            raise Refused(OUT_OF_RESOURCES_MATCHES, "database unavailable")
        items = self._match(query, identifier)
        if not items:
            raise Refused(NOTHING_FOUND, NOTHING_FOUND_COMMENT, _unique_tags(query.level))
        # Instances named by UID and not found are failed sub-operations (PS3.4
        # C.4.2.1.5: Warning B000, Failed SOP Instance UID List), so a peer sees them.
        found = {item.uid for item in items}
        named = exact_values(identifier, "SOPInstanceUID") if query.level == model.IMAGE \
            else None
        missing = [uid for uid in dict.fromkeys(named or ()) if uid not in found]
        self.counts.total = len(items) + len(missing)
        for uid in missing:
            self.counts.fail(uid, "SOP Instance not found")
        with tempfile.TemporaryDirectory(prefix="archive-retrieve-") as tmp:
            if destination is None:
                with store_responses_read_here(self.assoc, notify=True), \
                        dul_polled_every(self.assoc, SENDING_POLL):
                    self._transfer(self.assoc, items, Path(tmp))
                return
            sub = self._associate(destination, items)
            try:
                with reactor_held(sub), store_responses_read_here(sub), \
                        dul_polled_every(self.assoc, MOVE_REQUESTOR_POLL), \
                        dul_polled_every(sub, SENDING_POLL):
                    self._transfer(sub, items, Path(tmp))
            finally:
                if sub.is_established:
                    sub.release()

    def _destination(self) -> tuple[str, Destination]:
        """The Move Destination's AE title and where it listens (cfg.destinations)."""
        raw = self.event.move_destination
        ae = (raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw or "").strip()
        self.destination = ae or "''"
        dest = self.context.cfg.destinations.get(ae) if ae else None
        if dest is None:
            raise Refused(MOVE_DESTINATION_UNKNOWN, f"Move Destination {ae!r} unknown")
        self.destination = f"{ae}@{dest.host}:{dest.port}"
        return ae, dest

    def _query(self) -> tuple[Query, Dataset]:
        """The identifier, checked and translated (no database access yet)."""
        try:
            identifier = self.event.identifier
            identifier.decode()
            self.summary = summarize(identifier)
        except Exception:  # noqa: BLE001 - an identifier pydicom cannot decode
            raise Refused(UNABLE_TO_PROCESS, "cannot decode the identifier") from None
        try:
            query = translate(identifier, _retrieve_model(
                MODELS[self.request.AffectedSOPClassUID], identifier),
                              pn_case_insensitive=self.context.cfg.query.pn_case_insensitive,
                              combined_datetime=self.context.cfg.query.combined_datetime)
        except QueryError as exc:
            raise Refused(exc.status, exc.comment, exc.offending) from None
        self.level = query.level
        _require_unique_key(identifier, query.level)
        return query, identifier

    def _match(self, query: Query, identifier: Dataset) -> list[Item]:
        """What the identifier selects (and the access rules let through), in order."""
        items: dict[str, Item] = {}
        restriction = self.decision.instance_filter() if self.decision else None
        found = self.context.finder.instances(query.level, identifier, restriction)
        try:
            for n, doc in enumerate(found):
                if n % 256 == 255 and self._cancel_requested():
                    raise Refused(CANCEL, "cancelled while matching")
                if doc["_id"] in items:
                    continue
                items[doc["_id"]] = Item(doc["_id"], str(doc.get("SOPClassUID", "")),
                                         str(doc.get("TransferSyntaxUID", "")), doc["file_id"])
                if len(items) > MAX_SUBOPERATIONS:
                    raise Refused(OUT_OF_RESOURCES_MATCHES,
                                  f"more than {MAX_SUBOPERATIONS} instances match")
        except PyMongoError as exc:
            self.context.health.suspect(exc)
            log.warning("%s %s: database error while matching: %s", self.kind, self.who, exc)
            raise Refused(OUT_OF_RESOURCES_MATCHES,
                          "database unavailable, matches not counted") from None
        return list(items.values())

    def _requestor_gone(self) -> bool:
        """The requestor aborted or dropped the connection.

        Our handler runs in the association's own thread, which only marks it aborted
        once the handler returns; the abort is already waiting in the DUL's queue.
        """
        return not self.assoc.is_established or self.assoc.acse.is_aborted()

    def _cancel_requested(self) -> bool:
        # pynetdicom forgets a C-CANCEL once it has been reported: remember it.
        self.cancelled = self.cancelled or self.event.is_cancelled
        return self.cancelled

    def _associate(self, destination: tuple[str, Destination],
                   items: list[Item]) -> Association:
        """The sub-association with the Move Destination, proposing what ``items`` need.

        When it cannot be established every instance is counted failed (0xA702).
        """
        ae_title, dest = destination
        ae = self.node.ae
        tls_args = (client_tls(self.context.cfg), dest.host) if dest.tls else None
        sub = ae.associate(dest.host, dest.port, contexts=proposal(items), ae_title=ae_title,
                           tls_args=tls_args, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
        if sub.is_established:
            return sub
        if sub.is_rejected:
            why = "rejected the association"
        elif sub.rejected_contexts and not sub.accepted_contexts:
            why = "accepted no presentation context"
        elif sub.acceptor.primitive is None:
            why = "cannot be reached (no connection or no answer)"
        else:
            why = "aborted the association"
        for item in items:
            reason = f"destination {why}"
            if why == "accepted no presentation context":
                try:
                    choose(item, {})
                except Unsendable as exc:
                    reason = str(exc)
            self.counts.fail(item, reason)
        raise Refused(OUT_OF_RESOURCES_SUBOPS, f"Move Destination {why}")

    def _transfer(self, sub: Association, items: list[Item], tmp: Path) -> None:
        """The C-STORE sub-operations, one pending response after each but the last."""
        with Spooler(self.context.archive.files, items, tmp) as spooler:
            self._sub_operations(sub, items, tmp, spooler)

    def _sub_operations(self, sub: Association, items: list[Item], tmp: Path,
                        spooler: Spooler) -> None:
        accepted = accepted_syntaxes(sub)
        c = self.counts
        for index, item in enumerate(items):
            if self._cancel_requested():
                self.finish(CANCEL)
                return
            if self._requestor_gone():
                self.comment = "requestor gone"
                return
            if not sub.is_established:
                for rest in items[index:]:
                    c.fail(rest, "destination association lost")
                break
            try:
                self._store(sub, item, accepted, tmp, index, spooler)
            except PyMongoError as exc:
                self.context.health.suspect(exc)
                log.warning("%s %s: database error reading %s: %s", self.kind, self.who,
                            item.uid, exc)
                for rest in items[index:]:
                    c.fail(rest, "database unavailable")
                break
            if c.remaining:
                self.respond(PENDING)
        self.finish(c.final_status())

    def _store(self, sub: Association, item: Item, accepted: dict[str, set[str]],
               tmp: Path, index: int, spooler: Spooler) -> None:
        c = self.counts
        try:
            syntax = choose(item, accepted)
        except Unsendable as exc:
            spooler.skip(index)
            c.fail(item, str(exc))
            return
        try:
            path, stored = spooler.take(index)
            offset = dataset_offset(item, stored)
            if stored != syntax:
                if item.transfer_syntax != stored:  # the document and the file disagree
                    syntax = choose(Item(item.uid, item.sop_class, stored, item.file_id),
                                    accepted)
                if stored != syntax:
                    convert(path, tmp / "converted.dcm", syntax)
                    path = tmp / "converted.dcm"
                    offset = _dataset_offset_in(path)
                    c.converted += 1
        except Unsendable as exc:
            c.fail(item, str(exc))
            return
        except FileNotFoundError as exc:
            c.fail(item, f"stored file missing: {exc}")
            return
        status = self._send(sub, item, syntax, (path, offset), index)
        if status is None:
            c.fail(item, "no C-STORE response (association lost or DIMSE timeout)")
            # The exchange is broken whatever pynetdicom's state says yet (it marks a
            # connection reset a moment later): the sub-association ends here.
            with contextlib.suppress(Exception):
                sub.abort()
            return
        category = STORAGE_SERVICE_CLASS_STATUS.get(status, ("Failure",))[0]
        if status == SUCCESS:
            c.completed += 1
        elif category == "Warning":
            c.warning += 1
        else:
            c.fail(item, f"destination answered 0x{status:04X}")

    def _send(self, sub: Association, item: Item, syntax: str, dataset: tuple[Path, int],
              index: int) -> int | None:
        """C-STORE one file's dataset as it is on disk; the response status or None.

        Sent as pynetdicom's ``send_c_store`` would, without building the request as a
        Dataset (:func:`store_request`).  The reactor of a Move Destination association
        is held (:func:`reactor_held`); a C-GET runs in its association's reactor thread:
        nothing else takes the response off the queue.
        """
        msg_id = (self.request.MessageID + index) % 0xFFFF + 1
        originator = (self.assoc.requestor.ae_title, self.request.MessageID) \
            if self.kind == MOVE else (None, None)
        try:
            key = (item.sop_class, syntax)
            if key not in self.context_ids:  # pynetdicom's lookup: a scan of the contexts
                self.context_ids[key] = int(sub._get_valid_context(
                    item.sop_class, syntax, "scu", allow_conversion=False).context_id or 0)
            send_message(sub, self.context_ids[key],
                         store_request(item.sop_class, item.uid, msg_id, *originator), dataset)
        except (RuntimeError, ValueError, AttributeError, OSError) as exc:
            log.debug("%s %s: C-STORE failed: %s", self.kind, self.who, exc)
            return None
        _, rsp = sub.dimse.get_msg(block=True)
        if not isinstance(rsp, C_STORE) or not rsp.is_valid_response or rsp.Status is None:
            log.debug("%s %s: no valid C-STORE response: %r", self.kind, self.who, rsp)
            return None
        return int(rsp.Status)


def _error_comment(text: str) -> str:
    """Error Comment is LO: 64 characters, no backslash or control characters."""
    return "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in text)[:64]


def _require_unique_key(identifier: Dataset, level: str) -> None:
    """A retrieve names the entities it moves: the level's unique key (PS3.4 C.4.2.2.1).

    Without it a C-MOVE of an empty identifier would send the whole archive.  At the
    IMAGE level (0002,0003) Media Storage SOP Instance UID names instances too.
    """
    keyword = model.UNIQUE_KEY[level]
    if exact_values(identifier, keyword) is None:
        raise Refused(IDENTIFIER_DOES_NOT_MATCH,
                      f"{keyword} required at the {level} level, without wildcards",
                      _unique_tags(level))


def _unique_tags(level: str) -> tuple[int, ...]:
    """The level's unique key, as Offending Element."""
    return (tag_for_keyword(model.UNIQUE_KEY[level]) or 0,)


def _retrieve_model(model_name: str, identifier: Dataset) -> str:
    """The information model to read a retrieve identifier in.

    Orthanc (1.10) sends every C-MOVE in Study Root, its patient-level retrieves
    included: a PATIENT level naming a Patient ID is then read as Patient Root, so that
    "retrieve this patient" works.  C-FIND stays strict (Orthanc queries patients in
    Patient Root).
    """
    if model_name != model.STUDY:
        return model_name
    try:
        level = identifier.get("QueryRetrieveLevel")
    except Exception:  # noqa: BLE001 - translate() names the faulty level itself
        return model_name
    return model.PATIENT if isinstance(level, str) and level.strip() == model.PATIENT \
        else model_name


# --- handlers -------------------------------------------------------------------------


def _handler(event: Event, node: Serving, kind: str) -> Iterator[Any]:
    Retrieve(event, node, kind).run()
    # The operation has answered in full; let pynetdicom finish quietly.
    mute = _Mute(event.assoc, event.request.MessageID)
    try:
        if kind == MOVE:
            yield ("127.0.0.1", 0)  # a destination pynetdicom never contacts: no sub-ops
        yield 0
    finally:
        mute.remove()


def handle_move(event: Event, node: Serving) -> Iterator[Any]:
    """EVT_C_MOVE handler."""
    return _handler(event, node, MOVE)


def handle_get(event: Event, node: Serving) -> Iterator[Any]:
    """EVT_C_GET handler."""
    return _handler(event, node, GET)

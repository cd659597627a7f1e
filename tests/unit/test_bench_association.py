"""The association benchmark's own reading of P-DATA-TF: it waits for a request's final
response by its status, so a misread status would time a pending answer as the last,
or hang (benchmarks/bench_association.py)."""

from __future__ import annotations

from io import BytesIO

from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pynetdicom.dimse_messages import C_ECHO_RQ, C_FIND_RQ, C_FIND_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_FIND
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF

from benchmarks import bench_association as ba

PENDING = [0xFF00, 0xFF01]
FINAL = [0x0000, 0xA700, 0xC000, 0xFE00, 0x0122]


def pdus(message: object, max_pdu: int) -> list[bytes]:
    """A DIMSE message as the P-DATA-TF PDUs a peer with that maximum length sends."""
    out = []
    for primitive in message.encode_msg(1, max_pdu):  # type: ignore[attr-defined]
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out.append(pdu.encode())
    return out


def find_response(status: int, identifier: bool, max_pdu: int) -> list[bytes]:
    primitive = C_FIND()
    primitive.MessageIDBeingRespondedTo = 1
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    primitive.Status = status
    if identifier:
        ds = Dataset()
        ds.PatientName = "X" * 300  # more than one fragment at small PDU lengths
        primitive.Identifier = BytesIO(encode(ds, True, True))
    message = C_FIND_RSP()
    message.primitive_to_message(primitive)
    return pdus(message, max_pdu)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(PENDING), max_size=4), st.sampled_from(FINAL),
       st.sampled_from([0, 128, 512, 16382]))
def test_only_the_last_pdu_of_a_final_response_ends_a_request(
        pending: list[int], final: int, max_pdu: int) -> None:
    """Pending answers (with identifiers, fragmented or not), then a final status: the
    reader says 'final' at the last PDU of the final response, and never before."""
    stream = [p for status in pending for p in find_response(status, True, max_pdu)]
    stream += find_response(final, False, max_pdu)
    reader = ba.Responses()
    seen = [reader.final(pdu) for pdu in stream]
    assert seen == [False] * (len(stream) - 1) + [True]


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([0, 128, 16382]))
def test_a_request_is_complete_at_its_last_fragment(max_pdu: int) -> None:
    """A C-ECHO (a command alone) and a C-FIND (a command, then its identifier)."""
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    message = C_ECHO_RQ()
    message.primitive_to_message(echo)
    stream = pdus(message, max_pdu)
    assert [ba._request_complete(p) for p in stream] == [False] * (len(stream) - 1) + [True]

    find = C_FIND()
    find.MessageID = 2
    find.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    find.Priority = 2
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = "1.2.3"
    find.Identifier = BytesIO(encode(ds, True, True))
    message = C_FIND_RQ()
    message.primitive_to_message(find)
    stream = pdus(message, max_pdu)
    assert [ba._request_complete(p) for p in stream] == [False] * (len(stream) - 1) + [True]

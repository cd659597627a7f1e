"""C-FIND-RSP messages written by archive.dimse.find_messages against pynetdicom's own: the
same P-DATA fragments for every response the C-FIND SCP sends."""

from __future__ import annotations

from io import BytesIO

from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom import dimse
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND

from archive.dimse import find_messages
from archive.dimse.find_messages import FindResponse

UIDS = [None, "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.1.1", "1.2.3"]


@st.composite
def responses(draw: st.DrawFn) -> C_FIND:
    rsp = C_FIND()
    rsp.MessageID = draw(st.integers(0, 0xFFFF))
    rsp.MessageIDBeingRespondedTo = rsp.MessageID
    uid = draw(st.sampled_from(UIDS))
    if uid is not None:
        rsp.AffectedSOPClassUID = uid
    rsp.Status = draw(st.sampled_from([0x0000, 0xFF00, 0xFF01, 0xFE00, 0xA700, 0xC001,
                                       0xC311, 0xB000]))
    identifier = draw(st.one_of(st.none(), st.binary(min_size=0, max_size=300)))
    rsp.Identifier = None if identifier is None else BytesIO(identifier)
    if draw(st.booleans()) and rsp.Status >= 0xA000:
        rsp.ErrorComment = draw(st.text("abc XYZ", max_size=20))
    if draw(st.booleans()) and rsp.Status >= 0xA000:
        rsp.OffendingElement = [0x00100010]
    return rsp


def _pdvs(message_class: type, rsp: C_FIND, max_pdu: int) -> list[list[tuple[int, bytes]]]:
    message = message_class()
    message.primitive_to_message(rsp)
    message.context_id = 3
    return [p.presentation_data_value_list for p in message.encode_msg(3, max_pdu)]


@settings(max_examples=400, deadline=None)
@given(responses(), st.sampled_from([0, 20, 64, 16382]))
def test_same_fragments_as_pynetdicom(rsp: C_FIND, max_pdu: int) -> None:
    """Pending, final, cancel and failure responses, with and without identifier,
    SOP Class, Error Comment, Offending Element, at any maximum PDU length: the same
    bytes in the same P-DATA; and the command set reads back as pynetdicom's."""
    assert _pdvs(FindResponse, rsp, max_pdu) == _pdvs(C_FIND_RSP, rsp, max_pdu)
    ours, theirs = FindResponse(), C_FIND_RSP()
    ours.primitive_to_message(rsp)
    theirs.primitive_to_message(rsp)
    assert ours.command_set == theirs.command_set


def test_install_switches_the_message_class() -> None:
    """Sent as FindResponse once installed, as pynetdicom's when its logging handlers,
    which know messages by class, are on."""
    try:
        find_messages.install(True)
        assert dimse._RSP_TO_MESSAGE[C_FIND] is FindResponse
    finally:
        find_messages.install(False)
    assert dimse._RSP_TO_MESSAGE[C_FIND] is C_FIND_RSP

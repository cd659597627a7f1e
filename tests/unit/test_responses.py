"""C-FIND-RSP and C-STORE-RSP messages written by archive.dimse.responses against
pynetdicom's own: the same P-DATA fragments for every response the node sends."""

from __future__ import annotations

from io import BytesIO

from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom import dimse
from pynetdicom.dimse_messages import C_FIND_RSP, C_STORE_RSP
from pynetdicom.dimse_primitives import C_FIND, C_STORE

from archive.dimse import responses
from archive.dimse.responses import FindResponse, StoreResponse

UIDS = [None, "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.1.1", "1.2.3"]
INSTANCE_UIDS = [None, "1.2.826.0.1.3680043.8.498.1", "1.2.34", "2.25.1234567890123"]
STATUSES = [0x0000, 0xFF00, 0xFF01, 0xFE00, 0xA700, 0xC001, 0xC311, 0xB000, 0x0111,
            0xC409, 0xA770]


@st.composite
def responses_of(draw: st.DrawFn, kind: type) -> C_FIND | C_STORE:
    rsp = kind()
    rsp.MessageID = draw(st.integers(0, 0xFFFF))
    rsp.MessageIDBeingRespondedTo = rsp.MessageID
    uid = draw(st.sampled_from(UIDS))
    if uid is not None:
        rsp.AffectedSOPClassUID = uid
    rsp.Status = draw(st.sampled_from(STATUSES))
    if kind is C_FIND:
        identifier = draw(st.one_of(st.none(), st.binary(min_size=0, max_size=300)))
        rsp.Identifier = None if identifier is None else BytesIO(identifier)
    else:
        instance = draw(st.sampled_from(INSTANCE_UIDS))
        if instance is not None:
            rsp.AffectedSOPInstanceUID = instance
    if draw(st.booleans()) and rsp.Status >= 0xA000:
        rsp.ErrorComment = draw(st.text("abc XYZ", max_size=20))
    if draw(st.booleans()) and rsp.Status >= 0xA000:
        rsp.OffendingElement = [0x00100010]
    return rsp


def _pdvs(message_class: type, rsp: C_FIND | C_STORE,
          max_pdu: int) -> list[list[tuple[int, bytes]]]:
    message = message_class()
    message.primitive_to_message(rsp)
    message.context_id = 3
    return [p.presentation_data_value_list for p in message.encode_msg(3, max_pdu)]


PAIRS = [(C_FIND, FindResponse, C_FIND_RSP), (C_STORE, StoreResponse, C_STORE_RSP)]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PAIRS).flatmap(
    lambda pair: st.tuples(st.just(pair), responses_of(pair[0]))),
    st.sampled_from([0, 20, 64, 16382]))
def test_same_fragments_as_pynetdicom(case: tuple, max_pdu: int) -> None:
    """Pending, final, cancel and failure responses of C-FIND and C-STORE, with and
    without identifier, SOP Class and Instance, Error Comment, Offending Element, at any
    maximum PDU length: the same bytes in the same P-DATA; and the command set reads
    back as pynetdicom's."""
    (_, ours_class, theirs_class), rsp = case
    assert _pdvs(ours_class, rsp, max_pdu) == _pdvs(theirs_class, rsp, max_pdu)
    ours, theirs = ours_class(), theirs_class()
    ours.primitive_to_message(rsp)
    theirs.primitive_to_message(rsp)
    assert ours.command_set == theirs.command_set


def test_install_switches_the_message_classes() -> None:
    """Sent as these once installed, as pynetdicom's when its logging handlers, which
    know messages by class, are on."""
    try:
        responses.install(True)
        assert dimse._RSP_TO_MESSAGE[C_FIND] is FindResponse
        assert dimse._RSP_TO_MESSAGE[C_STORE] is StoreResponse
    finally:
        responses.install(False)
    assert dimse._RSP_TO_MESSAGE[C_FIND] is C_FIND_RSP
    assert dimse._RSP_TO_MESSAGE[C_STORE] is C_STORE_RSP

"""C-FIND-RSP and C-STORE-RSP messages encoded straight from their primitive.

Why: pynetdicom builds every DIMSE message's command set as a pydicom Dataset (a
template of eight elements, each value set through pydicom's conversions) and encodes it
twice with pydicom's writer (once for the group length): ~1 ms of the node's CPU per
C-FIND answer, more than building and encoding the answer itself (archive.answers), and
~0.5 ms of each C-STORE's, sent while the modality waits.  Both responses' command sets
are a few fixed-layout elements in Implicit VR Little Endian, so :class:`FindResponse`
and :class:`StoreResponse` write them with ``struct`` when the response carries no
Offending Element nor Error Comment, and are pynetdicom's own messages otherwise.  Their
P-DATA fragments are those pynetdicom's ``encode_msg`` yields
(tests/unit/test_responses.py compares them).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from io import BytesIO
from math import ceil
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import dimse, dimse_messages
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA

#: Command Field of each response (PS3.7 E.1-1)
_COMMAND_FIELD = {C_FIND: 0x8020, C_STORE: 0x8001}
_WITH_DATASET, _WITHOUT_DATASET = 0x0001, 0x0101
_US = struct.Struct("<HHIH")  # tag (group, element), length 2, value
_HEADER = struct.Struct("<HHI")


def command_set(primitive: C_FIND | C_STORE) -> bytes | None:
    """The encoded command set of a C-FIND or C-STORE response, as pynetdicom encodes
    it; None for one with an Offending Element or Error Comment (pynetdicom encodes
    those)."""
    if primitive.OffendingElement is not None or primitive.ErrorComment is not None:
        return None
    if primitive.MessageIDBeingRespondedTo is None or primitive.Status is None:
        return None
    identifier = primitive.Identifier if isinstance(primitive, C_FIND) else None
    parts = [_uid(0x0002, primitive.AffectedSOPClassUID),
             _US.pack(0x0000, 0x0100, 2, _COMMAND_FIELD[type(primitive)]),
             _US.pack(0x0000, 0x0120, 2, primitive.MessageIDBeingRespondedTo),
             _US.pack(0x0000, 0x0800, 2, _WITH_DATASET if identifier else _WITHOUT_DATASET),
             _US.pack(0x0000, 0x0900, 2, primitive.Status)]
    if isinstance(primitive, C_STORE):
        parts.append(_uid(0x1000, primitive.AffectedSOPInstanceUID))
    body = b"".join(parts)
    return _HEADER.pack(0x0000, 0x0000, 4) + struct.pack("<I", len(body)) + body


def _uid(element: int, uid: Any) -> bytes:
    """A UI element of group 0000, padded to even length with NUL; none if unset."""
    if uid is None:
        return b""
    value = str(uid).encode("latin_1")
    value += b"\0" if len(value) % 2 else b""
    return _HEADER.pack(0x0000, element, len(value)) + value


class _Response:
    """A response message whose command set :func:`command_set` writes (decoded into
    ``command_set`` only if something reads it); pynetdicom's message otherwise."""

    #: pynetdicom's name of the message (its command set template) and its primitive
    NAME: str
    PRIMITIVE: type

    def __init__(self) -> None:  # DIMSEMessage's, the command set template made lazily
        self.context_id: int | None = None
        self.encoded_command_set = BytesIO()
        self.data_set: BytesIO | None = BytesIO()
        self._data_set_path: Any = None
        self._data_set_file: Any = None
        self._encoded: bytes | None = None
        self._command_set: Dataset | None = None

    @property
    def command_set(self) -> Dataset:
        if self._command_set is None:
            if self._encoded is None:  # pynetdicom's template, as DIMSEMessage makes it
                self._command_set = Dataset()
                for keyword in dimse_messages._COMMAND_SET_KEYWORDS[self.NAME]:
                    setattr(self._command_set, keyword, None)
            else:
                self._command_set = decode(BytesIO(self._encoded), True, True)
        return self._command_set

    @command_set.setter
    def command_set(self, value: Dataset) -> None:
        self._command_set = value

    def primitive_to_message(self, primitive: Any) -> None:
        encoded = command_set(primitive) if isinstance(primitive, self.PRIMITIVE) else None
        if encoded is None:
            super().primitive_to_message(primitive)  # type: ignore[misc]
            return
        self._encoded, self._command_set = encoded, None
        self.data_set = primitive.Identifier if isinstance(primitive, C_FIND) else None
        self._data_set_path = None

    def encode_msg(self, context_id: int, max_pdu_length: int) -> Iterator[P_DATA]:
        if self._encoded is None:
            yield from super().encode_msg(context_id, max_pdu_length)  # type: ignore[misc]
            return
        self.context_id = context_id
        yield from self._pdvs(self._encoded, context_id, max_pdu_length, b"\x01", b"\x03")
        if self.data_set is not None:
            data = self.data_set.getvalue()
            if data:
                yield from self._pdvs(data, context_id, max_pdu_length, b"\x00", b"\x02")

    def _pdvs(self, data: bytes, context_id: int, max_pdu_length: int, header: bytes,
              last_header: bytes) -> Iterator[P_DATA]:
        """pynetdicom's fragmentation: one P-DATA per fragment, the last one flagged."""
        count = 1 if max_pdu_length == 0 else ceil(len(data) / (max_pdu_length - 6))
        fragments = self._generate_pdv_fragments(data, max_pdu_length)  # type: ignore[attr-defined]
        for index in range(count):
            pdata = P_DATA()
            flag = last_header if index == count - 1 else header
            pdata.presentation_data_value_list.append((context_id, flag + next(fragments)))
            yield pdata


class FindResponse(_Response, dimse_messages.C_FIND_RSP):
    NAME, PRIMITIVE = "C-FIND-RSP", C_FIND


class StoreResponse(_Response, dimse_messages.C_STORE_RSP):
    NAME, PRIMITIVE = "C-STORE-RSP", C_STORE


# pynetdicom finds a message's template and dataset by its class name
FindResponse.__name__ = FindResponse.__qualname__ = "C_FIND_RSP"
StoreResponse.__name__ = StoreResponse.__qualname__ = "C_STORE_RSP"


def install(enabled: bool = True) -> None:
    """Make pynetdicom send C-FIND and C-STORE responses as these, or as its own
    messages again: its logging handlers (``_config.LOG_HANDLER_LEVEL = "standard"``)
    know these by their class."""
    dimse._RSP_TO_MESSAGE[C_FIND] = FindResponse if enabled \
        else dimse_messages.C_FIND_RSP  # type: ignore[index]
    dimse._RSP_TO_MESSAGE[C_STORE] = StoreResponse if enabled \
        else dimse_messages.C_STORE_RSP  # type: ignore[index]

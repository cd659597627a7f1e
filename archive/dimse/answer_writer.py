"""C-FIND answers (:class:`archive.answers.Answer`) written in pynetdicom's C-FIND path
without pydicom's writer.

Why: the core's finder turns each value of an answer into the bytes pydicom's writer
gives for it (:mod:`archive.answers`); pydicom's ``write_dataset`` would still copy them
through its per-element buffers.  :func:`encode_answer` writes the tag, VR and length
headers pydicom puts before each value, and :func:`install` puts it in pynetdicom's
service classes.  tests/unit/test_answers.py compares both ways byte for byte.
"""

from __future__ import annotations

import functools
import struct

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pynetdicom import service_class

from archive.answers import Answer


def encode_answer(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool) -> bytes | None:
    """The bytes pydicom's ``write_dataset`` writes for ``ds``, when every element is a
    raw one of this syntax (None otherwise: pydicom then writes it)."""
    if ds.original_encoding != (is_implicit_vr, is_little_endian):
        return None
    order = "<" if is_little_endian else ">"
    implicit, short, long_ = (struct.Struct(order + "HHI"), struct.Struct(order + "HH2sH"),
                              struct.Struct(order + "HH2sHI"))
    out: list[bytes] = []
    elements = ds._dict
    for tag in sorted(elements):
        elem = elements[tag]
        if not isinstance(elem, RawDataElement) or elem.is_implicit_VR != is_implicit_vr \
                or elem.is_little_endian != is_little_endian or elem.value is None:
            return None
        group, number = tag >> 16, tag & 0xFFFF
        if number == 0 and group > 6:
            continue  # group lengths: pydicom's writer leaves them out
        length = len(elem.value)
        if is_implicit_vr:
            out.append(implicit.pack(group, number, length))
        elif elem.VR is None or len(elem.VR) != 2:
            return None
        elif elem.VR in EXPLICIT_VR_LENGTH_32:
            out.append(long_.pack(group, number, elem.VR.encode("ascii"), 0, length))
        elif length > 0xFFFF:
            return None  # pydicom writes it as UN, with a warning
        else:
            out.append(short.pack(group, number, elem.VR.encode("ascii"), length))
        out.append(elem.value)
    return b"".join(out)


def install() -> None:
    """Make pynetdicom's service classes encode :class:`Answer` datasets with
    :func:`encode_answer` (once per process; any other dataset as before)."""
    current = service_class.encode
    if hasattr(current, "__wrapped__"):
        return

    @functools.wraps(current)
    def encode(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool,
               deflated: bool = False) -> bytes | None:
        if not deflated and type(ds) is Answer:
            data = encode_answer(ds, is_implicit_vr, is_little_endian)
            if data is not None:
                return data
        return current(ds, is_implicit_vr, is_little_endian, deflated)

    service_class.encode = encode  # type: ignore[assignment]

"""Generated bad data shared by the property-based tests (unit, on mongomock, and
integration, on FerretDB): malformed Part-10 files, valid files to cut, and the
invariant every store must keep (:func:`check_outcome`)."""

from __future__ import annotations

import json
import math
import struct
import warnings
from io import BytesIO

import bson
from helpers import consistency_problems, counter_problems, image_dataset, make_dataset, to_part10
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from archive.storage import Archive

COLLECTIONS = ("instances", "series", "studies", "patients", "fs.files", "fs.chunks")
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
#: (tag, VR) pairs to corrupt: text, numbers of each kind, binary, private.
TARGETS = [
    (0x00080020, "DA"), (0x00080030, "TM"), (0x0008002A, "DT"), (0x00080050, "SH"),
    (0x00081030, "LO"), (0x00100010, "PN"), (0x00101010, "AS"), (0x00180050, "DS"),
    (0x00200013, "IS"), (0x00200011, "IS"), (0x00280030, "DS"), (0x00280010, "US"),
    (0x00189087, "FD"), (0x00189089, "FD"), (0x0018605A, "FL"), (0x00081161, "UV"),
    (0x00720082, "SV"), (0x00186020, "SL"), (0x00280106, "SS"), (0x00081160, "UL"),
    (0x00200032, "DS"), (0x00280008, "IS"), (0x00400254, "LO"), (0x00324000, "LT"),
    (0x00081115, "UN"), (0x00291010, "OB"), (0x00291011, "UN"), (0x00291012, "LO"),
    (0x00091001, "UT"), (0x00080005, "CS"), (0x00080060, "CS"), (0x00080070, "LO"),
]
KEYS = [(0x00080018, "UI"), (0x00080016, "UI"), (0x0020000D, "UI"), (0x0020000E, "UI"),
        (0x00100020, "LO")]

TEXTS = st.sampled_from([
    b"NaN", b"nan ", b"Inf", b"-Infinity", b"1e400", b"-1e400", b"99999999999999999999999",
    b"18446744073709551616", b"-9223372036854775809", b"2147483648", b"1.5", b"0x10",
    b"1\\NaN", b"\x00", b"A\x00B", b"\x01\x02", b"\x1b$B", b"\x7f", b"\xff\xfe", b"\xc3",
    b"20191301", b"20190230", b"2500", b"1060", b"", b" ", b"\\\\", b"=", b"^^^^",
    b"1." + b"2" * 70, b"x" * 300, b"\xed\xa0\x80",  # UTF-8 of a lone surrogate
])
PACKED = st.one_of(
    st.integers(0, 2**64 - 1).map(lambda n: struct.pack("<Q", n)),
    st.integers(-(2**63), 2**63 - 1).map(lambda n: struct.pack("<q", n)),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda x: struct.pack("<d", x)),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(
        lambda x: struct.pack("<f", x)),
    st.sampled_from([struct.pack("<d", math.nan) * 2, struct.pack("<Q", 2**64 - 1),
                     struct.pack("<f", math.inf), b"\x00\x00\x00"]),
)
VALUES = st.one_of(TEXTS, PACKED, st.binary(max_size=64),
                   st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")))


def element(tag: int, vr: str, value: bytes) -> bytes:
    """One explicit VR little endian element, as a sender would put it on the wire."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr in LONG_VRS:
        return head + struct.pack("<HL", 0, len(value)) + value
    return head + struct.pack("<H", len(value)) + value


@st.composite
def malformed(draw: st.DrawFn) -> bytes:
    """A valid small image with random elements appended (a later copy of a tag wins)."""
    pixels = draw(st.sampled_from([None, b"\x00\x01" * 600]))
    ds = make_dataset(Rows=2, Columns=2) if pixels is None else image_dataset(pixels=pixels)
    if draw(st.booleans()):
        ds.ReferencedImageSequence = Sequence([make_dataset()])
    data = to_part10(ds)
    targets = st.one_of(st.sampled_from(TARGETS), st.sampled_from(KEYS))
    for tag, vr in draw(st.lists(targets, min_size=1, max_size=5)):
        vr = draw(st.sampled_from([vr, vr, "UN", "OB", "UT", "IS", "DS", "UV", "FD"]))
        data += element(tag, vr, draw(VALUES))
    return data


def check_outcome(archive: Archive, data: bytes) -> bool:
    """Store and check the invariants; whether it was stored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = archive.store(data)
    db = archive.db
    if not outcome.ok:
        assert 0xC000 <= outcome.status <= 0xCFFF or 0xA900 <= outcome.status <= 0xA9FF, \
            outcome
        assert outcome.comment and len(outcome.comment) <= 64
        assert all(db[c].count_documents({}) == 0 for c in COLLECTIONS), outcome
        return False
    doc = db.instances.find_one({"_id": outcome.sop_instance_uid})
    assert doc is not None
    assert archive.files.read(doc["file_id"]) == data
    for collection in COLLECTIONS[:4]:
        for stored in db[collection].find():
            bson.encode(stored)  # MongoDB and FerretDB take it
            json.dumps(stored.get("dataset", {}), allow_nan=False)  # valid JSON
    assert consistency_problems(db) == []
    assert counter_problems(db) == []
    assert not archive.pending()
    return True


def base_files() -> list[tuple[str, bytes]]:
    encapsulated = image_dataset()
    encapsulated.PixelData = encapsulate([b"\xff\xd8" + bytes(300) + b"\xff\xd9"] * 2)
    encapsulated["PixelData"].VR = "OB"
    encapsulated["PixelData"].is_undefined_length = True
    nested = image_dataset(ReferencedImageSequence=Sequence([make_dataset()]))
    nested["ReferencedImageSequence"].is_undefined_length = True
    return [("explicit", to_part10(image_dataset())),
            ("implicit", to_part10(image_dataset(), ImplicitVRLittleEndian)),
            ("big-endian", to_part10(image_dataset(), ExplicitVRBigEndian)),
            ("encapsulated", to_part10(encapsulated, JPEGBaseline8Bit)),
            ("sequence", to_part10(nested, ExplicitVRLittleEndian))]


BASES = base_files()


def element_ends(data: bytes) -> set[int]:
    """Where pydicom says top-level elements of defined length end (file offsets)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(BytesIO(data))
    ends = {len(data)}
    for tag in list(ds.keys()):  # noqa: SIM118 - raw elements, unconverted
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF:
            ends.add(raw.value_tell + raw.length)
    return ends

"""Bulk data and frames of a stored instance, read out of its original Part-10 file.

The metadata documents refer to large binary values instead of holding them
(:mod:`archive.dicomjson`); DICOMweb clients then ask for those values, and above all
for the frames of the Pixel Data, one at a time (a viewer shows the first image of a
series before the last has arrived).  The file is read where the answer lies: the
header up to the Pixel Data, then the frame's bytes (native data: at their computed
offset; encapsulated: located by the offset tables, else by walking the fragments'
item headers), so a frame of a multi-frame image of a gigabyte costs the chunks that
hold it.  Values are answered as they are stored: a compressed frame stays compressed
(its transfer syntax travels with it); native values are given little endian, as
PS3.18 8.7.3.3.2 asks (a big-endian file's words are swapped).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames, get_frame
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
)

from archive import transcode

#: The attributes a frame is decoded with (PS3.3 C.7.6.3, palette included).
IMAGE_PIXEL = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored",
               "HighBit", "PixelRepresentation", "PhotometricInterpretation",
               "PlanarConfiguration", "RedPaletteColorLookupTableDescriptor",
               "GreenPaletteColorLookupTableDescriptor",
               "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
               "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData")
#: Values longer than this stay in the file while the header is parsed.
DEFER_SIZE = 64 * 1024
#: The Pixel Data elements: integer, float, double float (PS3.3 C.7.6.3).
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
#: Bytes per value of the binary VRs whose words a big-endian file stores swapped.
_WORD_SIZE = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}
_FLOATS = {"FL": "f", "FD": "d"}
_VRS_WITH_LONG_LENGTH = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC",
                         b"UN", b"UR", b"UT", b"UV"}


class NotFound(Exception):
    """What was asked for is not in the instance (a frame number past the last, a
    bulk data path that names no binary value); the message says which."""


class Frames:
    """The frames of one stored instance, read one at a time when asked.

    ``header``: the attributes before the Pixel Data; ``transfer_syntax``: what the
    frames read are in (Explicit VR Little Endian for native data, whatever it was
    stored in); ``count``: Number of Frames.
    """

    def __init__(self, fp: IO[bytes]) -> None:
        ds, stream, syntax, length, value_start, self._vr = _pixel_data(fp)
        self.header, self.count = ds, frame_count(ds)
        self._stream, self._length, self._start = stream, length, value_start
        self._stored = syntax
        self.encapsulated = syntax.is_encapsulated
        self.transfer_syntax = syntax if self.encapsulated else ExplicitVRLittleEndian
        if self.encapsulated and length != 0xFFFFFFFF:
            raise ValueError(f"Pixel Data of defined length in {syntax.name}, which "
                             "encapsulates it")

    def check(self, numbers: list[int]) -> None:
        """NotFound unless every number (1-based) names a frame of the instance."""
        for n in numbers:
            if not 1 <= n <= self.count:
                raise NotFound(f"frame {n}: the instance has {self.count} frame"
                               f"{'s' if self.count != 1 else ''}")

    def single(self, number: int) -> Dataset:
        """A one-frame dataset: the Image Pixel attributes around frame ``number`` in its
        transfer syntax (what a decoder needs, and no more is read)."""
        ds = Dataset()
        for keyword in IMAGE_PIXEL:
            if keyword in self.header:
                ds[keyword] = self.header[keyword]
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = self.transfer_syntax
        frame = self.read(number)
        ds.PixelData = encapsulate([frame]) if self.encapsulated else frame
        if self.encapsulated:
            ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
        elif ds.get("BitsAllocated") == 1:
            ds.NumberOfFrames = 1
        return ds

    def uncompressed(self, number: int) -> bytes:
        """Frame ``number`` in Explicit VR Little Endian: native data as :meth:`read`
        gives it, compressed data decoded (:mod:`archive.transcode`; Undecodable)."""
        if not self.encapsulated:
            return self.read(number)
        return transcode.uncompressed_frame(self.single(number), 0)

    def read(self, number: int) -> bytes:
        """Frame ``number`` (1-based, checked).  ValueError: the file is not what its
        header says."""
        ds, stream = self.header, self._stream
        if self.encapsulated:
            offsets = None
            if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
                offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
            stream.seek(self._start)
            return get_frame(stream, number - 1, extended_offsets=offsets,
                             number_of_frames=self.count)
        try:
            offset, size, bits = _native_slice(ds, number, self.count)
        except (AttributeError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise ValueError("the Image Pixel attributes are missing or malformed: "
                             f"{exc}") from None
        if offset + size > self._length:
            raise ValueError(f"frame {number}: the Pixel Data is shorter than its "
                             "attributes say")
        if self._stored == ExplicitVRBigEndian and self._vr == b"OW" \
                and int(ds.BitsAllocated) <= 8:
            # bytes stored in swapped pairs: read the words holding the frame
            start, end = offset & ~1, (offset + size + 1) & ~1
            words = self._read_at(start, end - start)
            return np.frombuffer(words, ">u2").astype("<u2").tobytes()[
                offset - start:offset - start + size]
        raw = self._read_at(offset, size)
        if bits:
            return _from_bits(raw, bits)
        return _little_endian(raw, ds, self._stored != ExplicitVRBigEndian)

    def _read_at(self, offset: int, size: int) -> bytes:
        self._stream.seek(self._start + offset)
        raw = self._stream.read(size)
        if len(raw) < size:
            raise ValueError("the Pixel Data is shorter than its attributes say")
        return raw


def _syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    return UID(str(getattr(meta, "TransferSyntaxUID", ExplicitVRLittleEndian)))


def frame_count(ds: Dataset) -> int:
    """Number of Frames, 1 when absent or not a positive integer."""
    try:
        count = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1
    return max(count, 1)


def _pixel_data(fp: IO[bytes]) -> tuple[Dataset, IO[bytes], UID, int, int, bytes]:
    """The header (all before the Pixel Data), the stream holding the Pixel Data (the
    file; for a deflated one, the inflated data set pydicom holds), the transfer
    syntax, the value length and offset, the VR (empty if implicit).  NotFound when
    there is no Pixel Data."""
    ds = dcmread(fp, stop_before_pixels=True, defer_size=DEFER_SIZE)
    syntax = _syntax(ds)
    stream = ds.buffer if syntax == DeflatedExplicitVRLittleEndian else fp
    start = stream.tell()
    header = stream.read(12)
    if len(header) < 8:
        raise NotFound("the instance has no Pixel Data")
    tag, length, value_start = _element_header(
        header, start, syntax != ExplicitVRBigEndian, syntax.is_implicit_VR)
    if tag not in PIXEL_TAGS:
        raise NotFound("the instance has no Pixel Data")
    vr = b"" if syntax.is_implicit_VR else header[4:6]
    return ds, stream, syntax, length, value_start, vr


def _element_header(header: bytes, start: int, little: bool, implicit: bool
                    ) -> tuple[int, int, int]:
    """Tag, value length and value offset of the element whose header is ``header``."""
    order = "<" if little else ">"
    group, element = struct.unpack(f"{order}HH", header[:4])
    tag = group << 16 | element
    if implicit:
        (length,) = struct.unpack(f"{order}L", header[4:8])
        return tag, length, start + 8
    if header[4:6] in _VRS_WITH_LONG_LENGTH:
        (length,) = struct.unpack(f"{order}L", header[8:12])
        return tag, length, start + 12
    (length,) = struct.unpack(f"{order}H", header[6:8])
    return tag, length, start + 8


def _native_slice(ds: Dataset, number: int, count: int) -> tuple[int, int, int]:
    """Byte offset and byte length of native frame ``number`` in the Pixel Data value,
    and for 1-bit data its bit offset and bit length packed in the third value (0: a
    whole number of bytes)."""
    if int(ds.BitsAllocated) == 1:
        bits = get_expected_length(ds, unit="pixels") // count * int(ds.SamplesPerPixel)
        first = (number - 1) * bits
        offset = first // 8
        size = -(-(first % 8 + bits) // 8)
        return offset, size, (first % 8) << 32 | bits
    size = get_expected_length(ds, unit="bytes") // count
    return (number - 1) * size, size, 0


def _from_bits(raw: bytes, packed: int) -> bytes:
    """1-bit pixels (first bit first, as DICOM packs them) re-packed from bit 0."""
    skip, bits = packed >> 32, packed & 0xFFFFFFFF
    unpacked = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")
    return np.packbits(unpacked[skip:skip + bits], bitorder="little").tobytes()


def _little_endian(raw: bytes, ds: Dataset, little: bool) -> bytes:
    if little or int(ds.BitsAllocated) <= 8:
        return raw
    width = int(ds.BitsAllocated) // 8
    return np.frombuffer(raw, f">u{width}").astype(f"<u{width}").tobytes()


# -- bulk data by path ----------------------------------------------------------------

Path = tuple[int, ...]


def parse_path(text: str) -> Path:
    """``"00431028"`` or ``"00540016/0/00181074"``: tags (8 hex digits) and item
    indexes (0-based) alternating, a tag last.  ValueError when malformed."""
    parts = text.strip("/").split("/")
    if len(parts) % 2 == 0 or len(parts) > 15:
        raise ValueError("a bulk data path is TAG or TAG/ITEM/TAG...")
    path = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if len(part) != 8 or not all(c in "0123456789abcdefABCDEF" for c in part):
                raise ValueError(f"{part[:20]!r} is not a tag (8 hex digits)")
            path.append(int(part, 16))
        else:
            if not part.isdigit() or len(part) > 6:
                raise ValueError(f"{part[:20]!r} is not an item index")
            path.append(int(part))
    return tuple(path)


def format_path(path: Path) -> str:
    return "/".join(f"{p:08X}" if i % 2 == 0 else str(p) for i, p in enumerate(path))


#: A part of a multipart answer: its bytes, or its bytes piece by piece.
Part = bytes | Iterator[bytes]
#: Bytes of a native Pixel Data value read at a time (even: 16-bit words stay whole).
CHUNK = 1 << 20


@dataclass(frozen=True)
class Bulk:
    """A bulk value: native bytes (one part), or the frames of encapsulated Pixel Data
    with their transfer syntax.  Pixel Data is read as it is sent, a frame or a
    :data:`CHUNK` at a time: a whole-slide image's must not be held in memory."""

    parts: Iterator[Part]
    transfer_syntax: UID | None = None


def read_bulk(fp: IO[bytes], path: Path) -> Bulk:
    """The value ``path`` names in the stored file.  NotFound: no such binary value."""
    if path == (0x7FE00010,):
        ds, stream, syntax, length, value_start, vr = _pixel_data(fp)
        if syntax.is_encapsulated:
            stream.seek(value_start)
            return Bulk(generate_frames(stream, number_of_frames=frame_count(ds)), syntax)
        swap = syntax == ExplicitVRBigEndian and vr == b"OW"
        return Bulk(iter([_chunks(stream, value_start, length, swap)]))
    ds = dcmread(fp, defer_size=DEFER_SIZE)
    little = _syntax(ds) != ExplicitVRBigEndian
    node: Any = ds
    for i, step in enumerate(path):
        if i % 2 == 0:
            if not isinstance(node, Dataset) or step not in node:
                raise NotFound(f"no {format_path(path[:i + 1])} in the instance")
            elem = node[step]
            node = elem
        else:
            items = node.value if isinstance(node, DataElement) and node.VR == "SQ" else None
            if items is None or step >= len(items):
                raise NotFound(f"no item {format_path(path[:i + 1])} in the instance")
            node = items[step]
    return Bulk(iter([_value_bytes(node, little)]))


def _chunks(stream: IO[bytes], start: int, length: int, swap: bool) -> Iterator[bytes]:
    """``length`` bytes from ``start``, :data:`CHUNK` at a time, as little-endian
    16-bit words when ``swap``."""
    stream.seek(start)
    left = length
    while left > 0:
        data = stream.read(min(CHUNK, left))
        if not data:
            raise EOFError(f"the Pixel Data value ends {left} bytes short")
        left -= len(data)
        yield np.frombuffer(data, ">u2").astype("<u2").tobytes() if swap else data


def _value_bytes(elem: DataElement, little: bool) -> bytes:
    """The element's value as PS3.18 sends bulk data: little-endian bytes."""
    if elem.VR in _FLOATS and not isinstance(elem.value, bytes):
        values = list(elem.value) if elem.VM > 1 else [elem.value]
        return struct.pack(f"<{len(values)}{_FLOATS[elem.VR]}", *values)
    value = elem.value
    if not isinstance(value, bytes | bytearray):
        raise NotFound(f"{elem.tag} is not a binary value")
    size = _WORD_SIZE.get(elem.VR, 1)
    if little or size == 1:
        return bytes(value)
    return np.frombuffer(value, f">u{size}").astype(f"<u{size}").tobytes()

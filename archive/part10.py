"""Is a Part-10 file whole?  A walk over its element headers, values unread.

pydicom reads a dataset cut short without a word: a value shorter than its declared
length comes back short (Pixel Data included), a missing sequence delimiter ends the
sequence, a partial element header ends the dataset.  Storing such a file would
acknowledge data the sender never finished sending, so :func:`check_complete` walks the
same structure pydicom reads -- the same encoding decisions, element by element -- and
requires that the buffer is consumed exactly and that every declared length (values,
sequences, items, encapsulated fragments) is satisfied.  Only headers are decoded:
values, Pixel Data included, are skipped by their length.

The file is a byte string or, for a dataset too large to hold in memory, a path: its
headers are then read piece by piece (:class:`_FileWalker`, a small window at a time),
so checking a file of gigabytes costs kilobytes of memory.  A deflated data set is
inflated in memory either way (pydicom does the same to read it).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

#: VRs with a 4-byte length in explicit VR (PS3.5 Table 7.1-1); the others have 2.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC",
                       b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD",
                        b"IS", b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM",
                        b"UI", b"UL", b"US"})
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
#: Deeper nesting is refused rather than walked (a hostile file could exhaust the stack).
MAX_DEPTH = 64
#: Bytes a :class:`_FileWalker` reads at a time: element headers are small and values
#: are skipped, so a small window wastes little when the walk jumps over a value.
WINDOW = 16 * 1024

#: A Part-10 file: its bytes, or the path of a file holding them.
Source = bytes | Path


class Incomplete(ValueError):
    """The file is cut short or a declared length is not satisfied; the message says
    where, in at most 64 characters (it becomes an Error Comment)."""


@dataclass(frozen=True)
class _Encoding:
    implicit: bool
    little: bool

    @property
    def endian(self) -> str:
        return "<" if self.little else ">"


def _name(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _is_sequence(tag: int) -> bool:
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


@dataclass(frozen=True)
class _Structs:
    """An element header's layouts in one byte order: implicit VR (tag, 4-byte length),
    explicit VR (tag, VR, 2-byte length), and a 4-byte length alone."""

    implicit: struct.Struct
    explicit: struct.Struct
    length: struct.Struct


#: little endian (True) or big endian (False) layouts, compiled once
_STRUCTS = {little: _Structs(struct.Struct(f"{e}HHL"), struct.Struct(f"{e}HH2sH"),
                             struct.Struct(f"{e}L"))
            for little, e in ((True, "<"), (False, ">"))}


class _Walker:
    """The walk over a byte string; positions are offsets into it."""

    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = buf

    def at(self, pos: int, size: int) -> tuple[bytes | memoryview, int]:
        """A buffer holding the ``size`` bytes from ``pos`` (fewer where the data ends),
        and where they start in it."""
        return self.buf, pos

    def slice(self, start: int, stop: int) -> bytes:
        return bytes(self.buf[start:stop])

    def find(self, marker: bytes, start: int, end: int) -> int:
        """Position of the first ``marker`` between ``start`` and ``end``, else -1."""
        found = bytes(self.buf[start:end]).find(marker)
        return found if found < 0 else start + found

    def _tag(self, pos: int, enc: _Encoding) -> int:
        buf, at = self.at(pos, 4)
        group, element = struct.unpack_from(enc.endian + "HH", buf, at)
        return group << 16 | element

    def header(self, pos: int, end: int, enc: _Encoding) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, length, value start) of the element at ``pos``, as
        pydicom's reader decodes it (an explicit VR that is no VR means implicit)."""
        if end - pos < 8:
            raise Incomplete(f"truncated: element header at byte {pos} cut short")
        buf, at = self.at(pos, 12)
        structs = _STRUCTS[enc.little]
        if enc.implicit:
            group, element, length = structs.implicit.unpack_from(buf, at)
            return group << 16 | element, None, length, pos + 8
        group, element, vr, length = structs.explicit.unpack_from(buf, at)
        tag = group << 16 | element
        if group == 0xFFFE:
            (length,) = structs.length.unpack_from(buf, at + 4)
            return tag, None, length, pos + 8
        if vr in _LONG_VRS:
            if end - pos < 12:
                raise Incomplete(f"truncated: {_name(tag)} header cut short")
            (length,) = structs.length.unpack_from(buf, at + 8)
            return tag, vr, length, pos + 12
        if vr not in _SHORT_VRS and not (b"AA" <= vr <= b"ZZ"):
            (length,) = structs.length.unpack_from(buf, at + 4)
            return tag, None, length, pos + 8  # pydicom: an implicit VR element
        return tag, vr, length, pos + 8

    def dataset(self, pos: int, end: int, enc: _Encoding, depth: int,
                in_item: bool = False, stop_group: int | None = None) -> int:
        """Walk elements from ``pos``; the position after the last one.

        ``in_item``: an item of undefined length, ended by an Item Delimitation Item.
        ``stop_group``: stop before the first element of another group (meta group).
        """
        if depth > MAX_DEPTH:
            raise Incomplete("sequences nested too deep")
        while pos < end:
            if stop_group is not None and (end - pos < 2 or struct.unpack_from(
                    "<H", *self.at(pos, 2))[0] != stop_group):
                return pos
            tag, vr, length, start = self.header(pos, end, enc)
            if tag == ITEM_END:
                return start
            pos = self.value(tag, vr, length, start, end, enc, depth)
        if in_item:
            raise Incomplete("truncated: a sequence item has no end")
        return pos

    def value(self, tag: int, vr: bytes | None, length: int, start: int, end: int,
              enc: _Encoding, depth: int) -> int:
        """Check one element's value; the position after it."""
        if length == UNDEFINED:
            if vr in (b"SQ", b"UN") or (vr is None and self._undefined_is_sequence(
                    tag, start, end, enc)):
                return self.items(tag, start, end, enc, depth, datasets=True)
            return self.items(tag, start, end, enc, depth, datasets=False)
        stop = start + length
        if stop > end:
            raise Incomplete(f"truncated: {_name(tag)} needs {length} bytes, "
                             f"{max(end - start, 0)} left")
        if vr == b"SQ" or (vr is None and _is_sequence(tag)):
            self.items(tag, start, stop, enc, depth, datasets=True, defined=True)
        return stop

    def _undefined_is_sequence(self, tag: int, start: int, end: int, enc: _Encoding) -> bool:
        if _is_sequence(tag):
            return True
        try:
            dictionary_VR(tag)
            return False
        except KeyError:  # pydicom looks ahead: items mean a sequence
            return end - start >= 4 and self._tag(start, enc) == ITEM

    def items(self, tag: int, pos: int, end: int, enc: _Encoding, depth: int,
              datasets: bool, defined: bool = False) -> int:
        """Walk the items of a sequence (``datasets``) or of encapsulated data."""
        while True:
            if defined and pos == end:
                return pos
            if end - pos < 8:
                raise Incomplete(f"truncated: {_name(tag)} has no end")
            buf, at = self.at(pos, 8)
            group, element, length = struct.unpack_from(enc.endian + "HHL", buf, at)
            item, start = group << 16 | element, pos + 8
            if item == SEQUENCE_END:
                return start
            if item != ITEM and not datasets:
                return self._delimiter(tag, pos, end, enc)
            # (pydicom reads whatever tag starts a sequence item as an Item: so does this)
            if length == UNDEFINED:
                if not datasets:
                    raise Incomplete(f"{_name(tag)}: a fragment has no length")
                pos = self.dataset(start, end, self._item_encoding(start, end, enc),
                                   depth + 1, in_item=True)
                continue
            stop = start + length
            if stop > end:
                raise Incomplete(f"truncated: item of {_name(tag)} needs {length} bytes")
            if datasets and self.dataset(start, stop, self._item_encoding(start, stop, enc),
                                         depth + 1) != stop:
                raise Incomplete(f"truncated: item of {_name(tag)} cut short")
            pos = stop

    def _item_encoding(self, pos: int, end: int, enc: _Encoding) -> _Encoding:
        """pydicom reads an item of an explicit VR dataset as implicit VR when its first
        element has no VR (PS3.5 6.2.2: UN sequences are implicit VR little endian)."""
        if enc.implicit or end - pos < 6:
            return enc
        buf, at = self.at(pos, 6)
        vr = buf[at + 4:at + 6]
        if 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B:
            return enc
        return _Encoding(True, enc.little)

    def _delimiter(self, tag: int, pos: int, end: int, enc: _Encoding) -> int:
        """An undefined length value that is no items: pydicom reads up to the
        Sequence Delimitation Item's bytes."""
        marker = struct.pack(enc.endian + "HHL", 0xFFFE, 0xE0DD, 0)
        found = self.find(marker, pos, end)
        if found < 0:
            raise Incomplete(f"truncated: {_name(tag)} has no end")
        return found + 8


class _FileWalker(_Walker):
    """The walk over a file, read a window at a time (never whole); positions are
    offsets from ``base`` in the file."""

    def __init__(self, fd: int, base: int = 0) -> None:
        super().__init__(b"")
        self.fd, self.base = fd, base
        self.start = 0  # the position self.buf begins at

    def at(self, pos: int, size: int) -> tuple[bytes | memoryview, int]:
        offset = pos - self.start
        if offset < 0 or offset + size > len(self.buf):
            self.buf = os.pread(self.fd, max(size, WINDOW), self.base + pos)
            self.start, offset = pos, 0
        return self.buf, offset

    def slice(self, start: int, stop: int) -> bytes:
        buf, at = self.at(start, stop - start)
        return bytes(buf[at:at + stop - start])

    def find(self, marker: bytes, start: int, end: int) -> int:
        overlap = len(marker) - 1
        pos = start
        while pos < end:
            chunk = os.pread(self.fd, min(1024 * 1024, end - pos), self.base + pos)
            if not chunk:
                return -1
            found = chunk.find(marker)
            if found >= 0 and pos + found + len(marker) <= end:
                return pos + found
            if pos + len(chunk) >= end:
                return -1
            pos += max(len(chunk) - overlap, 1)
        return -1


@contextmanager
def _opened(part10: Source) -> Iterator[tuple[_Walker, int]]:
    """A walker over the file's bytes and their number."""
    if not isinstance(part10, Path):
        yield _Walker(part10), len(part10)
        return
    fd = os.open(part10, os.O_RDONLY)
    try:
        yield _FileWalker(fd), os.fstat(fd).st_size
    finally:
        os.close(fd)


def check_complete(part10: Source, implicit: bool, little: bool, deflated: bool) -> None:
    """Raise :class:`Incomplete` unless every byte of the Part-10 file is accounted for.

    ``implicit``/``little``: the dataset's encoding as pydicom read it
    (``Dataset.original_encoding``); ``deflated``: its transfer syntax is deflated.
    """
    with _opened(part10) as (walker, size):
        meta = _Encoding(False, True)
        pos = walker.dataset(132, size, meta, 0, stop_group=0x0002)
        # Command set elements (group 0000), if any: always implicit VR little endian.
        pos = walker.dataset(pos, size, _Encoding(True, True), 0, stop_group=0x0000)
        if not deflated:
            if isinstance(walker, _FileWalker):
                body_walker: _Walker = _FileWalker(walker.fd, pos)
            else:
                body_walker = _Walker(memoryview(walker.buf)[pos:])
            body_walker.dataset(0, size - pos, _Encoding(implicit, little), 0)
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            body = inflater.decompress(walker.slice(pos, size))
        except zlib.error:
            raise Incomplete("deflated data set does not inflate") from None
        if not inflater.eof:
            raise Incomplete("truncated: the deflated data set ends early")
    _Walker(body).dataset(0, len(body), _Encoding(implicit, little), 0)


def check_bare(data: bytes, implicit: bool, little: bool) -> None:
    """:func:`check_complete` for a dataset without preamble nor meta group (older
    tools write them; ``archive import`` wraps them after this check)."""
    _Walker(data).dataset(0, len(data), _Encoding(implicit, little), 0)


def check(part10: Source, ds: Dataset | None) -> None:
    """:func:`check_complete` in the encoding pydicom read ``ds`` with; when pydicom
    could not read the file at all (``ds`` None), in the one its meta group names,
    so that a file cut short is reported as such rather than by pydicom's error.
    Without a readable meta group there is nothing to check against: no error."""
    if ds is not None:
        implicit, little = ds.original_encoding
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        check_complete(part10, bool(implicit), bool(little),
                       syntax == DeflatedExplicitVRLittleEndian)
        return
    syntax = meta_syntax(part10)
    if syntax is None:
        return
    check_complete(part10, syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian,
                   syntax == DeflatedExplicitVRLittleEndian)


def meta_end(part10: Source) -> int | None:
    """Where the dataset of a file with the ``DICM`` preamble starts: after its meta
    group elements, however many (none included); None when the group is cut short."""
    with _opened(part10) as (walker, size):
        try:
            return walker.dataset(132, size, _Encoding(False, True), 0, stop_group=0x0002)
        except Incomplete:
            return None


def meta_syntax(part10: Source) -> str | None:
    """Transfer Syntax UID (0002,0010) of the meta group, None if it has none readable."""
    return meta_uids(part10, 0x00020010).get(0x00020010)


def meta_uids(part10: Source, *tags: int) -> dict[int, str]:
    """The values of the meta group elements ``tags`` (UIDs: ASCII, padding stripped),
    read up to the last of them; those missing or unreadable left out."""
    found: dict[int, str] = {}
    with _opened(part10) as (walker, size):
        if size < 132 or walker.slice(128, 132) != b"DICM":
            return found
        meta, pos, last = _Encoding(False, True), 132, max(tags)
        try:
            while size - pos >= 8 and struct.unpack_from("<H", *walker.at(pos, 2))[0] == 2:
                tag, vr, length, start = walker.header(pos, size, meta)
                if length == UNDEFINED or start + length > size or tag > last:
                    break
                if tag in tags:
                    with suppress(UnicodeDecodeError):
                        found[tag] = walker.slice(start, start + length).decode(
                            "ascii").rstrip("\x00 ")
                pos = start + length
        except Incomplete:
            pass
    return found


def dataset_start(part10: Source) -> int:
    """Where the data set of a Part-10 file starts: after its meta group and any
    command set elements (what :func:`check_complete` skips too)."""
    with _opened(part10) as (walker, size):
        pos = walker.dataset(132, size, _Encoding(False, True), 0, stop_group=0x0002)
        return walker.dataset(pos, size, _Encoding(True, True), 0, stop_group=0x0000)


def top_level(data: Source, start: int, implicit: bool, little: bool
              ) -> Iterator[tuple[int, int, int]]:
    """(tag, start, end) of each top-level element of a data set that begins at
    ``start`` (not deflated), in file order: what a rewrite copies byte for byte."""
    with _opened(data) as (walker, size):
        enc = _Encoding(implicit, little)
        pos = start
        while pos < size:
            tag, vr, length, value_start = walker.header(pos, size, enc)
            end = walker.value(tag, vr, length, value_start, size, enc, 0)
            yield tag, pos, end
            pos = end

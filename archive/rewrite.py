"""Rewriting a stored Part-10 file with corrected attribute values.

A correction changes a few top-level attributes and nothing else: every other element
is copied byte for byte from the original (values, private elements, sequences of
undefined length, Pixel Data and its fragments), in the original transfer syntax; the
replaced elements are encoded in that syntax and the data set's character set; an item
is appended to the Original Attributes Sequence (0400,0561) holding the old values
(PS3.3 C.12.1.1.9.2), so the file itself says what changed, when and why.  The walk
over element headers is :func:`archive.part10.top_level`: only headers are decoded,
and a file on disk is read a window at a time (a deflated data set is inflated in
memory, as pydicom reads it).

Group Length elements (gggg,0000) of a group that changes are left out: they are
retired, and one that no longer adds up would mislead a reader.
"""

from __future__ import annotations

import datetime
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.valuerep import validate_value

from archive import part10

ORIGINAL_ATTRIBUTES = 0x04000561
#: Attributes a correction never changes: the keys of the hierarchy and of the file
#: (another UID is another object: send it as one), what decodes the other values,
#: and the record of corrections itself.
PROTECTED = frozenset({0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00080005,
                       ORIGINAL_ATTRIBUTES})
#: Value representations a correction may set from text.
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH",
                      "ST", "TM", "UC", "UR", "UT"})
#: What the Original Attributes Sequence says a correction was (PS3.3 C.12.1.1.9.2).
REASON = "CORRECT"


class BadChange(ValueError):
    """A change that cannot be applied; the message says which and why, on one line."""


def parse_change(text: str) -> DataElement:
    """``Keyword=value`` (or ``(gggg,eeee)=value``/``ggggeeee=value``) as the new element;
    an empty value sets the attribute empty (it stays, with zero length)."""
    name, sep, value = text.partition("=")
    if not sep:
        raise BadChange(f"{text!r}: expected Keyword=value")
    tag = _tag(name.strip())
    if tag is None:
        raise BadChange(f"{name!r} is neither a DICOM keyword nor a tag")
    keyword = keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    if tag in PROTECTED or tag >> 16 in (0x0000, 0x0002) or tag >> 16 >= 0x7FE0:
        raise BadChange(f"{keyword} cannot be changed (UIDs, the character set and the "
                        "file's own elements are kept: send a new object instead)")
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        raise BadChange(f"{keyword}: not in the DICOM dictionary (private)") from None
    if vr not in TEXT_VRS:
        raise BadChange(f"{keyword} ({vr}) cannot be set from text: only text values")
    for part in value.split("\\"):
        try:
            validate_value(vr, part, 2)  # pydicom: raise on an invalid value
        except ValueError as exc:
            raise BadChange(f"{keyword}: {exc}".splitlines()[0][:200]) from None
        if vr == "DA" and part and not _calendar_date(part):  # pydicom: 8 digits will do
            raise BadChange(f"{keyword}: {part!r} is not a date (YYYYMMDD)")
    return DataElement(tag, vr, value)


def _calendar_date(text: str) -> bool:
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return False
    return True


def _tag(name: str) -> int | None:
    text = name.strip("()").replace(",", "")
    if len(text) == 8:
        try:
            return int(text, 16)
        except ValueError:
            pass
    return tag_for_keyword(name)


def correction_item(old: Dataset, changes: dict[int, DataElement | None], when: str,
                    system: str) -> Dataset:
    """One item of the Original Attributes Sequence: the old values of what ``changes``
    replaces (empty for an attribute that was absent), when, by what, why."""
    modified = Dataset()
    for tag in sorted(changes):
        if tag in old:
            modified.add(old[tag])
        else:
            modified.add(DataElement(tag, dictionary_VR(tag), None))
    item = Dataset()
    item.AttributeModificationDateTime = when
    item.ModifyingSystem = system[:64]
    item.SourceOfPreviousValues = ""
    item.ReasonForTheAttributeModification = REASON
    item.ModifiedAttributesSequence = Sequence([modified])
    return item


def rewrite(source: Path, out: BinaryIO, changes: dict[int, DataElement | None],
            system: str, when: str) -> tuple[Dataset, dict[int, DataElement | None]]:
    """Write to ``out`` the Part-10 file ``source`` with ``changes`` applied (None:
    the attribute removed) and the correction recorded.  Answers the original's data
    set as pydicom read it (values of 64 KiB and more left in the file) and the changes
    that change something (a value it already has, or the removal of an attribute it
    lacks, is left out of the file and of the record).

    Raises BadChange when a new value cannot be encoded in the data set's character set.
    """
    syntax = part10.meta_syntax(source)
    deflated = syntax == DeflatedExplicitVRLittleEndian
    old = dcmread(str(source), defer_size=None if deflated else 64 * 1024)
    implicit, little = (bool(x) for x in old.original_encoding)
    encodings = old._character_set
    changes = {tag: elem for tag, elem in changes.items() if _changes(old, tag, elem)}
    if str(old.get("SpecificCharacterSet") or "ISO_IR 6").strip() in ("", "ISO_IR 6"):
        for elem in changes.values():  # the default repertoire: ASCII only
            if elem is not None and elem.VR in _CHARSET_VRS and \
                    not text_of(elem.value).isascii():
                raise BadChange(f"{elem.keyword}: {text_of(elem.value)!r} is not "
                                f"ASCII, and instance {old.get('SOPInstanceUID')} "
                                "declares no Specific Character Set")
    history = Dataset()
    previous = old.get(ORIGINAL_ATTRIBUTES)
    items = list(previous.value) if previous is not None and previous.VR == "SQ" else []
    history.OriginalAttributesSequence = Sequence(
        [*items, correction_item(old, changes, when, system)])
    new: dict[int, bytes | None] = {
        tag: None if elem is None else _encode(elem, implicit, little, encodings)
        for tag, elem in changes.items()}
    new[ORIGINAL_ATTRIBUTES] = _encode(history[ORIGINAL_ATTRIBUTES], implicit, little,
                                       encodings)
    groups = {tag >> 16 for tag in new}
    start = part10.dataset_start(source)
    with open(source, "rb") as fh:
        _copy(fh, out, 0, start)
        if not deflated:
            for piece in _spliced(part10.top_level(source, start, implicit, little), new,
                                  groups):
                if isinstance(piece, bytes):
                    out.write(piece)
                else:
                    _copy(fh, out, *piece)
            return old, changes
        fh.seek(start)
        body = zlib.decompress(fh.read(), -zlib.MAX_WBITS)
    spliced = bytearray()
    for piece in _spliced(part10.top_level(body, 0, implicit, little), new, groups):
        spliced += piece if isinstance(piece, bytes) else body[piece[0]:piece[1]]
    deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
    out.write(deflater.compress(bytes(spliced)) + deflater.flush())
    return old, changes


#: VRs whose values the Specific Character Set decodes.
_CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})


def text_of(value: Any) -> str:
    """A value as DICOM text (multiple values joined by backslashes)."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return str(value)


def _changes(old: Dataset, tag: int, elem: DataElement | None) -> bool:
    if tag not in old:
        return elem is not None
    if elem is None:
        return True
    before = old[tag]
    return before.VR != elem.VR or before.to_json_dict(None, 1 << 30) != \
        elem.to_json_dict(None, 1 << 30)


def _spliced(elements: Iterator[tuple[int, int, int]], new: dict[int, bytes | None],
             groups: set[int]) -> Iterator[bytes | tuple[int, int]]:
    """The new data set as pieces: encoded elements, and (start, end) spans to copy."""
    pending = sorted(new)
    for tag, start, end in elements:
        while pending and pending[0] < tag:
            encoded = new[pending.pop(0)]
            if encoded:
                yield encoded
        if pending and pending[0] == tag:
            encoded = new[pending.pop(0)]
            if encoded:
                yield encoded
            continue
        if tag & 0xFFFF == 0 and tag >> 16 in groups:
            continue  # a Group Length that would no longer add up
        yield start, end
    for tag in pending:
        encoded = new[tag]
        if encoded:
            yield encoded


def _encode(elem: DataElement, implicit: bool, little: bool, encodings: list[str]) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    write_data_element(fp, elem, encodings)
    return fp.getvalue()


def _copy(fh: BinaryIO, out: BinaryIO, start: int, end: int) -> None:
    fh.seek(start)
    remaining = end - start
    while remaining > 0:
        block = fh.read(min(remaining, 1024 * 1024))
        if not block:
            raise part10.Incomplete("the original ends early")
        out.write(block)
        remaining -= len(block)


"""C-FIND answer values encoded straight from DICOM JSON, as pydicom would write them.

Why: an answer built the plain way (:meth:`archive.find.Finder.reference_response`:
``Dataset.from_json`` per key, then pydicom's writer re-encoding each value in
pynetdicom) cost 3-5 ms of the node's CPU per answer, ten times the database's share.
Here each value of a common form is turned once into the bytes pydicom's writer gives
for it (same padding, same character set encoder), kept as a ``RawDataElement`` that the
writer copies as it is when the answer is marked with the association's encoding.

An answer made only of such elements (:class:`Answer`) is then written by the DICOM
front end (:mod:`archive.dimse.answer_writer`) -- the tag, VR and length headers
pydicom's writer puts before each value -- instead of pydicom's ``write_dataset`` and
its per-element buffers.

Every function answers None for what it is not sure to encode exactly as pydicom does
(a bulk or inline binary value, nulls among values, a DS, a sequence, ...): the caller
then builds that element, or the whole answer, the reference way.
tests/unit/test_answers.py compares both ways byte for byte.
"""

from __future__ import annotations

import functools
from typing import Any

from pydicom import config
from pydicom.charset import convert_encodings, default_encoding, encode_string
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.valuerep import _encode_personname

#: (implicit VR, little endian) of the presentation context an answer is sent on.
Syntax = tuple[bool, bool]

#: Written by pydicom with the default character repertoire (``write_string``, padded
#: with a space), whatever the Specific Character Set.
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UR"})
#: Written with the Specific Character Set (``write_text``), padded with a space.
_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})
#: pydicom parses these as dates and times when ``config.datetime_conversion`` is on:
#: then they are left to it.
_DATETIME_VRS = frozenset({"DA", "DT", "TM"})
#: Every VR :func:`plain_values` handles.
VRS = _ASCII_VRS | _TEXT_VRS | {"UI", "PN", "IS"}
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def plain_values(vr: str | None, element: Any) -> list[str] | None:
    """The values of a DICOM JSON element as the strings pydicom holds for them after
    ``from_json`` (a PN as ``"Alphabetic=Ideographic=Phonetic"``, an IS as its digits,
    a UI stripped); ``[]`` when empty; None for a form left to pydicom."""
    if vr not in VRS or not isinstance(element, dict):
        return None
    if vr in _DATETIME_VRS and config.datetime_conversion:
        return None
    if len(element) > 2 or any(k not in ("vr", "Value") for k in element):
        return None  # BulkDataURI, InlineBinary, unknown members
    values = element.get("Value")
    if values is None or values == []:
        return []
    if not isinstance(values, list):
        return None
    if vr == "PN":
        names = [_person_name(v) for v in values]
        return None if None in names else names  # type: ignore[return-value]
    if vr == "IS":
        if not all(type(v) is int for v in values):
            return None
        return [str(v) for v in values]
    if not all(type(v) is str for v in values):
        return None  # nulls among several values, numbers: pydicom's own rules
    if vr == "UI":
        if any("\\" in v for v in values):
            return None  # pydicom splits such a value before stripping each part
        return [v.strip() for v in values]
    return values


def _person_name(value: Any) -> str | None:
    """pydicom's ``get_pn_element_value``: the groups joined by ``=``, up to the last
    one present (an empty group that is present is kept)."""
    if not isinstance(value, dict) or any(k not in _PN_GROUPS or type(v) is not str
                                          for k, v in value.items()):
        return None
    if "Phonetic" in value:
        count = 3
    elif "Ideographic" in value:
        count = 2
    else:
        count = 1
    return "=".join(value.get(group, "") for group in _PN_GROUPS[:count])


@functools.lru_cache(maxsize=64)
def encodings(charset: str | None) -> tuple[str, ...]:
    """Python encodings pydicom's writer uses for an answer's Specific Character Set
    value (one term; None or "" for none)."""
    return tuple(convert_encodings([charset] if charset else [default_encoding]))


def encode(vr: str, values: list[str], python_encodings: tuple[str, ...]) -> bytes | None:
    """The value field pydicom writes for ``values`` (from :func:`plain_values`); None
    when pydicom's writer would fail (a non-Latin-1 character in a CS, ...)."""
    if not values:
        return b""
    try:
        if vr in _ASCII_VRS or vr == "IS":
            text = "\\".join(values)
            return (text + " " if len(text) % 2 else text).encode("latin_1")
        if vr == "UI":
            text = "\\".join(values)
            return (text + "\0" if len(text) % 2 else text).encode("latin_1")
        codecs = list(python_encodings)
        if vr == "PN":
            data = b"\\".join(_encode_personname(v.split("="), codecs) for v in values)
        else:
            data = b"\\".join(encode_string(v, codecs) for v in values)
    except UnicodeError:
        return None
    return data + b" " if len(data) % 2 else data


def raw_element(tag: int, vr: str, value: bytes, syntax: Syntax) -> RawDataElement:
    """An element pydicom's writer copies as it is into a dataset of ``syntax``."""
    return RawDataElement(Tag(tag), vr, len(value), value, 0, syntax[0], syntax[1])


class Answer(Dataset):
    """A C-FIND answer built by ``Finder._fast_response``: the DICOM front end writes it
    itself when all its elements are raw ones of the syntax it is sent with."""

    def put(self, elem: RawDataElement) -> None:
        """Add a raw element of a public tag as it is.  ``Dataset.__setitem__`` checks,
        for each, what :func:`raw_element` made sure of (a tag, not private, not pixel
        data): a quarter of the time of a small C-FIND's answers."""
        if elem.tag.is_private or elem.tag >= 0x7FE00000:
            self[elem.tag] = elem
        else:
            self._dict[elem.tag] = elem


@functools.lru_cache(maxsize=64)
def _dataset_charset(charset: str) -> tuple[str, ...] | str:
    probe = Dataset()
    probe.SpecificCharacterSet = charset
    found = probe._character_set
    return tuple(found) if isinstance(found, list) else found


def dataset_charset(charset: str) -> list[str] | str:
    """``Dataset._character_set`` of an answer whose Specific Character Set is
    ``charset`` (one term or ""), which its original encoding must equal for pydicom's
    writer to copy raw elements."""
    found = _dataset_charset(charset)
    return list(found) if isinstance(found, tuple) else found

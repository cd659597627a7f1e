"""DICOM JSON (PS3.18 Annex F) conversion of stored datasets.

Bulk data (Pixel Data, waveforms, large binary values) is not inlined: it is referred
to by a ``BulkDataURI`` naming the GridFS file that holds the original and the tag,
so the metadata documents stay small and the original bytes stay the single copy.

A dataset read from a file with ``defer_size`` (a large instance, see
:meth:`archive.storage.Archive.parse`) leaves its large values in the file: a binary one
becomes its ``BulkDataURI`` without being read, any other is read when converted
(:func:`_deferred`), so the JSON is the same as from the dataset read whole.
"""

from __future__ import annotations

import base64
import functools
import logging
import math
import re
import struct
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_deferred_data_element
from pydicom.filewriter import correct_ambiguous_vr_element
from pydicom.hooks import hooks

log = logging.getLogger(__name__)

#: Binary values longer than this many bytes are referred to, not inlined.
BULK_DATA_THRESHOLD = 1024
#: The same threshold as pydicom applies it: to the base64 text of the value.
_BASE64_THRESHOLD = 4 * -(-BULK_DATA_THRESHOLD // 3)

_INTEGER_STRING = re.compile(r"\s*[+-]?\d+\s*")
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
             "UC", "UI", "UR", "UT"}

_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"}


def bulk_data_uri(file_id: Any, tag: int) -> str:
    """URI of one bulk value: the GridFS file of the original and the element's tag."""
    return f"gridfs:{file_id}#{tag:08X}"


def _fallback(elem: DataElement | None, raw: Any = None) -> dict[str, Any]:
    """JSON for an element pydicom cannot render: its raw bytes as InlineBinary.

    Real-world data carries malformed values (an IS with a decimal point, bad
    character sets); one bad element must not cost the whole instance its metadata.
    """
    value = elem.value if elem is not None else b""
    if isinstance(raw, bytes):
        pass
    elif isinstance(value, bytes) or elem is None:
        raw = value
    else:
        values = value if elem.VM > 1 else [value]
        raw = "\\".join(str(getattr(v, "original_string", None) or v) for v in values
                         ).encode("utf-8", "replace")
    return {"vr": "UN", "InlineBinary": base64.b64encode(raw).decode("ascii")}


def to_json(ds: Dataset, file_id: Any) -> dict[str, Any]:
    """The dataset (without file meta) as a DICOM JSON object.

    Whatever the dataset, the result is valid DICOM JSON that BSON (MongoDB, FerretDB)
    stores as is: every value is checked (:func:`_element`), sequence items included.

    Elements still in their raw form with a common VR are converted straight from
    their bytes (:class:`_RawConverter`: one walk, several times cheaper than pydicom's
    element objects); the others -- and any value the fast path is not sure of -- go
    through pydicom, with the same result (tests/unit/test_dicomjson.py compares both).
    """

    def handler(elem: DataElement) -> str:
        return bulk_data_uri(file_id, elem.tag)

    fast = _RawConverter.for_dataset(ds, file_id)
    result: dict[str, Any] = {}
    elements = ds._dict  # tag -> RawDataElement (as read) or DataElement
    for tag in sorted(elements, key=int):  # (int: pydicom's Tag compares in Python)
        if tag >> 16 == 0x0002:
            continue
        raw = elements[tag]
        key = f"{tag:08X}"
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            bulk = _deferred_bulk(ds, raw, file_id)
            if bulk is not None:
                result[key] = bulk
                continue
            raw = _deferred(ds, raw)
        if fast is not None and isinstance(raw, RawDataElement):
            converted = fast.convert(raw)
            if converted is not None:
                result[key] = converted
                continue
        elem = None
        try:
            elem = ds[tag]
            result[key] = _element(elem, file_id, handler)
        except Exception as exc:  # noqa: BLE001 - any decoding failure of one element
            log.warning("element %s not convertible to JSON (%s); kept as bytes", key, exc)
            result[key] = _fallback(elem, getattr(raw, "value", None))
    return result


#: VRs whose values, above the threshold, are always bulk data.
_BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
#: The smallest ``defer_size`` a dataset given to :func:`to_json` may be read with: a
#: deferred value of undefined length is then known to be longer than the threshold
#: (pydicom defers it from ``defer_size`` bytes on, item headers and delimiter included).
MIN_DEFER_SIZE = BULK_DATA_THRESHOLD + 16


class _Length:
    """Stands for a deferred value where pydicom's VR lookup asks only its length."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length


def _deferred_bulk(ds: Dataset, raw: RawDataElement, file_id: Any) -> dict[str, Any] | None:
    """The JSON of a value left in the file when it is bulk data, without reading it.

    The VR is found as pydicom finds it when it reads the element (its VR hook: the
    dictionary for implicit VR, a known private creator's, UN kept for a long value;
    then the correction of an ambiguous OB or OW from the dataset's attributes), so
    the answer is the one the element read whole would give.  None: read the value.
    """
    if raw.length != 0xFFFFFFFF and raw.length <= BULK_DATA_THRESHOLD:
        return None
    try:
        found: dict[str, Any] = {}
        hooks.raw_element_vr(raw._replace(value=_Length(raw.length)), found, ds=ds)
        vr = found["VR"]
        if vr == "OB or OW":
            elem = DataElement(raw.tag, vr, b"", is_undefined_length=raw.length == 0xFFFFFFFF)
            vr = correct_ambiguous_vr_element(elem, ds, raw.is_little_endian).VR
    except Exception:  # noqa: BLE001 - whatever pydicom would fail on: read the value
        return None
    if vr not in _BULK_VRS:
        return None
    return {"vr": vr, "BulkDataURI": bulk_data_uri(file_id, raw.tag)}


def _deferred(ds: Dataset, raw: RawDataElement) -> RawDataElement:
    """The element with its value read from the file, kept in ``ds`` as pydicom keeps
    what it reads.  A file that cannot be read again raises (OSError): the store fails
    rather than describe a value it never saw."""
    read = read_deferred_data_element(ds.fileobj_type, ds.filename or ds.buffer,
                                      ds.timestamp, raw)
    ds._dict[raw.tag] = read
    return read


#: Largest integer every JSON reader holds exactly (an IEEE 754 double: 2^53 - 1).
MAX_EXACT_INTEGER = 2**53 - 1
_INT64 = (-(2**63), 2**63 - 1)
_IS_RANGE = (-(2**31), 2**31 - 1)  # PS3.5 Table 6.2-1


def _element(elem: DataElement, file_id: Any, handler: Any) -> dict[str, Any]:
    """One element as DICOM JSON; ValueError when its value has no faithful form."""
    if elem.VR == "SQ":
        return {"vr": "SQ", "Value": [to_json(item, file_id) for item in (elem.value or [])]}
    if elem.VR in _BINARY_VRS and elem.value is not None and \
            len(elem.value) > BULK_DATA_THRESHOLD:
        return {"vr": _binary_vr(elem), "BulkDataURI": handler(elem)}
    if elem.VR == "IS" and not _valid_integers(elem):
        raise ValueError("IS value is not an integer of -2^31..2^31-1")
    element = _nulls_for_empty(elem.to_json_dict(handler, _BASE64_THRESHOLD))
    values = element.get("Value") or []
    finite = all(math.isfinite(v) for v in values if isinstance(v, float))
    if elem.VR == "DS" and not finite:
        raise ValueError("DS value is not a finite number")
    if elem.VR in ("FL", "FD") and not finite:
        # PS3.18 F.2.3: FL and FD are JSON Numbers, and JSON has no NaN nor infinity
        # (RFC 8259 section 6).  F.2.2 allows a BulkDataURI for FL and FD: the value
        # stays in the original file, which the URI names.
        return {"vr": elem.VR, "BulkDataURI": handler(elem)}
    if elem.VR in ("SV", "UV") and any(isinstance(v, int) and abs(v) > MAX_EXACT_INTEGER
                                       for v in values):
        # PS3.18 F.2.3, note to Table F.2.3-1: SV and UV may be JSON Strings, to keep
        # values that a JSON Number (an IEEE double) would round and BSON's int64 lacks.
        element["Value"] = [None if v is None else str(v) for v in values]
    if not _storable(element):
        raise ValueError("a value JSON or BSON cannot hold")
    return element


def _storable(value: Any) -> bool:
    """Whether BSON and JSON hold ``value`` exactly: finite floats, 64-bit integers,
    text that encodes as UTF-8 (no lone surrogates), keys without NUL."""
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return _INT64[0] <= value <= _INT64[1]
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, list):
        return all(_storable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and "\x00" not in k and _storable(k) and _storable(v)
                   for k, v in value.items())
    return False


def _valid_integers(elem: DataElement) -> bool:
    """pydicom reads an IS of "1.5" as 1 and a 23-digit one through a float: such
    values, and those outside the IS range, are kept as bytes, never altered."""
    values = elem.value if elem.VM > 1 else [elem.value]
    for v in values:
        if v is None or v == "":
            continue
        text = str(getattr(v, "original_string", None) or v)
        if not _INTEGER_STRING.fullmatch(text) or \
                not _IS_RANGE[0] <= int(text) <= _IS_RANGE[1]:
            return False
    return True


def _nulls_for_empty(element: dict[str, Any]) -> dict[str, Any]:
    """PS3.18 F.2.5: an empty value among several is null, not an empty string."""
    values = element.get("Value")
    if not values:
        return element
    if element.get("vr") == "SQ":
        for item in values:
            for sub in item.values():
                _nulls_for_empty(sub)
    elif element.get("vr") in _TEXT_VRS and len(values) > 1:
        element["Value"] = [None if v == "" else v for v in values]
    return element


def _binary_vr(elem: DataElement) -> str:
    vr = str(elem.VR)
    if vr in ("OB or OW", "US or OW"):
        return "OW"
    return vr


def from_json(data: dict[str, Any]) -> Dataset:
    """A pydicom Dataset from DICOM JSON; bulk data comes back empty."""
    return Dataset.from_json(data, bulk_data_uri_handler=lambda *_: b"")


# --- the fast path: raw elements straight to DICOM JSON ---------------------------------

#: VRs whose values pydicom decodes as ASCII/Latin-1 whatever the character set.
_DEFAULT_TEXT = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR"})
#: VRs decoded with the dataset's character set, one value per backslash ...
_MULTI_TEXT = frozenset({"SH", "LO", "UC"})
#: ... and as one value whatever it holds.
_SINGLE_TEXT = frozenset({"LT", "ST", "UT"})
_NUMBERS = {"US": ("H", 2), "SS": ("h", 2), "UL": ("I", 4), "SL": ("i", 4),
            "UV": ("Q", 8), "SV": ("q", 8), "FL": ("f", 4), "FD": ("d", 8)}
#: (UN is left to pydicom, which replaces it with a known tag's dictionary VR.)
_RAW_BINARY = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})


class _RawConverter:
    """Converts raw elements of one little endian dataset with a simple character set.

    :meth:`convert` answers None whenever pydicom's own conversion should decide (a VR
    it does not handle, a value it is not sure to render exactly as pydicom does), so
    the result never differs from the slow path's.
    """

    def __init__(self, codec: str, file_id: Any) -> None:
        self.codec = codec
        self.file_id = file_id

    @classmethod
    def for_dataset(cls, ds: Dataset, file_id: Any) -> _RawConverter | None:
        if not getattr(ds, "is_little_endian", True):
            return None
        try:
            encodings = ds._character_set
        except Exception:  # noqa: BLE001 - an unusable Specific Character Set
            return None
        if isinstance(encodings, str):  # no Specific Character Set: pydicom's default
            encodings = [encodings]
        if len(encodings) != 1:
            return None
        return cls(encodings[0], file_id)

    def convert(self, raw: RawDataElement) -> dict[str, Any] | None:
        vr = raw.VR
        if vr is None:  # implicit VR: the dictionary's, when it is unambiguous
            vr = _dictionary_vr(raw.tag)
            if vr is None:
                return None
        value = raw.value
        if value is None:
            value = b""
        if not isinstance(value, bytes | bytearray):
            return None
        try:
            if vr in _DEFAULT_TEXT:
                return self._text(vr, value.decode("latin_1"))
            if vr in _MULTI_TEXT or vr in _SINGLE_TEXT or vr == "PN":
                if b"\x1b" in value:  # ISO 2022 escapes: pydicom decodes those
                    return None
                if vr == "PN":
                    value = value.rstrip(b"\x00 ")
                return self._text(vr, value.decode(self.codec))
            if vr == "IS" or vr == "DS":
                return self._numbers(vr, value.decode("latin_1"))
            if vr in _NUMBERS:
                return self._binary_numbers(raw.tag, vr, value)
            if vr == "AT":
                return self._tags(value)
            if vr in _RAW_BINARY:
                return self._binary(raw.tag, vr, value)
        except (UnicodeDecodeError, ValueError):
            return None
        return None

    @staticmethod
    def _text(vr: str, text: str) -> dict[str, Any] | None:
        """pydicom's rules per VR (values.py): which padding each strips, and where."""
        if vr in _SINGLE_TEXT:
            items = [text.rstrip("\0 ")]
        elif vr == "UR":
            items = [text.rstrip()]
        elif vr == "AE":
            items = [i.strip() for i in text.split("\\")]
        elif vr in _MULTI_TEXT:
            items = [i.rstrip("\0 ") for i in text.split("\\")]
        elif vr == "PN":
            values = text.split("\\")
            if any(v.count("=") > 2 for v in values):
                return None  # more than three component groups: pydicom decides
            names = [_person_name(v) for v in values]
            if len(names) > 1 and {} in names:
                return None  # an empty name among several: pydicom fails, let it decide
            return {"vr": vr} if names == [{}] else {"vr": vr, "Value": names}
        elif vr == "UI":  # (pydicom's UID strips each value)
            items = [i.strip() for i in text.rstrip("\0 ").split("\\")]
        else:  # AS, CS, DA, DT, TM
            items = text.rstrip(" \x00").split("\\")
        if items == [""]:
            return {"vr": vr}
        if len(items) > 1:
            return {"vr": vr, "Value": [i if i else None for i in items]}
        return {"vr": vr, "Value": items}

    @staticmethod
    def _numbers(vr: str, text: str) -> dict[str, Any] | None:
        if "\x00" in text.rstrip(" \x00"):  # a NUL that is not padding: pydicom decides
            return None
        items = text.strip(" \x00").split("\\")
        if items == [""]:
            return {"vr": vr}
        items = [i.strip(" \x00") for i in items]
        if "" in items:
            return None
        if vr == "IS":
            if not all(_INTEGER_STRING.fullmatch(i) for i in items):
                return None
            values: list[Any] = [int(i) for i in items]
            if not all(_IS_RANGE[0] <= v <= _IS_RANGE[1] for v in values):
                return None
            return {"vr": vr, "Value": values}
        if not all(_DECIMAL_STRING.fullmatch(i) for i in items):
            return None
        values = [float(i) for i in items]
        if not all(math.isfinite(v) for v in values):
            return None
        return {"vr": vr, "Value": values}

    def _binary_numbers(self, tag: int, vr: str, value: bytes) -> dict[str, Any] | None:
        code, size = _NUMBERS[vr]
        if len(value) % size:
            return None
        if not value:
            return {"vr": vr}
        values = list(struct.unpack(f"<{len(value) // size}{code}", value))
        if vr in ("FL", "FD"):
            if not all(math.isfinite(v) for v in values):
                return {"vr": vr, "BulkDataURI": bulk_data_uri(self.file_id, tag)}
            return {"vr": vr, "Value": values}
        if vr in ("UV", "SV") and any(abs(v) > MAX_EXACT_INTEGER for v in values):
            return {"vr": vr, "Value": [str(v) for v in values]}
        return {"vr": vr, "Value": values}

    @staticmethod
    def _tags(value: bytes) -> dict[str, Any] | None:
        if len(value) % 4:
            return None
        if not value:
            return {"vr": "AT"}
        words = struct.unpack(f"<{len(value) // 2}H", value)
        return {"vr": "AT", "Value": [f"{words[i]:04X}{words[i + 1]:04X}"
                                      for i in range(0, len(words), 2)]}

    def _binary(self, tag: int, vr: str, value: bytes) -> dict[str, Any]:
        if len(value) > BULK_DATA_THRESHOLD:
            return {"vr": vr, "BulkDataURI": bulk_data_uri(self.file_id, tag)}
        if not value:
            return {"vr": vr}
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}


_DECIMAL_STRING = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def _person_name(text: str) -> dict[str, str]:
    """A PN value's groups as pydicom's JSON gives them: trailing empty groups left out,
    inner ones kept (``A^B==X`` has an empty Ideographic)."""
    groups = text.split("=")[:3]
    while groups and not groups[-1]:
        groups.pop()
    return dict(zip(_PN_GROUPS, groups, strict=False))


@functools.lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str | None:
    """The dictionary VR of a public tag, None when unknown, private or ambiguous."""
    if (tag >> 16) % 2:
        return None
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return None if " or " in vr or vr in ("SQ", "xs", "ox") else vr

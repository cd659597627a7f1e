"""DICOM JSON (PS3.18 Annex F) conversion of stored datasets.

Bulk data (Pixel Data, waveforms, large binary values) is not inlined: it is referred
to by a ``BulkDataURI`` naming the GridFS file that holds the original and the tag,
so the metadata documents stay small and the original bytes stay the single copy.
"""

from __future__ import annotations

import base64
import logging
import math
import re
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

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
    """

    def handler(elem: DataElement) -> str:
        return bulk_data_uri(file_id, elem.tag)

    result: dict[str, Any] = {}
    for tag in list(ds.keys()):
        if tag.group == 0x0002:
            continue
        raw = ds.get_item(tag)  # the bytes as read, before pydicom converts them
        key = f"{tag:08X}"
        elem = None
        try:
            elem = ds[tag]
            result[key] = _element(elem, file_id, handler)
        except Exception as exc:  # noqa: BLE001 - any decoding failure of one element
            log.warning("element %s not convertible to JSON (%s); kept as bytes", key, exc)
            result[key] = _fallback(elem, getattr(raw, "value", None))
    return result


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

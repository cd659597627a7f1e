"""DICOM JSON (PS3.18 Annex F) conversion of stored datasets.

Bulk data (Pixel Data, waveforms, large binary values) is not inlined: it is referred
to by a ``BulkDataURI`` naming the GridFS file that holds the original and the tag,
so the metadata documents stay small and the original bytes stay the single copy.
"""

from __future__ import annotations

import base64
import logging
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
    """The dataset (without file meta) as a DICOM JSON object."""

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
            if elem.VR in _BINARY_VRS and elem.value is not None and \
                    len(elem.value) > BULK_DATA_THRESHOLD:
                result[key] = {"vr": _binary_vr(elem), "BulkDataURI": handler(elem)}
                continue
            if elem.VR == "IS" and not _valid_integers(elem):
                raise ValueError("IS value is not an integer")
            result[key] = _nulls_for_empty(elem.to_json_dict(handler, _BASE64_THRESHOLD))
        except Exception as exc:  # noqa: BLE001 - any decoding failure of one element
            log.warning("element %s not convertible to JSON (%s); kept as bytes", key, exc)
            result[key] = _fallback(elem, getattr(raw, "value", None))
    return result


def _valid_integers(elem: DataElement) -> bool:
    """pydicom reads an IS of "1.5" as 1: such a value is kept as bytes, not truncated."""
    values = elem.value if elem.VM > 1 else [elem.value]
    return all(v is None or v == "" or _INTEGER_STRING.fullmatch(
        str(getattr(v, "original_string", None) or v)) for v in values)


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

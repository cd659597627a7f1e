"""DICOM JSON (PS3.18 Annex F) conversion of stored datasets.

Bulk data (Pixel Data, waveforms, large binary values) is not inlined: it is referred
to by a ``BulkDataURI`` naming the GridFS file that holds the original and the tag,
so the metadata documents stay small and the original bytes stay the single copy.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

#: Binary values longer than this many bytes are referred to, not inlined.
BULK_DATA_THRESHOLD = 1024

_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"}


def bulk_data_uri(file_id: Any, tag: int) -> str:
    """URI of one bulk value: the GridFS file of the original and the element's tag."""
    return f"gridfs:{file_id}#{tag:08X}"


def _fallback(elem: DataElement) -> dict[str, Any]:
    """JSON for an element pydicom cannot render: its raw bytes as InlineBinary.

    Real-world data carries malformed values (an IS with a decimal point, bad
    character sets); one bad element must not cost the whole instance its metadata.
    """
    value = elem.value
    raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
    return {"vr": "UN", "InlineBinary": base64.b64encode(raw).decode("ascii")}


def to_json(ds: Dataset, file_id: Any) -> dict[str, Any]:
    """The dataset (without file meta) as a DICOM JSON object."""

    def handler(elem: DataElement) -> str:
        return bulk_data_uri(file_id, elem.tag)

    result: dict[str, Any] = {}
    for elem in ds:
        if elem.tag.group == 0x0002:
            continue
        key = f"{elem.tag:08X}"
        try:
            if elem.VR in _BINARY_VRS and elem.value is not None and \
                    len(elem.value) > BULK_DATA_THRESHOLD:
                result[key] = {"vr": _binary_vr(elem), "BulkDataURI": handler(elem)}
                continue
            result[key] = elem.to_json_dict(handler, BULK_DATA_THRESHOLD)
        except Exception as exc:  # noqa: BLE001 - any decoding failure of one element
            log.warning("element %s not convertible to JSON (%s); kept as bytes", key, exc)
            result[key] = _fallback(elem)
    return result


def _binary_vr(elem: DataElement) -> str:
    vr = str(elem.VR)
    if vr in ("OB or OW", "US or OW"):
        return "OW"
    return vr


def from_json(data: dict[str, Any]) -> Dataset:
    """A pydicom Dataset from DICOM JSON; bulk data comes back empty."""
    return Dataset.from_json(data, bulk_data_uri_handler=lambda *_: b"")

"""An instance's DICOM JSON as rows of a readable tree: tag, keyword, VR, value.

Pure functions over the stored DICOM JSON (PS3.18 F.2), for the console's instance
page.  Standard attributes are named from pydicom's dictionary; a private attribute
(odd group, element xx10-xxFF) by its private creator -- the value of (gggg,00xx) in
the same dataset -- and pydicom's private dictionary, else shown as unknown.  A
sequence holds its items, each a list of rows; values are text, never markup (the
template escapes them).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_description, get_private_entry, keyword_for_tag

#: Longest value shown in full; longer ones are cut with their length named.
MAX_TEXT = 600
#: Most values of a multi-valued element shown.
MAX_VALUES = 64


@dataclass
class Row:
    """One element of the tree."""

    tag: str  # "(0010,0010)"
    keyword: str  # PatientName, a private attribute's description, or ""
    vr: str
    value: str
    private: bool = False
    creator: str = ""  # the private creator of a private attribute
    items: list[list[Row]] = field(default_factory=list)  # a sequence's items

    @property
    def sequence(self) -> bool:
        return self.vr == "SQ"


def rows(dataset: dict[str, Any]) -> list[Row]:
    """The rows of one dataset (or sequence item), in tag order."""
    elements = sorted((k, v) for k, v in dataset.items() if _is_tag(k))
    creators = {int(k, 16): _first_text(v) for k, v in elements
                if _is_creator(int(k, 16))}
    out = []
    for key, element in elements:
        tag = int(key, 16)
        if not isinstance(element, dict):
            continue
        vr = str(element.get("vr", "UN"))
        keyword, private, creator = _name(tag, creators)
        items = [rows(item) for item in element.get("Value") or []
                 if isinstance(item, dict)] if vr == "SQ" else []
        out.append(Row(f"({tag >> 16:04X},{tag & 0xFFFF:04X})", keyword, vr,
                       _text(vr, element), private, creator, items))
    return out


def count(tree: list[Row]) -> int:
    """How many rows the tree has, items included."""
    return sum(1 + sum(count(item) for item in row.items) for row in tree)


def _is_tag(key: str) -> bool:
    if len(key) != 8:
        return False
    try:
        int(key, 16)
    except ValueError:
        return False
    return True


def _is_creator(tag: int) -> bool:
    return bool(tag >> 16 & 1) and 0x0010 <= tag & 0xFFFF <= 0x00FF


def _name(tag: int, creators: dict[int, str]) -> tuple[str, bool, str]:
    """Keyword (or description), whether private, and the private creator."""
    group, element = tag >> 16, tag & 0xFFFF
    if not group & 1:
        keyword = keyword_for_tag(tag)
        if not keyword:
            try:
                keyword = dictionary_description(tag)
            except KeyError:
                keyword = ""
        return keyword, False, ""
    if element == 0:
        return "Private Group Length", True, ""
    if element < 0x0100:
        return "Private Creator", True, ""
    creator = creators.get((group << 16) | (element >> 8), "")
    description = ""
    if creator:
        try:
            description = get_private_entry(tag, creator)[2]
        except KeyError:
            description = ""
    return description, True, creator


def _first_text(element: Any) -> str:
    values = element.get("Value") if isinstance(element, dict) else None
    return str(values[0]).strip() if values and values[0] is not None else ""


def _text(vr: str, element: dict[str, Any]) -> str:
    """A value as one line of text."""
    if "BulkDataURI" in element:
        return "(binary data, retrieved apart)"
    if "InlineBinary" in element:
        inline = element.get("InlineBinary") or ""
        try:
            size = len(base64.b64decode(inline, validate=False))
        except (binascii.Error, ValueError):
            size = 0
        return f"(binary, {size} bytes)"
    values = element.get("Value")
    if vr == "SQ":
        n = len(values or [])
        return f"{n} item{'s' if n != 1 else ''}"
    if not values:
        return ""
    shown = [_one(vr, v) for v in values[:MAX_VALUES]]
    text = "\\".join(shown)
    if len(values) > MAX_VALUES:
        text += f"\\... ({len(values)} values)"
    if len(text) > MAX_TEXT:
        text = f"{text[:MAX_TEXT]}... ({len(text)} characters)"
    return text


def _one(vr: str, value: Any) -> str:
    if value is None:
        return ""
    if vr == "PN" and isinstance(value, dict):
        groups = [value.get(k, "") for k in ("Alphabetic", "Ideographic", "Phonetic")]
        while groups and not groups[-1]:
            groups.pop()
        return "=".join(str(g) for g in groups)
    if vr == "AT" and isinstance(value, str) and len(value) == 8:
        return f"({value[:4]},{value[4:]})"
    return str(value)

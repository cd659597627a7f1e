"""The values the archive keys documents on: refused when they would corrupt the keys.

SOP Instance, Series and Study Instance UIDs and Patient ID become ``_id``s and
child-list entries; the SOP Class UID becomes part of a field name (the per-class
counters of a series).  A NUL there is refused by BSON in field names and truncates
C strings elsewhere, other control characters make log lines and Error Comments lie,
and lone surrogates cannot be encoded at all: such a value is refused with 0xC000.

What is merely unusual is accepted on purpose: UIDs with letters, leading zeros in a
component, a trailing dot or other characters outside ``[0-9.]`` occur in real-world
data (older modalities, hand-made test files), are harmless as keys and are matched
exactly as received.  The only other rule is the UI length of PS3.5 (64 characters):
a longer "UID" is a corrupt element, not a vendor's habit.
"""

from __future__ import annotations

import unicodedata
from typing import Any

#: (keyword, tag) of the values documents are keyed on, in the order they are checked.
KEYS: tuple[tuple[str, str], ...] = (
    ("SOPInstanceUID", "0008,0018"), ("SOPClassUID", "0008,0016"),
    ("StudyInstanceUID", "0020,000D"), ("SeriesInstanceUID", "0020,000E"),
    ("PatientID", "0010,0020"),
)
MAX_UID_LENGTH = 64
#: VRs whose DICOM JSON value is the text itself: a key sent with another VR (IS, PN, OB...)
#: would be stored as a number, a name or bytes, and the documents keyed on nothing.
_TEXT_VRS = frozenset({"UI", "LO", "SH", "CS", "AE", "LT", "ST", "UT", "UC"})


def _bad_character(text: str) -> str | None:
    """The first control character or lone surrogate of ``text``, if any."""
    if text.isprintable():  # neither (the usual UID): not looked at character by character
        return None
    return next((c for c in text if unicodedata.category(c) in ("Cc", "Cs")), None)


def problem(keyword: str, tag: str, value: Any, vr: str = "") -> str | None:
    """Why ``value`` cannot key a document (an Error Comment), or None.

    Normal padding -- trailing NUL or spaces, leading spaces -- is not a problem.  A
    value sent with a VR whose DICOM JSON is not plain text (OB, IS, PN...) is.
    """
    if value is None:
        return None
    if isinstance(value, bytes | bytearray) or (vr and vr not in _TEXT_VRS):
        expected = "UI" if keyword.endswith("UID") else "LO"
        return f"{keyword} ({tag}) has VR {vr or 'binary'}, not {expected}"
    texts = [str(v) for v in value] if isinstance(value, list | tuple) or \
        type(value).__name__ == "MultiValue" else [str(value)]
    for text in texts:
        text = text.rstrip("\x00 ").lstrip(" ")
        bad = _bad_character(text)
        if bad is not None:
            name = "NUL" if bad == "\x00" else f"U+{ord(bad):04X}"
            return f"{keyword} ({tag}) contains {name}"[:64]
        if keyword.endswith("UID") and len(text) > MAX_UID_LENGTH:
            return f"{keyword} ({tag}) is longer than {MAX_UID_LENGTH} characters"
    return None

"""Whether a DA, TM or DT value names a real date or time (PS3.5 Table 6.2-1).

The C-FIND patterns of :mod:`archive.query` check the shape of a value (eight digits,
``HHMMSS.FFFFFF``...); these functions check what the digits say: month 13, 30
February, hour 25 or minute 60 match the shape and name nothing.  A second of 60 is
a leap second, which TM and DT allow.  Reduced precision (``2019`` in DT, ``10`` in TM)
is valid, and so is the old ACR-NEMA date ``YYYY.MM.DD``.
"""

from __future__ import annotations

import datetime
import re

_TM = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.\d{1,6})?)?)?")
_DT = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d{1,6})?"
                 r"(?:[+-]\d{4})?")


def _date(year: int, month: int = 1, day: int = 1) -> bool:
    try:
        datetime.date(year, month, day)
    except ValueError:
        return False
    return True


def _time(hours: int, minutes: int = 0, seconds: int = 0) -> bool:
    return hours < 24 and minutes < 60 and seconds <= 60


def problem(vr: str, text: str) -> str | None:
    """Why ``text`` (already of the VR's shape) is no real DA/TM/DT value, or None."""
    if vr == "DA":
        digits = text.replace(".", "")
        if len(digits) == 8 and digits.isdigit() and \
                not _date(int(digits[:4]), int(digits[4:6]), int(digits[6:])):
            return f"'{text}' is not a calendar date"
    elif vr == "TM":
        found = _TM.fullmatch(text)
        if found and not _time(*(int(g) for g in found.groups() if g is not None)):
            return f"'{text}' is not a time of day"
    elif vr == "DT":
        found = _DT.fullmatch(text)
        if found:
            parts = [int(g) for g in found.groups() if g is not None]
            if not _date(*parts[:3]) or not _time(*parts[3:6] or [0]):
                return f"'{text}' is not a real date and time"
    return None

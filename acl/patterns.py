"""Dataset patterns of the access rules: administrator text <-> DICOM JSON -> filters.

A pattern is a C-FIND-like identifier (Dopamine's "dataset pattern"): attributes with
DICOM matching values (wild cards, ranges, lists, PN groups, sequence items).  It is
stored as DICOM JSON (PS3.18 F.2), whose keys are tags, so nothing an administrator
types ever becomes a MongoDB operator or field name.

Matching is *not* re-implemented here: :func:`compile_pattern` turns a pattern into
the filters :func:`archive.query.pattern_filter` builds for C-FIND, one for instance
documents and one for each level document that stores every key of the pattern (the
fast path of :mod:`acl.visibility`), and :func:`archive.query.evaluate` decides them.
"""

from __future__ import annotations

import datetime
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from archive.model import COMPUTED_KEYS, CONTROL_KEYS, IMAGE, LEVELS, NORMALISED, stored_tags
from archive.query import (
    BINARY_VRS,
    NUMERIC_VRS,
    QUERY_RETRIEVE_LEVEL,
    SPECIFIC_CHARACTER_SET,
    TEXT_VRS,
    QueryError,
    integer_value,
    pattern_filter,
)

#: What an administrator writes for one key: a value (``\\`` separates values), a
#: list of values, or for a sequence one item (a mapping, or a list of one mapping).
RawValue: TypeAlias = "str | Sequence[RawValue] | Mapping[str, RawValue]"

_INTEGER_VRS = frozenset({"IS", "SL", "SS", "UL", "US", "UV", "SV"})
_TAG = re.compile(r"\(?\s*([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\s*\)?")
_DA_VALUE = re.compile(r"\d{8}|\d{4}\.\d{2}\.\d{2}")
_TM_VALUE = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.\d{1,6})?)?)?")


class PatternError(ValueError):
    """A pattern the rules cannot use; ``key`` is the key at fault as written."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def parse_key(text: str) -> int:
    """The tag a key names: a keyword, or ``gggg,eeee`` / ``(gggg,eeee)`` / ``ggggeeee``."""
    text = str(text).strip()
    tag = tag_for_keyword(text)
    if tag is not None:
        return int(tag)
    found = _TAG.fullmatch(text)
    if found is None:
        raise PatternError(f"{text!r} is neither a DICOM keyword nor a tag", text)
    tag = int(found.group(1) + found.group(2), 16)
    try:
        dictionary_VR(tag)
    except KeyError:
        raise PatternError(f"{text} is not in the DICOM dictionary", text) from None
    return tag


def key_name(tag: int) -> str:
    """The keyword of a tag, or ``(gggg,eeee)`` when it has none."""
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _vr(tag: int, key: str) -> str:
    vr = dictionary_VR(tag)
    return "US" if vr == "US or SS" else vr.split(" or ")[0]


def _check_matchable(tag: int, vr: str, key: str) -> None:
    """Refuse keys that would silently match everything or nothing of an instance."""
    if tag in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET) or tag in CONTROL_KEYS:
        raise PatternError(f"{key} is a query control key, not an attribute", key)
    if tag in COMPUTED_KEYS:
        raise PatternError(f"{key} is computed by the archive, not stored on instances", key)
    if tag >> 16 in (0x0000, 0x0002) or tag & 0xFFFF == 0:
        raise PatternError(f"{key} is not an attribute of the dataset", key)
    if vr in BINARY_VRS:
        raise PatternError(f"{key} is binary ({vr}): it cannot be matched", key)


# --- administrator text -> DICOM JSON --------------------------------------------------


def to_json(pattern: Mapping[str, RawValue]) -> dict[str, Any]:
    """A pattern as DICOM JSON, checked key by key (PatternError names the key)."""
    if not isinstance(pattern, Mapping):
        raise PatternError("a pattern is a mapping of attributes to values")
    result: dict[str, Any] = {}
    for key, raw in pattern.items():
        tag = parse_key(key)
        vr = _vr(tag, str(key))
        _check_matchable(tag, vr, str(key))
        name = f"{tag:08X}"
        if name in result:
            raise PatternError(f"{key} names the same attribute as another key", str(key))
        result[name] = _element(tag, vr, raw, str(key))
    return result


def _element(tag: int, vr: str, raw: RawValue, key: str) -> dict[str, Any]:
    if vr == "SQ":
        item = raw
        if isinstance(raw, Sequence) and not isinstance(raw, str):
            if len(raw) != 1:
                raise PatternError(f"{key} is a sequence: give exactly one item", key)
            item = raw[0]
        if not isinstance(item, Mapping):
            raise PatternError(f"{key} is a sequence: its value is an item (a mapping)", key)
        if not item:
            raise PatternError(f"{key} has an empty item, which would match every dataset: "
                               "give the item's keys and values, or leave the key out", key)
        try:
            return {"vr": "SQ", "Value": [to_json(item)]}
        except PatternError as exc:
            raise PatternError(f"{key} item: {exc}", key) from None
    values = _texts(raw, vr, key)
    if not values:
        raise PatternError(empty_value_message(key), key)
    element: dict[str, Any] = {"vr": vr, "Value": [_json_value(vr, text, key) for text in values]}
    _check_values(tag, vr, element, key)
    return element


def empty_value_message(key: str) -> str:
    """What an empty value means in a pattern (everything) and what to write instead.

    In a C-FIND identifier an empty key is universal matching; in a rule that silently
    lifts the restriction the administrator meant to write, so it is refused.
    """
    return (f"{key} has an empty value, which would match every dataset: write "
            f"{key}: \"*\" for any value, {key}: '\"\"' for datasets without one, "
            f"or leave {key} out")


def matches_everything(pattern: Mapping[str, Any] | None) -> bool:
    """Whether a non-empty stored pattern lets every dataset through (all its keys are
    universal, e.g. ``{PatientID: "*"}``): the same as no pattern, worth a warning."""
    return bool(pattern) and compile_pattern(pattern) is None


def check_stored(pattern: Mapping[str, Any] | None) -> None:
    """PatternError when a stored pattern is one :func:`to_json` refuses now (a rule
    applied before empty values were refused); the message says what to write."""
    if pattern:
        to_json(to_text(pattern))


def _texts(raw: RawValue, vr: str, key: str) -> list[str]:
    """The values of a key as text: a list, or one text split at backslashes."""
    if isinstance(raw, Mapping):
        raise PatternError(f"{key} is {vr}, not a sequence: give a value, not a mapping", key)
    if isinstance(raw, Sequence) and not isinstance(raw, str):
        texts = []
        for item in raw:
            if isinstance(item, Mapping | list | tuple):
                raise PatternError(f"{key}: a list holds plain values only", key)
            texts.append(str(item))
    else:
        texts = [raw] if vr in TEXT_VRS else str(raw).split("\\")
    texts = [text.rstrip() if vr in TEXT_VRS else text.strip() for text in texts]
    return [text for text in texts if text]


def _json_value(vr: str, text: str, key: str) -> Any:
    """One value as DICOM JSON represents it (numbers as numbers, PN as groups)."""
    if vr == "PN":
        groups = dict(zip(("Alphabetic", "Ideographic", "Phonetic"), text.split("="),
                          strict=False))
        return {name: value for name, value in groups.items() if value}
    if vr in _INTEGER_VRS:
        if not re.fullmatch(r"[+-]?\d+", text):
            raise PatternError(f"{key} is {vr}: {text!r} is not an integer", key)
        value = integer_value(vr, text)
        if value is None:
            raise PatternError(f"{key} is {vr}: {text} is out of its range", key)
        return value
    if vr in NUMERIC_VRS:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise PatternError(f"{key} is {vr}: {text!r} is not a number", key)
        integral = number.is_integer() and "." not in text and abs(number) <= 2**53
        return int(number) if integral else number  # (a larger one stays a double)
    return text


def _check_values(tag: int, vr: str, element: dict[str, Any], key: str) -> None:
    """The key must translate as a C-FIND key would, and dates must exist."""
    try:
        pattern_filter(dataset({f"{tag:08X}": element}), IMAGE)
    except QueryError as exc:
        raise PatternError(exc.comment, key) from None
    for text in element.get("Value", []):
        if vr in ("DA", "DT", "TM") and isinstance(text, str):
            for end in (part for part in text.split("-") if part):
                if vr in ("DA", "DT") and not _real_date(end):
                    raise PatternError(f"{key}: {end!r} is not a calendar date", key)
                if vr == "TM" and not _real_time(end):
                    raise PatternError(f"{key}: {end!r} is not a time of day", key)


def _real_date(text: str) -> bool:
    date = text.replace(".", "")[:8]
    if len(date) < 8:  # a DT reduced to year or month
        date = (date + "0101")[:8]
    try:
        datetime.datetime.strptime(date, "%Y%m%d")
    except ValueError:
        return False
    return True


def _real_time(text: str) -> bool:
    found = _TM_VALUE.fullmatch(text)
    if found is None:
        return True  # not a time at all: pattern_filter has said so already
    hours, minutes, seconds = (int(g) if g else 0 for g in found.groups())
    return hours < 24 and minutes < 60 and seconds < 61


# --- DICOM JSON -> administrator text --------------------------------------------------


def to_text(pattern: Mapping[str, Any]) -> dict[str, Any]:
    """The reverse of :func:`to_json`: keywords and values as an administrator writes
    them, so that ``to_json(to_text(p)) == p``."""
    result: dict[str, Any] = {}
    for name, element in pattern.items():
        tag = int(name, 16)
        values = element.get("Value", [])
        if element.get("vr") == "SQ":
            result[key_name(tag)] = to_text(values[0]) if values else {}
            continue
        texts = [_text(element.get("vr", ""), value) for value in values]
        result[key_name(tag)] = texts[0] if len(texts) == 1 else (texts or "")
    return result


def _text(vr: str, value: Any) -> str:
    if vr == "PN" and isinstance(value, Mapping):
        groups = [value.get(g, "") for g in ("Alphabetic", "Ideographic", "Phonetic")]
        while groups and not groups[-1]:
            groups.pop()
        return "=".join(groups)
    return str(value)


def describe(pattern: Mapping[str, Any] | None) -> str:
    """One line for listings: ``StudyDescription=Some study, PatientID=TRIAL42-*``."""
    if not pattern:
        return "any dataset"
    parts = []
    for name, element in pattern.items():
        values = element.get("Value", [])
        if element.get("vr") == "SQ":
            text = "{" + (describe(values[0]) if values else "") + "}"
        else:
            text = "\\".join(_text(element.get("vr", ""), value) for value in values)
        parts.append(f"{key_name(int(name, 16))}={text}")
    return ", ".join(parts)


# --- DICOM JSON -> filters -------------------------------------------------------------


def dataset(pattern: Mapping[str, Any]) -> Dataset:
    """The pattern as an identifier for :func:`archive.query.pattern_filter`.

    Wild cards and ranges are no valid values of their VR; pydicom's warnings about
    them are noise here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Dataset.from_json(dict(pattern))


@dataclass(frozen=True)
class Compiled:
    """A pattern ready to decide documents.

    ``filters[level]`` decides a document of that level: present for IMAGE (the
    instance documents) and for each level whose documents store every key that
    filters (``model.stored_tags``).  ``projection`` is what an instance document
    needs for the IMAGE filter, so walks fetch small documents.
    """

    pattern: dict[str, Any]
    tags: frozenset[int]
    filters: dict[str, dict[str, Any]]
    projection: dict[str, int] = field(default_factory=dict)
    #: Per level, the filter of the pattern's keys that level stores ({}: none): what
    #: every visible entity of that level satisfies, though not every one satisfying it
    #: is visible.  A server-side pre-filter.
    partials: dict[str, dict[str, Any]] = field(default_factory=dict)

    def at(self, level: str) -> dict[str, Any] | None:
        """The filter deciding a level document directly, None when it must walk."""
        return self.filters.get(level)

    def partial(self, level: str) -> dict[str, Any]:
        return self.partials.get(level, {})


def compile_pattern(pattern: Mapping[str, Any] | None) -> Compiled | None:
    """Filters of a stored pattern; None when it matches every dataset.

    Raises PatternError when the stored pattern is not one :func:`to_json` accepts.
    """
    if not pattern:
        return None
    identifier = dataset(pattern)
    try:
        image = pattern_filter(identifier, IMAGE)
        if not image:
            return None
        tags = frozenset(  # the keys that filter: universal ones do not
            int(name, 16) for name, element in pattern.items()
            if pattern_filter(dataset({name: element}), IMAGE)
        )
        filters = {IMAGE: image}
        partials: dict[str, dict[str, Any]] = {}
        for level in LEVELS[:-1]:
            if tags <= stored_tags(level):
                filters[level] = partials[level] = pattern_filter(identifier, level)
                continue
            kept = {name: element for name, element in pattern.items()
                    if int(name, 16) in tags & stored_tags(level)}
            partials[level] = pattern_filter(dataset(kept), level) if kept else {}
    except QueryError as exc:
        raise PatternError(exc.comment) from None
    projection = {f"dataset.{tag:08X}": 1 for tag in tags}
    projection.update({spec.name: 1 for spec in NORMALISED[IMAGE].values()})
    projection["Modality"] = 1
    return Compiled(dict(pattern), tags, filters, projection, partials)


def instance_selection(pairs: Iterable[tuple[str, str]]
                       ) -> tuple[dict[str, str], dict[str, Any] | None]:
    """C-FIND keys (keyword or tag, value as C-FIND matches it) selecting instance
    documents, as ``archive delete``, ``modify``, ``rejected`` and the console's Rejected
    page take them: the keys by keyword, and their filter (None: every instance).
    Raises PatternError, also for a key given twice."""
    raw: dict[str, str] = {}
    for key, value in pairs:
        name = key_name(parse_key(key))
        if name in raw:
            raise PatternError(f"{name} given twice")
        raw[name] = value
    compiled = compile_pattern(to_json(raw)) if raw else None
    return raw, compiled.filters[IMAGE] if compiled is not None else None

"""Translation of a C-FIND identifier into a MongoDB filter (PS3.4 C.2.2.2).

Every key of the identifier is classified into one of the matching types of PS3.4
C.2.2.2 (``classify``) and translated by the function the ``MATCHING`` table names
for that type.  The filter runs on the collection of the query level
(``model.COLLECTION``) and uses only operators that both MongoDB >= 6 and FerretDB
1.24 implement: ``$and $or $eq $in $gt $gte $lt $lte $regex $options $elemMatch
$exists``.  ``evaluate`` decides the same filter locally, so the access-control
rules can check a dataset that is not stored yet with the very filter MongoDB runs.

Values received from the network are data: they only ever appear as strings or
numbers under ``$eq $in $gt $gte $lt $lte`` or, escaped, inside an anchored
``$regex``; filter keys are built from tags and model field names only.

Status codes: every fault of the identifier (missing or invalid Query/Retrieve
Level, a key below the query level, a value that cannot be read as its VR, a
sequence key with more than one item) raises ``QueryError`` with 0xA900
"Identifier does not match SOP Class" -- the fault is the SCU's, so none of the
0xCxxx "Unable to process" codes, which would suggest an SCP failure.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from pydicom import Dataset
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from archive import datetimes, matching
from archive.model import (
    COMPUTED_KEYS,
    CONTROL_KEYS,
    COUNTERS,
    IMAGE,
    LEVELS,
    NORMALISED,
    SERIES,
    STUDY,
    Field,
    identifier_key,
    level_of,
    normalise_date,
    normalise_datetime,
    normalise_name,
    normalise_time,
)

Condition = dict[str, Any]

#: C-FIND failure status for every fault of the identifier (PS3.4 C.4.1.1.4).
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"unknown DICOM keyword {keyword}")
    return tag


QUERY_RETRIEVE_LEVEL = _tag("QueryRetrieveLevel")
SPECIFIC_CHARACTER_SET = _tag("SpecificCharacterSet")
PATIENT_NAME = _tag("PatientName")

#: Levels of each information model: Study Root has no PATIENT level (PS3.4 C.6.2).
MODELS: dict[str, tuple[str, ...]] = {"PATIENT": LEVELS, "STUDY": (STUDY, SERIES, IMAGE)}

#: Keys of the IMAGE level.  ``level_of`` puts every attribute it does not list at
#: IMAGE, so only these are refused above IMAGE; other attributes there are
#: optional keys the archive does not support, i.e. universally matched.
IMAGE_KEYS: frozenset[int] = frozenset(
    _tag(k) for k in ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")
)

#: Date and time keys matched together as one date-time range (PS3.4 C.2.2.2.5.2).
DATE_TIME_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (_tag(f"{name}Date"), _tag(f"{name}Time"))
    for name in ("Study", "Series", "Acquisition", "Content", "PerformedProcedureStepStart")
)

NUMERIC_VRS = frozenset({"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
RANGE_VRS = frozenset({"DA", "TM", "DT"})
#: VRs whose value is one text, backslash included (no value multiplicity).
TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})

_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")

_DA = r"\d{8}|\d{4}\.\d{2}\.\d{2}"
_TM = r"\d{2}(?::?\d{2}(?::?\d{2}(?:\.\d{1,6})?)?)?"
_DT_OFFSET = r"[+-](?:0\d|1[0-4])[0-5]\d"
_DT = rf"\d{{4}}(?:\d{{10}}(?:\.\d{{1,6}})?|(?:\d{{2}}){{1,4}})?(?:{_DT_OFFSET})?"
#: A single DA/TM/DT value, and a range ``low-high`` with either end optional.
_VALUE = {vr: re.compile(p) for vr, p in (("DA", _DA), ("TM", _TM), ("DT", _DT))}
_RANGE = {
    vr: re.compile(rf"(?P<low>{p})?-(?P<high>{p})?")
    for vr, p in (("DA", _DA), ("TM", _TM), ("DT", _DT))
}


class QueryError(Exception):
    """An identifier the archive refuses, with the status and Error Comment to answer."""

    def __init__(self, status: int, comment: str, offending: tuple[int, ...] = ()) -> None:
        # Error Comment (0000,0902) is LO: at most 64 characters, no control characters.
        comment = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in comment)[:64]
        super().__init__(f"0x{status:04X}: {comment}")
        self.status = status
        self.comment = comment
        self.offending = offending


@dataclass(frozen=True)
class Query:
    """A C-FIND request ready to run: level, filter on its collection, requested keys."""

    level: str
    filter: dict[str, Any]
    keys: tuple[int, ...]


@dataclass(frozen=True)
class _Context:
    """Where keys are matched: a level document (``level``) or a sequence item (None)."""

    level: str | None
    prefix: str
    pn_case_insensitive: bool
    combined_datetime: bool
    ignore_unsupported: bool


@dataclass(frozen=True)
class _Key:
    """One key of the identifier, resolved to the field it is matched against."""

    tag: int
    vr: str
    values: tuple[str, ...]
    path: str  # the field matched: a top-level normalised field or "<prefix><TAG>.Value"
    raw_path: str  # always "<prefix><TAG>.Value" (PN groups outside the normalised field)
    normalised: bool  # path is a normalised top-level field, compared in its normal form
    normalise: Callable[[str], str]
    fold_case: bool  # PN matched case-insensitively outside the normalised field
    context: _Context
    items: tuple[Dataset, ...] = ()


# --- public API --------------------------------------------------------------------


def translate(
    identifier: Dataset,
    model: str,
    *,
    pn_case_insensitive: bool = True,
    combined_datetime: bool = True,
) -> Query:
    """Check a C-FIND identifier against the information model and translate it.

    ``model`` is "PATIENT" (Patient Root) or "STUDY" (Study Root).  Raises
    ``QueryError`` for an identifier the SCP must refuse.
    """
    if model not in MODELS:
        raise ValueError(f"unknown information model {model!r}")
    level = _query_level(identifier, model)
    for tag in _in_order(identifier):
        _check_allowed(int(tag), level)
    # Returned: the requested dataset attributes, never a key that is no attribute
    # (group lengths, command and file meta elements: model.identifier_key).
    keys = tuple(
        int(tag)
        for tag in _in_order(identifier)
        if tag not in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET)
        and identifier_key(tag) == tag
    )
    context = _Context(level, "dataset.", pn_case_insensitive, combined_datetime, True)
    return Query(level, _combine(_conditions(identifier, context)), keys)


def pattern_filter(
    identifier: Dataset, level: str, *, pn_case_insensitive: bool = True
) -> dict[str, Any]:
    """The filter of ``translate`` without its checks, for the access-control rules.

    Every key is matched, even one the level does not store: for a rule, a key that
    cannot match must deny rather than be ignored.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}")
    context = _Context(level, "dataset.", pn_case_insensitive, True, False)
    return _combine(_conditions(identifier, context))


def classify(vr: str, values: tuple[str, ...]) -> str:
    """The matching type of PS3.4 C.2.2.2 a key of this VR and these values asks for."""
    if vr == "SQ":
        return SEQUENCE
    if vr in BINARY_VRS or not values or any(set(v) == {"*"} for v in values):
        return UNIVERSAL
    if values == ('""',):
        return EMPTY
    if len(values) > 1:
        return UID_LIST if vr == "UI" else MULTIPLE
    value = values[0]
    if vr in RANGE_VRS:
        valid_single = _VALUE[vr].fullmatch(value)
        return RANGE if not valid_single and _RANGE[vr].fullmatch(value) else SINGLE
    if vr in WILDCARD_VRS and ("*" in value or "?" in value):
        return WILDCARD
    return SINGLE


# --- identifier checks ---------------------------------------------------------------


def _query_level(identifier: Dataset, model: str) -> str:
    """The Query/Retrieve Level, which must name a level of the information model."""
    if QUERY_RETRIEVE_LEVEL not in identifier:
        raise QueryError(
            IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            "QueryRetrieveLevel (0008,0052) is missing",
            (QUERY_RETRIEVE_LEVEL,),
        )
    try:
        value = identifier[QUERY_RETRIEVE_LEVEL].value
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad bytes
        raise _fault(QUERY_RETRIEVE_LEVEL, "has an invalid value") from exc
    if value is None or isinstance(value, str):
        level = (value or "").strip()
        if not level:
            raise QueryError(
                IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                "QueryRetrieveLevel (0008,0052) is empty",
                (QUERY_RETRIEVE_LEVEL,),
            )
    else:
        level = "\\".join(str(v) for v in value)  # multi-valued: never a level
    if level not in MODELS[model]:
        raise QueryError(
            IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            f"QueryRetrieveLevel {level[:16]} is not a level of {model.title()} Root",
            (QUERY_RETRIEVE_LEVEL,),
        )
    return level


def _check_allowed(tag: int, level: str) -> None:
    """Refuse a key of a level below the query level (PS3.4 C.4.1.2.1).

    A file meta alias is judged as the attribute it stands for, under its own name.
    """
    attribute = identifier_key(tag)
    if attribute is None or attribute in CONTROL_KEYS:
        return
    key_level = level_of(attribute)
    if LEVELS.index(key_level) <= LEVELS.index(level):
        return
    if key_level == IMAGE and attribute not in IMAGE_KEYS:
        return  # an optional key the archive does not support: universal match
    article = "an" if key_level == IMAGE else "a"
    raise _fault(tag, f"is {article} {key_level} key, not allowed at {level} level")


def _fault(tag: int, problem: str) -> QueryError:
    """A QueryError naming the key as fully as the 64 characters of the comment allow.

    The tag also goes to Offending Element (0000,0901), so when room is short the
    keyword, which a person reads, is kept rather than the tag number.
    """
    number = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    keyword = keyword_for_tag(tag)
    names = [f"{keyword} {number}", keyword] if keyword else []
    comment = next(
        (f"{name} {problem}" for name in names if len(f"{name} {problem}") <= 64),
        f"{number} {problem}",
    )
    return QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, comment, (tag,))


# --- keys ----------------------------------------------------------------------------


def _conditions(dataset: Dataset, context: _Context) -> list[Condition]:
    """The conditions of every key of ``dataset`` that filters, in identifier order."""
    keys = [key for key in (_key(dataset, tag, context) for tag in _in_order(dataset)) if key]
    by_tag = {key.tag: key for key in keys}
    paired: dict[int, Condition | None] = {}
    if context.combined_datetime:
        for date_tag, time_tag in DATE_TIME_PAIRS:
            date, time = by_tag.get(date_tag), by_tag.get(time_tag)
            # (paired only as DA and TM: an identifier may send these keys with other VRs)
            if date and time and (date.vr, time.vr) == ("DA", "TM") and \
                    _is_interval(date) and _is_interval(time):
                paired[date_tag] = _date_time(date, time)
                paired[time_tag] = None
    conditions = []
    for key in keys:
        condition = paired[key.tag] if key.tag in paired else _match(key)
        if condition is not None:
            conditions.append(condition)
    return conditions


def _in_order(dataset: Dataset) -> list[BaseTag]:
    """The tags of ``dataset`` in the order received; iterating a Dataset sorts them."""
    return list(dataset.keys())


def _key(dataset: Dataset, tag: int, context: _Context) -> _Key | None:
    """Resolve a key to its field, or None when it never filters at this place.

    A file meta alias ((0002,0003) Media Storage SOP Instance UID) is matched as the
    attribute it stands for, beside that attribute if both are given.
    """
    received = int(tag)
    attribute = identifier_key(received)
    if attribute is None or attribute in CONTROL_KEYS:
        return None  # control keys, group lengths, command and other file meta elements
    tag = attribute
    try:
        element = dataset[received]
        vr = element.VR.split(" or ")[0]
        values = _values(element, vr)
        items = tuple(element.value or ()) if vr == "SQ" else ()
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad bytes
        raise _fault(received, "has an invalid value") from exc
    raw_path = f"{context.prefix}{tag:08X}.Value"
    field = None
    if context.level is not None:
        fields = NORMALISED[context.level]
        if tag in COMPUTED_KEYS:
            keyword = COMPUTED_KEYS[tag]
            if tag in fields:
                field = fields[tag]
            elif COUNTERS.get(keyword) == context.level:
                field = Field(keyword)
            elif context.ignore_unsupported:
                return None  # a counter of another level: not on this document
        elif (
            context.ignore_unsupported
            and context.level != IMAGE
            and level_of(tag) == IMAGE
        ):
            return None  # optional key not supported above IMAGE
        elif tag in fields and (tag != PATIENT_NAME or context.pn_case_insensitive):
            field = fields[tag]
    return _Key(
        tag=tag,
        vr=vr,
        values=values,
        path=field.name if field else raw_path,
        raw_path=raw_path,
        normalised=field is not None,
        normalise=field.normalise if field else _identity,
        fold_case=vr == "PN" and context.pn_case_insensitive,
        context=context,
        items=items,
    )


def _values(element: DataElement, vr: str) -> tuple[str, ...]:
    """The values of a key as strings, split at backslashes, empty ones dropped."""
    value = element.value
    if vr == "SQ" or vr in BINARY_VRS or value is None or isinstance(value, bytes | bytearray):
        return ()
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    if vr == "AT":
        return tuple(f"{int(tag):08X}" for tag in items)
    texts: list[str] = []
    for item in items:
        text = str(item)
        if vr in ("IS", "DS"):  # as sent: pydicom reads a long IS through a float
            text = str(getattr(item, "original_string", None) or text)
        texts.extend([text] if vr in TEXT_VRS else text.split("\\"))
    strip = str.rstrip if vr in TEXT_VRS else str.strip
    return tuple(text for text in map(strip, texts) if text)


def _identity(value: str) -> str:
    return value


def _is_interval(key: _Key) -> bool:
    """Whether a date or time key names one interval: a single value or a range."""
    return classify(key.vr, key.values) in (SINGLE, RANGE)


# --- matching types ------------------------------------------------------------------

UNIVERSAL = "universal"
EMPTY = "empty value"
SINGLE = "single value"
WILDCARD = "wild card"
UID_LIST = "list of UID"
MULTIPLE = "multiple value"
RANGE = "range"
SEQUENCE = "sequence"


def _match(key: _Key) -> Condition | None:
    """The condition of one key, by its matching type; None matches everything."""
    return MATCHING[classify(key.vr, key.values)](key)


def _universal(key: _Key) -> Condition | None:
    """Universal matching (C.2.2.2.3): every entity matches."""
    return None


def _empty(key: _Key) -> Condition:
    """Empty value matching (C.2.2.2.7): ``""`` asks for entities without a value.

    A name is empty when no group has a value, so PN looks at the whole DICOM JSON
    value, not at the normalised alphabetic group.
    """
    path = key.raw_path if key.vr == "PN" else key.path
    return {"$or": [{path: {"$exists": False}}, {path: {"$in": [None, ""]}}]}


def _single(key: _Key) -> Condition | None:
    """Single value matching (C.2.2.2.1); a reduced-precision time names an interval."""
    value = key.values[0]
    if key.vr == "PN":
        return _person_name(key, value)
    if key.vr in NUMERIC_VRS:
        return {key.path: _number(key, value)}
    if key.vr in RANGE_VRS:
        if not _VALUE[key.vr].fullmatch(value):
            raise _fault(key.tag, f"has an invalid {key.vr} value")
        _check_real(key, value)
        if key.vr == "DA":
            return {key.path: normalise_date(value)}
        return _between(key.path, _lower(key, value), _upper(key, value))
    return {key.path: key.normalise(value)}


def _wildcard(key: _Key) -> Condition | None:
    """Wild card matching (C.2.2.2.4): ``*`` any run of characters, ``?`` one."""
    value = key.values[0]
    if key.vr == "PN":
        return _person_name(key, value)
    return {key.path: _pattern(key.normalise(value), fold_case=False)}


def _uid_list(key: _Key) -> Condition:
    """List of UID matching (C.2.2.2.2): any of the UIDs."""
    return {key.path: {"$in": [key.normalise(value) for value in key.values]}}


def _range(key: _Key) -> Condition | None:
    """Range matching (C.2.2.2.5) of DA, TM and DT: ``low-high``, ``low-``, ``-high``."""
    found = _RANGE[key.vr].fullmatch(key.values[0])
    if found is None:
        raise _fault(key.tag, f"has an invalid {key.vr} range")
    low, high = found.group("low"), found.group("high")
    for end in (low, high):
        _check_real(key, end)
    if low is None and high is None:
        return None
    return _between(
        key.path,
        None if low is None else _lower(key, low),
        None if high is None else _upper(key, high),
    )


def _multiple(key: _Key) -> Condition | None:
    """Multiple value matching (C.2.2.2.8): an entity matches if any value matches."""
    conditions = []
    for value in key.values:
        condition = _match(replace(key, values=(value,)))
        if condition is None:
            return None
        conditions.append(condition)
    paths = {path for condition in conditions for path in condition}
    if paths == {key.path} and not any(isinstance(c[key.path], dict) for c in conditions):
        return {key.path: {"$in": [condition[key.path] for condition in conditions]}}
    return {"$or": conditions}


def _sequence(key: _Key) -> Condition | None:
    """Sequence matching (C.2.2.2.6): one item of the sequence matches every sub-key."""
    if not key.items:
        return None
    if len(key.items) > 1:
        raise _fault(key.tag, "must have one item")
    item = replace(key.context, level=None, prefix="")
    condition = _combine(_conditions(key.items[0], item))
    return {key.raw_path: {"$elemMatch": condition}} if condition else None


#: The translation of each matching type of PS3.4 C.2.2.2.
MATCHING: dict[str, Callable[[_Key], Condition | None]] = {
    UNIVERSAL: _universal,
    EMPTY: _empty,
    SINGLE: _single,
    WILDCARD: _wildcard,
    UID_LIST: _uid_list,
    MULTIPLE: _multiple,
    RANGE: _range,
    SEQUENCE: _sequence,
}


# --- value translation ---------------------------------------------------------------


def _person_name(key: _Key, value: str) -> Condition | None:
    """PN matching group by group: ``Alphabetic=Ideographic=Phonetic``, empty ones skipped.

    The alphabetic group uses the upper-cased top-level field when there is one;
    elsewhere case-insensitive matching is an anchored ``$regex`` with option ``i``.
    """
    conditions = []
    for group, component in zip(value.split("=")[:3], _PN_GROUPS, strict=False):
        group = group.strip()
        if not group or set(group) == {"*"}:
            continue
        if component == "Alphabetic" and key.normalised:
            path, text, fold_case = key.path, normalise_name(group), False
        else:
            path, text, fold_case = f"{key.raw_path}.{component}", group, key.fold_case
        if "*" in text or "?" in text or fold_case:
            conditions.append({path: _pattern(text, fold_case)})
        else:
            conditions.append({path: text})
    return _combine(conditions) or None


def _pattern(text: str, fold_case: bool) -> dict[str, str]:
    """An anchored regex for a wild card value; every other character is escaped.

    Built by :func:`archive.matching.regex`, which :func:`evaluate` reads back and
    matches without a back-tracking engine.
    """
    pattern = {"$regex": matching.regex(text)}
    if fold_case:
        pattern["$options"] = "i"
    return pattern


#: What each integer VR can hold (PS3.5 Table 6.2-1); IS as decimal text, the others binary.
INTEGER_RANGES: dict[str, tuple[int, int]] = {
    "IS": (-(2**31), 2**31 - 1), "SS": (-(2**15), 2**15 - 1), "US": (0, 2**16 - 1),
    "SL": (-(2**31), 2**31 - 1), "UL": (0, 2**32 - 1), "SV": (-(2**63), 2**63 - 1),
    "UV": (0, 2**64 - 1)}
#: Larger SV/UV values are stored as JSON strings (archive.dicomjson, PS3.18 F.2.3).
MAX_EXACT_INTEGER = 2**53 - 1


def integer_value(vr: str, text: str) -> int | str | None:
    """An integer VR's value as DICOM JSON stores it, None when out of the VR's range
    (BSON holds 64-bit integers at most: a larger one must never reach a filter)."""
    value = int(text)
    low, high = INTEGER_RANGES.get(vr, (-(2**63), 2**63 - 1))
    if not low <= value <= high:
        return None
    return str(value) if vr in ("SV", "UV") and abs(value) > MAX_EXACT_INTEGER else value


def _number(key: _Key, text: str) -> int | float | str:
    """A numeric key's value as the JSON number DICOM JSON stores (``5`` for IS "5")."""
    if re.fullmatch(r"[+-]?\d+", text):
        value = integer_value(key.vr, text) if key.vr in INTEGER_RANGES else (
            int(text) if abs(int(text)) <= MAX_EXACT_INTEGER else None)
        if value is None:
            raise _fault(key.tag, f"has a {key.vr} value out of range")
        return value
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or (key.vr not in ("DS", "FL", "FD") and number % 1):
        raise _fault(key.tag, f"has an invalid {key.vr} value")
    if key.vr in INTEGER_RANGES and not (
            INTEGER_RANGES[key.vr][0] <= number <= INTEGER_RANGES[key.vr][1]):
        raise _fault(key.tag, f"has a {key.vr} value out of range")
    return number


def _lower(key: _Key, text: str) -> str:
    """Start of a DA/TM/DT interval, comparable with the stored values as strings.

    Normalised fields are fixed width.  Values inside ``dataset`` are stored as
    received, often with reduced precision (``1100``), so the bound loses its
    trailing zeros: ``110000`` becomes ``11``, below ``1100`` and ``110000.5``.
    """
    if key.vr == "DA":
        return normalise_date(text)
    if key.normalised:
        return normalise_time(text) if key.vr == "TM" else normalise_datetime(text)
    if key.vr == "TM":
        return normalise_time(text).rstrip("0.")
    return re.sub(rf"(?:{_DT_OFFSET})$", "", text).rstrip("0.")


def _upper(key: _Key, text: str) -> str:
    """End of a DA/TM/DT interval: the last instant the reduced-precision value names."""
    if key.vr == "DA":
        return normalise_date(text)
    if key.vr == "TM":
        return normalise_time(text, high=True)
    return normalise_datetime(text, high=True)


def _between(path: str, low: str | None, high: str | None) -> Condition:
    """A closed or half-open interval.

    An open start still excludes "": storage writes an empty date as an empty
    normalised field, and an entity without a date is not in a date range.
    """
    bounds: dict[str, str] = {"$gt": ""} if low is None else {"$gte": low}
    if high is not None:
        bounds["$lte"] = high
    return {path: bounds}


def _date_time(date: _Key, time: _Key) -> Condition | None:
    """Combined date and time range matching (C.2.2.2.5.2) as one date-time interval.

    ``20190101-20190102`` with ``2200-0200`` is 1 January 22:00 to 2 January 02:00:
    after the first day, or on it and not before the start time; likewise the end.
    """
    first_day, last_day = _interval(date)
    first_time, last_time = _interval(time)
    conditions: list[Condition] = [] if first_day else [{date.path: {"$gt": ""}}]
    if first_day is not None:
        day = normalise_date(first_day)
        if first_time is None:
            conditions.append({date.path: {"$gte": day}})
        else:
            start = _lower(time, first_time)
            conditions.append({"$or": [
                {date.path: {"$gt": day}},
                {"$and": [{date.path: day}, {time.path: {"$gte": start}}]},
            ]})
    if last_day is not None:
        day = normalise_date(last_day)
        if last_time is None:
            conditions.append({date.path: {"$lte": day}})
        else:
            end = _upper(time, last_time)
            conditions.append({"$or": [
                {date.path: {"$lt": day}},
                {"$and": [{date.path: day}, {time.path: {"$lte": end}}]},
            ]})
    return _combine(conditions) or None


def _interval(key: _Key) -> tuple[str | None, str | None]:
    """The two ends of a single value or range as given (None: open)."""
    value = key.values[0]
    if _VALUE[key.vr].fullmatch(value):
        _check_real(key, value)
        return value, value
    found = _RANGE[key.vr].fullmatch(value)
    if found is None:
        raise _fault(key.tag, f"has an invalid {key.vr} value")
    for end in (found.group("low"), found.group("high")):
        _check_real(key, end)
    return found.group("low"), found.group("high")


def _check_real(key: _Key, value: str | None) -> None:
    """Refuse a DA/TM/DT value of the right shape that names no real date or time
    (month 13, 30 February, hour 25, minute 60): it would match nothing, silently."""
    problem = None if value is None else datetimes.problem(key.vr, value)
    if problem is not None:
        raise _fault(key.tag, problem)


def _combine(conditions: list[Condition]) -> Condition:
    """All conditions together; ``{}`` (everything) when there is none."""
    flat: list[Condition] = []
    for condition in conditions:
        nested = condition.get("$and") if len(condition) == 1 else None
        flat.extend(nested if nested is not None else [condition])
    if not flat:
        return {}
    return flat[0] if len(flat) == 1 else {"$and": flat}


# --- local evaluation ----------------------------------------------------------------


class _Missing:
    """A path that reaches no value."""


_MISSING = _Missing()

_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "$gt": operator.gt,
    "$gte": operator.ge,
    "$lt": operator.lt,
    "$lte": operator.le,
}


def evaluate(filter: Mapping[str, Any], document: Mapping[str, Any]) -> bool:
    """Whether MongoDB would return ``document`` for ``filter`` (the subset above).

    Dotted paths descend into arrays of documents, an array matches when one of its
    elements does, a missing field never matches equality, ranges nor regexes.
    """
    return _document_matches(filter, document)


def _document_matches(query: Mapping[str, Any], document: Any) -> bool:
    for key, condition in query.items():
        if key == "$and":
            matched = all(_document_matches(part, document) for part in condition)
        elif key == "$or":
            matched = any(_document_matches(part, document) for part in condition)
        elif key.startswith("$"):
            raise ValueError(f"operator {key} is not supported")
        else:
            matched = _field_matches(_lookup(document, key.split(".")), condition)
        if not matched:
            return False
    return True


def _lookup(value: Any, parts: list[str]) -> list[Any]:
    """The values a dotted path reaches, through arrays of documents as MongoDB does."""
    if not parts:
        return [value]
    head, rest = parts[0], parts[1:]
    if isinstance(value, Mapping):
        return _lookup(value[head], rest) if head in value else [_MISSING]
    if isinstance(value, list):
        found: list[Any] = []
        if head.isdigit() and int(head) < len(value):
            found += _lookup(value[int(head)], rest)
        for element in value:
            if isinstance(element, Mapping):
                found += _lookup(element, parts)
        return found or [_MISSING]
    return [_MISSING]


def _is_operators(condition: Any) -> bool:
    return (
        isinstance(condition, Mapping)
        and bool(condition)
        and all(isinstance(k, str) and k.startswith("$") for k in condition)
    )


def _field_matches(found: list[Any], condition: Any) -> bool:
    if not _is_operators(condition):
        return _equals(found, condition)
    for name, argument in condition.items():
        if name == "$eq":
            matched = _equals(found, argument)
        elif name == "$in":
            matched = any(_equals(found, candidate) for candidate in argument)
        elif name in _COMPARISONS:
            matched = any(
                _comparable(value, argument) and _COMPARISONS[name](value, argument)
                for value in _candidates(found)
            )
        elif name == "$regex":
            options = condition.get("$options", "")
            if options not in ("", "i"):
                raise ValueError(f"$regex option {options!r} is not supported")
            wildcard = matching.from_regex(argument, fold_case=options == "i")
            matched = any(
                isinstance(value, str) and wildcard.matches(value)
                for value in _candidates(found)
            )
        elif name == "$options" and "$regex" in condition:
            matched = True
        elif name == "$exists":
            matched = any(value is not _MISSING for value in found) == bool(argument)
        elif name == "$elemMatch":
            matched = any(
                isinstance(value, list) and any(_element_matches(e, argument) for e in value)
                for value in found
            )
        else:
            raise ValueError(f"operator {name} is not supported")
        if not matched:
            return False
    return True


def _element_matches(element: Any, query: Mapping[str, Any]) -> bool:
    if _is_operators(query) and not {"$and", "$or"} & set(query):
        return _field_matches([element], query)
    return isinstance(element, Mapping) and _document_matches(query, element)


def _candidates(found: Iterable[Any]) -> Iterable[Any]:
    """Each value reached, and the elements of those that are arrays."""
    for value in found:
        if value is _MISSING:
            continue
        yield value
        if isinstance(value, list):
            yield from value


def _equals(found: list[Any], target: Any) -> bool:
    if target is None:  # null matches a missing field too
        return any(
            value is _MISSING or value is None or (isinstance(value, list) and None in value)
            for value in found
        )
    return any(_comparable(value, target) and value == target for value in _candidates(found))


def _comparable(value: Any, target: Any) -> bool:
    """Whether MongoDB compares the two: numbers with numbers, strings with strings..."""
    if isinstance(value, bool) or isinstance(target, bool):
        return isinstance(value, bool) and isinstance(target, bool)
    for kind in ((int, float), str, Mapping, list):
        if isinstance(target, kind):
            return isinstance(value, kind)
    return type(value) is type(target)

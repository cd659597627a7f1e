"""QIDO-RS (PS3.18 10.6): query parameters turned into a C-FIND identifier.

The identifier is built as the network would deliver it -- each value as UTF-8 bytes
in a raw element, decoded by pydicom on access -- and then goes through exactly what
a C-FIND goes through: :func:`archive.query.translate` (Study Root), then
:meth:`archive.context.Context.answers` (every answer, or, for a principal restricted
by patterns, those :func:`acl.visibility.responses` lets her see).  So every matching
rule (wild cards, ranges, UID lists, PN case, sequence items) and every refusal is
C-FIND's; the answers are its datasets written as DICOM JSON.

Parameters (PS3.18 8.3.4): ``{attribute}={value}`` with the attribute a keyword, a tag
(``0020000D``) or a dotted path into sequence items (``RequestAttributesSequence.
RequestedProcedureID``); ``includefield`` (repeated, comma lists, ``all``);
``limit`` / ``offset``; ``fuzzymatching`` (accepted; the archive has no fuzzy
matching, so ``true`` matches as ``false`` does).  Anything else is refused with 400
and a message naming the parameter.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from acl.rules import Decision
from archive import dicomjson, model
from archive.context import Context
from archive.model import IMAGE, SERIES, STUDY
from archive.query import QueryError, translate

#: What a QIDO-RS answer holds at most, whatever ``limit`` asks (``http.max_results``).
DEFAULT_MAX_RESULTS = 10_000

RETRIEVE_URL = 0x00081190
QUERY_RETRIEVE_LEVEL = 0x00080052
SPECIFIC_CHARACTER_SET = 0x00080005


def _tags(*keywords: str) -> tuple[int, ...]:
    return tuple(tag_for_keyword(k) for k in keywords)  # type: ignore[misc]


#: Default return attributes, PS3.18 Table 10.6.3-3 (study), -4 (series), -5 (instance).
#: Retrieve URL is computed here; the others come from the C-FIND answer.
DEFAULTS: dict[str, tuple[int, ...]] = {
    STUDY: _tags("StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability",
                 "ModalitiesInStudy", "ReferringPhysicianName", "TimezoneOffsetFromUTC",
                 "RetrieveURL", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                 "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
                 "NumberOfStudyRelatedInstances"),
    SERIES: _tags("Modality", "TimezoneOffsetFromUTC", "SeriesDescription", "RetrieveURL",
                  "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances",
                  "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
                  "RequestAttributesSequence", "StudyInstanceUID"),
    IMAGE: _tags("SOPClassUID", "SOPInstanceUID", "InstanceAvailability",
                 "TimezoneOffsetFromUTC", "RetrieveURL", "InstanceNumber", "Rows", "Columns",
                 "BitsAllocated", "NumberOfFrames", "StudyInstanceUID", "SeriesInstanceUID"),
}
#: ``includefield=all``: every attribute the level documents hold at and above the level.
_PATIENT_COUNTERS = set(_tags("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                              "NumberOfPatientRelatedInstances"))
ALL: dict[str, tuple[int, ...]] = {
    STUDY: tuple(sorted((model.LEVEL_TAGS[model.PATIENT] | model.LEVEL_TAGS[STUDY])
                        - _PATIENT_COUNTERS - {model.SOP_CLASSES_IN_STUDY})),
}
ALL[SERIES] = tuple(sorted(set(ALL[STUDY]) | model.LEVEL_TAGS[SERIES]))
ALL[IMAGE] = tuple(sorted((set(ALL[SERIES]) | set(DEFAULTS[IMAGE])) - {RETRIEVE_URL}))

_CONTROL = frozenset({"includefield", "limit", "offset", "fuzzymatching"})
_HEX_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_MAX_PARAMETERS = 200


class BadQuery(ValueError):
    """A query the service refuses (400), with the message the client reads."""


@dataclass(frozen=True)
class Search:
    """One QIDO-RS request, translated."""

    level: str
    identifier: Dataset
    limit: int
    offset: int
    fuzzy: bool


def attribute_path(name: str) -> tuple[int, ...]:
    """The tags of ``Keyword``, ``GGGGEEEE`` or a dotted path of either."""
    tags = []
    for part in name.split("."):
        if _HEX_TAG.fullmatch(part):
            tags.append(int(part, 16))
            continue
        tag = tag_for_keyword(part)
        if tag is None:
            raise BadQuery(f"unknown attribute {name[:80]!r} (a DICOM keyword or an "
                           "8-digit hexadecimal tag)")
        tags.append(tag)
    return tuple(tags)


def _vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]


def _raw(tag: int, vr: str, text: str) -> RawDataElement:
    """An element as a C-FIND identifier carries it: its value's bytes, pydicom
    decoding them when read (UTF-8: the identifier says ISO_IR 192)."""
    value = text.encode("utf-8")
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    return RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True)


def _put(ds: Dataset, path: tuple[int, ...], value: str | None, name: str) -> None:
    """Add a matching key (``value``) or a return key (None) at ``path``."""
    tag, rest = path[0], path[1:]
    vr = _vr(tag)
    if rest:
        if vr != "SQ":
            raise BadQuery(f"{name[:80]}: {keyword_for_tag(tag) or f'{tag:08X}'} is no "
                           "sequence")
        if tag in ds and ds[tag].VR == "SQ" and ds[tag].value:
            item = ds[tag].value[0]
        else:
            item = Dataset()
            ds[tag] = DataElement(tag, "SQ", [item])
        _put(item, rest, value, name)
        return
    if value is None:
        if tag not in ds:
            ds[tag] = DataElement(tag, vr, [] if vr == "SQ" else None)
        return
    if vr == "SQ":
        raise BadQuery(f"{name[:80]}: a sequence is matched through its items "
                       "(Sequence.Attribute=value)")
    if vr in _BINARY_NUMBERS:  # encoded as numbers, not text: converted here
        ds[tag] = _numbers(tag, vr, value, name)
        return
    if vr == "UI":  # PS3.18 8.3.4.1: a UID list is comma- or backslash-separated
        value = "\\".join(v.strip() for v in value.replace(",", "\\").split("\\"))
    ds[tag] = _raw(tag, vr, value)


#: VRs whose values are binary numbers: a text value is converted, or refused.
_BINARY_NUMBERS: dict[str, Any] = {
    "US": int, "SS": int, "UL": int, "SL": int, "UV": int, "SV": int, "FL": float,
    "FD": float, "AT": lambda text: int(text, 16)}


def _numbers(tag: int, vr: str, text: str, name: str) -> DataElement:
    convert = _BINARY_NUMBERS[vr]
    try:
        values = [convert(v) for v in text.split("\\") if v.strip()]
    except ValueError:
        raise BadQuery(f"{name[:80]}: {text[:20]!r} is not a number ({vr})") from None
    return DataElement(tag, vr, values[0] if len(values) == 1 else values or None)


def search(level: str, params: Iterable[tuple[str, str]], path_keys: dict[str, str],
           max_results: int = DEFAULT_MAX_RESULTS) -> Search:
    """The identifier of a QIDO-RS request at ``level``: its path's UIDs
    (``path_keys``), its matching keys, the default and included return keys."""
    params = list(params)
    if len(params) > _MAX_PARAMETERS:
        raise BadQuery(f"more than {_MAX_PARAMETERS} query parameters")
    identifier = Dataset()
    identifier.SpecificCharacterSet = "ISO_IR 192"
    identifier.QueryRetrieveLevel = level
    limit, offset, fuzzy = max_results, 0, False
    include: list[str] = []
    seen: set[tuple[int, ...]] = set()
    for keyword, uid in path_keys.items():
        path = attribute_path(keyword)
        seen.add(path)
        _put(identifier, path, uid, keyword)
    for name, value in params:
        if name in _CONTROL:
            if name == "includefield":
                include.extend(v.strip() for v in value.split(",") if v.strip())
            elif name == "limit":
                limit = min(_count(name, value), max_results)
            elif name == "offset":
                offset = _count(name, value)
            else:
                if value.strip().lower() not in ("true", "false"):
                    raise BadQuery("fuzzymatching: expected true or false")
                fuzzy = value.strip().lower() == "true"
            continue
        path = attribute_path(name)
        if path in seen:
            raise BadQuery(f"{name[:80]}: given more than once (or in the path)")
        seen.add(path)
        _put(identifier, path, value, name)
    wanted: list[int] = [t for t in DEFAULTS[level] if t != RETRIEVE_URL]
    if level in (SERIES, IMAGE) and "StudyInstanceUID" not in path_keys:
        wanted += [t for t in DEFAULTS[STUDY] if t != RETRIEVE_URL]  # PS3.18 10.6.3.3.1
    if level == IMAGE and "SeriesInstanceUID" not in path_keys:
        wanted += [t for t in DEFAULTS[SERIES] if t != RETRIEVE_URL]
    for field_name in include:
        if field_name.lower() == "all":
            wanted += ALL[level]
        else:
            path = attribute_path(field_name)
            if path[-1] != RETRIEVE_URL and not _below(path[0], level):
                _put(identifier, path, None, field_name)
    for tag in wanted:
        _put(identifier, (tag,), None, keyword_for_tag(tag))
    return Search(level, identifier, limit, offset, fuzzy)


def identifier(level: str, matching: Iterable[tuple[str, str]], returned: Iterable[str]
               ) -> Dataset:
    """A C-FIND identifier at ``level`` with exactly these matching keys (keyword, value
    as a QIDO-RS parameter gives it) and return keys, without QIDO-RS's defaults."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level
    for keyword, value in matching:
        _put(ds, attribute_path(keyword), value, keyword)
    for keyword in returned:
        _put(ds, attribute_path(keyword), None, keyword)
    return ds


def _below(tag: int, level: str) -> bool:
    """Whether ``tag`` is an attribute of a level below ``level``: asked for with
    ``includefield`` it has no value to return, and is left out (as dcm4chee and Orthanc
    do) -- OHIF asks for Modality (0008,0060) in every study search.  As a matching key
    it is still refused, as C-FIND refuses it."""
    attribute = model.identifier_key(tag)
    return attribute is not None and attribute not in model.CONTROL_KEYS and \
        model.LEVELS.index(model.level_of(attribute)) > model.LEVELS.index(level)


def _count(name: str, value: str) -> int:
    text = value.strip()
    if not text.isdigit() or len(text) > 12:
        raise BadQuery(f"{name}: expected a non-negative integer, got {value[:20]!r}")
    return int(text)


def run(context: Context, decision: Decision, found: Search) -> Iterator[Dataset]:
    """C-FIND's answers to the identifier (raises QueryError as C-FIND refuses it)."""
    query = translate(found.identifier, model.STUDY, **context.query_options)
    answers = context.answers(decision, query, found.identifier, model.STUDY)
    return itertools.islice(answers, found.offset, None)


def to_json(answer: Dataset, level: str, base_url: str) -> dict[str, Any]:
    """One answer as DICOM JSON, with its Retrieve URL; without Query/Retrieve Level and
    Specific Character Set (JSON is UTF-8)."""
    data = dicomjson.to_json(answer, None)
    data.pop(f"{QUERY_RETRIEVE_LEVEL:08X}", None)
    data.pop(f"{SPECIFIC_CHARACTER_SET:08X}", None)
    url = retrieve_url(data, level, base_url)
    if url:
        data[f"{RETRIEVE_URL:08X}"] = {"vr": "UR", "Value": [url]}
    return dict(sorted(data.items()))


def _value(data: dict[str, Any], keyword: str) -> str | None:
    element = data.get(f"{tag_for_keyword(keyword):08X}") or {}
    values = element.get("Value") or []
    return str(values[0]) if values and values[0] else None


def retrieve_url(data: dict[str, Any], level: str, base_url: str) -> str | None:
    """The WADO-RS URL of the resource an answer describes."""
    study = _value(data, "StudyInstanceUID")
    if study is None:
        return None
    url = f"{base_url}/studies/{study}"
    if level in (SERIES, IMAGE):
        series = _value(data, "SeriesInstanceUID")
        if series is None:
            return None
        url += f"/series/{series}"
    if level == IMAGE:
        sop = _value(data, "SOPInstanceUID")
        if sop is None:
            return None
        url += f"/instances/{sop}"
    return url


__all__ = ["BadQuery", "QueryError", "Search", "identifier", "search", "run", "to_json"]

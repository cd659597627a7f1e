"""Metadata queries: how many patients, studies, series or instances match keys on any
attribute, grouped by the values of others ("series per SeriesDescription for
Modality=MR", "instances per StationName last month").

The keys are C-FIND keys (wild cards, lists, date ranges, ``""`` for no value),
translated by :func:`archive.query.pattern_filter`, the translation every query and
access rule uses; a standard attribute is named by keyword or tag, a private one by
tag (``0019,100C``), matched as text or, for a number, as a number (its VR is not
known here).  Values are counted as stored (DICOM JSON), a name's groups joined by
``=``, several values by ``\\``.

Two ways to count, one answer where the data agree:

- an entity (its unique key) is counted once per distinct combination of the
  grouping values among the matching documents below it, so a study holding a CT and
  an MR series counts under both when counting studies per Modality, and ``total``
  counts it once;
- the documents read (the *source*) are those of the highest level that stores every
  key and grouping attribute (its own level's and those above: ``model.stored_tags``),
  never above the counted level: series documents for "studies per Modality", one per
  series, matched on the level's indexed fields as C-FIND matches them (on the
  attributes of its most recently stored instance) -- a tenth of the documents for
  series of ten images.  Instance documents for private or instance attributes, and
  for a restricted caller: a restriction (the instances her Query rules let her see)
  is decided on each instance before the keys, as C-FIND does (:mod:`acl.visibility`),
  so her counts are those of an archive holding only what she may see.  On data
  without mixed entities both sources give the same counts.

Either way the documents are read in batches with a projection of only the fields
needed and counted in Python: FerretDB's aggregation pipeline is several times slower
(``benchmarks/bench_metadata_query.py``).  Pure except :func:`run`; the CLI (``archive
query``) and the console's ``/query`` page both call it.
"""

from __future__ import annotations

import base64
import csv
import io
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset, config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement

from archive.find import FIND_BATCH, Finder, fields_read, projection, server_filter
from archive.model import (
    COMPUTED_KEYS,
    CONTROL_KEYS,
    IMAGE,
    PATIENT,
    SERIES,
    STUDY,
    identifier_key,
    stored_tags,
)
from archive.model import LEVELS as LEVEL_ORDER
from archive.query import BINARY_VRS, QueryError, evaluate, pattern_filter

#: The levels a user names, and the level each stands for.
LEVELS: dict[str, str] = {"patients": PATIENT, "studies": STUDY, "series": SERIES,
                          "instances": IMAGE}
#: The field of an instance document naming the entity it belongs to at each level.
ENTITY_FIELD: dict[str, str] = {PATIENT: "PatientID", STUDY: "StudyInstanceUID",
                                SERIES: "SeriesInstanceUID", IMAGE: "_id"}
#: The counter of a level document holding its number of instances.
INSTANCES_COUNTER: dict[str, str] = {PATIENT: "NumberOfPatientRelatedInstances",
                                     STUDY: "NumberOfStudyRelatedInstances",
                                     SERIES: "NumberOfSeriesRelatedInstances"}
MAX_KEYS = 20
MAX_GROUP_BY = 3
#: Longest key or value accepted (a longer one is no attribute name nor DICOM value).
MAX_TEXT = 1024
#: Shown for values that have no text.
BINARY, BULK, SEQUENCE = "(binary)", "(bulk data)", "(sequence)"

_TAG = re.compile(r"\(?\s*([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\s*\)?")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


class MetadataQueryError(ValueError):
    """A query that cannot run: a key that names no attribute, a value its VR refuses.
    The message says which, and depends on the query only, never on the data."""


@dataclass(frozen=True)
class MetadataQuery:
    """What to count (``level``), which instances (``keys``: tag and C-FIND value as
    typed) and grouped by what (``group_by``: tags); ``filter`` selects instance
    documents, ``source_filter`` the documents of ``source``, the highest level storing
    every attribute used (IMAGE: the same as ``filter``)."""

    level: str
    keys: tuple[tuple[int, str], ...] = ()
    group_by: tuple[int, ...] = ()
    filter: dict[str, Any] = field(default_factory=dict)
    source: str = IMAGE
    source_filter: dict[str, Any] = field(default_factory=dict)

    @property
    def level_name(self) -> str:
        return next(name for name, level in LEVELS.items() if level == self.level)

    def describe(self) -> str:
        """One line: ``series by SeriesDescription where Modality=MR``."""
        text = self.level_name
        if self.group_by:
            text += " by " + ", ".join(key_name(t) for t in self.group_by)
        if self.keys:
            text += " where " + " ".join(f"{key_name(t)}={v}" for t, v in self.keys)
        return text


@dataclass(frozen=True)
class Result:
    """Counts of distinct entities per group (largest first), and over all groups."""

    query: MetadataQuery
    rows: list[tuple[tuple[str, ...], int]]
    total: int
    instances: int

    @property
    def columns(self) -> list[str]:
        return [key_name(t) for t in self.query.group_by] + [self.query.level_name]


# --- keys ------------------------------------------------------------------------------


def parse_key(text: str) -> int:
    """The tag a key names: a keyword, or ``gggg,eeee`` / ``(gggg,eeee)`` / ``ggggeeee``
    (any private tag; a public one must be in the DICOM dictionary)."""
    text = text.strip()
    tag = tag_for_keyword(text)
    if tag is None:
        found = _TAG.fullmatch(text)
        if found is None:
            raise MetadataQueryError(f"{text[:64]!r} is neither a DICOM keyword nor a tag")
        tag = int(found.group(1) + found.group(2), 16)
        if not is_private(tag) and _dictionary_vr(tag) is None:
            raise MetadataQueryError(f"{key_name(tag)} is not in the DICOM dictionary")
    tag = int(tag)
    if identifier_key(tag) != tag or tag in CONTROL_KEYS:
        raise MetadataQueryError(f"{key_name(tag)} is not an attribute of the datasets")
    if tag in COMPUTED_KEYS:
        raise MetadataQueryError(f"{key_name(tag)} is computed by the archive, not stored "
                                 "on instances: count at a level instead")
    return tag


def key_name(tag: int) -> str:
    """The keyword of a tag, or ``(gggg,eeee)`` when it has none (private ones)."""
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def is_private(tag: int) -> bool:
    return bool((tag >> 16) & 1)


def _dictionary_vr(tag: int) -> str | None:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return "US" if vr == "US or SS" else vr.split(" or ")[0]


def parse(level: str, keys: Iterable[str] = (), group_by: Iterable[str] = ()
          ) -> MetadataQuery:
    """A query from what a user types: a level name, ``KEY=VALUE`` items, keys to
    group by.  Raises MetadataQueryError naming the item at fault."""
    if level not in LEVELS:
        raise MetadataQueryError(f"level: {level[:20]!r} is not one of {', '.join(LEVELS)}")
    pairs: list[tuple[int, str]] = []
    for item in keys:
        if len(item) > MAX_TEXT:
            raise MetadataQueryError(f"{item[:40]!r}...: longer than {MAX_TEXT} characters")
        name, sep, value = item.partition("=")
        if not sep:
            raise MetadataQueryError(f"{item[:64]!r}: expected KEY=VALUE")
        tag = parse_key(name)
        if any(t == tag for t, _ in pairs):
            raise MetadataQueryError(f"{key_name(tag)} given twice")
        if not value.strip():
            raise MetadataQueryError(f'{key_name(tag)} has no value: write {key_name(tag)}=* '
                                     f'for any value, {key_name(tag)}="" for none')
        pairs.append((tag, value.strip()))
    if len(pairs) > MAX_KEYS:
        raise MetadataQueryError(f"at most {MAX_KEYS} keys")
    groups = tuple(parse_key(name) for name in group_by if name.strip())
    if len(set(groups)) != len(groups):
        raise MetadataQueryError("a key to group by is given twice")
    if len(groups) > MAX_GROUP_BY:
        raise MetadataQueryError(f"at most {MAX_GROUP_BY} keys to group by")
    for tag in groups:
        if _dictionary_vr(tag) in BINARY_VRS:
            raise MetadataQueryError(f"{key_name(tag)} is binary: it has no values to group")
    counted = LEVELS[level]
    used = {tag for tag, _ in pairs} | set(groups)
    source = next((lvl for lvl in LEVEL_ORDER[LEVEL_ORDER.index(counted):]
                   if lvl == IMAGE or used <= stored_tags(lvl)), IMAGE)
    return MetadataQuery(counted, tuple(pairs), groups, translate(pairs), source,
                         translate(pairs, source))


def translate(keys: Iterable[tuple[int, str]], level: str = IMAGE) -> dict[str, Any]:
    """The filter of the documents of ``level`` (instances unless said) the keys select
    ({}: all), each key translated by :func:`archive.query.pattern_filter` as a C-FIND
    key at that level (on its normalised, indexed fields where it has them)."""
    conditions = [condition for tag, value in keys
                  if (condition := _key_filter(tag, value, level))]
    if not conditions:
        return {}
    return conditions[0] if len(conditions) == 1 else {"$and": conditions}


def _key_filter(tag: int, value: str, level: str = IMAGE) -> dict[str, Any]:
    vr = _dictionary_vr(tag)
    if vr is None:  # private: as stored, text or number
        alternatives = [_pattern(tag, "LO", value, level)]
        if all(_NUMBER.fullmatch(v.strip()) for v in value.split("\\")) and \
                all(math.isfinite(float(v)) for v in value.split("\\")):
            alternatives.append(_pattern(tag, "FD", value, level))
        return alternatives[0] if len(alternatives) == 1 else {"$or": alternatives}
    if vr in BINARY_VRS:
        raise MetadataQueryError(f"{key_name(tag)} is binary ({vr}): it cannot be matched")
    if vr == "SQ":
        raise MetadataQueryError(f"{key_name(tag)} is a sequence: match the attributes "
                                 "of its items with the console's search or C-FIND")
    return _pattern(tag, vr, value, level)


def _pattern(tag: int, vr: str, value: str, level: str) -> dict[str, Any]:
    identifier = Dataset()
    try:
        # (wild cards and ranges are no valid values of their VR: not validated)
        identifier[tag] = DataElement(tag, vr, value, validation_mode=config.IGNORE)
        condition = pattern_filter(identifier, level)
    except QueryError as exc:
        raise MetadataQueryError(exc.comment) from None
    except (ValueError, OverflowError):
        raise MetadataQueryError(f"{key_name(tag)} is {vr}: {value[:40]!r} is not "
                                 "a value of it") from None
    if not condition:  # universal: * matches any value, and no value too
        return {}
    return condition


# --- values ----------------------------------------------------------------------------


def value_text(element: Any) -> str:
    """A stored DICOM JSON element as one line of text ("" when absent or empty):
    values joined with ``\\``, a name's groups with ``=``, binary values that are text
    (a private element of unknown VR) as that text."""
    if not isinstance(element, Mapping):
        return ""
    if "Value" in element:
        values = element["Value"]
        if element.get("vr") == "SQ":
            return SEQUENCE if values else ""
        if not isinstance(values, list):
            values = [values]
        return "\\".join(_one(v) for v in values)
    if "InlineBinary" in element:
        return _binary_text(element["InlineBinary"])
    if "BulkDataURI" in element:
        return BULK
    return ""


def _one(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Mapping):  # PN
        groups = [str(value.get(g, "")) for g in ("Alphabetic", "Ideographic", "Phonetic")]
        while groups and not groups[-1]:
            groups.pop()
        return "=".join(groups)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return str(value)


def _binary_text(encoded: Any) -> str:
    try:
        raw = base64.b64decode(str(encoded), validate=True)
        text = raw.rstrip(b"\0 ").decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return BINARY
    return text if text.isprintable() else BINARY


# --- counting --------------------------------------------------------------------------


def fields(query: MetadataQuery, restriction: Mapping[str, Any] | None,
           source: str = IMAGE) -> dict[str, int]:
    """The projection of a document of ``source``: what the filters read, the counted
    entity's key (and on a level document its instance counter), the grouping
    attributes."""
    wanted = {f"dataset.{tag:08X}" for tag in query.group_by}
    if source != query.level:  # (a document of the level is its entity: its _id)
        wanted.add(ENTITY_FIELD[query.level])
    if source == IMAGE:
        wanted |= {*fields_read(query.filter), *fields_read(dict(restriction or {}))}
    else:
        wanted |= {*fields_read(query.source_filter), INSTANCES_COUNTER[source]}
    return projection(wanted)


def count(query: MetadataQuery, docs: Iterable[Mapping[str, Any]],
          restriction: Mapping[str, Any] | None = None, source: str = IMAGE) -> Result:
    """The counts over documents of ``source`` (instances unless said; pure: what
    :func:`run` reads goes in).

    ``restriction`` (on instances) is decided first: the keys are never matched against
    a document it excludes."""
    if source != IMAGE and (restriction is not None or source != query.source):
        raise ValueError(f"{query.describe()}: not answerable from {source} documents")
    exact = query.filter if source == IMAGE else query.source_filter
    entity = "_id" if source == query.level else ENTITY_FIELD[query.level]
    counter = INSTANCES_COUNTER.get(source)
    groups: dict[tuple[str, ...], set[str]] = {}
    everyone: set[str] = set()
    instances = 0
    for doc in docs:
        if restriction is not None and not evaluate(restriction, doc):
            continue
        if exact and not evaluate(exact, doc):
            continue
        instances += int(doc.get(counter) or 0) if counter else 1
        name = str(doc.get(entity, ""))
        groups.setdefault(_values(query, doc), set()).add(name)
        everyone.add(name)
    rows = _ranked({values: len(names) for values, names in groups.items()})
    return Result(query, rows, len(everyone), instances)


def _values(query: MetadataQuery, doc: Mapping[str, Any]) -> tuple[str, ...]:
    dataset = doc.get("dataset") or {}
    return tuple(value_text(dataset.get(f"{tag:08X}")) for tag in query.group_by)


def _ranked(groups: Mapping[tuple[str, ...], int]) -> list[tuple[tuple[str, ...], int]]:
    return sorted(groups.items(), key=lambda row: (-row[1], row[0]))


def run(finder: Finder, query: MetadataQuery,
        restriction: Mapping[str, Any] | None = None) -> Result:
    """The counts over the stored instances ``restriction`` lets through (None: all):
    one find, its filter run by the database as far as it can cheaply
    (:func:`archive.find.server_filter`), every document then decided exactly."""
    if finder.barrier is not None:  # the store's batched updates written first
        finder.barrier()
    if restriction is None and query.source != IMAGE:
        docs = finder.collection(query.source).find(
            server_filter(query.source_filter), fields(query, None, query.source),
            batch_size=FIND_BATCH * 10)
        return count(query, docs, None, query.source)
    exact = [dict(c) for c in (restriction, query.filter) if c]
    pre_filter = server_filter(exact[0] if len(exact) == 1 else {"$and": exact}) \
        if exact else {}
    docs = finder.collection(IMAGE).find(pre_filter, fields(query, restriction),
                                         batch_size=FIND_BATCH * 10)
    return count(query, docs, restriction)


# --- output ----------------------------------------------------------------------------

#: A cell a spreadsheet would read as a formula (CSV injection) unless quoted by "'".
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def csv_text(result: Result) -> str:
    """The counts as CSV (RFC 4180): a header of the grouping keys and the level, one
    row per group, largest first.  A value a spreadsheet would take for a formula is
    prefixed with ``'`` (numbers are left alone)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(result.columns)
    for values, n in result.rows:
        writer.writerow([*(_cell(v) for v in values), n])
    return out.getvalue()


def _cell(value: str) -> str:
    if value.startswith(_FORMULA) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def table_text(result: Result) -> str:
    """The counts as aligned columns, for a terminal."""
    header = result.columns
    rows = [[*(v or "(none)" for v in values), str(n)] for values, n in result.rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < len(header) - 1 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in [header, *rows]]
    lines.append(f"{result.total} {result.query.level_name} in all "
                 f"({result.instances} matching instances)")
    return "\n".join(lines)

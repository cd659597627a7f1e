"""What a principal restricted by dataset patterns sees through C-FIND.

Semantics.  The visible instances are those whose instance document matches one of
the principal's patterns.  An entity at PATIENT, STUDY or SERIES level is visible iff
it contains at least one visible instance, and every computed key (Number of
Patient/Study/Series Related ..., Modalities in Study, SOP Classes in Study) counts
visible instances only, both in responses and when the identifier matches on it: a
restricted principal cannot learn that anything else exists.

Algorithm, for one entity and the patterns not yet decided for it:

- a pattern whose every key is stored in the entity's level document
  (``Compiled.at(level)``) decides the entity directly: if it matches, the entity and
  all its descendants are visible and the stored counters hold; if not, none of its
  descendants can match it either (they carry the same attributes);
- the other patterns are carried down the child lists (``patients.studies``,
  ``studies.series``, ``series.instances``), fetching children by ``_id`` (the only
  index lookup FerretDB 1.24 makes), to the instance documents, where every pattern
  decides; counts are summed over the visible children.

When every pattern decides at the query level, their OR is pushed into the search
itself (a scan filter, or checked while walking unique keys), so nothing is fetched
twice; otherwise each candidate is checked with :meth:`Visibility.visible`, which stops
at the first visible instance.  Results are memoised per request.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from acl.patterns import Compiled
from archive.find import CHILDREN, Finder
from archive.model import (
    COMPUTED_KEYS,
    COUNTERS,
    IMAGE,
    LEVELS,
    SERIES,
    SOP_CLASSES_IN_STUDY,
    STUDY,
    UNIQUE_KEY,
    level_of,
)
from archive.query import QUERY_RETRIEVE_LEVEL, Query, evaluate, translate

_CACHE_LIMIT = 50_000


@dataclass(frozen=True)
class Summary:
    """Visible content of one entity: counts of studies, series, instances (itself
    included), modalities and SOP classes."""

    studies: int = 0
    series: int = 0
    instances: int = 0
    modalities: frozenset[str] = frozenset()
    sop_classes: frozenset[str] = frozenset()

    def __add__(self, other: Summary) -> Summary:
        return Summary(self.studies + other.studies, self.series + other.series,
                       self.instances + other.instances, self.modalities | other.modalities,
                       self.sop_classes | other.sop_classes)

    def value(self, keyword: str) -> Any:
        """The value of a computed key, for the entity owning it."""
        if keyword == "ModalitiesInStudy":
            return sorted(self.modalities)
        if keyword == "SOPClassesInStudy":
            return sorted(self.sop_classes)
        if keyword.endswith("RelatedStudies"):
            return self.studies
        if keyword.endswith("RelatedSeries"):
            return self.series
        return self.instances


_EMPTY = Summary()
_ITSELF = {STUDY: Summary(studies=1), SERIES: Summary(series=1)}


def _set(*values: Any) -> frozenset[str]:
    return frozenset(str(v) for v in values if v)


class Visibility:
    """Visibility and visible counts of entities for one request."""

    def __init__(self, finder: Finder, patterns: Sequence[Compiled],
                 need_sop_classes: bool = False) -> None:
        self.finder = finder
        self.patterns = tuple(patterns)
        self.need_sop_classes = need_sop_classes
        self._all = tuple(range(len(self.patterns)))
        self._instance_projection: dict[str, int] = {"Modality": 1, "SOPClassUID": 1}
        for pattern in self.patterns:
            self._instance_projection.update(pattern.projection)
        self._docs: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._visible: dict[tuple[str, str, tuple[int, ...]], bool] = {}
        self._summaries: dict[tuple[str, str, tuple[int, ...]], Summary] = {}

    # -- deciding -----------------------------------------------------------------------

    def restriction(self, level: str) -> dict[str, Any] | None:
        """The OR of the patterns as a filter on ``level`` documents, when every
        pattern decides there; None when entities must be checked one by one."""
        filters = [pattern.at(level) for pattern in self.patterns]
        if not filters or any(f is None for f in filters):
            return None
        return filters[0] if len(filters) == 1 else {"$or": filters}

    def _split(self, level: str, doc: dict[str, Any],
               open_: tuple[int, ...]) -> tuple[bool, tuple[int, ...]]:
        """(whole entity visible, patterns left to its descendants)."""
        remaining = []
        for i in open_:
            condition = self.patterns[i].at(level)
            if condition is None:
                remaining.append(i)
            elif evaluate(condition, doc):
                return True, ()
        return False, tuple(remaining)

    def visible(self, level: str, doc: dict[str, Any],
                open_: tuple[int, ...] | None = None) -> bool:
        """Whether the entity holds at least one visible instance."""
        open_ = self._all if open_ is None else open_
        key = (level, str(doc["_id"]), open_)
        if key not in self._visible:
            whole, remaining = self._split(level, doc, open_)
            found = whole
            if not whole and remaining and level != IMAGE:
                child_level = LEVELS[LEVELS.index(level) + 1]
                for uid in self._children(level, doc):
                    child = self._fetch(child_level, uid)
                    if child is not None and self.visible(child_level, child, remaining):
                        found = True
                        break
            self._remember(self._visible, key, found)
        return self._visible[key]

    def summary(self, level: str, doc: dict[str, Any],
                open_: tuple[int, ...] | None = None) -> Summary:
        """What the entity holds that is visible."""
        open_ = self._all if open_ is None else open_
        key = (level, str(doc["_id"]), open_)
        if key not in self._summaries:
            whole, remaining = self._split(level, doc, open_)
            if whole:
                result = self._stored(level, doc)
            elif not remaining or level == IMAGE:
                result = _EMPTY
            else:
                child_level = LEVELS[LEVELS.index(level) + 1]
                result = _EMPTY
                for uid in self._children(level, doc):
                    child = self._fetch(child_level, uid)
                    if child is not None:
                        result += self.summary(child_level, child, remaining)
                if result.instances:
                    result += _ITSELF.get(level, _EMPTY)
            self._remember(self._summaries, key, result)
        return self._summaries[key]

    def _stored(self, level: str, doc: dict[str, Any]) -> Summary:
        """Summary of a wholly visible entity: its stored counters hold."""
        if level == IMAGE:
            return Summary(instances=1, modalities=_set(doc.get("Modality")),
                           sop_classes=_set(doc.get("SOPClassUID")))
        if level == SERIES:
            classes = frozenset()
            if self.need_sop_classes:
                for uid in self._children(SERIES, doc):
                    instance = self._fetch(IMAGE, uid)
                    classes |= _set((instance or {}).get("SOPClassUID"))
            return Summary(series=1, instances=doc.get("NumberOfSeriesRelatedInstances", 0),
                           modalities=_set(doc.get("Modality")), sop_classes=classes)
        if level == STUDY:
            return Summary(1, doc.get("NumberOfStudyRelatedSeries", 0),
                           doc.get("NumberOfStudyRelatedInstances", 0),
                           _set(*doc.get("ModalitiesInStudy", [])),
                           _set(*doc.get("SOPClassesInStudy", [])))
        return Summary(doc.get("NumberOfPatientRelatedStudies", 0),
                       doc.get("NumberOfPatientRelatedSeries", 0),
                       doc.get("NumberOfPatientRelatedInstances", 0))

    # -- computed keys ------------------------------------------------------------------

    def element(self, tag: int, level: str, doc: dict[str, Any]) -> DataElement:
        """A computed key of a response, over visible instances only."""
        vr = dictionary_VR(tag)
        owner_level = level_of(tag)
        owner = doc if owner_level == level else self.ancestor(owner_level, doc)
        if owner is None:
            return DataElement(tag, vr, None)
        value = self.summary(owner_level, owner).value(COMPUTED_KEYS[tag])
        if isinstance(value, list):
            return DataElement(tag, vr, value or None)
        return DataElement(tag, vr, str(value))

    def computed_fields(self, level: str, doc: dict[str, Any]) -> dict[str, Any]:
        """The fields a C-FIND filter reads for computed keys of ``level``, visible
        values instead of the stored ones."""
        summary = self.summary(level, doc)
        fields = {k: summary.value(k) for k, owner in COUNTERS.items() if owner == level}
        if level == STUDY:
            fields["ModalitiesInStudy"] = summary.value("ModalitiesInStudy")
            fields["SOPClassesInStudy"] = summary.value("SOPClassesInStudy")
        return fields

    def ancestor(self, level: str, doc: dict[str, Any]) -> dict[str, Any] | None:
        uid = doc.get(UNIQUE_KEY[level])
        return None if uid is None else self._fetch(level, uid)

    # -- fetching -----------------------------------------------------------------------

    def _children(self, level: str, doc: dict[str, Any]) -> list[str]:
        children = doc.get(CHILDREN[level])
        if children is None:  # a search result: fetched without its child list
            full = self._fetch(level, str(doc["_id"]))
            children = (full or {}).get(CHILDREN[level], [])
        return list(children)

    def _fetch(self, level: str, uid: str) -> dict[str, Any] | None:
        key = (level, uid)
        if key not in self._docs:
            projection = self._instance_projection if level == IMAGE else None
            doc = self.finder.collection(level).find_one({"_id": uid}, projection)
            self._remember(self._docs, key, doc)
        return self._docs[key]

    @staticmethod
    def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        cache[key] = value


# --- C-FIND ------------------------------------------------------------------------------


def _split_computed(query: Query, identifier: Dataset, model: str,
                    options: dict[str, Any]) -> tuple[Query, dict[str, Any]]:
    """The query without the computed keys that filter, and their filter alone.

    The stored counters count everything; a restricted principal's identifier must be
    matched against the visible counts instead (NumberOfStudyRelatedInstances=5 would
    otherwise tell that hidden instances exist).
    """
    filtering = [elem.tag for elem in identifier
                 if elem.tag in COMPUTED_KEYS and not elem.is_empty]
    if not filtering:
        return query, {}
    plain, computed = Dataset(), Dataset()  # new datasets: the caller's stays intact
    for tag in list(identifier.keys()):  # in the order received, as translate reads
        if tag not in filtering:
            plain.add(identifier[tag])
    computed.add(identifier[QUERY_RETRIEVE_LEVEL])
    for tag in filtering:
        computed.add(identifier[tag])
    plain_query = replace(translate(plain, model, **options), keys=query.keys)
    return plain_query, translate(computed, model, **options).filter


def responses(finder: Finder, query: Query, identifier: Dataset,
              patterns: Sequence[Compiled], model: str,
              **options: Any) -> Iterator[Dataset]:
    """C-FIND responses of a principal restricted by ``patterns`` (none of them empty).

    ``model`` ("PATIENT" or "STUDY") and ``options`` (those of
    :func:`archive.query.translate`) are needed to re-translate the identifier
    without its computed keys.
    """
    search_query, computed_filter = _split_computed(query, identifier, model, options)
    computed = tuple(tag for tag in query.keys if tag in COMPUTED_KEYS)
    need_sop = SOP_CLASSES_IN_STUDY in computed or SOP_CLASSES_IN_STUDY in identifier
    visibility = Visibility(finder, patterns, need_sop_classes=need_sop)
    restriction = visibility.restriction(query.level)
    # Finder.response fills computed keys from the stored counters: ask it for the
    # others only (it then needs no ancestors) and add the visible counts here.
    stored_keys = replace(query, keys=tuple(t for t in query.keys if t not in computed))
    charset = identifier.get("SpecificCharacterSet")
    for doc in finder.search(search_query, identifier, restriction):
        if restriction is None and not visibility.visible(query.level, doc):
            continue
        if computed_filter and not evaluate(computed_filter,
                                            visibility.computed_fields(query.level, doc)):
            continue
        response = finder.response(doc, stored_keys, identifier, None, charset)  # type: ignore[arg-type]
        for tag in computed:
            response.add(visibility.element(tag, query.level, doc))
        yield response

"""What a principal restricted by dataset patterns sees through C-FIND.

Semantics.  The visible instances are those whose instance document matches one of
the principal's patterns.  An entity at PATIENT, STUDY or SERIES level is visible iff
it contains at least one visible instance, and everything the principal learns about
it is computed over its visible instances only:

- every computed key (Number of Patient/Study/Series Related ..., Modalities in Study,
  SOP Classes in Study), in responses and when the identifier matches on it;
- its attributes: a level document holds the attributes of its most recently stored
  instance, which may be a hidden one when its instances disagree (a *mixed* study,
  holding instances of a visible and a hidden patient, or of two study descriptions);
  the principal sees, and her keys are matched against, the attributes of the most
  recently stored instance *she* may see (its *view*).

So the answers to a restricted principal are those the same queries would get from an
archive holding only what she may see, whatever else is stored (tests/unit/
test_visibility.py checks exactly that).

Order of work: the restriction first, then her keys.  The database pre-filters with
conditions whose cost does not depend on the values compared (equality, ranges,
prefixes: see :func:`archive.find.server_filter`); in Python, each candidate is first
decided visible or not, and only a visible one -- its view -- is matched against the
identifier, so a hidden document is never matched against her wild cards.

Algorithm, for one entity and the patterns not yet decided for it:

- a pattern whose every key is stored in the entity's level document
  (``Compiled.at(level)``) decides an entity whose instances all carry the same
  attributes (not mixed): if it matches, the entity and all its descendants are
  visible and the stored counters hold; if not, none of its descendants match it;
- the other patterns, and every pattern at a mixed entity, are carried down the child
  lists (``patients.studies``, ``studies.series``, ``series.instances``), fetching
  children by ``_id``, to the instance documents, where every pattern decides; counts
  are summed over the visible children.

Results are memoised per request.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from bson import ObjectId
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from acl.patterns import Compiled
from archive.answers import Syntax
from archive.find import Finder, answer_plan, exact_values, server_filter
from archive.levels import (
    CHILDREN,
    LATEST,
    MODALITY_COUNTS,
    SOP_CLASS_COUNTS,
    from_field_key,
    is_mixed,
    level_dataset,
    mixed_filter,
    normalised_fields,
)
from archive.model import (
    COMPUTED_KEYS,
    COUNTERS,
    IMAGE,
    LEVELS,
    PATIENT,
    SERIES,
    SOP_CLASSES_IN_STUDY,
    STUDY,
    UNIQUE_KEY,
    level_of,
)
from archive.query import QUERY_RETRIEVE_LEVEL, Query, evaluate, translate

_CACHE_LIMIT = 50_000
#: Level documents without their child lists.
_LEAN = dict.fromkeys(CHILDREN.values(), 0)
_OLDEST = ObjectId("0" * 24)


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


def _counted(doc: dict[str, Any], field: str) -> frozenset[str]:
    """Values a per-value counter of a series document counts at least once."""
    return frozenset(from_field_key(k) for k, n in (doc.get(field) or {}).items() if n > 0)


def _owner(level: str, doc: dict[str, Any], owner: str | None) -> str | None:
    """The patient whose instances count below ``doc``: a patient owns what is below it
    (its studies may hold other patients' instances too)."""
    return str(doc["_id"]) if level == PATIENT else owner


@dataclass(frozen=True)
class _Latest:
    """The most recently stored visible instance below an entity, as far as known:
    its file id and either the attributes it shares with a uniform document above it
    (``dataset``) or the ``_id`` of its instance document (``instance``)."""

    file_id: ObjectId
    dataset: dict[str, Any] | None = None
    instance: str | None = None


class Visibility:
    """Visibility, views and visible counts of entities for one request."""

    def __init__(self, finder: Finder, patterns: Sequence[Compiled],
                 need_sop_classes: bool = False) -> None:
        self.finder = finder
        self.patterns = tuple(patterns)
        self.need_sop_classes = need_sop_classes
        self._all = tuple(range(len(self.patterns)))
        self._instance_projection: dict[str, int] = {"Modality": 1, "SOPClassUID": 1,
                                                     "file_id": 1}
        for pattern in self.patterns:
            self._instance_projection.update(pattern.projection)
        self._docs: dict[tuple[str, str], dict[str, Any] | None] = {}
        # keyed by (level, _id, patterns still open, owning patient)
        self._visible: dict[tuple[Any, ...], bool] = {}
        self._summaries: dict[tuple[Any, ...], Summary] = {}
        self._latest: dict[tuple[Any, ...], _Latest | None] = {}

    # -- deciding -----------------------------------------------------------------------

    def pre_filter(self, level: str) -> dict[str, Any] | None:
        """A filter on ``level`` documents that every visible one satisfies (None:
        any may be visible): each pattern's conditions on what the level stores, for
        documents that are not mixed."""
        partials = [pattern.partial(level) for pattern in self.patterns]
        if not partials or any(not p for p in partials):
            return None
        either = partials[0] if len(partials) == 1 else {"$or": partials}
        return {"$or": [mixed_filter(level), either]}

    def _split(self, level: str, doc: dict[str, Any], open_: tuple[int, ...],
               owner: str | None = None) -> tuple[bool, tuple[int, ...]]:
        """(whole entity visible, patterns left to its descendants).

        ``owner``: only the instances of this patient count (walking down from a
        patient through studies that may hold other patients' instances too).
        """
        if owner is not None:
            if level == IMAGE or not is_mixed(doc, PATIENT):
                if doc.get("PatientID") != owner:
                    return False, ()  # none of the owner's instances here
            else:
                return False, open_  # instances of several patients: look below
        if level != IMAGE and is_mixed(doc, level):
            return False, open_
        remaining = []
        for i in open_:
            condition = self.patterns[i].at(level)
            if condition is None:
                remaining.append(i)
            elif evaluate(condition, doc):
                return True, ()
        return False, tuple(remaining)

    def visible(self, level: str, doc: dict[str, Any],
                open_: tuple[int, ...] | None = None, owner: str | None = None) -> bool:
        """Whether the entity holds at least one visible instance."""
        open_ = self._all if open_ is None else open_
        key = (level, str(doc["_id"]), open_, owner)
        if key not in self._visible:
            whole, remaining = self._split(level, doc, open_, owner)
            found = whole
            if not whole and remaining and level != IMAGE:
                child_level = LEVELS[LEVELS.index(level) + 1]
                below = _owner(level, doc, owner)
                for uid in self._children(level, doc):
                    child = self._fetch(child_level, uid)
                    if child is not None and self.visible(child_level, child, remaining,
                                                          below):
                        found = True
                        break
            self._remember(self._visible, key, found)
        return self._visible[key]

    def summary(self, level: str, doc: dict[str, Any],
                open_: tuple[int, ...] | None = None, owner: str | None = None) -> Summary:
        """What the entity holds that is visible."""
        open_ = self._all if open_ is None else open_
        key = (level, str(doc["_id"]), open_, owner)
        if key not in self._summaries:
            whole, remaining = self._split(level, doc, open_, owner)
            if whole:
                result = self._stored(level, doc)
            elif not remaining or level == IMAGE:
                result = _EMPTY
            else:
                child_level = LEVELS[LEVELS.index(level) + 1]
                below = _owner(level, doc, owner)
                result = _EMPTY
                for uid in self._children(level, doc):
                    child = self._fetch(child_level, uid)
                    if child is not None:
                        result += self.summary(child_level, child, remaining, below)
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
            return Summary(series=1, instances=doc.get("NumberOfSeriesRelatedInstances", 0),
                           modalities=_counted(doc, MODALITY_COUNTS),
                           sop_classes=_counted(doc, SOP_CLASS_COUNTS))
        if level == STUDY:
            return Summary(1, doc.get("NumberOfStudyRelatedSeries", 0),
                           doc.get("NumberOfStudyRelatedInstances", 0),
                           _set(*doc.get("ModalitiesInStudy", [])),
                           _set(*doc.get("SOPClassesInStudy", [])))
        return Summary(doc.get("NumberOfPatientRelatedStudies", 0),
                       doc.get("NumberOfPatientRelatedSeries", 0),
                       doc.get("NumberOfPatientRelatedInstances", 0))

    # -- what the principal sees of an entity -----------------------------------------

    def view(self, level: str, doc: dict[str, Any]) -> dict[str, Any]:
        """The entity as the principal sees it: the document itself when its instances
        agree on its attributes, else built from the most recently stored visible one
        (the document an archive holding only visible instances would have)."""
        if not any(is_mixed(doc, lvl) for lvl in LEVELS[: LEVELS.index(level) + 1]
                   if lvl != IMAGE):
            return doc
        latest = self._latest_visible(level, doc, self._all)
        if latest is None:
            return doc
        data = latest.dataset
        if data is None and latest.instance is not None:
            full = self.finder.collection(IMAGE).find_one({"_id": latest.instance},
                                                          {"dataset": 1})
            data = (full or {}).get("dataset", {})
        data = data or {}
        view = {k: v for k, v in doc.items() if k not in ("dataset", "_id")}
        view.update(normalised_fields(level, data))
        view["_id"] = doc["_id"]
        view["dataset"] = level_dataset(level, data)
        return view

    def _latest_visible(self, level: str, doc: dict[str, Any], open_: tuple[int, ...],
                        owner: str | None = None) -> _Latest | None:
        key = (level, str(doc["_id"]), open_, owner)
        if key not in self._latest:
            whole, remaining = self._split(level, doc, open_, owner)
            result: _Latest | None = None
            if whole and level == IMAGE:
                result = _Latest(doc.get("file_id") or _OLDEST, instance=str(doc["_id"]))
            elif whole:  # not mixed: every instance below carries these attributes
                result = _Latest(doc.get(LATEST) or _OLDEST, dataset=doc.get("dataset", {}))
            elif remaining and level != IMAGE:
                child_level = LEVELS[LEVELS.index(level) + 1]
                below = _owner(level, doc, owner)
                for uid in self._children(level, doc):
                    child = self._fetch(child_level, uid)
                    if child is None:
                        continue
                    found = self._latest_visible(child_level, child, remaining, below)
                    if found is not None and (result is None or found.file_id > result.file_id):
                        result = found
            self._remember(self._latest, key, result)
        return self._latest[key]

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
              patterns: Sequence[Compiled], model: str, syntax: Syntax | None = None,
              **options: Any) -> Iterator[Dataset]:
    """C-FIND responses of a principal restricted by ``patterns`` (none of them empty).

    ``model`` ("PATIENT" or "STUDY") and ``options`` (those of
    :func:`archive.query.translate`) are needed to re-translate the identifier
    without its computed keys; ``syntax`` is as for :meth:`Finder.responses`.
    """
    search_query, computed_filter = _split_computed(query, identifier, model, options)
    computed = tuple(tag for tag in query.keys if tag in COMPUTED_KEYS)
    need_sop = SOP_CLASSES_IN_STUDY in computed or SOP_CLASSES_IN_STUDY in identifier
    visibility = Visibility(finder, patterns, need_sop_classes=need_sop)
    level = query.level
    # The database may drop documents on her keys only where a document is its own
    # view (not mixed); the restriction's own pre-filter comes first.
    conditions = []
    restriction = visibility.pre_filter(level)
    if restriction:
        conditions.append(server_filter(restriction))
    if search_query.filter:
        conditions.append({"$or": [mixed_filter(level), server_filter(search_query.filter)]})
    pre_filter = {"$and": conditions} if len(conditions) > 1 else \
        (conditions[0] if conditions else None)
    # Finder.response fills computed keys from the stored counters: ask it for the
    # others only (it then needs no ancestors) and add the visible counts here.
    stored_keys = replace(query, keys=tuple(t for t in query.keys if t not in computed))
    plan = answer_plan(stored_keys, identifier, syntax)
    for doc in _candidates(finder, level, identifier, pre_filter):
        if not visibility.visible(level, doc):  # the restriction first
            continue
        view = visibility.view(level, doc)
        if not evaluate(search_query.filter, view):
            continue
        if computed_filter and not evaluate(computed_filter,
                                            visibility.computed_fields(level, doc)):
            continue
        response = finder.response(view, stored_keys, identifier, None, plan)
        for tag in computed:  # ancestors as the view names them
            response.add(visibility.element(tag, level, view))
        yield response


def _candidates(finder: Finder, level: str, identifier: Dataset,
                pre_filter: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    """Level documents that may be visible and match: those below the entities the
    identifier's unique keys name, found through the child lists, else a find with
    ``pre_filter``.

    A level document holds the keys of its most recently stored instance: a study
    holding instances of two patients (an accepted hierarchy conflict) is in both
    patients' child lists but names one of them, so an indexed find on the ancestor's
    key would miss it for the other patient, whose view of the study names her.
    """
    start = None
    for candidate in reversed(LEVELS[: LEVELS.index(level) + 1]):
        values = exact_values(identifier, UNIQUE_KEY[candidate])
        if values is not None:
            start = candidate, values
            break
    if start is None:
        yield from finder.find(level, pre_filter)
        return
    if finder.barrier is not None:
        finder.barrier()
    yield from _walk(finder, *start, level)


def _walk(finder: Finder, level: str, ids: list[str], target: str) -> Iterator[dict[str, Any]]:
    """Documents of ``target`` below the ``ids`` of ``level``, by ``_id``."""
    if level == target:
        yield from _by_id(finder, level, ids, _LEAN)
        return
    child = LEVELS[LEVELS.index(level) + 1]
    for parent in _by_id(finder, level, ids, {CHILDREN[level]: 1}):
        yield from _walk(finder, child, parent.get(CHILDREN[level], []), target)


#: ``_id`` values per find: a ``$in`` on an index is searched in it (FerretDB patch 05
#: up to 1,000 values).
_ID_BATCH = 500


def _by_id(finder: Finder, level: str, ids: list[str],
           fields: dict[str, int]) -> Iterator[dict[str, Any]]:
    ids = list(dict.fromkeys(ids))
    for start in range(0, len(ids), _ID_BATCH):
        batch = ids[start:start + _ID_BATCH]
        yield from finder.collection(level).find({"_id": {"$in": batch}}, fields,
                                                 batch_size=_ID_BATCH)

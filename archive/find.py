"""Running a translated C-FIND query and building its responses.

Planning.  FerretDB (SQLite handler) executes only ``{_id: value}`` as an index lookup;
any other filter reads the whole collection.  The level documents are keyed by the
unique key of their level and list their children (``patients.studies``,
``studies.series``, ``series.instances``), so a query that names a unique key (Study
Instance UID, Series Instance UID, Patient ID, SOP Instance UID) walks down from there
by ``_id`` and checks each candidate with :func:`archive.query.evaluate` -- the same
filter MongoDB would run.  A query naming no unique key scans the level's collection
with the filter: studies, series and patients are few compared with instances.

Responses carry exactly the requested keys, plus Query/Retrieve Level and Specific
Character Set; keys the archive computes come from the counters of the level
documents, never from counting instances.
"""

from __future__ import annotations

import codecs
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.valuerep import PersonName
from pymongo.collection import Collection
from pymongo.database import Database

from archive import dicomjson, matching, model
from archive.model import IMAGE, LEVELS, PATIENT, SERIES, STUDY
from archive.query import Query, evaluate

#: Lookups by ``_id`` in flight per query (see :meth:`Finder.fetch`); the pool is
#: shared by all associations.
FETCH_WINDOW = 4
_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fetch")

#: The field of a level document listing the ``_id`` of its children.
CHILDREN = {PATIENT: "studies", STUDY: "series", SERIES: "instances"}
#: Fields a response never needs: the child lists can be long.
_LEAN = {"studies": 0, "series": 0, "instances": 0}

_RETRIEVE_AE_TITLE = 0x00080054
_INSTANCE_AVAILABILITY = 0x00080056


def server_filter(filter_: Any) -> Any:
    """A filter the database can run cheaply that matches at least what ``filter_``
    matches; the exact filter is then applied to what comes back with :func:`evaluate`.

    - Wild cards become their literal prefix (``^DOE``, which an index serves), or no
      condition at all: a server never runs a pattern whose cost depends on the value
      it is compared with (PCRE back-tracks; ``archive.matching`` does not).
    - FerretDB 1.24 ignores ``$elemMatch`` on sub-documents (it matches nothing), so
      each condition of a sequence item becomes a dotted path.
    """
    if isinstance(filter_, list):
        return [server_filter(f) for f in filter_]
    if not isinstance(filter_, dict):
        return filter_
    result: dict[str, Any] = {}
    conditions: list[dict[str, Any]] = []
    for key, value in filter_.items():
        if isinstance(value, dict) and _on_documents(value.get("$elemMatch")):
            inner = server_filter(value["$elemMatch"])
            conditions.extend(_prefixed(key, inner))
        elif isinstance(value, dict) and "$regex" in value:
            prefix = matching.prefix_regex(value["$regex"])
            if prefix is not None:
                result[key] = {"$regex": prefix, **({"$options": value["$options"]}
                                                    if "$options" in value else {})}
        else:
            result[key] = server_filter(value)
    if conditions:
        return {"$and": [result, *conditions]} if result else {"$and": conditions}
    return result


def _on_documents(elem_match: Any) -> bool:
    """Whether an ``$elemMatch`` tests fields of sub-documents (not scalar elements)."""
    return isinstance(elem_match, dict) and any(
        not k.startswith("$") or k in ("$and", "$or") for k in elem_match)


def _prefixed(prefix: str, filter_: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for key, value in filter_.items():
        if key in ("$and", "$or"):
            out.append({key: [{"$and": _prefixed(prefix, f)} for f in value]})
        else:
            out.append({f"{prefix}.{key}": value})
    return out


def unique_key_filter(identifier: Dataset, level: str) -> dict[str, Any]:
    """The identifier's unique keys at and above ``level`` as a filter on instance
    documents (which carry every level's unique key as a normalised field)."""
    conditions = []
    for lvl in LEVELS[: LEVELS.index(level) + 1]:
        keyword = model.UNIQUE_KEY[lvl]
        values = exact_values(identifier, keyword)
        if values is not None:
            conditions.append({keyword: {"$in": values}})
    return conditions[0] if len(conditions) == 1 else {"$and": conditions} if conditions else {}


def exact_values(identifier: Dataset, keyword: str) -> list[str] | None:
    """Values of a unique key that name entities exactly (no wildcard, not universal);
    None when the key does not name any.

    A file meta alias of the key ((0002,0003) for SOP Instance UID) names them too:
    given alone it stands for the key, given beside it only the UIDs both name remain
    (an empty list: nothing can match).
    """
    tag = tag_for_keyword(keyword)
    values = _exact(identifier, tag) if tag is not None else None
    for alias, attribute in model.FILE_META_ALIASES.items():
        if attribute == tag:
            aliased = _exact(identifier, alias)
            if aliased is not None:
                values = aliased if values is None else [v for v in values if v in aliased]
    return values


def _exact(identifier: Dataset, tag: int) -> list[str] | None:
    elem = identifier.get(tag)
    if elem is None or elem.value in (None, "", []):
        return None
    values = [str(v).strip() for v in (elem.value if elem.VM > 1 else [elem.value])]
    values = [v for v in values if v]
    if not values or any("*" in v or "?" in v for v in values):
        return None
    return values


@dataclass
class Finder:
    """Executes queries on one database."""

    db: Database
    ae_title: str = "ARCHIVE"
    #: Called before level documents are read: writes the store's batched updates, so
    #: a C-FIND right after a C-STORE on this node counts it.
    barrier: Callable[[], None] | None = None
    _collections: dict[str, Collection] = field(default_factory=dict)

    def collection(self, level: str) -> Collection:
        if level not in self._collections:
            self._collections[level] = self.db[model.COLLECTION[level]]
        return self._collections[level]

    # -- matching ---------------------------------------------------------------------

    def search(self, query: Query, identifier: Dataset,
               restriction: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Level documents matching the query (and the restriction), one at a time.

        The restriction is decided first, so that the query's conditions are never
        evaluated on a document the restriction excludes.
        """
        exact = query.filter if not restriction else {"$and": [restriction, query.filter]}
        for doc in self.candidates(query.level, identifier, server_filter(exact)):
            if evaluate(exact, doc):
                yield doc

    def candidates(self, level: str, identifier: Dataset,
                   pre_filter: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Level documents that may match: those the identifier's unique keys name
        (walked down by ``_id``), else a scan of the level with ``pre_filter`` (a
        :func:`server_filter`).  The caller decides each one exactly."""
        if self.barrier is not None:
            self.barrier()
        start = self._navigation_start(level, identifier)
        if start is None:
            yield from self.collection(level).find(pre_filter or {}, _LEAN, batch_size=500)
            return
        start_level, ids = start
        yield from self._walk(start_level, ids, level)

    def _navigation_start(self, level: str, identifier: Dataset) -> tuple[str, list[str]] | None:
        """The deepest level at or above ``level`` whose unique key names entities."""
        for candidate in reversed(LEVELS[: LEVELS.index(level) + 1]):
            values = exact_values(identifier, model.UNIQUE_KEY[candidate])
            if values is not None:
                return candidate, values
        return None

    def _walk(self, level: str, ids: list[str], target: str) -> Iterator[dict[str, Any]]:
        coll = self.collection(level)
        if level == target:
            yield from self.fetch(coll, list(dict.fromkeys(ids)), _LEAN)
            return
        child = LEVELS[LEVELS.index(level) + 1]
        for uid in dict.fromkeys(ids):
            parent = coll.find_one({"_id": uid}, {CHILDREN[level]: 1})
            if parent is not None:
                yield from self._walk(child, parent.get(CHILDREN[level], []), target)

    def fetch(self, coll: Collection, ids: list[str],
              projection: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Documents by ``_id``, in order, a few lookups in flight at a time.

        FerretDB spends most of a lookup decoding the document (~0.75 ms per KiB of
        DICOM JSON): concurrent lookups let it use the second core while responses are
        built, with at most ``FETCH_WINDOW`` documents held ahead of the consumer.
        """
        if len(ids) <= 1:
            for uid in ids:
                doc = coll.find_one({"_id": uid}, projection)
                if doc is not None:
                    yield doc
            return
        pending: deque[Future[dict[str, Any] | None]] = deque()
        remaining = iter(ids)
        try:
            for uid in itertools.islice(remaining, FETCH_WINDOW):
                pending.append(_POOL.submit(coll.find_one, {"_id": uid}, projection))
            while pending:
                doc = pending.popleft().result()
                uid = next(remaining, None)
                if uid is not None:
                    pending.append(_POOL.submit(coll.find_one, {"_id": uid}, projection))
                if doc is not None:
                    yield doc
        finally:  # a cancelled query: drop what is still queued
            for future in pending:
                future.cancel()

    def instances(self, level: str, identifier: Dataset,
                  restriction: dict[str, Any] | None = None,
                  projection: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Instance documents a retrieve identifier selects (PS3.4 C.4.2.2.1).

        The identifier's unique keys are matched on each instance document itself --
        never on a level document, whose attributes are those of its most recently
        stored instance -- and after ``restriction`` (an access rule on instances):
        a study holding instances of two patients gives each patient only their own.
        Each comes without its ``dataset`` unless the restriction needs it (``projection``:
        the fields it reads).
        """
        keys = unique_key_filter(identifier, level)
        exact = keys if not restriction else {"$and": [restriction, keys]}
        if projection is None and not restriction:
            projection = {"dataset": 0}
        coll = self.collection(IMAGE)
        for doc in self.candidates(level, identifier):
            ids = [doc["_id"]] if level == IMAGE else list(self._descendants(level, doc["_id"]))
            for inst in self.fetch(coll, ids, projection):
                if evaluate(exact, inst):
                    inst.pop("dataset", None)
                    yield inst

    def _descendants(self, level: str, uid: str) -> Iterator[str]:
        """``_id`` of the instances below one entity, depth first."""
        if level == IMAGE:
            yield uid
            return
        parent = self.collection(level).find_one({"_id": uid}, {CHILDREN[level]: 1})
        child = LEVELS[LEVELS.index(level) + 1]
        for child_uid in (parent or {}).get(CHILDREN[level], []):
            yield from self._descendants(child, child_uid)

    # -- responses --------------------------------------------------------------------

    def responses(self, query: Query, identifier: Dataset,
                  restriction: dict[str, Any] | None = None) -> Iterator[Dataset]:
        ancestors = _Ancestors(self)
        charset = identifier.get("SpecificCharacterSet")
        for doc in self.search(query, identifier, restriction):
            yield self.response(doc, query, identifier, ancestors, charset)

    def response(self, doc: dict[str, Any], query: Query, identifier: Dataset,
                 ancestors: _Ancestors, charset: Any = None) -> Dataset:
        ds = Dataset()
        stored = doc.get("dataset", {})
        for tag in query.keys:
            requested = identifier[tag]
            elem = self._computed(tag, doc, query.level, ancestors)
            if elem is None:
                elem = _stored_element(tag, requested, stored)
            ds.add(elem)
        ds.QueryRetrieveLevel = query.level
        ds.SpecificCharacterSet = _character_set(ds, charset)
        return ds

    def _computed(self, tag: int, doc: dict[str, Any], level: str,
                  ancestors: _Ancestors) -> DataElement | None:
        vr = dictionary_VR(tag) if tag in model.COMPUTED_KEYS or tag in model.CONTROL_KEYS \
            else None
        if tag == _RETRIEVE_AE_TITLE:
            return DataElement(tag, "AE", self.ae_title)
        if tag == _INSTANCE_AVAILABILITY:
            return DataElement(tag, "CS", "ONLINE")
        if tag not in model.COMPUTED_KEYS:
            return None
        owner_level = model.level_of(tag)
        owner = doc if owner_level == level else ancestors.get(owner_level, doc)
        if owner is None:
            return DataElement(tag, vr, None)
        if tag in (model.MODALITIES_IN_STUDY, model.SOP_CLASSES_IN_STUDY):
            values = [v for v in owner.get(model.COMPUTED_KEYS[tag], []) if v]
            return DataElement(tag, vr, values or None)
        count = owner.get(model.COMPUTED_KEYS[tag])
        return DataElement(tag, vr, str(count) if count is not None else None)


class _Ancestors:
    """Level documents above the responses, fetched once per query."""

    def __init__(self, finder: Finder) -> None:
        self.finder = finder
        self.cache: dict[tuple[str, str], dict[str, Any] | None] = {}

    def get(self, level: str, doc: dict[str, Any]) -> dict[str, Any] | None:
        uid = doc.get(model.UNIQUE_KEY[level])  # a level document names its ancestors
        if uid is None:
            return None
        key = (level, uid)
        if key not in self.cache:
            if len(self.cache) > 10000:
                self.cache.clear()
            self.cache[key] = self.finder.collection(level).find_one({"_id": uid}, _LEAN)
        return self.cache[key]


def _stored_element(tag: int, requested: DataElement, stored: dict[str, Any]) -> DataElement:
    """The stored value of a requested key, restricted to the requested sub-keys."""
    vr = requested.VR if requested.VR not in ("UN", None) else _dictionary_vr(tag)
    data = stored.get(f"{tag:08X}")
    if data is None:
        return DataElement(tag, vr, [] if vr == "SQ" else None)
    try:
        elem = dicomjson.from_json({f"{tag:08X}": data})[tag]
    except Exception:  # noqa: BLE001 - a value that no longer converts: answer empty
        return DataElement(tag, vr, [] if vr == "SQ" else None)
    if elem.VR == "SQ" and requested.VR == "SQ" and requested.value:
        wanted = requested.value[0]
        elem.value = Sequence([_restrict(item, wanted) for item in elem.value])
    return elem


def _restrict(item: Dataset, wanted: Dataset) -> Dataset:
    """An item with only the sub-keys the identifier's item asks for."""
    out = Dataset()
    for sub in wanted:
        if sub.tag in item:
            value = item[sub.tag]
            if value.VR == "SQ" and sub.VR == "SQ" and sub.value:
                value.value = Sequence([_restrict(i, sub.value[0]) for i in value.value])
            out.add(value)
        else:
            out.add(DataElement(sub.tag, sub.VR, [] if sub.VR == "SQ" else None))
    return out


def _dictionary_vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0] if " or " in vr else vr


def _texts(ds: Dataset) -> Iterator[str]:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                yield from _texts(item)
            continue
        values = elem.value if isinstance(elem.value, list | tuple) or (
            elem.VM > 1 and not isinstance(elem.value, str | bytes)) else [elem.value]
        for value in values:
            if isinstance(value, PersonName):
                yield str(value)
            elif isinstance(value, str):
                yield value


#: Character sets kept for a response when they can represent it: the single-byte
#: ones whose Python codec encodes exactly what pydicom writes for them.  Anything else
#: (ISO 2022 code extensions, JIS X 0201, the undefined "ISO_IR 6") falls back to UTF-8.
_SINGLE_BYTE = frozenset({
    "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 126", "ISO_IR 127",
    "ISO_IR 138", "ISO_IR 144", "ISO_IR 148", "ISO_IR 166", "ISO_IR 203",
})


def _character_set(ds: Dataset, requested: Any) -> Any:
    """The identifier's character set if it can represent the response, else UTF-8.

    ``requested`` is the identifier's Specific Character Set value (absent, one term,
    or several for ISO 2022 code extensions).
    """
    texts = [t for t in _texts(ds) if t]
    if all(t.isascii() for t in texts):
        return requested if requested is not None else ""
    if isinstance(requested, str) and requested in _SINGLE_BYTE:
        try:
            for text in texts:
                codecs.encode(text, python_encoding[requested])
            return requested
        except (UnicodeEncodeError, LookupError):
            pass
    return "ISO_IR 192"

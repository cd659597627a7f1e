"""Running a translated C-FIND query and building its responses.

Planning.  Every query is one find on its level's collection with a filter the
database runs on its indexes (:func:`server_filter`: the unique keys, Patient ID and
Name, dates, Accession Number, Modality, SOP Class are indexed top-level fields, see
``model.INDEXES``); each document found is then decided exactly with
:func:`archive.query.evaluate`, the same filter MongoDB would run.  MongoDB and the
embedded FerretDB (patch 05 pushes conditions on indexed fields down to SQLite) take
the same path.  A find reads only the fields its filter and its answers need
(:func:`fields_read`): an IMAGE answer a handful of DICOM JSON members, a retrieve its
file and SOP Class.

Responses carry exactly the requested keys, plus Query/Retrieve Level and Specific
Character Set; keys the archive computes come from the counters of the level
documents, never from counting instances.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable, Iterator
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

from archive import answers, dicomjson, matching, model
from archive.levels import CHILDREN
from archive.model import IMAGE, LEVELS, UNIQUE_KEY
from archive.query import QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET, Query, evaluate

#: Fields a level document's response never needs: the child lists can be long.
_LEAN = dict.fromkeys(CHILDREN.values(), 0)
#: Documents per round trip of a find: responses stream while the next ones are read.
FIND_BATCH = 100
#: What a retrieve reads of each instance document beside what its filter reads.
_RETRIEVED = ("file_id", "SOPClassUID", "TransferSyntaxUID")

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


def fields_read(filter_: Any) -> set[str]:
    """The fields a filter reads, as projection paths: top-level fields, and
    ``dataset.<tag>`` for DICOM JSON members (whatever the filter reads inside them)."""
    fields: set[str] = set()
    if isinstance(filter_, list):
        for item in filter_:
            fields |= fields_read(item)
    elif isinstance(filter_, dict):
        for key, value in filter_.items():
            if key in ("$and", "$or", "$nor"):
                fields |= fields_read(value)
            elif not key.startswith("$"):
                fields.add(".".join(key.split(".")[:2]) if key.startswith("dataset.")
                           else key.split(".")[0])
    return fields


def projection(fields: Iterable[str]) -> dict[str, int]:
    """An inclusion projection of ``fields``, without a path inside another (which
    MongoDB refuses as a collision)."""
    wanted = set(fields)
    return {f: 1 for f in sorted(wanted)
            if not any(f.startswith(other + ".") for other in wanted)}


def answer_projection(query: Query, exact: dict[str, Any]) -> dict[str, int]:
    """What a search reads of each document: what ``exact`` reads, the requested
    attributes, the counters of requested computed keys and the hierarchy keys (the
    ancestors' computed keys).  A level document holds its level's whole dataset and
    counters: FerretDB took 0.8 ms to send a study's three series documents whole
    (without their child lists), 0.5 ms to send what their answers read."""
    return projection({*fields_read(exact), *UNIQUE_KEY.values(),
                       *(f"dataset.{tag:08X}" for tag in query.keys),
                       *(model.COMPUTED_KEYS[tag] for tag in query.keys
                         if tag in model.COMPUTED_KEYS)})


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


#: Keys each value of which names one entity, the most specific first (an instance
#: document's ``_id`` is its SOP Instance UID, a level document's its unique key).
_NAMING_KEYS = ("_id", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


def narrowest(pre_filter: dict[str, Any]) -> dict[str, Any]:
    """The condition of ``pre_filter`` on its most specific naming key, when one of its
    conjuncts is such a condition (equality or ``$in``), else ``pre_filter``: a superset.

    The few documents such a condition selects are cheaper to decide in Python than
    every other condition is in the database: SQLite would pick one index (without
    statistics, the first: a study's for the IMAGE answers of one series) and evaluate
    each other condition with ``json_extract`` on the stored text of every candidate,
    three times the cost of the whole find here; MongoDB, too, fetches the documents of
    one index and filters them.
    """
    conjuncts = _conjuncts(pre_filter)
    for key in _NAMING_KEYS:
        for condition in conjuncts:
            if _names_entities(condition, key):
                return condition
    return pre_filter


def _conjuncts(filter_: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for key, value in filter_.items():
        if key == "$and":
            for item in value:
                out.extend(_conjuncts(item))
        else:
            out.append({key: value})
    return out


def _names_entities(condition: dict[str, Any], key: str) -> bool:
    value = condition.get(key)
    if isinstance(value, str):
        return True
    return (isinstance(value, dict) and list(value) == ["$in"]
            and isinstance(value["$in"], list)
            and all(isinstance(v, str) for v in value["$in"]))


def by_id(identifier: Dataset, level: str, pre_filter: dict[str, Any]) -> dict[str, Any]:
    """``pre_filter`` narrowed to the ``_id`` values the identifier names, if it names
    any: each level document's ``_id`` is its unique key, which no other index holds."""
    values = exact_values(identifier, UNIQUE_KEY[level])
    if values is None:
        return pre_filter
    ids = {"_id": {"$in": values}}
    return {"$and": [ids, pre_filter]} if pre_filter else ids


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


@dataclass(frozen=True)
class Plan:
    """One find: the filter the database runs (on its indexes), the exact filter
    decided on each document it returns, and the fields read."""

    pre_filter: dict[str, Any]
    exact: dict[str, Any]
    fields: dict[str, int]


def search_plan(query: Query, identifier: Dataset,
                restriction: dict[str, Any] | None = None) -> Plan:
    """The find of a C-FIND on its level's collection."""
    exact = query.filter if not restriction else {"$and": [restriction, query.filter]}
    return Plan(narrowest(by_id(identifier, query.level, server_filter(exact))), exact,
                answer_projection(query, exact))


def retrieve_plan(level: str, identifier: Dataset,
                  restriction: dict[str, Any] | None = None) -> Plan:
    """The find of a retrieve on the instance documents.

    The identifier's unique keys are matched on each instance document itself --
    never on a level document, whose attributes are those of its most recently
    stored instance -- and after ``restriction`` (an access rule on instances):
    a study holding instances of two patients gives each patient only their own.
    """
    keys = unique_key_filter(identifier, level)
    exact = keys if not restriction else {"$and": [restriction, keys]}
    return Plan(narrowest(by_id(identifier, IMAGE, server_filter(exact))), exact,
                projection({*fields_read(exact), *_RETRIEVED}))


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
        plan = search_plan(query, identifier, restriction)
        for doc in self.find(query.level, plan.pre_filter, plan.fields):
            if evaluate(plan.exact, doc):
                yield doc

    def find(self, level: str, pre_filter: dict[str, Any] | None,
             fields: dict[str, int] | None = None) -> Iterator[dict[str, Any]]:
        """Documents of ``level`` that may match: ``pre_filter`` is a
        :func:`server_filter`; the caller decides each one exactly.  Level documents come
        without their child lists unless ``fields`` says otherwise."""
        if self.barrier is not None:
            self.barrier()
        yield from self.collection(level).find(pre_filter or {}, fields or _LEAN,
                                               batch_size=FIND_BATCH)

    def instances(self, level: str, identifier: Dataset,
                  restriction: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Instance documents a retrieve identifier selects (PS3.4 C.4.2.2.1), with
        their file, SOP Class and Transfer Syntax (and what ``restriction`` reads)."""
        plan = retrieve_plan(level, identifier, restriction)
        for inst in self.collection(IMAGE).find(plan.pre_filter, plan.fields,
                                                batch_size=FIND_BATCH):
            if evaluate(plan.exact, inst):
                yield inst

    # -- responses --------------------------------------------------------------------

    def responses(self, query: Query, identifier: Dataset,
                  restriction: dict[str, Any] | None = None,
                  syntax: answers.Syntax | None = None) -> Iterator[Dataset]:
        """The answers, encoded for ``syntax`` (the presentation context's (implicit VR,
        little endian)) when it is given: see :meth:`response`."""
        ancestors = _Ancestors(self)
        plan = answer_plan(query, identifier, syntax)
        for doc in self.search(query, identifier, restriction):
            yield self.response(doc, query, identifier, ancestors, plan)

    def response(self, doc: dict[str, Any], query: Query, identifier: Dataset,
                 ancestors: _Ancestors | None, plan: AnswerPlan) -> Dataset:
        """The answer of one document.  With a syntax, its values are bytes ready to
        send (:mod:`archive.answers`), else, or for what that module leaves to pydicom,
        it is :meth:`reference_response`: the same encoded answer either way."""
        if plan.fast:
            ds = self._fast_response(doc, query, identifier, ancestors, plan)
            if ds is not None:
                return ds
        return self.reference_response(doc, query, identifier, ancestors,
                                       plan.requested_charset)

    def reference_response(self, doc: dict[str, Any], query: Query, identifier: Dataset,
                           ancestors: _Ancestors | None, charset: Any = None) -> Dataset:
        """The answer built through pydicom (``from_json`` per stored key): what the
        fast path falls back to and is tested against."""
        ds = Dataset()
        stored = doc.get("dataset", {})
        for tag in query.keys:
            requested = identifier[tag]
            elem = self._computed(tag, doc, query.level, ancestors)
            if elem is None:
                elem = _stored_element(tag, requested, stored)
            ds.add(elem)
        ds.QueryRetrieveLevel = query.level
        ds.SpecificCharacterSet = _character_set(_texts(ds), charset)
        return ds

    def _fast_response(self, doc: dict[str, Any], query: Query, identifier: Dataset,
                       ancestors: _Ancestors | None, plan: AnswerPlan) -> Dataset | None:
        """The answer with each plain value encoded once (RawDataElement); None when
        an element needs what only the reference path does (a sequence, an ambiguous
        VR, a value pydicom cannot write)."""
        assert plan.syntax is not None
        stored = doc.get("dataset", {})
        plain: list[tuple[int, str, list[str]]] = []
        built: list[DataElement] = []
        texts: list[str] = []
        for tag, json_key in plan.keys:
            computed = self._computed_value(tag, doc, query.level, ancestors)
            if computed is not None:
                vr, value = computed
                values = [] if value is None else value if isinstance(value, list) \
                    else [value]
            else:
                data = stored.get(json_key)
                if data is None:  # not stored: empty, with the VR the identifier gave
                    vr, values = _requested_vr(tag, identifier[tag]), []
                else:
                    vr = data.get("vr") if isinstance(data, dict) else None
                    values = answers.plain_values(vr, data)
                if values is None or vr == "SQ":
                    elem = _stored_element(tag, identifier[tag], stored)
                    if elem.VR == "SQ" or " or " in elem.VR:
                        return None  # the writer corrects or recurses: reference path
                    built.append(elem)
                    texts.extend(_texts_of(elem))
                    continue
            plain.append((tag, vr, values))  # type: ignore[arg-type]
            texts.extend(values)
        charset = _character_set(texts, plan.requested_charset)
        if charset not in _FAST_CHARSETS:
            return None
        codecs_ = answers.encodings(charset)
        ds = answers.Answer()
        plain.append((QUERY_RETRIEVE_LEVEL, "CS", [query.level]))
        plain.append((SPECIFIC_CHARACTER_SET, "CS", [charset] if charset else []))
        for tag, vr, values in plain:
            value = answers.encode(vr, values, codecs_)
            if value is None:
                return None
            ds.put(answers.raw_element(tag, vr, value, plan.syntax))
        for elem in built:
            ds.add(elem)
        # pydicom's writer copies raw elements as they are only into their own encoding
        ds.set_original_encoding(plan.syntax[0], plan.syntax[1],
                                 answers.dataset_charset(charset))
        return ds

    def _computed(self, tag: int, doc: dict[str, Any], level: str,
                  ancestors: _Ancestors | None) -> DataElement | None:
        computed = self._computed_value(tag, doc, level, ancestors)
        return None if computed is None else DataElement(tag, *computed)

    def _computed_value(self, tag: int, doc: dict[str, Any], level: str,
                        ancestors: _Ancestors | None) -> tuple[str, Any] | None:
        """The VR and value of a key the archive computes (None: a stored key)."""
        if tag == _RETRIEVE_AE_TITLE:
            return "AE", self.ae_title
        if tag == _INSTANCE_AVAILABILITY:
            return "CS", "ONLINE"
        if tag not in model.COMPUTED_KEYS:
            return None
        vr = dictionary_VR(tag)
        owner_level = model.level_of(tag)
        owner = doc if owner_level == level or ancestors is None \
            else ancestors.get(owner_level, doc)
        if owner is None:
            return vr, None
        if tag in (model.MODALITIES_IN_STUDY, model.SOP_CLASSES_IN_STUDY):
            values = [v for v in owner.get(model.COMPUTED_KEYS[tag], []) if v]
            return vr, values or None
        count = owner.get(model.COMPUTED_KEYS[tag])
        return vr, str(count) if count is not None else None


@dataclass(frozen=True)
class AnswerPlan:
    """What every answer of one query shares: its keys (tag, DICOM JSON key), the
    identifier's Specific Character Set, and whether answers are built by
    :meth:`Finder._fast_response` (a syntax to encode for, no sequence or ambiguous
    key, a character set :mod:`archive.answers` encodes as pydicom does)."""

    keys: tuple[tuple[int, str], ...]
    requested_charset: Any
    syntax: answers.Syntax | None
    fast: bool


def answer_plan(query: Query, identifier: Dataset,
                syntax: answers.Syntax | None = None) -> AnswerPlan:
    charset = identifier.get("SpecificCharacterSet")
    fast = syntax is not None \
        and (charset is None or isinstance(charset, str) and charset in _FAST_CHARSETS) \
        and all(identifier[tag].VR not in ("SQ", None) and " or " not in identifier[tag].VR
                for tag in query.keys)
    return AnswerPlan(tuple((tag, f"{tag:08X}") for tag in query.keys), charset, syntax,
                      fast)


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
    vr = _requested_vr(tag, requested)
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


def _requested_vr(tag: int, requested: DataElement) -> str:
    """The VR of a key's answer when nothing is stored: the identifier's, unless UN."""
    return requested.VR if requested.VR not in ("UN", None) else _dictionary_vr(tag)


def _dictionary_vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0] if " or " in vr else vr


def _texts(ds: Dataset) -> Iterator[str]:
    for elem in ds:
        yield from _texts_of(elem)


def _texts_of(elem: DataElement) -> Iterator[str]:
    """The text values of an element (PN as text), of its items' elements too."""
    if elem.VR == "SQ":
        for item in elem.value or []:
            yield from _texts(item)
    else:
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
#: Answer character sets whose values :mod:`archive.answers` encodes ("": none).
_FAST_CHARSETS = _SINGLE_BYTE | {"ISO_IR 192", ""}


def _character_set(all_texts: Iterable[str], requested: Any) -> Any:
    """The identifier's character set if it can represent the response's texts, else
    UTF-8.

    ``requested`` is the identifier's Specific Character Set value (absent, one term,
    or several for ISO 2022 code extensions).
    """
    texts = [t for t in all_texts if t]
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

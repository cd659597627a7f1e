"""FerretDB patch 08 (ferretdb/patches/08-projection-aware-decoding.patch): a find with a
projection decodes only the top-level fields that its filter, sort and projection read;
and patch 10 (10-member-aware-decoding.patch), of a field read only by paths into it
(``dataset.<tag>``), only the members those name.

``test_projected_finds_decode_only_what_they_read`` fails against a FerretDB built
without the patch (a projected find then allocates as much as counting the same
documents, which decodes them whole), and
``test_answer_projections_decode_only_the_members_they_read`` against one without patch
10. The generated test compares, for random documents, filters, sorts and projections
(an IMAGE-level answer's among them), the patched server with the same build started with
``--test-disable-partial-decoding`` (every document decoded whole, as without the
patch): the same documents, byte for byte, or the same error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pymongo
import pytest
from bson import Int64, ObjectId
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from conftest import FerretDB, unique_name
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ferretdb_patches import DebugFerretDB, allocated_bytes, cpu_ms, nested_document

pytestmark = pytest.mark.ferretdb

#: What a C-MOVE / C-GET reads of each instance document.
MOVE = {"file_id": 1, "SOPClassUID": 1, "TransferSyntaxUID": 1}


def instance_document(_id: str, series: str) -> dict[str, Any]:
    """An instance document as the archive stores it: a few top-level fields and a 12 KiB
    nested DICOM JSON dataset (pydicom's CT_small.dcm)."""
    return {**nested_document(_id), "file_id": ObjectId(), "SeriesInstanceUID": series,
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
            "TransferSyntaxUID": "1.2.840.10008.1.2.1", "Modality": "CT"}


def test_projected_finds_decode_only_what_they_read(tmp_path: Path) -> None:
    """Without the patch a find decoded every stored document whole whatever its
    projection: reading {file_id, SOPClassUID, TransferSyntaxUID} or {dataset: 0} of
    instance documents allocated as much as counting them (0.99 to 1.08 times), which
    decodes them whole; 0.34 to 0.45 times with the patch (the rest is mostly the
    driver's copies of the stored text). FerretDB's CPU, in the message: 1.0 to 1.3
    times without the patch, 0.24 to 0.6 with it."""
    server = DebugFerretDB(tmp_path / "ferretdb").start()
    try:
        coll = server.client.t.instances
        coll.create_index([("SeriesInstanceUID", pymongo.ASCENDING)])
        coll.insert_many([instance_document(f"i{n}", "s1") for n in range(20)])
        by_id, series = {"_id": "i3"}, {"SeriesInstanceUID": "s1"}
        pairs = {  # a find and the count of the same documents
            "by _id, C-MOVE fields": (lambda: coll.find_one(by_id, MOVE), by_id),
            "by _id, {dataset: 0}": (lambda: coll.find_one(by_id, {"dataset": 0}), by_id),
            "series, C-MOVE fields": (lambda: list(coll.find(series, MOVE)), series),
            "series, {dataset: 0}": (lambda: list(coll.find(series, {"dataset": 0})), series),
        }
        ratios = {}
        for name, (find, query) in pairs.items():
            calls = {"find": find,
                     "count": lambda q=query: server.client.t.command("count", "instances",
                                                                       query=q)}
            allocated = dict.fromkeys(calls, 0.0)
            cpu = dict.fromkeys(calls, 0.0)
            for call in calls.values():
                call()
            for _ in range(4):  # in turns, so that both see the same machine
                for kind, call in calls.items():
                    before, cpu_before = allocated_bytes(server), cpu_ms(server.process.pid)
                    for _ in range(5):
                        call()
                    allocated[kind] += allocated_bytes(server) - before
                    cpu[kind] += cpu_ms(server.process.pid) - cpu_before
            ratios[name] = (round(allocated["find"] / allocated["count"], 2),
                            round(cpu["find"] / cpu["count"], 2))
        assert all(alloc < 0.6 for alloc, _ in ratios.values()), \
            f"allocated, CPU: find / count {ratios}"
    finally:
        server.close()


#: What an IMAGE-level C-FIND answer reads of each instance document (archive/find.py
#: answer_projection): the hierarchy keys and the requested attributes' DICOM JSON.
ANSWER = {"SeriesInstanceUID": 1, "SOPClassUID": 1, "dataset.00080016": 1,
          "dataset.00080018": 1, "dataset.00080060": 1, "dataset.00200013": 1}


def test_answer_projections_decode_only_the_members_they_read(tmp_path: Path) -> None:
    """Patch 10: a find whose projection names members of the dataset (dataset.<tag>)
    decoded the whole dataset of each document: finding 20 instance documents with an
    IMAGE-level answer's projection allocated 1.08 times what counting them allocates
    (count decodes them whole); 0.54 with the patch, which decodes only those members
    (the rest is mostly the stored text and the skipped members' schema keys)."""
    server = DebugFerretDB(tmp_path / "ferretdb").start()
    try:
        coll = server.client.t.instances
        coll.create_index([("SeriesInstanceUID", pymongo.ASCENDING)])
        coll.insert_many([instance_document(f"i{n}", "s1") for n in range(20)])
        series = {"SeriesInstanceUID": "s1"}
        calls = {"find": lambda: list(coll.find(series, ANSWER)),
                 "count": lambda: server.client.t.command("count", "instances", query=series)}
        assert len(calls["find"]()) == 20
        assert all(doc["dataset"].keys() == {"00080016", "00080018", "00080060", "00200013"}
                   for doc in calls["find"]())
        allocated = dict.fromkeys(calls, 0.0)
        for call in calls.values():
            call()
        for _ in range(3):  # in turns
            for kind, call in calls.items():
                before = allocated_bytes(server)
                for _ in range(3):
                    call()
                allocated[kind] += allocated_bytes(server) - before
        ratio = allocated["find"] / allocated["count"]
        assert ratio < 0.75, f"allocated: find / count {ratio:.2f}"
    finally:
        server.close()


def test_fields_the_filter_and_sort_read_are_decoded(mongo_db: Any) -> None:
    """The filter, the sort and the projection each read their own fields: those the
    projection leaves out are still there for the filter and the sort."""
    coll = mongo_db.docs
    coll.insert_many([
        {"_id": 1, "a": 3, "b": {"c": "x"}, "d": [1, 2], "dataset": {"x": {"vr": "CS"}}},
        {"_id": 2, "a": 1, "b": {"c": "y"}, "d": [5], "dataset": {"x": {"vr": "PN"}}},
        {"_id": 3, "a": 2, "b": {"c": "x"}, "dataset": {"x": {"vr": "CS"}}},
    ])
    assert list(coll.find({"b.c": "x"}, {"_id": 0, "a": 1}).sort("a", -1)) == [
        {"a": 3}, {"a": 2}]
    assert list(coll.find({"dataset.x.vr": "CS"}, {"_id": 1}).sort("b.c", 1)) == [
        {"_id": 1}, {"_id": 3}]
    assert list(coll.find({"$or": [{"d": 5}, {"a": 2}]}, {"dataset": 0, "b": 0})) == [
        {"_id": 2, "a": 1, "d": [5]}, {"_id": 3, "a": 2}]
    assert list(coll.find({"a": {"$gt": 1}}, {"dataset": 0, "a": 0}).sort("a", 1)) == [
        {"_id": 3, "b": {"c": "x"}}, {"_id": 1, "b": {"c": "x"}, "d": [1, 2]}]
    assert list(coll.find({"$expr": "$d"}, {"a": 1})) == [{"_id": 1, "a": 3},
                                                           {"_id": 2, "a": 1}]
    assert list(coll.find({"d": 2}, {"d.$": 1})) == [{"_id": 1, "d": [2]}]
    assert coll.find_one({"_id": 2}, {"b.c": 1, "lit": "v"}) == {"_id": 2, "b": {"c": "y"},
                                                                 "lit": "v"}


# --- the answers: exactly those of whole documents ------------------------------------


class WholeDecodingFerretDB(FerretDB):
    """The same build decoding whole documents for every find (as before patch 08)."""

    def command(self) -> list[str]:
        return [*super().command(), "--test-disable-partial-decoding"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, ferretdb: FerretDB) -> Any:
    reference = WholeDecodingFerretDB(tmp_path_factory.mktemp("whole")).start()
    name = unique_name("projection")
    raw = CodecOptions(document_class=RawBSONDocument)
    yield (ferretdb.client.get_database(name, codec_options=raw),
           reference.client.get_database(name, codec_options=raw))
    ferretdb.client.drop_database(name)
    reference.close()


TEXTS = ["", "CT", "MR", "DUBOIS^JEAN", "1.2.3", "a\"<", "é"]
texts = st.sampled_from(TEXTS)
scalars = st.one_of(texts, st.integers(-3, 3), st.integers(-3, 3).map(Int64),
                    st.sampled_from([0.5, -1.0, 2.0]), st.none(), st.booleans())
FIELDS = ["SeriesInstanceUID", "Modality", "n", "tags", "meta", "file_id", "dataset"]
#: Paths the filters, sorts and projections name (and a field no document has).
PATHS = ["_id", "SeriesInstanceUID", "Modality", "n", "tags", "tags.0", "tags.x", "meta",
         "meta.a", "meta.b", "meta.b.c", "file_id", "dataset", "dataset.00080060",
         "dataset.00080060.Value", "dataset.00100010.Value.Alphabetic",
         "dataset.00081115.Value.00081150.vr", "missing", "dataset.00200013",
         "dataset.00081115", "meta.x", "n.a"]
#: What an IMAGE-level answer's projection names (archive/find.py answer_projection):
#: top-level fields and members of documents (patch 10 decodes only those members).
ANSWER_PATHS = ["SeriesInstanceUID", "Modality", "n", "file_id", "dataset.00080060",
                "dataset.00100010", "dataset.00081115", "dataset.00200013",
                "dataset.00100010.Value", "meta.a", "meta.b.c", "meta.x", "tags.x", "tags.0",
                "n.a"]


@st.composite
def values(draw: st.DrawFn, depth: int = 0, in_array: bool = False) -> Any:
    """Scalars, documents and arrays (FerretDB refuses an array directly in an array)."""
    kind = draw(st.integers(0, 5 if depth < 2 else 2))
    if kind <= 2 or (kind == 3 and in_array):
        return draw(scalars)
    if kind == 3:
        return draw(st.lists(values(depth + 1, in_array=True), max_size=3))
    keys = draw(st.lists(st.sampled_from(["a", "b", "c", "x"]), max_size=3, unique=True))
    return {k: draw(values(depth + 1)) for k in keys}


@st.composite
def datasets(draw: st.DrawFn) -> dict[str, Any]:
    """DICOM JSON-like: elements with a VR and a Value, a sequence of items."""
    dataset: dict[str, Any] = {}
    if draw(st.booleans()):
        dataset["00080060"] = {"vr": "CS", "Value": draw(st.lists(texts, max_size=2))}
    if draw(st.booleans()):
        dataset["00100010"] = {"vr": "PN", "Value": [{"Alphabetic": draw(texts)}]}
    if draw(st.booleans()):
        dataset["00081115"] = {"vr": "SQ", "Value": [
            {"00081150": {"vr": "UI", "Value": [draw(texts)]}}
            for _ in range(draw(st.integers(0, 2)))]}
    return dataset


@st.composite
def documents(draw: st.DrawFn) -> list[dict[str, Any]]:
    docs = []
    for n in range(draw(st.integers(1, 8))):
        doc: dict[str, Any] = {"_id": f"1.2.{n}"}
        for field in FIELDS:
            if draw(st.integers(0, 3)) == 0:
                continue
            match field:
                case "SeriesInstanceUID":
                    doc[field] = draw(st.sampled_from(["s1", "s2"]))
                case "file_id":
                    doc[field] = ObjectId()
                case "dataset":  # now and then not a document (patch 10 then decodes it whole)
                    doc[field] = draw(datasets()) if draw(st.integers(0, 5)) else draw(values())
                case "meta":
                    doc[field] = {"a": draw(scalars), "b": draw(values())}
                case _:
                    doc[field] = draw(values())
        docs.append(doc)
    return docs


@st.composite
def conditions(draw: st.DrawFn, depth: int = 0) -> dict[str, Any]:
    if depth < 2 and draw(st.integers(0, 5)) == 0:
        op = draw(st.sampled_from(["$and", "$or", "$nor"]))
        return {op: draw(st.lists(conditions(depth + 1), min_size=1, max_size=3))}
    path = draw(st.sampled_from(PATHS))
    value = draw(scalars)
    match draw(st.integers(0, 11)):
        case 0:
            return {path: {"$gt": value}}
        case 1:
            return {path: {"$exists": draw(st.booleans())}}
        case 2:
            return {path: {"$in": [value, draw(scalars)]}}
        case 3:
            return {path: {"$ne": value}}
        case 4:
            return {path: {"$elemMatch": {"$gte": value}}}
        case 5:
            return {path: {"$size": draw(st.integers(0, 2))}}
        case 6:
            return {path: {"$not": {"$lt": value}}}
        case 7:
            return {path: {"$regex": "^" + re.escape(draw(texts))}}
        case 8:
            return {path: {"$type": draw(st.sampled_from(["string", "array", "object"]))}}
        case _:
            return {path: value}


@st.composite
def filters(draw: st.DrawFn) -> dict[str, Any]:
    filter_: dict[str, Any] = {}
    for condition in draw(st.lists(conditions(), max_size=3)):
        filter_.update(condition)
    match draw(st.integers(0, 11)):
        case 0:
            filter_["$expr"] = draw(st.sampled_from(["$n", "$tags", {"$type": "$meta"}]))
        case 1:
            filter_["$comment"] = "projection test"
        case 2:
            filter_["$where"] = "true"  # refused, as whole documents refuse it
        case 3:
            filter_["$foo"] = 1  # an unknown operator: refused alike
    return filter_


@st.composite
def projections(draw: st.DrawFn) -> dict[str, Any] | None:
    if draw(st.integers(0, 9)) == 0:
        return None
    if draw(st.integers(0, 3)) == 0:  # an answer's: paths none of which is inside another
        paths = draw(st.lists(st.sampled_from(ANSWER_PATHS), min_size=1, max_size=6,
                              unique=True))
        return {p: 1 for p in paths if not any(p.startswith(o + ".") for o in paths)}
    inclusion = draw(st.booleans())
    projection: dict[str, Any] = {}
    if draw(st.integers(0, 2)) == 0:
        projection["_id"] = draw(st.sampled_from([0, 1, False, True, "literal"]))
    for path in draw(st.lists(st.sampled_from(PATHS[1:]), max_size=4, unique=True)):
        value: Any = int(inclusion)
        match draw(st.integers(0, 11)):
            case 0:
                value = int(not inclusion)  # refused: inclusion and exclusion mixed
            case 1:
                value = inclusion
            case 2 | 3:
                value = draw(texts) if inclusion else 0  # a new field's value
            case 4:
                path += ".$" if inclusion else ""  # positional
            case 5:
                value = {"$elemMatch": {"a": 1}} if draw(st.booleans()) else {"$slice": 1}
        projection[path] = value
    return projection


@st.composite
def sorts(draw: st.DrawFn) -> list[tuple[str, int]] | None:
    if draw(st.booleans()):
        return None
    return [(path, draw(st.sampled_from([1, -1])))
            for path in draw(st.lists(st.sampled_from(PATHS), min_size=1, max_size=2,
                                      unique=True))]


def answer(db: Any, filter_: dict[str, Any], projection: dict[str, Any] | None,
           sort: list[tuple[str, int]] | None, skip: int, limit: int) -> Any:
    """The documents' BSON, or the error."""
    try:
        cursor = db.docs.find(filter_, projection, skip=skip, limit=limit, batch_size=2)
        if sort:
            cursor = cursor.sort(sort)
        return [bytes(doc.raw) for doc in cursor]
    except pymongo.errors.PyMongoError as exc:
        # FerretDB 1.24.2 panics on some positional projections ("projected field must
        # be a document": the connection is closed, AutoReconnect): the same answer from
        # both servers but for their port
        return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", f"{type(exc).__name__}: {exc}")


@settings(max_examples=int(os.environ.get("PROJECTION_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_partial_decoding_returns_what_whole_documents_give(servers: Any,
                                                            data: st.DataObject) -> None:
    """Random documents (nested documents, arrays, DICOM JSON-like datasets, missing
    fields) and finds with random filters (paths into arrays and sub-documents, $and,
    $or, $nor, $expr, $comment, refused operators), sorts, skips, limits and projections
    (inclusions, exclusions, new fields, _id, positional, refused ones): the same
    documents, byte for byte, or the same error, as whole documents give."""
    partial_db, whole_db = servers
    docs = data.draw(documents(), "documents")
    indexed = data.draw(st.booleans(), "indexed")
    for db in (partial_db, whole_db):
        db.docs.drop()
        if indexed:  # conditions on it are then pushed down (patch 05)
            db.docs.create_index([("SeriesInstanceUID", 1)])
        db.docs.insert_many([dict(d) for d in docs])
    for _ in range(5):
        query = (data.draw(filters(), "filter"), data.draw(projections(), "projection"),
                 data.draw(sorts(), "sort"), data.draw(st.integers(0, 2), "skip"),
                 data.draw(st.sampled_from([0, 0, 1, 3, -1]), "limit"))
        assert answer(partial_db, *query) == answer(whole_db, *query), query

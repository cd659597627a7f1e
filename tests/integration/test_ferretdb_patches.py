"""The FerretDB patch set (ferretdb/patches/): what each patch guarantees, on a real server.

Each test here fails against a FerretDB built without its patch; to check, build one
(``ferretdb/build /tmp/ferretdb-without-02 ferretdb/patches/01-*.patch``) and run these
tests with ``ARCHIVE_TEST_FERRETDB=/tmp/ferretdb-without-02``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pymongo
import pytest
from bson import ObjectId
from conftest import ROOT, FerretDB, free_port, unique_name
from helpers import cpu_ms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file

from archive import dicomjson, model
from archive.storage import ensure_indexes

pytestmark = pytest.mark.ferretdb

THREADS = 8
ROUNDS = 40


def run_together(work: Callable[[int], None], threads: int = THREADS) -> None:
    """Run ``work(thread index)`` in ``threads`` threads released at the same instant."""
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def body(index: int) -> None:
        try:
            start.wait(10)
            work(index)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    workers = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert errors == []


# --- 01-sqlite-id-index -------------------------------------------------------------


def test_a_lookup_by_id_uses_the_id_index(mongo_db: Any) -> None:
    """Without the patch SQLite scans the whole table for every lookup by _id."""
    mongo_db.docs.insert_many([{"_id": f"doc-{n}", "n": n} for n in range(50)])
    plan = mongo_db.command("explain", {"find": "docs", "filter": {"_id": "doc-7"}})
    details = " ".join(plan["queryPlanner"]["Plan"])
    assert "USING INDEX" in details and "SCAN" not in details, details
    assert mongo_db.docs.find_one({"_id": "doc-7"})["n"] == 7


# --- 02-atomic-document-writes ------------------------------------------------------


def test_concurrent_writes_to_one_document_lose_nothing(mongo_db: Any) -> None:
    """$inc, $addToSet, upserts with $inc and find_one_and_update from many threads, all
    on one document, as the archive's level documents get them: every change counts."""
    docs = mongo_db.level
    docs.insert_one({"_id": "series", "updates": 0, "members": []})

    def work(index: int) -> None:
        for n in range(ROUNDS):
            member = f"{index}-{n}"
            match n % 4:
                case 0:
                    docs.update_one({"_id": "series"}, {"$inc": {"updates": 1, "inc": 1}})
                case 1:
                    docs.update_one({"_id": "series"}, {"$inc": {"updates": 1},
                                                        "$addToSet": {"members": member}})
                case 2:
                    docs.update_one({"_id": "series"}, {"$inc": {"updates": 1, "upserts": 1},
                                                        "$addToSet": {"members": member}},
                                    upsert=True)
                case 3:
                    docs.find_one_and_update({"_id": "series"}, {"$inc": {"updates": 1},
                                                                 "$addToSet": {"members": member}})

    run_together(work)
    doc = docs.find_one({"_id": "series"})
    total = THREADS * ROUNDS
    assert doc["updates"] == total
    assert doc["inc"] == total // 4
    assert doc["upserts"] == total // 4
    assert len(doc["members"]) == len(set(doc["members"])) == total * 3 // 4
    assert docs.count_documents({}) == 1


def test_find_one_and_update_returns_each_counter_value_once(mongo_db: Any) -> None:
    """A counter handed out with find_one_and_update: no two callers get the same value."""
    counters = mongo_db.counters
    counters.insert_one({"_id": "next", "value": 0})
    seen: list[list[int]] = [[] for _ in range(THREADS)]

    def work(index: int) -> None:
        for _ in range(ROUNDS):
            doc = counters.find_one_and_update(
                {"_id": "next"}, {"$inc": {"value": 1}},
                return_document=pymongo.ReturnDocument.AFTER)
            seen[index].append(doc["value"])

    run_together(work)
    values = sorted(v for values in seen for v in values)
    assert values == list(range(1, THREADS * ROUNDS + 1))


def test_concurrent_upserts_of_one_id_insert_once(mongo_db: Any) -> None:
    """Upserts of a new _id racing each other: one inserts, the others update (as on
    MongoDB), never a duplicate key error nor a lost increment."""
    docs = mongo_db.upserts
    for round_ in range(ROUNDS // 4):
        key = f"new-{round_}"
        inserted: list[Any] = []

        def work(index: int, key: str = key, inserted: list[Any] = inserted) -> None:
            result = docs.update_one({"_id": key}, {"$inc": {"n": 1},
                                                    "$addToSet": {"by": index}}, upsert=True)
            if result.upserted_id is not None:
                inserted.append(result.upserted_id)

        run_together(work)
        doc = docs.find_one({"_id": key})
        assert inserted == [key], f"round {round_}"
        assert doc["n"] == THREADS and sorted(doc["by"]) == list(range(THREADS))
    assert docs.count_documents({}) == ROUNDS // 4


# --- 03-id-pushdown-with-other-conditions -------------------------------------------


def test_a_filter_naming_id_and_more_uses_the_id_index(mongo_db: Any) -> None:
    """The archive upserts level documents on {_id, claimed keys} and compares-and-sets
    on {_id, rev}: without the patch each such write reads the whole collection."""
    mongo_db.docs.insert_many([{"_id": f"doc-{n}", "n": n, "rev": 0} for n in range(50)])
    plan = mongo_db.command("explain", {"find": "docs", "filter": {"_id": "doc-7", "rev": 0}})
    details = " ".join(plan["queryPlanner"]["Plan"])
    assert "USING INDEX" in details and "SCAN" not in details, details
    # the other conditions still apply
    assert mongo_db.docs.find_one({"_id": "doc-7", "rev": 1}) is None
    assert mongo_db.docs.update_one({"_id": "doc-7", "rev": 0}, {"$inc": {"rev": 1}}
                                    ).modified_count == 1
    assert mongo_db.docs.update_one({"_id": "doc-7", "rev": 0}, {"$inc": {"rev": 1}}
                                    ).modified_count == 0
    with pytest.raises(pymongo.errors.DuplicateKeyError):  # a conflicting upsert
        mongo_db.docs.update_one({"_id": "doc-8", "n": 99}, {"$set": {"x": 1}}, upsert=True)
    assert mongo_db.docs.delete_one({"_id": "doc-9", "n": 8}).deleted_count == 0
    assert mongo_db.docs.delete_one({"_id": "doc-9", "n": 9}).deleted_count == 1


# --- 04-no-resource-tracking-in-release ---------------------------------------------


def nested_document(_id: str) -> dict[str, Any]:
    """A 12 KiB DICOM JSON document with nested sequences (pydicom's CT_small.dcm)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = dcmread(get_testdata_file("CT_small.dcm"))
    return {"_id": _id, "dataset": dicomjson.to_json(dataset, ObjectId())}


class DebugFerretDB(FerretDB):
    """A FerretDB whose debug handler (pprof, as ``--debug-addr`` serves it) listens."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.debug_port = free_port()

    def command(self) -> list[str]:
        return [f"--debug-addr=127.0.0.1:{self.debug_port}" if a == "--debug-addr=-" else a
                for a in super().command()]


def test_reads_do_not_register_each_iterator_in_a_profile(tmp_path: Path) -> None:
    """Release builds registered every document and array iterator in a pprof profile,
    capturing a stack trace and setting a finalizer for each: about a quarter of
    FerretDB's CPU when reading nested DICOM JSON. The profiler itself stays."""
    server = DebugFerretDB(tmp_path / "ferretdb").start()
    try:
        docs = server.client.t.docs
        docs.insert_one(nested_document("nested"))
        for _ in range(3):
            assert docs.find_one({"_id": "nested"})["dataset"]
        url = f"http://127.0.0.1:{server.debug_port}/debug/pprof/"
        with urllib.request.urlopen(url, timeout=10) as response:
            index = response.read().decode()
        assert "goroutine" in index and "heap" in index, index[:500]
        tracked = sorted(set(re.findall(r"FerretDB/[\w.]+", index)))
        assert not tracked, f"objects tracked in pprof profiles: {tracked}"
    finally:
        server.close()


# --- 06-sjson-single-pass-decoding --------------------------------------------------


def test_a_nested_document_costs_little_more_than_its_text(ferretdb: FerretDB) -> None:
    """FerretDB decoded each stored document level by level, every byte once per level
    above it: reading a 12 KiB DICOM JSON document with nested sequences cost it 7 to 9
    times the CPU of reading the same JSON as one string; 3 to 4 times with the patch."""
    import json

    db = ferretdb.client[f"cost_{ObjectId()}"]
    try:
        nested = nested_document("nested")
        db.docs.insert_many([nested, {"_id": "text", "json": json.dumps(nested["dataset"])}])
        for _ in range(5):
            db.docs.find_one({"_id": "nested"})
            db.docs.find_one({"_id": "text"})
        cost = {"nested": 0.0, "text": 0.0}
        for _ in range(5):  # in turns, so that both see the same machine
            for _id in cost:
                before = cpu_ms(ferretdb.process.pid)
                for _ in range(40):
                    db.docs.find_one({"_id": _id})
                cost[_id] += cpu_ms(ferretdb.process.pid) - before
        assert cost["nested"] / cost["text"] < 5, cost
    finally:
        ferretdb.client.drop_database(db.name)


# --- 07-projection-without-copies ---------------------------------------------------


def allocated_bytes(server: DebugFerretDB) -> float:
    """Bytes FerretDB has allocated so far (Go's counter, from its /debug/metrics)."""
    url = f"http://127.0.0.1:{server.debug_port}/debug/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        metrics = response.read().decode()
    return float(re.search(r"^go_memstats_alloc_bytes_total (\S+)$", metrics, re.M)[1])


def test_a_find_copies_no_document(tmp_path: Path) -> None:
    """A find deep-copied every document it returned (twice without a projection):
    reading a nested document by _id with a projection allocated 30% more than
    counting it, which decodes and filters it the same way; with the patch, as much.
    (The filter's $expr, true for any _id, makes the find decode the whole document
    with patch 08 too, which otherwise decodes only the _id this projection reads.)"""
    server = DebugFerretDB(tmp_path / "ferretdb").start()
    try:
        db = server.client.t
        db.docs.insert_one(nested_document("nested"))
        query = {"_id": "nested", "$expr": "$_id"}
        calls = {
            "find": lambda: db.docs.find_one(query, {"_id": 1}),
            "count": lambda: db.command("count", "docs", query=query),
        }
        allocated = {}
        for name, call in calls.items():
            call()
            before = allocated_bytes(server)
            for _ in range(20):
                call()
            allocated[name] = (allocated_bytes(server) - before) / 20
        assert allocated["find"] < 1.12 * allocated["count"], allocated
    finally:
        server.close()


# --- 09-sjson-single-pass-encoding --------------------------------------------------


def test_storing_a_nested_document_allocates_little_per_byte(tmp_path: Path) -> None:
    """FerretDB encoded each document it stores in two walks, every level's text in a
    buffer of its own and every key and scalar through encoding/json: storing a 12 KiB
    DICOM JSON document with nested sequences allocated 89 bytes per byte of its BSON
    (Go's counter); 45 to 47 with the patch, most of it the decoding of the command's
    BSON into the nested document. (Compared with storing the same JSON as one string:
    9.2 to 9.4 times as much without the patch, 4.6 to 7.0 with it; the string's
    allocations vary with the garbage collector's emptying of the encoder's buffer pool,
    so the bound is per byte.)"""
    import bson

    server = DebugFerretDB(tmp_path / "ferretdb").start()
    try:
        docs = server.client.t.docs
        nested = nested_document("nested")
        size = len(bson.encode(nested))
        docs.insert_one({**nested, "_id": "warm"})
        before = allocated_bytes(server)
        for n in range(30):
            docs.insert_one({**nested, "_id": f"nested-{n}"})
        per_byte = (allocated_bytes(server) - before) / 30 / size
        assert per_byte < 65, f"{per_byte:.1f} bytes allocated per byte of BSON stored"
    finally:
        server.close()


# --- 11-sqlite-write-queue -----------------------------------------------------------


class NoBusyWaitFerretDB(FerretDB):
    """A FerretDB whose SQLite connections give up at once on a locked database
    (``busy_timeout(0)``): any write that finds another one running fails."""

    def command(self) -> list[str]:
        return [f"{a}?_pragma=busy_timeout(0)" if a.startswith("--sqlite-url=") else a
                for a in super().command()]


def test_concurrent_writers_never_see_a_locked_database(tmp_path: Path) -> None:
    """Writes to one database wait for each other in FerretDB, not in SQLite's busy
    handler, which sleeps 1, 2, 5, 10... ms however soon the lock is free: with 4
    associations storing, that left a core idle. Without the queue, with the busy
    handler off, concurrent inserts and updates fail with "database is locked"."""
    server = NoBusyWaitFerretDB(tmp_path / "ferretdb").start()
    try:
        db = server.client.archive
        for name in ("chunks", "instances", "series"):  # created before the race
            db[name].insert_one({"_id": "setup"})
        db.series.insert_one({"_id": "s", "n": 0})
        body = b"\x00" * 40_000

        def work(index: int) -> None:
            for n in range(ROUNDS):
                key = f"{index}/{n}"
                db.chunks.insert_one({"_id": key, "data": body})
                db.instances.insert_one({"_id": key, "dataset": {"x": list(range(200))}})
                db.series.update_one({"_id": "s"}, {"$inc": {"n": 1}})

        run_together(work)
        assert db.series.find_one({"_id": "s"})["n"] == THREADS * ROUNDS
        assert db.instances.count_documents({}) == THREADS * ROUNDS + 1
    finally:
        server.close()


# --- 12-sqlite-member-index-expressions ----------------------------------------------


def archive_instance(template: dict[str, Any], n: int) -> dict[str, Any]:
    """An instance document as the archive stores one (benchmarks' instance-like
    document, with the file and transfer syntax a store adds)."""
    from benchmarks.bench_ferretdb_reads import instance

    return {**instance(template, n), "file_id": ObjectId(),
            "TransferSyntaxUID": "1.2.840.10008.1.2.1"}


def test_writing_an_indexed_document_costs_little_more_than_reading_it(
        private_ferretdb: FerretDB) -> None:
    """SQLite evaluated each index on _ferretdb_sjson->"field" by parsing the whole
    stored text (an instance document's 35 KiB schema and 11 KiB dataset) and then
    finding it again in its cache by comparing the whole text, once for each index, and
    for the old and the new text of an update. With the archive's five indexes on
    instances, inserting an instance document and then updating one of its fields cost
    FerretDB 2.8 to 3.0 times the CPU of reading it whole by _id; 2.0 to 2.3 with the
    patch, whose function steps over the members it does not want, once per text.
    (A FerretDB of its own: the shared one's background work for the databases of
    earlier tests, garbage collection or checkpoints, would count in one window or the
    other -- in one full run, the writes cost 2.93 times the reads.)"""
    from benchmarks.bench_ferretdb_reads import dataset_json

    ferretdb = private_ferretdb
    db = ferretdb.client[f"cost_{ObjectId()}"]
    try:
        for keys in model.INDEXES["instances"]:
            db.instances.create_index([(k, pymongo.ASCENDING) for k in keys])
        template = dataset_json()
        cost = {"write": 0.0, "read": 0.0}
        for turn in range(9):  # in turns, so that both see the same machine
            docs = [archive_instance(template, turn * 15 + i) for i in range(15)]
            before = cpu_ms(ferretdb.process.pid)
            for n, doc in enumerate(docs):
                db.instances.insert_one(doc)
                db.instances.update_one({"_id": doc["_id"]}, {"$set": {"Retrieved": n}})
            written = cpu_ms(ferretdb.process.pid)
            for doc in docs:
                db.instances.find_one({"_id": doc["_id"]})
            if turn:  # the first turn warms up
                cost["write"] += written - before
                cost["read"] += cpu_ms(ferretdb.process.pid) - written
        assert cost["write"] < 2.5 * cost["read"], cost
    finally:
        ferretdb.client.drop_database(db.name)


class BuildFerretDB(FerretDB):
    """A FerretDB server of another build than the tests' (``binary``)."""

    def __init__(self, data_dir: Path, binary: Path) -> None:
        super().__init__(data_dir)
        self.binary = binary

    def command(self) -> list[str]:
        return [str(self.binary), *super().command()[1:]]


@pytest.fixture(scope="module")
def ferretdb_before_12() -> Path:
    """FerretDB built with the patches before 12 (by ferretdb/build, once per checkout and
    patch set: kept in .tools/)."""
    build = ROOT / "ferretdb" / "build"
    patches = sorted(p for p in (ROOT / "ferretdb" / "patches").glob("*.patch") if p.name < "12")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in [build, *patches])).hexdigest()
    binary = ROOT / ".tools" / f"ferretdb-before-12.{digest[:8]}"
    if not binary.is_file():
        for stale in binary.parent.glob("ferretdb-before-12.*"):
            stale.unlink()
        result = subprocess.run([str(build), str(binary), *map(str, patches)],
                                capture_output=True, text=True, timeout=900, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
    return binary


#: Values of an indexed field whose JSON text has escapes, non-ASCII, another type.
UPGRADE_VALUES: list[Any] = ["PID1", 'PID"2', "PID<3>&", "PID\\4", "PIDé5", "PID\u20286",
                             "PID\x007", ["PID1", "X"], 8, None,
                             ObjectId("0123456789abcdef01234567")]


def test_indexes_of_an_earlier_build_are_rebuilt_when_it_is_upgraded(
        tmp_path: Path, ferretdb_before_12: Path) -> None:
    """Patch 12 indexes top-level fields on a function of its own: a database created by
    an earlier build has its indexes on ->, which the new queries would not use (every
    find, update and delete by _id would read the whole table). The new build rebuilds
    them when it opens the database: the same answers, the indexes searched, _id and
    GridFS's {files_id, n} still unique."""
    from test_ferretdb_pushdown import plan

    def ids(cursor: Any) -> list[str]:  # _ids of several types
        return sorted(repr(doc["_id"]) for doc in cursor)

    data = tmp_path / "ferretdb"
    docs: list[dict[str, Any]] = []
    for n, value in enumerate(UPGRADE_VALUES * 3):
        doc = {"_id": f"1.2.{n}", "SeriesInstanceUID": f"1.2.s{n % 4}", "file_id": ObjectId(),
               "dataset": {"00100020": {"vr": "LO", "Value": [str(value)]}}}
        if n < 2 * len(UPGRADE_VALUES):  # the third time round: no PatientID
            doc["PatientID"] = value
        docs.append(doc)
    docs.append({"_id": ObjectId("76543210fedcba9876543210"), "PatientID": "PID1"})
    docs.append({"_id": {"a": "document"}, "PatientID": "PID1"})
    files_id = ObjectId()
    queries: dict[str, tuple[str, dict[str, Any]]] = {
        f"PatientID = {value!r}": ("instances", {"PatientID": value})
        for value in UPGRADE_VALUES if isinstance(value, str | ObjectId)}
    queries |= {
        "PatientID $in": ("instances", {"PatientID": {"$in": ["PID1", 'PID"2', "PIDé5"]}}),
        "PatientID range": ("instances", {"PatientID": {"$gte": "PID<", "$lt": "PIDz"}}),
        "PatientID prefix": ("instances", {"PatientID": {"$regex": "^PID"}}),
        "SeriesInstanceUID": ("instances", {"SeriesInstanceUID": "1.2.s1"}),
        "file_id": ("instances", {"file_id": docs[3]["file_id"]}),
        "_id": ("instances", {"_id": "1.2.5"}),
        "_id ObjectId": ("instances", {"_id": ObjectId("76543210fedcba9876543210")}),
        "_id $in": ("instances", {"_id": {"$in": ["1.2.1", "1.2.7", "none"]}}),
        "files_id": ("fs.chunks", {"files_id": files_id}),
    }

    earlier = BuildFerretDB(data, ferretdb_before_12).start()
    try:
        db = earlier.client.archive
        ensure_indexes(db)
        db.instances.insert_many(docs)
        db["fs.chunks"].insert_many([{"files_id": files_id, "n": n, "data": b"x" * n}
                                     for n in range(5)])
        answers = {name: ids(db[coll].find(f, {"_id": 1})) for name, (coll, f) in queries.items()}
    finally:
        earlier.close()
    assert answers["PatientID = 'PID1'"] and answers["PatientID prefix"]

    upgraded = FerretDB(data).start()
    try:
        db = upgraded.client.archive
        for name, (coll, filter_) in queries.items():
            assert ids(db[coll].find(filter_, {"_id": 1})) == answers[name], name
            details, pushed = plan(db, coll, filter_)
            assert pushed and "USING INDEX" in details and "SCAN" not in details, (name, details)
        with pytest.raises(pymongo.errors.DuplicateKeyError):
            db.instances.insert_one({"_id": "1.2.5"})
        with pytest.raises(pymongo.errors.DuplicateKeyError):
            db.instances.insert_one({"_id": {"a": "document"}})
        with pytest.raises(pymongo.errors.DuplicateKeyError):
            db["fs.chunks"].insert_one({"files_id": files_id, "n": 3, "data": b""})
        db.instances.insert_one({"_id": "new", "PatientID": 'PID"2'})
        assert ids(db.instances.find({"PatientID": 'PID"2'}, {"_id": 1})) == sorted(
            [*answers["PatientID = " + repr('PID"2')], repr("new")])
        assert db.instances.delete_one({"_id": "1.2.5"}).deleted_count == 1
        assert db.instances.count_documents({}) == len(docs)
    finally:
        upgraded.close()


def test_a_node_waits_for_ferretdb_rebuilding_its_indexes(
        tmp_path: Path, ferretdb_before_12: Path) -> None:
    """The first start of this build on an earlier build's database rebuilds its indexes
    before FerretDB listens (0.6 s per 140 MB of GridFS chunks, longer from disk): the
    node, which gives FerretDB a fixed time to listen (20 s; 0.2 s here), waits on while
    FerretDB works rather than stopping it mid-rebuild."""
    from archive.config import EmbeddedDatabase
    from archive.ferretdb import EmbeddedFerretDB

    data = tmp_path / "ferretdb"
    earlier = BuildFerretDB(data, ferretdb_before_12).start()
    try:
        chunks = earlier.client.archive["fs.chunks"]
        ensure_indexes(earlier.client.archive)
        data_bytes = bytes(range(256)) * 1020
        for _ in range(10):
            chunks.insert_many([{"files_id": ObjectId(), "n": n, "data": data_bytes}
                                for n in range(40)])
    finally:
        earlier.close()

    embedded = EmbeddedFerretDB(EmbeddedDatabase(binary=str(FerretDB(data).command()[0]),
                                                 data_dir=str(data), port=free_port()))
    try:
        began = time.monotonic()
        embedded.start(timeout=0.2)
        assert time.monotonic() - began > 0.2  # it did rebuild
        client = pymongo.MongoClient(embedded.uri)
        plan = client.archive.command("explain", {"find": "fs.chunks",
                                                  "filter": {"files_id": ObjectId()}})
        assert "USING INDEX" in " ".join(plan["queryPlanner"]["Plan"])
        client.close()
    finally:
        embedded.stop()


def test_a_node_does_not_wait_for_an_idle_ferretdb(tmp_path: Path) -> None:
    """A FerretDB that does not listen and does no work has hung: the node stops it at
    the end of its wait, as before."""
    from archive.config import EmbeddedDatabase
    from archive.ferretdb import DatabaseUnavailable, EmbeddedFerretDB

    hung = tmp_path / "ferretdb"
    hung.write_text("#!/bin/sh\nexec sleep 60\n")
    hung.chmod(0o755)
    embedded = EmbeddedFerretDB(EmbeddedDatabase(binary=str(hung), data_dir=str(tmp_path / "d"),
                                                 port=free_port()))
    began = time.monotonic()
    with pytest.raises(DatabaseUnavailable, match="did not listen"):
        embedded.start(timeout=1)
    assert time.monotonic() - began < 10


def test_a_node_waits_for_a_working_ferretdb_within_a_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A FerretDB that keeps working without ever listening (a spinning one) is waited
    for with a line at every further wait, then stopped at the limit its data size
    gives: the node's start ends with an error instead of hanging."""
    from archive import ferretdb
    from archive.config import EmbeddedDatabase

    spinning = tmp_path / "ferretdb"
    spinning.write_text("#!/bin/sh\nwhile :; do :; done\n")
    spinning.chmod(0o755)
    monkeypatch.setattr(ferretdb, "BUSY_LIMIT_SECONDS", 2.0)
    embedded = ferretdb.EmbeddedFerretDB(EmbeddedDatabase(
        binary=str(spinning), data_dir=str(tmp_path / "d"), port=free_port()))
    caplog.set_level(logging.INFO, logger="archive.ferretdb")
    began = time.monotonic()
    with pytest.raises(ferretdb.DatabaseUnavailable, match="without listening"):
        embedded.start(timeout=0.3)
    assert 2.0 <= time.monotonic() - began < 10
    assert "is working" in caplog.text and "2 s at most" in caplog.text
    progress = re.findall(r"FerretDB pid (\d+) still working", caplog.text)
    assert progress, caplog.text
    pid = int(progress[0])
    assert ferretdb.start_time(pid) is None  # stopped, not left spinning
    # a larger database is given longer: the limit grows with its SQLite files
    assert ferretdb.working_limit(tmp_path / "d") == 2.0
    with open(tmp_path / "d" / "archive.sqlite", "wb") as big:
        big.truncate(3 * 2**30)  # sparse: 3 GiB long, nothing written
    assert ferretdb.working_limit(tmp_path / "d") == 3 * ferretdb.BUSY_LIMIT_PER_GIB


# --- 13-bulkwrite-inserts -------------------------------------------------------------

#: Inserts as (collection number, _id): few ids, so that duplicates are frequent.
_inserts = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5)), min_size=1, max_size=12)


def _one_at_a_time(db: Any, inserts: list[tuple[int, int]], ordered: bool) -> list[int]:
    """What the insert command does, one document at a time: the indexes that failed."""
    failed = []
    for index, (coll, _id) in enumerate(inserts):
        try:
            db[f"c{coll}"].insert_one({"_id": _id, "op": index})
        except pymongo.errors.DuplicateKeyError:
            failed.append(index)
            if ordered:
                break
    return failed


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inserts=_inserts, ordered=st.booleans(), errors_only=st.booleans())
def test_bulkwrite_inserts_as_the_insert_command_does_one_at_a_time(
        ferretdb: FerretDB, inserts: list[tuple[int, int]], ordered: bool,
        errors_only: bool) -> None:
    """MongoDB 8.0's bulkWrite, inserts into several collections in one command (the
    archive stores a file and its instance document so): the same documents written, the
    same failures reported by index, and MongoDB's reply. Without the patch FerretDB
    has no such command."""
    client = ferretdb.client
    bulk, reference = unique_name("bulk"), unique_name("ref")
    try:
        answer = client.admin.command({
            "bulkWrite": 1, "ordered": ordered, "errorsOnly": errors_only,
            "ops": [{"insert": coll, "document": {"_id": _id, "op": index}}
                    for index, (coll, _id) in enumerate(inserts)],
            "nsInfo": [{"ns": f"{bulk}.c{n}"} for n in range(3)]})
        failed = _one_at_a_time(client[reference], inserts, ordered)
        for n in range(3):
            assert list(client[bulk][f"c{n}"].find().sort("_id")) == \
                list(client[reference][f"c{n}"].find().sort("_id"))
        attempted = inserts[:failed[0] + 1] if ordered and failed else inserts
        assert answer["ok"] == 1 and answer["nErrors"] == len(failed)
        assert answer["nInserted"] == len(attempted) - len(failed)
        results = answer["cursor"]["firstBatch"]
        assert answer["cursor"]["id"] == 0
        assert [r["idx"] for r in results if r["ok"] == 0] == failed
        assert all(r["code"] == 11000 for r in results if r["ok"] == 0)
        succeeded = [r["idx"] for r in results if r["ok"] == 1]
        assert succeeded == ([] if errors_only else
                             [i for i in range(len(attempted)) if i not in failed])
    finally:
        client.drop_database(bulk)
        client.drop_database(reference)


def test_bulkwrite_refuses_what_it_does_not_do(ferretdb: FerretDB, mongo_db: Any) -> None:
    """Run elsewhere than on admin, an update among the operations, a namespace index out
    of range: refused, nothing written (the archive falls back to plain inserts on a
    server without the command: MongoDB 6 and 7 answer CommandNotFound)."""
    ns = [{"ns": f"{mongo_db.name}.c"}]
    doc = {"insert": 0, "document": {"_id": 1}}
    refusals = [
        (mongo_db, {"bulkWrite": 1, "ops": [doc], "nsInfo": ns}, 13),
        (ferretdb.client.admin, {"bulkWrite": 1, "nsInfo": ns,
                                 "ops": [doc, {"update": 0, "filter": {}, "updateMods": {}}]}, 238),
        (ferretdb.client.admin, {"bulkWrite": 1, "nsInfo": ns,
                                 "ops": [{"insert": 1, "document": {"_id": 2}}]}, 2),
    ]
    for database, command, code in refusals:
        with pytest.raises(pymongo.errors.OperationFailure) as refused:
            database.command(command)
        assert refused.value.code == code, refused.value
    assert mongo_db.c.count_documents({}) == 0

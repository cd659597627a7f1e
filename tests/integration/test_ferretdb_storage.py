"""The archive's storage on a real FerretDB: every pydicom test file, GridFS, indexes."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import gridfs
import pymongo
import pytest
from conftest import FerretDB, unique_name
from helpers import consistency_problems, counter_problems
from pydicom import dcmread
from pymongo import monitoring

from acl.patterns import to_json
from acl.rules import Rule, decide
from archive import bulkwrite, dicomjson, model
from archive.config import Config
from archive.context import Context
from archive.gridstore import CHUNK_SIZE, GridStore
from archive.storage import SUCCESS, Archive, StoreOutcome, ensure_indexes

pytestmark = [pytest.mark.ferretdb, pytest.mark.filterwarnings("ignore::UserWarning")]


@dataclass
class Loaded:
    db: Any
    archive: Archive
    #: file -> (status, comment) of its store
    outcomes: dict[Path, tuple[int, str]] = field(default_factory=dict)
    #: files whose GridFS copy, read right after the store, differed from the file
    mismatches: list[Path] = field(default_factory=list)
    #: SOP Instance UID -> the file stored last under it (what the archive must hold)
    final: dict[str, Path] = field(default_factory=dict)


@pytest.fixture(scope="module")
def loaded(ferretdb: FerretDB, testdata_files: list[Path],
           tmp_path_factory: pytest.TempPathFactory) -> Any:
    """All storable pydicom files stored through Archive, in order (duplicates replace)."""
    name = unique_name("integ")
    db = ferretdb.client[name]
    ensure_indexes(db)
    archive = Archive(db, "fs", "replace", tmp_path_factory.mktemp("journal") / "j.jsonl")
    result = Loaded(db, archive)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in testdata_files:
            data = path.read_bytes()
            outcome = archive.store(data, source="test")
            result.outcomes[path] = (outcome.status, outcome.comment)
            if outcome.ok:
                result.final[outcome.sop_instance_uid] = path
                doc = db.instances.find_one({"_id": outcome.sop_instance_uid})
                if doc is None or archive.files.read(doc["file_id"]) != data:
                    result.mismatches.append(path)
    yield result
    ferretdb.client.drop_database(name)


def test_every_storable_test_file_is_stored(loaded: Loaded, testdata_files: list[Path]) -> None:
    assert len(testdata_files) > 100
    failed = {p.name: f"0x{s:04X} {c}" for p, (s, c) in loaded.outcomes.items() if s != SUCCESS}
    assert failed == {}


def test_gridfs_copy_is_byte_identical_to_the_file(loaded: Loaded) -> None:
    assert [p.name for p in loaded.mismatches] == []
    for uid, path in loaded.final.items():
        doc = loaded.db.instances.find_one({"_id": uid})
        assert loaded.archive.files.read(doc["file_id"]) == path.read_bytes(), path.name
        assert doc["size"] == path.stat().st_size


def test_one_instance_and_one_file_per_sop_instance_uid(loaded: Loaded) -> None:
    db = loaded.db
    assert db.instances.count_documents({}) == len(loaded.final)
    assert db["fs.files"].count_documents({}) == len(loaded.final)
    assert consistency_problems(db) == []
    expected_chunks = sum(max(-(-p.stat().st_size // CHUNK_SIZE), 1)
                          for p in loaded.final.values())
    assert db["fs.chunks"].count_documents({}) == expected_chunks


def test_files_are_readable_by_the_drivers_gridfs(loaded: Loaded) -> None:
    """pymongo's GridFSBucket reads the archive's files (standard layout), through the
    ``{files_id, n}`` index the GridFS specification asks for: SQLite searches it."""
    chunk_indexes = [list(i["key"]) for i in loaded.db["fs.chunks"].list_indexes()]
    assert ["files_id", "n"] in chunk_indexes
    any_file = loaded.db["fs.files"].find_one()["_id"]
    plan = loaded.db.command("explain", {"find": "fs.chunks",
                                         "filter": {"files_id": any_file}})
    details = " | ".join(str(p) for p in plan["queryPlanner"].get("Plan", []))
    assert "USING INDEX" in details and "SCAN" not in details, details
    bucket = gridfs.GridFSBucket(loaded.db)
    for uid, path in loaded.final.items():
        doc = loaded.db.instances.find_one({"_id": uid})
        with bucket.open_download_stream(doc["file_id"]) as stream:
            assert stream.read() == path.read_bytes(), path.name
            assert stream.filename == f"{uid}.dcm"
            assert stream.metadata["SOPInstanceUID"] == uid
    assert len(list(bucket.find({}))) == len(loaded.final)


def test_level_documents_agree_with_the_instances(loaded: Loaded) -> None:
    assert counter_problems(loaded.db) == []


def test_metadata_survives_the_database_unchanged(loaded: Loaded) -> None:
    """What FerretDB gives back is the DICOM JSON the archive computed, value for value."""
    for uid, path in loaded.final.items():
        doc = loaded.db.instances.find_one({"_id": uid})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = dicomjson.to_json(dcmread(path), doc["file_id"])
        assert doc["dataset"] == expected, path.name


def test_stats_counts(loaded: Loaded) -> None:
    series, studies, patients, modalities, classes = set(), set(), set(), {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in loaded.final.values():
            ds = dcmread(path, stop_before_pixels=True)
            series.add(str(ds.SeriesInstanceUID).strip())
            studies.add(str(ds.StudyInstanceUID).strip())
            patients.add(str(ds.get("PatientID", "") or "").strip())
            modality = str(ds.get("Modality", "") or "")
            modalities[modality] = modalities.get(modality, 0) + 1
            sop_class = str(ds.SOPClassUID).strip()
            classes[sop_class] = classes.get(sop_class, 0) + 1

    stats = loaded.archive.stats()

    assert stats["instances"] == len(loaded.final)
    assert stats["series"] == len(series)
    assert stats["studies"] == len(studies)
    assert stats["patients"] == len(patients)
    assert stats["modalities"] == modalities
    assert stats["sop_classes"] == classes
    assert list(stats["modalities"].values()) == sorted(modalities.values(), reverse=True)


def test_indexes_are_created(mongo_db: Any) -> None:
    ensure_indexes(mongo_db)
    ensure_indexes(mongo_db)  # idempotent
    for collection, indexes in model.INDEXES.items():
        present = {tuple(k for k, _ in info["key"])
                   for info in mongo_db[collection].index_information().values()}
        for keys in indexes:
            assert tuple(keys) in present, (collection, keys)


def test_multi_chunk_and_empty_files_round_trip(mongo_db: Any) -> None:
    store = GridStore(mongo_db, "fs")
    bucket = gridfs.GridFSBucket(mongo_db)
    for size in (0, CHUNK_SIZE, 2 * CHUNK_SIZE + 777):
        data = os.urandom(size)
        file_id = store.put(data, "f.bin", {"size": size})
        assert store.read(file_id) == data
        assert bucket.open_download_stream(file_id).read() == data
        store.delete(file_id)
        assert mongo_db["fs.files"].count_documents({}) == 0
        assert mongo_db["fs.chunks"].count_documents({}) == 0


def test_custom_bucket_name(mongo_db: Any, tmp_path: Path, testdata_files: list[Path]) -> None:
    archive = Archive(mongo_db, "originals", "replace", tmp_path / "j.jsonl")
    data = testdata_files[0].read_bytes()
    outcome = archive.store(data)
    assert outcome.ok
    doc = mongo_db.instances.find_one()
    assert gridfs.GridFSBucket(mongo_db, "originals").open_download_stream(
        doc["file_id"]).read() == data
    assert mongo_db["fs.files"].count_documents({}) == 0


def test_unstorable_test_files_are_refused_and_leave_nothing(
        mongo_db: Any, tmp_path: Path, unstorable_files: list[Path]) -> None:
    archive = Archive(mongo_db, "fs", "replace", tmp_path / "j.jsonl")
    assert len(unstorable_files) > 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcomes = {p.name: archive.store(p.read_bytes()) for p in unstorable_files}
    assert {n: hex(o.status) for n, o in outcomes.items() if o.status != 0xC000} == {}
    assert all(o.comment for o in outcomes.values())
    for collection in ("instances", "series", "studies", "patients", "fs.files", "fs.chunks"):
        assert mongo_db[collection].count_documents({}) == 0, collection


class _Commands(monitoring.CommandListener):
    """The names of the commands a client sent, with their collection or first ops."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        command = event.command
        if event.command_name == "bulkWrite":
            names = [ns["ns"].split(".", 1)[1] for ns in command["nsInfo"]]
            self.sent.append(("bulkWrite", [names[op["insert"]] for op in command["ops"]]))
        else:
            self.sent.append((event.command_name, command.get(event.command_name)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.mark.parametrize("policy", ["replace", "keep", "reject"])
def test_a_store_writes_its_file_and_instance_document_in_one_round_trip(
        ferretdb: FerretDB, mongo_db: Any, tmp_path: Path, testdata_files: list[Path],
        policy: str) -> None:
    """The first store of an archive (which learns from it that the database takes
    bulkWrite): its chunk, files document and instance document in one bulkWrite, not
    three inserts the sender waits on. A re-send of it (its file now sent ahead, the
    instance document inserted after): the duplicate policy decides as before."""
    listener = _Commands()
    client = pymongo.MongoClient(ferretdb.uri, event_listeners=[listener])
    try:
        db = client[mongo_db.name]
        archive = Archive(db, "fs", policy, tmp_path / "journal")
        data = next(p.read_bytes() for p in testdata_files if p.name == "CT_small.dcm")
        listener.sent.clear()
        assert archive.store(data).ok
        writes = [c for c in listener.sent if c[0] in ("insert", "bulkWrite")]
        assert writes == [("bulkWrite", ["fs.chunks", "fs.files", "instances"])]
        first = db.instances.find_one()
        again = archive.store(data)
        assert again.status == (0x0111 if policy == "reject" else 0)
        assert db.instances.count_documents({}) == 1
        kept = db.instances.find_one()
        assert (kept["file_id"] == first["file_id"]) == (policy != "replace")
        assert [f["_id"] for f in db["fs.files"].find()] == [kept["file_id"]]
        assert db["fs.chunks"].count_documents({}) == 1
        assert archive.files.read(kept["file_id"]) == data
        assert consistency_problems(db) == []
    finally:
        client.close()


def _two_instances(testdata_files: list[Path]) -> list[bytes]:
    return [next(p.read_bytes() for p in testdata_files if p.name == name)
            for name in ("CT_small.dcm", "MR_small.dcm")]


def test_a_store_writes_its_file_while_the_dataset_is_converted(
        ferretdb: FerretDB, mongo_db: Any, tmp_path: Path, testdata_files: list[Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the archive knows the database takes bulkWrite, a store sends its file's
    chunk, then (the chunk written) its files document, before it turns the dataset
    into DICOM JSON, and reads the answer after; then the instance document, all on the
    connection the chunk went on, not through pymongo's command path (which cost
    ~0.2 ms of CPU per store)."""
    listener = _Commands()
    client = pymongo.MongoClient(ferretdb.uri, event_listeners=[listener])
    watcher = pymongo.MongoClient(ferretdb.uri)
    try:
        db = client[mongo_db.name]
        archive = Archive(db, "fs", "reject", tmp_path / "journal")
        first, second = _two_instances(testdata_files)
        assert archive.store(first).ok  # learns that the database has bulkWrite
        seen: list[bool] = []
        convert = dicomjson.to_json

        def watched(ds: Any, file_id: Any) -> Any:
            seen.append(_written_soon(watcher[mongo_db.name], f"{file_id}/0"))
            seen.append(_written_soon(watcher[mongo_db.name], file_id, "fs.files"))
            return convert(ds, file_id)

        monkeypatch.setattr(dicomjson, "to_json", watched)
        listener.sent.clear()
        assert archive.store(second).ok
        assert seen == [True, True]
        # all of it on one connection held from the pool, unseen by command monitoring
        assert [c for c in listener.sent if c[0] in ("insert", "bulkWrite")] == []
        doc = db.instances.find_one({"_id": dcmread(BytesIO(second)).SOPInstanceUID})
        assert archive.files.read(doc["file_id"]) == second
        assert consistency_problems(db) == [] and counter_problems(db) == []
    finally:
        client.close()
        watcher.close()


def _written_soon(db: Any, _id: Any, collection: str = "fs.chunks",
                  seconds: float = 5) -> bool:
    """Whether the document is in the database within ``seconds`` (read by another
    client)."""
    deadline = time.monotonic() + seconds
    while db[collection].find_one({"_id": _id}, {"_id": 1}) is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _storing(db: Any, tmp_path: Path, rules: list[Rule] | None = None) -> tuple[Context, Any]:
    """A core context storing into ``db`` (as the DIMSE and STOW-RS front ends call it),
    and the Store decision of ``rules`` (default: anyone, anything)."""
    cfg = Config()
    cfg.database.uri = "mongodb://127.0.0.1:1/"  # the context's own client: unused
    context = Context(cfg)
    context.archive = Archive(db, "fs", "reject", tmp_path / "journal")
    decision = decide(rules or [Rule("modality", "Store", None, 1)], "modality", "Store")
    return context, decision


def test_a_store_writes_its_chunk_while_the_dataset_is_parsed(
        ferretdb: FerretDB, mongo_db: Any, tmp_path: Path, testdata_files: list[Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the front ends' entry (Context.store_as), the chunk of a file held in
    memory goes before the dataset is even parsed, and its files document with it,
    named from the meta group (a C-STORE's is built from its request)."""
    context, decision = _storing(mongo_db, tmp_path)
    watcher = pymongo.MongoClient(ferretdb.uri)
    try:
        first, second = _two_instances(testdata_files)
        assert context.store_as(decision, first, "CT01").outcome.ok
        seen: list[bool] = []
        parse = Archive.parse

        def watched(part10: Any) -> Any:
            db = watcher[mongo_db.name]
            deadline = time.monotonic() + 5
            while db["fs.files"].count_documents({}) < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            seen.extend(db[name].count_documents({}) == 2 for name in ("fs.chunks", "fs.files"))
            return parse(part10)

        monkeypatch.setattr(Archive, "parse", staticmethod(watched))
        assert context.store_as(decision, second, "CT01").outcome.ok
        assert seen == [True, True]
        sop = dcmread(BytesIO(second)).SOPInstanceUID
        stored = mongo_db.instances.find_one({"_id": sop})
        assert mongo_db["fs.files"].find_one({"_id": stored["file_id"]})["filename"] == \
            f"{sop}.dcm"
        assert not list(context.archive.journal.entries())
        assert consistency_problems(mongo_db) == [] and counter_problems(mongo_db) == []
    finally:
        watcher.close()
        context.client.close()


def test_a_file_named_ahead_from_its_meta_group_is_renamed_after_its_dataset(
        ferretdb: FerretDB, mongo_db: Any, tmp_path: Path, testdata_files: list[Path]
        ) -> None:
    """A sender whose meta group (or C-STORE request) names another SOP Instance UID
    than its dataset: the instance is stored under the dataset's, and its GridFS file,
    named ahead from the meta group, is renamed after it."""
    context, decision = _storing(mongo_db, tmp_path)
    try:
        first, second = _two_instances(testdata_files)
        assert context.store_as(decision, first, "CT01").outcome.ok
        sop = dcmread(BytesIO(second)).SOPInstanceUID
        other = sop[:-1] + ("1" if sop[-1] != "1" else "2")  # same length, meta group first
        contradicted = second.replace(sop.encode(), other.encode(), 1)
        assert dcmread(BytesIO(contradicted)).file_meta.MediaStorageSOPInstanceUID == other
        assert context.store_as(decision, contradicted, "CT01").outcome.ok
        stored = mongo_db.instances.find_one({"_id": sop})
        assert stored is not None and mongo_db.instances.count_documents({}) == 2
        info = mongo_db["fs.files"].find_one({"_id": stored["file_id"]})
        assert (info["filename"], info["metadata"]["SOPInstanceUID"]) == \
            (f"{sop}.dcm", sop)
        assert context.archive.files.read(stored["file_id"]) == contradicted
        assert not list(context.archive.journal.entries())
        assert consistency_problems(mongo_db) == [] and counter_problems(mongo_db) == []
    finally:
        context.client.close()


def test_stores_refused_after_their_chunk_was_sent_leave_nothing(
        ferretdb: FerretDB, mongo_db: Any, tmp_path: Path, testdata_files: list[Path]
        ) -> None:
    """Each way a store is refused once its chunk has gone ahead -- not DICOM, cut
    short, outside the sender's Store pattern, refused by the front end's check, a
    re-send under the reject policy -- takes the chunk back: no chunk, files document
    or journal entry is left."""
    mr_only = [Rule("modality", "Store", to_json({"Modality": "MR"}), 1)]
    context, anyone = _storing(mongo_db, tmp_path)
    restricted = decide(mr_only, "modality", "Store")
    try:
        ct, mr = _two_instances(testdata_files)
        assert context.store_as(anyone, mr, "MR01").outcome.ok
        refusals = [
            context.store_as(anyone, b"not DICOM at all", "X"),
            context.store_as(anyone, ct[:len(ct) // 2], "X"),
            context.store_as(restricted, ct, "X"),
            context.store_as(anyone, ct, "X", lambda ds: StoreOutcome(0xA900, "no")),
            context.store_as(anyone, mr, "X"),
        ]
        assert [r.outcome.ok for r in refusals] == [False] * 5
        assert refusals[2].outside_rules and refusals[4].outcome.status == 0x0111
        assert mongo_db["fs.chunks"].count_documents({}) == 1
        assert mongo_db["fs.files"].count_documents({}) == 1
        assert not list(context.archive.journal.entries())
        assert not context.archive._active
        assert consistency_problems(mongo_db) == []
    finally:
        context.client.close()


def test_a_store_failing_while_its_file_is_sent_leaves_nothing(
        ferretdb: FerretDB, mongo_db: Any, tmp_path: Path, testdata_files: list[Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversion fails while the file is on its way: the store waits for the
    file's writes before it takes them back, so no chunk or files document is left."""
    archive = Archive(mongo_db, "fs", "reject", tmp_path / "journal")
    first, second = _two_instances(testdata_files)
    assert archive.store(first).ok

    def broken(ds: Any, file_id: Any) -> Any:
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(dicomjson, "to_json", broken)
    for _ in range(20):  # the race an undo without waiting would lose, twenty times
        assert not archive.store(second).ok
    assert not archive.pending()
    assert mongo_db.instances.count_documents({}) == 1
    assert mongo_db["fs.files"].count_documents({}) == 1
    assert mongo_db["fs.chunks"].count_documents({}) == 1
    assert consistency_problems(mongo_db) == []


def test_a_file_sent_ahead_to_a_database_without_bulkwrite_is_inserted_one_at_a_time(
        ferretdb: FerretDB, mongo_db: Any, tmp_path: Path, testdata_files: list[Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The database answers a file sent ahead with CommandNotFound (another server
    since the archive learnt it had bulkWrite): the store inserts the documents one at
    a time, and later stores do so from the start."""
    archive = Archive(mongo_db, "fs", "reject", tmp_path / "journal")
    first, second = _two_instances(testdata_files)
    assert archive.store(first).ok
    read = bulkwrite._Answer.read

    def not_here(answer: Any, keep: bool = False) -> Any:
        read(answer)  # the connection's reply, then as from MongoDB 7 (nothing written)
        mongo_db["fs.chunks"].delete_many({"files_id": {"$ne": first_file}})
        mongo_db["fs.files"].delete_many({"_id": {"$ne": first_file}})
        raise pymongo.errors.OperationFailure("no such command: 'bulkWrite'", 59)

    first_file = mongo_db.instances.find_one()["file_id"]
    monkeypatch.setattr(bulkwrite._Answer, "read", not_here)
    assert archive.store(second).ok
    assert archive.files.inserter.supported is False
    assert mongo_db.instances.count_documents({}) == 2
    assert mongo_db["fs.files"].count_documents({}) == 2
    assert consistency_problems(mongo_db) == []


@pytest.mark.parametrize("code", [59, 13])
def test_a_database_without_bulkwrite_gets_one_insert_at_a_time(
        ferretdb: FerretDB, mongo_db: Any, tmp_path: Path, testdata_files: list[Path],
        monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """MongoDB 6 and 7 answer CommandNotFound (59), a MongoDB 8 user without the right
    to run it Unauthorized (13): the archive learns it once, then inserts each document
    by itself, with the same outcome."""
    def refused(inserts: Any) -> Any:
        calls.append(len(inserts))
        raise pymongo.errors.OperationFailure("refused", code)

    calls: list[int] = []
    monkeypatch.setattr(bulkwrite, "_bulk_write", refused)
    archive = Archive(mongo_db, "fs", "reject", tmp_path / "journal")
    files = [p for p in testdata_files if p.name in ("CT_small.dcm", "MR_small.dcm")]
    for path in files:
        assert archive.store(path.read_bytes()).ok
    assert archive.store(files[0].read_bytes()).status == 0x0111
    assert calls == [3]
    assert archive.files.inserter.supported is False
    assert mongo_db.instances.count_documents({}) == 2
    assert mongo_db["fs.files"].count_documents({}) == 2
    assert consistency_problems(mongo_db) == []


def test_an_instance_document_too_large_for_the_database_is_refused_and_leaves_nothing(
        mongo_db: Any, tmp_path: Path, testdata_files: list[Path]) -> None:
    """A dataset whose DICOM JSON is over BSON's 16 MiB (a 17 MB UT value: text stays
    inline) cannot be indexed: its store fails, its file is taken back, and the
    next store on the same archive (the same pooled connections) succeeds."""
    archive = Archive(mongo_db, "fs", "reject", tmp_path / "journal")
    first, second = _two_instances(testdata_files)
    assert archive.store(first).ok  # learns that the database has bulkWrite
    ds = dcmread(BytesIO(second))
    ds.add_new(0x0040A160, "UT", "x" * 17_000_000)  # Text Value
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.4.1"
    large = BytesIO()
    ds.save_as(large, enforce_file_format=True)
    outcome = archive.store(large.getvalue())
    assert not outcome.ok and outcome.status in (0xA700, 0xC000)
    assert not archive.pending()
    assert archive.store(second).ok
    assert mongo_db.instances.count_documents({}) == 2
    assert mongo_db["fs.files"].count_documents({}) == 2
    assert consistency_problems(mongo_db) == []

"""Storing a Part-10 file from its path, as large datasets are (archive.storage, part10,
dicomjson, gridstore): the same refusals, DICOM JSON, documents and GridFS file as from
its bytes, with its bulk values never read into memory.

Values are left in the file from ``storage.DEFER_SIZE`` bytes on; these tests lower it to
the smallest the JSON conversion allows, so that pydicom's small test files have values
left in their file too (Pixel Data, long texts, sequences, LUTs...).
"""

from __future__ import annotations

import json
import os
import tempfile
import tracemalloc
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mongomock
import pytest
from baddata import BASES, malformed
from bson import ObjectId
from helpers import image_dataset, make_dataset, to_part10
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from archive import dicomjson, importer, part10, storage
from archive.gridstore import CHUNK_SIZE, GridStore
from archive.storage import Archive, StoreRefused
from benchmarks.corpus import write_large_instance

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def small_defer_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "DEFER_SIZE", dicomjson.MIN_DEFER_SIZE)


def fresh_archive() -> Archive:
    return Archive(mongomock.MongoClient().archive, "fs", "replace",
                   tempfile.mkdtemp(prefix="journal-"))


def parsed_json(source: bytes | Path) -> Any:
    """The DICOM JSON of a file, or what refused it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return dicomjson.to_json(Archive.parse(source), "FILE")
        except StoreRefused as exc:
            return ("refused", exc.status, exc.comment)


def stored(source: bytes | Path) -> tuple[int, str, Any, bytes | None, dict[str, Any] | None]:
    """Status, comment, DICOM JSON (file id neutral), GridFS copy and instance document
    of a store into a fresh archive; the document without what differs between two
    stores: file id, time, and the attribute hashes (of the JSON, compared, whose bulk
    data URIs name the file)."""
    archive = fresh_archive()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = archive.store(source)
    doc = archive.instances.find_one({"_id": outcome.sop_instance_uid}) if outcome.ok else None
    if doc is None:
        assert archive.files.files.count_documents({}) == 0
        assert archive.files.chunks.count_documents({}) == 0
        return outcome.status, outcome.comment, None, None, None
    file_id = str(doc.pop("file_id"))
    data = json.loads(json.dumps(doc.pop("dataset")).replace(file_id, "FILE"))
    doc.pop("stored_at")
    doc.pop("hashes")
    return outcome.status, outcome.comment, data, archive.files.read(ObjectId(file_id)), doc


@pytest.fixture
def as_file(tmp_path: Path) -> Iterator[Any]:
    counter = iter(range(1_000_000))

    def write(data: bytes) -> Path:
        path = tmp_path / f"{next(counter)}.dcm"
        path.write_bytes(data)
        return path

    yield write


# --- the walk over a file -----------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 5, part10.WINDOW - 3, 1024 * 1024 - 7,
                                    1024 * 1024 - 4, 1024 * 1024, 2 * 1024 * 1024 + 1])
def test_the_file_walker_finds_a_delimiter_across_its_reads(tmp_path: Path,
                                                            offset: int) -> None:
    marker = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    data = bytes(offset) + marker + bytes(100)
    path = tmp_path / "x"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        walker = part10._FileWalker(fd, base=0)
        assert walker.find(marker, 0, len(data)) == offset
        assert walker.find(marker, 0, offset + len(marker) - 1) == -1
        assert walker.find(marker, min(offset + 1, len(data)), len(data)) == -1
    finally:
        os.close(fd)


def test_meta_syntax_and_end_read_from_a_path_as_from_bytes(tmp_path: Path) -> None:
    for data in (to_part10(make_dataset()), b"", b"\x00" * 132, b"\x00" * 128 + b"DICM"):
        path = tmp_path / "x.dcm"
        path.write_bytes(data)
        assert part10.meta_syntax(path) == part10.meta_syntax(data)
        assert part10.meta_end(path) == part10.meta_end(data)
    assert part10.meta_syntax(path) is None


# --- GridFS from a path ------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1,
                                  3 * CHUNK_SIZE + 12345])
def test_gridfs_put_from_a_path_writes_the_chunks_bytes_would(tmp_path: Path,
                                                              size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    db = mongomock.MongoClient().archive
    store = GridStore(db, "fs")
    from_bytes, from_path = ObjectId(), ObjectId()
    store.put(data, "x.dcm", {"a": 1}, file_id=from_bytes, length=size)
    store.put(path, "x.dcm", {"a": 1}, file_id=from_path, length=size)

    def chunks(file_id: ObjectId) -> list[tuple[str, int, bytes]]:
        return [(c["_id"].split("/")[1], c["n"], bytes(c["data"])) for c in
                db["fs.chunks"].find({"files_id": file_id}).sort("n", 1)]

    def info(file_id: ObjectId) -> dict[str, Any]:
        return {k: v for k, v in db["fs.files"].find_one({"_id": file_id}).items()
                if k not in ("_id", "uploadDate")}

    assert chunks(from_path) == chunks(from_bytes)
    assert info(from_path) == info(from_bytes)
    assert store.read(from_path) == data


def test_gridfs_put_refuses_a_file_of_another_length_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"x" * 100)
    db = mongomock.MongoClient().archive
    with pytest.raises(OSError, match="100 bytes, 99 expected"):
        GridStore(db, "fs").put(path, "x.dcm", {}, length=99)
    assert db["fs.chunks"].count_documents({}) == 0


def test_gridfs_put_notices_a_file_that_grows_while_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"x" * (CHUNK_SIZE + 10))
    db = mongomock.MongoClient().archive
    store = GridStore(db, "fs")
    real = store.chunks

    class Growing:
        def insert_one(self, doc: dict[str, Any]) -> None:
            real.insert_one(doc)
            with open(path, "ab") as fh:
                fh.write(b"more")

    store.chunks = Growing()  # type: ignore[assignment]
    with pytest.raises(OSError, match="changed while stored"):
        store.put(path, "x.dcm", {})
    assert db["fs.files"].count_documents({}) == 0  # never visible


class _Discarding:
    """A collection that takes documents and keeps none (what is left: the put's own)."""

    def insert_one(self, doc: dict[str, Any]) -> None:
        pass


def test_gridfs_put_from_a_path_holds_one_chunk_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "large.bin"
    path.write_bytes(os.urandom(30 * CHUNK_SIZE + 5))
    store = GridStore(mongomock.MongoClient().archive, "fs")
    store.chunks = store.files = _Discarding()  # type: ignore[assignment]
    tracemalloc.start()
    try:
        store.put(path, "large.dcm", {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * CHUNK_SIZE


# --- the same outcome from the file as from its bytes ------------------------------------


def test_every_pydicom_test_file_parses_the_same_from_its_path(
        testdata_files: list[Path], unstorable_files: list[Path]) -> None:
    deferred = 0
    real = dicomjson._deferred_bulk

    def counting(*args: Any) -> Any:
        nonlocal deferred
        deferred += 1
        return real(*args)

    dicomjson._deferred_bulk = counting  # type: ignore[assignment]
    try:
        for path in [*testdata_files, *unstorable_files]:
            assert parsed_json(path) == parsed_json(path.read_bytes()), path.name
    finally:
        dicomjson._deferred_bulk = real  # type: ignore[assignment]
    assert deferred > 40  # values were left in the files


def test_a_file_is_stored_from_its_path_as_from_its_bytes(as_file: Any) -> None:
    data = to_part10(image_dataset(pixels=os.urandom(64 * 64 * 2)))
    from_bytes, from_path = stored(data), stored(as_file(data))
    assert from_path == from_bytes
    assert from_path[0] == 0x0000
    assert from_path[3] == data
    assert from_path[4]["size"] == len(data)


@given(malformed())
@settings(max_examples=100, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_a_malformed_dataset_gets_the_same_outcome_from_its_path(as_file: Any,
                                                                 data: bytes) -> None:
    assert stored(as_file(data)) == stored(data)


@given(st.sampled_from(BASES), st.data())
@settings(max_examples=100, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture])
def test_a_file_cut_anywhere_gets_the_same_outcome_from_its_path(
        as_file: Any, base: tuple[str, bytes], draw: st.DataObject) -> None:
    _, data = base
    cut = draw.draw(st.integers(0, len(data) - 1), label="cut")
    assert stored(as_file(data[:cut])) == stored(data[:cut])


@pytest.mark.parametrize("missing", [1, 100, 70_000, 1_000_000])
@pytest.mark.parametrize("encapsulated", [False, True], ids=["native", "encapsulated"])
def test_a_large_file_cut_in_pixel_data_is_refused_as_truncated(
        tmp_path: Path, missing: int, encapsulated: bool) -> None:
    path = write_large_instance(tmp_path / "large.dcm", 3 * CHUNK_SIZE,
                                encapsulated=encapsulated)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - missing)
    status, comment, *_ = stored(path)
    assert (status, comment[:9]) == (0xC000, "truncated")


def test_a_deflated_file_is_read_whole_and_stored_as_from_its_bytes(as_file: Any) -> None:
    data = to_part10(image_dataset(), DeflatedExplicitVRLittleEndian)
    assert stored(as_file(data)) == stored(data)
    assert stored(data)[0] == 0x0000


# --- bulk values stay in the file ----------------------------------------------------------


@pytest.mark.parametrize("encapsulated", [False, True], ids=["native", "encapsulated"])
def test_bulk_values_are_never_read_into_memory(tmp_path: Path, monkeypatch: Any,
                                                encapsulated: bool) -> None:
    monkeypatch.setattr(storage, "DEFER_SIZE", 64 * 1024)  # as shipped
    path = write_large_instance(tmp_path / "large.dcm", 40 * CHUNK_SIZE,
                                encapsulated=encapsulated)

    def no_deferred_read(*args: Any) -> Any:
        raise AssertionError("a bulk value was read")

    monkeypatch.setattr(dicomjson, "read_deferred_data_element", no_deferred_read)
    tracemalloc.start()
    try:
        ds = Archive.parse(path)
        data = dicomjson.to_json(ds, "FILE")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data["7FE00010"] == {"vr": "OB" if encapsulated else "OW",
                                "BulkDataURI": "gridfs:FILE#7FE00010"}
    assert peak < 2 * 1024 * 1024, f"{peak} bytes for a {path.stat().st_size}-byte file"


def test_an_upload_from_a_path_cut_short_leaves_no_chunks(tmp_path: Path) -> None:
    from pymongo.errors import AutoReconnect

    archive = fresh_archive()
    real = archive.files.chunks
    calls = 0

    class FailingSecond:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def insert_one(self, doc: dict[str, Any]) -> None:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise AutoReconnect("injected")
            real.insert_one(doc)

    archive.files.chunks = FailingSecond()  # type: ignore[assignment]
    path = tmp_path / "large.dcm"
    path.write_bytes(to_part10(image_dataset(pixels=os.urandom(2 * CHUNK_SIZE))))
    outcome = archive.store(path)
    assert outcome.status == storage.OUT_OF_RESOURCES
    assert real.count_documents({}) == 0
    assert archive.instances.count_documents({}) == 0
    assert not archive.pending()


# --- archive import ------------------------------------------------------------------------


def test_import_stores_a_large_file_from_its_path(tmp_path: Path) -> None:
    path = tmp_path / "large.dcm"
    data = to_part10(image_dataset(pixels=os.urandom(64 * 64 * 2)))
    path.write_bytes(data)
    source, ds = importer.read_part10(path, in_memory_max_bytes=len(data) - 1)
    assert source == path
    small, _ = importer.read_part10(path, in_memory_max_bytes=len(data))
    assert small == data
    archive = fresh_archive()
    result = importer.import_one(archive, importer.Candidate(path, True), len(data) - 1)
    assert result.outcome == importer.STORED, result
    doc = archive.instances.find_one({"_id": result.sop_instance_uid})
    assert archive.files.read(doc["file_id"]) == data


def test_import_reads_a_large_bare_dataset_whole_to_wrap_it(tmp_path: Path) -> None:
    from helpers import dataset_bytes

    path = tmp_path / "bare.dcm"
    path.write_bytes(dataset_bytes(to_part10(image_dataset(), ExplicitVRLittleEndian)))
    source, _ = importer.read_part10(path, in_memory_max_bytes=0)
    assert isinstance(source, bytes) and source[128:132] == b"DICM"

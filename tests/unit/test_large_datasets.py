"""Storing a Part-10 file from its path, as large datasets are (archive.storage, part10,
dicomjson, gridstore): the same refusals, DICOM JSON, documents and GridFS file as from
its bytes, with its bulk values never read into memory.

Values are left in the file from ``storage.DEFER_SIZE`` bytes on; these tests lower it to
the smallest the JSON conversion allows, so that pydicom's small test files have values
left in their file too (Pixel Data, long texts, sequences, LUTs...).
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path
from typing import Any

import mongomock
import pytest
from bson import ObjectId
from helpers import make_dataset, to_part10

from archive import part10
from archive.gridstore import CHUNK_SIZE, GridStore

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


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

"""GridStore.stream_many: files read in batches, each byte as stored, memory bounded."""

from __future__ import annotations

from typing import Any

import mongomock
import pytest
from bson import ObjectId

from archive import gridstore
from archive.gridstore import GridStore


class Counting:
    """A collection that counts its finds."""

    def __init__(self, collection: Any) -> None:
        self.collection, self.finds = collection, 0

    def find(self, *args: Any, **kwargs: Any) -> Any:
        self.finds += 1
        return self.collection.find(*args, **kwargs)

    def find_one(self, *args: Any, **kwargs: Any) -> Any:
        self.finds += 1
        return self.collection.find_one(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.collection, name)


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> GridStore:
    monkeypatch.setattr(gridstore, "CHUNK_SIZE", 1000)
    store = GridStore(mongomock.MongoClient().archive, "fs")
    store.files, store.chunks = Counting(store.files), Counting(store.chunks)
    return store


def test_small_files_cost_two_queries_per_batch(store: GridStore,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gridstore, "BATCH", 4)
    data = [bytes([n]) * (100 + n) for n in range(10)]
    ids = [store.put(d, f"{n}.dcm", {}) for n, d in enumerate(data)]
    store.files.finds = store.chunks.finds = 0
    got = [(file_id, b"".join(stream)) for file_id, stream in store.stream_many(ids)]
    assert got == list(zip(ids, data, strict=True))
    assert (store.files.finds, store.chunks.finds) == (3, 3)  # batches of 4, 4, 2


def test_large_missing_and_empty_files_among_small_ones(store: GridStore) -> None:
    small, large, empty = b"s" * 10, bytes(range(256)) * 10, b""
    ids = [store.put(small, "a", {}), store.put(large, "b", {}), ObjectId(),
           store.put(empty, "c", {}), store.put(small, "d", {})]
    streams = list(store.stream_many(ids))
    assert [file_id for file_id, _ in streams] == ids
    assert b"".join(streams[0][1]) == small
    assert b"".join(streams[1][1]) == large  # 3 chunks, streamed one at a time
    with pytest.raises(FileNotFoundError, match="not found"):
        b"".join(streams[2][1])
    assert b"".join(streams[3][1]) == empty
    assert b"".join(streams[4][1]) == small


def test_read_ahead_stays_within_the_budget(store: GridStore) -> None:
    ids = [store.put(bytes([n]) * 900, f"{n}", {}) for n in range(5)]
    store.files.finds = store.chunks.finds = 0
    streams = store.stream_many(ids, budget=2000)  # two files held, the rest streamed
    assert [b"".join(s) for _, s in streams] == [bytes([n]) * 900 for n in range(5)]
    assert store.chunks.finds == 1 + 3


def test_a_missing_chunk_is_reported_for_its_file_only(store: GridStore) -> None:
    ids = [store.put(b"x" * 10, "a", {}), store.put(b"y" * 10, "b", {})]
    store.chunks.delete_one({"_id": store.chunk_id(ids[0], 0)})
    streams = list(store.stream_many(ids))
    with pytest.raises(FileNotFoundError, match="chunk 0 missing"):
        b"".join(streams[0][1])
    assert b"".join(streams[1][1]) == b"y" * 10

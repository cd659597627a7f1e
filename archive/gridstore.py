"""Original Part-10 files in GridFS, read and written by ``_id``.

The layout is GridFS's (``<bucket>.files`` and ``<bucket>.chunks`` with ``files_id``,
``n``, ``data``), so mongofiles or any driver's GridFS reads these files.  What differs
from a driver's writer is the chunk ``_id``: ``"<file id>/<n>"`` instead of a random
ObjectId, so that every chunk is fetched or deleted by one lookup of its ``_id``
without a query on ``files_id`` (``storage.ensure_indexes`` creates the ``{files_id,
n}`` index that drivers' readers use).

A file is written from its bytes or from the path of a file holding them, read one
chunk at a time: a file of gigabytes costs the node one chunk of memory.
"""

from __future__ import annotations

import datetime
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bson import ObjectId
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import PyMongoError

from archive.bulkwrite import BulkInserter, Insert, InsertFailed, Sent

CHUNK_SIZE = 1024 * 1024
#: Files looked up per query when many are read in a row (``stream_many``).
BATCH = 64
#: Bytes of small files ``stream_many`` holds read ahead at most.
READ_AHEAD_BYTES = 8 * 1024 * 1024


class ChunkWriteFailed(Exception):
    """An upload cut short: some chunks of ``file_id`` may be left to delete."""

    def __init__(self, file_id: ObjectId, cause: Exception) -> None:
        super().__init__(str(cause))
        self.file_id, self.cause = file_id, cause


#: A files document's name and metadata.
Description = tuple[str, dict[str, Any]]


def _files_document(file_id: ObjectId, size: int, filename: str,
                    metadata: dict[str, Any]) -> dict[str, Any]:
    return {"_id": file_id, "length": size, "chunkSize": CHUNK_SIZE,
            "uploadDate": datetime.datetime.now(datetime.timezone.utc),
            "filename": filename, "metadata": metadata}


class PendingFile:
    """A file whose chunks :meth:`GridStore.begin` has written, the last one perhaps
    still on its way; its files document perhaps with it, or yet to come
    (:meth:`describe`)."""

    def __init__(self, files: Collection, file_id: ObjectId, size: int, sent: Sent,
                 described: Description | None = None) -> None:
        self.files, self.file_id, self.size, self.sent = files, file_id, size, sent
        #: the files document's name and metadata, once sent
        self.described = described
        #: where the files document is in ``sent.inserts`` (-1: written before them)
        self._at: int | None = len(sent.inserts) - 1 if described is not None else None

    def describe(self, filename: str, metadata: dict[str, Any]) -> None:
        """The files document sent once the chunks are written (the file is whole: it
        appears), its outcome read by :meth:`finish`: the database writes it while the
        caller works.  Sent already with another name (:meth:`GridStore.begin` named
        it from the file's meta group, which the dataset contradicts): renamed once
        written.  Raises ChunkWriteFailed."""
        try:
            if self.described is None:
                document = _files_document(self.file_id, self.size, filename, metadata)
                self.sent = self.sent.chain([(self.files, document)])
                self._at = len(self.sent.inserts) - 1
            elif self.described != (filename, metadata):
                self.sent.finish()
                self.files.update_one({"_id": self.file_id}, {"$set": {
                    "filename": filename, "metadata": metadata}})
                self.sent, self._at = Sent(self.sent.inserter, [], None), -1
        except InsertFailed as exc:
            raise ChunkWriteFailed(self.file_id, exc.cause) from exc.cause
        except PyMongoError as exc:
            raise ChunkWriteFailed(self.file_id, exc) from exc
        self.described = (filename, metadata)

    def finish(self, then: Sequence[Insert] = ()) -> None:
        """The file written whole (after :meth:`describe`), then ``then``, in one round
        trip where the database can; raises as :meth:`GridStore.put`."""
        at = self._at
        if at is None:
            raise RuntimeError("PendingFile.finish before describe")
        try:
            self.sent.finish(then)
        except InsertFailed as exc:
            if exc.index is not None and exc.index > at:
                raise InsertFailed(exc.index - at - 1, exc.cause) from exc.cause
            raise ChunkWriteFailed(self.file_id, exc.cause) from exc.cause
        except PyMongoError as exc:
            raise ChunkWriteFailed(self.file_id, exc) from exc

    def abandon(self) -> None:
        """Nothing more written: what was sent is waited for (the chunks, perhaps the
        files document, may be there or not: the caller deletes the file, or its
        journal entry does)."""
        self.sent.abandon()


class GridStore:
    """Put, stream and delete whole files in one GridFS bucket."""

    def __init__(self, db: Database, bucket: str = "fs") -> None:
        self.files = db[f"{bucket}.files"]
        self.chunks = db[f"{bucket}.chunks"]
        self.inserter = BulkInserter()

    @staticmethod
    def chunk_id(file_id: ObjectId, n: int) -> str:
        return f"{file_id}/{n}"

    def put(self, data: bytes | Path, filename: str, metadata: dict[str, Any],
            file_id: ObjectId | None = None, length: int | None = None,
            then: Sequence[Insert] = ()) -> ObjectId:
        """Write chunks, then the files document: a file is visible only when whole;
        then the documents of ``then`` (an instance document naming the file).

        The last chunk, the files document and ``then`` go in one database round trip
        where the database can (:mod:`archive.bulkwrite`): a file of one chunk and its
        instance document, one round trip instead of three.

        ``data``: the bytes, or a path read one chunk at a time.  ``length``: the
        length the caller expects (and journals, to delete the chunks of an upload cut
        short); a file of another length raises OSError before anything is written,
        one that changes while it is read raises OSError too.  ChunkWriteFailed: the
        file may not be whole; InsertFailed: the file is whole, the document of
        ``then`` that its index names (and those after it) not written.
        """
        pending = self.begin(data, file_id, length, ahead=False)
        pending.describe(filename, metadata)
        pending.finish(then)
        return pending.file_id

    def begin(self, data: bytes | Path, file_id: ObjectId | None = None,
              length: int | None = None, ahead: bool = True,
              described: Description | None = None) -> PendingFile:
        """:meth:`put` in steps: the chunks written (``ahead``: the last one sent, its
        outcome not read yet), the files document left to :meth:`PendingFile.describe`
        and the rest to :meth:`PendingFile.finish` -- the caller works while the
        database writes.  ``described``: the files document's name and metadata,
        sent with the last chunk (then :meth:`PendingFile.describe` only checks them).
        Raises as :meth:`put`."""
        file_id = file_id or ObjectId()
        with _chunks(data) as (size, chunks):
            if length is not None and size != length:
                name = data if isinstance(data, Path) else "data"
                raise OSError(f"{name}: {size} bytes, {length} expected")
            count = max(-(-size // CHUNK_SIZE), 1)
            last: list[Insert] = []
            try:
                for n, chunk in enumerate(chunks):
                    document = {"_id": self.chunk_id(file_id, n), "files_id": file_id,
                                "n": n, "data": chunk}  # bytes: BSON binary, subtype 0
                    if n < count - 1:  # one chunk of memory at a time
                        self.chunks.insert_one(document)
                    else:
                        last.append((self.chunks, document))
            except PyMongoError as exc:
                raise ChunkWriteFailed(file_id, exc) from exc
        if described is not None:  # the files document last
            last.append((self.files, _files_document(file_id, size, *described)))
        sent = self.inserter.send(last) if ahead else Sent(self.inserter, last, None)
        return PendingFile(self.files, file_id, size, sent, described)

    def stream(self, file_id: ObjectId) -> Iterator[bytes]:
        """The file's chunks in order, one at a time (memory stays one chunk deep)."""
        info = self.files.find_one({"_id": file_id}, _INFO)
        if info is None:
            raise FileNotFoundError(f"GridFS file {file_id} not found")
        return self._stream(file_id, info)

    def stream_many(self, file_ids: Iterable[ObjectId],
                    budget: int = READ_AHEAD_BYTES) -> Iterator[tuple[ObjectId, Iterator[bytes]]]:
        """Each file's chunk stream, in the order given, read in batches.

        Reading files one by one costs two database round trips each (the files
        document, then the chunk), most of a retrieve's time on FerretDB.  Here one
        query finds the files documents of ``BATCH`` files, and one more the only chunk
        of those that fit in one, up to ``budget`` bytes: larger files are streamed a
        chunk at a time as by :meth:`stream`.  A file not found raises
        FileNotFoundError when its stream is read, not before.
        """
        ids = iter(file_ids)
        while batch := [file_id for _, file_id in zip(range(BATCH), ids, strict=False)]:
            infos = {doc["_id"]: doc for doc in self.files.find({"_id": {"$in": batch}}, _INFO)}
            whole: dict[ObjectId, bytes | None] = {}
            held = 0
            for file_id in batch:
                info = infos.get(file_id)
                if info is not None and 0 < info["length"] <= info["chunkSize"] \
                        and held + info["length"] <= budget:
                    whole[file_id], held = None, held + info["length"]
            if whole:
                wanted = {self.chunk_id(file_id, 0): file_id for file_id in whole}
                for chunk in self.chunks.find({"_id": {"$in": list(wanted)}},
                                              {"data": 1}):
                    whole[wanted[chunk["_id"]]] = bytes(chunk["data"])
            for file_id in batch:
                info = infos.get(file_id)
                if info is None:
                    yield file_id, _missing(f"GridFS file {file_id} not found")
                elif file_id not in whole:
                    yield file_id, self._stream(file_id, info)
                elif (data := whole.pop(file_id)) is None:
                    yield file_id, _missing(f"GridFS file {file_id}: chunk 0 missing")
                else:
                    yield file_id, iter((data,))
                    del data

    def _stream(self, file_id: ObjectId, info: dict[str, Any]) -> Iterator[bytes]:
        count = -(-info["length"] // info["chunkSize"]) if info["length"] else 0
        for n in range(count):
            chunk = self.chunks.find_one({"_id": self.chunk_id(file_id, n)})
            if chunk is None:
                raise FileNotFoundError(f"GridFS file {file_id}: chunk {n} missing")
            yield bytes(chunk["data"])

    def read(self, file_id: ObjectId) -> bytes:
        return b"".join(self.stream(file_id))

    def open(self, file_id: ObjectId) -> GridFile:
        """The file as a seekable binary stream (FileNotFoundError if it is gone)."""
        info = self.files.find_one({"_id": file_id}, _INFO)
        if info is None:
            raise FileNotFoundError(f"GridFS file {file_id} not found")
        return GridFile(self, file_id, info["length"], info["chunkSize"])

    def delete(self, file_id: ObjectId, length: int | None = None) -> None:
        """Remove the files document first (the file disappears), then its chunks.

        ``length`` lets a caller clean up chunks whose files document was never
        written (an upload cut short); otherwise chunks are deleted until one is missing.
        """
        info = self.files.find_one({"_id": file_id})
        chunk_size = CHUNK_SIZE
        if info is not None:
            length, chunk_size = info["length"], info["chunkSize"]
            self.files.delete_one({"_id": file_id})
        if length is not None:
            for n in range(max(-(-length // chunk_size), 1)):
                self.chunks.delete_one({"_id": self.chunk_id(file_id, n)})
            return
        n = 0
        while self.chunks.delete_one({"_id": self.chunk_id(file_id, n)}).deleted_count:
            n += 1

    def delete_many(self, file_ids: list[ObjectId]) -> None:
        """:meth:`delete` for many files in three round trips: their files documents
        read, then deleted (the files disappear), then their chunks by ``_id``."""
        if not file_ids:
            return
        infos = list(self.files.find({"_id": {"$in": file_ids}}, {"length": 1, "chunkSize": 1}))
        self.files.delete_many({"_id": {"$in": file_ids}})
        chunk_ids = [self.chunk_id(info["_id"], n) for info in infos
                     for n in range(max(-(-info["length"] // info["chunkSize"]), 1))]
        for start in range(0, len(chunk_ids), 1000):
            self.chunks.delete_many({"_id": {"$in": chunk_ids[start:start + 1000]}})
        found = {info["_id"] for info in infos}
        for file_id in file_ids:  # no files document: chunks of an upload cut short
            if file_id not in found:
                self.delete(file_id)

    def exists(self, file_id: ObjectId) -> bool:
        return self.files.find_one({"_id": file_id}, {"_id": 1}) is not None


class GridFile(io.RawIOBase):
    """A stored file read where it is wanted: one frame of a multi-frame image costs
    the chunks holding it, not the file.  One chunk is kept between reads (a parser's
    many small reads fetch it once).  It has no ``name``: pydicom then reads deferred
    values from this object, not from a path."""

    def __init__(self, store: GridStore, file_id: ObjectId, length: int,
                 chunk_size: int) -> None:
        super().__init__()
        self.store, self.file_id = store, file_id
        self.length, self.chunk_size = length, chunk_size
        self.position = 0
        self._chunk: tuple[int, bytes] = (-1, b"")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        if base + offset < 0:
            raise OSError(f"GridFS file {self.file_id}: seek before the start")
        self.position = base + offset
        return self.position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self.position < self.length:
            n, start = divmod(self.position, self.chunk_size)
            data = self._read_chunk(n)
            piece = data[start:start + len(view) - done]
            if not piece:
                raise OSError(f"GridFS file {self.file_id}: chunk {n} shorter than "
                              "its file says")
            view[done:done + len(piece)] = piece
            done += len(piece)
            self.position += len(piece)
        return done

    def _read_chunk(self, n: int) -> bytes:
        if self._chunk[0] != n:
            chunk = self.store.chunks.find_one({"_id": self.store.chunk_id(self.file_id, n)},
                                               {"data": 1})
            if chunk is None:
                raise FileNotFoundError(f"GridFS file {self.file_id}: chunk {n} missing")
            self._chunk = (n, bytes(chunk["data"]))
        return self._chunk[1]


#: What reading a file needs of its files document.
_INFO = {"length": 1, "chunkSize": 1}


def _missing(message: str) -> Iterator[bytes]:
    """A stream that raises FileNotFoundError when read."""
    raise FileNotFoundError(message)
    yield b""  # a generator: raises when read, not when called


@contextmanager
def _chunks(data: bytes | Path) -> Iterator[tuple[int, Iterator[bytes]]]:
    """The length of ``data`` and its chunks (one, empty, for an empty file)."""
    if not isinstance(data, Path):
        view = memoryview(data)
        yield len(data), (bytes(view[start:start + CHUNK_SIZE])
                          for start in range(0, max(len(data), 1), CHUNK_SIZE))
        return
    with open(data, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        yield size, _read_chunks(fh, data, size)


def _read_chunks(fh: Any, path: Path, size: int) -> Iterator[bytes]:
    """``size`` bytes of an open file, a chunk at a time; OSError if it has more or less."""
    for start in range(0, max(size, 1), CHUNK_SIZE):
        want = min(CHUNK_SIZE, size - start)
        chunk = fh.read(want)
        while len(chunk) < want:  # an unbuffered read may return less
            more = fh.read(want - len(chunk))
            if not more:
                raise OSError(f"{path}: shorter than its {size} bytes: changed while stored")
            chunk += more
        yield chunk
    if fh.read(1):
        raise OSError(f"{path}: longer than its {size} bytes: changed while stored")

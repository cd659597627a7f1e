"""The archive node with timers around each phase of a C-STORE (profiling only).

    BENCH_PHASES_OUT=phases.json python -m benchmarks.phase_node serve --config FILE

runs exactly ``python -m archive serve``, after wrapping (in this process only, the
archive's code is not modified) the functions a C-STORE goes through:

- ``handle_store``: the whole handler, i.e. all the node does for one instance once
  pynetdicom has received it;
- ``encoded_dataset``: pynetdicom's Part-10 encoding of the received dataset (before
  datasets were received into files), or ``received_dataset``: the received file read
  back (or its path, for a large one);
- ``parse``: pydicom's ``dcmread`` of those bytes;
- ``to_json``: the DICOM JSON conversion; ``instance_document``: the instance document;
- ``GridStore.put``: the original into GridFS, or in two steps, ``GridStore.begin``
  (the file sent) and ``PendingFile.finish`` (its answer read, the instance document
  inserted); ``_update_levels``: series, study and patient documents;
- every pymongo call, by collection and operation (``instances.find_one_and_replace``,
  ``fs.chunks.insert_one``...), nested inside the phases above.

On exit it writes, for each timer, the count, total and mean seconds, and the mean over
the first and last tenth of the calls (does a phase slow down as the archive grows?),
plus the duration of every ``handle_store`` call in order.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from collections import defaultdict
from typing import Any

_lock = threading.Lock()
_samples: dict[str, list[float]] = defaultdict(list)


def _record(name: str, seconds: float) -> None:
    with _lock:
        _samples[name].append(seconds)


def _timed(name: str, function: Any) -> Any:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _record(name, time.perf_counter() - started)
    return wrapper


def _timed_collection_method(op: str, function: Any) -> Any:
    @functools.wraps(function)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(self, *args, **kwargs)
        finally:
            _record(f"db {self.name}.{op}", time.perf_counter() - started)
    return wrapper


def install() -> None:
    import pymongo.collection
    from pynetdicom.events import Event

    from archive import dicomjson, gridstore, levels, storage

    try:
        from archive.dimse import services
    except ImportError:  # a source before the DICOM front end moved to archive/dimse
        from archive import services  # type: ignore[no-redef]
    services.handle_store = _timed("handle_store", services.handle_store)
    Event.encoded_dataset = _timed("encoded_dataset", Event.encoded_dataset)
    try:  # since datasets are received into files
        from archive.dimse import receiving
    except ImportError:
        try:  # before the DICOM front end moved to archive/dimse
            from archive import receiving  # type: ignore[no-redef]
        except ImportError:
            receiving = None  # type: ignore[assignment]
    if receiving is not None:
        receiving.Receiver.dataset = _timed("received_dataset", receiving.Receiver.dataset)
    storage.Archive.parse = staticmethod(_timed("parse", storage.Archive.parse))
    dicomjson.to_json = _timed("to_json", dicomjson.to_json)
    storage.Archive.instance_document = staticmethod(
        _timed("instance_document", storage.Archive.instance_document))
    gridstore.GridStore.put = _timed("GridStore.put", gridstore.GridStore.put)
    if hasattr(gridstore, "PendingFile"):  # the file written while the dataset converts
        gridstore.GridStore.begin = _timed("GridStore.begin", gridstore.GridStore.begin)
        gridstore.PendingFile.finish = _timed("PendingFile.finish",
                                              gridstore.PendingFile.finish)
    if hasattr(gridstore.PendingFile, "describe"):  # the files document sent ahead too
        gridstore.PendingFile.describe = _timed("PendingFile.describe",
                                                gridstore.PendingFile.describe)
    levels.Levels.fold = _timed("Levels.fold", levels.Levels.fold)
    storage.Archive.store = _timed("Archive.store", storage.Archive.store)
    for op in ("insert_one", "insert_many", "find_one", "find_one_and_replace",
               "update_one", "replace_one", "delete_one", "count_documents", "aggregate"):
        setattr(pymongo.collection.Collection, op,
                _timed_collection_method(op, getattr(pymongo.collection.Collection, op)))


def summary() -> dict[str, Any]:
    with _lock:
        samples = {k: list(v) for k, v in _samples.items()}
    out: dict[str, Any] = {"timers": {}, "handle_store_sequence": samples.get("handle_store", [])}
    for name, values in sorted(samples.items()):
        tenth = max(len(values) // 10, 1)
        out["timers"][name] = {
            "count": len(values), "total_s": sum(values),
            "mean_ms": 1000 * sum(values) / len(values),
            "first_tenth_mean_ms": 1000 * sum(values[:tenth]) / tenth,
            "last_tenth_mean_ms": 1000 * sum(values[-tenth:]) / tenth,
        }
    return out


def main() -> int:
    install()
    from archive.cli import main as archive_main

    try:
        return archive_main(sys.argv[1:])
    finally:
        path = os.environ.get("BENCH_PHASES_OUT")
        if path:
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(summary(), fh, indent=2)


if __name__ == "__main__":
    sys.exit(main())

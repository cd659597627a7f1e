"""Cost of each pymongo operation the store path uses, on FerretDB, against collection size.

    python -m benchmarks.bench_ferretdb_ops [--sizes 100,1000,3000] [--samples 20]

Starts a private FerretDB (SQLite handler, as the node embeds it), fills a collection
with real instance documents (built by the archive's own code from the corpus' first
file, ~5 KB of BSON each), and times, at each size, ``--samples`` calls of:

- ``find_one({_id})``: FerretDB pushes ``{_id: <string>}`` down to SQLite as
  ``WHERE _ferretdb_sjson->'$._id' = ?``, but v1.24.2 builds the unique index on
  ``_ferretdb_sjson->"_id"``: SQLite matches index expressions textually, so it scans
  the table and parses every document (compare ``--ferretdb`` with a build whose
  ``metadata.IDColumn`` is ``_ferretdb_sjson->"_id"``);
- ``find_one_and_replace({_id}, doc, upsert=True)`` of an existing and of a new _id
  (what ``Archive._index`` does for every C-STORE);
- ``replace_one({_id}, doc, upsert=True)`` and ``insert_one(doc)``: the alternatives;
- ``update_one({_id}, {$set, $addToSet, $inc}, upsert=True)``: the level documents;
- ``find({SeriesInstanceUID})``: an indexed non-_id field.

A cost that grows with the size means FerretDB scans the collection for that
operation.  Results: ``bench-data/results/ferretdb_ops.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import corpus as corpus_module
from benchmarks import harness as h


def _document() -> dict[str, Any]:
    from bson import ObjectId
    from pydicom import dcmread

    from archive import dicomjson
    from archive.storage import Archive

    params = corpus_module.Parameters(1, 1, 1, 1, 0)
    folder = h.BENCH_DATA / "corpus" / params.slug()
    corpus_module.ensure(folder, params, quiet=True)
    path = next(folder.glob("P*/ST*/SE*/IM*.dcm"))
    ds, file_id = dcmread(path), ObjectId()
    return Archive.instance_document(dicomjson.to_json(ds, file_id), file_id,
                                     str(ds.file_meta.TransferSyntaxUID), path.stat().st_size,
                                     "bench")


def _variant(template: dict[str, Any], n: int) -> dict[str, Any]:
    doc = copy.deepcopy(template)
    doc["_id"] = doc["SOPInstanceUID"] = f"1.2.3.{n}"
    doc["SeriesInstanceUID"] = f"1.2.3.series.{n // 10}"
    return doc


def _time(call: Callable[[int], Any], samples: int, start: int) -> float:
    """Median milliseconds of ``call(i)`` for ``samples`` values of i."""
    durations = []
    for i in range(start, start + samples):
        began = time.perf_counter()
        call(i)
        durations.append(time.perf_counter() - began)
    return 1000 * statistics.median(durations)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_ferretdb_ops",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,3000")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--ferretdb", type=Path, default=h.FERRETDB, help="FerretDB binary")
    parser.add_argument("--output", default="ferretdb_ops",
                        help="results file name under bench-data/results")
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))

    import pymongo

    from archive.ferretdb import command

    workdir = h.RUNS / "ferretdb_ops"
    if workdir.exists():
        import shutil
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    port = h.free_port()
    log = (workdir / "ferretdb.log").open("wb")
    process = subprocess.Popen(command(str(args.ferretdb), workdir, port), stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    rows, results = [], []
    try:
        h.wait_until(lambda: h.port_open(port), 20, "FerretDB start-up", process)
        client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/")
        coll = client.bench.instances
        coll.create_index([("SeriesInstanceUID", pymongo.ASCENDING)])
        template = _document()
        filled = 0
        fresh = 10_000_000  # _ids never inserted by the fill
        for size in sizes:
            batch = [_variant(template, n) for n in range(filled, size)]
            for start in range(0, len(batch), 500):
                coll.insert_many(batch[start:start + 500])
            filled = size
            s = args.samples
            step = max(size // s, 1)

            def existing(i: int, step: int = step, size: int = size) -> str:
                return f"1.2.3.{(i * step) % size}"

            timings = {
                "find_one {_id}": _time(lambda i: coll.find_one({"_id": existing(i)}), s, 0),
                "find_one_and_replace existing": _time(
                    lambda i: coll.find_one_and_replace(
                        {"_id": existing(i)}, _variant(template, int(existing(i)[6:])),
                        upsert=True), s, 0),
                "replace_one existing": _time(
                    lambda i: coll.replace_one({"_id": existing(i)},
                                               _variant(template, int(existing(i)[6:])),
                                               upsert=True), s, 0),
                "update_one {_id} $set/$addToSet/$inc": _time(
                    lambda i: coll.update_one({"_id": existing(i)}, {
                        "$set": {"PatientName": "X"}, "$addToSet": {"tags": i},
                        "$inc": {"n": 1}}, upsert=True), s, 0),
                "find {SeriesInstanceUID} (indexed)": _time(
                    lambda i: list(coll.find({"SeriesInstanceUID": f"1.2.3.series.{i}"},
                                             {"_id": 1})), s, 0),
                "insert_one new": _time(
                    lambda i: coll.insert_one(_variant(template, i)), s, fresh),
                "find_one_and_replace new (upsert)": _time(
                    lambda i: coll.find_one_and_replace(
                        {"_id": f"1.2.3.{i}"}, _variant(template, i), upsert=True),
                    s, fresh + 1000),
            }
            # the inserted samples are removed so every size holds exactly ``size`` docs
            timings["delete_one {_id}"] = _time(
                lambda i: coll.delete_one({"_id": f"1.2.3.{i}"}), s, fresh)
            for i in range(fresh + 1000, fresh + 1000 + s):
                coll.delete_one({"_id": f"1.2.3.{i}"})
            results.append({"size": size, "median_ms": timings})
            print(f"  size {size}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in timings.items()),
                  file=sys.stderr)
            for op, ms in timings.items():
                rows.append([size, op, ms])
        client.close()
    finally:
        process.terminate()
        process.wait(10)
        log.close()
    print(h.table(["documents", "operation", "median ms"], rows))
    path = h.write_results(args.output, {
        "benchmark": "ferretdb_ops", "ferretdb": str(args.ferretdb),
        "document_bytes": len(__import__("bson").encode(template)),
        "samples": args.samples, "environment": h.environment_info(), "results": results})
    print(f"results: {path.relative_to(h.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

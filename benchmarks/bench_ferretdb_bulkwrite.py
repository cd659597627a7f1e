"""One stored instance's writes: three inserts, or one bulkWrite (FerretDB patch 13).

    python -m benchmarks.bench_ferretdb_bulkwrite [--rounds 8] [--per-round 100] [--profile 8]

Starts one private FerretDB (the checkout's build, the archive's indexes) and writes
what a C-STORE of a CT image writes, as :class:`archive.gridstore.GridStore` does: a
GridFS chunk (the file's 22 KiB), its files document and a ~14 KiB instance document
(CT_small.dcm as DICOM JSON). Two ways take turns, ``--per-round`` instances each per
round: ``insert_one`` three times, or the three in one ``bulkWrite`` command
(:mod:`archive.bulkwrite`). Reported per way: median ms per instance as the client
sees it, FerretDB's CPU ms and the client's CPU ms per instance (medians of the rounds).
With ``--profile``, then a CPU profile of FerretDB taking bulkWrites (``go tool pprof``).

Results: ``bench-data/results/<--output>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

from benchmarks import harness as h
from benchmarks.bench_ferretdb_reads import (
    Server,
    dataset_json,
    instance,
    pprof_top,
    profile_while,
)

FILE_BYTES = 22 * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_ferretdb_bulkwrite",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                        help="then a CPU profile of FerretDB while it takes bulkWrites")
    parser.add_argument("--quiet-wait", type=float, default=60,
                        help="seconds to wait for other processes to leave the machine idle")
    parser.add_argument("--output", default="ferretdb_bulkwrite",
                        help="results file name under bench-data/results")
    args = parser.parse_args(argv)

    import pymongo
    from bson import ObjectId

    from archive.bulkwrite import BulkInserter
    from archive.storage import ensure_indexes

    h.wait_for_quiet(timeout=args.quiet_wait)
    template, data = dataset_json(), os.urandom(FILE_BYTES)
    server = Server(h.FERRETDB, h.RUNS / "ferretdb_bulkwrite")
    client = pymongo.MongoClient(f"mongodb://127.0.0.1:{server.port}/")
    db = client.bench
    ensure_indexes(db)
    counter = [0]

    def writes() -> list[tuple[Any, dict[str, Any]]]:
        file_id, n = ObjectId(), counter[0]
        counter[0] += 1
        return [(db["fs.chunks"], {"_id": f"{file_id}/0", "files_id": file_id, "n": 0,
                                   "data": data}),
                (db["fs.files"], {"_id": file_id, "length": FILE_BYTES, "chunkSize": 1 << 20,
                                  "filename": f"{n}.dcm", "metadata": {"n": n}}),
                (db.instances, {**instance(template, n), "file_id": file_id})]

    def separately() -> None:
        for collection, document in writes():
            collection.insert_one(document)

    bulk = BulkInserter()
    ways = {"three insert_one": separately, "one bulkWrite": lambda: bulk.insert(writes())}
    stats: dict[str, dict[str, list[float]]] = {
        way: {"ms": [], "server_cpu": [], "client_cpu": []} for way in ways}
    try:
        for call in ways.values():  # warm: first pages, statements, the Go heap
            for _ in range(5):
                call()
        assert bulk.supported, "this FerretDB has no bulkWrite command (patch 13)"
        with h.CpuMeter() as meter:
            for _ in range(args.rounds):
                for way, call in ways.items():
                    server_cpu, client_cpu = server.cpu(), time.process_time()
                    began = time.perf_counter()
                    for _ in range(args.per_round):
                        call()
                    per = 1000 / args.per_round
                    stats[way]["ms"].append((time.perf_counter() - began) * per)
                    stats[way]["server_cpu"].append((server.cpu() - server_cpu) * per)
                    stats[way]["client_cpu"].append((time.process_time() - client_cpu) * per)
        if args.profile:
            h.RESULTS.mkdir(parents=True, exist_ok=True)
            profile = h.RESULTS / f"{args.output}.pprof"
            profile_while(server, ways["one bulkWrite"], args.profile, profile)
            top = pprof_top(h.FERRETDB, profile)
            (h.RESULTS / f"{args.output}.pprof.txt").write_text(top, encoding="utf-8")
            print(top)
    finally:
        client.close()
        server.close()
    results = {way: {k: statistics.median(v) for k, v in s.items()} for way, s in stats.items()}
    print(h.table(["way", "ms/instance", "FerretDB CPU ms/instance", "client CPU ms/instance"],
                  [[way, r["ms"], r["server_cpu"], r["client_cpu"]]
                   for way, r in results.items()]))
    path = h.write_results(args.output, {
        "benchmark": "ferretdb_bulkwrite", "instances_per_way": args.rounds * args.per_round,
        "results": results, "foreign_cores": meter.result["foreign_cores"],
        "environment": h.environment_info()})
    print(f"results: {path.relative_to(h.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

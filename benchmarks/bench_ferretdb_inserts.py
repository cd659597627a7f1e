"""FerretDB's CPU per stored instance document, builds side by side.

    python -m benchmarks.bench_ferretdb_inserts --ferretdb A --ferretdb B [--rounds 10]
        [--per-round 30] [--profile SECONDS]

Starts one private FerretDB (SQLite handler, as the node embeds it) per ``--ferretdb``
build, each with the archive's indexes (``archive.storage.ensure_indexes``: the five on
``instances``), and inserts ~14 KiB nested instance documents (those of
``bench_ferretdb_reads``: CT_small.dcm as DICOM JSON, normalised fields on top) one
``insert_one`` at a time, as the archive stores an instance. The builds take turns,
``--per-round`` inserts each per round, so that they see the same machine; reported per
build: FerretDB's CPU ms per insert (all its threads, /proc/PID/task/*/schedstat; the
median of the rounds, and the total), the bytes it allocated per insert (Go's counter,
/debug/metrics) and the median ms per insert as the client sees it. With ``--profile``,
a CPU profile of each build while it inserts, saved beside the results.

Results: ``bench-data/results/<--output>.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import harness as h
from benchmarks.bench_ferretdb_reads import (
    Server,
    dataset_json,
    instance,
    pprof_top,
    profile_while,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_ferretdb_inserts",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ferretdb", type=Path, action="append",
                        help="FerretDB binary (repeat to compare builds; default: the "
                             "checkout's)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=30)
    parser.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                        help="CPU profile of each build while it inserts")
    parser.add_argument("--quiet-wait", type=float, default=60,
                        help="seconds to wait for other processes to leave the machine idle")
    parser.add_argument("--output", default="ferretdb_inserts",
                        help="results file name under bench-data/results")
    args = parser.parse_args(argv)
    binaries = args.ferretdb or [h.FERRETDB]

    import bson
    import pymongo
    from bson import ObjectId

    from archive.storage import ensure_indexes

    h.wait_for_quiet(timeout=args.quiet_wait)
    template = dataset_json()
    doc_bytes = len(bson.encode(instance(template, 0)))
    print(f"  instance document: {doc_bytes} bytes of BSON", file=sys.stderr)
    servers = [Server(b, h.RUNS / f"ferretdb_inserts_{i}") for i, b in enumerate(binaries)]
    clients = [pymongo.MongoClient(f"mongodb://127.0.0.1:{s.port}/") for s in servers]
    colls = []
    for client in clients:
        ensure_indexes(client.bench)
        colls.append(client.bench.instances)
    counter = [0]

    def insert(coll: Any) -> float:
        doc = copy.copy(instance(template, counter[0]))
        doc.update(file_id=ObjectId(), TransferSyntaxUID="1.2.840.10008.1.2.1")
        counter[0] += 1
        began = time.perf_counter()
        coll.insert_one(doc)
        return time.perf_counter() - began

    stats: list[dict[str, list[float]]] = [{"cpu": [], "alloc": [], "ms": []} for _ in servers]
    profiles: list[str] = []
    try:
        for coll in colls:  # warm: first pages, statements, the Go heap
            for _ in range(5):
                insert(coll)
        with h.CpuMeter() as meter:
            for _ in range(args.rounds):
                for i, (server, coll) in enumerate(zip(servers, colls, strict=True)):
                    cpu, allocated = server.cpu(), server.allocated()
                    durations = [insert(coll) for _ in range(args.per_round)]
                    stats[i]["cpu"].append(1000 * (server.cpu() - cpu) / args.per_round)
                    stats[i]["alloc"].append((server.allocated() - allocated)
                                             / args.per_round / 1024)
                    stats[i]["ms"].extend(1000 * d for d in durations)
        if args.profile:
            h.RESULTS.mkdir(parents=True, exist_ok=True)
            for i, (server, coll) in enumerate(zip(servers, colls, strict=True)):
                path = h.RESULTS / f"{args.output}_{i}.pprof"
                profile_while(server, lambda c=coll: insert(c), args.profile, path)
                profiles.append(str(path.relative_to(h.REPO)))
                top = pprof_top(binaries[i], path)
                (h.RESULTS / f"{args.output}_{i}.pprof.txt").write_text(top, encoding="utf-8")
                print(f"--- profile of {binaries[i]} ---\n{top}")
    finally:
        for client in clients:
            client.close()
        for server in servers:
            server.close()
    rows = []
    builds = []
    for binary, s in zip(binaries, stats, strict=True):
        build = {"ferretdb": str(binary), "inserts": args.rounds * args.per_round,
                 "server_cpu_ms_median_round": statistics.median(s["cpu"]),
                 "server_cpu_ms_mean": statistics.fmean(s["cpu"]),
                 "allocated_kib": statistics.fmean(s["alloc"]),
                 "median_ms": statistics.median(s["ms"])}
        builds.append(build)
        rows.append([str(binary), build["server_cpu_ms_median_round"],
                     build["server_cpu_ms_mean"], build["allocated_kib"], build["median_ms"]])
    print(h.table(["build", "FerretDB CPU ms/insert (median round)", "(mean)",
                   "allocated KiB/insert", "median ms/insert"], rows))
    path = h.write_results(args.output, {
        "benchmark": "ferretdb_inserts", "document_bytes": doc_bytes, "builds": builds,
        "foreign_cores": meter.result["foreign_cores"], "profiles": profiles,
        "environment": h.environment_info()})
    print(f"results: {path.relative_to(h.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

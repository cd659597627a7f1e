"""Do concurrent writers into one FerretDB database go faster than one writer?

    python -m benchmarks.bench_ferretdb_writers [--writers 1,2,4] [--instances 150]
                                                [--layout same|collections|databases]
                                                [--ferretdb BINARY]

A private FerretDB (SQLite handler, as the node embeds it); each of ``--writers`` client
threads does, ``--instances`` times, the writes a C-STORE of a new instance makes: a
GridFS chunk (39 KB), a GridFS files document, the instance document (the archive's own,
from the corpus' first file) and one ``$inc`` of a level document (what a write-behind
batch costs per instance, rounded up).  Layouts: every writer into the same collections
(what 4 associations into one node do), each into collections of its own in the same
database, or each into a database of its own (another SQLite file).

Printed per number of writers: the rate, FerretDB's CPU (cores, ms per instance), the
cores the machine left idle, and what FerretDB's command goroutines were doing, from
goroutine dumps (``/debug/pprof``) taken every 0.1 s: waiting for patch 02's collection
lock, sleeping in SQLite's busy handler (another connection holds the database's write
lock: SQLite sleeps 1, 2, 5, 10... ms before trying again), in fsync, in SQLite,
encoding or decoding documents.  Results: ``bench-data/results/ferretdb_writers.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import harness as h
from benchmarks.bench_ferretdb_ops import _document

TICK = os.sysconf("SC_CLK_TCK")
CHUNK = b"\x00" * 39_000

#: What a command goroutine is doing, by what its stack holds (first match wins).
STATES = [
    ("collection lock (patch 02)", ("collectionLocks",)),
    ("SQLite busy handler (sleeping)", ("sqliteDefaultBusyCallback",)),
    ("fsync", ("unixSync", "Fsync", "fdatasync")),
    ("SQLite", ("modernc.org/sqlite",)),
    ("encoding / decoding", ("sjson", "bson.", "/types.")),
]


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _idle() -> float:
    busy, total = h._machine_jiffies()
    return (total - busy) / TICK


def classify(dumps: list[str]) -> dict[str, float]:
    """Command goroutines per state, averaged over the dumps."""
    states: Counter[str] = Counter()
    for text in dumps:
        for goroutine in text.split("\n\n"):
            if "handler.(*Handler).Msg" not in goroutine:
                continue  # not serving a command
            state = next((name for name, marks in STATES
                          if any(mark in goroutine for mark in marks)), "other")
            states[state] += 1
    return {state: n / max(len(dumps), 1) for state, n in states.most_common()}


def run(client: Any, debug_port: int, writers: int, instances: int, layout: str,
        template: dict[str, Any], pid: int) -> dict[str, Any]:
    """``writers`` threads storing ``instances`` each; the figures of the run."""
    def database(writer: int) -> Any:
        return client[f"w{writers}_{writer}" if layout == "databases" else f"w{writers}"]

    def suffix(writer: int) -> str:
        return f"_{writer}" if layout == "collections" else ""

    docs = []
    for writer in range(writers):
        database(writer)[f"levels{suffix(writer)}"].insert_one({"_id": writer, "n": 0})
        batch = []
        for n in range(instances):
            doc = copy.deepcopy(template)
            doc["_id"] = f"{writer}.{n}"
            batch.append(doc)
        docs.append(batch)

    def work(writer: int) -> None:
        db, sfx = database(writer), suffix(writer)
        for n, doc in enumerate(docs[writer]):
            db[f"fs.chunks{sfx}"].insert_one({"_id": f"{writer}.{n}/0", "n": 0, "data": CHUNK})
            db[f"fs.files{sfx}"].insert_one({"_id": f"{writer}.{n}", "length": len(CHUNK)})
            db[f"instances{sfx}"].insert_one(doc)
            db[f"levels{sfx}"].update_one({"_id": writer}, {"$inc": {"n": 1}})

    dumps: list[str] = []
    done = threading.Event()

    def dump() -> None:
        url = f"http://127.0.0.1:{debug_port}/debug/pprof/goroutine?debug=2"
        while not done.wait(0.1):
            with urllib.request.urlopen(url, timeout=10) as response:
                dumps.append(response.read().decode(errors="replace"))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    dumper = threading.Thread(target=dump)
    cpu0, idle0, wall0 = _cpu(pid), _idle(), time.perf_counter()
    dumper.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - wall0
    cpu, idle = _cpu(pid) - cpu0, _idle() - idle0
    done.set()
    dumper.join()
    total = writers * instances
    return {"writers": writers, "instances": total, "seconds": wall,
            "instances_per_s": total / wall, "ferretdb_cores": cpu / wall,
            "ferretdb_cpu_ms_per_instance": 1000 * cpu / total, "idle_cores": idle / wall,
            "goroutines": classify(dumps), "dumps": len(dumps)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_ferretdb_writers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", default="1,2,4")
    parser.add_argument("--instances", type=int, default=150, help="per writer")
    parser.add_argument("--layout", choices=["same", "collections", "databases"],
                        default="same")
    parser.add_argument("--ferretdb", type=Path, default=h.FERRETDB, help="FerretDB binary")
    parser.add_argument("--quiet-wait", type=float, default=120, metavar="SECONDS")
    parser.add_argument("--output", default="ferretdb_writers",
                        help="results file name under bench-data/results")
    args = parser.parse_args(argv)

    import pymongo

    from archive.ferretdb import command

    workdir = h.RUNS / "ferretdb_writers"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    port, debug_port = h.free_port(), h.free_port()
    argv_ = [a if a != "--debug-addr=-" else f"--debug-addr=127.0.0.1:{debug_port}"
             for a in command(str(args.ferretdb), workdir, port)]
    log = (workdir / "ferretdb.log").open("wb")
    process = subprocess.Popen(argv_, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    results = []
    try:
        h.wait_until(lambda: h.port_open(port), 20, "FerretDB start-up", process)
        client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/", maxPoolSize=50)
        template = _document()
        for writers in (int(w) for w in args.writers.split(",")):
            if args.quiet_wait > 0:
                h.wait_for_quiet(timeout=args.quiet_wait)
            result = run(client, debug_port, writers, args.instances, args.layout, template,
                         process.pid)
            results.append(result)
            print(f"  {writers} writer(s): {result['instances_per_s']:.1f} instances/s",
                  file=sys.stderr)
        client.close()
    finally:
        process.terminate()
        process.wait(10)
        log.close()
    print(f"layout: {args.layout}; FerretDB: {args.ferretdb}")
    print(h.table(["writers", "inst/s", "FerretDB cores", "FerretDB ms/inst", "idle cores"],
                  [[r["writers"], r["instances_per_s"], r["ferretdb_cores"],
                    r["ferretdb_cpu_ms_per_instance"], r["idle_cores"]] for r in results]))
    states = list(dict.fromkeys(s for r in results for s in r["goroutines"]))
    print("\ncommand goroutines, on average, by what they were doing:")
    print(h.table(["writers", *states],
                  [[r["writers"], *(r["goroutines"].get(s, 0.0) for s in states)]
                   for r in results]))
    path = h.write_results(args.output, {
        "benchmark": "ferretdb_writers", "ferretdb": str(args.ferretdb),
        "layout": args.layout, "environment": h.environment_info(), "results": results})
    print(f"results: {path.relative_to(h.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

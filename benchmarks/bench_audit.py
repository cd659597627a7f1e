"""Searching the audit trail on the embedded FerretDB: the console's Audit page and
``archive audit`` (``acl.audit.search``), with and without the windows of ``at``.

    python -m benchmarks.bench_audit [--ferretdb BINARY] [--sizes 10000,100000]
        [--days 30] [--samples 5]

Starts a private FerretDB (SQLite handler, as the node embeds it), fills the trail with
``--sizes`` entries as the node writes them (``acl.audit.association_entry`` /
``operation_entry`` fields, one C-STORE in ten refused or failed, three principals),
spread evenly over the last ``--days`` days, and times (median of ``--samples``) the
searches the Audit page makes, 50 entries a page: the newest page, the tenth page, one
user's newest page, the newest failures, the entries of the last 7 days.  Each is
timed as the archive searches (the newest entries first looked for in the last hour,
day, week... of ``at``, which FerretDB searches in its index) and as one search of the
whole trail (what it did before), with the ratio.  Results:
``bench-data/results/<--output>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import random
import statistics
import time
from pathlib import Path
from typing import Any

import pymongo

from acl import audit
from benchmarks import harness as h
from benchmarks.bench_ferretdb_reads import Server

SEARCHES: dict[str, dict[str, Any]] = {
    "newest page": {},
    "tenth page": {"offset": 450},
    "one user's newest": {"user": "bob"},
    "newest failures": {"failures": True},
    "last 7 days, newest": {"since_days": 7},
}


def fill(collection: Any, size: int, days: float, rng: random.Random) -> None:
    now = audit.now()
    step = days * 86400 / size
    batch = []
    for n in range(size):
        failed = rng.random() < 0.1
        entry = audit.stamp({
            "time": now - datetime.timedelta(seconds=(size - n) * step),
            "kind": "operation", "event": "C-STORE", "principal": rng.choice(
                ("alice", "bob", "modality")), "established": "ae-title",
            "basis": "AE STORESCU from 10.0.0.7", "address": "10.0.0.7", "port": 40000 + n % 999,
            "calling_ae": "STORESCU", "called_ae": "ARCHIVE", "service": "Store",
            "request": f"1.2.826.0.1.3680043.8.498.{rng.getrandbits(96)}",
            "allowed": not failed or rng.random() < 0.5, "rule": 3, "restricted": False,
            "status": 0xA700 if failed else 0, "comment": "", "counts": {}, "ms": 9.5})
        batch.append(entry)
        if len(batch) == 5000:
            collection.insert_many(batch)
            batch = []
    if batch:
        collection.insert_many(batch)


def search_ms(db: Any, args: dict[str, Any], samples: int, windows: bool) -> float:
    kwargs = dict(args)
    if "since_days" in kwargs:
        kwargs["since"] = audit.now() - datetime.timedelta(days=kwargs.pop("since_days"))
    durations = []
    for _ in range(samples):
        began = time.perf_counter()
        found = audit.search(db, limit=51, windows=windows, **kwargs)
        durations.append(time.perf_counter() - began)
        assert found, kwargs
    return 1000 * statistics.median(durations)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ferretdb", default=str(h.REPO / ".tools/bin/ferretdb"))
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--output", default="audit")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    server = Server(Path(args.ferretdb), h.REPO / "bench-data/runs/audit/ferretdb")
    results: dict[str, Any] = {"command": "python -m benchmarks.bench_audit " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "sizes": {}}
    try:
        client = pymongo.MongoClient(f"mongodb://127.0.0.1:{server.port}/")
        db = client.audit_bench
        log = audit.AuditLog(db)
        log.start()  # the trail's indexes, as the node creates them
        log.stop()
        rng = random.Random(1)
        filled = 0
        print(f"{'entries':>8}  {'search':<22} {'windows ms':>10} {'whole ms':>9} {'ratio':>6}")
        for size in sizes:
            fill(db[audit.COLLECTION], size - filled, args.days, rng)
            filled = size
            rows = {}
            for name, search in SEARCHES.items():
                fast = search_ms(db, search, args.samples, windows=True)
                whole = search_ms(db, search, max(1, args.samples // 2), windows=False)
                rows[name] = {"windows_ms": fast, "whole_trail_ms": whole}
                print(f"{size:>8}  {name:<22} {fast:>10.1f} {whole:>9.1f} "
                      f"{fast / whole:>6.3f}")
            results["sizes"][str(size)] = rows
        client.close()
    finally:
        server.close()
    out = h.write_results(args.output, results)
    print(f"results: {out.relative_to(h.REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

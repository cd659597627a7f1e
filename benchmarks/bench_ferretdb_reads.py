"""FerretDB on the archive's reads: nested DICOM JSON by _id, and finds on indexed fields.

    python -m benchmarks.bench_ferretdb_reads [--ferretdb BINARY] [--sizes 10000,50000]
        [--samples 15] [--scan-samples 3] [--reads 300] [--series-size 200]
        [--profile SECONDS]

Starts a private FerretDB (SQLite handler, as the node embeds it) and measures:

- **reads by _id** of ~14 KiB nested DICOM JSON documents (instance-like documents
  built from pydicom's ``CT_small.dcm`` with ``archive.dicomjson.to_json``), of the same
  content as one JSON string, and of a tiny document: median milliseconds per
  ``find_one`` as the client sees it, FerretDB's CPU milliseconds per read (all its
  threads, from /proc/PID/task/*/schedstat) and the bytes it allocated per read (Go's
  counter, ``/debug/metrics``); the nested one also with projections (one field, and
  ``{dataset: 0}``);
- **projected finds**: ``find({SeriesInstanceUID: x}, projection)`` of a series of
  ``--series-size`` (200) instance documents (with ``file_id`` and
  ``TransferSyntaxUID``, as the archive stores them) by its index, with no projection,
  with a C-MOVE's ``{file_id: 1, SOPClassUID: 1, TransferSyntaxUID: 1}``, with
  ``{dataset: 0}``, and with an IMAGE-level C-FIND answer's (the hierarchy keys and five
  ``dataset.<tag>`` members): median ms per find, FerretDB CPU ms and KiB allocated per
  find;
- **finds on indexed fields** of an instances-like collection (the same documents, with
  normalised top-level fields as the archive keeps them, each field indexed) at each of
  ``--sizes`` documents: ``{StudyDate: {$gte, $lte}}`` (a month), ``{PatientName:
  {$regex: "^DUB"}}``, ``{AccessionNumber: x}``, ``{SeriesInstanceUID: x}``; median
  milliseconds of ``list(find(...))``, the number of answers and the SQLite plan
  FerretDB reports (``explain``). A query that scans costs seconds at these sizes, so
  ``--scan-samples`` caps its samples;
- with ``--profile SECONDS``: a CPU profile of FerretDB (``--debug-addr``,
  ``/debug/pprof/profile``) while a loop reads nested documents by _id, saved beside the
  results, and its top entries (``go tool pprof -top``) printed.

Compare builds with ``--ferretdb`` (``ferretdb/build /tmp/x <patches...>``; see
ferretdb/README.md). Results: ``bench-data/results/<--output>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import harness as h

#: Surnames of the generated patients; one in len(SURNAMES) starts with DUB.
SURNAMES = ["MARTIN", "BERNARD", "DUBOIS", "THOMAS", "ROBERT", "RICHARD", "PETIT", "DURAND",
            "LEROY", "MOREAU", "SIMON", "LAURENT", "LEFEBVRE", "MICHEL", "GARCIA", "DAVID",
            "BERTRAND", "ROUX", "VINCENT", "FOURNIER", "MOREL", "GIRARD", "ANDRE", "MERCIER",
            "DUPONT", "LAMBERT", "BONNET", "FRANCOIS", "MARTINEZ", "LEGRAND"]
GIVEN = ["JEAN", "MARIE", "PIERRE", "ANNE", "LUC", "CLAIRE", "PAUL", "SOPHIE"]
INSTANCES_PER_SERIES = 10
SERIES_PER_STUDY = 3
FIRST_DAY = 736_000  # 2016-02-08 as a proleptic ordinal
DAYS = 9 * 365
#: Indexes of the instances-like collection, one per queried field (as createIndexes
#: makes them: _ferretdb_sjson->"<field>", ferretdb_member(_ferretdb_sjson, '<field>')
#: with patch 12).
INDEXED = ("SeriesInstanceUID", "StudyInstanceUID", "PatientID", "PatientName", "StudyDate",
           "AccessionNumber")


def dataset_json() -> dict[str, Any]:
    """CT_small.dcm as the archive stores it: DICOM JSON, nested sequences included."""
    import warnings

    from bson import ObjectId
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    from archive import dicomjson

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dicomjson.to_json(dcmread(get_testdata_file("CT_small.dcm")), ObjectId())


def study_fields(study: int) -> dict[str, Any]:
    """The normalised top-level fields of study number ``study`` (deterministic)."""
    import datetime

    rng = random.Random(study)
    patient = study // 2
    prng = random.Random(-1 - patient)
    day = datetime.date.fromordinal(FIRST_DAY + rng.randrange(DAYS))
    return {
        "PatientID": f"PID{patient:06d}",
        "PatientName": f"{prng.choice(SURNAMES)}^{prng.choice(GIVEN)}",
        "StudyInstanceUID": f"1.2.826.0.1.3680043.10.1.{study}",
        "StudyDate": day.strftime("%Y%m%d"),
        "StudyTime": f"{rng.randrange(24):02d}{rng.randrange(60):02d}00.000000",
        "AccessionNumber": f"ACC{study:07d}",
    }


def instance(template: dict[str, Any], n: int) -> dict[str, Any]:
    """Instance-like document number ``n``: normalised keys on top, DICOM JSON inside."""
    series = n // INSTANCES_PER_SERIES
    study = series // SERIES_PER_STUDY
    uid = f"1.2.826.0.1.3680043.10.3.{n}"
    return {
        "_id": uid, "SOPInstanceUID": uid,
        "SeriesInstanceUID": f"1.2.826.0.1.3680043.10.2.{series}",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "Modality": "CT",
        **study_fields(study),
        "size": 39_000 + n % 1000, "source": "BENCH",
        "dataset": template,
    }


def median_ms(call: Callable[[int], Any], samples: int) -> float:
    durations = []
    for i in range(samples):
        began = time.perf_counter()
        call(i)
        durations.append(time.perf_counter() - began)
    return 1000 * statistics.median(durations)


class Server:
    """A private FerretDB with its debug handler on a free port."""

    def __init__(self, binary: Path, workdir: Path) -> None:
        from archive.ferretdb import command

        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
        self.port, self.debug_port = h.free_port(), h.free_port()
        argv = [a if a != "--debug-addr=-" else f"--debug-addr=127.0.0.1:{self.debug_port}"
                for a in command(str(binary), workdir, self.port)]
        self.log = (workdir / "ferretdb.log").open("wb")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        h.wait_until(lambda: h.port_open(self.port), 20, "FerretDB start-up", self.process)

    def cpu(self) -> float:
        """CPU seconds FerretDB's threads have used (the scheduler's nanoseconds)."""
        total = 0
        for stat in Path(f"/proc/{self.process.pid}/task").glob("*/schedstat"):
            with contextlib.suppress(OSError, ValueError, IndexError):  # a thread exited
                total += int(stat.read_text().split()[0])
        return total / 1e9

    def allocated(self) -> float:
        """Bytes FerretDB has allocated so far (Go's counter, from /debug/metrics)."""
        url = f"http://127.0.0.1:{self.debug_port}/debug/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            metrics = response.read().decode()
        return float(re.search(r"^go_memstats_alloc_bytes_total (\S+)$", metrics, re.M)[1])

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def reads(server: Server, db: Any, template: dict[str, Any], count: int,
          samples: int) -> dict[str, dict[str, float]]:
    """find_one by _id: nested document (whole, and with a projection), the same content
    as one string, a tiny one."""
    nested = instance(template, 0)
    kinds: dict[str, tuple[str, Callable[[int], dict[str, Any]], dict[str, Any] | None]] = {
        "nested": ("nested", lambda n: {**copy.copy(nested), "_id": f"doc-{n}"}, None),
        "nested, projection {SeriesInstanceUID: 1}": ("nested", lambda n: {},
                                                      {"SeriesInstanceUID": 1}),
        "nested, projection {dataset: 0}": ("nested", lambda n: {}, {"dataset": 0}),
        "one string": ("one_string", lambda n: {"_id": f"doc-{n}",
                                                "json": json.dumps(nested["dataset"])}, None),
        "tiny": ("tiny", lambda n: {"_id": f"doc-{n}", "n": n}, None),
    }
    out = {}
    for kind, (collection, make, projection) in kinds.items():
        coll = db[f"reads_{collection}"]
        if coll.estimated_document_count() == 0:
            coll.insert_many([make(n) for n in range(count)])
        coll.find_one({"_id": "doc-0"}, projection)  # warm
        cpu, allocated = server.cpu(), server.allocated()
        ms = median_ms(lambda i, coll=coll, p=projection: coll.find_one(
            {"_id": f"doc-{(i * 7) % count}"}, p), samples)
        out[kind] = {"median_ms": ms, "server_cpu_ms": 1000 * (server.cpu() - cpu) / samples,
                     "allocated_kib": (server.allocated() - allocated) / samples / 1024}
        print(f"  read {kind}: {ms:.2f} ms, FerretDB CPU {out[kind]['server_cpu_ms']:.2f} ms, "
              f"allocated {out[kind]['allocated_kib']:.0f} KiB", file=sys.stderr)
    return out


#: The projections of the projected finds: none, a C-MOVE / C-GET's, all but the dataset.
PROJECTIONS: dict[str, dict[str, Any] | None] = {
    "no projection": None,
    "{file_id, SOPClassUID, TransferSyntaxUID}": {"file_id": 1, "SOPClassUID": 1,
                                                  "TransferSyntaxUID": 1},
    "{dataset: 0}": {"dataset": 0},
    # an IMAGE-level C-FIND answer's (archive/find.py answer_projection): the hierarchy
    # keys and a few DICOM JSON members of the dataset
    "IMAGE answer {keys, dataset.<5 tags>}": {
        "PatientID": 1, "SOPInstanceUID": 1, "SeriesInstanceUID": 1, "StudyInstanceUID": 1,
        "dataset.00080016": 1, "dataset.00080018": 1, "dataset.00080060": 1,
        "dataset.00200013": 1, "dataset.00280010": 1},
}


def projected_finds(server: Server, db: Any, template: dict[str, Any], series_size: int,
                    samples: int) -> dict[str, dict[str, float]]:
    """find({SeriesInstanceUID: x}, projection) of a whole series of instance documents,
    by the field's index: what a C-MOVE / C-GET of a series reads."""
    import pymongo
    from bson import ObjectId

    coll = db.projected
    coll.create_index([("SeriesInstanceUID", pymongo.ASCENDING)])
    for series in range(2):
        docs = []
        for n in range(series * series_size, (series + 1) * series_size):
            doc = instance(template, n)
            doc.update(SeriesInstanceUID=f"1.2.826.0.1.3680043.10.2.s{series}",
                       file_id=ObjectId(), TransferSyntaxUID="1.2.840.10008.1.2.1")
            docs.append(doc)
        coll.insert_many(docs)
    out = {}
    for name, projection in PROJECTIONS.items():
        def find(i: int, projection: dict[str, Any] | None = projection) -> None:
            found = list(coll.find({"SeriesInstanceUID": f"1.2.826.0.1.3680043.10.2.s{i % 2}"},
                                   projection))
            assert len(found) == series_size, len(found)

        find(0)  # warm
        cpu, allocated = server.cpu(), server.allocated()
        ms = median_ms(find, samples)
        out[name] = {"median_ms": ms, "server_cpu_ms": 1000 * (server.cpu() - cpu) / samples,
                     "allocated_kib": (server.allocated() - allocated) / samples / 1024}
        print(f"  find of {series_size}, {name}: {ms:.1f} ms, FerretDB CPU "
              f"{out[name]['server_cpu_ms']:.1f} ms, allocated "
              f"{out[name]['allocated_kib']:.0f} KiB", file=sys.stderr)
    return out


def profile(server: Server, db: Any, binary: Path, seconds: int, output: Path) -> str:
    """A CPU profile of FerretDB while a loop reads nested documents by _id."""
    coll = db.reads_nested
    count = coll.count_documents({})
    reads = iter(range(1 << 62))
    profile_while(server, lambda: coll.find_one({"_id": f"doc-{(next(reads) * 7) % count}"}),
                  seconds, output)
    return pprof_top(binary, output)


def profile_while(server: Server, work: Callable[[], Any], seconds: int, output: Path) -> None:
    """Write to ``output`` a CPU profile of FerretDB taken while ``work`` runs in a loop."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            work()

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        url = f"http://127.0.0.1:{server.debug_port}/debug/pprof/profile?seconds={seconds}"
        with urllib.request.urlopen(url, timeout=seconds + 30) as response:
            output.write_bytes(response.read())
    finally:
        stop.set()
        worker.join()


def pprof_top(binary: Path, output: Path) -> str:
    """``go tool pprof -top`` of a profile, by own time then by cumulative time."""
    go = shutil.which("go")
    if go is None:
        return "(go not found: run `go tool pprof -top BINARY PROFILE` elsewhere)"
    top = subprocess.run([go, "tool", "pprof", "-top", "-nodecount=30", str(binary),
                          str(output)], capture_output=True, text=True, check=False)
    cumulative = subprocess.run([go, "tool", "pprof", "-top", "-cum", "-nodecount=40",
                                 str(binary), str(output)], capture_output=True, text=True,
                                check=False)
    return top.stdout + "\n--- by cumulative time ---\n" + cumulative.stdout


def finds(server: Server, db: Any, template: dict[str, Any], sizes: list[int], samples: int,
          scan_samples: int) -> list[dict[str, Any]]:
    import pymongo

    coll = db.instances
    for field in INDEXED:
        coll.create_index([(field, pymongo.ASCENDING)])
    results = []
    filled = 0
    for size in sizes:
        for start in range(filled, size, 500):
            coll.insert_many([instance(template, n) for n in range(start, min(start + 500,
                                                                               size))])
        filled = size
        series_count = size // INSTANCES_PER_SERIES
        study_count = series_count // SERIES_PER_STUDY

        def date_range(i: int) -> dict[str, Any]:
            import datetime
            first = datetime.date.fromordinal(FIRST_DAY + (i * 97) % (DAYS - 31))
            last = first + datetime.timedelta(days=30)
            return {"StudyDate": {"$gte": first.strftime("%Y%m%d"),
                                  "$lte": last.strftime("%Y%m%d")}}

        queries: dict[str, Callable[[int], dict[str, Any]]] = {
            "StudyDate $gte/$lte (31 days)": date_range,
            "PatientName $regex ^DUB": lambda i: {"PatientName": {"$regex": "^DUB"}},
            "AccessionNumber =": lambda i, n=study_count: {
                "AccessionNumber": f"ACC{(i * 37) % n:07d}"},
            "SeriesInstanceUID =": lambda i, n=series_count: {
                "SeriesInstanceUID": f"1.2.826.0.1.3680043.10.2.{(i * 37) % n}"},
        }
        for name, make in queries.items():
            plan = db.command("explain", {"find": "instances", "filter": make(0)})
            details = " | ".join(str(p).split("detail=")[-1]
                                 for p in plan["queryPlanner"].get("Plan", []))
            cpu = server.cpu()
            began = time.perf_counter()
            answers = len(list(coll.find(make(0), {"_id": 1})))
            first = time.perf_counter() - began
            # a query that scans takes seconds: the first run counts as one of its samples
            n = samples if first < 0.5 else scan_samples
            if first < 0.5:
                cpu = server.cpu()
                ms = median_ms(lambda i, make=make: list(coll.find(make(i), {"_id": 1})), n)
            else:
                rest = [median_ms(lambda i, make=make, j=j: list(coll.find(make(i + j),
                                                                           {"_id": 1})), 1)
                        for j in range(1, n)]
                ms = statistics.median([1000 * first, *rest])
            cpu_ms = 1000 * (server.cpu() - cpu) / n
            results.append({"documents": size, "query": name, "median_ms": ms,
                            "server_cpu_ms": cpu_ms, "samples": n, "answers": answers,
                            "plan": details,
                            "pushdown": bool(plan.get("filterPushdown"))})
            print(f"  {size} docs, {name}: {ms:.1f} ms ({answers} answers, {n} samples; "
                  f"plan: {details})", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_ferretdb_reads",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ferretdb", type=Path, default=h.FERRETDB, help="FerretDB binary")
    parser.add_argument("--sizes", default="10000,50000",
                        help="collection sizes for the finds ('' to skip them)")
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--scan-samples", type=int, default=3,
                        help="samples of a find that takes more than 0.5 s")
    parser.add_argument("--reads", type=int, default=300, help="documents of each read kind")
    parser.add_argument("--read-samples", type=int, default=200)
    parser.add_argument("--series-size", type=int, default=200,
                        help="documents each projected find returns (0 to skip them)")
    parser.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                        help="CPU profile of FerretDB during nested reads by _id")
    parser.add_argument("--quiet-wait", type=float, default=600,
                        help="seconds to wait for other processes to leave the machine idle")
    parser.add_argument("--output", default="ferretdb_reads",
                        help="results file name under bench-data/results")
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(",") if s)

    import bson
    import pymongo

    h.wait_for_quiet(timeout=args.quiet_wait)
    template = dataset_json()
    doc_bytes = len(bson.encode(instance(template, 0)))
    print(f"  instance document: {doc_bytes} bytes of BSON", file=sys.stderr)
    server = Server(args.ferretdb, h.RUNS / "ferretdb_reads")
    result: dict[str, Any] = {"benchmark": "ferretdb_reads", "ferretdb": str(args.ferretdb),
                              "document_bytes": doc_bytes, "environment": h.environment_info()}
    try:
        client = pymongo.MongoClient(f"mongodb://127.0.0.1:{server.port}/")
        db = client.bench
        with h.CpuMeter() as meter:
            result["reads"] = reads(server, db, template, args.reads, args.read_samples)
        result["reads_foreign_cores"] = meter.result["foreign_cores"]
        if args.series_size:
            with h.CpuMeter() as meter:
                result["projected_finds"] = projected_finds(server, db, template,
                                                            args.series_size, args.samples)
            result["projected_finds_foreign_cores"] = meter.result["foreign_cores"]
        if args.profile:
            h.RESULTS.mkdir(parents=True, exist_ok=True)
            path = h.RESULTS / f"{args.output}.pprof"
            top = profile(server, db, args.ferretdb, args.profile, path)
            (h.RESULTS / f"{args.output}.pprof.txt").write_text(top, encoding="utf-8")
            result["profile"] = str(path.relative_to(h.REPO))
            print(top)
        if sizes:
            with h.CpuMeter() as meter:
                result["finds"] = finds(server, db, template, sizes, args.samples,
                                        args.scan_samples)
            result["finds_foreign_cores"] = meter.result["foreign_cores"]
        client.close()
    finally:
        server.close()
    print(h.table(["read by _id", "median ms", "FerretDB CPU ms", "FerretDB allocated KiB"],
                  [[k, v["median_ms"], v["server_cpu_ms"], v["allocated_kib"]]
                   for k, v in result["reads"].items()]))
    if args.series_size:
        print(h.table([f"find of {args.series_size} by SeriesInstanceUID", "median ms",
                       "FerretDB CPU ms", "FerretDB allocated KiB"],
                      [[k, v["median_ms"], v["server_cpu_ms"], v["allocated_kib"]]
                       for k, v in result["projected_finds"].items()]))
    if sizes:
        print(h.table(["documents", "find", "median ms", "answers", "samples", "plan"],
                      [[r["documents"], r["query"], r["median_ms"], r["answers"], r["samples"],
                        r["plan"]] for r in result["finds"]]))
    path = h.write_results(args.output, result)
    print(f"results: {path.relative_to(h.REPO)}")
    with contextlib.suppress(Exception):
        server.log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

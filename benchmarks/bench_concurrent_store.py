"""Concurrent C-STORE into one series: do the series, study and patient counters add up?

    python -m benchmarks.bench_concurrent_store [--associations 2] [--instances 100]
                                                [--nodes 1] [--ferretdb BINARY]

Sends ``--associations`` storescu runs at once, each of ``--instances`` instances of the
SAME series (distinct SOP Instance UIDs), to one archive node, or round-robin to
``--nodes`` nodes sharing one embedded FerretDB.  Every store updates the series, study and
patient documents with ``$inc`` / ``$addToSet``; on a database that does not apply each
update atomically, concurrent stores lose some of them.  Prints what the level documents
say against what was stored, and the store rate.  ``--ferretdb`` runs another FerretDB
build (e.g. one without ferretdb/patches/02-atomic-document-writes.patch, built with
``ferretdb/build /tmp/ferretdb-without-02 ferretdb/patches/01-*.patch``).
Results: ``bench-data/results/concurrent_store.json``.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pymongo
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from benchmarks import harness as h


def write_series(directory: Path, folders: int, count: int) -> list[Path]:
    """``folders`` folders of ``count`` CT_small.dcm copies, all of one series."""
    template = dcmread(get_testdata_file("CT_small.dcm"))
    study, series = generate_uid(), generate_uid()
    result = []
    for f in range(folders):
        folder = directory / f"part{f}"
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(count):
            ds = template.copy()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = f * count + n + 1
            ds.save_as(folder / f"{n:04d}.dcm", enforce_file_format=True)
        result.append(folder)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_concurrent_store",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--associations", type=int, default=2)
    parser.add_argument("--instances", type=int, default=100, help="per association")
    parser.add_argument("--nodes", type=int, default=1,
                        help="nodes sharing one embedded FerretDB")
    parser.add_argument("--ferretdb", type=Path, default=h.FERRETDB)
    parser.add_argument("--output", default="concurrent_store")
    args = parser.parse_args(argv)
    workdir = h.RUNS / "concurrent_store"
    first = h.ArchiveNode(workdir / "node1", ferretdb=args.ferretdb)
    images = write_series(workdir / "images", args.associations, args.instances)
    nodes = [first]
    for n in range(2, args.nodes + 1):  # the same embedded database (data folder, port)
        nodes.append(h.ArchiveNode(workdir / f"node{n}", ferretdb=args.ferretdb,
                                   db_port=first.db_port, acl_rules=None, extra_config={
                                       "database": {"embedded": {"data_dir": str(
                                           first.workdir / "ferretdb")}}}))
    expected = args.associations * args.instances
    try:
        first.start()
        for node in nodes[1:]:
            h.Service.start(node)  # ArchiveNode.start() insists on a database of its own
        with ThreadPoolExecutor(args.associations) as pool:
            started = datetime.datetime.now()
            runs = list(pool.map(lambda i: h.storescu(
                nodes[i % len(nodes)].host, nodes[i % len(nodes)].port,
                nodes[i % len(nodes)].ae_title, [images[i]]), range(args.associations)))
            seconds = (datetime.datetime.now() - started).total_seconds()
        for run in runs:
            run.check(args.instances)
        client = pymongo.MongoClient(f"mongodb://127.0.0.1:{first.db_port}/")
        db = client["archive"]
        series = db.series.find_one()
        study = db.studies.find_one()
        patient = db.patients.find_one()
        held: dict[str, Any] = {
            "instance documents": db.instances.count_documents({}),
            "series NumberOfSeriesRelatedInstances": series["NumberOfSeriesRelatedInstances"],
            "series instance list": len(series["instances"]),
            "study NumberOfStudyRelatedInstances": study["NumberOfStudyRelatedInstances"],
            "patient NumberOfPatientRelatedInstances":
                patient["NumberOfPatientRelatedInstances"],
            "series documents": db.series.count_documents({}),
        }
        client.close()
    finally:
        for node in reversed(nodes):
            node.stop()
    command = shlex.join(["python", "-m", "benchmarks.bench_concurrent_store",
                          *(argv or sys.argv[1:])])
    print(f"command: {command}")
    print(f"FerretDB: {args.ferretdb}")
    print(f"{args.associations} associations x {args.instances} instances of one series, "
          f"{args.nodes} node(s): {expected / seconds:.1f} instances/s")
    rows = [[key, value, 1 if key == "series documents" else expected, "ok" if value == (
        1 if key == "series documents" else expected) else "WRONG"]
        for key, value in held.items()]
    print(h.table(["what", "held", "expected", ""], rows))
    h.write_results(args.output, {
        "benchmark": "concurrent_store", "command": command, "ferretdb": str(args.ferretdb),
        "associations": args.associations, "instances": args.instances, "nodes": args.nodes,
        "seconds": seconds, "instances_per_s": expected / seconds, "held": held,
        "expected": expected,
    })
    return 0 if all(r[3] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

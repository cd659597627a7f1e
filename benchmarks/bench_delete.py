"""Time to delete a study: ``archive delete`` and DICOMweb ``DELETE`` on a running node.

    python -m benchmarks.bench_delete [--instances 1000] [--series 4] [--runs 2]

Starts the archive on its own embedded FerretDB (DICOMweb on), stores ``--runs`` x 2
studies of ``--instances`` copies of pydicom's CT_small.dcm (39 KiB, ``--series``
series each) with storescu, then deletes each study: half with ``archive delete
StudyInstanceUID=... --yes --json`` (the command's own time from its report, and the
wall-clock time of the whole command, Python start and database connection
included), half with ``DELETE /dicom-web/studies/{uid}`` (the HTTP request's time).
Checks after each that the study is gone (C-FIND through the node) and at the end
that ``archive check`` finds the archive exact.  Results:
``bench-data/results/delete.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from benchmarks import harness as h


def write_study(folder: Path, instances: int, series: int) -> str:
    """A study of ``instances`` CT_small.dcm copies in ``series`` series; its UID."""
    template = dcmread(get_testdata_file("CT_small.dcm"))
    study, series_uids = generate_uid(), [generate_uid() for _ in range(series)]
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(instances):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uids[n % series]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = f"DEL-{study[-6:]}"
        ds.InstanceNumber = n + 1
        ds.save_as(folder / f"{n:05d}.dcm", enforce_file_format=True)
    return study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_delete",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=1000, help="per study")
    parser.add_argument("--series", type=int, default=4, help="per study")
    parser.add_argument("--runs", type=int, default=2, help="studies deleted each way")
    parser.add_argument("--output", default="delete")
    args = parser.parse_args(argv)
    workdir = h.RUNS / "delete"
    http_port = h.free_port()
    node = h.ArchiveNode(workdir / "node", extra_config={
        "http": {"enabled": True, "port": http_port}},
        acl_rules=[*h.ALLOW_ALL, {"principal": "*", "service": "Delete"}])
    studies = [(write_study(workdir / "images" / f"s{i}", args.instances, args.series),
                workdir / "images" / f"s{i}") for i in range(2 * args.runs)]
    rows: list[dict[str, Any]] = []
    try:
        node.start()
        for _, folder in studies:
            h.storescu(node.host, node.port, node.ae_title, [folder]).check(args.instances)
        for i, (uid, _) in enumerate(studies):
            way = "archive delete" if i % 2 == 0 else "HTTP DELETE"
            started = time.perf_counter()
            if way == "archive delete":
                done = node.cli("delete", f"StudyInstanceUID={uid}", "--yes", "--json")
                wall = time.perf_counter() - started
                if done.returncode != 0:
                    raise h.BenchmarkError(f"archive delete failed: {done.stderr}")
                report = json.loads(done.stdout[done.stdout.index("{"):])
                seconds, deleted = report["seconds"], report["deleted"]
            else:
                request = urllib.request.Request(
                    f"http://{h.LOOPBACK}:{http_port}/dicom-web/studies/{uid}",
                    method="DELETE")
                with urllib.request.urlopen(request, timeout=600) as response:
                    status = response.status
                seconds = wall = time.perf_counter() - started
                if status != 204:
                    raise h.BenchmarkError(f"DELETE answered {status}")
                deleted = args.instances
            h.findscu(node.host, node.port, node.ae_title, "STUDY",
                      {"StudyInstanceUID": uid}).check(0)  # gone for C-FIND at once
            rows.append({"way": way, "instances": deleted, "seconds": seconds,
                         "wall_seconds": wall})
        check = node.cli("check", "--grace", "0")
        if check.returncode != 0:
            raise h.BenchmarkError(f"archive check after the deletes: {check.stdout}")
    finally:
        node.stop()
    command = shlex.join(["python", "-m", "benchmarks.bench_delete", *(argv or sys.argv[1:])])
    print(f"command: {command}")
    print(f"{args.instances}-instance studies ({args.series} series, CT_small.dcm 39 KiB), "
          "embedded FerretDB; archive check clean after")
    table = []
    for way in ("archive delete", "HTTP DELETE"):
        mine = [r for r in rows if r["way"] == way]
        table.append([way, len(mine), f"{statistics.median(r['seconds'] for r in mine):.2f}",
                      f"{statistics.median(r['wall_seconds'] for r in mine):.2f}"])
    print(h.table(["way", "studies", "delete s (median)", "wall s (median)"], table))
    h.write_results(args.output, {"benchmark": "delete", "command": command,
                                  "instances": args.instances, "series": args.series,
                                  "runs": rows, "environment": h.environment_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How long a C-STORE takes to be answered while the embedded database is away.

    python -m benchmarks.bench_database_outage [--stores 5] [--source-ref REF]

Starts the archive on its embedded FerretDB, stores one instance, then kills FerretDB
(SIGKILL) and sends ``--stores`` more instances over one pynetdicom association, each
followed by a C-ECHO on the same association, timing every response.  Where the archive
restarts FerretDB by itself, its restart delay is set to 60 s so that the whole
measurement falls inside the outage.  ``--source-ref`` runs the archive as committed at
that ref (e.g. the commit before the database health state, for the "before" figure).
Results: ``bench-data/results/database_outage.json``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import signal
import statistics
import sys
import time
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from archive.ferretdb import listener
from benchmarks import harness as h


def instances(count: int) -> list[Any]:
    """``count`` copies of pydicom's CT_small.dcm, each with its own SOP Instance UID."""
    template = dcmread(get_testdata_file("CT_small.dcm"))
    result = []
    for _ in range(count):
        ds = template.copy()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        result.append(dcmread(BytesIO(buffer.getvalue())))
    return result


def main(argv: list[str] | None = None) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_database_outage",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", type=int, default=5, help="stores during the outage")
    parser.add_argument("--source-ref", metavar="GIT_REF",
                        help="run the archive as of this commit instead of the work tree")
    parser.add_argument("--output", default="database_outage")
    args = parser.parse_args(argv)
    source = h.checkout(args.source_ref) if args.source_ref else None
    code = source or h.REPO
    supervised = "restart_delay_seconds" in (code / "archive" / "config.py").read_text()
    extra = {"database": {"embedded": {"restart_delay_seconds": 60}}} if supervised else {}
    datasets = instances(args.stores + 1)

    ae = AE(ae_title=h.CLIENT_AET)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(CTImageStorage, datasets[0].file_meta.TransferSyntaxUID)
    ae.add_requested_context(Verification)
    rows, samples = [], []
    workdir = h.RUNS / "database_outage"
    with h.ArchiveNode(workdir, extra_config=extra, source=source) as node:
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        if not assoc.is_established:
            raise h.BenchmarkError("association not established")
        try:
            first = assoc.send_c_store(datasets[0])
            if first.Status != 0:
                raise h.BenchmarkError(f"store before the outage: 0x{first.Status:04X}")
            ferretdb = listener(node.db_port)
            if ferretdb is None:
                raise h.BenchmarkError("cannot find the embedded FerretDB's process")
            os.kill(ferretdb, signal.SIGKILL)
            time.sleep(0.2)
            for n, ds in enumerate(datasets[1:], 1):
                started = time.perf_counter()
                rsp = assoc.send_c_store(ds)
                store_s = time.perf_counter() - started
                started = time.perf_counter()
                echo = assoc.send_c_echo()
                echo_s = time.perf_counter() - started
                status = f"0x{rsp.Status:04X}" if "Status" in rsp else "no response"
                echo_status = f"0x{echo.Status:04X}" if "Status" in echo else "no response"
                samples.append(store_s)
                rows.append([n, status, f"{store_s:.3f}", echo_status, f"{echo_s:.3f}"])
                print(f"store {n}: {status} in {store_s:.3f} s; C-ECHO {echo_status} in "
                      f"{echo_s:.3f} s", file=sys.stderr)
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()
    command = shlex.join(["python", "-m", "benchmarks.bench_database_outage",
                          *(argv or sys.argv[1:])])
    print(f"\ncommand: {command}")
    print(f"archive's code: {f'{args.source_ref} ({source.name})' if source else 'work tree'}")
    print(h.table(["store", "status", "seconds", "C-ECHO", "seconds"], rows))
    print(f"median {statistics.median(samples):.3f} s, max {max(samples):.3f} s per C-STORE "
          "while the database is away")
    h.write_results(args.output, {
        "benchmark": "database_outage", "command": command,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "archive_source": f"{args.source_ref} = {source.name}" if source else "work tree",
        "stores": [{"status": r[1], "seconds": float(r[2]), "echo": r[3],
                    "echo_seconds": float(r[4])} for r in rows],
        "median_seconds": statistics.median(samples), "max_seconds": max(samples),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How long a storage commitment report takes: N-ACTION sent to N-EVENT-REPORT received.

    python -m benchmarks.bench_commitment [--instances 100 1000] [--repeat 3]

Starts the archive on its embedded FerretDB, stores the largest count of copies of
pydicom's CT_small.dcm (39 KiB) over one pynetdicom association, then, for each count,
asks for commitment of that many (the first ones stored) ``--repeat`` times on the same
association and times each report (every instance read back from GridFS).
Results: ``bench-data/results/commitment.json``.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import threading
import time
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from benchmarks import harness as h
from benchmarks.bench_database_outage import instances


def request(pairs: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = generate_uid()
    items = []
    for sop_class, sop_instance in pairs:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def main(argv: list[str] | None = None) -> int:
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (
        CTImageStorage,
        StorageCommitmentPushModel,
        StorageCommitmentPushModelInstance,
    )

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_commitment",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--output", default="commitment")
    args = parser.parse_args(argv)
    datasets = instances(max(args.instances))
    reports: list[tuple[float, int, int]] = []  # (time received, event type, committed)
    arrived = threading.Event()

    def on_report(event: Any) -> tuple[int, None]:
        info = event.event_information
        reports.append((time.perf_counter(), int(event.event_type),
                        len(info.get("ReferencedSOPSequence", []))))
        arrived.set()
        return 0x0000, None

    ae = AE(ae_title=h.CLIENT_AET)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 300
    ae.add_requested_context(CTImageStorage, datasets[0].file_meta.TransferSyntaxUID)
    ae.add_requested_context(StorageCommitmentPushModel)
    rows, results = [], []
    with h.ArchiveNode(h.RUNS / "commitment") as node:
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title,
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
        if not assoc.is_established:
            raise h.BenchmarkError("association not established")
        try:
            for ds in datasets:
                if assoc.send_c_store(ds).Status != 0:
                    raise h.BenchmarkError("store refused")
            pairs = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets]
            for count in args.instances:
                samples = []
                for _ in range(args.repeat):
                    arrived.clear()
                    started = time.perf_counter()
                    answer, _ = assoc.send_n_action(request(pairs[:count]), 1,
                                                    StorageCommitmentPushModel,
                                                    StorageCommitmentPushModelInstance)
                    if answer.get("Status") != 0 or not arrived.wait(300):
                        raise h.BenchmarkError("no report")
                    received, event_type, committed = reports[-1]
                    if (event_type, committed) != (1, count):
                        raise h.BenchmarkError(f"event type {event_type}, {committed} committed")
                    samples.append(received - started)
                median = statistics.median(samples)
                rows.append([count, f"{median:.3f}", f"{max(samples):.3f}",
                             f"{median / count * 1000:.2f}"])
                results.append({"instances": count, "seconds": samples})
                print(f"{count} instances: median {median:.3f} s", file=sys.stderr)
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()
    command = shlex.join(["python", "-m", "benchmarks.bench_commitment",
                          *(argv or sys.argv[1:])])
    print(f"\ncommand: {command}")
    print(h.table(["instances", "median s", "max s", "ms per instance"], rows))
    h.write_results(args.output, {
        "benchmark": "commitment", "command": command,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

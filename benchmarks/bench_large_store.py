"""The node's memory while it stores one large instance (the speed issue's 200 MB case).

    python -m benchmarks.bench_large_store [--size-mb 200] [--encapsulated]
                                           [--source-ref REF] [--runs 1]

Starts the archive on its embedded FerretDB, stores pydicom's CT_small.dcm (so that
what the first store loads is loaded), then sends one instance of ``--size-mb`` MiB of
Pixel Data with DCMTK's storescu and reads the node process's memory (FerretDB, its
child, is reported apart): its resident size before, its peak during the store (the
kernel's high-water mark VmHWM, reset just before the send through
``/proc/<pid>/clear_refs``, and the highest VmRSS polled every 20 ms), and after.  The
instance is generated once under ``bench-data/corpus/large/`` (explicit VR little endian,
16-bit pixels; ``--encapsulated``: 64 KiB fragments in JPEG Baseline's encapsulated
form, as whole-slide images hold their tiles).  ``--source-ref`` runs the archive as
committed at that ref (e.g. the commit before receiving to disk, for the "before"
figure).  Results: ``bench-data/results/large_store.json``.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydicom.data import get_testdata_file

from benchmarks import harness as h
from benchmarks.corpus import write_large_instance

MIB = 1024 * 1024


def status_kib(pid: int, field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/<pid>/status, in KiB (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


class RssPoller:
    """The highest VmRSS of a process, polled in a thread while a block runs."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, status_kib(self.pid, "VmRSS"))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current VmRSS (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def instance(size_mb: int, encapsulated: bool) -> Path:
    kind = "encapsulated" if encapsulated else "uncompressed"
    path = h.BENCH_DATA / "corpus" / "large" / f"{kind}-{size_mb}mib.dcm"
    if not path.exists():
        print(f"writing {path} ...", file=sys.stderr)
        partial = path.with_suffix(".part")
        write_large_instance(partial, size_mb * MIB, encapsulated=encapsulated)
        partial.rename(path)
    return path


def one_run(path: Path, source: Path | None, run: int, encapsulated: bool
            ) -> dict[str, Any]:
    workdir = h.RUNS / "large_store" / f"run{run}"
    node = h.ArchiveNode(workdir, source=source, log_level="INFO")
    with node:
        pid = node.pid
        warm = h.storescu(node.host, node.port, node.ae_title,
                          [get_testdata_file("CT_small.dcm")], scan_directories=False)
        warm.check(1)
        time.sleep(1.0)  # the batched level updates written, the node idle
        before = status_kib(pid, "VmRSS")
        peak_reset = reset_peak(pid)
        ferretdb = [p for p in h.process_tree(pid) if p != pid and
                    "ferretdb" in h.process_name(p)]
        with RssPoller(pid) as poller:
            sent = h.storescu(node.host, node.port, node.ae_title, [path],
                              scan_directories=False, timeout=1800,
                              extra=["-xy"] if encapsulated else [])  # JPEG Baseline
        hwm = status_kib(pid, "VmHWM")
        after = status_kib(pid, "VmRSS")
        db_peak = max((status_kib(p, "VmHWM") for p in ferretdb), default=0)
        sent.check(1)
        held = node.stats()
        incoming = sorted(p.name for p in (workdir / "incoming").glob("*"))
    result = {
        "run": run, "seconds": round(sent.elapsed, 2),
        "node_rss_before_mib": round(before / 1024, 1),
        "node_peak_mib": round((hwm if peak_reset else poller.peak_kib) / 1024, 1),
        "node_peak_polled_mib": round(poller.peak_kib / 1024, 1),
        "node_rss_after_mib": round(after / 1024, 1),
        "peak_reset": peak_reset,
        "ferretdb_peak_mib": round(db_peak / 1024, 1),
        "instances": held["instances"], "left_in_receive_folder": incoming,
    }
    result["node_peak_increase_mib"] = round(
        result["node_peak_mib"] - result["node_rss_before_mib"], 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_large_store",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200, help="Pixel Data size, MiB")
    parser.add_argument("--encapsulated", action="store_true",
                        help="64 KiB fragments (JPEG Baseline) instead of native pixels")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--source-ref", metavar="GIT_REF",
                        help="run the archive as of this commit instead of the work tree")
    parser.add_argument("--output", default="large_store")
    args = parser.parse_args(argv)
    source = h.checkout(args.source_ref) if args.source_ref else None
    path = instance(args.size_mb, args.encapsulated)
    size = path.stat().st_size
    runs = [one_run(path, source, n + 1, args.encapsulated) for n in range(args.runs)]
    headers = ["run", "seconds", "RSS before MiB", "peak MiB", "peak - before MiB",
               "RSS after MiB", "FerretDB peak MiB"]
    rows = [[r["run"], r["seconds"], r["node_rss_before_mib"], r["node_peak_mib"],
             r["node_peak_increase_mib"], r["node_rss_after_mib"], r["ferretdb_peak_mib"]]
            for r in runs]
    print(f"\none instance of {size / MIB:.1f} MiB "
          f"({'encapsulated' if args.encapsulated else 'uncompressed'}), archive at "
          f"{args.source_ref or 'the work tree'}; node process memory:")
    print(h.table(headers, rows))
    h.write_results(args.output, {
        "command": shlex.join(["python", "-m", "benchmarks.bench_large_store",
                               *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": h.environment_info(), "source_ref": args.source_ref,
        "file": str(path), "bytes": size, "runs": runs,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where this archive's time per stored instance goes.

    python -m benchmarks.profile_store [--patients 20 ...same corpus knobs]
                                       [--no-phases] [--no-py-spy] [--rate 200]

Sends the corpus to a fresh node with one storescu association (as bench_store does),
twice:

1. ``phases``: the node runs as ``python -m benchmarks.phase_node``, i.e. the archive
   with timers around each phase of a C-STORE (see phase_node.py) and around every
   pymongo call; the node's and FerretDB's CPU time are measured meanwhile;
2. ``py-spy``: the unmodified node runs under ``py-spy record --idle --threads`` (py-spy
   from PyPI, installed on first use into bench-data/tools/venv); the samples of the
   association thread are classified (waiting for FerretDB in which phase, pydicom,
   DICOM JSON, pymongo's own CPU, pynetdicom/network, logging, the rest).

Prints both breakdowns in ms per instance and writes them, with the raw data, to
``bench-data/results/store_profile.json`` (flame graph input: ``...-pyspy.txt``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from benchmarks import corpus as corpus_module
from benchmarks import harness as h

TOOLS = h.BENCH_DATA / "tools" / "venv"
PY_SPY = TOOLS / "bin" / "py-spy"


def ensure_py_spy() -> Path:
    if not PY_SPY.exists():
        print("profile: installing py-spy (PyPI) into bench-data/tools/venv", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(TOOLS)], check=True)
        subprocess.run([str(TOOLS / "bin" / "pip"), "install", "-q", "py-spy"], check=True)
    return PY_SPY


def send(node: h.ArchiveNode, corpus_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    with h.CpuMeter(h.process_tree(node.pid)) as cpu:
        sent = h.storescu(node.host, node.port, node.ae_title, [corpus_dir])
    sent.check(manifest["instances"])
    held = node.stats()
    if held["instances"] != manifest["instances"]:
        raise h.BenchmarkError(f"the archive holds {held['instances']} instances, "
                               f"expected {manifest['instances']}")
    return {"seconds": sent.elapsed, "cpu": cpu.result}


# --- pass 1: phase timers ----------------------------------------------------------

#: Phases shown, in order: (label, timer, indent).  Nested timers are part of the one
#: above them; "other" lines are what the listed children do not account for.
PHASE_TREE = [
    ("node handler (handle_store), total", "handle_store", 0),
    ("Part-10 encoding (event.encoded_dataset)", "encoded_dataset", 1),
    ("received file read back (receiving.Receiver.dataset)", "received_dataset", 1),
    ("Archive.store", "Archive.store", 1),
    ("pydicom parse (dcmread)", "parse", 2),
    ("DICOM JSON conversion (to_json)", "to_json", 2),
    ("instance document", "instance_document", 2),
    ("GridFS put", "GridStore.put", 2),
    ("file sent (GridStore.begin)", "GridStore.begin", 2),
    ("chunk's answer, files document sent (PendingFile.describe)", "PendingFile.describe", 2),
    ("file's answer, instance document (PendingFile.finish)", "PendingFile.finish", 2),
    ("fs.chunks.insert_one", "db fs.chunks.insert_one", 3),
    ("fs.files.insert_one", "db fs.files.insert_one", 3),
    ("instance upsert (instances.find_one_and_replace)",
     "db instances.find_one_and_replace", 2),
    ("level updates (_update_levels)", "_update_levels", 2),
    ("series.update_one", "db series.update_one", 3),
    ("studies.update_one", "db studies.update_one", 3),
    ("patients.update_one", "db patients.update_one", 3),
]


def run_phases(corpus_dir: Path, manifest: dict[str, Any], args: argparse.Namespace
               ) -> dict[str, Any]:
    workdir = h.RUNS / "profile" / "phases"
    out = workdir.parent / "phases.json"
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    h.wait_for_quiet(timeout=args.quiet_wait)
    node = h.ArchiveNode(workdir, module="benchmarks.phase_node",
                         env={"BENCH_PHASES_OUT": str(out)}, ferretdb=args.ferretdb,
                         source=args.source)
    with node:
        sent = send(node, corpus_dir, manifest)
    phases = json.loads(out.read_text(encoding="utf-8"))
    return {**sent, **phases}


def print_phases(result: dict[str, Any], n: int) -> None:
    timers = result["timers"]
    wall_ms = 1000 * result["seconds"] / n
    handler = timers.get("handle_store", {}).get("mean_ms", 0.0)
    print(f"\nPhase timers (ms per instance, mean over {n}; first/last tenth of the run):")
    rows = [["storescu wall time per instance", wall_ms, "", ""],
            ["  outside the handler: storescu, network, pynetdicom receive + response",
             wall_ms - handler, "", ""]]
    for label, key, indent in PHASE_TREE:
        t = timers.get(key)
        if t is None:
            continue
        rows.append(["  " * (indent + 1) + label, t["mean_ms"], t["first_tenth_mean_ms"],
                     t["last_tenth_mean_ms"]])
    known = sum(timers.get(k, {}).get("mean_ms", 0.0) for k in ("encoded_dataset",
                                                                 "received_dataset",
                                                                 "Archive.store"))
    rows.append(["    handler, other (ACL decision, audit queue, logging, status)",
                 handler - known, "", ""])
    store = timers.get("Archive.store", {}).get("mean_ms", 0.0)
    parts = sum(timers.get(k, {}).get("mean_ms", 0.0) for k in (
        "parse", "to_json", "instance_document", "GridStore.put", "GridStore.begin",
        "PendingFile.describe", "PendingFile.finish",
        "db instances.find_one_and_replace", "_update_levels"))
    rows.append(["      Archive.store, other", store - parts, "", ""])
    print(h.table(["phase", "mean", "first 10%", "last 10%"], rows))
    others = {k: v for k, v in timers.items() if k.startswith("db ")
              and k not in {key for _, key, _ in PHASE_TREE}}
    if others:
        print("other database calls (count, mean ms, total s): " + "; ".join(
            f"{k[3:]} {v['count']}x {v['mean_ms']:.2f} ms = {v['total_s']:.2f} s"
            for k, v in sorted(others.items())))
    cpu = result["cpu"]
    print("CPU during the transfer (ms per instance): " + ", ".join(
        f"{name} {1000 * s / n:.2f}" for name, s in cpu["system_cpu_s"].items())
        + f", storescu {1000 * cpu['client_cpu_s'] / n:.2f}; other processes "
        f"{cpu['foreign_cores']:.2f} cores")


# --- pass 2: py-spy ----------------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

#: Classification of a sample of the association thread: first rule that matches.
#: Each: (category, predicate on the list of "function (file)" frames, outermost first).
def _has(frames: list[str], *needles: str) -> bool:
    return any(needle in frame for frame in frames for needle in needles)


def classify(frames: list[str]) -> str:
    in_handler = _has(frames, "handle_store (")
    if not in_handler:
        if _has(frames, "handle_echo", "handle_find", "handle_get", "handle_move"):
            return "other DIMSE handlers"
        if frames and frames[-1].startswith("Association._run_reactor"):
            return "pynetdicom reactor: waiting for the next message (1 ms sleep polls)"
        if _has(frames, "recv", "select", "poll", "_socket", "wait (threading"):
            return "pynetdicom: waiting for the network (client, PDUs)"
        return "pynetdicom: PDU/DIMSE processing (outside the handler)"
    waiting_db = _has(frames, "pymongo") and _has(
        frames, "recv_into", "_receive_data_on_socket", "receive_message", "receive_data",
        "wait_for_read", "sock.recv", "select")
    phase = ("GridFS put" if _has(frames, "GridStore.put", "put (archive/gridstore")
             else "file sent" if _has(frames, "GridStore.begin", "begin (archive/gridstore")
             else "chunk's answer, files document sent" if _has(frames, "PendingFile.describe")
             else "file's answer, instance document" if _has(frames, "PendingFile.finish")
             else "instance upsert" if _has(frames, "find_one_and_replace")
             else "level updates" if _has(frames, "_update_levels")
             else "other database" if _has(frames, "pymongo") else "")
    if waiting_db:
        return f"waiting for FerretDB: {phase or 'other'}"
    if _has(frames, "pymongo", "bson"):
        return f"pymongo CPU (BSON, socket send): {phase or 'other'}"
    if _has(frames, "to_json"):
        return "DICOM JSON conversion (to_json)"
    if _has(frames, "dcmread", "Archive.parse", "parse (archive/storage"):
        return "pydicom parse (dcmread)"
    if _has(frames, "encoded_dataset"):
        return "Part-10 encoding (encoded_dataset)"
    if _has(frames, "archive/receiving", "archive/dimse/receiving"):
        return "received file read back (receiving)"
    if _has(frames, "logging"):
        return "logging"
    if _has(frames, "acl/", "authorize", "admit_store", "audit"):
        return "ACL / audit"
    return "handler: other"


def parse_raw(path: Path) -> dict[str, Any]:
    """py-spy's raw output: samples per thread, and classified samples of the threads
    that served associations (those whose stacks reach handle_store)."""
    threads: dict[str, Counter[str]] = defaultdict(Counter)
    handler_threads: set[str] = set()
    stacks: list[tuple[str, list[str], int]] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        thread = parts[0]
        frames = []
        for part in parts[1:]:
            match = _FRAME.match(part)
            frames.append(f"{match['func']} ({match['file']})" if match else part)
        stacks.append((thread, frames, int(count)))
        if any("handle_store (" in f for f in frames):
            handler_threads.add(thread)
    categories: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    total = 0
    for thread, frames, count in stacks:
        threads[thread.split(":")[-1].strip() or thread]["samples"] += count
        if thread not in handler_threads:
            continue
        total += count
        categories[classify(frames)] += count
        if frames:
            functions[frames[-1]] += count
    return {"association_thread_samples": total, "categories": dict(categories.most_common()),
            "top_leaf_functions": dict(functions.most_common(25)),
            "threads": {k: v["samples"] for k, v in threads.items()}}


def run_py_spy(corpus_dir: Path, manifest: dict[str, Any], args: argparse.Namespace
               ) -> dict[str, Any]:
    spy = ensure_py_spy()
    workdir = h.RUNS / "profile" / "pyspy"
    raw = h.RESULTS / f"{args.output}-pyspy.txt"
    h.RESULTS.mkdir(parents=True, exist_ok=True)
    h.wait_for_quiet(timeout=args.quiet_wait)
    node = h.ArchiveNode(workdir, wrapper=[str(spy), "record", "--format", "raw", "--idle",
                                           "--threads", "--rate", str(args.rate),
                                           "--nonblocking", "-o", str(raw), "--"],
                         ferretdb=args.ferretdb, source=args.source)
    with node:
        sent = send(node, corpus_dir, manifest)
        # stop the node itself: py-spy then writes its output and exits
        pythons = [p for p in h.process_tree(node.pid)[1:]
                   if h.process_name(p).startswith("python")]
        for pid in pythons[:1]:
            os.kill(pid, signal.SIGTERM)
        assert node.process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.process.wait(60)
    return {**sent, **parse_raw(raw), "raw": str(raw.relative_to(h.REPO)),
            "rate_hz": args.rate, "nonblocking": True}


def print_py_spy(result: dict[str, Any], n: int) -> None:
    wall_ms = 1000 * result["seconds"] / n
    total = result["association_thread_samples"] or 1
    print(f"\npy-spy, association thread, wall-clock samples (--idle) spread over "
          f"{wall_ms:.2f} ms per instance:")
    rows = [[category, 100 * count / total, wall_ms * count / total]
            for category, count in result["categories"].items()]
    print(h.table(["where", "% samples", "ms/instance"], rows))
    print("top leaf functions: " + "; ".join(
        f"{k} {100 * v / total:.1f}%" for k, v in list(result["top_leaf_functions"].items())[:8]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_store",
                                     description=__doc__.split("\n\n")[0])
    corpus_module.add_arguments(parser)
    parser.add_argument("--no-phases", action="store_true")
    parser.add_argument("--no-py-spy", action="store_true")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--quiet-wait", type=float, default=300, metavar="SECONDS",
                        help="wait up to this long for the machine to be idle before a pass")
    parser.add_argument("--ferretdb", type=Path, default=h.FERRETDB,
                        help="FerretDB binary the archive embeds (default .tools/bin/ferretdb)")
    parser.add_argument("--source-ref", metavar="GIT_REF",
                        help="run the archive as of this commit (e.g. HEAD) instead of the "
                             "work tree, which other engineers may be editing")
    parser.add_argument("--output", default="store_profile",
                        help="results file name under bench-data/results")
    args = parser.parse_args(argv)
    args.source = h.checkout(args.source_ref) if args.source_ref else None
    params = corpus_module.parameters(args)
    corpus_dir = h.BENCH_DATA / "corpus" / params.slug()
    manifest = corpus_module.ensure(corpus_dir, params)
    n = manifest["instances"]
    results: dict[str, Any] = {"corpus": {k: manifest[k] for k in (
        "parameters", "instances", "bytes")}, "environment": h.environment_info()}
    try:
        if not args.no_phases:
            results["phases"] = run_phases(corpus_dir, manifest, args)
            print_phases(results["phases"], n)
        if not args.no_py_spy:
            results["py_spy"] = run_py_spy(corpus_dir, manifest, args)
            print_py_spy(results["py_spy"], n)
    except h.BenchmarkError as exc:
        print(f"profile_store: FAILED: {exc}", file=sys.stderr)
        return 1
    results["archive_ferretdb"] = str(args.ferretdb)
    results["archive_source"] = f"{args.source_ref} = {args.source.name}" if args.source \
        else "work tree"
    path = h.write_results(args.output, results)
    print(f"\nresults: {path.relative_to(h.REPO)}")
    return 0


if __name__ == "__main__":
    started = time.time()
    code = main()
    print(f"({time.time() - started:.0f} s)", file=sys.stderr)
    sys.exit(code)

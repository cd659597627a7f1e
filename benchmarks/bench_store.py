"""C-STORE throughput: this archive against DCMTK's storescp (the ceiling) and Orthanc.

    python -m benchmarks.bench_store [--patients 20 --studies 2 --series 3 --instances 10]
                                     [--seed 0] [--runs 1] [--systems archive,storescp,orthanc]
                                     [--orthanc-nosync]

Generates (or reuses) the synthetic corpus, then for each system in turn starts a fresh
instance (empty storage), sends the whole corpus with ONE ``storescu`` association
(``storescu -v -aec AET +sd +r +sp '*.dcm' -R host port CORPUS``, TCP_NODELAY=1), checks
that storescu reported no failure and that the system holds every instance (archive:
``archive stats --json``; Orthanc: ``GET /statistics``; storescp: files written), and
stops it before the next one starts (2 cores: one system under test at a time).

Prints instances/s and MB/s of each system and the archive's ratio to the others, and
writes everything to ``bench-data/results/store.json``.  ``--runs N`` repeats each
system N times (fresh each time) and reports the median run.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks import corpus as corpus_module
from benchmarks import harness as h

SYSTEMS = ("archive", "storescp", "orthanc")
#: Cores' worth of CPU used by other processes during a run above which it is flagged.
DISTURBED = 0.25


def _verify(system: str, service: h.Service, manifest: dict[str, Any]) -> dict[str, Any]:
    """What the system says it holds; BenchmarkError unless it is the whole corpus."""
    expected = {k: manifest[k] for k in ("patients", "studies", "series", "instances")}
    if isinstance(service, h.ArchiveNode):
        stats = service.stats()
        held = {k: stats[k] for k in expected}
    elif isinstance(service, h.Orthanc):
        stats = service.statistics()
        held = {k: stats[f"Count{k.capitalize()}"] for k in expected}
    else:
        assert isinstance(service, h.StoreSCP)
        held = {"instances": service.count_files()}
        expected = {"instances": expected["instances"]}
    if held != expected:
        raise h.BenchmarkError(f"{system} holds {held}, expected {expected}: it did not "
                               "store everything")
    return held


def _service(system: str, workdir: Path, args: argparse.Namespace) -> h.Service:
    if system == "archive":
        return h.ArchiveNode(workdir, log_level=args.archive_log_level, ferretdb=args.ferretdb,
                             source=args.source)
    if system == "storescp":
        return h.StoreSCP(workdir)
    if system == "orthanc":
        return h.Orthanc(workdir)
    if system == "orthanc-nosync":
        return h.Orthanc(workdir, extra_config={"SyncStorageArea": False})
    raise ValueError(system)


def run_once(system: str, corpus_dir: Path, manifest: dict[str, Any],
             args: argparse.Namespace, run: int) -> dict[str, Any]:
    workdir = h.RUNS / "store" / (system if args.runs == 1 else f"{system}-{run}")
    if args.quiet_wait > 0:
        h.wait_for_quiet(timeout=args.quiet_wait)
    service = _service(system, workdir, args)
    with service:
        with h.CpuMeter(h.process_tree(service.pid)) as cpu:
            sent = h.storescu(service.host, service.port, service.ae_title, [corpus_dir])
        sent.check(manifest["instances"])
        held = _verify(system, service, manifest)
        usage = service.disk_usage()
    seconds = sent.elapsed
    result = {
        "seconds": seconds,
        "instances_per_s": manifest["instances"] / seconds,
        "mb_per_s": manifest["bytes"] / 1e6 / seconds,
        "ms_per_instance": seconds * 1000 / manifest["instances"],
        "held": held, "disk_bytes": usage,
        "storescu": shlex.join(sent.run.argv),
        "cpu": cpu.result,
    }
    foreign = cpu.result["foreign_cores"]
    print(f"  {system:<15} run {run}: {seconds:7.2f} s  {result['instances_per_s']:8.1f} "
          f"instances/s  (verified: {held}; other processes used {foreign:.2f} cores"
          f"{' - DISTURBED' if foreign > DISTURBED else ''})", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_store",
                                     description=__doc__.split("\n\n")[0])
    corpus_module.add_arguments(parser)
    parser.add_argument("--corpus-dir", type=Path,
                        help="corpus folder (default bench-data/corpus/<parameters>)")
    parser.add_argument("--runs", type=int, default=1,
                        help="runs per system, each on fresh storage; the median is reported")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    parser.add_argument("--orthanc-nosync", action="store_true",
                        help="also run Orthanc with SyncStorageArea=false (no fsync per file)")
    parser.add_argument("--quiet-wait", type=float, default=300, metavar="SECONDS",
                        help="before each run, wait up to this long for other processes to "
                             "leave the machine idle (0: don't wait)")
    parser.add_argument("--ferretdb", type=Path, default=h.FERRETDB,
                        help="FerretDB binary the archive embeds (default .tools/bin/ferretdb)")
    parser.add_argument("--source-ref", metavar="GIT_REF",
                        help="run the archive as of this commit (e.g. HEAD) instead of the "
                             "work tree, which other engineers may be editing")
    parser.add_argument("--output", default="store",
                        help="results file name under bench-data/results (default store)")
    parser.add_argument("--archive-log-level", default="INFO",
                        help="the node's log_level (INFO, as shipped, logs one line per store)")
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if args.orthanc_nosync:
        systems.append("orthanc-nosync")

    args.source = h.checkout(args.source_ref) if args.source_ref else None
    params = corpus_module.parameters(args)
    corpus_dir = args.corpus_dir or h.BENCH_DATA / "corpus" / params.slug()
    manifest = corpus_module.ensure(corpus_dir, params)
    size_mb = manifest["bytes"] / 1e6
    command = shlex.join(["python", "-m", "benchmarks.bench_store", *(argv or sys.argv[1:])])
    print(f"corpus: {corpus_dir}: {manifest['instances']} instances, {size_mb:.1f} MB "
          f"({manifest['patients']} patients, {manifest['studies']} studies, "
          f"{manifest['series']} series; {manifest['modalities']})", file=sys.stderr)

    started = datetime.datetime.now(datetime.timezone.utc)
    environment = h.environment_info()  # before the runs: what they ran on
    results: dict[str, Any] = {}
    try:
        for system in systems:
            runs = [run_once(system, corpus_dir, manifest, args, n)
                    for n in range(1, args.runs + 1)]
            median = statistics.median(r["seconds"] for r in runs)
            best = min(runs, key=lambda r: abs(r["seconds"] - median))
            results[system] = {**best, "runs": [r["seconds"] for r in runs]}
    except h.BenchmarkError as exc:
        print(f"bench_store: FAILED: {exc}", file=sys.stderr)
        return 1

    ratios = {}
    if "archive" in results:
        for other in results:
            if other != "archive":
                ratios[f"archive/{other}"] = (results["archive"]["instances_per_s"]
                                              / results[other]["instances_per_s"])
    rows = []
    for system, r in results.items():
        ratio = (f"{results['archive']['instances_per_s'] / r['instances_per_s']:.3g}x"
                 if "archive" in results else "")
        rows.append([system, manifest["instances"], r["seconds"], r["instances_per_s"],
                     r["mb_per_s"], r["ms_per_instance"], r["disk_bytes"] / 1e6, ratio])
    print()
    print(f"command: {command}")
    if Path(args.ferretdb).resolve() != h.FERRETDB.resolve():
        print(f"archive's FerretDB: {args.ferretdb}")
    code = f"{args.source_ref} ({args.source.name})" if args.source else "work tree"
    print(f"archive's code: {code}")
    print(f"corpus:  {manifest['instances']} instances, {size_mb:.1f} MB, "
          f"{manifest['modalities']}, one storescu association per system, TCP_NODELAY=1")
    print(h.table(["system", "instances", "seconds", "inst/s", "MB/s", "ms/inst",
                   "disk MB", "archive/system"], rows))
    print()
    print("CPU per instance (ms) during the transfer, by process; 'other' = cores used by")
    print("processes outside the benchmark (other engineers' tests share the 2 cores):")
    cpu_rows = []
    for system, r in results.items():
        cpu = r["cpu"]
        per = {name: 1000 * v / manifest["instances"] for name, v in cpu["system_cpu_s"].items()}
        cpu_rows.append([system, ", ".join(f"{k} {v:.2f}" for k, v in per.items()),
                         1000 * cpu["client_cpu_s"] / manifest["instances"],
                         cpu["foreign_cores"]])
    print(h.table(["system", "server CPU ms/inst", "storescu CPU ms/inst", "other (cores)"],
                  cpu_rows))
    disturbed = [s for s, r in results.items() if r["cpu"]["foreign_cores"] > DISTURBED]
    if disturbed:
        print(f"WARNING: other processes loaded the machine during {', '.join(disturbed)}: "
              "figures may be pessimistic; re-run on a quiet machine")
    path = h.write_results(args.output, {
        "benchmark": "store", "command": command, "started": started.isoformat(),
        "corpus": {"dir": str(corpus_dir), **{k: manifest[k] for k in (
            "parameters", "patients", "studies", "series", "instances", "bytes",
            "modalities")}},
        "environment": environment,
        "archive_ferretdb": str(args.ferretdb), "archive_log_level": args.archive_log_level,
        "archive_source": (f"{args.source_ref} = {args.source.name}" if args.source
                           else "work tree"),
        "systems": results, "ratios": ratios,
    })
    print(f"results: {path.relative_to(h.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

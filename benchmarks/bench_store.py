"""C-STORE throughput: this archive against DCMTK's storescp (the ceiling), a bare
pynetdicom SCP (the Python floor) and Orthanc, on one and on several associations.

    python -m benchmarks.bench_store [--patients 20 --studies 2 --series 3 --instances 10]
                                     [--seed 0] [--runs 1] [--associations 1,4]
                                     [--systems archive,pyscp,storescp,orthanc]
                                     [--orthanc-nosync] [--source-ref HEAD]

Generates (or reuses) the synthetic corpus, then for each number of associations and
each system in turn starts a fresh instance (empty storage), sends the whole corpus,
checks that storescu reported no failure and that the system holds every instance
(archive: ``archive stats --json``; Orthanc: ``GET /statistics``; storescp and pyscp:
files written), and stops it before the next one starts (2 cores: one system under test
at a time).  One association is ONE ``storescu`` run (``storescu -v -aec AET +sd +r +sp
'*.dcm' -R host port CORPUS``, TCP_NODELAY=1); N associations split the corpus into N
parts of whole patients (corpus.split) sent by N storescu processes at once, the rate
being the whole corpus over the wall time from the first start to the last exit.

Prints instances/s and MB/s of each system, the archive's ratio to each system with the
same number of associations, and the CPU per instance of each system's node process and
of its database process (the archive's embedded FerretDB; Orthanc's SQLite is
in-process), and writes everything to ``bench-data/results/store.json``.  ``--runs N``
repeats each system N times (fresh each time), in rounds of every system in turn, and
reports the median run, and the archive-to-Orthanc ratio of each round.
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

SYSTEMS = ("archive", "pyscp", "storescp", "orthanc")
#: Cores' worth of CPU used by other processes during a run above which it is flagged.
DISTURBED = 0.25
#: The speed issue's target: one association at least this fraction of Orthanc's rate.
TARGET_VS_ORTHANC = 0.4


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
        assert isinstance(service, h.StoreSCP)  # storescp and pyscp: one file each
        held = {"instances": service.count_files()}
        expected = {"instances": expected["instances"]}
    if held != expected:
        raise h.BenchmarkError(f"{system} holds {held}, expected {expected}: it did not "
                               "store everything")
    return held


def _service(system: str, workdir: Path, args: argparse.Namespace,
             associations: int) -> h.Service:
    if system == "archive":
        return h.ArchiveNode(workdir, log_level=args.archive_log_level, ferretdb=args.ferretdb,
                             source=args.source,
                             extra_config=h.archive_associations_config(associations))
    if system == "storescp":
        # without --fork storescp serves one association at a time: the others would
        # queue (and time out after 30 s); --fork serves each in a process of its own
        return h.StoreSCP(workdir, extra=["--fork"] if associations > 1 else [])
    if system == "pyscp":
        return h.PyStoreSCP(workdir)
    if system == "orthanc":
        return h.Orthanc(workdir)
    if system == "orthanc-nosync":
        return h.Orthanc(workdir, extra_config={"SyncStorageArea": False})
    raise ValueError(system)


def run_once(system: str, corpus_dir: Path, manifest: dict[str, Any],
             args: argparse.Namespace, associations: int, run: int) -> dict[str, Any]:
    name = system if associations == 1 else f"{system}-x{associations}"
    workdir = h.RUNS / "store" / (name if args.runs == 1 else f"{name}-{run}")
    parts = corpus_module.split(corpus_dir, associations)
    expected = [corpus_module.count_files(part) for part in parts]
    if args.quiet_wait > 0:
        h.wait_for_quiet(timeout=args.quiet_wait)
    service = _service(system, workdir, args, associations)
    with service:
        root = service.pid
        with h.CpuMeter(h.process_tree(root)) as cpu:
            sent = h.storescu_parallel(service.host, service.port, service.ae_title, parts)
        sent.check(expected)
        held = _verify(system, service, manifest)
        usage = service.disk_usage()
    seconds = sent.elapsed
    instances = manifest["instances"]
    node_s, database_s = h.node_and_database(cpu.result, root)
    result = {
        "associations": associations,
        "seconds": seconds,
        "instances_per_s": instances / seconds,
        "mb_per_s": manifest["bytes"] / 1e6 / seconds,
        "ms_per_instance": seconds * 1000 / instances,
        "association_seconds": [r.elapsed for r in sent.runs],
        "held": held, "disk_bytes": usage,
        "storescu": [shlex.join(r.run.argv) for r in sent.runs],
        "node_cpu_ms_per_instance": 1000 * node_s / instances,
        "database_cpu_ms_per_instance": 1000 * database_s / instances,
        "storescu_cpu_ms_per_instance": 1000 * cpu.result["client_cpu_s"] / instances,
        "cpu": cpu.result,
    }
    foreign = cpu.result["foreign_cores"]
    print(f"  {system:<15} x{associations} run {run}: {seconds:7.2f} s  "
          f"{result['instances_per_s']:8.1f} instances/s  (verified: {held}; other "
          f"processes used {foreign:.2f} cores{' - DISTURBED' if foreign > DISTURBED else ''})",
          file=sys.stderr)
    return result


def _associations(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_store",
                                     description=__doc__.split("\n\n")[0])
    corpus_module.add_arguments(parser)
    parser.add_argument("--corpus-dir", type=Path,
                        help="corpus folder (default bench-data/corpus/<parameters>)")
    parser.add_argument("--runs", type=int, default=1,
                        help="runs per system, each on fresh storage; the median is reported")
    parser.add_argument("--associations", type=_associations, default=[1], metavar="N[,N...]",
                        help="concurrent associations (storescu processes), e.g. 1,4: each "
                             "value is a round of every system (default 1)")
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
    systems = h.chosen_systems(parser, args.systems, SYSTEMS)
    if args.orthanc_nosync:
        systems.append("orthanc-nosync")

    args.source = h.checkout(args.source_ref) if args.source_ref else None
    params = corpus_module.parameters(args)
    corpus_dir = args.corpus_dir or h.BENCH_DATA / "corpus" / params.slug()
    manifest = corpus_module.ensure(corpus_dir, params)
    size_mb = manifest["bytes"] / 1e6
    try:
        for n in args.associations:
            corpus_module.split(corpus_dir, n)
    except ValueError as exc:
        parser.error(str(exc))
    command = shlex.join(["python", "-m", "benchmarks.bench_store", *(argv or sys.argv[1:])])
    print(f"corpus: {corpus_dir}: {manifest['instances']} instances, {size_mb:.1f} MB "
          f"({manifest['patients']} patients, {manifest['studies']} studies, "
          f"{manifest['series']} series; {manifest['modalities']})", file=sys.stderr)

    started = datetime.datetime.now(datetime.timezone.utc)
    environment = h.environment_info()  # before the runs: what they ran on
    #: {associations: {system: result}}
    results: dict[int, dict[str, Any]] = {}
    try:
        for n in args.associations:
            results[n] = {}
            # Rounds of every system in turn: the machine's speed drifts by a fifth over
            # minutes, so each round's systems see about the same machine.
            by_system: dict[str, list[dict[str, Any]]] = {system: [] for system in systems}
            for r in range(1, args.runs + 1):
                for system in systems:
                    by_system[system].append(run_once(system, corpus_dir, manifest, args, n, r))
            for system, runs in by_system.items():
                median = statistics.median(r["seconds"] for r in runs)
                best = min(runs, key=lambda r: abs(r["seconds"] - median))
                results[n][system] = {**best, "runs": [r["seconds"] for r in runs],
                                      "runs_instances_per_s": [r["instances_per_s"]
                                                               for r in runs]}
    except h.BenchmarkError as exc:
        print(f"bench_store: FAILED: {exc}", file=sys.stderr)
        return 1

    ratios: dict[str, dict[str, float]] = {}
    for n, by_system in results.items():
        if "archive" in by_system:
            ratios[str(n)] = {f"archive/{other}": by_system["archive"]["instances_per_s"]
                              / r["instances_per_s"]
                              for other, r in by_system.items() if other != "archive"}
    print()
    print(f"command: {command}")
    if Path(args.ferretdb).resolve() != h.FERRETDB.resolve():
        print(f"archive's FerretDB: {args.ferretdb}")
    code = f"{args.source_ref} ({args.source.name})" if args.source else "work tree"
    print(f"archive's code: {code}")
    print(f"corpus:  {manifest['instances']} instances, {size_mb:.1f} MB, "
          f"{manifest['modalities']}; N associations = N storescu processes at once, each "
          "sending whole patients (studies, series when too few); TCP_NODELAY=1")
    rows = []
    for n, by_system in results.items():
        for system, r in by_system.items():
            ratio = (f"{by_system['archive']['instances_per_s'] / r['instances_per_s']:.3g}x"
                     if "archive" in by_system else "")
            rows.append([system, n, manifest["instances"], r["seconds"], r["instances_per_s"],
                         r["mb_per_s"], r["ms_per_instance"], r["disk_bytes"] / 1e6, ratio])
    print(h.table(["system", "assoc", "instances", "seconds", "inst/s", "MB/s", "ms/inst",
                   "disk MB", "archive/system"], rows))
    print()
    print("CPU per instance (ms) during the transfer: the node's process (storescp: with its")
    print("per-association forks) and its database's (the archive's embedded FerretDB; Orthanc")
    print("keeps SQLite in its process); 'other' = cores used by processes outside the")
    print("benchmark (other engineers' tests share the 2 cores):")
    cpu_rows = []
    for n, by_system in results.items():
        for system, r in by_system.items():
            cpu_rows.append([system, n, r["node_cpu_ms_per_instance"],
                             r["database_cpu_ms_per_instance"] if system == "archive" else "-",
                             r["storescu_cpu_ms_per_instance"], r["cpu"]["foreign_cores"]])
    print(h.table(["system", "assoc", "node CPU ms/inst", "database CPU ms/inst",
                   "storescu CPU ms/inst", "other (cores)"], cpu_rows))
    rounds = {str(n): [a / o for a, o in zip(r["archive"]["runs_instances_per_s"],
                                             r["orthanc"]["runs_instances_per_s"], strict=True)]
              for n, r in results.items() if {"archive", "orthanc"} <= r.keys()}
    if 1 in results and {"archive", "orthanc"} <= results[1].keys():
        ratio = ratios["1"]["archive/orthanc"]
        print(f"\none association: archive at {ratio:.3f}x Orthanc's rate (speed issue target "
              f">= {TARGET_VS_ORTHANC}x: {'met' if ratio >= TARGET_VS_ORTHANC else 'NOT met'})")
        if len(rounds["1"]) > 1:
            print("  round by round (each archive run, then Orthanc right after): "
                  + ", ".join(f"{x:.3f}" for x in rounds["1"])
                  + f"; median {statistics.median(rounds['1']):.3f}")
    disturbed = [f"{s} x{n}" for n, by_system in results.items()
                 for s, r in by_system.items() if r["cpu"]["foreign_cores"] > DISTURBED]
    if disturbed:
        print(f"WARNING: other processes loaded the machine during {', '.join(disturbed)}: "
              "figures may be pessimistic; re-run on a quiet machine")
    first = results[args.associations[0]]
    path = h.write_results(args.output, {
        "benchmark": "store", "command": command, "started": started.isoformat(),
        "corpus": {"dir": str(corpus_dir), **{k: manifest[k] for k in (
            "parameters", "patients", "studies", "series", "instances", "bytes",
            "modalities")}},
        "environment": environment,
        "archive_ferretdb": str(args.ferretdb), "archive_log_level": args.archive_log_level,
        "archive_source": (f"{args.source_ref} = {args.source.name}" if args.source
                           else "work tree"),
        "associations": args.associations,
        # "systems" and "ratios" of the first association count, as before --associations
        "systems": first, "ratios": ratios.get(str(args.associations[0]), {}),
        "by_associations": {str(n): r for n, r in results.items()},
        "ratios_by_associations": ratios,
        "archive_orthanc_ratio_by_round": rounds,
    })
    print(f"results: {path.relative_to(h.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

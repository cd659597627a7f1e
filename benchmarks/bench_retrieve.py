"""C-MOVE and C-GET throughput: this archive against Orthanc, to DCMTK's storescp.

    python -m benchmarks.bench_retrieve [--patients 60 --studies 2 --series 3 --instances 28]
                                        [--runs 5] [--warmup 1] [--corpus-runs 1]
                                        [--scenarios move_study,...,get_all]
                                        [--source-ref HEAD] [--systems archive,orthanc]

Uses the loaded systems ``bench_find`` caches (``bench-data/runs/query/<corpus>-<commit>``;
loads them first when missing, with the same ``--archive-load`` and
``--load-associations``).  Both systems up at once, each with a DCMTK ``storescp`` of its
own (TCP_NODELAY=1, files written to a scratch folder emptied before every run) as its
Move Destination, it times ``movescu`` (TCP_NODELAY=1), the systems' runs of each
scenario taking turns (A B, B A...), for:

- ``move_study``: one study (STUDY level, Study Root, by StudyInstanceUID);
- ``move_patient``: one patient (PATIENT level, Patient Root, by PatientID);
- ``move_all``: the whole corpus, one movescu per patient, one after the other (PATIENT
  level; the archive refuses an empty unique key, and so does a universal PatientID for
  Orthanc), timed as a whole;

and the same three with ``getscu`` (C-GET, instances on the same association, written
by getscu): ``get_study``, ``get_patient``, ``get_all``.

After every run the count the tool reports (completed sub-operations) and the files
received must both equal what the corpus holds, else the run fails.  Prints instances/s
and MB/s (bytes as written) for both systems and the ratio, and the CPU per instance of
the archive's node and of its FerretDB, and of Orthanc, meanwhile.

Results: ``bench-data/results/retrieve.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import bench_find as bf
from benchmarks import corpus as corpus_module
from benchmarks import harness as h

DEST = "STORESCP"


def _bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def scenarios(index: list[bf.SeriesInfo]) -> list[dict[str, Any]]:
    first = index[0]
    by_patient: dict[str, int] = {}
    for s in index:
        by_patient[s.patient_id] = by_patient.get(s.patient_id, 0) + s.instances
    in_study = sum(s.instances for s in index if s.study_uid == first.study_uid)
    study = ("STUDY", "study", {"StudyInstanceUID": first.study_uid}, in_study)
    patient = ("PATIENT", "patient", {"PatientID": first.patient_id},
               by_patient[first.patient_id])
    every_patient = [("PATIENT", "patient", {"PatientID": pid}, n)
                     for pid, n in by_patient.items()]
    return [
        {"name": "move_study", "tool": "movescu", "moves": [study]},
        {"name": "move_patient", "tool": "movescu", "moves": [patient]},
        {"name": "move_all", "tool": "movescu", "moves": every_patient},
        {"name": "get_study", "tool": "getscu", "moves": [study]},
        {"name": "get_patient", "tool": "getscu", "moves": [patient]},
        {"name": "get_all", "tool": "getscu", "moves": every_patient},
    ]


#: Scenarios that retrieve the whole corpus: --corpus-runs, no warm-up.
WHOLE = ("move_all", "get_all")
#: The speed issue's target: C-MOVE and C-GET at least this fraction of Orthanc's rate.
TARGET_VS_ORTHANC = 0.5
SCENARIOS = ("move_study", "move_patient", "move_all", "get_study", "get_patient", "get_all")


def one_run(scenario: dict[str, Any], service: h.Service, scp: h.StoreSCP,
            scratch: Path) -> dict[str, Any]:
    """One run of a scenario: every move in turn; verified; seconds and bytes."""
    scp.clear()
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    expected = sum(m[3] for m in scenario["moves"])
    started = time.perf_counter()
    tool_seconds = 0.0
    completed = 0
    for level, model, keys, count in scenario["moves"]:
        if scenario["tool"] == "movescu":
            run = h.movescu(service.host, service.port, service.ae_title, level, keys, DEST,
                            model=model, timeout=3600)
        else:
            run = h.getscu(service.host, service.port, service.ae_title, level, keys,
                           model=model, output_dir=scratch, timeout=3600)
        run.check(count)
        completed += run.completed if run.completed is not None else run.received
        tool_seconds += run.elapsed
    seconds = time.perf_counter() - started
    files = scp.files() if scenario["tool"] == "movescu" else \
        [p for p in scratch.rglob("*") if p.is_file()]
    if len(files) != expected or completed != expected:
        raise h.BenchmarkError(f"{scenario['name']}: {completed} completed, {len(files)} files "
                               f"received, expected {expected}")
    return {"seconds": seconds, "tool_seconds": tool_seconds, "instances": expected,
            "bytes": _bytes(files), "associations": len(scenario["moves"])}


def run_systems(systems: list[str], workdirs: dict[str, Path], args: argparse.Namespace,
                scens: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every scenario on every system, all up at once (each with a storescp of its own as
    the Move Destination), their runs of a scenario taking turns (A B, B A...): both meet
    the machine as it is in the same seconds, so that a busier minute of it does not
    fall on one system's runs alone."""
    results: dict[str, dict[str, Any]] = {system: {} for system in systems}
    with contextlib.ExitStack() as running:
        scps: dict[str, h.StoreSCP] = {}
        services: dict[str, h.Service] = {}
        scratch = {system: h.RUNS / "retrieve" / f"getscu-{system}" for system in systems}
        for system in systems:
            scp = running.enter_context(
                h.StoreSCP(h.RUNS / "retrieve" / f"storescp-{system}", aet=DEST))
            dest = {DEST: (scp.host, scp.port)}
            service = bf.archive_node(workdirs[system], args.source, destinations=dest) \
                if system == "archive" else bf.orthanc_node(workdirs[system], modalities=dest)
            services[system], scps[system] = running.enter_context(service), scp
        if args.quiet_wait > 0:
            h.wait_for_quiet(timeout=args.quiet_wait)
        for scenario in scens:
            whole = scenario["name"] in WHOLE
            runs, warmup = (args.corpus_runs, 0) if whole else (args.runs, args.warmup)

            def once(system: str, scenario: dict[str, Any] = scenario) -> dict[str, Any]:
                return one_run(scenario, services[system], scps[system], scratch[system])

            for _ in range(warmup):
                for system in systems:
                    once(system)
            samples: dict[str, list[dict[str, Any]]] = {system: [] for system in systems}
            pids = [pid for system in systems
                    for pid in (*h.process_tree(services[system].pid), scps[system].pid)]
            with h.CpuMeter(pids) as cpu:
                for turn in range(runs):
                    for system in h.turn_order(systems, turn):
                        samples[system].append(once(system))
            for system in systems:
                results[system][scenario["name"]] = _result(
                    system, scenario, samples[system], cpu.result, services[system].pid)
    for system in systems:
        shutil.rmtree(scps[system].output_dir, ignore_errors=True)
        shutil.rmtree(scratch[system], ignore_errors=True)
    return results


def _result(system: str, scenario: dict[str, Any], samples: list[dict[str, Any]],
            cpu: dict[str, Any], root: int) -> dict[str, Any]:
    """A system's runs of a scenario: the run nearest the median, rates, and the CPU of
    its own processes (the node and its database apart; the destination storescp, not
    part of its process tree, excluded)."""
    median = statistics.median(s["seconds"] for s in samples)
    best = min(samples, key=lambda s: abs(s["seconds"] - median))
    own = h.own_cpu(cpu, root)
    node_s, database_s = h.node_and_database(own, root)
    per = 1000 / (best["instances"] * len(samples))
    result = {
        **best, "runs": [s["seconds"] for s in samples], "median_s": median,
        "min_s": min(s["seconds"] for s in samples),
        "max_s": max(s["seconds"] for s in samples),
        "instances_per_s": best["instances"] / median,
        "mb_per_s": best["bytes"] / 1e6 / median,
        "cpu": own,
        "node_cpu_ms_per_instance": node_s * per,
        "database_cpu_ms_per_instance": database_s * per,
        "server_cpu_ms_per_instance": (node_s + database_s) * per,
    }
    flag = " - DISTURBED" if own["foreign_cores"] > bf.DISTURBED else ""
    each = ", ".join(f"{s:.2f}" for s in result["runs"])
    print(f"  {system:<8} {scenario['name']:<13} {best['instances']:6d} instances "
          f"median {median:8.2f} s  {result['instances_per_s']:8.1f} inst/s  "
          f"{result['mb_per_s']:6.2f} MB/s  runs [{each}]{flag}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_retrieve",
                                     description=__doc__.split("\n\n")[0])
    bf.add_common(parser)
    parser.add_argument("--runs", type=int, default=5, help="runs of the study/patient moves")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--corpus-runs", type=int, default=1,
                        help="runs of the whole-corpus move and get (no warm-up)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    parser.add_argument("--output", default="retrieve")
    args = parser.parse_args(argv)
    systems = bf.setup(args, parser)
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not wanted or set(wanted) - set(SCENARIOS):
        parser.error(f"--scenarios: a comma-separated subset of {', '.join(SCENARIOS)}")
    command = shlex.join(["python", "-m", "benchmarks.bench_retrieve", *(argv or sys.argv[1:])])
    environment = h.environment_info()
    started = datetime.datetime.now(datetime.timezone.utc)
    wall = time.perf_counter()
    params = corpus_module.parameters(args)
    results: dict[str, Any] = {}
    try:
        corpus_dir, manifest, loads = bf.prepare(params, args, systems)
        scens = [sc for sc in scenarios(bf.corpus_index(corpus_dir)) if sc["name"] in wanted]
        results = run_systems(systems, {system: bf.system_dir(system, params, args.sha)
                                        for system in systems}, args, scens)
    except h.BenchmarkError as exc:
        print(f"bench_retrieve: FAILED: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - wall
    print(f"\ncommand: {command}")
    print(f"archive's code: {args.source_ref} ({args.sha})" if args.source_ref
          else "archive's code: work tree")
    print(f"corpus {manifest['instances']} instances, {manifest['bytes'] / 1e6:.0f} MB; "
          f"destination DCMTK storescp (files written), TCP_NODELAY=1; getscu writes its "
          f"files itself; move_all / get_all = one movescu / getscu (PATIENT level) per "
          f"patient, {manifest['patients']} in a row")
    rows = []
    for scenario in scens:
        name = scenario["name"]
        a, o = results.get("archive", {}).get(name), results.get("orthanc", {}).get(name)
        ref = a or o
        rows.append([name, ref["instances"], ref["associations"],
                     a and a["median_s"], a and a["instances_per_s"], a and a["mb_per_s"],
                     o and o["median_s"], o and o["instances_per_s"], o and o["mb_per_s"],
                     f"{a['instances_per_s'] / o['instances_per_s']:.3f}x" if a and o else "",
                     len(ref["runs"])])
    print(h.table(["retrieve", "instances", "moves", "archive s", "archive inst/s",
                   "archive MB/s", "Orthanc s", "Orthanc inst/s", "Orthanc MB/s",
                   "archive/Orthanc", "runs"], rows))
    print("server CPU per instance (ms; the archive's node and its FerretDB, Orthanc; the "
          "destination storescp excluded):")
    cpu_rows = []
    for scenario in scens:
        a = results.get("archive", {}).get(scenario["name"])
        o = results.get("orthanc", {}).get(scenario["name"])
        cpu_rows.append([scenario["name"], a and a["node_cpu_ms_per_instance"],
                         a and a["database_cpu_ms_per_instance"],
                         o and o["node_cpu_ms_per_instance"]])
    print(h.table(["retrieve", "archive node", "archive FerretDB", "Orthanc"], cpu_rows))
    targets: dict[str, bool] = {}
    if {"archive", "orthanc"} <= results.keys():
        slow = []
        for scenario in scens:
            ratio = (results["archive"][scenario["name"]]["instances_per_s"]
                     / results["orthanc"][scenario["name"]]["instances_per_s"])
            targets[scenario["name"]] = ratio >= TARGET_VS_ORTHANC
            if ratio < TARGET_VS_ORTHANC:
                slow.append(f"{scenario['name']} {ratio:.2f}x")
        print(f"target: every C-MOVE and C-GET >= {TARGET_VS_ORTHANC}x Orthanc's instances/s: "
              + ("met" if not slow else "NOT met: " + ", ".join(slow)))
    disturbed = [f"{x}/{n}" for x, r in results.items() for n, v in r.items()
                 if v["cpu"]["foreign_cores"] > bf.DISTURBED]
    if disturbed:
        print(f"WARNING: other processes loaded the machine during {', '.join(disturbed)}")
    print(f"every run verified: completed sub-operations = files received = expected; "
          f"wall time {seconds:.0f} s")
    path = h.write_results(args.output, {
        "benchmark": "retrieve", "command": command, "started": started.isoformat(),
        "wall_s": seconds, "environment": environment,
        "archive_source": f"{args.source_ref} = {args.sha}" if args.source_ref else "work tree",
        "corpus": {"dir": str(corpus_dir), **bf.expected_totals(manifest),
                   "bytes": manifest["bytes"]},
        "loads": loads, "systems": results, "targets": targets})
    print(f"results: {path.relative_to(h.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

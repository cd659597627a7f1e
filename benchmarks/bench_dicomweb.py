"""DICOMweb: QIDO-RS latency and WADO-RS throughput, this archive against Orthanc's plugin.

    python -m benchmarks.bench_dicomweb [--patients 60 --studies 2 --series 3 --instances 28]
                                        [--runs 20] [--warmup 2] [--wado-runs 5]
                                        [--corpus-runs 1] [--scenarios ...]
                                        [--source-ref HEAD] [--systems archive,orthanc]

Uses the loaded systems ``bench_find`` caches (``bench-data/runs/query/<corpus>-<commit>``;
loads them first when missing): the archive with DICOMweb on (``http.enabled``, a free
``http.port``), Orthanc with Debian's ``orthanc-dicomweb`` plugin (``Plugins`` naming its
.so, ``DicomWeb.Enable``, root ``/dicom-web/``, the plugin's other options as shipped).
Both run at once and take turns: every run of a search, and every study of a retrieve,
is asked of one system then of the other (the order swapped every other time), so that
the load other processes put on this shared machine falls on both alike.  An idle
system costs next to nothing meanwhile (its CPU is counted as its own).  Each system
has its own client, an ``httpx`` (HTTP/1.1) client whose one connection is kept alive:

- QIDO-RS, the searches of ``bench_find`` (parameters picked from the corpus by its
  rules) with the same ``includefield`` on both: study by patient name prefix, by date
  range, by accession number, by modality, by PatientID (QIDO-RS has no patient level),
  all studies, the first ``--limit`` studies, the series of a study, the instances of a
  series.  Time from sending the request to the last byte of the answer, ``--runs``
  times after ``--warmup``: median and 90th percentile.  Answers are counted against
  the corpus and compared key by key between the systems.
- WADO-RS, ``Accept: multipart/related; type="application/dicom"; transfer-syntax=*``:
  one study (``--wado-runs``), ten studies one after the other (``--wado-runs``), every
  study of the corpus one after the other (``--corpus-runs``, no warm-up).  Timed from
  the request to the last byte, the multipart body split into its parts and every part
  checked to be a Part-10 file (``DICM`` at byte 128); the parts must be as many as the
  study holds.  Before the timed runs, the parts' SOP Instance UIDs of (up to ten of)
  the studies are compared with the corpus'.  Instances/s and MB/s (bytes of the parts).

The server CPU of each system during the timed runs is measured as in the other
benchmarks (the archive's node and its FerretDB apart, Orthanc); a search or retrieve
during which other processes used more than a quarter of a core is flagged DISTURBED.

Results: ``bench-data/results/dicomweb.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import math
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from benchmarks import bench_find as bf
from benchmarks import corpus as corpus_module
from benchmarks import harness as h

BASE = "/dicom-web"
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_JSON = "application/dicom+json"
#: ``includefield`` of every search: bench_find's return keys of the level (most are
#: defaults of PS3.18 10.6.3 anyway), the same on both systems.
INCLUDE = {"STUDY": bf.STUDY_KEYS, "SERIES": bf.SERIES_KEYS, "IMAGE": bf.IMAGE_KEYS}
UNIQUE_TAG = {"STUDY": "0020000D", "SERIES": "0020000E", "IMAGE": "00080018"}
QIDO = ("study_by_name", "study_by_date", "study_by_accession", "study_by_modality",
        "study_by_patient_id", "all_studies", "studies_limit", "series_of_study",
        "instances_of_series")
WADO = ("wado_study", "wado_10_studies", "wado_all_studies")
#: Scenarios that retrieve the whole corpus: --corpus-runs, no warm-up.
WHOLE = ("wado_all_studies",)


# --- what is asked ---------------------------------------------------------------


def searches(index: list[bf.SeriesInfo], limit: int) -> list[dict[str, Any]]:
    """The QIDO-RS searches: bench_find's queries as paths and parameters."""
    found = {q.name: q for q in bf.queries(index, charset="")}
    first = index[0]
    studies = {s.study_uid for s in index}

    def study_search(name: str, query: bf.FindQuery | None, expected: int,
                     extra: dict[str, str] | None = None) -> dict[str, Any]:
        params = {k: v for k, v in (query.keys if query else {}).items() if v}
        return {"name": name, "level": "STUDY", "path": "/studies",
                "params": {**params, **(extra or {})}, "expected": expected,
                "compare": extra is None or "limit" not in extra}

    by_patient = len({s.study_uid for s in index if s.patient_id == first.patient_id})
    return [
        study_search("study_by_name", found["study_by_name"], found["study_by_name"].expected),
        study_search("study_by_date", found["study_by_date"], found["study_by_date"].expected),
        study_search("study_by_accession", found["study_by_accession"],
                     found["study_by_accession"].expected),
        study_search("study_by_modality", found["study_by_modality"],
                     found["study_by_modality"].expected),
        study_search("study_by_patient_id", None, by_patient, {"PatientID": first.patient_id}),
        study_search("all_studies", None, len(studies)),
        # which studies come first is up to each system: counted, not compared
        study_search("studies_limit", None, min(limit, len(studies)), {"limit": str(limit)}),
        {"name": "series_of_study", "level": "SERIES",
         "path": f"/studies/{first.study_uid}/series", "params": {},
         "expected": found["series_of_study"].expected, "compare": True},
        {"name": "instances_of_series", "level": "IMAGE",
         "path": f"/studies/{first.study_uid}/series/{first.series_uid}/instances",
         "params": {}, "expected": first.instances, "compare": True},
    ]


def describe(search: dict[str, Any]) -> str:
    return search["path"] + query_string(list(search["params"].items()))


def retrieves(corpus_dir: Path, index: list[bf.SeriesInfo]) -> list[dict[str, Any]]:
    """The WADO-RS scenarios: lists of (study UID, its folder, its instance count)."""
    by_study: dict[str, list[bf.SeriesInfo]] = {}
    for s in index:
        by_study.setdefault(s.study_uid, []).append(s)
    from pydicom import dcmread

    folders = {}
    for folder in sorted(corpus_dir.glob("P*/ST*")):
        first = min(folder.glob("SE*/IM*.dcm"))
        folders[str(dcmread(first, stop_before_pixels=True).StudyInstanceUID)] = folder
    studies = [(uid, folders[uid], sum(s.instances for s in series))
               for uid, series in by_study.items()]
    return [
        {"name": "wado_study", "studies": studies[:1]},
        {"name": "wado_10_studies", "studies": studies[:10]},
        {"name": "wado_all_studies", "studies": studies},
    ]


# --- the systems -------------------------------------------------------------------


def archive_web(workdir: Path, source: Path | None) -> tuple[h.ArchiveNode, int]:
    """The cached archive with DICOMweb on, on a free port."""
    port = h.free_port()
    node = h.ArchiveNode(workdir, source=source, fresh=False,
                         extra_config={"http": {"enabled": True, "port": port}})
    return node, port


def orthanc_web(workdir: Path) -> tuple[h.Orthanc, int]:
    """The cached Orthanc with Debian's DICOMweb plugin loaded (options as shipped)."""
    if not Path(h.ORTHANC_DICOMWEB).exists():
        raise h.BenchmarkError(f"{h.ORTHANC_DICOMWEB} is missing: install orthanc-dicomweb "
                               "(./scripts/setup does)")
    node = h.Orthanc(workdir, fresh=False, extra_config={
        **bf.ORTHANC_CONFIG, "Plugins": [h.ORTHANC_DICOMWEB],
        "DicomWeb": {"Enable": True, "Root": f"{BASE}/"}})
    return node, node.http_port


# --- QIDO-RS -----------------------------------------------------------------------


def _normalise(element: dict[str, Any] | None) -> str:
    """A DICOM JSON element as comparable text (PN: its Alphabetic group; numbers as
    numbers; several values sorted)."""
    if element is None:
        return "<absent>"
    values = []
    for value in element.get("Value") or []:
        if isinstance(value, dict):
            value = value.get("Alphabetic", "")
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(value, str) and element.get("vr") in ("IS", "DS", "US", "UL"):
            try:
                number = float(value)
                value = int(number) if number.is_integer() else number
            except ValueError:
                pass
        values.append(str(value).strip())
    return "\\".join(sorted(values))


def answers_by_uid(body: list[dict[str, Any]], level: str) -> dict[str, dict[str, str]]:
    from pydicom.datadict import tag_for_keyword

    tags = {k: f"{tag_for_keyword(k):08X}" for k in INCLUDE[level]}
    return {_normalise(a.get(UNIQUE_TAG[level])): {k: _normalise(a.get(t))
                                                   for k, t in tags.items()}
            for a in body}


def compare(ours: dict[str, dict[str, str]], theirs: dict[str, dict[str, str]]) -> list[str]:
    problems = []
    only_a, only_o = ours.keys() - theirs.keys(), theirs.keys() - ours.keys()
    if only_a:
        problems.append(f"{len(only_a)} answers only from the archive, e.g. {sorted(only_a)[0]}")
    if only_o:
        problems.append(f"{len(only_o)} answers only from Orthanc, e.g. {sorted(only_o)[0]}")
    differing: Counter[str] = Counter()
    example: dict[str, str] = {}
    for uid in ours.keys() & theirs.keys():
        for key, value in ours[uid].items():
            if value != theirs[uid].get(key):
                differing[key] += 1
                example.setdefault(key, f"archive {value!r} vs Orthanc "
                                        f"{theirs[uid].get(key)!r}")
    problems += [f"{key} differs in {n} answers, e.g. {example[key]}"
                 for key, n in differing.items()]
    return problems


def query_string(params: list[tuple[str, str]]) -> str:
    """``?k=v&...`` with ``*`` and ``^`` left as they are: Orthanc 1.10.1 with its
    DICOMweb plugin 1.7 does not percent-decode QIDO-RS values (``PatientName=DUB%2A``
    matches nothing, ``DUB*`` matches), and browsers' encodeURIComponent leaves ``*``."""
    if not params:
        return ""
    return "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='*^,')}" for k, v in params)


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    rank = min(max(1, math.ceil(fraction * len(ordered))), len(ordered))
    return ordered[rank - 1]


def summary(samples: list[float]) -> dict[str, Any]:
    return {"runs": len(samples), "samples": samples, "median": statistics.median(samples),
            "p90": percentile(samples, 0.9), "min": min(samples), "max": max(samples)}


@dataclasses.dataclass
class Running:
    """One system under test, started, with its own client connection."""

    name: str
    service: h.Service
    client: Any
    url: str


def _cpu(cpu: h.CpuMeter, system: Running, per: float) -> dict[str, float]:
    node_s, database_s = h.node_and_database(cpu.result, system.service.pid)
    return {"node": node_s * per, "database": database_s * per}


def run_searches(systems: list[Running], qs: list[dict[str, Any]],
                 args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each search ``--runs`` times on every system, the systems taking turns."""
    results: dict[str, dict[str, Any]] = {s.name: {} for s in systems}
    for q in qs:
        query = q["path"] + query_string(
            [*q["params"].items(), *(("includefield", k) for k in INCLUDE[q["level"]])])
        samples: dict[str, list[float]] = {s.name: [] for s in systems}
        counts: dict[str, list[int]] = {s.name: [] for s in systems}
        last: dict[str, tuple[int, list[Any]]] = {}

        def once(system: Running, query: str = query, q: dict[str, Any] = q,
                 counts: dict[str, list[int]] = counts,
                 last: dict[str, tuple[int, list[Any]]] = last) -> float:
            started = time.perf_counter()
            response = system.client.get(system.url + query, headers={"Accept": ACCEPT_JSON})
            elapsed = time.perf_counter() - started
            if response.status_code not in (200, 204):
                raise h.BenchmarkError(f"{system.name} {q['name']}: HTTP "
                                       f"{response.status_code}: {response.text[:300]}")
            body = response.json() if response.content else []
            counts[system.name].append(len(body))
            last[system.name] = (len(response.content), body)
            return elapsed

        for run in range(args.warmup):
            for system in h.turn_order(systems, run):
                once(system)
        for system in systems:
            counts[system.name].clear()
        pids = [p for s in systems for p in h.process_tree(s.service.pid)]
        with h.CpuMeter(pids) as cpu:
            for run in range(args.runs):
                for system in h.turn_order(systems, run):
                    samples[system.name].append(once(system))
        flag = " - DISTURBED" if cpu.result["foreign_cores"] > bf.DISTURBED else ""
        for system in systems:
            got = counts[system.name]
            if len(set(got)) != 1:
                print(f"  WARNING {system.name} {q['name']}: answer counts vary: {got}",
                      file=sys.stderr)
            used = _cpu(cpu, system, 1000 / args.runs)
            size, body = last[system.name]
            result = {**summary(samples[system.name]), "answers": got[-1], "bytes": size,
                      "node_cpu_ms_per_query": used["node"],
                      "database_cpu_ms_per_query": used["database"],
                      "foreign_cores": cpu.result["foreign_cores"], "cpu": cpu.result,
                      "_answers": answers_by_uid(body, q["level"])}
            results[system.name][q["name"]] = result
            print(f"  {system.name:<8} {q['name']:<20} median {1000 * result['median']:7.2f} ms"
                  f"  p90 {1000 * result['p90']:7.2f} ms  {result['answers']} answers "
                  f"(expected {q['expected']}), {size} bytes{flag}", file=sys.stderr)
    return results


# --- WADO-RS -----------------------------------------------------------------------


def _boundary(content_type: str) -> bytes:
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            return value.strip().strip('"').encode("latin-1")
    raise h.BenchmarkError(f"no boundary in Content-Type {content_type!r}")


def split_parts(body: bytes, boundary: bytes) -> list[bytes]:
    """The parts' contents of a multipart body (RFC 2046: CRLF--boundary delimiters)."""
    delimiter = b"\r\n--" + boundary
    pieces = (b"\r\n" + body).split(delimiter)
    if len(pieces) < 2 or not pieces[-1].startswith(b"--"):
        raise h.BenchmarkError("multipart body without its closing delimiter")
    parts = []
    for piece in pieces[1:-1]:
        head, sep, content = piece.partition(b"\r\n\r\n")
        if not sep:
            raise h.BenchmarkError("multipart part without the blank line after its headers")
        parts.append(content)
    return parts


def fetch_study(client: Any, url: str, study: str) -> list[bytes]:
    """One WADO-RS study: the whole body read, split, each part checked as Part 10."""
    with client.stream("GET", f"{url}/studies/{study}",
                       headers={"Accept": ACCEPT_DICOM}) as response:
        if response.status_code != 200:
            response.read()
            raise h.BenchmarkError(f"WADO-RS {study}: HTTP {response.status_code}: "
                                   f"{response.text[:300]}")
        buffer = io.BytesIO()
        for chunk in response.iter_raw():
            buffer.write(chunk)
        parts = split_parts(buffer.getvalue(), _boundary(response.headers["content-type"]))
    bad = sum(1 for p in parts if p[128:132] != b"DICM")
    if bad:
        raise h.BenchmarkError(f"WADO-RS {study}: {bad} of {len(parts)} parts are no Part-10 "
                               "file")
    return parts


def verify_uids(parts: list[bytes], folder: Path) -> None:
    """The parts are the study's instances: the same SOP Instance UIDs as its files."""
    from pydicom import dcmread

    got = sorted(str(dcmread(io.BytesIO(p), stop_before_pixels=True).SOPInstanceUID)
                 for p in parts)
    want = sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                  for f in folder.glob("SE*/IM*.dcm"))
    if got != want:
        raise h.BenchmarkError(f"WADO-RS of {folder}: the parts' SOP Instance UIDs are not "
                               f"the study's ({len(set(got) & set(want))} of {len(want)} in "
                               "common)")


def run_retrieves(systems: list[Running], scens: list[dict[str, Any]],
                  args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each scenario on every system, the systems taking turns study by study."""
    results: dict[str, dict[str, Any]] = {s.name: {} for s in systems}
    verified: set[tuple[str, str]] = set()
    for scenario in scens:
        whole = scenario["name"] in WHOLE
        runs, warmup = (args.corpus_runs, 0) if whole else (args.wado_runs, args.warmup)
        expected = sum(n for _, _, n in scenario["studies"])
        # untimed: the parts of (up to ten of) its studies are the studies' instances
        for system in systems:
            for uid, folder, _ in scenario["studies"][:10]:
                if (system.name, uid) not in verified:
                    verify_uids(fetch_study(system.client, system.url, uid), folder)
                    verified.add((system.name, uid))

        def once(run: int, scenario: dict[str, Any] = scenario
                 ) -> dict[str, tuple[float, int]]:
            spent = {s.name: [0.0, 0] for s in systems}
            for n, (uid, _, count) in enumerate(scenario["studies"]):
                for system in h.turn_order(systems, run + n):
                    started = time.perf_counter()
                    parts = fetch_study(system.client, system.url, uid)
                    spent[system.name][0] += time.perf_counter() - started
                    if len(parts) != count:
                        raise h.BenchmarkError(f"{system.name} WADO-RS {uid}: {len(parts)} "
                                               f"parts, the study holds {count}")
                    spent[system.name][1] += sum(len(p) for p in parts)
            return {name: (seconds, size) for name, (seconds, size) in spent.items()}

        for run in range(warmup):
            once(run)
        pids = [p for s in systems for p in h.process_tree(s.service.pid)]
        with h.CpuMeter(pids) as cpu:
            done = [once(run) for run in range(runs)]
        flag = " - DISTURBED" if cpu.result["foreign_cores"] > bf.DISTURBED else ""
        for system in systems:
            seconds = [d[system.name][0] for d in done]
            size = done[-1][system.name][1]
            median = statistics.median(seconds)
            used = _cpu(cpu, system, 1000 / (expected * runs))
            result = {**summary(seconds), "instances": expected,
                      "studies": len(scenario["studies"]), "bytes": size,
                      "instances_per_s": expected / median, "mb_per_s": size / 1e6 / median,
                      "node_cpu_ms_per_instance": used["node"],
                      "database_cpu_ms_per_instance": used["database"],
                      "foreign_cores": cpu.result["foreign_cores"], "cpu": cpu.result}
            results[system.name][scenario["name"]] = result
            each = ", ".join(f"{s:.2f}" for s in seconds)
            print(f"  {system.name:<8} {scenario['name']:<17} {expected:6d} instances median "
                  f"{median:7.3f} s  {result['instances_per_s']:7.1f} inst/s  "
                  f"{result['mb_per_s']:6.2f} MB/s  runs [{each}]{flag}", file=sys.stderr)
    return results


# --- the systems together -------------------------------------------------------------


def run_systems(names: list[str], params: corpus_module.Parameters, args: argparse.Namespace,
                qs: list[dict[str, Any]], scens: list[dict[str, Any]]) -> dict[str, Any]:
    """Start every system, then measure them taking turns (see the module's docstring)."""
    import httpx

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with contextlib.ExitStack() as stack:
        systems = []
        for name in names:
            workdir = bf.system_dir(name, params, args.sha)
            service, port = archive_web(workdir, args.source) if name == "archive" \
                else orthanc_web(workdir)
            stack.enter_context(service)
            h.wait_until(lambda port=port: h.port_open(port), 30, f"{name} DICOMweb port",
                         service.process, log=service.log)
            client = stack.enter_context(httpx.Client(timeout=600, limits=limits))
            url = f"http://{h.LOOPBACK}:{port}{BASE}"
            first = client.get(f"{url}/studies?limit=1", headers={"Accept": ACCEPT_JSON})
            if first.status_code != 200:
                raise h.BenchmarkError(f"{name}: GET {BASE}/studies answered "
                                       f"{first.status_code}: {first.text[:300]}")
            systems.append(Running(name, service, client, url))
        if args.quiet_wait > 0:
            h.wait_for_quiet(timeout=args.quiet_wait)
        qido = run_searches(systems, qs, args)
        wado = run_retrieves(systems, scens, args)
        out: dict[str, Any] = {s.name: {"qido": qido[s.name], "wado": wado[s.name]}
                               for s in systems}
        for s in systems:
            if isinstance(s.service, h.Orthanc):
                out[s.name]["plugin"] = next((p for p in s.service.rest("GET", "/plugins")
                                              if "web" in p.lower()), "")
    return out


# --- report -------------------------------------------------------------------------


def _ratio(a: float | None, o: float | None) -> str:
    return f"{a / o:.2f}x" if a and o else ""


def report(results: dict[str, Any], qs: list[dict[str, Any]], scens: list[dict[str, Any]],
           mismatches: dict[str, list[str]]) -> None:
    a_q = results.get("archive", {}).get("qido", {})
    o_q = results.get("orthanc", {}).get("qido", {})
    runs = next(iter((a_q or o_q).values()))["runs"] if (a_q or o_q) else 0
    print(f"\nQIDO-RS, one keep-alive httpx connection, request to last byte, ms: median "
          f"and p90 of {runs} runs after warm-up; archive/Orthanc of the medians")
    rows = []
    for q in qs:
        a, o = a_q.get(q["name"]), o_q.get(q["name"])
        rows.append([q["name"], a and 1000 * a["median"], a and 1000 * a["p90"],
                     o and 1000 * o["median"], o and 1000 * o["p90"],
                     _ratio(a and a["median"], o and o["median"]),
                     a and a["answers"], o and o["answers"], q["expected"],
                     a and a["bytes"], o and o["bytes"],
                     "MISMATCH" if q["name"] in mismatches else "ok"])
    print(h.table(["search", "archive ms", "p90", "Orthanc ms", "p90", "archive/Orthanc",
                   "answers archive", "answers Orthanc", "expected", "bytes archive",
                   "bytes Orthanc", "answers"], rows))
    print("searches: " + "; ".join(f"{q['name']} = {describe(q)}" for q in qs))
    print("server CPU per search (ms): the archive's node and its FerretDB; Orthanc:")
    print(h.table(["search", "archive node", "archive FerretDB", "Orthanc"],
                  [[q["name"], a_q.get(q["name"], {}).get("node_cpu_ms_per_query"),
                    a_q.get(q["name"], {}).get("database_cpu_ms_per_query"),
                    o_q.get(q["name"], {}).get("node_cpu_ms_per_query")] for q in qs]))
    a_w = results.get("archive", {}).get("wado", {})
    o_w = results.get("orthanc", {}).get("wado", {})
    print(f"\nWADO-RS studies, Accept: {ACCEPT_DICOM}; each body read whole, split, every "
          "part checked; median of the runs")
    rows = []
    for sc in scens:
        a, o = a_w.get(sc["name"]), o_w.get(sc["name"])
        ref = a or o
        rows.append([sc["name"], ref["studies"], ref["instances"], ref["bytes"] / 1e6,
                     a and a["median"], a and a["instances_per_s"], a and a["mb_per_s"],
                     o and o["median"], o and o["instances_per_s"], o and o["mb_per_s"],
                     _ratio(a and a["instances_per_s"], o and o["instances_per_s"]),
                     ref["runs"]])
    print(h.table(["retrieve", "studies", "instances", "MB", "archive s", "archive inst/s",
                   "archive MB/s", "Orthanc s", "Orthanc inst/s", "Orthanc MB/s",
                   "archive/Orthanc", "runs"], rows))
    print("server CPU per instance (ms): the archive's node and its FerretDB; Orthanc:")
    print(h.table(["retrieve", "archive node", "archive FerretDB", "Orthanc"],
                  [[sc["name"], a_w.get(sc["name"], {}).get("node_cpu_ms_per_instance"),
                    a_w.get(sc["name"], {}).get("database_cpu_ms_per_instance"),
                    o_w.get(sc["name"], {}).get("node_cpu_ms_per_instance")]
                   for sc in scens]))
    for name, problems in mismatches.items():
        for problem in problems:
            print(f"!!! MISMATCH {name}: {problem}")


def _selected(wanted: str, known: tuple[str, ...], option: str,
              error: Callable[[str], Any]) -> list[str]:
    chosen = [s.strip() for s in wanted.split(",") if s.strip()]
    if set(chosen) - set(known):
        error(f"{option}: a comma-separated subset of {', '.join(known)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_dicomweb",
                                     description=__doc__.split("\n\n")[0])
    bf.add_common(parser)
    parser.add_argument("--runs", type=int, default=20, help="timed runs of each search")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--wado-runs", type=int, default=5,
                        help="timed runs of the one-study and ten-study retrieves")
    parser.add_argument("--corpus-runs", type=int, default=1,
                        help="runs of the whole-corpus retrieve (no warm-up)")
    parser.add_argument("--limit", type=int, default=50, help="limit of studies_limit")
    parser.add_argument("--searches", default=",".join(QIDO))
    parser.add_argument("--scenarios", default=",".join(WADO))
    parser.add_argument("--output", default="dicomweb")
    args = parser.parse_args(argv)
    systems = bf.setup(args, parser)
    wanted_q = _selected(args.searches, QIDO, "--searches", parser.error)
    wanted_w = _selected(args.scenarios, WADO, "--scenarios", parser.error)
    command = shlex.join(["python", "-m", "benchmarks.bench_dicomweb", *(argv or sys.argv[1:])])
    environment = h.environment_info()
    started = datetime.datetime.now(datetime.timezone.utc)
    wall = time.perf_counter()
    params = corpus_module.parameters(args)
    results: dict[str, Any] = {}
    try:
        corpus_dir, manifest, loads = bf.prepare(params, args, systems)
        index = bf.corpus_index(corpus_dir)
        qs = [q for q in searches(index, args.limit) if q["name"] in wanted_q]
        scens = [s for s in retrieves(corpus_dir, index) if s["name"] in wanted_w]
        results = run_systems(systems, params, args, qs, scens)
    except h.BenchmarkError as exc:
        print(f"bench_dicomweb: FAILED: {exc}", file=sys.stderr)
        return 1
    mismatches: dict[str, list[str]] = {}
    for q in qs:
        problems = [f"{system} gave {r['qido'][q['name']]['answers']} answers, expected "
                    f"{q['expected']}" for system, r in results.items()
                    if r["qido"][q["name"]]["answers"] != q["expected"]]
        if q["compare"] and {"archive", "orthanc"} <= results.keys():
            problems += compare(results["archive"]["qido"][q["name"]]["_answers"],
                                results["orthanc"]["qido"][q["name"]]["_answers"])
        if problems:
            mismatches[q["name"]] = problems
    for r in results.values():
        for entry in r["qido"].values():
            entry.pop("_answers")
    seconds = time.perf_counter() - wall
    print(f"\ncommand: {command}")
    print(f"archive's code: {args.source_ref} ({args.sha})" if args.source_ref
          else "archive's code: work tree")
    plugin = results.get("orthanc", {}).get("plugin", "")
    print(f"corpus {manifest['instances']} instances, {manifest['bytes'] / 1e6:.0f} MB; "
          f"Orthanc {environment['orthanc']}, plugin {plugin or '?'} "
          f"({Path(h.ORTHANC_DICOMWEB).resolve().name}); client httpx, HTTP/1.1")
    report(results, qs, scens, mismatches)
    disturbed = [f"{system}/{name}" for system, r in results.items()
                 for part in ("qido", "wado") for name, v in r[part].items()
                 if v["foreign_cores"] > bf.DISTURBED]
    if disturbed:
        print(f"WARNING: other processes loaded the machine during {', '.join(disturbed)} "
              "(DISTURBED)")
    print(f"wall time {seconds:.0f} s")
    path = h.write_results(args.output, {
        "benchmark": "dicomweb", "command": command, "started": started.isoformat(),
        "wall_s": seconds, "environment": {**environment, "orthanc_plugin": plugin},
        "archive_source": f"{args.source_ref} = {args.sha}" if args.source_ref else "work tree",
        "corpus": {"dir": str(corpus_dir), **bf.expected_totals(manifest),
                   "bytes": manifest["bytes"]},
        "loads": loads, "searches": [{**q, "url": describe(q)} for q in qs],
        "retrieves": [{"name": s["name"], "studies": [uid for uid, _, _ in s["studies"]]}
                      for s in scens],
        "systems": results, "mismatches": mismatches})
    print(f"results: {path.relative_to(h.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

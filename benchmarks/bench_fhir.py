"""FHIR ImagingStudy response times, beside the QIDO-RS requests giving the same facts.

    python -m benchmarks.bench_fhir [--patients 20 --studies 2 --series 3 --instances 10]
                                    [--count 20] [--runs 7] [--warmup 1]

Imports the synthetic corpus (benchmarks.corpus; default 20 x 2 x 3 x 10 = 1,200
instances, 40 studies) into a fresh archive with ``archive import``, serves it (DICOMweb
and FHIR on one port, every request allowed), then times, ``--runs`` times after
``--warmup`` runs, with one keep-alive HTTP session:

- ``fhir_page``: ``/fhir/ImagingStudy?_count=N``, one page of N studies with their
  series and instances (three C-FINDs);
- ``fhir_count``: ``/fhir/ImagingStudy?_summary=count``, the total only;
- ``fhir_read``: ``/fhir/ImagingStudy/{id}`` of one study;
- ``qido_page``: ``/dicom-web/studies?limit=N``, the page's studies only;
- ``qido_same_facts``: that, plus ``/series`` and ``/instances`` of each of the N studies
  (what a QIDO-RS client asks for what one FHIR page holds).

Prints the median (min-max) in milliseconds; results in ``bench-data/results/fhir.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import requests

from benchmarks import corpus as corpus_module
from benchmarks import harness as h


def _timer(session: requests.Session, urls: Callable[[], list[str]]) -> Callable[[], float]:
    def run() -> float:
        started = time.perf_counter()
        for url in urls():
            answer = session.get(url, timeout=300)
            if answer.status_code != 200:
                raise h.BenchmarkError(f"GET {url}: {answer.status_code} {answer.text[:200]}")
        return time.perf_counter() - started
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_fhir",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--studies", type=int, default=2)
    parser.add_argument("--series", type=int, default=3)
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--count", type=int, default=20, help="studies in one page")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output", default="fhir")
    args = parser.parse_args(argv)

    params = corpus_module.Parameters(args.patients, args.studies, args.series,
                                      args.instances)
    corpus_dir = h.BENCH_DATA / "corpus" / params.slug()
    manifest = corpus_module.ensure(corpus_dir, params)
    http_port = h.free_port()
    node = h.ArchiveNode(h.RUNS / "fhir" / "archive",
                         extra_config={"http": {"enabled": True, "port": http_port}})
    done = node.cli("import", str(corpus_dir), "--quiet", timeout=3600)
    if done.returncode != 0:
        raise h.BenchmarkError(f"archive import failed: {done.stdout[-2000:]}"
                               f"{done.stderr[-2000:]}")
    base = f"http://{h.LOOPBACK}:{http_port}"
    results: dict[str, Any] = {}
    with node, requests.Session() as session:
        h.wait_until(lambda: h.port_open(http_port), 60, "the HTTP port")
        first = session.get(f"{base}/fhir/ImagingStudy?_count={args.count}", timeout=300)
        bundle = first.json()
        ids = [e["resource"]["id"] for e in bundle.get("entry", [])]
        instances = sum(e["resource"].get("numberOfInstances", 0) for e in bundle["entry"])
        qido = session.get(f"{base}/dicom-web/studies?limit={args.count}", timeout=300).json()
        qido_ids = [a["0020000D"]["Value"][0] for a in qido]
        cases: dict[str, Callable[[], list[str]]] = {
            "fhir_page": lambda: [f"{base}/fhir/ImagingStudy?_count={args.count}"],
            "fhir_count": lambda: [f"{base}/fhir/ImagingStudy?_summary=count"],
            "fhir_read": lambda: [f"{base}/fhir/ImagingStudy/{ids[0]}"],
            "qido_page": lambda: [f"{base}/dicom-web/studies?limit={args.count}"],
            "qido_same_facts": lambda: [f"{base}/dicom-web/studies?limit={args.count}"] + [
                f"{base}/dicom-web/studies/{uid}/{level}" for uid in qido_ids
                for level in ("series", "instances")],
        }
        h.wait_for_quiet()
        for name, urls in cases.items():
            results[name] = h.repeat(_timer(session, urls), args.runs, args.warmup)
    print(f"corpus: {manifest['instances']} instances, {bundle['total']} studies; one page: "
          f"{len(ids)} studies, {instances} instances")
    rows = [(name, f"{r['median'] * 1000:.1f}",
             f"{r['min'] * 1000:.1f}-{r['max'] * 1000:.1f}") for name, r in results.items()]
    print(h.table(("request", "median ms", "min-max ms"), rows))
    h.RESULTS.mkdir(parents=True, exist_ok=True)
    out = h.RESULTS / f"{args.output}.json"
    out.write_text(json.dumps({
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": h.environment_info(), "params": vars(args),
        "studies": bundle["total"], "page_studies": len(ids), "page_instances": instances,
        "results": results}, indent=2), encoding="utf-8")
    print(f"results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""C-FIND response time: this archive against Orthanc at 10,000 and 50,000 instances.

    python -m benchmarks.bench_find [--patients 60 --studies 2 --series 3 --instances 28]
                                    [--large-patients 300] [--small-patients 0]
                                    [--runs 15] [--warmup 1] [--same-recipe]
                                    [--archive-load storescu|import] [--load-associations 4]
                                    [--source-ref HEAD] [--systems archive,orthanc]

Loads the synthetic corpus (default 60 x 2 x 3 x 28 = 10,080 instances, the base) into
this archive and into Orthanc, once: by 4 storescu processes at once, whole patients
each (``--archive-load import``: ``archive import``, the same storage code as C-STORE,
one process); the loaded folders are cached under ``bench-data/runs/query/<corpus>-
<commit>/`` and reused by later runs (and by ``bench_retrieve``).  Then, all systems up,
times DCMTK ``findscu`` (TCP_NODELAY=1) for eight queries with the same return keys on
both systems (the speed issue's six, then by accession number and by modality: PT,
which the corpus's six PET/CT studies hold at any size, ``--pet-ct``),
``--runs`` times after ``--warmup`` runs, and prints the median (min-max) per query, the
ratio, and the number of answers of each system against the number the corpus says is
right.  Each query's answers are also extracted once from both systems and compared key
by key.

The same is done on a larger corpus of the same shape (``--large-patients 300``: 50,400
instances; 0 skips it), and optionally a smaller one (``--small-patients 6``: 1,008), to
show how each median grows with the archive's size. Every system is up at every size at
once, and each run of a query takes turns over all of them (archive and Orthanc at 10k
and at 50k): all meet the machine as it is in the same seconds, so that neither the
ratio to Orthanc nor the growth is a slower minute of the machine. On the other corpora
the name prefix and the date range are re-picked to match as many studies as on the base
corpus (``--same-recipe``: picked by the same rule, so they match about 5 times as many
at 50k).

The corpora are generated with unambiguous UIDs into ``bench-data/corpus/<slug>-uidsep``
(corpus._uid joins its parts with "/"), and Orthanc runs with ``DefaultEncoding: Utf8`` (see
:data:`ORTHANC_CONFIG`).

Results: ``bench-data/results/find.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import shlex
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import corpus as corpus_module
from benchmarks import harness as h

SYSTEMS = ("archive", "orthanc")
DISTURBED = 0.25
QUERY_ROOT = h.RUNS / "query"

STUDY_KEYS = ["StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "StudyTime",
              "StudyDescription", "AccessionNumber", "ModalitiesInStudy",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]
SERIES_KEYS = ["SeriesInstanceUID", "SeriesNumber", "Modality", "SeriesDescription",
               "NumberOfSeriesRelatedInstances"]
IMAGE_KEYS = ["SOPInstanceUID", "InstanceNumber", "SOPClassUID"]
PATIENT_KEYS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                "NumberOfPatientRelatedInstances"]
UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
          "IMAGE": "SOPInstanceUID"}


# --- the corpus: what it holds, which queries to ask -------------------------------


@dataclasses.dataclass
class SeriesInfo:
    patient_id: str
    patient_name: str
    study_uid: str
    study_date: str
    series_uid: str
    instances: int
    accession: str = ""
    modality: str = ""


def corpus_index(corpus_dir: Path) -> list[SeriesInfo]:
    """One entry per series (first file of each series folder read, no pixel data)."""
    from pydicom import dcmread

    out = []
    for folder in sorted(corpus_dir.glob("P*/ST*/SE*")):
        files = sorted(folder.glob("IM*.dcm"))
        ds = dcmread(files[0], stop_before_pixels=True)
        out.append(SeriesInfo(ds.PatientID, str(ds.PatientName), ds.StudyInstanceUID,
                              ds.StudyDate, ds.SeriesInstanceUID, len(files),
                              str(ds.get("AccessionNumber", "")), str(ds.get("Modality", ""))))
    return out


@dataclasses.dataclass
class FindQuery:
    name: str
    level: str
    model: str
    keys: dict[str, str]
    expected: int

    def describe(self) -> str:
        matching = ", ".join(f"{k}={v}" for k, v in self.keys.items()
                             if v and k != "SpecificCharacterSet")
        return f"{self.level} {matching or '(all)'}"


#: Sent in every identifier (``--charset``).  Without it Orthanc answers in its default
#: character set and drops what that cannot represent ('Łukasiewicz^Zofia' comes back as
#: 'ukasiewicz^Zofia', '김^민준' as '^'), while the archive answers in ISO_IR 192.
CHARSET = "ISO_IR 192"

#: The six queries the speed issue names ("at 10k instances <= 1.2x Orthanc's time").
SIX = ("study_by_name", "study_by_date", "series_of_study", "images_of_series",
       "patient_by_id", "all_studies")
#: Queries on keys the archive indexes, whose time should not grow with the archive
#: (the issue: "date range, patient name prefix, accession number, modality").
INDEXED = ("study_by_name", "study_by_date", "study_by_accession", "study_by_modality")
#: Queries whose parameters are re-picked on a corpus of another size to give as many
#: answers as on the base corpus (``targets``): more answers cost more on any system,
#: and what the growth should show is the cost of the archive's size.
RETARGETED = ("study_by_name", "study_by_date")
DATE_LOW, DATE_HIGH = "20200101", "20211231"
#: The speed issue's targets: at 10k instances each of the six <= 1.2x Orthanc's time;
#: from 10k to 50k instances the indexed-key queries grow by less than 25%.
MAX_VS_ORTHANC, MAX_GROWTH_PCT = 1.2, 25.0
#: ModalitiesInStudy: PT, which only the corpus's ``--pet-ct`` studies hold (as many at
#: 10k as at 50k); MR in a corpus without them (about half the studies: its answers
#: grow with the corpus).
MODALITY, NO_PET_CT_MODALITY = "PT", "MR"


def queries(index: list[SeriesInfo], charset: str = CHARSET,
            targets: dict[str, int] | None = None) -> list[FindQuery]:
    """The queries, their parameters chosen from the corpus, with expected counts.

    ``targets`` (answers on the base corpus, by query name) re-picks the parameters of
    :data:`RETARGETED` so that they give as many answers, or as near as the corpus allows.
    """
    qs = _queries(index, targets or {})
    if charset:
        for q in qs:
            q.keys = {"SpecificCharacterSet": charset, **q.keys}
    return qs


def _name_prefix(patients: dict[str, SeriesInfo], studies: dict[str, SeriesInfo],
                 target: int | None) -> tuple[str, int]:
    """A family-name prefix and the studies it matches: the most common 3-letter prefix
    of upper-case ASCII names or, given a target, the prefix (3 letters or more) whose
    count is nearest to it (then the shortest, then the first in order)."""
    def matches(prefix: str) -> int:
        return sum(1 for s in studies.values() if s.patient_name.upper().startswith(prefix))

    families = [s.patient_name.split("^")[0] for s in patients.values()
                if s.patient_name.isascii() and s.patient_name[:3].isalpha()
                and s.patient_name[:3].isupper()]
    if not families:
        raise h.BenchmarkError("the corpus has no upper-case ASCII family name to query a "
                               "prefix of: use more patients")
    if target is None:
        prefix = Counter(f[:3] for f in families).most_common(1)[0][0]
        return prefix, matches(prefix)
    candidates = sorted({f[:n] for f in families for n in range(3, len(f) + 1)
                         if f[:n].isalpha()})
    counted = [(abs(matches(c) - target), len(c), c) for c in candidates]
    prefix = min(counted)[2]
    return prefix, matches(prefix)


def _date_range(studies: dict[str, SeriesInfo], target: int | None) -> tuple[str, str, int]:
    """20200101-20211231 or, given a target, from 20200101 to the date that makes the
    number of studies in range nearest to it."""
    def matches(low: str, high: str) -> int:
        return sum(1 for s in studies.values() if low <= s.study_date <= high)

    if target is None:
        return DATE_LOW, DATE_HIGH, matches(DATE_LOW, DATE_HIGH)
    dates = sorted({s.study_date for s in studies.values() if s.study_date >= DATE_LOW})
    if not dates:
        return DATE_LOW, DATE_HIGH, 0
    high = min(dates, key=lambda d: (abs(matches(DATE_LOW, d) - target), d))
    return DATE_LOW, high, matches(DATE_LOW, high)


def _queries(index: list[SeriesInfo], targets: dict[str, int]) -> list[FindQuery]:
    studies = {s.study_uid: s for s in index}
    patients = {s.patient_id: s for s in index}
    prefix, by_name = _name_prefix(patients, studies, targets.get("study_by_name"))
    low, high, by_date = _date_range(studies, targets.get("study_by_date"))
    first = index[0]
    in_study = sum(1 for s in index if s.study_uid == first.study_uid)
    by_accession = len({s.study_uid for s in index if s.accession == first.accession})
    modality = MODALITY if any(s.modality == MODALITY for s in index) \
        else NO_PET_CT_MODALITY
    by_modality = len({s.study_uid for s in index if s.modality == modality})
    study = dict.fromkeys(STUDY_KEYS, "")
    return [
        FindQuery("study_by_name", "STUDY", "study",
                  {**study, "PatientName": f"{prefix}*"}, by_name),
        FindQuery("study_by_date", "STUDY", "study",
                  {**study, "StudyDate": f"{low}-{high}"}, by_date),
        FindQuery("series_of_study", "SERIES", "study",
                  {"StudyInstanceUID": first.study_uid, **dict.fromkeys(SERIES_KEYS, "")},
                  in_study),
        FindQuery("images_of_series", "IMAGE", "study",
                  {"StudyInstanceUID": first.study_uid, "SeriesInstanceUID": first.series_uid,
                   **dict.fromkeys(IMAGE_KEYS, "")}, first.instances),
        FindQuery("patient_by_id", "PATIENT", "patient",
                  {**dict.fromkeys(PATIENT_KEYS, ""), "PatientID": first.patient_id}, 1),
        FindQuery("all_studies", "STUDY", "study", study, len(studies)),
        FindQuery("study_by_accession", "STUDY", "study",
                  {**study, "AccessionNumber": first.accession}, by_accession),
        FindQuery("study_by_modality", "STUDY", "study",
                  {**study, "ModalitiesInStudy": modality}, by_modality),
    ]


# --- loaded systems, cached --------------------------------------------------------


def source_sha(ref: str | None) -> str:
    """Short commit of ``--source-ref`` (the checkout's folder name), or 'worktree'."""
    return h.checkout(ref).name if ref else "worktree"


def cache_dir(params: corpus_module.Parameters, sha: str) -> Path:
    return QUERY_ROOT / f"{params.slug()}-uidsep-{sha}"


def system_dir(system: str, params: corpus_module.Parameters, sha: str) -> Path:
    """Where a loaded system is cached: the archive per commit, Orthanc per corpus only."""
    return cache_dir(params, sha if system == "archive" else "orthanc") / system


def _marker(workdir: Path) -> Path:
    return workdir / "loaded.json"


def archive_node(workdir: Path, source: Path | None, fresh: bool = False,
                 destinations: dict[str, tuple[str, int]] | None = None,
                 associations: int = 1) -> h.ArchiveNode:
    return h.ArchiveNode(workdir, source=source, fresh=fresh, destinations=destinations,
                         extra_config=h.archive_associations_config(associations))


#: Orthanc answers C-FIND in its DefaultEncoding (Latin1 as shipped) whatever the
#: identifier asks, dropping what Latin1 cannot represent ('Łukasiewicz^Zofia' comes back
#: as 'ukasiewicz^Zofia', '김^민준' as '^'); with UTF-8 its answers can be compared with
#: the archive's.  It changes nothing else (the index, the files and the timings alike).
ORTHANC_CONFIG = {"DefaultEncoding": "Utf8"}


def orthanc_node(workdir: Path, fresh: bool = False,
                 modalities: dict[str, tuple[str, int]] | None = None) -> h.Orthanc:
    return h.Orthanc(workdir, fresh=fresh, modalities=modalities, extra_config=ORTHANC_CONFIG)


def expected_totals(manifest: dict[str, Any]) -> dict[str, int]:
    return {k: manifest[k] for k in ("patients", "studies", "series", "instances")}


def held(system: str, service: h.Service) -> dict[str, int]:
    if isinstance(service, h.ArchiveNode):
        # Not `archive stats`: it scans the instances collection, which at 10,000
        # instances takes longer than the CLI's 20 s socket timeout on FerretDB (so does
        # instances.estimated_document_count(), ~33 s).  The level documents hold the
        # counts C-FIND answers with; fs.files counts the stored files.
        import pymongo

        # The node writes level documents behind (write_behind_seconds): a reader from
        # outside sees the last ones only once they are written.
        client = pymongo.MongoClient(service.config["database"]["uri"],
                                     serverSelectionTimeoutMS=10_000)
        settled = time.monotonic() + 10
        try:
            db = client[service.config["database"]["name"]]
            while True:
                counts = {k: db[k].count_documents({})
                          for k in ("patients", "studies", "series")}
                in_studies = sum(d.get("NumberOfStudyRelatedInstances", 0) for d in
                                 db.studies.find({}, {"NumberOfStudyRelatedInstances": 1}))
                files = db["fs.files"].estimated_document_count()
                if files == in_studies or time.monotonic() > settled:
                    break
                time.sleep(0.5)
        finally:
            client.close()
        if files != in_studies:
            raise h.BenchmarkError(f"archive: {files} files in GridFS but the studies count "
                                   f"{in_studies} instances")
        return {**counts, "instances": in_studies}
    assert isinstance(service, h.Orthanc)
    stats = service.statistics()
    return {k: stats[f"Count{k.capitalize()}"]
            for k in ("patients", "studies", "series", "instances")}


def ensure_loaded(system: str, params: corpus_module.Parameters, corpus_dir: Path,
                  manifest: dict[str, Any], source: Path | None, sha: str,
                  reload: bool = False, archive_load: str = "storescu",
                  associations: int = 4) -> dict[str, Any]:
    """Load the corpus into ``system`` unless a verified load is cached; its record.

    Orthanc, and the archive unless ``archive_load == "import"``, are loaded by
    ``associations`` storescu processes at once (whole patients each, corpus.split);
    ``import`` runs ``archive import`` (the C-STORE storage code without the network,
    one process).  The time recorded is that of the transfer (or of the import)."""
    workdir = system_dir(system, params, sha)
    marker = _marker(workdir)
    if marker.exists() and not reload:
        record = json.loads(marker.read_text())
        print(f"  {system}: reusing {workdir.relative_to(h.REPO)} (loaded in "
              f"{record['seconds']:.0f} s: {record['how']})", file=sys.stderr)
        return {**record, "cached": True}
    print(f"  {system}: loading {manifest['instances']} instances into "
          f"{workdir.relative_to(h.REPO)} ...", file=sys.stderr)
    if system == "archive" and archive_load == "import":
        node = archive_node(workdir, source, fresh=True)
        started = time.perf_counter()
        done = node.cli("import", str(corpus_dir), "--quiet", timeout=6 * 3600)
        if done.returncode != 0:
            raise h.BenchmarkError(f"archive import failed ({done.returncode}): "
                                   f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        seconds = time.perf_counter() - started
        how = f"archive import {corpus_dir} --quiet"
        with node:
            holds = held(system, node)
    else:
        node = archive_node(workdir, source, fresh=True, associations=associations) \
            if system == "archive" else orthanc_node(workdir, fresh=True)
        parts = corpus_module.split(corpus_dir, associations)
        with node:
            sent = h.storescu_parallel(node.host, node.port, node.ae_title, parts)
            sent.check([corpus_module.count_files(p) for p in parts])
            seconds = sent.elapsed
            how = (f"{associations} storescu at once, whole patients each: "
                   f"{shlex.join(sent.runs[0].run.argv[:-len(parts[0])])} ...")
            holds = held(system, node)
    if holds != expected_totals(manifest):
        raise h.BenchmarkError(f"{system} holds {holds} after loading, expected "
                               f"{expected_totals(manifest)}")
    record = {"seconds": seconds, "instances_per_s": manifest["instances"] / seconds,
              "how": how, "held": holds, "source": sha,
              "loaded": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    marker.write_text(json.dumps(record, indent=2))
    print(f"  {system}: loaded in {seconds:.0f} s ({record['instances_per_s']:.1f} "
          f"instances/s), verified {holds}", file=sys.stderr)
    return {**record, "cached": False}


def corpus_dir_of(params: corpus_module.Parameters) -> Path:
    return h.BENCH_DATA / "corpus" / f"{params.slug()}-uidsep"


def ensure_corpus(params: corpus_module.Parameters) -> tuple[Path, dict[str, Any]]:
    """The corpus of ``params`` in its own folder (``<slug>-uidsep``: generated since
    corpus._uid separates its parts), then checked: every SOP Instance UID once."""
    corpus_dir = corpus_dir_of(params)
    manifest = corpus_module.ensure(corpus_dir, params)
    uids = {corpus_module._uid(params.seed, "instance", p, st, se, n)
            for p in range(1, params.patients + 1) for st in range(1, params.studies + 1)
            for se in range(1, params.series + 1) for n in range(1, params.instances + 1)}
    if len(uids) != manifest["instances"]:
        raise h.BenchmarkError(f"{corpus_dir}: {len(uids)} distinct SOP Instance UIDs for "
                               f"{manifest['instances']} files")
    return corpus_dir, manifest


def prepare(params: corpus_module.Parameters, args: argparse.Namespace,
            systems: list[str]) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    corpus_dir, manifest = ensure_corpus(params)
    loads = {s: ensure_loaded(s, params, corpus_dir, manifest, args.source, args.sha,
                              args.reload, args.archive_load, args.load_associations)
             for s in systems}
    return corpus_dir, manifest, loads


# --- answers: compared between systems ---------------------------------------------


def _normalise(elem: Any) -> str:
    value = elem.value
    if value is None or value == "":
        return ""
    if elem.VM > 1 and not isinstance(value, (str, bytes)):
        return "\\".join(sorted(str(v).strip() for v in value))
    return str(value).strip()


def answers_of(run: h.QueryRun, query: FindQuery) -> dict[str, dict[str, str]]:
    out = {}
    for ds in run.responses():
        values = {k: _normalise(ds[k]) if k in ds else "<absent>" for k in query.keys}
        out[values.get(UNIQUE[query.level], "?")] = values
    shutil.rmtree(run.extract_dir, ignore_errors=True)
    return out


def compare(query: FindQuery, ours: dict[str, dict[str, str]],
            theirs: dict[str, dict[str, str]]) -> list[str]:
    problems = []
    only_a, only_o = ours.keys() - theirs.keys(), theirs.keys() - ours.keys()
    if only_a:
        problems.append(f"{len(only_a)} answers only from the archive, e.g. {sorted(only_a)[0]}")
    if only_o:
        problems.append(f"{len(only_o)} answers only from Orthanc, e.g. {sorted(only_o)[0]}")
    differing: Counter[str] = Counter()
    example: dict[str, str] = {}
    for uid in ours.keys() & theirs.keys():
        for key in query.keys:
            a, o = ours[uid].get(key), theirs[uid].get(key)
            if a != o:
                differing[key] += 1
                example.setdefault(key, f"archive {a!r} vs Orthanc {o!r}")
    for key, count in differing.items():
        problems.append(f"{key} differs in {count} answers, e.g. {example[key]}")
    return problems


# --- timing -----------------------------------------------------------------------


def run_queries(services: dict[tuple[str, str], h.Service],
                qs: dict[str, list[FindQuery]],
                args: argparse.Namespace) -> dict[tuple[str, str], dict[str, Any]]:
    """Every query on every service (a system at one corpus size, keyed (size, system)),
    their runs of a query taking turns (A B C D, D C B A, A B C D...): all are timed in
    the same seconds of the machine, so that a slow patch of it (findscu's start-up is
    most of a small query's time) falls neither on one system nor on one size, whose
    growth would then be the machine's. ``qs[size]`` holds the same queries in the same
    order at every size (their parameters may differ)."""
    results: dict[tuple[str, str], dict[str, Any]] = {key: {} for key in services}
    for picked in zip(*qs.values(), strict=True):
        query_of = dict(zip(qs, picked, strict=True))
        counts: dict[tuple[str, str], list[int]] = {key: [] for key in services}
        samples: dict[tuple[str, str], list[float]] = {key: [] for key in services}

        def once(key: tuple[str, str], counts: dict[tuple[str, str], list[int]] = counts,
                 query_of: dict[str, FindQuery] = query_of) -> float:
            service, q = services[key], query_of[key[0]]
            run = h.findscu(service.host, service.port, service.ae_title, q.level, q.keys,
                            model=q.model, timeout=600)
            run.check()
            counts[key].append(run.answers)
            return run.elapsed

        order = list(services)
        pids = [pid for service in services.values() for pid in h.process_tree(service.pid)]
        with h.CpuMeter(pids) as cpu:
            for _ in range(args.warmup):
                for key in order:
                    once(key)
            for turn in range(args.runs):
                for key in h.turn_order(order, turn):
                    samples[key].append(once(key))
        for key, service in services.items():
            (size, system), q = key, query_of[key[0]]
            stats = h.summary(samples[key])
            answers = counts[key][-1]
            if len(set(counts[key])) != 1:
                print(f"  WARNING {system} ({size}) {q.name}: answer counts vary between "
                      f"runs: {counts[key]}", file=sys.stderr)
            extracted = h.findscu(service.host, service.port, service.ae_title, q.level,
                                  q.keys, model=q.model, extract=True, timeout=600).check()
            own = h.own_cpu(cpu.result, service.pid)
            results[key][q.name] = {
                **stats, "answers": answers, "answers_each_run": sorted(set(counts[key])),
                "server_cpu_ms_per_query": 1000 * sum(own["system_cpu_s"].values())
                / (args.runs + args.warmup),
                "foreign_cores": own["foreign_cores"], "cpu": own,
                "_answers": answers_of(extracted, q),
            }
            flag = " - DISTURBED" if own["foreign_cores"] > DISTURBED else ""
            print(f"  {system:<8} {size:<5} {q.name:<17} median {1000 * stats['median']:8.1f} ms"
                  f"  (min {1000 * stats['min']:.1f}, max {1000 * stats['max']:.1f})  "
                  f"{answers} answers (expected {q.expected}){flag}", file=sys.stderr)
    return results


def measure(sizes: dict[str, corpus_module.Parameters], args: argparse.Namespace,
            systems: list[str]) -> dict[str, dict[str, Any]]:
    """Each corpus size (the first is the base) loaded into each system, all of them up
    at once and queried in turns (run_queries); per size, what print_size shows. On the
    other sizes the retargeted queries match as many studies as on the base, unless
    ``--same-recipe``."""
    prepared = {size: prepare(params, args, systems) for size, params in sizes.items()}
    base = next(iter(sizes))
    base_qs = queries(corpus_index(prepared[base][0]), args.charset)
    targets = None if args.same_recipe else {
        q.name: q.expected for q in base_qs if q.name in RETARGETED}
    qs = {size: base_qs if size == base else
          queries(corpus_index(corpus_dir), args.charset, targets)
          for size, (corpus_dir, _, _) in prepared.items()}
    roots: dict[tuple[str, str], int] = {}
    with contextlib.ExitStack() as running:
        services: dict[tuple[str, str], h.Service] = {}
        for size, params in sizes.items():
            for system in systems:
                workdir = system_dir(system, params, args.sha)
                service = archive_node(workdir, args.source) if system == "archive" \
                    else orthanc_node(workdir)
                services[size, system] = running.enter_context(service)
                roots[size, system] = service.pid
        if args.quiet_wait > 0:
            h.wait_for_quiet(timeout=args.quiet_wait)
        per_service = run_queries(services, qs, args)
    for key, root in roots.items():
        for r in per_service[key].values():  # node and database apart, as in bench_store
            node_s, database_s = h.node_and_database(r["cpu"], root)
            r["node_cpu_ms_per_query"] = 1000 * node_s / (args.runs + args.warmup)
            r["database_cpu_ms_per_query"] = 1000 * database_s / (args.runs + args.warmup)
    results = {}
    for size, (corpus_dir, manifest, loads) in prepared.items():
        per_system = {system: per_service[size, system] for system in systems}
        mismatches: dict[str, list[str]] = {}
        for q in qs[size]:
            problems = []
            for system in systems:
                got = per_system[system][q.name]["answers"]
                if got != q.expected:
                    problems.append(f"{system} gave {got} answers, the corpus holds "
                                    f"{q.expected}")
            if {"archive", "orthanc"} <= set(systems):
                problems += compare(q, per_system["archive"][q.name]["_answers"],
                                    per_system["orthanc"][q.name]["_answers"])
            if problems:
                mismatches[q.name] = problems
        for system in systems:
            for r in per_system[system].values():
                r.pop("_answers")
        results[size] = {
            "corpus": {"dir": str(corpus_dir), **expected_totals(manifest),
                       "bytes": manifest["bytes"], "parameters": manifest["parameters"]},
            "loads": loads, "targets": (targets or {}) if size != base else {},
            "queries": [{**dataclasses.asdict(q), "description": q.describe()}
                        for q in qs[size]],
            "systems": per_system, "mismatches": mismatches}
    return results


def _ms(r: dict[str, Any] | None, key: str = "median") -> float | None:
    return None if r is None else 1000 * r[key]


def _marks(name: str) -> str:
    """'6' for the issue's six queries, 'i' for those on indexed keys."""
    return ("6" if name in SIX else "") + ("i" if name in INDEXED else "")


def print_size(result: dict[str, Any], systems: list[str]) -> None:
    corpus = result["corpus"]
    print(f"\ncorpus {corpus['instances']} instances ({corpus['patients']} patients, "
          f"{corpus['studies']} studies, {corpus['series']} series, "
          f"{corpus['bytes'] / 1e6:.0f} MB); findscu, TCP_NODELAY=1, times in ms, median "
          f"(min-max) of {next(iter(next(iter(result['systems'].values())).values()))['runs']}"
          " runs after warm-up; 6 = the issue's six queries, i = on an indexed key")
    rows = []
    for q in result["queries"]:
        a = result["systems"].get("archive", {}).get(q["name"])
        o = result["systems"].get("orthanc", {}).get(q["name"])
        ratio = f"{a['median'] / o['median']:.2f}x" if a and o else ""
        flag = "MISMATCH" if q["name"] in result["mismatches"] else "ok"
        rows.append([q["name"], _marks(q["name"]), q["description"][:60],
                     _ms(a), f"{_ms(a, 'min'):.1f}-{_ms(a, 'max'):.1f}" if a else "",
                     _ms(o), f"{_ms(o, 'min'):.1f}-{_ms(o, 'max'):.1f}" if o else "",
                     ratio, a["answers"] if a else "", o["answers"] if o else "",
                     q["expected"], flag])
    print(h.table(["query", "", "matching", "archive ms", "(min-max)", "Orthanc ms",
                   "(min-max)", "archive/Orthanc", "answers archive", "answers Orthanc",
                   "expected", "answers"], rows))
    cpu_rows = []
    for q in result["queries"]:
        row: list[Any] = [q["name"]]
        for system in ("archive", "orthanc"):
            r = result["systems"].get(system, {}).get(q["name"])
            row += [r.get("node_cpu_ms_per_query") if r else None]
            if system == "archive":
                row += [r.get("database_cpu_ms_per_query") if r else None]
        cpu_rows.append(row)
    print("server CPU per query (ms): the archive's node and its FerretDB; Orthanc:")
    print(h.table(["query", "archive node", "archive FerretDB", "Orthanc"], cpu_rows))
    for name, problems in result["mismatches"].items():
        for problem in problems:
            print(f"!!! MISMATCH {name}: {problem}")


def growth(small: dict[str, Any], large: dict[str, Any]) -> list[dict[str, Any]]:
    """Per query: answers and median at both sizes, growth in percent, archive/Orthanc."""
    out = []
    for qs, ql in zip(small["queries"], large["queries"], strict=True):
        row: dict[str, Any] = {"query": qs["name"], "indexed": qs["name"] in INDEXED,
                               "matching": [qs["description"], ql["description"]]}
        for system in ("archive", "orthanc"):
            s = small["systems"].get(system, {}).get(qs["name"])
            big = large["systems"].get(system, {}).get(ql["name"])
            if s and big:
                row[system] = {"answers": [s["answers"], big["answers"]],
                               "median_ms": [_ms(s), _ms(big)],
                               "growth_pct": 100 * (big["median"] / s["median"] - 1)}
        if "archive" in row and "orthanc" in row:
            row["archive_per_orthanc"] = [
                a / o for a, o in zip(row["archive"]["median_ms"], row["orthanc"]["median_ms"],
                                      strict=True)]
        out.append(row)
    return out


def print_growth(small: dict[str, Any], large: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    n_small, n_large = small["corpus"]["instances"], large["corpus"]["instances"]
    retargeted = large["targets"] or small["targets"]
    print(f"\ngrowth of the median from {n_small} to {n_large} instances" + (
        f" ({', '.join(retargeted)}: parameters re-picked on the other corpus for as many "
        "answers as on the base one)" if retargeted else "") + ":")
    table = []
    for r in rows:
        line: list[Any] = [r["query"], _marks(r["query"])]
        some = r.get("archive") or r.get("orthanc")
        line.append(f"{some['answers'][0]} / {some['answers'][1]}" if some else "")
        for system in ("archive", "orthanc"):
            g = r.get(system)
            line += ([g["median_ms"][0], g["median_ms"][1], f"{g['growth_pct']:+.0f}%"]
                     if g else ["", "", ""])
        ratio = r.get("archive_per_orthanc")
        line += [f"{ratio[0]:.2f}x" if ratio else "", f"{ratio[1]:.2f}x" if ratio else ""]
        table.append(line)
    print(h.table(["query", "", "answers", f"archive ms {n_small}", f"archive ms {n_large}",
                   "growth", f"Orthanc ms {n_small}", f"Orthanc ms {n_large}", "growth",
                   f"archive/Orthanc {n_small}", f"archive/Orthanc {n_large}"], table))


def print_targets(base: dict[str, Any], rows: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The speed issue's C-FIND targets against these figures (archive only)."""
    verdict: dict[str, Any] = {}
    by_name = {q["name"]: q for q in base["queries"]}
    archive, orthanc = base["systems"].get("archive", {}), base["systems"].get("orthanc", {})
    if archive and orthanc:
        slow = [f"{n} {archive[n]['median'] / orthanc[n]['median']:.2f}x" for n in SIX
                if n in by_name and archive[n]["median"] > MAX_VS_ORTHANC * orthanc[n]["median"]]
        differ = [n for n in SIX if n in base["mismatches"]]
        verdict["six_within_1_2x"] = not slow
        verdict["six_same_answers"] = not differ
        met = "met" if not slow else "NOT met: " + ", ".join(slow)
        same = "yes" if not differ else "NO: " + ", ".join(differ)
        print(f"\ntarget: the six queries at {base['corpus']['instances']} instances <= "
              f"{MAX_VS_ORTHANC}x Orthanc's time: {met}; same answers: {same}")
    if rows and all("archive" in r for r in rows):
        grown = [f"{r['query']} {r['archive']['growth_pct']:+.0f}% ("
                 f"{r['archive']['answers'][0]} -> {r['archive']['answers'][1]} answers)"
                 for r in rows
                 if r["indexed"] and "archive" in r
                 and r["archive"]["growth_pct"] >= MAX_GROWTH_PCT]
        verdict["indexed_growth_below_25pct"] = not grown
        print(f"target: queries on indexed keys grow < {MAX_GROWTH_PCT}%: "
              f"{'met' if not grown else 'NOT met: ' + ', '.join(grown)}")
    return verdict


def add_common(parser: argparse.ArgumentParser) -> None:
    corpus_module.add_arguments(parser)
    parser.set_defaults(patients=60, studies=2, series=3, instances=28, pet_ct=6)
    parser.add_argument("--source-ref", metavar="GIT_REF",
                        help="run the archive as of this commit (e.g. HEAD) instead of the "
                             "work tree; the loaded archive is cached per commit")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--reload", action="store_true",
                        help="reload the systems even when a cached load exists")
    parser.add_argument("--archive-load", choices=("storescu", "import"), default="storescu",
                        help="how an uncached archive is loaded: --load-associations storescu "
                             "at once (default), or `archive import` (one process)")
    parser.add_argument("--load-associations", type=int, default=4, metavar="N",
                        help="storescu processes at once when loading (default 4; Orthanc "
                             "always loads this way)")
    parser.add_argument("--quiet-wait", type=float, default=120, metavar="SECONDS",
                        help="before each system, wait up to this long for an idle machine")


def setup(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    systems = h.chosen_systems(parser, args.systems, SYSTEMS)
    if args.load_associations < 1:
        parser.error("--load-associations must be at least 1")
    args.source = h.checkout(args.source_ref) if args.source_ref else None
    args.sha = source_sha(args.source_ref)
    return systems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_find",
                                     description=__doc__.split("\n\n")[0])
    add_common(parser)
    parser.add_argument("--large-patients", type=int, default=300,
                        help="patients of the corpus the growth is measured to (same shape; "
                             "default 300: 50,400 instances); 0: none")
    parser.add_argument("--small-patients", type=int, default=0,
                        help="patients of a smaller corpus to measure the growth from "
                             "(6: 1,008 instances, what this benchmark did before); 0: none")
    parser.add_argument("--same-recipe", action="store_true",
                        help="on the other corpora, pick every query's parameters as on the "
                             "base one (the name prefix and date range then match more "
                             "studies on a larger corpus) instead of for as many answers")
    parser.add_argument("--runs", type=int, default=15,
                        help="timed runs of each query on each system (medians of 7 moved by "
                             "a fifth between two runs of the benchmark)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output", default="find")
    parser.add_argument("--charset", default=CHARSET,
                        help="SpecificCharacterSet sent in every identifier ('' for none)")
    args = parser.parse_args(argv)
    systems = setup(args, parser)
    command = shlex.join(["python", "-m", "benchmarks.bench_find", *(argv or sys.argv[1:])])
    environment = h.environment_info()
    started = datetime.datetime.now(datetime.timezone.utc)
    wall = time.perf_counter()
    base_params = corpus_module.parameters(args)
    growths: dict[str, Any] = {}
    corpora = {"base": base_params}
    for label, patients in (("small", args.small_patients), ("large", args.large_patients)):
        if patients and patients != base_params.patients:
            corpora[label] = dataclasses.replace(base_params, patients=patients)
    try:
        for label, params in corpora.items():
            print(f"{label} corpus {params.slug()}", file=sys.stderr)
        sizes = measure(corpora, args, systems)
    except h.BenchmarkError as exc:
        print(f"bench_find: FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"\ncommand: {command}")
    print(f"archive's code: {args.source_ref} ({args.sha})" if args.source_ref
          else "archive's code: work tree")
    for label in ("small", "base", "large"):
        if label in sizes:
            print_size(sizes[label], systems)
    for label in ("small", "large"):
        if label in sizes:
            low, high = sorted((sizes["base"], sizes[label]),
                               key=lambda size: size["corpus"]["instances"])
            growths[label] = growth(low, high)
            print_growth(low, high, growths[label])
    verdict = print_targets(sizes["base"], growths.get("large"))
    seconds = time.perf_counter() - wall
    print(f"\nwall time {seconds:.0f} s")
    mismatched = any(r["mismatches"] for r in sizes.values())
    if mismatched:
        print("!!! answers differ between the systems or from the corpus: see MISMATCH above")
    path = h.write_results(args.output, {
        "benchmark": "find", "command": command, "started": started.isoformat(),
        "wall_s": seconds, "environment": environment,
        "archive_source": f"{args.source_ref} = {args.sha}" if args.source_ref else "work tree",
        "sizes": sizes, "growth": growths, "targets": verdict})
    print(f"results: {path.relative_to(h.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

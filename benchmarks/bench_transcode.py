"""Transcoding rate: a JPEG 2000 series retrieved by peers that accept uncompressed only.

    python -m benchmarks.bench_transcode [--instances 50] [--runs 3] [--syntax j2k|jpegls]
                                         [--systems archive,orthanc]

Writes ``--instances`` CT images of 512 x 512 16-bit pixels (a smooth pattern with
noise, different in each) compressed in JPEG 2000 lossless (pydicom's encoder on
openjpeg) or, with ``--syntax jpegls``, JPEG-LS lossless (DCMTK's ``dcmcjpls``: the
syntax Orthanc from Debian can decode, it has no JPEG 2000 decoder), stores them in each
system (``storescu`` proposing that syntax, kept as received), then times, ``--runs``
times each after one warm-up:

- ``get_as_stored``: ``getscu`` preferring that syntax: the series sent as stored, the
  baseline;
- ``get_uncompressed``: ``getscu`` with its default (uncompressed syntaxes only): every
  instance decoded and sent in Explicit VR Little Endian;
- ``move_uncompressed``: ``movescu`` to DCMTK's ``storescp`` with its default
  (uncompressed only).

Each run must deliver every instance, and the transcoded files must be Explicit VR
Little Endian.  Prints instances/s (median) per system and scenario.  Results:
``bench-data/results/transcode-<syntax>.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks import bench_find as bf
from benchmarks import harness as h

DEST = "STORESCP"
SCENARIOS = ("get_as_stored", "get_uncompressed", "move_uncompressed")


#: --syntax: the storescu option proposing it, the getscu option accepting it.
SYNTAXES = {"j2k": ("-xv", "+xv"), "jpegls": ("-xt", "+xt")}


def write_series(folder: Path, count: int, syntax: str) -> tuple[str, int]:
    """``count`` compressed CT images of one study; its UID and their bytes."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import JPEG2000Lossless, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:512, 0:512]
    total = 0
    for n in range(count):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.Modality = "TRANSCODE", "BENCH^TRANSCODE", "CT"
        ds.InstanceNumber = n + 1
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        pattern = 1024 + 800 * np.sin(x / (40 + n)) * np.cos(y / 55)
        pixels = (pattern + rng.normal(0, 20, (512, 512))).clip(0, 4095).astype(np.uint16)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        ds.PixelData = pixels.tobytes()
        path = folder / f"{n:04d}.dcm"
        if syntax == "j2k":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.compress(JPEG2000Lossless, generate_instance_uid=False)
            ds.save_as(path, enforce_file_format=True)
        else:
            ds.save_as(folder / "raw.dcm", enforce_file_format=True)
            subprocess.run(["dcmcjpls", str(folder / "raw.dcm"), str(path)], check=True)
            (folder / "raw.dcm").unlink()
        total += path.stat().st_size
    return study, total


def _check_uncompressed(files: list[Path]) -> None:
    from pydicom.filereader import read_file_meta_info

    for path in files[:3] + files[-3:]:
        syntax = read_file_meta_info(path).TransferSyntaxUID
        if syntax != "1.2.840.10008.1.2.1":
            raise h.BenchmarkError(f"{path.name}: received in {syntax}, not uncompressed")


def one_run(name: str, service: h.Service, scp: h.StoreSCP, scratch: Path, study: str,
            count: int, syntax: str) -> float:
    scp.clear()
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    keys = {"StudyInstanceUID": study}
    started = time.perf_counter()
    if name == "move_uncompressed":
        run = h.movescu(service.host, service.port, service.ae_title, "STUDY", keys, DEST,
                        timeout=3600)
    else:
        extra = [SYNTAXES[syntax][1]] if name == "get_as_stored" else []
        run = h.getscu(service.host, service.port, service.ae_title, "STUDY", keys,
                       output_dir=scratch, extra=extra, timeout=3600)
    seconds = time.perf_counter() - started
    run.check(count)
    files = scp.files() if name == "move_uncompressed" else \
        [p for p in scratch.rglob("*") if p.is_file()]
    if len(files) != count:
        raise h.BenchmarkError(f"{name}: {len(files)} files received, expected {count}")
    if name != "get_as_stored":
        _check_uncompressed(sorted(files))
    return seconds


def run_system(system: str, args: argparse.Namespace, series: Path, study: str,
               count: int) -> dict[str, Any]:
    base = h.RUNS / "transcode"
    scp = h.StoreSCP(base / "storescp", aet=DEST, accept_all=False)  # uncompressed only
    scratch = base / "getscu"
    results: dict[str, Any] = {}
    with scp:
        dest = {DEST: (scp.host, scp.port)}
        service = bf.archive_node(base / "archive", None, fresh=True, destinations=dest) \
            if system == "archive" else bf.orthanc_node(base / "orthanc", fresh=True,
                                                        modalities=dest)
        with service:
            if args.quiet_wait > 0:
                h.wait_for_quiet(timeout=args.quiet_wait)
            h.storescu(service.host, service.port, service.ae_title, [series],
                       extra=[SYNTAXES[args.syntax][0]], timeout=3600).check(count)
            for name in args.scenarios.split(","):
                try:
                    one_run(name, service, scp, scratch, study, count, args.syntax)  # warm-up
                    runs = [one_run(name, service, scp, scratch, study, count, args.syntax)
                            for _ in range(args.runs)]
                except h.BenchmarkError as exc:
                    print(f"  {system:<8} {name:<18} failed: {str(exc)[:300]}", file=sys.stderr)
                    results[name] = {"error": str(exc)[:2000]}
                    continue
                median = statistics.median(runs)
                results[name] = {"runs": runs, "median_s": median,
                                 "instances_per_s": count / median}
                print(f"  {system:<8} {name:<18} {count} instances  median {median:6.2f} s  "
                      f"{count / median:7.1f} inst/s  runs "
                      f"[{', '.join(f'{r:.2f}' for r in runs)}]", file=sys.stderr)
    shutil.rmtree(scp.output_dir, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_transcode",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--systems", default="archive,orthanc")
    parser.add_argument("--syntax", choices=sorted(SYNTAXES), default="j2k")
    parser.add_argument("--quiet-wait", type=float, default=120,
                        help="seconds to wait for an idle machine before each system")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args(argv)
    series = h.BENCH_DATA / "corpus" / f"transcode-{args.syntax}-{args.instances}"
    study_file = series / "study.txt"
    if not study_file.exists():
        shutil.rmtree(series, ignore_errors=True)
        study, size = write_series(series / "files", args.instances, args.syntax)
        study_file.write_text(study)
        print(f"wrote {args.instances} {args.syntax} instances, {size / 1e6:.1f} MB",
              file=sys.stderr)
    study = study_file.read_text().strip()
    results = {system: run_system(system, args, series / "files", study, args.instances)
               for system in args.systems.split(",")}
    rows = [[name, *(f"{results[s][name]['instances_per_s']:.1f}"
                     if "instances_per_s" in results[s].get(name, {}) else "failed"
                     for s in results)] for name in args.scenarios.split(",")]
    print(h.table(["scenario (inst/s)", *results], rows))
    h.RESULTS.mkdir(parents=True, exist_ok=True)
    (h.RESULTS / f"transcode-{args.syntax}.json").write_text(json.dumps(
        {"instances": args.instances, "syntax": args.syntax, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

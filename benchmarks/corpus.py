"""Synthetic DICOM corpus for the benchmarks, cloned from pydicom's CT and MR test files.

    python -m benchmarks.corpus OUT_DIR [--patients 20] [--studies 2] [--series 3]
                                        [--instances 10] [--seed 0] [--pet-ct 0]
                                        [--force]

writes PATIENTS x STUDIES x SERIES x INSTANCES Part-10 files (explicit VR little
endian), one folder per series (``OUT_DIR/P0001/ST01/SE01/IM00001.dcm``), each with
fresh UIDs and varied patient/study/series attributes:

- PatientName: mostly upper-case ASCII as modalities send it, some mixed or lower case
  (``van der Berg^Anna``), some non-ASCII (Latin, Greek, Cyrillic, CJK) with
  SpecificCharacterSet ``ISO_IR 192`` (UTF-8); PatientID, PatientBirthDate, PatientSex;
- StudyDate/StudyTime spread over 2016-2024, AccessionNumber, StudyID, StudyDescription,
  ReferringPhysicianName, PatientAge consistent with the birth date;
- per series: Modality consistent with the SOP class (CT Image Storage from CT_small,
  MR Image Storage from MR_small; about one study in ten mixes both), SeriesNumber,
  SeriesDescription, SeriesDate/Time, FrameOfReferenceUID;
- ``--pet-ct N``: N studies, spread over the corpus whatever its size, are PET/CT (a CT
  series, then PET Image Storage series cloned from CT_small): a modality as rare in
  10,000 instances as in 50,000, so a query on it answers as many studies on both;
- per instance: InstanceNumber, ImagePositionPatient/SliceLocation, Content/Acquisition
  date and time.

Everything derives from ``--seed`` (UIDs included, through ``generate_uid``'s entropy
sources), so the same parameters give the same files.  ``manifest.json`` records the
parameters and totals; a second run with the same parameters does nothing.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage, generate_uid

#: Bump when the generated content changes, so older corpora are regenerated.
GENERATOR_VERSION = 1
MANIFEST = "manifest.json"
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root; entropy makes it deterministic


@dataclass(frozen=True)
class Parameters:
    patients: int = 20
    studies: int = 2
    series: int = 3
    instances: int = 10
    seed: int = 0
    #: PET/CT studies, however many patients (:func:`pet_ct_studies`).
    pet_ct: int = 0

    @property
    def total(self) -> int:
        return self.patients * self.studies * self.series * self.instances

    def slug(self) -> str:
        return (f"p{self.patients}-st{self.studies}-se{self.series}-i{self.instances}"
                f"-seed{self.seed}" + (f"-petct{self.pet_ct}" if self.pet_ct else ""))


def pet_ct_studies(params: Parameters) -> set[tuple[int, int]]:
    """The (patient, study) numbers of the PET/CT studies: one in the middle of each of
    ``pet_ct`` equal runs of the corpus's studies (never the first study, which the
    benchmarks' per-study queries name)."""
    count = params.patients * params.studies
    first = 1 if params.pet_ct < count else 0
    ordinals = (first + (2 * k + 1) * (count - first) // (2 * params.pet_ct)
                for k in range(params.pet_ct))
    return {(q + 1, r + 1) for q, r in (divmod(o, params.studies) for o in ordinals)}


# --- names and descriptions ------------------------------------------------------

_FAMILY = ["SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS",
           "MARTIN", "BERNARD", "DUBOIS", "THOMAS", "ROBERT", "PETIT", "SCHMIDT", "SCHNEIDER",
           "FISCHER", "WEBER", "ROSSI", "RUSSO", "NGUYEN", "TANAKA", "KOWALSKI", "JANSEN"]
_GIVEN = [("JOHN", "M"), ("MARY", "F"), ("JAMES", "M"), ("PATRICIA", "F"), ("ROBERT", "M"),
          ("JENNIFER", "F"), ("MICHAEL", "M"), ("LINDA", "F"), ("PIERRE", "M"),
          ("CLAIRE", "F"), ("HANS", "M"), ("ANNA", "F"), ("LUCA", "M"), ("GIULIA", "F"),
          ("KENJI", "M"), ("YUKI", "F"), ("ALEX", "O"), ("SAM", "O")]
_MIDDLE = ["A", "B", "C", "J", "M", "R"]
#: Mixed or lower case, as some systems and registration desks type them.
_MIXED = [("van der Berg", "Anna", "F"), ("de Vries", "Pieter", "M"), ("O'Brien", "Patrick", "M"),
          ("McAllister", "Fiona", "F"), ("le Gall", "Yann", "M"), ("von Trapp", "Maria", "F"),
          ("Doe", "Jane", "F"), ("doe", "john", "M"), ("da Silva", "Ana", "F"),
          ("MacDonald", "Ewan", "M"), ("ter Horst", "Sanne", "F"), ("d'Arcy", "Claude", "O")]
#: Non-ASCII names, stored with SpecificCharacterSet ISO_IR 192 (UTF-8).
_NON_ASCII = [("Müller", "Jürgen", "M"), ("Ødegård", "Åse", "F"), ("Łukasiewicz", "Zofia", "F"),
              ("Núñez", "José", "M"), ("Dvořák", "Antonín", "M"), ("Çelik", "Ayşe", "F"),
              ("Østergaard", "Søren", "M"), ("Größer", "Bärbel", "F"), ("Lefèvre", "Hélène", "F"),
              ("Иванов", "Иван", "M"), ("Παπαδόπουλος", "Γιώργος", "M"), ("山田", "太郎", "M"),
              ("김", "민준", "M"), ("Nguyễn", "Thị Hương", "F"), ("Şahin", "Özlem", "F")]

_STUDY_DESCRIPTIONS = {
    "CT": ["CT CHEST W/O CONTRAST", "CT ABDOMEN PELVIS W CONTRAST", "CT HEAD W/O CONTRAST",
           "CTA CHEST PE PROTOCOL", "CT Thorax low dose", "CT SINUS"],
    "MR": ["MRI BRAIN W/WO CONTRAST", "MR KNEE LEFT W/O CONTRAST", "MR LUMBAR SPINE",
           "MRI Prostate mpMRI", "MR CARDIAC FUNCTION", "IRM cérébrale"],
}
_PET_CT_STUDY = "PET-CT FDG WHOLE BODY"
_PET_CT_SERIES = {"CT": ["CT AC WB 3mm"], "PT": ["PET WB AC", "PET WB NAC", "PET MIP"]}
_SERIES_DESCRIPTIONS = {
    "CT": ["Topogram 0.6 T20f", "Axial 5.0 B31f", "Axial 1.0 B70f Lung", "Coronal MPR 3mm",
           "Sagittal MPR 3mm", "Dose Report", "Arterial phase 1.0"],
    "MR": ["localizer", "t1_mprage_sag", "t2_tse_tra", "FLAIR AX", "DWI b1000", "ADC",
           "t2_blade_cor", "T1 post Gd"],
}
_REFERRING = ["HOUSE^GREGORY^^DR", "GREY^MEREDITH", "Watson^John^H^Dr.", "", "STRANGE^STEPHEN"]
_INSTITUTIONS = ["GENERAL HOSPITAL", "St. Mary's Clinic", "CHU de Rennes", "Klinikum Nord"]
_TEMPLATES = {"CT": "CT_small.dcm", "MR": "MR_small.dcm"}


def _uid(seed: int, *parts: object) -> str:
    """A deterministic UID.  The parts are joined with "/" into one entropy source:
    ``generate_uid`` concatenates its sources, so ("instance", 1, 2, 1, 11) and
    ("instance", 12, 1, 1, 1) would otherwise give the same UID."""
    return generate_uid(UID_PREFIX,
                        entropy_srcs=[f"bench-corpus/{seed}/" + "/".join(map(str, parts))])


def _da(day: datetime.date) -> str:
    return day.strftime("%Y%m%d")


def _tm(moment: datetime.datetime, fraction: bool) -> str:
    return moment.strftime("%H%M%S.%f" if fraction else "%H%M%S")


def _age(birth: datetime.date, on: datetime.date) -> str:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return f"{max(years, 0):03d}Y"


@dataclass
class _Patient:
    name: str
    patient_id: str
    birth: datetime.date
    sex: str
    utf8: bool


def _patients(params: Parameters, rng: random.Random) -> list[_Patient]:
    result: list[_Patient] = []
    ids: set[str] = set()
    for _ in range(params.patients):
        style = rng.random()
        if style < 0.55:
            family = rng.choice(_FAMILY)
            given, sex = rng.choice(_GIVEN)
            middle = f"^{rng.choice(_MIDDLE)}" if rng.random() < 0.3 else ""
            name, utf8 = f"{family}^{given}{middle}", False
        elif style < 0.75:
            family, given, sex = rng.choice(_MIXED)
            name, utf8 = f"{family}^{given}", False
        else:
            family, given, sex = rng.choice(_NON_ASCII)
            name, utf8 = f"{family}^{given}", True
        while True:
            patient_id = f"{rng.randint(0, 99_999_999):08d}"
            if rng.random() < 0.2:
                patient_id = f"MRN-{patient_id[:6]}"
            if patient_id not in ids:
                ids.add(patient_id)
                break
        birth = datetime.date(1930, 1, 1) + datetime.timedelta(days=rng.randrange(30_000))
        result.append(_Patient(name, patient_id, birth, sex, utf8))
    return result


def _load_templates() -> dict[str, Dataset]:
    templates = {}
    for modality, name in _TEMPLATES.items():
        ds = dcmread(get_testdata_file(name))
        # The originals' other patient identifiers would contradict the new ones.
        for keyword in ("OtherPatientIDsSequence", "OtherPatientIDs"):
            if keyword in ds:
                delattr(ds, keyword)
        templates[modality] = ds
    pet = copy.deepcopy(templates["CT"])
    pet.SOPClassUID = PositronEmissionTomographyImageStorage
    pet.Modality = "PT"
    templates["PT"] = pet
    return templates


def generate(out_dir: Path, params: Parameters) -> dict[str, Any]:
    """Write the corpus into ``out_dir`` (which must not exist); returns the manifest."""
    rng = random.Random(params.seed)
    templates = _load_templates()
    patients = _patients(params, rng)
    first_day = datetime.date(2016, 1, 1)
    span_days = (datetime.date(2024, 12, 31) - first_day).days
    totals: Counter[str] = Counter()
    size = 0
    accession_numbers: set[str] = set()
    pet_ct = pet_ct_studies(params)
    for p, patient in enumerate(patients, start=1):
        for st in range(1, params.studies + 1):
            day = first_day + datetime.timedelta(days=rng.randrange(span_days + 1))
            start = datetime.datetime.combine(day, datetime.time(rng.randint(7, 19),
                                                                 rng.randint(0, 59),
                                                                 rng.randint(0, 59),
                                                                 rng.randrange(1_000_000)))
            fraction = rng.random() < 0.5
            study_modality = rng.choice(("CT", "MR"))
            mixed = rng.random() < 0.1
            while True:
                accession = f"A{day.year}{rng.randint(0, 999_999):06d}"
                if accession not in accession_numbers:
                    accession_numbers.add(accession)
                    break
            study = {
                "StudyInstanceUID": _uid(params.seed, "study", p, st),
                "StudyDate": _da(day), "StudyTime": _tm(start, fraction),
                "AccessionNumber": accession,
                "StudyID": str(rng.randint(1, 99_999)),
                "StudyDescription": rng.choice(_STUDY_DESCRIPTIONS[study_modality]),
                "ReferringPhysicianName": rng.choice(_REFERRING),
                "InstitutionName": rng.choice(_INSTITUTIONS),
                "PatientAge": _age(patient.birth, day),
            }
            if (p, st) in pet_ct:  # after the same draws: the other studies stay as they were
                study["StudyDescription"] = _PET_CT_STUDY
            for se in range(1, params.series + 1):
                modality = ("CT", "MR")[(se + (study_modality == "MR")) % 2] if mixed \
                    else study_modality
                series_start = start + datetime.timedelta(minutes=3 * (se - 1),
                                                          seconds=rng.randint(0, 59))
                series = {
                    "SeriesInstanceUID": _uid(params.seed, "series", p, st, se),
                    "FrameOfReferenceUID": _uid(params.seed, "frame", p, st, se),
                    "SeriesNumber": se,
                    "SeriesDescription": rng.choice(_SERIES_DESCRIPTIONS[modality]),
                    "SeriesDate": _da(series_start.date()),
                    "SeriesTime": _tm(series_start, fraction),
                }
                if (p, st) in pet_ct:
                    modality = "CT" if se == 1 else "PT"
                    names = _PET_CT_SERIES[modality]
                    series["SeriesDescription"] = names[(se - 1) % len(names)]
                folder = out_dir / f"P{p:04d}" / f"ST{st:02d}" / f"SE{se:02d}"
                folder.mkdir(parents=True)
                for n in range(1, params.instances + 1):
                    ds = copy.deepcopy(templates[modality])
                    moment = series_start + datetime.timedelta(seconds=n)
                    sop_uid = _uid(params.seed, "instance", p, st, se, n)
                    _fill(ds, patient, study, series, sop_uid, n, moment, fraction)
                    path = folder / f"IM{n:05d}.dcm"
                    ds.save_as(path, enforce_file_format=True)
                    size += path.stat().st_size
                    totals[modality] += 1
    manifest = {
        "generator": "benchmarks.corpus", "version": GENERATOR_VERSION,
        "parameters": asdict(params),
        "patients": params.patients, "studies": params.patients * params.studies,
        "series": params.patients * params.studies * params.series,
        "instances": params.total, "bytes": size, "modalities": dict(sorted(totals.items())),
        "non_ascii_patients": sum(p.utf8 for p in patients),
        "layout": "P####/ST##/SE##/IM#####.dcm",
        "transfer_syntax": str(ExplicitVRLittleEndian),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    return manifest


def _fill(ds: Dataset, patient: _Patient, study: dict[str, Any], series: dict[str, Any],
          sop_uid: str, number: int, moment: datetime.datetime, fraction: bool) -> None:
    texts = [patient.name, *(v for v in (*study.values(), *series.values())
                             if isinstance(v, str))]
    if not all(text.isascii() for text in texts):
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = _da(patient.birth)
    ds.PatientSex = patient.sex
    for keyword, value in study.items():
        setattr(ds, keyword, value)
    for keyword, value in series.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = number
    day, tm = _da(moment.date()), _tm(moment, fraction)
    for prefix in ("InstanceCreation", "Acquisition", "Content"):
        setattr(ds, f"{prefix}Date", day)
        setattr(ds, f"{prefix}Time", tm)
    if "ImagePositionPatient" in ds:
        x, y, _ = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, -5.0 * number]
    if "SliceLocation" in ds:
        ds.SliceLocation = -5.0 * number
    meta = ds.file_meta
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian


# --- idempotent entry point --------------------------------------------------------


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_current(out_dir: Path, params: Parameters) -> dict[str, Any] | None:
    manifest = read_manifest(out_dir)
    if (manifest is None or manifest.get("version") != GENERATOR_VERSION
            or manifest.get("parameters") != asdict(params)):
        return None
    present = sum(1 for _ in out_dir.glob("P*/ST*/SE*/IM*.dcm"))
    return manifest if present == params.total else None


def ensure(out_dir: str | Path, params: Parameters, force: bool = False,
           quiet: bool = False) -> dict[str, Any]:
    """The corpus of ``params`` in ``out_dir``: reused when already there, else (re)made.

    A folder that exists without our manifest is never deleted: the call fails instead.
    """
    out_dir = Path(out_dir)
    if params.total < 1 or min(params.patients, params.studies, params.series,
                               params.instances) < 1:
        raise ValueError("every corpus dimension must be at least 1")
    if not 0 <= params.pet_ct <= params.patients * params.studies:
        raise ValueError("--pet-ct must be between 0 and the number of studies")
    if not force:
        manifest = _is_current(out_dir, params)
        if manifest is not None:
            if not quiet:
                print(f"corpus: {out_dir} already holds {manifest['instances']} instances "
                      f"({manifest['bytes'] / 1e6:.1f} MB) for these parameters, kept",
                      file=sys.stderr)
            return manifest
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
        raise FileExistsError(f"{out_dir} exists, is not empty and holds no {MANIFEST}: "
                              "refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    started = time.perf_counter()
    try:
        manifest = generate(staging, params)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    if not quiet:
        print(f"corpus: wrote {manifest['instances']} instances "
              f"({manifest['bytes'] / 1e6:.1f} MB) to {out_dir} in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    return manifest


def split(out_dir: str | Path, parts: int) -> list[list[Path]]:
    """The corpus as ``parts`` lists of folders holding about as many files each, one
    per concurrent sender.  Whole patients when there are enough of them, else studies,
    else series: two senders then never write to the same patient, as when several
    modalities send at once.  ``parts == 1``: the corpus folder itself."""
    out_dir = Path(out_dir)
    if parts < 1:
        raise ValueError("parts must be at least 1")
    if parts == 1:
        return [[out_dir]]
    for pattern in ("P*", "P*/ST*", "P*/ST*/SE*"):
        units = sorted(p for p in out_dir.glob(pattern) if p.is_dir())
        if len(units) >= parts:
            break
    else:
        raise ValueError(f"{out_dir}: fewer than {parts} series to share among senders")
    groups: list[list[Path]] = [[] for _ in range(parts)]
    files = [0] * parts
    for unit in units:  # to the lightest group so far: round-robin when all weigh the same
        smallest = files.index(min(files))
        groups[smallest].append(unit)
        files[smallest] += sum(1 for _ in unit.rglob("*.dcm"))
    return groups


def write_large_instance(path: str | Path, size: int, *, encapsulated: bool = False,
                         fragment: int = 64 * 1024, seed: int = 0) -> Path:
    """One Part-10 image whose Pixel Data holds ``size`` bytes (rounded down), written a
    megabyte at a time, never whole in memory, with fresh UIDs: explicit VR little
    endian with square 16-bit pixels; or, ``encapsulated``, JPEG Baseline's encapsulated
    form with one ``fragment``-byte frame per fragment, as whole-slide images hold their
    tiles (the bytes are pseudo-random, no JPEG: nothing decodes them).  Every megabyte
    differs from the others, so a misplaced GridFS chunk would show."""
    import math
    import struct
    from io import BytesIO

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import JPEGBaseline8Bit

    path = Path(path)
    rng = random.Random(seed)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = "LARGE-1", "LARGE^INSTANCE"
    ds.Modality, ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "OT", "20240102", 1, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    if encapsulated:
        side = math.isqrt(fragment)
        frames = max(size // fragment, 1)
        ds.Rows = ds.Columns = side
        ds.NumberOfFrames = frames
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        syntax = JPEGBaseline8Bit
    else:
        side = math.isqrt(size // 2)
        ds.Rows = ds.Columns = side
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        syntax = ExplicitVRLittleEndian
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, \
        ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    head = BytesIO()
    ds.save_as(head, enforce_file_format=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        out.write(head.getvalue())
        if encapsulated:
            out.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
            out.write(struct.pack("<HHL", 0xFFFE, 0xE000, 0))  # empty basic offset table
            for _ in range(frames):
                out.write(struct.pack("<HHL", 0xFFFE, 0xE000, fragment))
                out.write(rng.randbytes(fragment))
            out.write(struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
        else:
            length = side * side * 2
            out.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length))
            for start in range(0, length, 1 << 20):
                out.write(rng.randbytes(min(1 << 20, length - start)))
    return path


def count_files(paths: list[Path]) -> int:
    """Corpus files (``*.dcm``) in these folders, or files."""
    return sum(1 if p.is_file() else sum(1 for _ in p.rglob("*.dcm")) for p in paths)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The corpus knobs, shared by every benchmark's command line."""
    defaults = Parameters()
    parser.add_argument("--patients", type=int, default=defaults.patients)
    parser.add_argument("--studies", type=int, default=defaults.studies,
                        help="studies per patient")
    parser.add_argument("--series", type=int, default=defaults.series,
                        help="series per study")
    parser.add_argument("--instances", type=int, default=defaults.instances,
                        help="instances per series")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--pet-ct", type=int, default=defaults.pet_ct, metavar="N",
                        help="PET/CT studies, spread over the corpus whatever its size")


def parameters(args: argparse.Namespace) -> Parameters:
    return Parameters(args.patients, args.studies, args.series, args.instances, args.seed,
                      args.pet_ct)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.corpus",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", metavar="OUT_DIR")
    add_arguments(parser)
    parser.add_argument("--force", action="store_true", help="regenerate even if current")
    args = parser.parse_args(argv)
    try:
        manifest = ensure(args.out_dir, parameters(args), force=args.force)
    except (ValueError, FileExistsError) as exc:
        print(f"corpus: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: manifest[k] for k in ("patients", "studies", "series", "instances",
                                                "bytes", "modalities")}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A small, known DICOM corpus for the C-FIND end-to-end tests, and the truth about it.

:func:`build` writes Part-10 files cloned from pydicom's ``CT_small.dcm`` and
``MR_small.dcm`` with fresh UIDs and chosen attributes, and returns a :class:`Corpus`
that knows, for every level, what a query must find (counts, computed keys).

The corpus (3 patients x 2 studies x 2 series x 3 instances = 36 instances):

========  ==================  =====================  ================================
patient   name                studies (date time)    particulars
========  ==================  =====================  ================================
FIND-P1   DOE^JOHN            20190315 101500        series 1 is a LOCALIZER (CT);
                              20200102 030000        study 2 mixes CT and MR
FIND-P2   smith^jane          20200101 235900        RequestAttributesSequence: one item
          (lower case)        20200102 010000        (SPS-4711) in a series of study 1,
                                                     two (SPS-0815, SPS-1234) in a series
                                                     of study 2; MR only
FIND-P3   MÜLLER^JÜRGEN       20221111 120000        accession numbers "a.b-31" and
          (fits Latin-1)      20231231 090000        "axb-32"; study 2's description
                                                     is Cyrillic (not Latin-1)
========  ==================  =====================  ================================

:func:`write_bulk_template` and :func:`seed_clones` make one series of many instances
(one stored through the node, the rest cloned in the database) for the cancel,
streaming and database-failure tests.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"

#: Attributes of the templates a test relies on being absent (asked for, answered empty)
#: or set by the builder only.
_REMOVED = ("StudyID", "PatientComments", "OtherPatientIDsSequence", "StudyDescription",
            "SeriesDescription", "RequestAttributesSequence", "ReferringPhysicianName",
            "PatientBirthDate", "InstanceCreatorUID")


@dataclass(frozen=True)
class Instance:
    patient_id: str
    patient_name: str
    study_uid: str
    study_date: str
    study_time: str
    accession: str
    study_description: str
    series_uid: str
    modality: str
    sop_class: str
    sop_uid: str
    image_type: tuple[str, ...]
    sps_ids: tuple[str, ...]  # ScheduledProcedureStepID of each RequestAttributesSequence item
    path: Path


@dataclass
class Corpus:
    """The files written and what every level holds."""

    root: Path
    instances: list[Instance] = field(default_factory=list)

    # -- the hierarchy --------------------------------------------------------------

    @property
    def patients(self) -> list[str]:
        return list(dict.fromkeys(i.patient_id for i in self.instances))

    @property
    def studies(self) -> list[str]:
        return list(dict.fromkeys(i.study_uid for i in self.instances))

    @property
    def series(self) -> list[str]:
        return list(dict.fromkeys(i.series_uid for i in self.instances))

    def of_patient(self, patient_id: str) -> list[Instance]:
        return [i for i in self.instances if i.patient_id == patient_id]

    def of_study(self, study_uid: str) -> list[Instance]:
        return [i for i in self.instances if i.study_uid == study_uid]

    def of_series(self, series_uid: str) -> list[Instance]:
        return [i for i in self.instances if i.series_uid == series_uid]

    def studies_of(self, patient_id: str) -> list[str]:
        return list(dict.fromkeys(i.study_uid for i in self.of_patient(patient_id)))

    def series_of(self, study_uid: str) -> list[str]:
        return list(dict.fromkeys(i.series_uid for i in self.of_study(study_uid)))

    def study(self, study_uid: str) -> Instance:
        """Any instance of the study (for its patient/study attributes)."""
        return self.of_study(study_uid)[0]

    # -- computed keys ----------------------------------------------------------------

    def patient_counts(self, patient_id: str) -> tuple[int, int, int]:
        members = self.of_patient(patient_id)
        return (len({i.study_uid for i in members}), len({i.series_uid for i in members}),
                len(members))

    def study_counts(self, study_uid: str) -> tuple[int, int]:
        members = self.of_study(study_uid)
        return len({i.series_uid for i in members}), len(members)

    def modalities(self, study_uid: str) -> set[str]:
        return {i.modality for i in self.of_study(study_uid)}

    def sop_classes(self, study_uid: str) -> set[str]:
        return {i.sop_class for i in self.of_study(study_uid)}

    def modality_counts(self) -> Counter[str]:
        return Counter(i.modality for i in self.instances)


# --- building ----------------------------------------------------------------------

_PATIENTS = (
    # id, name (str, Unicode), birth date, sex, studies:
    #   (date, time, accession, description,
    #    [(modality, image type, "SPS id+SPS id" or ""), ...])
    ("FIND-P1", "DOE^JOHN", "19600101", "M", (
        ("20190315", "101500", "ACC-1001", "HEAD CT", (
            ("CT", ("ORIGINAL", "PRIMARY", "LOCALIZER"), ""),
            ("CT", ("ORIGINAL", "PRIMARY", "AXIAL"), ""))),
        ("20200102", "030000", "ACC-1002", "THORAX", (
            ("CT", ("ORIGINAL", "PRIMARY", "AXIAL"), ""),
            ("MR", ("DERIVED", "SECONDARY", "OTHER"), ""))),
    )),
    ("FIND-P2", "smith^jane", "19751224", "F", (
        ("20200101", "235900", "ACC-2001", "knee", (
            ("MR", ("ORIGINAL", "PRIMARY", "OTHER"), "SPS-4711"),
            ("MR", ("ORIGINAL", "PRIMARY", "OTHER"), ""))),
        ("20200102", "010000", "ACC-2002", "knee follow-up", (
            ("MR", ("ORIGINAL", "PRIMARY", "OTHER"), "SPS-0815+SPS-1234"),
            ("MR", ("DERIVED", "SECONDARY", "OTHER"), ""))),
    )),
    ("FIND-P3", "MÜLLER^JÜRGEN", "19801010", "M", (
        ("20221111", "120000", "a.b-31", "Schädel", (
            ("CT", ("ORIGINAL", "PRIMARY", "AXIAL"), ""),
            ("CT", ("ORIGINAL", "PRIMARY", "AXIAL"), ""))),
        ("20231231", "090000", "axb-32", "Голова", (
            ("CT", ("ORIGINAL", "PRIMARY", "AXIAL"), ""),
            ("CT", ("DERIVED", "SECONDARY", "AXIAL"), ""))),
    )),
)
INSTANCES_PER_SERIES = 3


def _templates() -> dict[str, Dataset]:
    out = {}
    for modality, name in (("CT", "CT_small.dcm"), ("MR", "MR_small.dcm")):
        ds = dcmread(get_testdata_file(name))
        ds.remove_private_tags()
        for keyword in _REMOVED:
            if keyword in ds:
                delattr(ds, keyword)
        out[modality] = ds
    return out


def _request_item(sps_id: str) -> Dataset:
    item = Dataset()
    item.ScheduledProcedureStepID = sps_id
    item.RequestedProcedureID = f"RP-{sps_id[4:]}"
    return item


def build(root: Path) -> Corpus:
    """Write the corpus under ``root`` (one folder per series) and return its truth."""
    templates = _templates()
    corpus = Corpus(root)
    for patient_id, name, birth, sex, studies in _PATIENTS:
        for st, (date, time, accession, description, series) in enumerate(studies, 1):
            study_uid = generate_uid()
            for se, (modality, image_type, sps) in enumerate(series, 1):
                series_uid = generate_uid()
                folder = root / patient_id / f"ST{st}" / f"SE{se}"
                folder.mkdir(parents=True, exist_ok=True)
                for number in range(1, INSTANCES_PER_SERIES + 1):
                    ds = copy.deepcopy(templates[modality])
                    sop_uid = generate_uid()
                    ds.SpecificCharacterSet = "ISO_IR 192"
                    ds.PatientName = name
                    ds.PatientID = patient_id
                    ds.PatientBirthDate = birth
                    ds.PatientSex = sex
                    ds.StudyInstanceUID = study_uid
                    ds.StudyDate = date
                    ds.StudyTime = time
                    ds.AccessionNumber = accession
                    ds.StudyDescription = description
                    ds.SeriesInstanceUID = series_uid
                    ds.SeriesNumber = se
                    ds.SeriesDate = date
                    ds.Modality = modality
                    ds.ImageType = list(image_type)
                    ds.InstanceNumber = number
                    ds.SOPInstanceUID = sop_uid
                    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
                    sps_ids = tuple(sps.split("+")) if sps else ()
                    if sps_ids:
                        ds.RequestAttributesSequence = [_request_item(i) for i in sps_ids]
                    path = folder / f"IM{number}.dcm"
                    ds.save_as(path, enforce_file_format=True)
                    corpus.instances.append(Instance(
                        patient_id=patient_id, patient_name=name, study_uid=study_uid,
                        study_date=date, study_time=time, accession=accession,
                        study_description=description, series_uid=series_uid,
                        modality=modality, sop_class=str(ds.SOPClassUID), sop_uid=sop_uid,
                        image_type=image_type, sps_ids=sps_ids, path=path))
    return corpus


@dataclass(frozen=True)
class Bulk:
    """One patient, one study, one series of ``len(sop_uids)`` instances."""

    patient_id: str
    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]
    accession: str


def write_bulk_template(path: Path, patient_id: str = "FIND-BULK") -> Dataset:
    """MR_small cut down to the attributes a query needs, in a series of its own.

    The first instance of the bulk series: stored through the node, then cloned by
    :func:`seed_clones`.
    """
    src = dcmread(get_testdata_file("MR_small.dcm"))
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword in ("ImageType", "SOPClassUID", "Modality", "Manufacturer"):
        setattr(ds, keyword, src[keyword].value)
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = "BULK^SERIES"
    ds.StudyDate = ds.SeriesDate = "20240601"
    ds.StudyTime = "080000"
    ds.AccessionNumber = "ACC-BULK"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.file_meta = copy.deepcopy(src.file_meta)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def seed_clones(db: Any, template: Dataset, count: int) -> Bulk:
    """Grow the template's series to ``count`` instances by cloning its stored document.

    Storing through the archive costs a collection scan per instance on FerretDB 1.24
    (``{_id: ...}`` is not an index lookup there), i.e. minutes for 1,000 instances; the
    clones are the stored instance document with a new SOP Instance UID and Instance
    Number, and the level documents get the lists and counters storing would have
    given them (``helpers.counter_problems`` checks that).
    """
    first = str(template.SOPInstanceUID)
    stored = db.instances.find_one({"_id": first})
    if stored is None:
        raise AssertionError(f"template instance {first} is not stored")
    clones = []
    for number in range(2, count + 1):
        doc = copy.deepcopy(stored)
        uid = generate_uid()
        doc["_id"] = doc["SOPInstanceUID"] = uid
        doc["dataset"]["00080018"] = {"vr": "UI", "Value": [uid]}
        doc["dataset"]["00200013"] = {"vr": "IS", "Value": [number]}
        clones.append(doc)
    if clones:
        db.instances.insert_many(clones, ordered=False)
    uids = (first, *(doc["_id"] for doc in clones))
    series, study = str(template.SeriesInstanceUID), str(template.StudyInstanceUID)
    db.series.update_one({"_id": series}, {"$set": {
        "instances": list(uids), "NumberOfSeriesRelatedInstances": count}})
    db.studies.update_one({"_id": study}, {"$set": {"NumberOfStudyRelatedInstances": count}})
    db.patients.update_one({"_id": str(template.PatientID)},
                           {"$set": {"NumberOfPatientRelatedInstances": count}})
    return Bulk(str(template.PatientID), study, series, uids, str(template.AccessionNumber))

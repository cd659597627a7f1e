"""The document model: which attributes live at which Query/Retrieve level.

Four collections hold the metadata, one per level of the DICOM information model
(PS3.4 C.6):

``patients``  ``_id`` = Patient ID;           counters of related studies/series/instances
``studies``   ``_id`` = Study Instance UID;    counters, Modalities / SOP Classes in Study
``series``    ``_id`` = Series Instance UID;   Number of Series Related Instances
``instances`` ``_id`` = SOP Instance UID;      the whole dataset, the GridFS file id

Each document has ``dataset``: the attributes of its level *and of the levels above*
as DICOM JSON (PS3.18 F.2), so a query at any level is answered from one collection
without touching the instances.  Beside it sit a few top-level *normalised* fields
(UIDs, Patient ID, dates, ...) that are indexed and that the query translation
matches on instead of the DICOM JSON value, because they are plain strings that
both MongoDB and FerretDB index and compare efficiently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydicom.datadict import tag_for_keyword

PATIENT, STUDY, SERIES, IMAGE = "PATIENT", "STUDY", "SERIES", "IMAGE"
LEVELS: tuple[str, ...] = (PATIENT, STUDY, SERIES, IMAGE)

#: Collection holding the entities of each level.
COLLECTION = {PATIENT: "patients", STUDY: "studies", SERIES: "series", IMAGE: "instances"}

#: Unique key of each level (PS3.4 C.6.1.1 / C.6.2.1).
UNIQUE_KEY = {
    PATIENT: "PatientID",
    STUDY: "StudyInstanceUID",
    SERIES: "SeriesInstanceUID",
    IMAGE: "SOPInstanceUID",
}

_PATIENT_KEYS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID", "ReferencedPatientSequence", "PatientBirthDate", "PatientBirthTime",
    "PatientSex", "OtherPatientIDsSequence", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "EthnicGroup", "PatientComments", "PatientSpeciesDescription",
    "PatientBreedDescription", "ResponsiblePerson", "ResponsibleOrganization",
    "PatientIdentityRemoved", "DeidentificationMethod", "QualityControlSubject",
    "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances",
)
_STUDY_KEYS = (
    "StudyDate", "StudyTime", "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyID",
    "StudyInstanceUID", "ModalitiesInStudy", "SOPClassesInStudy",
    "AnatomicRegionsInStudyCodeSequence", "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence", "StudyDescription", "ProcedureCodeSequence",
    "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "AdmittingDiagnosesDescription",
    "ReferencedStudySequence", "PatientAge", "PatientSize", "PatientWeight", "Occupation",
    "AdditionalPatientHistory", "OtherStudyNumbers", "RequestingPhysician",
    "RequestedProcedureDescription", "ReasonForPerformedProcedureCodeSequence",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
)
_SERIES_KEYS = (
    "Modality", "SeriesNumber", "SeriesInstanceUID", "SeriesDescription", "SeriesDate",
    "SeriesTime", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "PerformedProcedureStepID", "PerformedProcedureStepDescription",
    "RequestAttributesSequence", "BodyPartExamined", "Laterality", "ProtocolName",
    "OperatorsName", "PerformingPhysicianName", "SeriesType", "FrameOfReferenceUID",
    "Manufacturer", "ManufacturerModelName", "InstitutionName", "InstitutionalDepartmentName",
    "StationName", "SoftwareVersions", "PatientPosition", "NumberOfSeriesRelatedInstances",
)


def _tags(keywords: tuple[str, ...]) -> frozenset[int]:
    tags = [tag_for_keyword(k) for k in keywords]
    missing = [k for k, t in zip(keywords, tags, strict=True) if t is None]
    if missing:
        raise ValueError(f"unknown DICOM keywords in the level tables: {missing}")
    return frozenset(t for t in tags if t is not None)


#: Attributes that belong to each level (IMAGE: everything not above).
LEVEL_TAGS: dict[str, frozenset[int]] = {
    PATIENT: _tags(_PATIENT_KEYS),
    STUDY: _tags(_STUDY_KEYS),
    SERIES: _tags(_SERIES_KEYS),
}

#: Keys the archive computes instead of storing (PS3.4 C.3.4 "additional keys").
COMPUTED_KEYS: dict[int, str] = {
    tag_for_keyword(k): k  # type: ignore[misc]
    for k in (
        "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances", "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances", "NumberOfSeriesRelatedInstances",
        "ModalitiesInStudy", "SOPClassesInStudy",
    )
}

MODALITIES_IN_STUDY = 0x00080061
SOP_CLASSES_IN_STUDY = 0x00080062

#: Keys meaningful at every level, never matched against stored data.
CONTROL_KEYS: frozenset[int] = frozenset(
    {0x00080005, 0x00080052, 0x00080053, 0x00080054, 0x00080056, 0x00080201}
)


#: File Meta Information keys that stand for a dataset attribute.  The archive sends
#: every instance with Media Storage SOP Class / Instance UID equal to its SOP Class /
#: Instance UID (archive.dimse.retrieve writes the meta group), so an identifier naming them
#: (Orthanc 1.10 puts (0002,0003) in every IMAGE-level C-FIND and C-MOVE) asks for those.
FILE_META_ALIASES: dict[int, int] = {0x00020002: 0x00080016, 0x00020003: 0x00080018}


def identifier_key(tag: int) -> int | None:
    """The dataset attribute an identifier key is matched against, or None.

    None for keys that are no attribute of a stored dataset -- group lengths
    (gggg,0000), command elements (0000,eeee), file meta elements (0002,eeee) other
    than :data:`FILE_META_ALIASES` -- which match universally and are never returned.
    """
    tag = int(tag)
    if tag in FILE_META_ALIASES:
        return FILE_META_ALIASES[tag]
    if tag >> 16 in (0x0000, 0x0002) or tag & 0xFFFF == 0:
        return None
    return tag


def level_of(tag: int) -> str:
    """Level an attribute belongs to; IMAGE for anything not listed above it."""
    for level in (PATIENT, STUDY, SERIES):
        if tag in LEVEL_TAGS[level]:
            return level
    return IMAGE


def _stored(level: str) -> frozenset[int]:
    tags: set[int] = set()
    for lvl in LEVELS[: LEVELS.index(level) + 1]:
        if lvl != IMAGE:
            tags |= LEVEL_TAGS[lvl]
    return frozenset(tags - set(COMPUTED_KEYS))


#: Attributes copied into each level document: its own level and all levels above.
STORED_TAGS: dict[str, frozenset[int]] = {level: _stored(level) for level in LEVELS[:3]}
#: The same as DICOM JSON keys ("00100020"), to filter a dataset on every store.
STORED_KEYS: dict[str, frozenset[str]] = {
    level: frozenset(f"{tag:08X}" for tag in tags) for level, tags in STORED_TAGS.items()}


def stored_tags(level: str) -> frozenset[int]:
    """Attributes copied into a level document: its own level and all levels above."""
    return STORED_TAGS[level] if level in STORED_TAGS else _stored(level)


# --- normalised top-level fields -------------------------------------------------


def normalise_date(value: str) -> str:
    """DA as YYYYMMDD (old ACR-NEMA ``YYYY.MM.DD`` accepted)."""
    return value.strip().replace(".", "")


def normalise_time(value: str, high: bool = False) -> str:
    """TM as fixed-width ``HHMMSS.FFFFFF`` so strings compare as times.

    A reduced-precision value stands for the whole interval it names: padded with the
    lowest digits as a start, with the highest (``high``) as an end.
    """
    value = value.strip().replace(":", "")
    whole, _, fraction = value.partition(".")
    pad = "235959" if high else "000000"
    whole = whole + pad[len(whole):] if len(whole) < 6 else whole[:6]
    if high and not value.partition(".")[1]:
        fraction = "999999"
    fraction = (fraction + ("9" if high else "0") * 6)[:6]
    return f"{whole}.{fraction}"


def normalise_datetime(value: str, high: bool = False) -> str:
    """DT as fixed-width ``YYYYMMDDHHMMSS.FFFFFF`` (any UTC offset dropped)."""
    value = value.strip()
    for sign in "+-":
        if sign in value[4:]:
            value = value[: 4 + value[4:].index(sign)]
    date, time = value[:8], value[8:]
    pad = "99991231" if high else "00000101"
    date = date + pad[len(date):]  # string order only: "20190231" bounds February
    return date + normalise_time(time, high=high)


def normalise_name(value: str) -> str:
    """PN alphabetic group, upper-cased, for case-insensitive matching."""
    return value.strip().upper()


@dataclass(frozen=True)
class Field:
    """A normalised top-level field: its name and how a DICOM value becomes it."""

    name: str
    normalise: Callable[[str], str] = str.strip


_UID = Field  # UIDs and IDs are matched as given, trimmed.

#: Top-level fields of each collection, by tag.  The query translation uses them
#: for the tags listed here; everything else is matched inside ``dataset``.
NORMALISED: dict[str, dict[int, Field]] = {
    PATIENT: {
        0x00100020: _UID("PatientID"),
        0x00100010: Field("PatientName", normalise_name),
    },
    STUDY: {
        0x00100020: _UID("PatientID"),
        0x00100010: Field("PatientName", normalise_name),
        0x0020000D: _UID("StudyInstanceUID"),
        0x00080020: Field("StudyDate", normalise_date),
        0x00080030: Field("StudyTime", normalise_time),
        0x00080050: _UID("AccessionNumber"),
        0x00080061: Field("ModalitiesInStudy"),
        0x00080062: Field("SOPClassesInStudy"),
    },
    SERIES: {
        0x00100020: _UID("PatientID"),
        0x0020000D: _UID("StudyInstanceUID"),
        0x0020000E: _UID("SeriesInstanceUID"),
        0x00080060: Field("Modality"),
        0x00080021: Field("SeriesDate", normalise_date),
        0x00080031: Field("SeriesTime", normalise_time),
    },
    IMAGE: {
        0x00100020: _UID("PatientID"),
        0x0020000D: _UID("StudyInstanceUID"),
        0x0020000E: _UID("SeriesInstanceUID"),
        0x00080018: _UID("SOPInstanceUID"),
        0x00080016: _UID("SOPClassUID"),
    },
}

#: Counters kept on the level documents, by computed key.
COUNTERS: dict[str, str] = {
    "NumberOfPatientRelatedStudies": PATIENT,
    "NumberOfPatientRelatedSeries": PATIENT,
    "NumberOfPatientRelatedInstances": PATIENT,
    "NumberOfStudyRelatedSeries": STUDY,
    "NumberOfStudyRelatedInstances": STUDY,
    "NumberOfSeriesRelatedInstances": SERIES,
}

#: Indexes created on start-up (all idempotent).
INDEXES: dict[str, list[tuple[str, ...]]] = {
    "patients": [("PatientName",)],
    "studies": [("PatientID",), ("PatientName",), ("StudyDate", "StudyTime"),
                ("AccessionNumber",), ("ModalitiesInStudy",)],
    "series": [("StudyInstanceUID",), ("PatientID",), ("Modality",), ("SeriesDate",)],
    "instances": [("SeriesInstanceUID",), ("StudyInstanceUID",), ("PatientID",),
                  ("SOPClassUID",), ("file_id",)],
}

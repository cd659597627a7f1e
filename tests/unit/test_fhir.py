"""FHIR search parameters translated into C-FIND keys, and the R4 resources built from
C-FIND answers (archive.web.fhir), each resource parsed by the R4 models of
``fhir.resources`` (4.0.1)."""

from __future__ import annotations

from typing import Any

import pytest
from fhir.resources.bundle import Bundle
from fhir.resources.capabilitystatement import CapabilityStatement
from fhir.resources.imagingstudy import ImagingStudy
from fhir.resources.operationoutcome import OperationOutcome
from fhir.resources.patient import Patient
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from archive.model import STUDY
from archive.query import translate
from archive.web import fhir, qido

DCM = fhir.DCM


def keys(params: list[tuple[str, str]], max_results: int = 10_000) -> dict[str, str]:
    search = fhir.parse_search(params, max_results)
    assert not search.nothing
    # what C-FIND receives is a valid identifier
    translate(qido.identifier(STUDY, search.keys, fhir.STUDY_KEYS), STUDY)
    return dict(search.keys)


@pytest.mark.parametrize("params,expected", [
    ([("patient", "Patient/PAT-1")], {"PatientID": "PAT-1"}),
    ([("patient", "PAT-1")], {"PatientID": "PAT-1"}),
    ([("patient:Patient", "https://x.org/fhir/Patient/PAT-1")], {"PatientID": "PAT-1"}),
    ([("patient", "A,B")], {"PatientID": "A\\B"}),
    ([("patient", "A\\,B")], {"PatientID": "A,B"}),  # an escaped comma is one value
    ([("identifier", "urn:oid:1.2.3")], {"StudyInstanceUID": "1.2.3"}),
    ([("identifier", "urn:dicom:uid|urn:oid:1.2.3,urn:oid:1.2.4")],
     {"StudyInstanceUID": "1.2.3,1.2.4"}),
    ([("identifier", "ACC-1")], {"AccessionNumber": "ACC-1"}),
    ([("identifier", "|ACC-1")], {"AccessionNumber": "ACC-1"}),
    ([("modality", f"{DCM}|CT")], {"ModalitiesInStudy": "CT"}),
    ([("modality", "CT,MR")], {"ModalitiesInStudy": "CT\\MR"}),
    ([("_id", "1.2.3")], {"StudyInstanceUID": "1.2.3"}),
    ([("status", "available")], {}),
    ([("_format", "application/fhir+json"), ("_pretty", "true")], {}),
])
def test_parameters_become_c_find_keys(params: list[tuple[str, str]],
                                       expected: dict[str, str]) -> None:
    assert keys(params) == expected


@pytest.mark.parametrize("values,study_date", [
    (["2024"], "20240101-20241231"),
    (["eq2024-02"], "20240201-20240229"),
    (["2023-02"], "20230201-20230228"),
    (["2024-02-10"], "20240210"),
    (["ge2024-02"], "20240201-"),
    (["le2024-02"], "-20240229"),
    (["gt2024-02"], "20240301-"),
    (["sa2024-12-31"], "20250101-"),
    (["lt2024-03-01"], "-20240229"),
    (["eb2024"], "-20231231"),
    (["ge2024-01", "lt2024-02-01", "le2024-12"], "20240101-20240131"),
    (["0999-01-02"], "09990102"),
])
def test_started_becomes_a_study_date_range(values: list[str], study_date: str) -> None:
    assert keys([("started", v) for v in values]) == {"StudyDate": study_date}


@pytest.mark.parametrize("params", [
    [("identifier", "http://hospital.org/accession|ACC-1")],  # a system it has not
    [("modality", "http://snomed.info/sct|77477000")],
    [("status", "cancelled")],
    [("started", "gt2024"), ("started", "lt2024")],  # no day in between
    [("started", "gt9999")],
])
def test_conditions_no_study_meets_match_nothing(params: list[tuple[str, str]]) -> None:
    assert fhir.parse_search(params, 100).nothing


def test_paging() -> None:
    search = fhir.parse_search([("_count", "5"), ("_offset", "10")], 100)
    assert (search.count, search.offset) == (5, 10)
    assert fhir.parse_search([("_count", "999999")], 100).count == 100
    assert fhir.parse_search([], 10).count == 10  # http.max_results below the default
    assert fhir.parse_search([], 10_000).count == fhir.DEFAULT_COUNT
    assert fhir.parse_search([("_summary", "count")], 100).count == 0


@pytest.mark.parametrize("params,message", [
    ([("name", "x")], "unknown search parameter 'name'"),
    ([("identifier:of-type", "x")], "unknown search parameter"),
    ([("patient", "")], "empty value"),
    ([("patient", "PAT*")], "exact"),
    ([("patient", "P?T")], "exact"),
    ([("patient", '""')], "exact"),  # DICOM empty-value matching
    ([("patient", "A\\\\B")], "exact"),  # an escaped backslash: a DICOM value separator
    ([("patient", "a|b")], "reference"),
    ([("modality", "a|b|c")], "more than one '|'"),
    ([("modality", "DCM|")], "no code"),
    ([("identifier", "urn:oid:1.2,ACC")], "not both"),
    ([("identifier", "urn:oid:1.2.*")], "exact"),
    ([("identifier", "urn:oid:.2")], "not a UID"),
    ([("_id", "1_2")], "not an ImagingStudy id"),
    ([("_id", "1.2"), ("identifier", "urn:oid:1.2")], "names the study"),
    ([("started", "2024-02-30")], "not a calendar date"),
    ([("started", "24")], "not a FHIR date"),
    ([("started", "2024-01-01T00:00:00Z")], "only dates"),
    ([("started", "ap2024")], "prefix 'ap'"),
    ([("_count", "x")], "non-negative integer"),
    ([("_offset", "-1")], "non-negative integer"),
    ([("_summary", "true")], "only 'count'"),
    ([("modality", "CT"), ("modality", "MR")], "more than once"),
    ([("status", "x")] * 51, "more than 50"),
])
def test_refusals(params: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(fhir.BadSearch, match=message.replace("*", r"\*").replace("?", r"\?")
                       .replace("|", r"\|")):
        fhir.parse_search(params, 100)


def test_lenient_handling_leaves_unknown_parameters_out() -> None:
    assert fhir.lenient("return=minimal, handling=lenient")
    assert not fhir.lenient("handling=strict") and not fhir.lenient(None)
    search = fhir.parse_search([("name", "DOE"), ("patient", "PAT-1")], 100, lenient=True)
    assert search.keys == (("PatientID", "PAT-1"),)
    assert search.params == (("patient", "PAT-1"),)
    with pytest.raises(fhir.BadSearch, match="started"):  # a known one, malformed
        fhir.parse_search([("started", "x")], 100, lenient=True)


def test_other_formats_are_not_json() -> None:
    with pytest.raises(fhir.NotJson):
        fhir.parse_search([("_format", "xml")], 100)
    with pytest.raises(fhir.NotJson):
        fhir.parse_read("1.2", [("_format", "application/fhir+xml")])
    assert fhir.json_accepted(None) and fhir.json_accepted("application/fhir+json")
    assert fhir.json_accepted("text/html, */*;q=0.1")
    assert not fhir.json_accepted("application/fhir+xml")


def test_reads() -> None:
    assert fhir.parse_read("1.2.3", []).keys == (("StudyInstanceUID", "1.2.3"),)
    for impossible in ("1_2", "*", "x" * 65, "-1.2"):
        assert fhir.parse_read(impossible, []).nothing, impossible
    assert fhir.parse_read("PAT-1", [], "PatientID").keys == (("PatientID", "PAT-1"),)
    with pytest.raises(fhir.BadSearch, match="only _format and _pretty"):
        fhir.parse_read("1.2.3", [("patient", "x")])


@pytest.mark.parametrize("date,time,offset,expected", [
    ("20240102", "101500", "+0100", "2024-01-02T10:15:00+01:00"),
    ("20240102", "1015", "-0500", "2024-01-02T10:15:00-05:00"),
    ("20240102", "10", "+0000", "2024-01-02T10:00:00+00:00"),
    ("20240102", "101500.123456", "+0530", "2024-01-02T10:15:00.123456+05:30"),
    ("20240102", "101500", None, "2024-01-02"),  # no zone: FHIR wants one with a time
    ("20240102", "101500", "+01:00", "2024-01-02T10:15:00+01:00"),  # http.fhir_timezone
    ("20240102", "101500", "+1400", "2024-01-02T10:15:00+14:00"),
    ("20240102", "101500", "+1401", "2024-01-02"),
    ("2024.01.02", None, None, "2024-01-02"),  # ACR-NEMA
    ("20240102", "2560", "+0100", "2024-01-02"),
    ("20241301", "101500", "+0100", None),
    ("", None, None, None),
])
def test_date_time(date: str, time: str | None, offset: str | None,
                   expected: str | None) -> None:
    assert fhir.date_time(date, time, offset) == expected


def answer(**values: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


STUDY_UID, SERIES_UID = "1.2.840.99.1", "1.2.840.99.1.1"


def study(**values: Any) -> Dataset:
    base = {"StudyInstanceUID": STUDY_UID, "StudyDate": "20240102", "StudyTime": "101500",
            "PatientID": "PAT-1", "PatientName": "DOE^JOHN^Q^DR^JR",
            "ModalitiesInStudy": ["CT", "SR"], "NumberOfStudyRelatedSeries": 1,
            "NumberOfStudyRelatedInstances": 2, "AccessionNumber": "ACC-1",
            "StudyDescription": "CT chest", "ReferringPhysicianName": "WHO^DR"}
    return answer(**{**base, **values})


def series(**values: Any) -> Dataset:
    base = {"StudyInstanceUID": STUDY_UID, "SeriesInstanceUID": SERIES_UID,
            "SeriesNumber": 2, "Modality": "CT", "SeriesDescription": "axial",
            "NumberOfSeriesRelatedInstances": 2, "BodyPartExamined": "CHEST"}
    return answer(**{**base, **values})


def instance(n: int, **values: Any) -> Dataset:
    base = {"StudyInstanceUID": STUDY_UID, "SeriesInstanceUID": SERIES_UID,
            "SOPInstanceUID": f"{SERIES_UID}.{n}", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
            "InstanceNumber": n}
    return answer(**{**base, **values})


def build(studies: list[Dataset], all_series: list[Dataset], instances: list[Dataset]
          ) -> list[dict[str, Any]]:
    resources = fhir.resources(studies, all_series, instances, "https://pacs/dicom-web")
    for resource in resources:
        ImagingStudy.parse_obj(resource)
    return resources


def test_an_imaging_study_of_c_find_answers() -> None:
    [resource] = build([study(TimezoneOffsetFromUTC="+0100")], [series()],
                       [instance(2), instance(1)])
    assert resource["id"] == STUDY_UID
    assert resource["identifier"][0]["value"] == f"urn:oid:{STUDY_UID}"
    assert resource["identifier"][1]["value"] == "ACC-1"
    assert resource["started"] == "2024-01-02T10:15:00+01:00"
    assert resource["subject"] == {"reference": "Patient/PAT-1",
                                   "identifier": {"value": "PAT-1"},
                                   "display": "DR JOHN Q DOE JR"}
    assert resource["referrer"] == {"display": "DR WHO"}
    assert [m["code"] for m in resource["modality"]] == ["CT", "SR"]
    [item] = resource["series"]
    assert (item["uid"], item["number"], item["modality"]["code"], item["description"],
            item["bodySite"]) == (SERIES_UID, 2, "CT", "axial", {"display": "CHEST"})
    assert [(i["uid"][-1], i["number"]) for i in item["instance"]] == [("1", 1), ("2", 2)]
    assert item["instance"][0]["sopClass"] == {
        "system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.840.10008.5.1.4.1.1.2"}
    [endpoint] = resource["contained"]
    assert endpoint["address"] == "https://pacs/dicom-web"
    assert resource["endpoint"] == [{"reference": "#dicomweb"}]


def test_times_get_the_configured_zone() -> None:
    resource = fhir.imaging_study(study(), [series(SeriesDate="20240102", SeriesTime="1016")],
                                  [], "https://pacs/dicom-web", timezone="-05:00")
    ImagingStudy.parse_obj(resource)
    assert resource["started"] == "2024-01-02T10:15:00-05:00"
    assert resource["series"][0]["started"] == "2024-01-02T10:16:00-05:00"
    # the dataset's own offset, when an answer has one, wins
    resource = fhir.imaging_study(study(TimezoneOffsetFromUTC="+0200"), [], [], "x", "-05:00")
    assert resource["started"] == "2024-01-02T10:15:00+02:00"


def test_odd_answers_still_make_valid_resources() -> None:
    """Stored data as it comes: no Modality, no patient, a bad date, negative or
    non-numeric numbers, a UID no FHIR id can hold."""
    odd = build([study(PatientID="", PatientName="", StudyDate="20241301",
                       ModalitiesInStudy="", NumberOfStudyRelatedSeries=None,
                       StudyDescription="", AccessionNumber="", ReferringPhysicianName="")],
                [series(Modality="", SeriesNumber=-3, NumberOfSeriesRelatedInstances=None,
                        BodyPartExamined="", SeriesDescription=""),
                 series(SeriesInstanceUID="1.2_3")],
                [instance(1, InstanceNumber=None), instance(2, SOPInstanceUID="1.2+4")])
    [resource] = odd
    assert resource["subject"] == {"display": "unknown patient"}
    assert "started" not in resource and "modality" not in resource
    [item] = resource["series"]  # the series "1.2_3" cannot be named by a FHIR id
    assert item["modality"]["code"] == "OT" and "number" not in item
    assert [i["uid"] for i in item["instance"]] == [f"{SERIES_UID}.1"]
    [no_id] = build([study(StudyInstanceUID="1.2_3", PatientID="PAT 1")], [], [])
    assert "id" not in no_id
    assert no_id["subject"] == {"identifier": {"value": "PAT 1"}, "display": "DR JOHN Q DOE JR"}


def test_values_pydicom_cannot_read_back_are_left_out() -> None:
    """A C-FIND answer holds stored values as received: an IS of letters."""
    odd = series()
    del odd.SeriesNumber
    odd[0x00200011] = RawDataElement(BaseTag(0x00200011), "IS", 4, b"1x2 ", 0, False, True)
    [resource] = build([study()], [odd], [])
    assert "number" not in resource["series"][0]


def test_the_bundle_and_its_links() -> None:
    search = fhir.parse_search([("patient", "PAT-1"), ("_count", "1"), ("_offset", "1")],
                               100)
    resources = build([study()], [series()], [instance(1)])
    bundle = fhir.bundle(resources, 3, search, "https://pacs/fhir")
    Bundle.parse_obj(bundle)
    links = {link["relation"]: link["url"] for link in bundle["link"]}
    base = "https://pacs/fhir/ImagingStudy?patient=PAT-1&_count=1&_offset="
    assert links == {"self": base + "1", "previous": base + "0", "next": base + "2"}
    assert bundle["entry"][0]["fullUrl"] == f"https://pacs/fhir/ImagingStudy/{STUDY_UID}"
    last = fhir.bundle([], 3, fhir.parse_search([("_offset", "5")], 100), "https://h/fhir")
    Bundle.parse_obj(last)
    assert "entry" not in last and {link["relation"] for link in last["link"]} == \
        {"self", "previous"}


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 406, 500, 503])
def test_operation_outcomes(status: int) -> None:
    parsed = OperationOutcome.parse_obj(fhir.outcome(status, "why"))
    assert parsed.issue[0].diagnostics == "why"


@pytest.mark.parametrize("values,expected", [
    ({"PatientSex": "F", "PatientBirthDate": "19700131"},
     {"gender": "female", "birthDate": "1970-01-31"}),
    ({"PatientSex": "m", "PatientBirthDate": "19701331"}, {"gender": "male"}),
    ({"PatientSex": "", "PatientName": ""}, {"gender": "unknown"}),
])
def test_patients(values: dict[str, Any], expected: dict[str, Any]) -> None:
    resource = fhir.patient_resource(answer(**{"PatientID": "PAT-1",
                                               "PatientName": "DOE^JANE", **values}))
    Patient.parse_obj(resource)
    assert {k: resource.get(k) for k in expected} == expected
    assert "birthDate" in resource or "birthDate" not in expected


def test_the_capability_statement() -> None:
    CapabilityStatement.parse_obj(fhir.capabilities("https://pacs/fhir"))

"""C-FIND identifier -> MongoDB filter, checked by running the filter.

Each case translates an identifier, runs the filter in mongomock over small documents
shaped like the archive's (DICOM JSON under ``dataset`` plus the normalised top-level
fields) and checks which entities match; ``evaluate`` must agree with MongoDB on
every document of every case, since the access-control rules rely on it.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import mongomock
import pytest
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from archive.model import (
    COLLECTION,
    COUNTERS,
    IMAGE,
    NORMALISED,
    PATIENT,
    SERIES,
    STUDY,
    UNIQUE_KEY,
    stored_tags,
)
from archive.query import (
    EMPTY,
    MATCHING,
    MULTIPLE,
    RANGE,
    SEQUENCE,
    SINGLE,
    UID_LIST,
    UNIVERSAL,
    WILDCARD,
    Query,
    QueryError,
    classify,
    evaluate,
    pattern_filter,
    translate,
)

# Query values such as "?R" or "01:30" are no valid CS/TM values; pydicom warns.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR"),
    pytest.mark.filterwarnings("ignore:Value .* is not valid for elements"),
    pytest.mark.filterwarnings("ignore:The value length"),
]

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SR = "1.2.840.10008.5.1.4.1.1.88.11"


# --- documents as the archive stores them ----------------------------------------


def dataset(**attributes: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def document(level: str, ds: Dataset, **top: Any) -> dict[str, Any]:
    """A level document: the attributes it stores as DICOM JSON, the normalised fields."""
    kept = Dataset()
    for element in ds:
        if level == IMAGE or element.tag in stored_tags(level):
            kept.add(element)
    doc: dict[str, Any] = {"_id": str(ds[UNIQUE_KEY[level]].value), "dataset": kept.to_json_dict()}
    for tag, field in NORMALISED[level].items():
        if tag in ds and not ds[tag].is_empty:
            value = ds[tag].value
            doc[field.name] = field.normalise(value.alphabetic if ds[tag].VR == "PN" else value)
    doc.update(top)
    return doc


def code(value: str, scheme: str) -> Dataset:
    return dataset(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=value.title())


def request(step: str, procedure: str) -> Dataset:
    return dataset(ScheduledProcedureStepID=step, RequestedProcedureID=procedure)


def study(uid: str, **attributes: Any) -> dict[str, Any]:
    top = {k: attributes.pop(k) for k in ("ModalitiesInStudy", "NumberOfStudyRelatedSeries")
           if k in attributes}
    return document(STUDY, dataset(StudyInstanceUID=uid, **attributes), **top)


def series(uid: str, study_uid: str, **attributes: Any) -> dict[str, Any]:
    top = {k: attributes.pop(k) for k in ("NumberOfSeriesRelatedInstances",) if k in attributes}
    ds = dataset(SeriesInstanceUID=uid, StudyInstanceUID=study_uid, **attributes)
    return document(SERIES, ds, **top)


def instance(uid: str, series_uid: str, sop_class: str, **attributes: Any) -> Dataset:
    return dataset(SOPInstanceUID=uid, SeriesInstanceUID=series_uid, SOPClassUID=sop_class,
                   **attributes)


STUDIES = [
    study("1.1", PatientID="P1", PatientName="Smith^John", StudyDate="20181231",
          StudyTime="120000", AccessionNumber="a.bcd", StudyDescription="CT Head",
          ReferringPhysicianName="Doe^Jane", AdditionalPatientHistory="C:\\temp\\x",
          ProcedureCodeSequence=[code("HEAD01", "LN")], ModalitiesInStudy=["CT", "SR"],
          NumberOfStudyRelatedSeries=2),
    study("1.2", PatientID="P2", PatientName="SMITH^JANE", StudyDate="20190101",
          StudyTime="230000", AccessionNumber="axbcd", StudyDescription=".*",
          ProcedureCodeSequence=[code("HEAD02", "LN"), code("NECK", "99X")],
          ModalitiesInStudy=["MR"], NumberOfStudyRelatedSeries=1),
    study("1.3", PatientID="P3", PatientName="smithers^bob", StudyDate="20190102",
          StudyTime="013000", AccessionNumber="$5", StudyDescription="cost $5 total",
          ProcedureCodeSequence=[code("KNEE", "LN")], ModalitiesInStudy=["MR"],
          NumberOfStudyRelatedSeries=3),
    study("1.4", PatientID='{"$ne": null}', PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう",
          StudyDate="20190102", StudyTime="120000", StudyDescription="^up and away",
          ModalitiesInStudy=["CT"]),
    study("1.5", PatientID="P5", PatientName="Yamada^Hanako=山田^花子=やまだ^はなこ",
          StudyDate="20191231", StudyTime="235959.5", StudyDescription="(draft) report",
          ModalitiesInStudy=["US"]),
    study("1.6", PatientID="P6", PatientName="Doe^John", StudyDate="20200101", StudyTime="1230",
          StudyDescription="[x] marks", ModalitiesInStudy=["CT"]),
    study("1.7", PatientID="P7", PatientName="", StudyDate="20150101", StudyTime="",
          StudyDescription=""),
    study("1.8", PatientID="P8"),
]

SERIES_DOCS = [
    series("2.1", "1.1", PatientID="P1", PatientName="Smith^John", StudyDate="20181231",
           Modality="CT", SeriesNumber="1", SeriesDate="20190101", SeriesTime="235900",
           SeriesDescription="Axial 2.5",
           RequestAttributesSequence=[request("SPS1", "RP1"), request("SPS2", "RP2")],
           NumberOfSeriesRelatedInstances=2),
    series("2.2", "1.1", PatientID="P1", PatientName="Smith^John", StudyDate="20181231",
           Modality="SR", SeriesNumber="2", SeriesDate="20190102", SeriesTime="000100",
           RequestAttributesSequence=[request("SPS3", "RP3")], NumberOfSeriesRelatedInstances=1),
    series("2.3", "1.2", PatientID="P2", PatientName="SMITH^JANE", StudyDate="20190101",
           Modality="MR", SeriesNumber="3", SeriesDate="20190102", SeriesTime="120000",
           SeriesDescription="Sag T1", RequestAttributesSequence=[],
           PerformedProcedureStepStartDate="20190102", PerformedProcedureStepStartTime="1159"),
    series("2.4", "1.3", PatientID="P3", PatientName="Doe^John", StudyDate="20190102",
           Modality="MR", SeriesNumber="10"),
]

_ACME = instance("3.1", "2.1", CT, PatientID="P1", PatientName="Smith^John", InstanceNumber="1",
                 ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], SliceThickness="2.5", Rows=512,
                 ContentDate="20190101", ContentTime="1100",
                 AcquisitionDateTime="20190101120000")
_ACME.add_new(0x00090010, "LO", "ACME")
_ACME.add_new(0x00091010, "LO", "ACME-1")
_OTHER = instance("3.2", "2.1", CT, PatientID="P1", PatientName="Smith^John", InstanceNumber="2",
                  ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SliceThickness="5", Rows=256,
                  ContentDate="20190101", ContentTime="110030.5",
                  AcquisitionDateTime="20190101235959.123456+0100")
_OTHER.add_new(0x00090010, "LO", "ACME")
_OTHER.add_new(0x00091010, "LO", "OTHER")

INSTANCES = [
    document(IMAGE, _ACME),
    document(IMAGE, _OTHER),
    document(IMAGE, instance(
        "3.3", "2.2", SR, PatientID="P1", InstanceNumber="3",
        ImageType=["DERIVED", "SECONDARY", "LOCALIZER"], ContentDate="20190102",
        ContentTime="000100", AcquisitionDateTime="20190102")),
    document(IMAGE, instance(
        "3.4", "2.3", MR, PatientID="P2", PatientName="SMITH^JANE", InstanceNumber="10",
        ImageType=["ORIGINAL", "PRIMARY"], SliceThickness="0.75", ContentDate="20190102",
        ContentTime="23", AcquisitionDateTime="2019")),
]

CORPUS = {STUDY: STUDIES, SERIES: SERIES_DOCS, IMAGE: INSTANCES}
ALL = {level: {doc["_id"] for doc in docs} for level, docs in CORPUS.items()}


@pytest.fixture(scope="module")
def db() -> Any:
    database = mongomock.MongoClient().archive
    for level, docs in CORPUS.items():
        database[COLLECTION[level]].insert_many(copy.deepcopy(docs))
    return database


def identifier(level: str, keys: dict[str, Any], tags: dict[int, tuple[str, Any]] | None = None
               ) -> Dataset:
    ds = dataset(QueryRetrieveLevel=level, **keys)
    for tag, (vr, value) in (tags or {}).items():
        ds.add_new(tag, vr, value)
    return ds


def case(name: str, level: str, expected: set[str] | None, *, tags: dict | None = None,
         pn_case_insensitive: bool = True, combined_datetime: bool = True, **keys: Any) -> Any:
    """One query: its identifier, options and the entities it must find (None: all)."""
    options = {"pn_case_insensitive": pn_case_insensitive, "combined_datetime": combined_datetime}
    return pytest.param(level, keys, tags, options,
                        ALL[level] if expected is None else expected, id=name)


CASES = [
    # universal matching
    case("date empty is universal", STUDY, None, StudyDate=""),
    case("date star is universal", STUDY, None, StudyDate="*"),
    case("text empty is universal", STUDY, None, StudyDescription=""),
    case("text star is universal", STUDY, None, StudyDescription="*"),
    case("text stars are universal", STUDY, None, StudyDescription="***"),
    # empty value matching
    case("quotes match an empty or absent value", STUDY, {"1.7", "1.8"}, StudyDescription='""'),
    case("quotes on a normalised field", STUDY, {"1.7", "1.8"}, PatientName='""'),
    # single value and escaping
    case("patient key at study level", STUDY, {"1.1"}, PatientID="P1"),
    case("operator text is a literal patient id", STUDY, {"1.4"}, PatientID='{"$ne": null}'),
    case("operator text in a wild card", STUDY, {"1.4"}, PatientID='{"$ne"*'),
    case("dot star is literal", STUDY, {"1.2"}, StudyDescription=".*"),
    case("dot is literal in a wild card", STUDY, {"1.1"}, AccessionNumber="a.b*"),
    case("dollar", STUDY, {"1.3"}, AccessionNumber="$5"),
    case("dollar in a wild card", STUDY, {"1.3"}, StudyDescription="cost $5*"),
    case("caret", STUDY, {"1.4"}, StudyDescription="^up*"),
    case("parenthesis", STUDY, {"1.5"}, StudyDescription="(draft*"),
    case("bracket", STUDY, {"1.6"}, StudyDescription="[x]*"),
    case("backslash in text", STUDY, {"1.1"}, AdditionalPatientHistory="C:\\temp\\x"),
    case("backslash in a text wild card", STUDY, {"1.1"}, AdditionalPatientHistory="C:\\te*"),
    case("question mark is one character", STUDY, {"1.1"}, StudyDescription="CT?Head"),
    case("question mark is not two", STUDY, set(), StudyDescription="CT?"),
    case("star at the start", STUDY, {"1.5"}, StudyDescription="*report"),
    # multiple values
    case("any of several values", STUDY, {"1.1", "1.2"}, StudyDescription="CT Head\\.*"),
    case("any of several wild cards", STUDY, {"1.1", "1.5"}, StudyDescription="CT*\\(draft*"),
    case("a star among values is universal", STUDY, None, StudyDescription="CT*\\*"),
    case("any of several ids", STUDY, {"1.1", "1.3"}, AccessionNumber="a.bcd\\$5"),
    # list of UID
    case("uid list of one", STUDY, {"1.3"}, StudyInstanceUID="1.3"),
    case("uid list", STUDY, {"1.3", "1.5"}, StudyInstanceUID="1.3\\1.5\\9.9"),
    # DA range
    case("date single", STUDY, {"1.3", "1.4"}, StudyDate="20190102"),
    case("date open start", STUDY, {"1.1", "1.2", "1.3", "1.4", "1.5", "1.7"},
         StudyDate="-20191231"),
    case("date open end", STUDY, ALL[STUDY] - {"1.8"}, StudyDate="20150101-"),
    case("date closed range", STUDY, {"1.2", "1.3", "1.4"}, StudyDate="20190101-20190102"),
    case("date lone hyphen is universal", STUDY, None, StudyDate="-"),
    # TM
    case("time single", STUDY, {"1.1", "1.4"}, StudyTime="120000"),
    case("time hour names the hour", STUDY, {"1.1", "1.4", "1.6"}, StudyTime="12"),
    case("time minute names the minute", STUDY, {"1.6"}, StudyTime="1230"),
    case("time range end includes its minute", STUDY, {"1.1", "1.4"}, StudyTime="1100-1200"),
    case("time open end", STUDY, {"1.5"}, StudyTime="2359-"),
    case("time open start", STUDY, {"1.3"}, StudyTime="-0200"),
    case("time with colons", STUDY, {"1.3"}, StudyTime="01:30"),
    # combined date and time
    case("date time across midnight", STUDY, {"1.2", "1.3"},
         StudyDate="20190101-20190102", StudyTime="2200-0200"),
    case("date and time apart", STUDY, set(), combined_datetime=False,
         StudyDate="20190101-20190102", StudyTime="2200-0200"),
    case("date time open end", STUDY, {"1.5", "1.6"}, StudyDate="20191231-", StudyTime="2359-"),
    case("date time single day", STUDY, {"1.3"}, StudyDate="20190102", StudyTime="-0200"),
    case("date time with universal time", STUDY, {"1.3", "1.4"},
         StudyDate="20190102", StudyTime=""),
    # PN
    case("name wild card any case", STUDY, {"1.1", "1.2", "1.3"}, PatientName="SMITH*"),
    case("name wild card exact case", STUDY, {"1.2"}, pn_case_insensitive=False,
         PatientName="SMITH*"),
    case("name lower case any case", STUDY, {"1.1"}, PatientName="smith^john"),
    case("name lower case exact case", STUDY, set(), pn_case_insensitive=False,
         PatientName="smith^john"),
    case("name exact case", STUDY, {"1.1"}, pn_case_insensitive=False, PatientName="Smith^John"),
    case("name given name only", STUDY, {"1.1", "1.6"}, PatientName="*^JOHN"),
    case("name question mark", STUDY, {"1.2"}, PatientName="SMITH^JAN?"),
    case("name ideographic group", STUDY, {"1.4"}, PatientName="=山田^太郎"),
    case("name ideographic group exact case", STUDY, {"1.4"}, pn_case_insensitive=False,
         PatientName="=山田^太郎"),
    case("name alphabetic and ideographic", STUDY, {"1.5"}, PatientName="Yamada*=山田^花子"),
    case("name phonetic group", STUDY, {"1.4", "1.5"}, PatientName="==やまだ*"),
    case("name groups any case", STUDY, {"1.4", "1.5"}, PatientName="yamada*=山田*"),
    case("name groups exact case", STUDY, set(), pn_case_insensitive=False,
         PatientName="yamada*=山田*"),
    case("name either of two", STUDY, {"1.1", "1.6"}, PatientName="Doe^John\\Smith^John"),
    case("other name any case", STUDY, {"1.1"}, ReferringPhysicianName="doe^*"),
    case("other name exact case", STUDY, set(), pn_case_insensitive=False,
         ReferringPhysicianName="doe^*"),
    # computed keys
    case("modality in study", STUDY, {"1.2", "1.3"}, ModalitiesInStudy="MR"),
    case("any modality in study", STUDY, {"1.1", "1.4", "1.5", "1.6"}, ModalitiesInStudy="CT\\US"),
    case("modality in study wild card", STUDY, {"1.1"}, ModalitiesInStudy="S?"),
    case("counter", STUDY, {"1.1"}, NumberOfStudyRelatedSeries="2"),
    case("counter any of", STUDY, {"1.2", "1.3"}, NumberOfStudyRelatedSeries="1\\3"),
    case("counter of the patient is ignored", STUDY, None, NumberOfPatientRelatedStudies="7"),
    # sequences
    case("sequence item wild card", STUDY, {"1.1", "1.2"},
         ProcedureCodeSequence=[dataset(CodeValue="HEAD*")]),
    case("sequence keys in one item", STUDY, {"1.2"},
         ProcedureCodeSequence=[dataset(CodeValue="NECK", CodingSchemeDesignator="99X")]),
    case("sequence keys of different items", STUDY, set(),
         ProcedureCodeSequence=[dataset(CodeValue="NECK", CodingSchemeDesignator="LN")]),
    case("sequence empty item", STUDY, None, ProcedureCodeSequence=[Dataset()]),
    case("sequence item of empty keys", STUDY, None,
         ProcedureCodeSequence=[dataset(CodeValue="", CodingSchemeDesignator="")]),
    case("sequence without item", STUDY, None, ProcedureCodeSequence=[]),
    # keys that never filter
    case("private key above image level", STUDY, None, tags={0x00091010: ("LO", "x")}),
    case("optional key not supported", STUDY, None, Rows=512),
    case("control keys", STUDY, None, RetrieveAETitle="NOWHERE", InstanceAvailability="OFFLINE",
         TimezoneOffsetFromUTC="+0100"),
    case("binary key", IMAGE, None, tags={0x7FE00010: ("OB", b"\x00\x01")}),
    # SERIES level
    case("modality", SERIES, {"2.3", "2.4"}, Modality="MR"),
    case("modality list", SERIES, {"2.1", "2.2"}, Modality="CT\\SR"),
    case("modality wild card", SERIES, {"2.2", "2.3", "2.4"}, Modality="?R"),
    case("IS number", SERIES, {"2.2"}, SeriesNumber="2"),
    case("IS signed", SERIES, {"2.3"}, SeriesNumber="+3"),
    case("IS any of", SERIES, {"2.1", "2.4"}, SeriesNumber="1\\10"),
    case("series uid list", SERIES, {"2.1", "2.3"}, SeriesInstanceUID="2.1\\2.3"),
    case("study uid", SERIES, {"2.1", "2.2"}, StudyInstanceUID="1.1"),
    case("study date from the dataset", SERIES, {"2.1", "2.2"}, StudyDate="20181231"),
    case("series date time across midnight", SERIES, {"2.1", "2.2"},
         SeriesDate="20190101-20190102", SeriesTime="2300-0030"),
    case("procedure step date time", SERIES, {"2.3"},
         PerformedProcedureStepStartDate="20190102", PerformedProcedureStepStartTime="1159"),
    case("request sequence one key", SERIES, {"2.1"},
         RequestAttributesSequence=[dataset(ScheduledProcedureStepID="SPS2")]),
    case("request sequence wild card", SERIES, {"2.1", "2.2"},
         RequestAttributesSequence=[dataset(ScheduledProcedureStepID="SPS*")]),
    case("request sequence same item", SERIES, {"2.1"},
         RequestAttributesSequence=[request("SPS1", "RP1")]),
    case("request sequence different items", SERIES, set(),
         RequestAttributesSequence=[request("SPS1", "RP2")]),
    case("name in the dataset any case", SERIES, {"2.1", "2.2", "2.3"}, PatientName="smith^j*"),
    case("name in the dataset exact case", SERIES, {"2.1", "2.2"}, pn_case_insensitive=False,
         PatientName="Smith*"),
    case("name in the dataset exact value any case", SERIES, {"2.4"}, PatientName="doe^john"),
    case("counter of the series", SERIES, {"2.1"}, NumberOfSeriesRelatedInstances="2"),
    case("dot in a description", SERIES, {"2.1"}, SeriesDescription="Axial 2.5"),
    case("image attribute above image level", SERIES, None, Rows=512),
    # IMAGE level
    case("multi-valued attribute contains", IMAGE, {"3.2", "3.3"}, ImageType="LOCALIZER"),
    case("multi-valued attribute wild card", IMAGE, {"3.3"}, ImageType="DERIV*"),
    case("DS decimal text", IMAGE, {"3.1"}, SliceThickness="2.50"),
    case("DS integer text", IMAGE, {"3.2"}, SliceThickness="5"),
    case("DS any of", IMAGE, {"3.2", "3.4"}, SliceThickness="0.75\\5.0"),
    case("US", IMAGE, {"3.1"}, Rows=512),
    case("IS instance number", IMAGE, {"3.2"}, InstanceNumber="2"),
    case("sop class", IMAGE, {"3.1", "3.2"}, SOPClassUID=CT),
    case("series of the instance", IMAGE, {"3.1", "3.2"}, SeriesInstanceUID="2.1"),
    case("stored time of reduced precision", IMAGE, {"3.1"}, ContentTime="110000"),
    case("time minute in the dataset", IMAGE, {"3.1", "3.2"}, ContentTime="1100"),
    case("time open end in the dataset", IMAGE, {"3.4"}, ContentTime="23-"),
    case("content date time", IMAGE, {"3.2", "3.3"},
         ContentDate="20190101-20190102", ContentTime="110015-000100"),
    case("DT single day", IMAGE, {"3.1", "3.2"}, AcquisitionDateTime="20190101"),
    case("DT closed range", IMAGE, {"3.1", "3.2"}, AcquisitionDateTime="20190101-20190101"),
    case("DT open end", IMAGE, {"3.3"}, AcquisitionDateTime="20190102-"),
    case("DT year range", IMAGE, None, AcquisitionDateTime="2019-2019"),
    case("DT with offset", IMAGE, {"3.1"}, AcquisitionDateTime="20190101120000+0100"),
    case("private key at image level", IMAGE, {"3.1"},
         tags={0x00090010: ("LO", "ACME"), 0x00091010: ("LO", "ACME*")}),
    case("name at image level any case", IMAGE, {"3.1", "3.2"}, PatientName="SMITH^JOHN"),
    # keys that are no dataset attribute (model.identifier_key)
    case("media storage sop instance uid stands for the sop instance uid", IMAGE, {"3.2"},
         tags={0x00020003: ("UI", "3.2")}),
    case("media storage uid list", IMAGE, {"3.1", "3.4"}, tags={0x00020003: ("UI", "3.1\\3.4")}),
    case("media storage uid beside the same sop instance uid", IMAGE, {"3.2"},
         SOPInstanceUID="3.2", tags={0x00020003: ("UI", "3.2")}),
    case("media storage uid beside another sop instance uid", IMAGE, set(),
         SOPInstanceUID="3.1", tags={0x00020003: ("UI", "3.2")}),
    case("media storage sop class uid stands for the sop class uid", IMAGE, {"3.4"},
         tags={0x00020002: ("UI", MR)}),
    case("empty media storage uid is universal", IMAGE, None, tags={0x00020003: ("UI", "")}),
    case("other file meta keys never filter", IMAGE, None,
         tags={0x00020010: ("UI", "1.2.840.10008.1.2.4.50"), 0x00020016: ("AE", "NOBODY")}),
    case("group lengths never filter", STUDY, None,
         tags={0x00080000: ("UL", 7), 0x00100000: ("UL", 0), 0x00200000: ("UL", 99)}),
    case("command elements never filter", STUDY, None,
         tags={0x00000902: ("LO", "x"), 0x00001000: ("UI", "9.9")}),
]


def run(level: str, keys: dict[str, Any], tags: dict | None, options: dict[str, bool]) -> Query:
    return translate(identifier(level, keys, tags), "STUDY", **options)


@pytest.mark.parametrize(("level", "keys", "tags", "options", "expected"), CASES)
def test_query_finds(db: Any, level: str, keys: dict, tags: dict | None, options: dict,
                     expected: set[str]) -> None:
    query = run(level, keys, tags, options)
    assert query.level == level
    assert {doc["_id"] for doc in db[COLLECTION[level]].find(query.filter)} == expected


@pytest.mark.parametrize(("level", "keys", "tags", "options", "expected"), CASES)
def test_evaluate_agrees_with_mongodb(db: Any, level: str, keys: dict, tags: dict | None,
                                      options: dict, expected: set[str]) -> None:
    query = run(level, keys, tags, options)
    in_mongodb = {doc["_id"] for doc in db[COLLECTION[level]].find(query.filter)}
    assert {doc["_id"] for doc in CORPUS[level] if evaluate(query.filter, doc)} == in_mongodb


# --- the filter itself -----------------------------------------------------------

OPERATORS = {"$and", "$or", "$eq", "$in", "$gt", "$gte", "$lt", "$lte", "$regex", "$options",
             "$elemMatch", "$exists"}
TOP_LEVEL_FIELDS = {f.name for fields in NORMALISED.values() for f in fields.values()} | set(
    COUNTERS)
TAG_PATH = re.compile(
    r"(?:dataset\.)?[0-9A-F]{8}\.Value(?:\.(?:Alphabetic|Ideographic|Phonetic))?")


def assert_safe(query: dict[str, Any]) -> None:
    """Operators of the MongoDB/FerretDB subset only; field names from tags and the model;
    values only strings and numbers, regexes anchored."""
    for key, value in query.items():
        if key in ("$and", "$or"):
            assert isinstance(value, list) and value
            for part in value:
                assert_safe(part)
        else:
            assert key in TOP_LEVEL_FIELDS or TAG_PATH.fullmatch(key), key
            if isinstance(value, dict):
                assert_operators(value)
            else:
                assert isinstance(value, str | int | float), value


def assert_operators(operators: dict[str, Any]) -> None:
    for name, argument in operators.items():
        assert name in OPERATORS, name
        if name == "$elemMatch":
            assert_safe(argument)
        elif name == "$in":
            assert all(v is None or isinstance(v, str | int | float) for v in argument)
        elif name == "$regex":
            assert argument.startswith("^") and argument.endswith("$")
        elif name == "$options":
            assert argument == "i"
        elif name == "$exists":
            assert isinstance(argument, bool)
        else:
            assert isinstance(argument, str | int | float), argument


@pytest.mark.parametrize(("level", "keys", "tags", "options", "expected"), CASES)
def test_filter_uses_the_safe_subset(level: str, keys: dict, tags: dict | None, options: dict,
                                     expected: set[str]) -> None:
    assert_safe(run(level, keys, tags, options).filter)


def test_values_never_become_operators_or_field_names() -> None:
    hostile = '{"$where": "sleep(1000)"}'
    query = translate(identifier(STUDY, {"PatientID": hostile, "StudyDescription": "$ne*",
                                         "AccessionNumber": "$gt"}), "STUDY")
    assert query.filter == {"$and": [
        {"PatientID": hostile},
        {"dataset.00081030.Value": {"$regex": r"^\$ne[\s\S]*$"}},
        {"AccessionNumber": "$gt"},
    ]}


def test_normalised_fields_are_used_where_they_exist() -> None:
    query = translate(identifier(STUDY, {"StudyDate": "20190101", "PatientName": "doe^j*",
                                         "StudyDescription": "x"}), "STUDY",
                      combined_datetime=False)
    assert query.filter == {"$and": [
        {"StudyDate": "20190101"},
        {"PatientName": {"$regex": r"^DOE\^J[\s\S]*$"}},
        {"dataset.00081030.Value": "x"},
    ]}


def test_name_exact_case_uses_the_dataset() -> None:
    query = translate(identifier(PATIENT, {"PatientName": "Doe^John"}), "PATIENT",
                      pn_case_insensitive=False)
    assert query.filter == {"dataset.00100010.Value.Alphabetic": "Doe^John"}


def test_sequence_paths_are_relative_to_the_item() -> None:
    query = translate(identifier(SERIES, {"RequestAttributesSequence": [request("S*", "R1")]}),
                      "STUDY")
    assert query.filter == {"dataset.00400275.Value": {"$elemMatch": {"$and": [
        {"00400009.Value": {"$regex": r"^S[\s\S]*$"}},
        {"00401001.Value": "R1"},
    ]}}}


def matching(docs: list[dict[str, Any]], query: dict[str, Any]) -> set[str]:
    """Ids MongoDB returns for ``query`` over ``docs``, after checking evaluate() agrees."""
    collection = mongomock.MongoClient().archive.scratch
    collection.insert_many(copy.deepcopy(docs))
    found = {doc["_id"] for doc in collection.find(query)}
    assert {doc["_id"] for doc in docs if evaluate(query, doc)} == found
    return found


@pytest.mark.parametrize("keys", [
    {"StudyDate": "-20191231"},
    {"StudyDate": "-20191231", "StudyTime": "-2300"},
])
def test_empty_stored_date_is_outside_an_open_range(keys: dict[str, str]) -> None:
    # Storage writes normalise_date("") == "" for a study without a date.
    docs = [{"_id": "undated", "StudyDate": "", "dataset": {}},
            {"_id": "dated", "StudyDate": "20190101", "StudyTime": "120000.000000",
             "dataset": {}}]
    assert matching(docs, translate(identifier(STUDY, keys), "STUDY").filter) == {"dated"}


def test_no_key_no_condition() -> None:
    assert translate(identifier(STUDY, {}), "STUDY").filter == {}


# --- keys ------------------------------------------------------------------------


def test_keys_in_identifier_order() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyDate = ""
    ds.PatientName = ""
    ds.QueryRetrieveLevel = "STUDY"
    ds.add_new(0x00091010, "LO", "")
    ds.ModalitiesInStudy = ""
    ds.RetrieveAETitle = ""
    ds.PatientID = ""
    assert translate(ds, "STUDY").keys == (
        0x00080020, 0x00100010, 0x00091010, 0x00080061, 0x00080054, 0x00100020)


def test_keys_that_are_no_attribute_are_not_returned() -> None:
    """Group lengths, command and file meta elements (aliases included) are matched as
    described above but never returned: they have no place in a response dataset."""
    ds = identifier(IMAGE, {"SOPInstanceUID": "3.2"}, {
        0x00020003: ("UI", "3.2"), 0x00020010: ("UI", "1.2.840.10008.1.2"),
        0x00080000: ("UL", 30), 0x00000902: ("LO", "x")})
    assert translate(ds, "STUDY").keys == (0x00080018,)


@pytest.mark.parametrize(("tags", "comment"), [
    ({0x00020003: ("UI", "3.1")},
     "(0002,0003) is an IMAGE key, not allowed at SERIES level"),
    ({0x00020002: ("UI", CT)},
     "(0002,0002) is an IMAGE key, not allowed at SERIES level"),
])
def test_a_file_meta_alias_is_an_image_key(tags: dict, comment: str) -> None:
    error = refused(identifier(SERIES, {}, tags))
    assert error.comment == comment
    assert error.offending == (next(iter(tags)),)


def test_other_file_meta_keys_and_group_lengths_are_allowed_at_every_level() -> None:
    ds = identifier(PATIENT, {"PatientID": "P1"}, {
        0x00020010: ("UI", "1.2.840.10008.1.2"), 0x00200000: ("UL", 8)})
    query = translate(ds, "PATIENT")
    assert (query.filter, query.keys) == ({"PatientID": "P1"}, (0x00100020,))


def test_unsupported_private_key_is_listed() -> None:
    query = translate(identifier(STUDY, {}, {0x00091010: ("LO", "x")}), "STUDY")
    assert query.filter == {}
    assert query.keys == (0x00091010,)


# --- refused identifiers ---------------------------------------------------------


def refused(ds: Dataset, model: str = "STUDY", **options: bool) -> QueryError:
    with pytest.raises(QueryError) as caught:
        translate(ds, model, **options)
    error = caught.value
    assert error.status == 0xA900
    assert len(error.comment) <= 64 and error.comment.isascii()
    return error


@pytest.mark.parametrize(("model", "level", "keys", "comment"), [
    ("STUDY", STUDY, {"Modality": "CT"},
     "Modality (0008,0060) is a SERIES key, not allowed at STUDY level"),
    ("STUDY", STUDY, {"Modality": ""},
     "Modality (0008,0060) is a SERIES key, not allowed at STUDY level"),
    ("STUDY", STUDY, {"SeriesInstanceUID": "2.1"},
     "SeriesInstanceUID is a SERIES key, not allowed at STUDY level"),
    ("STUDY", SERIES, {"SOPInstanceUID": "3.1"},
     "SOPInstanceUID is an IMAGE key, not allowed at SERIES level"),
    ("STUDY", SERIES, {"InstanceNumber": ""},
     "InstanceNumber is an IMAGE key, not allowed at SERIES level"),
    ("PATIENT", PATIENT, {"StudyDate": "20190101"},
     "StudyDate is a STUDY key, not allowed at PATIENT level"),
    ("STUDY", STUDY, {"PerformedProcedureStepStartDate": ""},
     "(0040,0244) is a SERIES key, not allowed at STUDY level"),
])
def test_key_below_the_level_is_refused(model: str, level: str, keys: dict, comment: str) -> None:
    error = refused(identifier(level, keys), model)
    assert error.comment == comment
    assert len(error.offending) == 1


def test_missing_level_is_refused() -> None:
    assert "missing" in refused(dataset(PatientID="P1")).comment


def test_empty_level_is_refused() -> None:
    assert "empty" in refused(dataset(QueryRetrieveLevel="")).comment


@pytest.mark.parametrize("level", ["FOO", "study", "STUDY\\SERIES", "é" * 100])
def test_invalid_level_is_refused(level: str) -> None:
    refused(dataset(QueryRetrieveLevel=level))


def test_study_root_has_no_patient_level() -> None:
    error = refused(identifier(PATIENT, {"PatientID": "P1"}), "STUDY")
    assert error.comment == "QueryRetrieveLevel PATIENT is not a level of Study Root"


def test_patient_root_patient_level() -> None:
    query = translate(identifier(PATIENT, {"PatientID": "P1"}), "PATIENT")
    assert (query.level, query.filter) == (PATIENT, {"PatientID": "P1"})


def raw(ds: Dataset, tag: int, vr: str, value: bytes) -> Dataset:
    """An element as received, not checked by pydicom's setters."""
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    return ds


@pytest.mark.parametrize(("level", "tag", "vr", "value"), [
    (SERIES, 0x00200011, "IS", b"abc "),
    (SERIES, 0x00200011, "IS", b"1-5 "),
    (SERIES, 0x00200011, "IS", b"2.5 "),
    (IMAGE, 0x00180050, "DS", b"nan "),
    (STUDY, 0x00080020, "DA", b"2019*   "),
    (STUDY, 0x00080030, "TM", b"noon"),
    (STUDY, 0x00080020, "DA", b"2019-2020 "),
])
def test_value_not_of_its_vr_is_refused(level: str, tag: int, vr: str, value: bytes) -> None:
    error = refused(raw(identifier(level, {}), tag, vr, value))
    assert "invalid" in error.comment
    assert error.offending == (tag,)


def test_sequence_key_with_two_items_is_refused() -> None:
    ds = identifier(STUDY, {"ProcedureCodeSequence": [code("A", "LN"), code("B", "LN")]})
    assert refused(ds).comment == "ProcedureCodeSequence (0008,1032) must have one item"


def test_unknown_model_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        translate(identifier(STUDY, {}), "WORKLIST")


# --- matching types ----------------------------------------------------------------


@pytest.mark.parametrize(("vr", "values", "matching"), [
    ("LO", (), UNIVERSAL),
    ("LO", ("*",), UNIVERSAL),
    ("DA", ("*",), UNIVERSAL),
    ("OB", ("x",), UNIVERSAL),
    ("LO", ('""',), EMPTY),
    ("LO", ("CT",), SINGLE),
    ("UI", ("1.2*",), SINGLE),
    ("DA", ("2019*",), SINGLE),
    ("DT", ("20190101120000-0500",), SINGLE),
    ("LO", ("C*",), WILDCARD),
    ("PN", ("SM?TH",), WILDCARD),
    ("UI", ("1.2", "1.3"), UID_LIST),
    ("CS", ("CT", "MR"), MULTIPLE),
    ("DA", ("20190101-",), RANGE),
    ("TM", ("-1100",), RANGE),
    ("DT", ("20190101-20190102",), RANGE),
    ("DT", ("2019-2020",), RANGE),
    ("SQ", (), SEQUENCE),
])
def test_classify(vr: str, values: tuple[str, ...], matching: str) -> None:
    assert classify(vr, values) == matching
    assert matching in MATCHING


# --- pattern_filter and evaluate for the access-control rules -----------------------


def test_pattern_filter_checks_an_instance_before_it_is_stored() -> None:
    rule = pattern_filter(dataset(PatientID="P*", Modality="CT"), IMAGE)
    incoming = document(IMAGE, instance("9.9", "9.8", CT, PatientID="P9", Modality="CT"))
    refused_one = document(IMAGE, instance("9.7", "9.8", CT, PatientID="Q9", Modality="CT"))
    assert evaluate(rule, incoming)
    assert not evaluate(rule, refused_one)


def test_pattern_filter_keys_the_level_lacks_deny(db: Any) -> None:
    rule = pattern_filter(dataset(Modality="CT"), STUDY)
    assert list(db[COLLECTION[STUDY]].find(rule)) == []
    assert not any(evaluate(rule, doc) for doc in STUDIES)


def test_pattern_filter_ignores_level_and_control_keys() -> None:
    rule = pattern_filter(dataset(QueryRetrieveLevel="IMAGE", RetrieveAETitle="X",
                                  SpecificCharacterSet="ISO_IR 192"), STUDY)
    assert rule == {}


EVALUATED = [
    {"_id": 1, "a": {"Value": ["x", "y"]}},
    {"_id": 2, "a": {"Value": [{"Alphabetic": "S^J"}, {"Alphabetic": "D^J"}]}},
    {"_id": 3},
    {"_id": 4, "a": {"Value": [5]}, "n": None},
    {"_id": 5, "a": {"Value": []}},
    {"_id": 6, "a": {"Value": [{"b": {"Value": ["1"]}, "c": {"Value": ["4"]}}]}},
]


@pytest.mark.parametrize("query", [
    {"a.Value": "y"},
    {"a.Value": {"$eq": "x"}},
    {"a.Value": {"$in": ["x", "z"]}},
    {"a.Value": {"$in": [None, ""]}},
    {"a.Value": {"$exists": False}},
    {"a.Value": {"$exists": True}},
    {"a.Value.Alphabetic": {"$regex": "^s", "$options": "i"}},
    {"a.Value.Alphabetic": "D^J"},
    {"a.Value": {"$gte": 3}},
    {"a.Value": {"$gte": "a"}},
    {"a.Value": {"$gt": 4, "$lt": 6}},
    {"missing": {"$regex": "^"}},
    {"missing": {"$lte": "z"}},
    {"missing": "x"},
    {"n": None},
    {"$or": [{"a.Value": 5}, {"a.Value": "x"}]},
    {"$and": [{"a.Value": 5}, {"a.Value": "x"}]},
    {"a.Value": {"$elemMatch": {"Alphabetic": "S^J"}}},
    {"a.Value": {"$elemMatch": {"$and": [{"b.Value": "1"}, {"c.Value": "4"}]}}},
    {"a.Value": {"$elemMatch": {"$and": [{"b.Value": "1"}, {"c.Value": "5"}]}}},
    {"a.Value.b.Value": "1"},
])
def test_evaluate_operator_semantics(db: Any, query: dict[str, Any]) -> None:
    collection = db["evaluated"]
    if collection.count_documents({}) == 0:
        collection.insert_many(copy.deepcopy(EVALUATED))
    expected = {doc["_id"] for doc in collection.find(query)}
    assert {doc["_id"] for doc in EVALUATED if evaluate(query, doc)} == expected


@pytest.mark.parametrize("query", [
    {"a": {"$ne": 1}},
    {"$where": "true"},
    {"$expr": {"$eq": ["$a", 1]}},
    {"a": {"$options": "i"}},
])
def test_evaluate_refuses_operators_outside_the_subset(query: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        evaluate(query, {"a": 1})


@pytest.mark.parametrize(("keyword", "value"), [
    ("SeriesNumber", "99999999999999999999"),   # IS beyond 64 bits
    ("SeriesNumber", "2147483648"),             # IS beyond its 32-bit range
    ("InstanceNumber", "-2147483649"),
    ("SliceThickness", "1e400"),                # DS beyond a double
])
def test_numbers_a_vr_cannot_hold_are_refused_not_sent_to_the_database(
        keyword: str, value: str) -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    setattr(ds, keyword, value)
    with pytest.raises(QueryError) as refused:
        translate(ds, "STUDY")
    assert refused.value.status == 0xA900
    assert keyword in refused.value.comment

"""Metadata queries' pure parts (archive.metadata_query): keys as C-FIND keys on any
attribute, counts of distinct entities per group, restriction first, CSV."""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from archive import dicomjson, matching
from archive.levels import level_dataset, normalised_fields
from archive.metadata_query import (
    BINARY,
    ENTITY_FIELD,
    INSTANCES_COUNTER,
    LEVELS,
    MetadataQueryError,
    count,
    csv_text,
    key_name,
    parse,
    parse_key,
    table_text,
    value_text,
)
from archive.model import IMAGE, NORMALISED, SERIES, STORED_KEYS, stored_tags
from archive.query import evaluate
from archive.web.console.metadata import csv_filename, parse_form

PRIVATE_TEXT, PRIVATE_NUMBER = 0x0019100C, 0x00191010

MODALITIES = st.sampled_from(["MR", "CT", "US"])
DESCRIPTIONS = st.sampled_from(["", "localizer", "t1 axial", "T1 AXIAL", "=1+1"])


@st.composite
def instance(draw: Any) -> dict[str, Any]:
    """An instance document as stored: top-level keys and DICOM JSON of the dataset."""
    patient = draw(st.sampled_from(["P1", "P2", "P3"]))
    study = f"1.2.{patient[1]}.{draw(st.integers(1, 2))}"
    series = f"{study}.{draw(st.integers(1, 3))}"
    ds = Dataset()
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient, study, series
    ds.SOPInstanceUID = f"{series}.{draw(st.integers(1, 10_000))}"
    ds.Modality = draw(MODALITIES)
    description = draw(DESCRIPTIONS)
    if description:
        ds.SeriesDescription = description
    ds.add_new(0x00190010, "LO", "ACME")
    ds.add_new(PRIVATE_TEXT, "LO", draw(st.sampled_from(["FAST", "SLOW"])))
    ds.add_new(PRIVATE_NUMBER, "IS", draw(st.sampled_from([0, 500, 1000])))
    return {"_id": ds.SOPInstanceUID, "PatientID": patient, "StudyInstanceUID": study,
            "SeriesInstanceUID": series, "dataset": dicomjson.to_json(ds, None)}


def unique(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list({d["_id"]: d for d in docs}.values())


documents = st.lists(instance(), max_size=25).map(unique)
#: The normalised fields of instance documents (UIDs, Patient ID, SOP Class).
TOP_LEVEL = {f.name for f in NORMALISED[IMAGE].values()}
ENTITY = {"patients": "PatientID", "studies": "StudyInstanceUID",
          "series": "SeriesInstanceUID", "instances": "_id"}


def text(doc: dict[str, Any], tag: int) -> str:
    return value_text(doc["dataset"].get(f"{tag:08X}"))


@settings(max_examples=150, deadline=None)
@given(docs=documents, level=st.sampled_from(list(LEVELS)), modality=MODALITIES,
       private=st.sampled_from(["1000", "500", "0"]),
       by=st.sampled_from([(), ("SeriesDescription",), ("Modality", "0019,100C")]))
def test_counts_are_the_distinct_entities_of_each_group(
        docs: list[dict[str, Any]], level: str, modality: str, private: str,
        by: tuple[str, ...]) -> None:
    """Series per description for Modality=MR and a private number: each entity with a
    matching instance counted once per group its matching instances have."""
    result = count(parse(level, [f"Modality={modality}", f"00191010={private}"], by), docs)
    tags = [parse_key(k) for k in by]
    matching_docs = [d for d in docs if text(d, 0x00080060) == modality
                     and text(d, PRIVATE_NUMBER) == private]
    expected: dict[tuple[str, ...], set[str]] = {}
    for doc in matching_docs:
        expected.setdefault(tuple(text(doc, t) for t in tags), set()).add(doc[ENTITY[level]])
    assert dict(result.rows) == {k: len(v) for k, v in expected.items()}
    assert result.total == len({d[ENTITY[level]] for d in matching_docs})
    assert result.instances == len(matching_docs)
    assert [n for _, n in result.rows] == sorted((n for _, n in result.rows), reverse=True)


def level_documents(docs: list[dict[str, Any]], level: str) -> list[dict[str, Any]]:
    """The documents of ``level`` the archive keeps for these instances: each entity's
    attributes those of its last instance (model.stored_tags), its instance counter."""
    latest: dict[str, dict[str, Any]] = {}
    instances: Counter[str] = Counter()
    for doc in docs:
        latest[doc[ENTITY_FIELD[level]]] = doc["dataset"]
        instances[doc[ENTITY_FIELD[level]]] += 1
    return [{"_id": uid, **normalised_fields(level, data),
             "dataset": level_dataset(level, data), INSTANCES_COUNTER[level]: instances[uid]}
            for uid, data in latest.items()]


def uniform(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The documents with each series' patient, study and series attributes those of
    its first instance (no mixed entity)."""
    first: dict[str, dict[str, Any]] = {}
    result = []
    for doc in docs:
        shared = first.setdefault(doc["SeriesInstanceUID"], level_dataset(SERIES,
                                                                           doc["dataset"]))
        own = {k: v for k, v in doc["dataset"].items() if k not in STORED_KEYS[SERIES]}
        result.append({**doc, "dataset": {**own, **shared}})
    return result


@settings(max_examples=150, deadline=None)
@given(docs=documents.map(uniform), level=st.sampled_from(["patients", "studies", "series"]),
       keys=st.sampled_from([[], ["PatientID=P1"], ["PatientID=P*\\P2"], ["Modality=MR"],
                             ["SeriesDescription=*AXIAL*"], ['SeriesDescription=""']]),
       by=st.sampled_from([(), ("PatientID",), ("SeriesDescription", "Modality")]))
def test_level_documents_count_what_the_instances_count(
        docs: list[dict[str, Any]], level: str, keys: list[str], by: tuple[str, ...]) -> None:
    """Where no entity is mixed, the fast path over level documents answers as the
    instances do: each level's own documents, or the series' for a series attribute
    (studies per Modality)."""
    query = parse(level, keys, by)
    used = {t for t, _ in query.keys} | set(query.group_by)
    assert query.source == (LEVELS[level] if used <= stored_tags(LEVELS[level]) else SERIES)
    assert count(query, level_documents(docs, query.source), None, query.source) == \
        count(query, docs)


@settings(max_examples=100, deadline=None)
@given(docs=documents, hidden=documents, pattern=st.sampled_from(["P1", "P*", "P[12]"]),
       level=st.sampled_from(list(LEVELS)))
def test_a_restricted_count_is_the_count_of_an_archive_of_what_she_may_see(
        docs: list[dict[str, Any]], hidden: list[dict[str, Any]], pattern: str,
        level: str) -> None:
    restriction = {"PatientID": {"$regex": matching.regex(pattern)}}
    visible = [d for d in docs if evaluate(restriction, d)]
    invisible = [d for d in hidden if not evaluate(restriction, d)
                 and d["_id"] not in {v["_id"] for v in visible}]
    query = parse(level, ["SeriesDescription=*"], ["SeriesDescription"])
    assert count(query, visible + invisible, restriction) == count(query, visible)


def test_the_restriction_is_decided_before_the_keys() -> None:
    """A hidden document is never matched against the user's keys."""
    seen: list[str] = []

    class Spy(dict):  # type: ignore[type-arg]
        def get(self, key: str, default: Any = None) -> Any:
            seen.append(self["_id"])
            return super().get(key, default)

    docs = [Spy(_id="hidden", PatientID="BOB"), Spy(_id="mine", PatientID="ALICE")]
    query = parse("instances", ["PatientID=*"], ["Modality"])
    result = count(query, docs, {"PatientID": "ALICE"})
    assert result.total == 1 and "hidden" not in seen


@settings(max_examples=300, deadline=None)
@given(value=st.text(min_size=1, max_size=40), key=st.sampled_from(
    ["PatientName", "SeriesDescription", "Modality", "0019,100C", "StudyDate",
     "InstanceNumber", "SliceThickness", "PatientID"]))
def test_values_are_data(value: str, key: str) -> None:
    """Whatever is typed, the filter holds it only as a value: field names are tags,
    operators the translation's own, every regex an escaped wild card."""
    try:
        query = parse("series", [f"{key}={value}"])
    except MetadataQueryError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    operators = {"$and", "$or", "$in", "$regex", "$options", "$exists", "$gt", "$gte",
                 "$lt", "$lte", "$eq"}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for name, inner in node.items():
                assert name in operators or name in TOP_LEVEL or re.fullmatch(
                    r"dataset\.[0-9A-F]{8}\.Value(\.(Alphabetic|Ideographic|Phonetic))?",
                    name), name
                if name == "$regex":
                    matching.from_regex(inner)  # raises for anything else
                walk(inner)
        elif isinstance(node, list):
            for item in node:
                walk(item)
    walk(query.filter)
    evaluate(query.filter, {"dataset": {}})  # decidable locally


@pytest.mark.parametrize("text,tag", [
    ("SeriesDescription", 0x0008103E), ("0008,103E", 0x0008103E), ("0008103e", 0x0008103E),
    ("(0019,100C)", 0x0019100C), ("0019100C", 0x0019100C), ("0019,100c", 0x0019100C),
])
def test_keys_are_keywords_or_tags_private_ones_too(text: str, tag: int) -> None:
    assert parse_key(text) == tag


@pytest.mark.parametrize("item,message", [
    ("Modalty=MR", "neither a DICOM keyword nor a tag"),
    ("0008,9999=1", "not in the DICOM dictionary"),
    ("Modality", "expected KEY=VALUE"),
    ("Modality=", "has no value"),
    ("NumberOfSeriesRelatedInstances=3", "computed by the archive"),
    ("QueryRetrieveLevel=SERIES", "not an attribute"),
    ("PixelData=1", "binary"),
    ("StudyDate=20241341", "StudyDate"),
    ("InstanceNumber=1*", "is IS"),
    ("ReferencedImageSequence=1", "sequence"),
])
def test_keys_that_cannot_match_are_refused_by_name(item: str, message: str) -> None:
    with pytest.raises(MetadataQueryError, match=message):
        parse("series", [item])


def test_level_and_group_by_are_checked() -> None:
    with pytest.raises(MetadataQueryError, match="level"):
        parse("things", [])
    with pytest.raises(MetadataQueryError, match="twice"):
        parse("series", [], ["Modality", "00080060"])
    with pytest.raises(MetadataQueryError, match="at most"):
        parse("series", [], ["Modality", "StationName", "PatientSex", "PatientAge"])


def test_private_keys_match_text_or_number_as_stored() -> None:
    docs = [{"_id": str(n), "dataset": {"00191010": element}}
            for n, element in enumerate([{"vr": "IS", "Value": [1000]},
                                         {"vr": "LO", "Value": ["1000"]},
                                         {"vr": "DS", "Value": [1000.0]},
                                         {"vr": "LO", "Value": ["1000.0"]}])]
    assert count(parse("instances", ["0019,1010=1000"]), docs).total == 3
    assert count(parse("instances", ["0019,1010=10*"]), docs).total == 2  # the texts


def test_values_as_text() -> None:
    assert value_text(None) == ""
    assert value_text({"vr": "CS", "Value": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}) == \
        "ORIGINAL\\PRIMARY\\LOCALIZER"
    assert value_text({"vr": "PN", "Value": [{"Alphabetic": "DOE^J", "Phonetic": "do"}]}) \
        == "DOE^J==do"
    assert value_text({"vr": "DS", "Value": [2.0, 0.5]}) == "2\\0.5"
    assert value_text({"vr": "UN", "InlineBinary": "RkFTVCA="}) == "FAST"  # "FAST "
    assert value_text({"vr": "UN", "InlineBinary": "AAEC"}) == BINARY
    assert value_text({"vr": "SQ", "Value": [{}]}) == "(sequence)"


@settings(max_examples=60, deadline=None)
@given(docs=documents)
def test_csv_holds_the_counts(docs: list[dict[str, Any]]) -> None:
    result = count(parse("series", [], ["SeriesDescription", "0019100C"]), docs)
    rows = list(csv.reader(io.StringIO(csv_text(result))))
    assert rows[0] == ["SeriesDescription", key_name(PRIVATE_TEXT), "series"]
    unquoted = [(tuple(v[1:] if v.startswith("'=") else v for v in row[:-1]), int(row[-1]))
                for row in rows[1:]]
    assert unquoted == result.rows
    assert all(not row[0].startswith("=") for row in rows[1:])  # no formula
    assert table_text(result).splitlines()[-1].startswith(f"{result.total} series in all")


@pytest.mark.parametrize("group,expected", [
    ("SeriesDescription", ["SeriesDescription"]),
    ("Modality, SeriesDescription", ["Modality", "SeriesDescription"]),
    ("0019,100C StationName", ["(0019,100C)", "StationName"]),
    ("(0019, 100C),0008103E", ["(0019,100C)", "SeriesDescription"]),
])
def test_the_form_keeps_tags_whole_among_the_keys_to_group_by(group: str,
                                                              expected: list[str]) -> None:
    query = parse_form({"level": "series", "group": group, "keys": "Modality=MR\n\n"})
    assert [key_name(t) for t in query.group_by] == expected
    assert csv_filename(query) == "series-by-" + "-by-".join(
        re.sub(r"[^0-9A-Za-z]", "", name) for name in expected) + ".csv"

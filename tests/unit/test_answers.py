"""C-FIND answers built from DICOM JSON bytes first (archive.answers, Finder._fast_response)
against the reference path through pydicom (Finder.reference_response): the same bytes
on the wire for every document, key set, character set and transfer syntax."""

from __future__ import annotations

import io
import warnings
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom.dsutils import decode, encode

from archive import answers
from archive.dimse import answer_writer
from archive.find import Finder, answer_plan
from archive.query import Query

SYNTAXES = [(True, True), (False, True), (False, False)]

#: Stored keys by VR: (tag, VR) of the attributes the documents hold.
STORED = {
    "PN": [0x00100010, 0x00080090, 0x00081060],
    "LO": [0x00100020, 0x00081030],
    "SH": [0x00080050, 0x00200010],
    "DA": [0x00080020, 0x00100030],
    "TM": [0x00080030],
    "DT": [0x0008002A],
    "CS": [0x00100040, 0x00080060],
    "AS": [0x00101010],
    "UI": [0x0020000D, 0x00080016],
    "IS": [0x00200011],
    "DS": [0x00101030],
    "LT": [0x00104000],
    "ST": [0x00081040],
    "UT": [0x00180015],
    "UC": [0x00189947],
    "AE": [0x00080055],
    "UR": [0x00080120],
}
SEQUENCE = 0x00081032  # Procedure Code Sequence: (0008,0100) SH, (0008,0104) LO
COMPUTED = [0x00201208, 0x00201206, 0x00080061, 0x00080062]
CONTROL = [0x00080054, 0x00080056]
CHARSETS: list[Any] = [None, "", "ISO_IR 100", "ISO_IR 192", "ISO_IR 144", "ISO_IR 6",
                       "GB18030", ["", "ISO 2022 IR 100"], ["ISO 2022 IR 6", "ISO 2022 IR 87"]]

#: Awkward text: ASCII, Latin-1, Cyrillic, Polish, Korean, PN delimiters, padding.
_CHARS = st.sampled_from(list("AZaz09 ^=.-_") + ["é", "ü", "Ł", "Ж", "김", "山", "\t"])
text = st.text(_CHARS, max_size=12)


def _value(vr: str) -> st.SearchStrategy[Any]:
    if vr == "PN":
        groups = st.dictionaries(st.sampled_from(["Alphabetic", "Ideographic", "Phonetic"]),
                                 text, max_size=3)
        return st.one_of(groups, st.none(), text)
    if vr == "IS":
        return st.one_of(st.integers(-2**31, 2**31 - 1), st.none(), st.just(1.0))
    if vr == "DS":
        return st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.none())
    if vr == "UI":
        return st.one_of(st.from_regex(r"[0-9.]{0,20}", fullmatch=True),
                         st.just(" 1.2.3 "), st.just("1.2\\3"), st.none())
    if vr in ("DA", "TM", "DT"):
        return st.one_of(st.from_regex(r"[0-9.\-]{0,17}", fullmatch=True), st.none())
    return st.one_of(text, st.none())


def _element(vr: str) -> st.SearchStrategy[dict[str, Any]]:
    values = st.lists(_value(vr), max_size=3)
    return st.one_of(
        st.builds(lambda v: {"vr": vr, "Value": v}, values),
        st.just({"vr": vr}),
        st.just({"vr": vr, "InlineBinary": "QUJD"}),
        st.just({"vr": "UN", "InlineBinary": "QUJD"}),
    )


_sequence = st.builds(
    lambda items: {"vr": "SQ", "Value": items},
    st.lists(st.fixed_dictionaries({}, optional={
        "00080100": st.builds(lambda v: {"vr": "SH", "Value": [v]}, text),
        "00080104": st.builds(lambda v: {"vr": "LO", "Value": [v]}, text)}), max_size=2))


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    stored: dict[str, Any] = {}
    for vr, tags in STORED.items():
        for tag in tags:
            if draw(st.booleans()):
                stored[f"{tag:08X}"] = draw(_element(vr))
    if draw(st.booleans()):
        stored[f"{SEQUENCE:08X}"] = draw(_sequence)
    counters = {
        "NumberOfStudyRelatedInstances": draw(st.one_of(st.none(), st.integers(0, 10**6))),
        "NumberOfStudyRelatedSeries": draw(st.one_of(st.none(), st.integers(0, 100))),
        "ModalitiesInStudy": draw(st.lists(st.sampled_from(["CT", "MR", ""]), max_size=3)),
        "SOPClassesInStudy": draw(st.lists(st.sampled_from(["1.2.840.10008.5.1.4.1.1.2",
                                                            ""]), max_size=2)),
    }
    return {"_id": "1.2.3", "dataset": stored,
            **{k: v for k, v in counters.items() if v is not None}}


@st.composite
def identifiers(draw: st.DrawFn) -> Dataset:
    """An identifier as the node decodes it from the network (implicit VR)."""
    tags = [t for tags in STORED.values() for t in tags] + COMPUTED + CONTROL
    chosen = draw(st.lists(st.sampled_from(tags), unique=True, min_size=1, max_size=12))
    ds = Dataset()
    charset = draw(st.sampled_from(CHARSETS))
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = "STUDY"
    for tag in chosen:
        ds.add_new(tag, _dictionary_vr(tag), None)
    if draw(st.booleans()):
        item = Dataset()
        item.CodeValue = None
        ds.ProcedureCodeSequence = Sequence([item])
    return decode(io.BytesIO(encode(ds, True, True)), True, True)


def _dictionary_vr(tag: int) -> str:
    from pydicom.datadict import dictionary_VR
    return dictionary_VR(tag)


def _keys(identifier: Dataset) -> tuple[int, ...]:
    return tuple(int(e.tag) for e in identifier if e.tag not in (0x00080005, 0x00080052))


def _both(doc: dict[str, Any], identifier: Dataset,
          syntax: answers.Syntax) -> tuple[bytes | None, bytes | None, Dataset]:
    finder = Finder(db=None, ae_title="ARCHIVE")  # type: ignore[arg-type]
    query = Query("STUDY", {}, _keys(identifier))
    plan = answer_plan(query, identifier, syntax)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's validation warnings, both paths
        fast_bytes = encode(finder.response(doc, query, identifier, None, plan), *syntax)
        reference = finder.reference_response(doc, query, identifier, None,
                                              plan.requested_charset)
        reference_bytes = encode(reference, *syntax)
        # pydicom's writer converts the raw Specific Character Set it reads: a new one
        fresh = finder.response(doc, query, identifier, None, plan)
    return fast_bytes, reference_bytes, fresh


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents(), identifiers(), st.sampled_from(SYNTAXES))
def test_fast_answer_is_the_reference_answer(doc: dict[str, Any], identifier: Dataset,
                                              syntax: answers.Syntax) -> None:
    """Byte for byte, whatever the values (non-ASCII in every character set, PN groups,
    empty and absent values, nulls, several values, binary forms, sequences), the keys
    (computed, control, sequence) and the transfer syntax; a reference answer pydicom
    cannot encode (None) cannot be encoded the fast way either."""
    fast, reference, _ = _both(doc, identifier, syntax)
    assert fast == reference


def _benchmark_identifier(charset: str | None) -> Dataset:
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate",
                    "StudyTime", "StudyDescription", "AccessionNumber", "ModalitiesInStudy",
                    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"):
        setattr(ds, keyword, "")
    return decode(io.BytesIO(encode(ds, True, True)), True, True)


STUDY_DOCUMENT = {
    "_id": "1.2.826.0.1.3680043.8.498.1",
    "NumberOfStudyRelatedInstances": 84, "NumberOfStudyRelatedSeries": 3,
    "ModalitiesInStudy": ["CT", "MR"],
    "dataset": {
        "00080020": {"vr": "DA", "Value": ["20160928"]},
        "00080030": {"vr": "TM", "Value": ["100802.315042"]},
        "00080050": {"vr": "SH", "Value": ["A2016168495"]},
        "00081030": {"vr": "LO", "Value": ["IRM cérébrale"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Łukasiewicz^Zofia"}]},
        "00100020": {"vr": "LO", "Value": ["71479480"]},
        "0020000D": {"vr": "UI", "Value": ["1.2.826.0.1.3680043.8.498.1"]},
    },
}


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("charset", [None, "ISO_IR 100", "ISO_IR 192"])
def test_benchmark_answers_take_the_fast_path(charset: str | None,
                                              syntax: answers.Syntax) -> None:
    """The benchmark's study answers are built from bytes, not through pydicom's
    JSON reader, and are still the reference answer (Łukasiewicz in UTF-8 whatever
    was asked, as before)."""
    fast, reference, ds = _both(STUDY_DOCUMENT, _benchmark_identifier(charset), syntax)
    assert fast == reference
    raw = [tag for tag, elem in ds._dict.items() if isinstance(elem, RawDataElement)]
    assert len(raw) == 12  # every requested key, the level and the character set
    assert answer_writer.encode_answer(ds, *syntax) == reference
    assert ds.SpecificCharacterSet == "ISO_IR 192"


def test_no_syntax_means_the_reference_path() -> None:
    """Without a transfer syntax (a private one), answers are built the plain way."""
    identifier = _benchmark_identifier("ISO_IR 192")
    plan = answer_plan(Query("STUDY", {}, _keys(identifier)), identifier, None)
    assert not plan.fast


@pytest.mark.parametrize(("vr", "element", "values"), [
    ("PN", {"vr": "PN", "Value": [{"Alphabetic": "A^B", "Ideographic": ""}]}, ["A^B="]),
    ("PN", {"vr": "PN", "Value": [{"Phonetic": "p"}]}, ["==p"]),
    ("PN", {"vr": "PN"}, []),
    ("UI", {"vr": "UI", "Value": [" 1.2 "]}, ["1.2"]),
    ("IS", {"vr": "IS", "Value": [3, -4]}, ["3", "-4"]),
    ("IS", {"vr": "IS", "Value": [3.0]}, None),
    ("LO", {"vr": "LO", "Value": ["a", None]}, None),
    ("DS", {"vr": "DS", "Value": [1.5]}, None),
    ("OB", {"vr": "OB", "InlineBinary": "AA=="}, None),
    ("LO", {"vr": "LO", "BulkDataURI": "x"}, None),
])
def test_plain_values(vr: str, element: dict[str, Any], values: list[str] | None) -> None:
    """The forms encoded here, as pydicom holds them; the others left to pydicom."""
    assert answers.plain_values(vr, element) == values


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents(), identifiers(), st.sampled_from(SYNTAXES))
def test_answer_writer_writes_what_pydicom_writes(doc: dict[str, Any], identifier: Dataset,
                                                   syntax: answers.Syntax) -> None:
    """encode_answer gives pydicom's bytes for every answer it writes, declines the
    others (elements built by pydicom, another syntax), and pynetdicom's C-FIND path
    uses it once installed."""
    from pynetdicom import service_class

    fast, reference, ds = _both(doc, identifier, syntax)
    written = answer_writer.encode_answer(ds, *syntax)
    if written is not None:
        assert written == reference
    all_raw = all(isinstance(e, RawDataElement) for e in ds._dict.values())
    assert (written is not None) == (isinstance(ds, answers.Answer) and all_raw)
    other = next(s for s in SYNTAXES if s != syntax)
    assert answer_writer.encode_answer(ds, *other) is None
    answer_writer.install()
    assert service_class.encode(ds, *syntax) == reference

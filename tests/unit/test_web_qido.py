"""QIDO-RS parameters turned into C-FIND identifiers (archive.web.qido), the Accept
negotiation and the Basic credentials of archive.web: pure pieces, no server."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.datadict import tag_for_keyword

from acl.auth import NoneAuthenticator
from archive.model import IMAGE, SERIES, STUDY
from archive.query import QueryError, translate
from archive.web import negotiation, qido
from archive.web.auth import HttpAuthenticator, Unauthenticated, parse_basic


def keys(found: qido.Search) -> set[str]:
    return {elem.keyword or f"{elem.tag:08X}" for elem in found.identifier}


@pytest.mark.parametrize("level", [STUDY, SERIES, IMAGE])
@pytest.mark.parametrize("include", [[], [("includefield", "all")]])
def test_defaults_and_all_are_valid_c_find_identifiers(level: str,
                                                       include: list[tuple[str, str]]) -> None:
    found = qido.search(level, include, {})
    query = translate(found.identifier, "STUDY")
    assert query.level == level
    assert query.filter == {}  # return keys only
    expected = {k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")[
        : (STUDY, SERIES, IMAGE).index(level) + 1]}
    assert expected <= keys(found)
    assert "RetrieveURL" not in keys(found)  # computed by the web layer


def test_matching_keys_are_c_find_keys() -> None:
    found = qido.search(SERIES, [("PatientName", "doe^*"), ("00080060", "CT\\MR"),
                                 ("StudyDate", "20240101-"),
                                 ("SeriesInstanceUID", "1.2.3,1.2.4"),
                                 ("RequestAttributesSequence.RequestedProcedureID", "RP1")],
                        {"StudyInstanceUID": "1.2.9"})
    ds = found.identifier
    assert ds.PatientName == "doe^*"
    assert list(ds.Modality) == ["CT", "MR"]
    assert ds.StudyDate == "20240101-"
    assert list(ds.SeriesInstanceUID) == ["1.2.3", "1.2.4"]
    assert ds.StudyInstanceUID == "1.2.9"
    assert ds.RequestAttributesSequence[0].RequestedProcedureID == "RP1"
    query = translate(ds, "STUDY")
    assert query.level == SERIES and query.filter


def test_binary_numbers_are_numbers() -> None:
    found = qido.search(IMAGE, [("Rows", "512"), ("00280011", "256\\512")], {})
    assert found.identifier.Rows == 512 and list(found.identifier.Columns) == [256, 512]
    assert translate(found.identifier, "STUDY").filter
    with pytest.raises(qido.BadQuery, match="is not a number"):
        qido.search(IMAGE, [("Rows", "many")], {})


def test_includefield_forms() -> None:
    found = qido.search(STUDY, [("includefield", "StudyDescription,00081030"),
                                ("includefield", "PatientAge")], {})
    assert {"StudyDescription", "PatientAge"} <= keys(found)
    assert found.identifier.StudyDescription in (None, "")


def test_includefield_of_a_lower_level_is_left_out_but_a_matching_key_is_refused() -> None:
    """OHIF 3.13 asks for Modality (a SERIES attribute) in every study search: the
    search is answered without it, as a C-FIND would refuse only its matching."""
    found = qido.search(STUDY, [("includefield", "00081030,00080060,00080090,00100030")], {})
    assert "Modality" not in keys(found)
    assert {"StudyDescription", "ReferringPhysicianName", "PatientBirthDate"} <= keys(found)
    translate(found.identifier, "STUDY")  # a valid C-FIND identifier
    matching = qido.search(STUDY, [("Modality", "CT")], {})
    with pytest.raises(QueryError, match="SERIES key"):
        translate(matching.identifier, "STUDY")


@pytest.mark.parametrize("params,message", [
    ([("limit", "-1")], "limit: expected a non-negative integer"),
    ([("limit", "1.5")], "limit"),
    ([("offset", "")], "offset"),
    ([("Foo", "1")], "unknown attribute 'Foo'"),
    ([("PatientID", "a"), ("00100020", "b")], "more than once"),
    ([("fuzzymatching", "yes")], "fuzzymatching"),
    ([("PatientID.Foo", "x")], "unknown attribute"),
    ([("PatientID.PatientName", "x")], "is no sequence"),
    ([("RequestAttributesSequence", "x")], "through its items"),
    ([("x", "1")] * 201, "more than 200"),
])
def test_refusals(params: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(qido.BadQuery, match=message):
        qido.search(STUDY, params, {})


def test_path_key_given_again_is_refused() -> None:
    with pytest.raises(qido.BadQuery, match="more than once"):
        qido.search(SERIES, [("StudyInstanceUID", "1.2")], {"StudyInstanceUID": "1.2"})


def test_limit_is_clamped_and_fuzzy_accepted() -> None:
    found = qido.search(STUDY, [("limit", "999999999999"), ("offset", "3"),
                                ("fuzzymatching", "true")], {}, max_results=50)
    assert (found.limit, found.offset, found.fuzzy) == (50, 3, True)
    assert qido.search(STUDY, [], {}, max_results=50).limit == 50


def test_c_find_refusals_stay_c_find_refusals() -> None:
    for params in ([("SOPInstanceUID", "1.2")], [("StudyDate", "20241301")]):
        found = qido.search(STUDY, params, {})
        with pytest.raises(QueryError):
            translate(found.identifier, "STUDY")


@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_any_text_value_is_data(value: str) -> None:
    """Whatever a client sends as a value, it becomes a key (or a refusal), never an
    error of the service."""
    try:
        found = qido.search(STUDY, [("PatientName", value), ("StudyDescription", value)], {})
        translate(found.identifier, "STUDY")
    except (qido.BadQuery, QueryError):
        pass


def test_retrieve_url() -> None:
    data = {"0020000D": {"vr": "UI", "Value": ["1.2"]},
            "0020000E": {"vr": "UI", "Value": ["1.3"]},
            "00080018": {"vr": "UI", "Value": ["1.4"]}}
    assert qido.retrieve_url(data, IMAGE, "http://h/dicom-web") == \
        "http://h/dicom-web/studies/1.2/series/1.3/instances/1.4"
    assert qido.retrieve_url(data, STUDY, "b") == "b/studies/1.2"
    assert qido.retrieve_url({}, STUDY, "b") is None
    assert tag_for_keyword("RetrieveURL") == qido.RETRIEVE_URL


# --- negotiation ------------------------------------------------------------------------


@pytest.mark.parametrize("accept,syntaxes", [
    (None, {"*"}),
    ("*/*", {"*"}),
    # no transfer-syntax parameter: Explicit VR Little Endian (PS3.18 Table 8.7.3-2)
    ('multipart/related; type="application/dicom"', {"1.2.840.10008.1.2.1"}),
    ('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1, '
     'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2',
     {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2"}),
    ('image/jpeg, multipart/related; type="application/dicom"; q=0.5',
     {"1.2.840.10008.1.2.1"}),
])
def test_dicom_syntaxes(accept: str | None, syntaxes: set[str]) -> None:
    assert negotiation.dicom_syntaxes(accept) == syntaxes


@pytest.mark.parametrize("accept", [
    "application/dicom", "image/jpeg", 'multipart/related; type="image/jpeg"',
    'multipart/related; type="application/dicom"; q=0',
])
def test_not_acceptable(accept: str) -> None:
    with pytest.raises(negotiation.NotAcceptable):
        negotiation.dicom_syntaxes(accept)


def test_json_accepted() -> None:
    for accept in (None, "application/dicom+json", "application/json", "*/*",
                   "text/html, application/*"):
        negotiation.json_accepted(accept)
    with pytest.raises(negotiation.NotAcceptable):
        negotiation.json_accepted("application/dicom+xml")


# --- Basic credentials ------------------------------------------------------------------


def basic(text: bytes) -> str:
    return "Basic " + base64.b64encode(text).decode()


def test_parse_basic() -> None:
    assert parse_basic(None) is None
    credentials = parse_basic(basic(b"alice:pa:ss"))
    assert credentials is not None
    assert (credentials.username, credentials.password) == ("alice", b"pa:ss")
    for header in ("Bearer x", "Basic !!", basic(b"nocolon"), basic(b":empty-user"),
                   basic(b"a\x01b:x"), basic(b"\xff:x")):
        with pytest.raises(Unauthenticated):
            parse_basic(header)


def test_principal_without_and_with_credentials() -> None:
    http_auth = HttpAuthenticator(NoneAuthenticator(), None)
    anonymous = http_auth.principal(None, "192.0.2.1")
    assert (anonymous.name, anonymous.established) == ("anonymous", "anonymous")
    claimed = http_auth.principal(basic(b"bob:whatever"), "192.0.2.1")
    assert (claimed.name, claimed.established) == ("bob", "claimed-user")

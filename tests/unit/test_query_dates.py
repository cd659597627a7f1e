"""C-FIND identifiers with impossible dates, and random identifiers (property-based).

An impossible DA/TM/DT value (month 13, 30 February, hour 25, minute 60) is refused with
0xA900 and an Error Comment naming the key, as a single value, in a range and in a
combined date-time range; random identifiers only ever give a Query or a QueryError.
"""

from __future__ import annotations

import datetime
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from archive.query import Query, QueryError, translate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def identifier(level: str = "STUDY", **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def refused(ds: Dataset, model: str = "STUDY") -> QueryError:
    with pytest.raises(QueryError) as caught:
        translate(ds, model)
    error = caught.value
    assert error.status == 0xA900
    assert len(error.comment) <= 64 and error.comment.isascii()
    return error


@pytest.mark.parametrize(("keys", "named"), [
    ({"StudyDate": "20191301"}, "StudyDate"),
    ({"StudyDate": "20190230"}, "StudyDate"),
    ({"StudyDate": "20190001"}, "StudyDate"),
    ({"StudyDate": "20190132"}, "StudyDate"),
    ({"StudyDate": "20230229"}, "StudyDate"),          # not a leap year
    ({"StudyDate": "2019.13.01"}, "StudyDate"),
    ({"StudyDate": "20190101-20191301"}, "StudyDate"),
    ({"StudyDate": "20190230-"}, "StudyDate"),
    ({"StudyDate": "-20191332"}, "StudyDate"),
    ({"StudyTime": "2500"}, "StudyTime"),
    ({"StudyTime": "1060"}, "StudyTime"),
    ({"StudyTime": "10:60"}, "StudyTime"),
    ({"StudyTime": "120061"}, "StudyTime"),
    ({"StudyTime": "0900-2400"}, "StudyTime"),
    ({"StudyDate": "20190101", "StudyTime": "2500"}, "StudyTime"),  # combined date-time
    ({"StudyDate": "20190101-20190230", "StudyTime": "1000-1100"}, "StudyDate"),
])
def test_impossible_dates_and_times_are_refused_naming_the_key(keys: dict[str, str],
                                                               named: str) -> None:
    error = refused(identifier(**keys))
    assert error.comment.startswith(named)
    assert "not a" in error.comment


@pytest.mark.parametrize("value", ["201913", "20190230120000", "20190101250000",
                                   "20190101126000", "2019010112-2019013",
                                   "20190101120000.5+0100-20191301"])
def test_impossible_datetimes_are_refused(value: str) -> None:
    ds = identifier("IMAGE", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3")
    ds.AcquisitionDateTime = value
    error = refused(ds)
    assert error.comment.startswith("AcquisitionDateTime")


@pytest.mark.parametrize("keys", [
    {"StudyDate": "20240229"}, {"StudyDate": "2019.01.02"}, {"StudyDate": "20001231-"},
    {"StudyTime": "235960"},  # a leap second
    {"StudyTime": "10:30"}, {"StudyTime": "00-23"},
    {"StudyDate": "20190101", "StudyTime": "2359"},
])
def test_real_dates_and_times_are_accepted(keys: dict[str, str]) -> None:
    assert isinstance(translate(identifier(**keys), "STUDY"), Query)


@pytest.mark.parametrize("value", ["2019", "201902", "20190228", "2019022823",
                                   "20190228235960.123456+0100", "2019-2020"])
def test_real_datetimes_are_accepted(value: str) -> None:
    ds = identifier("IMAGE", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3")
    ds.AcquisitionDateTime = value
    assert isinstance(translate(ds, "STUDY"), Query)


# --- property-based ----------------------------------------------------------------------

def real_date(year: int, month: int, day: int) -> bool:
    try:
        datetime.date(year, month, day)
    except ValueError:
        return False
    return True


@given(st.integers(0, 9999), st.integers(0, 99), st.integers(0, 99), st.booleans())
@settings(max_examples=300)
def test_a_date_is_accepted_iff_it_is_a_calendar_date(year: int, month: int, day: int,
                                                      as_range: bool) -> None:
    value = f"{year:04d}{month:02d}{day:02d}"
    ds = identifier(StudyDate=f"{value}-" if as_range else value)
    try:
        translate(ds, "STUDY")
        accepted = True
    except QueryError as exc:
        assert exc.status == 0xA900 and exc.comment.startswith("StudyDate")
        accepted = False
    assert accepted == real_date(year, month, day)


@given(st.integers(0, 99), st.integers(0, 99), st.integers(0, 99), st.booleans())
@settings(max_examples=300)
def test_a_time_is_accepted_iff_it_is_a_time_of_day(hours: int, minutes: int, seconds: int,
                                                    with_date: bool) -> None:
    keys = {"StudyTime": f"{hours:02d}{minutes:02d}{seconds:02d}"}
    if with_date:  # matched as one combined date-time range
        keys["StudyDate"] = "20190101"
    try:
        translate(identifier(**keys), "STUDY")
        accepted = True
    except QueryError as exc:
        assert exc.comment.startswith("StudyTime")
        accepted = False
    assert accepted == (hours < 24 and minutes < 60 and seconds <= 60)


KEYWORDS = ["PatientName", "PatientID", "PatientBirthDate", "StudyDate", "StudyTime",
            "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
            "Modality", "SeriesNumber", "InstanceNumber", "SliceThickness",
            "AcquisitionDateTime", "StudyDescription", "ModalitiesInStudy",
            "NumberOfStudyRelatedInstances", "ReferencedSOPClassUID", "PatientAge",
            "SOPClassUID", "ImageType", "PixelSpacing", "Rows", "ProcedureCodeSequence"]
VRS = ["AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "OB", "OW",
       "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US",
       "UT", "UV"]
TEXT = st.text(alphabet=st.sampled_from(list("0123456789.-*?\\^= :+\"abcZ\x00\x1b\x7fé山")),
               max_size=24)
RAW = st.one_of(TEXT.map(lambda t: t.encode("utf-8")), st.binary(max_size=24))


@st.composite
def identifiers(draw: st.DrawFn) -> tuple[Dataset, str]:
    ds = Dataset()
    level = draw(st.sampled_from(["PATIENT", "STUDY", "SERIES", "IMAGE", "", "FOO", None]))
    if level is not None:
        ds.QueryRetrieveLevel = level
    for keyword in draw(st.lists(st.sampled_from(KEYWORDS), max_size=6, unique=True)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tag = Tag(keyword)
            value = draw(RAW)
            if keyword == "ProcedureCodeSequence":
                ds.add_new(tag, "SQ", [Dataset() for _ in range(draw(st.integers(0, 2)))])
                continue
            # as received: any VR, any bytes (pydicom converts them lazily, as for
            # an identifier off the network)
            vr = draw(st.sampled_from([None, *VRS]))
            ds[tag] = RawDataElement(tag, vr, len(value), value, 0, vr is None, True)
    return ds, draw(st.sampled_from(["PATIENT", "STUDY"]))


@given(identifiers())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_translate_returns_a_query_or_raises_query_error(case: tuple[Dataset, str]) -> None:
    ds, model = case
    try:
        query = translate(ds, model)
    except QueryError as exc:
        assert exc.status == 0xA900
        assert len(exc.comment) <= 64
        return
    assert isinstance(query, Query)


def test_a_date_and_time_pair_sent_with_other_vrs_is_not_combined() -> None:
    """Found by the property test above: StudyDate sent as AE with a StudyTime made
    the combined date-time range look up a DA pattern for AE (KeyError)."""
    ds = identifier(StudyTime="10")
    ds[0x00080020] = RawDataElement(Tag(0x00080020), "AE", 2, b"0 ", 0, False, True)
    assert isinstance(translate(ds, "STUDY"), Query)

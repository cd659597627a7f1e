"""The web console's pure parts: the DICOM tree, the dashboard's figures, the search
form as C-FIND keys, the templates' escaping, ``http.viewer_url``."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import yaml
from helpers import image_dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from archive import config, dicomjson, rejection
from archive.config import ConfigError
from archive.web.console import admin, pages, paging, stats, tree
from archive.web.errors import HttpError


def _dataset() -> Dataset:
    ds = image_dataset(patient_name="DOE^JANE=Yamada^Tarou", ImageType=["ORIGINAL", "PRIMARY"])
    ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    ds.add_new(0x00291010, "OB", b"\1\2\3\4")
    ds.add_new(0x00291110, "LO", "another block, no creator")
    ds.add_new(0x00091001, "LO", "no creator at all")
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    item.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    item.add_new(0x00291008, "CS", "IMAGE NUM 4")
    ds.ReferencedImageSequence = [item]
    ds.FrameIncrementPointer = 0x00181063
    return ds


def test_tree_names_tags_keywords_vrs_and_values() -> None:
    rows = tree.rows(dicomjson.to_json(_dataset(), None))
    by_tag = {r.tag: r for r in rows}
    name = by_tag["(0010,0010)"]
    assert (name.keyword, name.vr, name.value) == ("PatientName", "PN",
                                                   "DOE^JANE=Yamada^Tarou")
    assert by_tag["(0008,0008)"].value == "ORIGINAL\\PRIMARY"
    assert by_tag["(0028,0009)"].value == "(0018,1063)"  # AT as a tag
    assert [r.tag for r in rows] == sorted(r.tag for r in rows)
    csa = by_tag["(0029,1010)"]
    assert (csa.keyword, csa.private, csa.creator) == ("CSA Image Header Info", True,
                                                       "SIEMENS CSA HEADER")
    assert csa.value == "(binary, 4 bytes)"
    assert by_tag["(0029,0010)"].keyword == "Private Creator"
    # a private element whose block has no creator: private, unnamed
    assert (by_tag["(0029,1110)"].keyword, by_tag["(0029,1110)"].private) == ("", True)
    assert by_tag["(0009,1001)"].creator == ""


def test_tree_nests_sequence_items_with_their_own_creators() -> None:
    rows = tree.rows(dicomjson.to_json(_dataset(), None))
    sequence = next(r for r in rows if r.keyword == "ReferencedImageSequence")
    assert sequence.sequence and sequence.value == "1 item" and len(sequence.items) == 1
    inner = {r.tag: r for r in sequence.items[0]}
    assert inner["(0029,1008)"].keyword == "CSA Image Header Type"
    assert inner["(0008,1155)"].value == "1.2.3"
    assert tree.count(rows) == len(rows) + len(sequence.items[0])


def test_tree_cuts_long_values_and_names_bulk_data() -> None:
    data = {"00081030": {"vr": "LO", "Value": ["x" * 5000]},
            "00540081": {"vr": "US", "Value": list(range(100))},
            "7FE00010": {"vr": "OW", "BulkDataURI": "gridfs:abc#7FE00010"},
            "not-a-tag": {"vr": "LO"}}
    rows = {r.tag: r for r in tree.rows(data)}
    assert len(rows) == 3
    assert rows["(0008,1030)"].value.endswith("... (5000 characters)")
    assert rows["(0054,0081)"].value.endswith("\\... (100 values)")
    assert rows["(7FE0,0010)"].value == "(binary data, retrieved apart)"


def _instance(patient: str, study: str, series: str, modality: str, size: int,
              source: str, day: int) -> dict:
    return {"PatientID": patient, "StudyInstanceUID": study, "SeriesInstanceUID": series,
            "Modality": modality, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "size": size,
            "source": source,
            "stored_at": datetime.datetime(2026, 12, day, 10, tzinfo=datetime.timezone.utc)}


def test_dashboard_figures() -> None:
    figures = stats.summarize([
        _instance("P1", "S1", "A", "CT", 100, "CT01", 1),
        _instance("P1", "S1", "A", "CT", 100, "CT01", 1),
        _instance("P1", "S2", "B", "MR", 50, "STOW-RS", 2),
        _instance("P2", "S3", "C", "MR", 25, "", 2),
    ])
    assert (figures.patients, figures.studies, figures.series, figures.instances,
            figures.bytes) == (2, 3, 3, 4, 275)
    assert figures.modalities == [("CT", 2), ("MR", 2)]
    assert figures.senders == [("CT01", 2), ("(unknown)", 1), ("STOW-RS", 1)]
    assert figures.sop_classes == [("CT Image Storage", 4)]
    assert figures.days == [("2026-12-01", 2), ("2026-12-02", 2)]
    assert figures.charts()["days"] == {"labels": ["2026-12-01", "2026-12-02"],
                                        "values": [2, 2]}


def test_dashboard_weeks_and_growth() -> None:
    figures = stats.summarize([
        _instance("P1", "S1", "A", "CT", 100, "CT01", 1),  # a Tuesday: week 49
        _instance("P1", "S1", "A", "CT", 100, "CT01", 6),  # Sunday, still week 49
        _instance("P1", "S2", "B", "MR", 50, "CT01", 7),  # Monday: week 50
        {**_instance("P2", "S3", "C", "MR", 25, "", 1), "stored_at": None},
    ])
    assert figures.weeks == [("2026-W49", 2), ("2026-W50", 1)]
    assert figures.growth == [("2026-11-30", 0), ("2026-12-01", 100), ("2026-12-06", 200),
                              ("2026-12-07", 250)]  # from nothing, the day before
    assert figures.charts()["growth"]["values"] == [0, 100, 200, 250]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 700), st.integers(0, 10**9)), max_size=300))
def test_growth_ends_at_the_bytes_received_and_never_falls(received: list) -> None:
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    docs = [{**_instance("P", "S", "A", "CT", size, "X", 1),
             "stored_at": start + datetime.timedelta(days=day)} for day, size in received]
    figures = stats.summarize(docs)
    values = [v for _, v in figures.growth]
    assert values == sorted(values) and len(values) <= stats.DAYS_SHOWN
    assert values[-1:] == ([sum(size for _, size in received)] if received else [])
    assert [d for d, _ in figures.growth] == sorted({d for d, _ in figures.growth})
    last = max((day for day, _ in received), default=None)
    assert [d for d, _ in figures.growth][-1:] == (
        [] if last is None else [(start + datetime.timedelta(days=last)).date().isoformat()])
    assert sum(n for _, n in figures.weeks) == len(received)  # 700 days: 101 weeks at most
    for week, n in figures.weeks:
        assert n == sum(1 for day, _ in received if "{}-W{:02d}".format(
            *(start + datetime.timedelta(days=day)).isocalendar()[:2]) == week)


def test_dashboard_sums_the_smallest_bars_as_other() -> None:
    docs = [_instance("P", "S", "A", f"M{n:02d}", 1, "X", 1) for n in range(25)]
    modalities = stats.summarize(docs).modalities
    assert len(modalities) == stats.BARS_SHOWN + 1
    assert modalities[-1] == ("other (5)", 5)


@pytest.mark.parametrize("form,params", [
    ({}, []),
    ({"PatientName": " DOE* ", "PatientID": ""}, [("PatientName", "DOE*")]),
    ({"StudyDateFrom": "2024-01-01", "StudyDateTo": "2024-12-31"},
     [("StudyDate", "20240101-20241231")]),
    ({"StudyDateFrom": "2024-01-01"}, [("StudyDate", "20240101-")]),
    ({"StudyDateTo": "2024-01-01"}, [("StudyDate", "-20240101")]),
    ({"StudyDateFrom": "2024-01-01", "StudyDateTo": "2024-01-01"},
     [("StudyDate", "20240101")]),
    ({"ModalitiesInStudy": "CT\\MR", "Unknown": "x"}, [("ModalitiesInStudy", "CT\\MR")]),
])
def test_search_form_as_c_find_keys(form: dict[str, str], params: list) -> None:
    assert pages.search_params(form) == params


@pytest.mark.parametrize("value", ["0", "x", "100001", "-1"])
def test_page_numbers_are_checked(value: str) -> None:
    with pytest.raises(HttpError):
        pages.page_number(value)


def test_page_sizes_are_bounded() -> None:
    assert pages.page_size(None) == paging.STUDIES_PER_PAGE
    assert pages.page_size("2") == 2
    for bad in ("0", "501", "1e3", "-5"):
        with pytest.raises(HttpError):
            pages.page_size(bad)


def test_templates_escape_every_value() -> None:
    env = pages._environment()
    row = tree.Row("(0010,0010)", "PatientName", "PN", '<script>alert("x")</script>')
    page = env.get_template("instance.html").render(
        user="a<b>", anonymous=False, study_uid="1.2", series_uid="1.3", sop="1.4",
        rows=[row], element_count=1, sop_class="<i>", transfer_syntax="", size=0, viewer="",
        administers=False, delete="", reject="")
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#34;x&#34;)" in page
    assert "logged in as a&lt;b&gt;" in page and "<i>" not in page
    assert "(1 elements; private ones shaded)" in page
    assert 'id="delete"' not in page and 'id="reject"' not in page
    assert 'href="/audit"' not in page and 'href="/rejected"' not in page


def test_rejected_rows_escape_what_the_network_sent() -> None:
    """A Patient ID and the name of who rejected are what peers sent: text."""
    env = pages._environment()
    row = rejection.listed({
        "_id": "1.4", "PatientID": "<script>p</script>", "StudyInstanceUID": "1.2",
        "SeriesInstanceUID": "1.3", "rejection": {
            "code": "113001", "meaning": "Rejected for Quality Reasons", "note": "1.5",
            "by": '"><img src=x>',
            "at": datetime.datetime(2026, 12, 1, 10, tzinfo=datetime.timezone.utc)}})
    page = env.get_template("rejected.html").render(
        user="root", anonymous=False, administers=True, rows=[row], error="", links={},
        total=1, studies=1, page=1, first=0, purge="/rejected/purge", keys=["PatientID"],
        form={"PatientID": '"><b>'})
    assert "<script>p" not in page and "<img src=x>" not in page and '"><b>' not in page
    assert "&lt;script&gt;p&lt;/script&gt;" in page and "2026-12-01T10:00:00Z" in page
    assert 'id="purge"' in page and 'href="/rejected"' in page


def test_audit_rows_escape_what_the_network_sent() -> None:
    """A request summary, a user name and a comment are what peers sent: text."""
    env = pages._environment()
    entry = admin.entry_row({
        "time": datetime.datetime(2026, 12, 1, 10, tzinfo=datetime.timezone.utc),
        "kind": "operation", "event": "C-FIND", "principal": "<b>eve</b>", "allowed": False,
        "service": "Query", "status": 0x0124, "request": "PatientName=<script>x</script>",
        "comment": '"><img src=x>', "calling_ae": "SCU", "address": "10.0.0.1"})
    assert entry["failure"] and entry["status"] == "0x0124" and entry["verdict"] == "DENIED"
    page = env.get_template("audit.html").render(
        user="root", anonymous=False, administers=True, entries=[entry], error="",
        events=["C-FIND"], page=1, first=0, links={},
        form={"user": "<u>", "event": "C-FIND", "since": "", "until": "", "failures": ""})
    assert "<script>x" not in page and "<img src=x>" not in page and "<b>eve" not in page
    assert "PatientName=&lt;script&gt;x&lt;/script&gt;" in page
    assert 'value="&lt;u&gt;"' in page and "<option selected>C-FIND</option>" in page
    assert 'href="/audit"' in page  # the administrator's menu


def test_dates_and_times_as_read() -> None:
    assert pages.date("20240102") == "2024-01-02" and pages.date("1997.04.24") == "1997.04.24"
    assert [pages.time_of_day(t) for t in ("101530", "101530.123", "1015", "10", "", "x")] \
        == ["10:15:30", "10:15:30", "10:15", "10:00", "", "x"]


def test_human_sizes() -> None:
    assert [pages.human_size(n) for n in (0, 999, 1500, 2_500_000, 3 * 10**12)] == [
        "0 bytes", "999 bytes", "1.5 KB", "2.5 MB", "3.0 TB"]


def _load(tmp_path: Path, http: dict) -> config.Config:
    path = tmp_path / "archive.yaml"
    path.write_text(yaml.safe_dump({"database": {"embedded": {"enabled": False}},
                                    "http": http}), encoding="utf-8")
    return config.load(path, {})


def test_console_switch(tmp_path: Path) -> None:
    assert _load(tmp_path, {}).http.console is True
    assert _load(tmp_path, {"console": False}).http.console is False
    with pytest.raises(ConfigError, match="http.console"):
        _load(tmp_path, {"console": "no"})


def test_viewer_url(tmp_path: Path) -> None:
    assert _load(tmp_path, {}).http.viewer_url == ""
    url = "http://127.0.0.1:3000/viewer?StudyInstanceUIDs={StudyInstanceUID}"
    assert _load(tmp_path, {"viewer_url": url}).http.viewer_url == url
    for bad in ("http://127.0.0.1:3000/viewer", "javascript:alert(1)//{StudyInstanceUID}",
                "ftp://x/{StudyInstanceUID}"):
        with pytest.raises(ConfigError, match="http.viewer_url"):
            _load(tmp_path, {"viewer_url": bad})


@pytest.mark.parametrize("headers,public_url,taken", [
    ({"sec-fetch-site": "same-origin"}, "", True),  # the browser says so
    ({"sec-fetch-site": "same-origin", "origin": "null"}, "", True),
    ({"sec-fetch-site": "cross-site", "origin": "http://archive:8080"}, "", False),
    ({"sec-fetch-site": "same-site", "origin": "http://archive:8080"}, "", False),
    ({"origin": "http://archive:8080"}, "", True),  # a browser without Fetch metadata
    ({"origin": "http://ARCHIVE:8080"}, "", True),
    ({"origin": "http://archive:8081"}, "", False),
    ({"origin": "http://evil.example"}, "", False),
    ({"origin": "null"}, "", False),
    ({}, "", False),  # neither: not a browser's form, or a very old one
    ({"origin": "https://pacs.example.org"}, "https://pacs.example.org/dicom-web", True),
    ({"origin": "https://other.example.org"}, "https://pacs.example.org/dicom-web", False),
])
def test_a_delete_is_taken_only_from_this_sites_pages(headers: dict[str, str],
                                                     public_url: str, taken: bool) -> None:
    from starlette.requests import Request

    scope = {"type": "http", "method": "POST", "path": "/studies/1/delete",
             "headers": [(b"host", b"archive:8080"),
                         *((k.encode(), v.encode()) for k, v in headers.items())]}
    assert admin.same_origin(Request(scope), public_url) is taken

"""The DICOMweb benchmark's own checks: what it counts and compares must be right, or
its figures compare different work (benchmarks/bench_dicomweb.py)."""

from __future__ import annotations

import pytest

from archive.web import multipart
from benchmarks import bench_dicomweb as bd
from benchmarks.harness import BenchmarkError

PART10 = b"\0" * 128 + b"DICM" + b"rest of the file"


def test_multipart_bodies_are_split_into_their_parts() -> None:
    """What the archive writes is read back part for part, bytes unchanged, even when
    a part contains CRLF and dashes."""
    parts = [PART10, b"\r\n--not-the-boundary\r\n" + PART10, b""]
    body = b"".join(multipart.write("b0und", [("application/dicom", [p]) for p in parts]))
    assert bd.split_parts(body, b"b0und") == parts


def test_a_body_cut_short_is_an_error() -> None:
    body = b"".join(multipart.write("b0und", [("application/dicom", [PART10])]))
    with pytest.raises(BenchmarkError, match="closing delimiter"):
        bd.split_parts(body[:-12], b"b0und")


def test_the_boundary_is_read_quoted_or_not() -> None:
    assert bd._boundary('multipart/related; type="application/dicom"; boundary="a b"') == b"a b"
    assert bd._boundary("multipart/related; boundary=xyz") == b"xyz"
    with pytest.raises(BenchmarkError):
        bd._boundary("multipart/related")


def test_query_strings_keep_wild_cards_and_components_as_sent() -> None:
    """Orthanc's plugin 1.7 does not decode %2A: the wild card goes as it is, to both."""
    assert bd.query_string([("PatientName", "DUB*"), ("includefield", "StudyDescription")]) \
        == "?PatientName=DUB*&includefield=StudyDescription"
    assert bd.query_string([("PatientName", "DOE^J"), ("x", "a b&c")]) \
        == "?PatientName=DOE^J&x=a%20b%26c"
    assert bd.query_string([]) == ""


def test_answers_compare_by_value_not_by_encoding() -> None:
    """A number as text or as a number, values in another order, PN as its Alphabetic
    group: equal; an absent attribute differs from an empty one."""
    archive = [{"0020000D": {"vr": "UI", "Value": ["1.2"]},
                "00201206": {"vr": "IS", "Value": [3]},
                "00080061": {"vr": "CS", "Value": ["MR", "CT"]},
                "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]}}]
    orthanc = [{"0020000D": {"vr": "UI", "Value": ["1.2"]},
                "00201206": {"vr": "IS", "Value": ["3"]},
                "00080061": {"vr": "CS", "Value": ["CT", "MR"]},
                "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]},
                "00081030": {"vr": "LO"}}]
    problems = bd.compare(bd.answers_by_uid(archive, "STUDY"),
                          bd.answers_by_uid(orthanc, "STUDY"))
    assert problems == ["StudyDescription differs in 1 answers, e.g. archive '<absent>' vs "
                        "Orthanc ''"]


def test_percentiles_are_nearest_rank() -> None:
    samples = [float(n) for n in range(1, 21)]
    assert bd.percentile(samples, 0.9) == 18.0
    assert bd.percentile([5.0], 0.9) == 5.0

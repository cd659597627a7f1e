"""Property-based: whatever a sender sends, ``Archive.store`` stores it whole or refuses it.

Generated cases cover the class of the tester's "bad data" findings: datasets with random
elements (any VR, any bytes: overflowing numbers, NaN, infinity, NUL and control
characters, over-long values), key values with NUL or too long, and valid files cut at
random points.  For each: either stored -- the metadata valid JSON and BSON, the original
byte-identical, the documents consistent -- or refused with a 0xCxxx/0xA9xx status and
nothing left behind; never an unhandled exception.  Random ACL patterns only ever give
DICOM JSON or a PatternError.  (tests/integration runs a sample against FerretDB.)
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

import bson
import mongomock
import pytest
from baddata import BASES, check_outcome, element_ends, malformed
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from acl.patterns import PatternError
from acl.patterns import to_json as pattern_to_json
from archive.storage import Archive

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

def fresh_archive() -> Archive:
    db = mongomock.MongoClient().archive
    return Archive(db, "fs", "replace", tempfile.mkdtemp(prefix="journal-"))


@given(malformed())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_malformed_dataset_is_stored_whole_or_refused_cleanly(data: bytes) -> None:
    check_outcome(fresh_archive(), data)


@given(st.sampled_from(BASES), st.data())
@settings(max_examples=200, deadline=None)
def test_a_file_cut_anywhere_is_refused_unless_cut_between_elements(
        base: tuple[str, bytes], draw: st.DataObject) -> None:
    _, data = base
    cut = draw.draw(st.integers(0, len(data) - 1), label="cut")
    stored = check_outcome(fresh_archive(), data[:cut])
    if stored:  # a complete, shorter dataset: only possible at an element's end
        assert cut in element_ends(data)


@given(st.sampled_from(BASES))
def test_every_base_file_is_stored_whole(base: tuple[str, bytes]) -> None:
    assert check_outcome(fresh_archive(), base[1])


# --- ACL patterns -----------------------------------------------------------------------

PATTERN_KEYS = st.sampled_from([
    "PatientID", "PatientName", "StudyDate", "StudyTime", "Modality", "StudyDescription",
    "SeriesNumber", "SliceThickness", "AcquisitionDateTime", "ProcedureCodeSequence",
    "PixelData", "QueryRetrieveLevel", "NumberOfStudyRelatedInstances", "0010,0020",
    "(0008,0060)", "00081030", "NotAKeyword", "0009,1001", "", "$where", "a.b",
    "SOPInstanceUID", "PatientAge", "ImagePositionPatient", "DiffusionBValue",
])
PATTERN_SCALARS = st.one_of(
    st.sampled_from(["", " ", "*", "?", "\"\"", "CT\\MR", "20240101-20241231", "20241301",
                     "2500", "-", "1e400", "NaN", "99999999999999999999", "DOE^J*=山田",
                     "{\"$gt\": \"\"}", "\x00", "a" * 100]),
    st.text(max_size=20),
)
PATTERN_VALUES = st.recursive(
    PATTERN_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(PATTERN_KEYS, inner, max_size=3)),
    max_leaves=8,
)


@given(st.dictionaries(PATTERN_KEYS, PATTERN_VALUES, max_size=4))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_a_random_pattern_gives_dicom_json_or_a_pattern_error(pattern: dict[str, Any]) -> None:
    try:
        result = pattern_to_json(pattern)
    except PatternError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    json.dumps(result, allow_nan=False)
    bson.encode({"pattern": result})
    assume(result)
    for element in result.values():  # never an empty value: it would match everything
        assert element.get("Value"), result

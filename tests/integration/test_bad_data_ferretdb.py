"""Bad data against the real FerretDB: what mongomock cannot tell (a NaN made FerretDB
drop the connection; infinity is refused by it; 64-bit integers overflow BSON).

The tester's values one by one, then a smaller sample of the property-based cases of
tests/unit/test_bad_data_properties.py: each stored whole or refused with nothing left,
and the database still answering afterwards.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path
from typing import Any

import pytest
from baddata import BASES, COLLECTIONS, check_outcome, element, malformed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archive.storage import CANNOT_UNDERSTAND, Archive, ensure_indexes

pytestmark = [pytest.mark.ferretdb, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture
def archive(mongo_db: Any, tmp_path: Path) -> Archive:
    ensure_indexes(mongo_db)
    return Archive(mongo_db, "fs", "replace", tmp_path / "journal.jsonl")


def emptied(archive: Archive) -> Archive:
    for collection in COLLECTIONS:
        archive.db[collection].delete_many({})
    return archive


REPORTED = {
    "DS-NaN": (0x00180050, "DS", b"NaN ", {"vr": "UN", "InlineBinary": "TmFOIA=="}),
    "DS-Inf": (0x00180050, "DS", b"-Inf", {"vr": "UN", "InlineBinary": "LUluZg=="}),
    "IS-overflow": (0x00200013, "IS", b"99999999999999999999999 ", {"vr": "UN"}),
    "UV-max": (0x00081161, "UV", struct.pack("<Q", 2**64 - 1),
               {"vr": "UV", "Value": ["18446744073709551615"]}),
    "SV-min": (0x00720082, "SV", struct.pack("<q", -(2**63)),
               {"vr": "SV", "Value": ["-9223372036854775808"]}),
    "FD-NaN": (0x00189087, "FD", struct.pack("<d", float("nan")), {"vr": "FD"}),
    "FL-Inf": (0x0018605A, "FL", struct.pack("<f", float("inf")), {"vr": "FL"}),
    "LO-NUL": (0x00081030, "LO", b"A\x00B ", {"vr": "LO", "Value": ["A\x00B"]}),
}


@pytest.mark.parametrize("case", REPORTED.values(), ids=REPORTED.keys())
def test_reported_values_are_stored_and_ferretdb_keeps_answering(
        archive: Archive, case: tuple[int, str, bytes, dict]) -> None:
    tag, vr, value, expected = case
    data = BASES[0][1] + element(tag, vr, value)
    assert check_outcome(archive, data)
    doc = archive.db.instances.find_one({})
    stored = doc["dataset"][f"{tag:08X}"]
    assert {k: stored[k] for k in expected} == expected
    assert archive.db.command("ping")["ok"] == 1


@pytest.mark.parametrize("uid", [b"1.2.826.0.1\x005", b"1.2.826.0.1\x015", b"1." + b"2" * 70])
def test_a_bad_sop_instance_uid_is_refused_and_nothing_is_left(archive: Archive,
                                                               uid: bytes) -> None:
    data = BASES[0][1] + element(0x00080018, "UI", uid + b"\x00" * (len(uid) % 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = archive.store(data)
    assert outcome.status == CANNOT_UNDERSTAND
    assert "SOPInstanceUID" in outcome.comment
    assert all(archive.db[c].count_documents({}) == 0 for c in COLLECTIONS)


@given(malformed())
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_a_sample_of_malformed_datasets_on_ferretdb(archive: Archive, data: bytes) -> None:
    check_outcome(emptied(archive), data)
    assert archive.db.command("ping")["ok"] == 1


@given(st.sampled_from(BASES), st.data())
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_a_sample_of_truncated_files_on_ferretdb(archive: Archive, base: tuple[str, bytes],
                                                 draw: st.DataObject) -> None:
    _, data = base
    cut = draw.draw(st.integers(132, len(data) - 1), label="cut")
    check_outcome(emptied(archive), data[:cut])

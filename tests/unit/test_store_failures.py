"""Failures after the GridFS write that are not the database's connection (mongomock).

Whatever raises once the original is in GridFS -- BSON refusing a document, an
OverflowError, the server refusing a value -- everything written is taken back, and the
sender is told what it can do: 0xC000 "cannot store this dataset: ..." for data that can
never be stored, 0xA700 only for a database that is away.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import mongomock
import pytest
from bson.errors import InvalidDocument
from helpers import Raising, consistency_problems, counter_problems, make_dataset, to_part10
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pymongo.errors import AutoReconnect, WriteError

from archive import dicomjson
from archive.storage import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, Archive

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    return Archive(mongomock.MongoClient().archive, "fs", "replace", tmp_path / "j.jsonl")


def nothing_written(archive: Archive) -> bool:
    return all(archive.db[c].count_documents({}) == 0 for c in
               ("instances", "series", "studies", "patients", "fs.files", "fs.chunks"))




DATA_ERRORS = {
    "InvalidDocument": InvalidDocument("key 'a\x00b' must not contain the NULL byte"),
    "OverflowError": OverflowError("MongoDB can only handle up to 8-byte ints"),
    "WriteError-BadValue": WriteError("invalid value: { \"v\": +Inf }", code=2),
    "ValueError": ValueError("something in this dataset"),
}
STEPS = [("instances", "insert_one"), ("series", "update_one"),
         ("studies", "find_one_and_update"), ("patients", "update_one")]


@pytest.mark.parametrize("error", DATA_ERRORS.values(), ids=DATA_ERRORS.keys())
@pytest.mark.parametrize(("collection", "method"), STEPS)
def test_data_the_database_refuses_gets_c000_and_leaves_nothing(
        archive: Archive, collection: str, method: str, error: BaseException) -> None:
    setattr(archive, collection, Raising(getattr(archive, collection), method, error))

    outcome = archive.store(to_part10(make_dataset()))

    assert outcome.status == CANNOT_UNDERSTAND
    assert outcome.comment.startswith("cannot store this dataset: ")
    assert len(outcome.comment) <= 64 and outcome.comment.isascii()
    assert nothing_written(archive)
    assert not archive.pending()


def test_a_failure_converting_the_metadata_takes_the_file_back(
        archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any) -> dict[str, Any]:
        raise RecursionError("maximum recursion depth exceeded")
    monkeypatch.setattr(dicomjson, "to_json", broken)

    outcome = archive.store(to_part10(make_dataset()))

    assert outcome.status == CANNOT_UNDERSTAND
    assert "recursion" in outcome.comment
    assert nothing_written(archive)


def test_a_database_that_is_away_still_gets_a700(archive: Archive) -> None:
    archive.series = Raising(archive.series, "update_one", AutoReconnect("connection closed"))
    outcome = archive.store(to_part10(make_dataset()))
    assert outcome.status == OUT_OF_RESOURCES
    assert nothing_written(archive)


def test_a_refused_resend_keeps_the_first_copy(archive: Archive) -> None:
    first = to_part10(make_dataset(sop_uid="1.2.3.4", InstanceNumber=1))
    assert archive.store(first).ok
    archive.studies = Raising(archive.studies, "find_one_and_update", InvalidDocument("bad"))

    outcome = archive.store(to_part10(make_dataset(sop_uid="1.2.3.4", InstanceNumber=2)))

    assert outcome.status == CANNOT_UNDERSTAND
    doc = archive.db.instances.find_one()
    assert doc["dataset"]["00200013"]["Value"] == [1]
    assert archive.files.read(doc["file_id"]) == first
    assert archive.db["fs.files"].count_documents({}) == 1
    assert consistency_problems(archive.db) == []
    assert counter_problems(archive.db) == []


# --- the values of the tester's report, end to end on mongomock -------------------------


def with_raw(tag: int, vr: str, value: bytes) -> bytes:
    ds = make_dataset()
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    return to_part10(ds)


@pytest.mark.parametrize(("tag", "vr", "value", "stored"), [
    (0x00200013, "IS", b"99999999999999999999999 ", {"vr": "UN"}),
    (0x00081161, "UV", struct.pack("<Q", 2**64 - 1),
     {"vr": "UV", "Value": ["18446744073709551615"]}),
    (0x00180050, "DS", b"NaN ", {"vr": "UN"}),
    (0x00189087, "FD", struct.pack("<d", float("nan")), {"vr": "FD"}),
], ids=["IS-overflow", "UV-max", "DS-NaN", "FD-NaN"])
def test_reported_values_are_stored_with_valid_metadata(archive: Archive, tag: int, vr: str,
                                                        value: bytes, stored: dict) -> None:
    data = with_raw(tag, vr, value)
    outcome = archive.store(data)
    assert outcome.ok, outcome
    doc = archive.db.instances.find_one()
    element = doc["dataset"][f"{tag:08X}"]
    assert {k: element[k] for k in stored} == stored
    assert archive.files.read(doc["file_id"]) == data

"""Bad data over the network: the node as a subprocess, pynetdicom as the sender (DCMTK's
storescu refuses to send a truncated file), the dataset bytes sent verbatim.

Each refusal carries the status the standard names and an Error Comment; what is
stored is stored whole; nothing is left behind (GridFS files and documents counted
after each send); the node goes on serving on the same association.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from baddata import element
from helpers import (
    CT_IMAGE,
    association,
    consistency_problems,
    dataset_bytes,
    image_dataset,
    raw_sending,
    settled_counters,
    to_part10,
)
from pydicom.dataset import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from archive.gridstore import GridStore

pytestmark = [pytest.mark.network, pytest.mark.ferretdb,
              pytest.mark.filterwarnings("ignore::UserWarning")]

EXPLICIT_LE = "1.2.840.10008.1.2.1"
FIND = StudyRootQueryRetrieveInformationModelFind


@pytest.fixture(scope="module")
def node(module_node_factory: Any) -> Any:
    return module_node_factory.start()


def counts(node: Any) -> tuple[int, int, int]:
    db = node.db
    return (db.instances.count_documents({}), db["fs.files"].count_documents({}),
            db["fs.chunks"].count_documents({}))


def send(node: Any, tmp_path: Path, data: bytes) -> Dataset:
    """C-STORE the file's dataset bytes exactly; the response, then a C-ECHO on the same
    association (the node keeps serving)."""
    path = tmp_path / "sent.dcm"
    path.write_bytes(data)
    with raw_sending(), association(node, [(CT_IMAGE, EXPLICIT_LE)]) as assoc:
        response = assoc.send_c_store(path)
        assert assoc.send_c_echo().Status == 0x0000
    return response


def image(**kwargs: Any) -> bytes:
    return to_part10(image_dataset(**kwargs))


@pytest.mark.parametrize("cut", [10, 4000, 8192 + 6], ids=["pixels-10", "pixels-4000",
                                                            "in-header"])
def test_a_truncated_dataset_gets_c000_and_nothing_is_stored(node: Any, tmp_path: Path,
                                                             cut: int) -> None:
    before = counts(node)
    response = send(node, tmp_path, image()[:-cut])
    assert response.Status == 0xC000
    assert response.ErrorComment.startswith("truncated")
    assert counts(node) == before
    assert "Traceback" not in node.log()


REPORTED = {
    "DS-NaN": (0x00180050, "DS", b"NaN ", {"vr": "UN", "InlineBinary": "TmFOIA=="}),
    "UV-max": (0x00081161, "UV", struct.pack("<Q", 2**64 - 1),
               {"vr": "UV", "Value": ["18446744073709551615"]}),
    "IS-overflow": (0x00200013, "IS", b"99999999999999999999999 ", {"vr": "UN"}),
    "FD-NaN": (0x00189087, "FD", struct.pack("<d", float("nan")), {"vr": "FD"}),
}


@pytest.mark.parametrize("case", REPORTED.values(), ids=REPORTED.keys())
def test_reported_values_are_stored_whole_and_leave_no_orphan(
        node: Any, tmp_path: Path, case: tuple[int, str, bytes, dict]) -> None:
    tag, vr, value, expected = case
    ds = image_dataset()
    data = to_part10(ds) + element(tag, vr, value)  # a later copy of the tag wins
    before = counts(node)
    response = send(node, tmp_path, data)
    assert response.Status == 0x0000, response
    instances, files, _ = counts(node)
    assert (instances, files) == (before[0] + 1, before[1] + 1)
    doc = node.db.instances.find_one({"_id": ds.SOPInstanceUID})
    stored = doc["dataset"][f"{tag:08X}"]
    assert {k: stored[k] for k in expected} == expected
    # the dataset as sent, byte for byte (the meta group is the receiver's own)
    assert dataset_bytes(GridStore(node.db).read(doc["file_id"])) == dataset_bytes(data)
    assert consistency_problems(node.db) == []
    assert settled_counters(node.db) == []


@pytest.mark.parametrize(("tag", "keyword", "value"), [
    (0x0020000E, "SeriesInstanceUID", b"1.2.826.0.1\x005\x00"),
    (0x0020000D, "StudyInstanceUID", b"1.2.826.0.1\x015\x00"),
    (0x00080018, "SOPInstanceUID", b"1." + b"2" * 70),
    (0x00100020, "PatientID", b"P\x00Q "),
])
def test_a_bad_key_value_gets_c000_naming_it_and_nothing_is_left(
        node: Any, tmp_path: Path, tag: int, keyword: str, value: bytes) -> None:
    before = counts(node)
    vr = "LO" if keyword == "PatientID" else "UI"
    response = send(node, tmp_path, image() + element(tag, vr, value))
    assert response.Status == 0xC000
    assert response.ErrorComment.startswith(keyword)
    assert counts(node) == before
    assert node.db.series.count_documents({"_id": {"$regex": "\x00"}}) == 0


def test_a_c_find_with_month_13_gets_a900_naming_the_key(node: Any) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyDate = "20191301"
    identifier.StudyInstanceUID = ""
    with association(node, [(FIND, EXPLICIT_LE)]) as assoc:
        responses = list(assoc.send_c_find(identifier, FIND))
        assert assoc.send_c_echo().Status == 0x0000
    (status, _), = responses
    assert status.Status == 0xA900
    assert status.ErrorComment == "StudyDate (0008,0020) '20191301' is not a calendar date"

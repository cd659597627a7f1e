"""Two nodes on one database (a site scaled out on a replica set) stay as exact as one.

Each node keeps things in memory to go faster (the series it has seen, level updates
written behind in batches); none of it may make the shared database differ from what a
single node leaves.  Two nodes, several associations each, store into the SAME series,
study and patient at once, with re-sends of the same SOP Instance UIDs to both nodes,
some at the same moment, and with instances whose patient, study and series attributes
(and modality and SOP class) differ.  Then the level documents and the C-FIND answers at
all four levels, through either node, must equal those of a fresh single node that
stored the final set of instances (the originals the two nodes kept).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pytest
from conftest import RunningNode, node_environment
from helpers import (
    CT_IMAGE,
    MR_IMAGE,
    ROOT,
    association,
    consistency_problems,
    counter_problems,
    identifier,
    make_dataset,
    settled_counters,
    to_part10,
)
from pydicom import dcmread
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from archive.gridstore import GridStore

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

UID = "1.2.826.0.1.3680043.10.2025.7"
PATIENT = "SCALE-1"
CONTEXTS = [(CT_IMAGE, ExplicitVRLittleEndian), (MR_IMAGE, ExplicitVRLittleEndian),
            (StudyRootQueryRetrieveInformationModelFind, ExplicitVRLittleEndian),
            (PatientRootQueryRetrieveInformationModelFind, ExplicitVRLittleEndian)]

#: Attributes of the patient, study and series levels (and modality / SOP class) that an
#: instance may carry differently from its siblings: the first value is the usual one.
VARIANTS = {
    "PatientName": ["DOE^JOHN", "DOE^J"],
    "StudyDescription": ["HEAD", "HEAD NECK"],
    "SeriesDescription": ["AXIAL", "CORONAL"],
    "Modality": ["CT", "MR"],
}
ASSOCIATIONS_PER_NODE = 3

#: What C-FIND asks at each level (Patient Root for PATIENT, Study Root below), with the
#: unique keys that make the node walk the child lists rather than scan a collection.
QUERIES: list[tuple[str, Any, dict[str, Any]]] = [
    ("PATIENT", PatientRootQueryRetrieveInformationModelFind, {
        "PatientID": PATIENT, "PatientName": "", "NumberOfPatientRelatedStudies": "",
        "NumberOfPatientRelatedSeries": "", "NumberOfPatientRelatedInstances": ""}),
    ("PATIENT", PatientRootQueryRetrieveInformationModelFind, {
        "PatientID": "", "PatientName": "", "NumberOfPatientRelatedInstances": ""}),
    ("STUDY", StudyRootQueryRetrieveInformationModelFind, {
        "StudyInstanceUID": "", "PatientID": "", "PatientName": "", "StudyDescription": "",
        "ModalitiesInStudy": "", "SOPClassesInStudy": "", "NumberOfStudyRelatedSeries": "",
        "NumberOfStudyRelatedInstances": ""}),
    ("STUDY", PatientRootQueryRetrieveInformationModelFind, {
        "PatientID": PATIENT, "StudyInstanceUID": "", "StudyDescription": "",
        "ModalitiesInStudy": "", "NumberOfStudyRelatedInstances": ""}),
    ("SERIES", StudyRootQueryRetrieveInformationModelFind, {
        "StudyInstanceUID": f"{UID}.1", "SeriesInstanceUID": "", "Modality": "",
        "SeriesDescription": "", "NumberOfSeriesRelatedInstances": ""}),
    ("IMAGE", StudyRootQueryRetrieveInformationModelFind, {
        "StudyInstanceUID": f"{UID}.1", "SeriesInstanceUID": f"{UID}.1.1",
        "SOPInstanceUID": "", "SOPClassUID": "", "InstanceNumber": "", "ImageComments": ""}),
]


@dataclass(frozen=True)
class Send:
    """One C-STORE of the plan: which instance, in which version (``variant``: an index
    into each list of :data:`VARIANTS`), and its place in the plan (``n``)."""

    sop: str
    variant: tuple[int, ...]
    n: int

    def part10(self) -> bytes:
        values = {key: options[i] for (key, options), i in zip(VARIANTS.items(), self.variant,
                                                               strict=True)}
        ds = make_dataset(patient_id=PATIENT, patient_name=values.pop("PatientName"),
                          study_uid=f"{UID}.1", series_uid=f"{UID}.1.1", sop_uid=self.sop,
                          sop_class=CT_IMAGE if values["Modality"] == "CT" else MR_IMAGE,
                          InstanceNumber=int(self.sop.rsplit(".", 1)[1]),
                          ImageComments=f"send {self.n}", **values)
        return to_part10(ds)


def plan(rng: random.Random, instances: int, resends: int) -> list[Send]:
    """First sends of ``instances`` SOP Instance UIDs, mostly in the usual version (new
    instances a node batches), interleaved with ``resends`` of them, half of which
    change some attribute (a node folds those one by one).  Most re-sends name one of
    the last three instances sent: one likely in flight on another association of
    either node."""
    usual = (0,) * len(VARIANTS)
    fresh = iter(f"{UID}.1.1.{n + 1}" for n in range(instances))
    rest = ["new"] * (instances - 6) + ["again"] * resends
    rng.shuffle(rest)
    sent: list[str] = []
    sends = []
    for n, kind in enumerate(["new"] * 6 + rest):
        if kind == "new":
            sop = next(fresh)
            sent.append(sop)
        else:
            sop = rng.choice(sent[-3:] if rng.random() < 0.7 else sent)
        changed = rng.random() < (0.1 if kind == "new" else 0.5)
        variant = tuple(rng.randrange(2) for _ in VARIANTS) if changed else usual
        sends.append(Send(sop, variant, n))
    return sends


def send_all(node: RunningNode, sends: list[Send], statuses: dict[int, int]) -> None:
    """Store ``sends`` over one association, recording each status by plan number."""
    with association(node, CONTEXTS) as assoc:
        for item in sends:
            rsp = assoc.send_c_store(dcmread(BytesIO(item.part10())))
            statuses[item.n] = int(rsp.Status) if "Status" in rsp else -1


def answers(node: RunningNode) -> list[list[tuple[tuple[str, Any], ...]]]:
    """The answers to each of :data:`QUERIES` through ``node`` (one association): each
    answer as sorted (keyword, value) pairs, the answers of a query sorted.

    Multi-valued answers (Modalities / SOP Classes in Study) are compared as sets: the
    order of their values is not defined (it follows the order stores happened in).
    """
    result = []
    with association(node, CONTEXTS) as assoc:
        for level, model, keys in QUERIES:
            found_all = []
            for status, found in assoc.send_c_find(identifier(level, **keys), model):
                assert status is not None and status.Status in (0x0000, 0xFF00, 0xFF01), status
                if status.Status in (0xFF00, 0xFF01):
                    found_all.append(tuple(sorted((elem.keyword or str(elem.tag),
                                                   _value(elem.value)) for elem in found)))
            result.append(sorted(found_all))
    return result


def _value(value: Any) -> Any:
    if isinstance(value, MultiValue | list):
        return tuple(sorted(str(v) for v in value))
    return str(value) if value is not None else ""


#: Level document fields that differ between two archives holding the same instances:
#: the revision counter, the GridFS file id of the instance shown, and the variants,
#: which keep the attribute hashes of versions a re-send replaced (harmless, documented
#: in archive/check.py; `archive check` verifies they cover the instances).
_OWN_FIELDS = {"rev", "latest", "variants"}


def level_documents(db: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """Every series, study and patient document, as comparable between databases.

    Whatever fields the model has (child lists may go): lists are compared as sets,
    per-value counters without the values counted zero times.
    """
    view: dict[str, dict[str, dict[str, Any]]] = {}
    for name in ("series", "studies", "patients"):
        view[name] = {}
        for doc in db[name].find():
            fields = {}
            for key, value in doc.items():
                if key in _OWN_FIELDS:
                    continue
                if isinstance(value, list):
                    value = sorted(value, key=repr)
                elif isinstance(value, dict) and value and all(
                        isinstance(v, int) for v in value.values()):
                    value = {k: v for k, v in value.items() if v}
                fields[key] = value
            view[name][doc["_id"]] = fields
    return view


def archive_check(node: RunningNode) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "archive", "check", "--grace", "0",
                           "--config", str(node.config_path)], capture_output=True,
                          text=True, cwd=ROOT, env=node_environment(), timeout=120)


def _store(node: RunningNode, files: Iterable[bytes]) -> None:
    with association(node, CONTEXTS) as assoc:
        for data in files:
            rsp = assoc.send_c_store(dcmread(BytesIO(data)))
            assert "Status" in rsp and rsp.Status == 0x0000, rsp


#: One plan a run, a new one each run (its seed printed, ARCHIVE_TEST_SEED repeats it).
SEEDS = [int(os.environ["ARCHIVE_TEST_SEED"])] if os.environ.get("ARCHIVE_TEST_SEED") \
    else [random.randrange(1000)]


@pytest.mark.parametrize("seed", SEEDS)
def test_two_nodes_storing_into_one_series_leave_what_one_node_leaves(
        node_factory: Any, seed: int) -> None:
    print(f"seed {seed} (ARCHIVE_TEST_SEED={seed} repeats the plan)")
    rng = random.Random(seed)
    first = node_factory()
    second = node_factory(database=first.database)
    nodes = [first, second]
    sends = plan(rng, instances=40, resends=160)
    # dealt round-robin to 3 associations per node: neighbouring sends, often of the
    # same SOP Instance UID, go to both nodes at about the same moment
    lanes = ASSOCIATIONS_PER_NODE * len(nodes)
    statuses: dict[int, int] = {}
    threads = [threading.Thread(target=send_all,
                                args=(nodes[lane % len(nodes)], sends[lane::lanes], statuses))
               for lane in range(lanes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert statuses == {item.n: 0 for item in sends}, f"seed {seed}"

    db = first.db
    # A node acknowledges a new instance before its level documents count it (written
    # behind, within write_behind_seconds): a C-FIND on that node waits for its own
    # batch, but the other node's batch is visible only once written.  Wait for both.
    assert settled_counters(db) == [], f"seed {seed}"
    # Then one more re-send, after everything else: the level documents must show its
    # attributes (the most recently stored instance's), as a single node's would.
    last = Send(sends[0].sop, (1, 1, 1, 0), len(sends))
    _store(second, [last.part10()])
    assert settled_counters(db) == [], f"seed {seed}"
    assert consistency_problems(db) == [], f"seed {seed}"

    # every instance holds one of the versions sent to it
    versions = {(item.sop, f"send {item.n}") for item in [*sends, last]}
    stored = list(db.instances.find({}, {"file_id": 1, "dataset.00204000": 1}))
    assert {(d["_id"], d["dataset"]["00204000"]["Value"][0]) for d in stored} <= versions
    assert len(stored) == len({item.sop for item in sends})

    # the same final set, stored by one node into a database of its own (the sent-last
    # version last)
    files = GridStore(db)
    originals = [files.read(d["file_id"]) for d in sorted(stored, key=lambda d: d["_id"] ==
                                                           last.sop)]
    single = node_factory()
    _store(single, originals)
    assert settled_counters(single.db) == [], f"seed {seed}"

    assert level_documents(db) == level_documents(single.db), f"seed {seed}"
    expected = answers(single)
    assert all(expected), expected
    for number, node in enumerate(nodes, 1):
        for query, got, want in zip(QUERIES, answers(node), expected, strict=True):
            assert got == want, f"seed {seed}: {query[0]} {query[2]} through node {number}"
    check = archive_check(first)
    assert check.returncode == 0, f"seed {seed}\n{check.stdout}{check.stderr}"
    assert counter_problems(db) == []

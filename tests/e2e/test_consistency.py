"""The archive stays exact under concurrent stores and after crashes (real FerretDB,
nodes as subprocesses, pynetdicom senders).

- Many associations, on one node and on two nodes sharing one database, storing into
  the same series, study and patient at once: every acknowledged instance is counted
  and listed, and C-FIND says so.
- The node and the database killed (SIGKILL) at random instants of stores and
  re-sends, then restarted: ``archive check`` finds nothing to repair, every
  acknowledged instance is there with the bytes last acknowledged (or a later version
  sent before the crash), and nothing is there that was never sent.
"""

from __future__ import annotations

import datetime
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import FerretDB, node_environment
from helpers import (
    CT_IMAGE,
    MR_IMAGE,
    ROOT,
    association,
    consistency_problems,
    counter_problems,
    identifier,
    make_dataset,
    to_part10,
    wait_for,
)
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from archive.gridstore import GridStore

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

UID = "1.2.826.0.1.3680043.10.2024"
CONTEXTS = [(CT_IMAGE, ExplicitVRLittleEndian), (MR_IMAGE, ExplicitVRLittleEndian),
            (StudyRootQueryRetrieveInformationModelFind, ExplicitVRLittleEndian)]


def instance(sop: str, series: str, study: str = f"{UID}.1", patient: str = "CONC-1",
             modality: str = "CT", description: str = "CONCURRENT") -> bytes:
    ds = make_dataset(patient_id=patient, study_uid=study, series_uid=series, sop_uid=sop,
                      modality=modality, sop_class=CT_IMAGE if modality == "CT" else MR_IMAGE,
                      StudyDescription=description)
    return to_part10(ds)


def send(node: Any, files: list[bytes], statuses: list[int]) -> None:
    """Store ``files`` over one association, recording each status."""
    with association(node, CONTEXTS) as assoc:
        for data in files:
            rsp = assoc.send_c_store(dcmread(BytesIO(data)))
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)


def archive_check(node: Any, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "archive", "check", "--grace", "0",
                           "--config", str(node.config_path), *extra],
                          capture_output=True, text=True, cwd=ROOT,
                          env=node_environment(), timeout=120)


def find_count(node: Any, level: str, key: str, **keys: Any) -> dict[str, str]:
    """{unique key: value of ``key``} of a Study Root C-FIND."""
    rows = {}
    unique = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
              "IMAGE": "SOPInstanceUID"}[level]
    with association(node, CONTEXTS) as assoc:
        for status, found in assoc.send_c_find(identifier(level, **{unique: "", key: "",
                                                                    **keys}),
                                               StudyRootQueryRetrieveInformationModelFind):
            if status.Status == 0xFF00:
                rows[str(found[unique].value)] = str(found[key].value)
    return rows


@pytest.mark.parametrize("nodes", [1, 2], ids=["one-node", "two-nodes"])
def test_concurrent_stores_into_one_series_study_and_patient_are_all_counted(
        node_factory: Any, nodes: int) -> None:
    first = node_factory()
    running = [first] + [node_factory(database=first.database) for _ in range(nodes - 1)]
    senders, per_sender = 4, 30
    series = [f"{UID}.1.1", f"{UID}.1.2"]
    rng = random.Random(7)
    batches = [[instance(f"{UID}.1.9.{s}.{n}", rng.choice(series),
                         modality=rng.choice(["CT", "MR"]))
                for n in range(per_sender)] for s in range(senders)]
    statuses: list[int] = []
    threads = [threading.Thread(target=send, args=(running[s % nodes], batch, statuses))
               for s, batch in enumerate(batches)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert statuses == [0] * (senders * per_sender)

    total = senders * per_sender
    db = first.db
    # the nodes write their batched level updates within write_behind_seconds
    wait_for(lambda: counter_problems(db) == [], 10, message="level documents to add up")
    assert consistency_problems(db) == []
    assert db.patients.find_one({"_id": "CONC-1"})["NumberOfPatientRelatedInstances"] == total
    for node in running:  # every node answers the same
        assert find_count(node, "STUDY", "NumberOfStudyRelatedInstances") == {
            f"{UID}.1": str(total)}
        counts = find_count(node, "SERIES", "NumberOfSeriesRelatedInstances",
                            StudyInstanceUID=f"{UID}.1")
        assert sum(map(int, counts.values())) == total
        assert len(find_count(node, "IMAGE", "SOPInstanceUID", StudyInstanceUID=f"{UID}.1",
                              SeriesInstanceUID="\\".join(series))) == total
    check = archive_check(first)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "consistent" in check.stdout


# --- crashes ----------------------------------------------------------------------------


class Sender:
    """Stores a stream of instances and re-sends until stopped, remembering what was
    acknowledged and what was sent after the last acknowledgement, per SOP UID."""

    def __init__(self, node: Any, rng: random.Random, prefix: str) -> None:
        self.node, self.rng, self.prefix = node, rng, prefix
        self.acknowledged: dict[str, bytes] = {}
        self.pending: dict[str, list[bytes]] = {}
        self.stop = threading.Event()
        self.count = 0

    def next_file(self) -> tuple[str, bytes]:
        self.count += 1
        known = list(self.acknowledged)
        if known and self.rng.random() < 0.35:  # a re-send: attributes, series, study move
            sop = self.rng.choice(known)
        else:
            sop = f"{self.prefix}.{self.count}"
        study = f"{self.prefix}.{self.rng.randint(1, 2)}"
        data = instance(sop, f"{study}.{self.rng.randint(1, 2)}", study=study,
                        patient=f"CRASH-{self.prefix[-1]}",
                        modality=self.rng.choice(["CT", "MR"]),
                        description=self.rng.choice(["A", "B"]))
        return sop, data

    def run(self) -> None:
        try:
            with association(self.node, CONTEXTS) as assoc:
                assoc.dimse_timeout = assoc.network_timeout = assoc.acse_timeout = 3
                while not self.stop.is_set() and assoc.is_established:
                    sop, data = self.next_file()
                    self.pending.setdefault(sop, []).append(data)
                    rsp = assoc.send_c_store(dcmread(BytesIO(data)))
                    if "Status" in rsp and rsp.Status == 0x0000:
                        self.acknowledged[sop] = data
                        self.pending[sop] = []
        except Exception:  # noqa: BLE001 - the node was killed under us
            pass


def _wait_listening(node: Any) -> None:
    wait_for(lambda: node.running and " listening on " in node.log(), 30)


def test_kill_at_random_instants_leaves_an_exact_archive(node_factory: Any,
                                                         private_ferretdb: FerretDB) -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    node = node_factory(ferret=private_ferretdb)
    acknowledged: dict[str, bytes] = {}
    pending: dict[str, list[bytes]] = {}
    for round_ in range(8):
        sender = Sender(node, rng, f"{UID}.7{round_ % 3}")
        sender.acknowledged = {k: v for k, v in acknowledged.items()
                               if k.startswith(sender.prefix)}
        thread = threading.Thread(target=sender.run)
        thread.start()
        time.sleep(rng.uniform(0.3, 2.5))
        victim = rng.choice(["node", "database", "both"])
        if victim in ("database", "both"):
            private_ferretdb.stop(kill=True)
        if victim in ("node", "both"):
            node.kill()
        time.sleep(rng.uniform(0, 0.5))
        sender.stop.set()
        if victim == "database":  # the node keeps running and refuses while it is away
            time.sleep(0.5)
        private_ferretdb.start()
        if not node.running:
            node.launch()
        thread.join(60)
        for sop, versions in sender.pending.items():  # sent after the last acknowledgement
            acked_now = sender.acknowledged.get(sop) is not acknowledged.get(sop)
            pending[sop] = versions if acked_now else pending.get(sop, []) + versions
        acknowledged.update(sender.acknowledged)
        # the node finishes what the crash interrupted (journal) once the database answers
        wait_for(lambda: not node.journal_pending(), 60)

    replays = node.log().count("journal replayed")
    print(f"{len(acknowledged)} acknowledged, journal replayed {replays} times")
    check = archive_check(node)
    assert check.returncode == 0, f"seed {seed}\n{check.stdout}{check.stderr}"
    db = node.db
    assert consistency_problems(db) == [], seed
    assert counter_problems(db) == [], seed
    stored = {doc["_id"]: doc["file_id"] for doc in db.instances.find({}, {"file_id": 1})}
    files = _reader(db)
    for sop in acknowledged:
        assert sop in stored, f"seed {seed}: acknowledged {sop} lost"
    for sop, file_id in stored.items():
        allowed = [*([acknowledged[sop]] if sop in acknowledged else []),
                   *pending.get(sop, [])]
        assert allowed, f"seed {seed}: {sop} was never sent"
        assert version(files(file_id)) in map(version, allowed), \
            f"seed {seed}: {sop} holds a version not sent last"


def version(data: bytes) -> tuple[str, ...]:
    """What tells the versions of one instance apart (the sender's file and the stored
    one differ in their file meta: pynetdicom writes its own)."""
    ds = dcmread(BytesIO(data))
    return tuple(str(ds.get(k, "")) for k in ("PatientID", "StudyInstanceUID",
                                              "SeriesInstanceUID", "Modality",
                                              "StudyDescription"))


def _reader(db: Any) -> Callable[[Any], bytes]:
    return GridStore(db).read


def test_archive_check_finds_and_repairs_what_a_lost_journal_leaves(
        node_factory: Any, tmp_path: Path) -> None:
    """Damage the journal cannot name (it was lost): found, repaired, exit status."""
    node = node_factory()
    files = [instance(f"{UID}.5.{n}", f"{UID}.5.1", study=f"{UID}.5") for n in range(3)]
    send(node, files, statuses := [])
    assert statuses == [0, 0, 0]
    db = node.db
    wait_for(lambda: counter_problems(db) == [], 30)  # level updates are written behind
    # an orphan original, a wrong counter, a series document without instances
    GridStore(db).put(b"orphan", "orphan.dcm", {})
    db.studies.update_one({"_id": f"{UID}.5"}, {"$set": {"NumberOfStudyRelatedInstances": 7}})
    db.series.insert_one({"_id": f"{UID}.5.99", "StudyInstanceUID": f"{UID}.5",
                          "instances": [], "NumberOfSeriesRelatedInstances": 1})
    found = archive_check(node)
    assert found.returncode == 1
    assert "belongs to no instance" in found.stdout
    assert "NumberOfStudyRelatedInstances 7 != 3" in found.stdout
    assert f"series {UID}.5.99: no instance below it" in found.stdout
    repaired = archive_check(node, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert archive_check(node).returncode == 0
    assert consistency_problems(db) == [] and counter_problems(db) == []
    as_json = archive_check(node, "--json")
    assert '"clean": true' in as_json.stdout


def test_a_full_startup_check_repairs_what_a_lost_journal_left(node_factory: Any) -> None:
    """``startup_check: full``: the node runs ``archive check --repair`` as it starts."""
    node = node_factory()
    send(node, [instance(f"{UID}.6.1", f"{UID}.6.1", study=f"{UID}.6")], statuses := [])
    assert statuses == [0]
    db = node.db
    wait_for(lambda: counter_problems(db) == [], 30)  # level updates are written behind
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
    orphan = GridStore(db).put(b"left by a crash", "orphan.dcm", {})
    db["fs.files"].update_one({"_id": orphan}, {"$set": {"uploadDate": old}})
    recent = GridStore(db).put(b"a store in flight", "recent.dcm", {})
    db.studies.update_one({"_id": f"{UID}.6"}, {"$set": {"NumberOfStudyRelatedInstances": 9}})
    node.stop()
    node.config["startup_check"] = "full"
    node.config_path.write_text(yaml.safe_dump(node.config), encoding="utf-8")
    node.launch()
    wait_for(lambda: "startup check:" in node.log(), 30)
    assert db["fs.files"].count_documents({"_id": orphan}) == 0
    assert db["fs.files"].count_documents({"_id": recent}) == 1  # younger than the grace
    assert db.studies.find_one({"_id": f"{UID}.6"})["NumberOfStudyRelatedInstances"] == 1

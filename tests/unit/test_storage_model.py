"""Generated sequences of stores, re-sends, conflicts and database failures (mongomock).

After every step the archive must be exact: every GridFS file belongs to an instance
and every instance names a whole file; every level document's counters, child lists,
Modalities / SOP Classes in Study are what its instances make them (checked twice: by
the product's ``archive check`` and by the independent oracle of ``tests/helpers``).
At the end the archive must be what a fresh store of its final instances makes:
re-sends, moves, accepted conflicts and recovered failures leave no trace.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import mongomock
import pytest
from helpers import (
    CT_IMAGE,
    MR_IMAGE,
    SECONDARY_CAPTURE,
    consistency_problems,
    counter_problems,
    make_dataset,
    to_part10,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo.errors import AutoReconnect

from archive.check import check
from archive.storage import (
    HIERARCHY_CONFLICT,
    OUT_OF_RESOURCES,
    SUCCESS,
    Archive,
    StoreOutcome,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PATIENTS = ("P1", "P2", "P3")
STUDIES = ("1.2.9.1", "1.2.9.2", "1.2.9.3")
SERIES = ("1.2.9.1.1", "1.2.9.1.2", "1.2.9.2.1", "1.2.9.3.1")
SOPS = tuple(f"1.2.9.9.{n}" for n in range(1, 8))
CLASSES = {"CT": CT_IMAGE, "MR": MR_IMAGE, "OT": SECONDARY_CAPTURE}

store_op = st.fixed_dictionaries({
    "sop": st.sampled_from(SOPS),
    "patient": st.sampled_from(PATIENTS),
    "study": st.sampled_from(STUDIES),
    "series": st.sampled_from(SERIES),
    "modality": st.sampled_from(sorted(CLASSES)),
    "name": st.sampled_from(("DOE^J", "ROE^R")),
    "description": st.sampled_from(("HEAD", "CHEST")),
    # a database failure during this store: (collection, method, reply lost?)
    "failure": st.none() | st.tuples(
        st.sampled_from(["instances.insert_one", "instances.find_one_and_replace",
                         "series.update_one", "studies.find_one_and_update",
                         "studies.update_one", "patients.update_one",
                         "series.find_one_and_update", "files.insert_one",
                         "chunks.insert_one"]),
        st.booleans()),
    # the undo fails too (database still away): the journal finishes it later
    "undo_fails": st.booleans(),
    # with batched level updates: write the batches now, or let a write of them fail
    "flush": st.sampled_from(["later", "now", "fails"]),
})


class Flaky:
    """A collection whose ``method`` fails ``times`` times with AutoReconnect."""

    def __init__(self, target: Any, method: str, applied: bool, times: int = 1) -> None:
        self._target, self._method, self._applied, self._left = target, method, applied, times

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name != self._method:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._left > 0:
                self._left -= 1
                if self._applied:
                    attr(*args, **kwargs)
                raise AutoReconnect(f"injected: {name}")
            return attr(*args, **kwargs)
        return call


def part10(op: dict[str, Any]) -> bytes:
    ds = make_dataset(patient_id=op["patient"], patient_name=op["name"],
                      study_uid=op["study"], series_uid=op["series"], sop_uid=op["sop"],
                      modality=op["modality"], sop_class=CLASSES[op["modality"]],
                      StudyDescription=op["description"])
    ds.PixelData = random.randbytes(2000)
    ds["PixelData"].VR = "OW"
    return to_part10(ds)


_TARGETS = {"instances": "instances", "series": "series", "studies": "studies",
            "patients": "patients"}


def run_store(archive: Archive, op: dict[str, Any]) -> StoreOutcome:
    """Store one instance, with the failure the op asks for; the outcome."""
    failure = op["failure"]
    saved: dict[str, Any] = {}
    if failure is not None:
        where, method = failure[0].split(".")
        owner = archive.files if where in ("files", "chunks") else archive
        saved[where] = (owner, getattr(owner, where))
        setattr(owner, where, Flaky(getattr(owner, where), method, failure[1]))
    if failure is not None and op["undo_fails"]:
        # the ping before the undo fails: the undo goes to the journal at once
        archive.health.check = lambda: False  # type: ignore[method-assign]
    try:
        return archive.store(part10(op))
    finally:
        archive.health.__dict__.pop("check", None)
        for where, (owner, original) in saved.items():
            setattr(owner, where, original)


def assert_exact(archive: Archive, db: Any) -> None:
    assert consistency_problems(db) == []
    assert counter_problems(db) == []
    report = check(archive, grace=0)
    assert report.problems == []


def flush_as_told(archive: Archive, op: dict[str, Any]) -> bool:
    """Write the batches as the op says, then replay the journal; False for "later".
    "fails": the database goes away while a batch is written, then it is back."""
    if op["flush"] == "later":
        return False
    if op["flush"] == "fails":
        real = archive.studies
        archive.studies = Flaky(real, "find_one_and_update", applied=False)
        try:
            archive.flush()
        finally:
            archive.studies = real
    archive.flush()
    archive.reconcile()  # the database is back: the journal finishes what failed
    return True


def level_state(db: Any) -> dict[str, Any]:
    """What users see of the level documents (bookkeeping fields left out)."""
    ignored = {"rev", "latest", "variants"}
    state: dict[str, Any] = {}
    for name in ("series", "studies", "patients"):
        docs = {}
        for doc in db[name].find():
            docs[doc["_id"]] = {k: sorted(v) if isinstance(v, list) else v
                                for k, v in doc.items() if k not in ignored}
            for counts in ("sop_class_counts", "modality_counts"):
                if counts in docs[doc["_id"]]:
                    docs[doc["_id"]][counts] = {
                        k: n for k, n in docs[doc["_id"]][counts].items() if n}
        state[name] = docs
    return state


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(store_op, min_size=1, max_size=12),
       policy=st.sampled_from(["refuse", "accept"]), batched=st.booleans())
def test_any_sequence_of_stores_leaves_the_archive_exact(tmp_path: Path,
                                                         ops: list[dict[str, Any]],
                                                         policy: str, batched: bool) -> None:
    db = mongomock.MongoClient().archive
    journal = tmp_path / f"journal-{random.getrandbits(64):x}"
    # batched: level updates wait in batches (no writer thread: written when told)
    archive = Archive(db, "fs", "replace", journal, policy, write_behind=3600 * batched)
    for op in ops:
        outcome = run_store(archive, op)
        assert outcome.status in (SUCCESS, OUT_OF_RESOURCES, HIERARCHY_CONFLICT), outcome
        if outcome.status == HIERARCHY_CONFLICT and policy == "accept":
            assert outcome.comment == "Series Instance UID belongs to another study"
        if op["failure"] is None:
            assert outcome.status != OUT_OF_RESOURCES
        if flush_as_told(archive, op):
            assert not archive.pending()
            assert_exact(archive, db)
    archive.flush()
    archive.reconcile()
    assert_exact(archive, db)

    # The same final instances stored afresh, in the order they were last stored,
    # make the same level documents.
    fresh_db = mongomock.MongoClient().archive
    fresh = Archive(fresh_db, "fs", "replace", journal.with_name(journal.name + "-fresh"),
                    "accept")
    for doc in sorted(db.instances.find(), key=lambda d: d["file_id"]):
        assert fresh.store(archive.files.read(doc["file_id"])).status == SUCCESS
    assert level_state(fresh_db) == level_state(db)


#: Stores into two studies of one patient whose attributes stay the same, series of
#: their own study (a re-send may move an instance to another study): the first
#: instance of a series is mostly one of a study the node knows, whose study and
#: patient updates wait in its series' batch (WriteBehind.open).
opening_op = st.builds(
    lambda sop, study, series, modality, failure, flush: {
        "sop": sop, "patient": PATIENTS[0], "name": "DOE^J", "description": "HEAD",
        "study": STUDIES[study], "series": f"{STUDIES[study]}.{series}",
        "modality": modality, "failure": failure, "undo_fails": False, "flush": flush},
    st.sampled_from(SOPS), st.integers(0, 1), st.integers(1, 4), st.sampled_from(["CT", "MR"]),
    st.none() | st.none() | st.tuples(st.sampled_from(["series.update_one",
                                                        "studies.find_one_and_update",
                                                        "patients.update_one"]), st.booleans()),
    st.sampled_from(["later", "later", "now", "fails"]))


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(opening_op, min_size=2, max_size=14))
def test_series_opened_in_known_studies_leave_the_archive_exact(
        tmp_path: Path, ops: list[dict[str, Any]]) -> None:
    """Batched, with failures of the level updates and of the batches' writes: the
    level documents end as an archive without batches makes them."""
    db = mongomock.MongoClient().archive
    journal = tmp_path / f"journal-{random.getrandbits(64):x}"
    archive = Archive(db, "fs", "replace", journal, write_behind=3600)
    plain_db = mongomock.MongoClient().archive
    plain = Archive(plain_db, "fs", "replace", journal.with_name(journal.name + "-plain"))
    for op in ops:
        outcome = run_store(archive, op)
        assert outcome.status in (SUCCESS, OUT_OF_RESOURCES), outcome
        if outcome.ok:
            assert plain.store(part10(op)).ok
        if flush_as_told(archive, op):
            assert_exact(archive, db)
    archive.flush()
    archive.reconcile()
    assert_exact(archive, db)
    assert level_state(db) == level_state(plain_db)


def test_patient_conflicts_are_refused_by_default(tmp_path: Path) -> None:
    db = mongomock.MongoClient().archive
    archive = Archive(db, "fs", "replace", tmp_path / "journal")
    first = {"sop": SOPS[0], "patient": "P1", "study": STUDIES[0], "series": SERIES[0],
             "modality": "CT", "name": "DOE^J", "description": "HEAD", "failure": None,
             "undo_fails": False, "flush": "now"}
    assert run_store(archive, first).status == SUCCESS
    before = level_state(db)
    # another patient's instance into that study, that series, or re-using that SOP UID
    for change in ({"sop": SOPS[1], "patient": "P2"},
                   {"sop": SOPS[1], "patient": "P2", "series": SERIES[1]},
                   {"patient": "P2"}):
        outcome = archive.store(part10({**first, **change}))
        assert outcome.status == HIERARCHY_CONFLICT, change
        assert "another patient" in outcome.comment
    # a series named under another study is never accepted
    outcome = archive.store(part10({**first, "sop": SOPS[2], "study": STUDIES[1]}))
    assert (outcome.status, outcome.comment) == (
        HIERARCHY_CONFLICT, "Series Instance UID belongs to another study")
    assert level_state(db) == before
    assert db.instances.count_documents({}) == 1
    assert_exact(archive, db)

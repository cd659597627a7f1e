"""Two nodes on one database (mongomock): another node's store between two writes.

A node keeps things in memory to go faster (the series it has seen, level updates
written behind in batches), and writes a store's level updates one document at a time.
Another node's store may come between any two of those writes; the level documents
must end as a single node would leave them.  Each test interleaves one such store by
hand, at the point where it used to break them (tests/e2e/test_scale_out.py runs the
same with real nodes and a real FerretDB, where the interleavings are left to chance).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mongomock
import pytest
from helpers import CT_IMAGE, MR_IMAGE, counter_problems, make_dataset, to_part10
from pymongo.errors import DuplicateKeyError

from archive.check import check
from archive.storage import Archive

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STUDY, SERIES, OTHER_SERIES = "1.2.826.0.1.7", "1.2.826.0.1.7.1", "1.2.826.0.1.7.2"


def instance(sop: str, modality: str = "CT", series: str = SERIES, **attributes: Any) -> bytes:
    return to_part10(make_dataset(patient_id="TWO-1", study_uid=STUDY, series_uid=series,
                                  sop_uid=sop, modality=modality,
                                  sop_class=CT_IMAGE if modality == "CT" else MR_IMAGE,
                                  **attributes))


class Then:
    """A collection that runs ``step`` (another node's store) once, right after (or,
    with ``instead``, in place of) the first call of ``method``."""

    def __init__(self, target: Any, method: str, step: Callable[[], Any],
                 instead: BaseException | None = None) -> None:
        self._target, self._method, self._step, self._instead = target, method, step, instead

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name != self._method or self._step is None:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            step, self._step = self._step, None
            if self._instead is not None:
                step()
                raise self._instead
            result = attr(*args, **kwargs)
            step()
            return result
        return call


@pytest.fixture
def db() -> Any:
    return mongomock.MongoClient().archive


@pytest.fixture
def nodes(db: Any, tmp_path: Path) -> tuple[Archive, Archive]:
    """Two nodes: journals of their own, batches written when told (``flush``)."""
    return (Archive(db, "fs", "replace", tmp_path / "a", write_behind=3600),
            Archive(db, "fs", "replace", tmp_path / "b", write_behind=3600))


def assert_exact(node: Archive, db: Any) -> None:
    node.flush()
    assert counter_problems(db) == []
    assert check(node, grace=0).problems == []


def test_a_resend_elsewhere_between_a_batchs_series_and_study_updates(
        nodes: tuple[Archive, Archive], db: Any) -> None:
    """B's re-send changes a modality just after A's batch counted its instances in the
    series but not yet in the study: a rebuild of the study from its series there
    counted them twice (the batch then added them again)."""
    a, b = nodes
    assert a.store(instance("1.1")).ok  # A now knows the series
    assert a.store(instance("1.2")).ok  # batched
    a.series = Then(a.series, "update_one", lambda: b.store(instance("1.1", "MR")))
    a.flush()
    assert_exact(a, db)
    study = db.studies.find_one({"_id": STUDY})
    assert study["NumberOfStudyRelatedInstances"] == 2
    assert sorted(study["ModalitiesInStudy"]) == ["CT", "MR"]


def test_two_nodes_creating_one_series_at_once(nodes: tuple[Archive, Archive],
                                               db: Any) -> None:
    """A's upsert of a new series collides with B's (both looked before either
    inserted), B being between its series and study updates: a rebuild by A there
    counted B's instance and series, then B counted them again."""
    a, b = nodes
    b.series = Then(b.series, "update_one", lambda: a.store(instance("1.2")))
    a.series = Then(a.series, "update_one", lambda: None,
                    instead=DuplicateKeyError("E11000 duplicate key error: _id"))
    assert b.store(instance("1.1")).ok
    assert_exact(a, db)
    assert db.patients.find_one()["NumberOfPatientRelatedSeries"] == 1


def test_a_resend_elsewhere_before_the_store_it_replaces_counted_it(
        nodes: tuple[Archive, Archive], db: Any) -> None:
    """B re-sends as MR the CT instance A is storing, after A's instance document and
    before A's level updates: the study counts CT -1 for a moment, and must not list
    CT once A has counted it back to zero."""
    a, b = nodes
    assert a.store(instance("1.1", "MR")).ok
    a.instances = Then(a.instances, "insert_one", lambda: b.store(instance("1.2", "MR")))
    assert a.store(instance("1.2", "CT", SeriesDescription="OTHER")).ok
    assert_exact(a, db)
    assert db.studies.find_one()["ModalitiesInStudy"] == ["MR"]


def test_a_batch_after_a_rebuild_elsewhere_dropped_its_variants(
        nodes: tuple[Archive, Archive], db: Any) -> None:
    """A knows the series with the attributes of 1.1; B's re-send gives 1.1 others and a
    move out of the (mixed) series makes B rebuild it, which keeps only the variants of
    the instances now there.  A's next batch of instances with 1.1's old attributes must
    put their variant back: else the series looks unmixed and access rules would judge
    all its instances by one of them."""
    a, b = nodes
    assert a.store(instance("1.1")).ok
    assert b.store(instance("1.1", StudyDescription="NECK")).ok
    assert b.store(instance("1.2", StudyDescription="NECK")).ok
    assert b.store(instance("1.2", series=OTHER_SERIES, StudyDescription="NECK")).ok
    assert a.store(instance("1.3")).ok  # batched
    assert_exact(a, db)
    assert len(db.series.find_one({"_id": SERIES})["variants"]["STUDY"]) == 2


def test_a_store_into_a_series_as_its_last_instance_moves_out_elsewhere(
        nodes: tuple[Archive, Archive], db: Any) -> None:
    """B's re-send moves the last instance out of the series; A stores a new one into
    it between B's series update and B's deletion of the (then empty) series.  The
    series is not deleted (it changed): the study and patient must keep counting it."""
    a, b = nodes
    assert b.store(instance("1.1")).ok
    b.series = Then(b.series, "find_one_and_update", lambda: a.store(instance("1.2")))
    assert b.store(instance("1.1", series=OTHER_SERIES)).ok
    assert_exact(a, db)
    assert db.studies.find_one()["NumberOfStudyRelatedSeries"] == 2

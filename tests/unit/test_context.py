"""The core context without a network nor a front end: what it decides and counts
(nothing here reaches the database: the client connects on first use), and what both
front ends ask of it -- storing a Part-10 file for a principal, the answers of a query
for a decision -- over mongomock."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import mongomock
from helpers import make_dataset, to_part10
from pydicom.dataset import Dataset

from acl.patterns import to_json
from acl.rules import NOT_AUTHORIZED, Rule, decide
from archive.config import Config
from archive.context import Context
from archive.find import Finder
from archive.model import STUDY
from archive.query import translate
from archive.storage import Archive, StoreOutcome


def _context(**acl: bool) -> Context:
    cfg = Config()
    cfg.database.uri = "mongodb://127.0.0.1:1/"  # never contacted by these tests
    cfg.acl = dataclasses.replace(cfg.acl, **acl)
    return Context(cfg)


def test_without_access_control_everything_is_allowed() -> None:
    context = _context(enabled=False)
    try:
        decision = context.authorize("anyone", "Store")
        assert decision.allowed and not decision.restricted
    finally:
        context.client.close()


def test_stores_are_refused_once_stopping_and_drained_before_it_closes() -> None:
    context = _context()
    try:
        assert context.begin_store()
        finished = threading.Event()

        def finish() -> None:
            time.sleep(0.3)
            finished.set()
            context.end_store()

        threading.Thread(target=finish).start()
        context.stopping.set()
        assert not context.begin_store()  # no new store once the archive stops
        context.drain(5.0)
        assert finished.is_set()  # the store in flight was waited for
        started = time.monotonic()
        context.drain(5.0)  # nothing in flight: at once
        assert time.monotonic() - started < 0.1
    finally:
        context.client.close()


# --- what both front ends ask of it: store_as and answers (mongomock) -------------------


def _archived(tmp_path: Path) -> Context:
    """A context whose storage and finder work on mongomock."""
    context = _context()
    db = mongomock.MongoClient(tz_aware=True)["archive"]
    context.archive = Archive(db, journal=tmp_path / "journal.jsonl")
    context.finder = Finder(db)
    return context


def _rule(service: str, index: int, **pattern: Any) -> Rule:
    return Rule("modality", service, to_json(pattern) if pattern else None, index)


def _studies(context: Context, decision: Any) -> list[str]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = STUDY
    identifier.StudyInstanceUID = ""
    query = translate(identifier, STUDY, **context.query_options)
    return sorted(str(a.StudyInstanceUID)
                  for a in context.answers(decision, query, identifier, STUDY))


def test_store_as_and_answers_for_an_unrestricted_principal(tmp_path: Path) -> None:
    context = _archived(tmp_path)
    try:
        decision = decide([_rule("Store", 1), _rule("Query", 2)], "modality", "Store")
        ds = make_dataset(modality="MR")
        stored = context.store_as(decision, to_part10(ds), "CT01")
        assert stored.outcome.ok and stored.rule is not None and stored.rule.index == 1
        assert stored.ds is not None and stored.error is None and not stored.outside_rules
        query = decide([_rule("Query", 2)], "modality", "Query")
        assert _studies(context, query) == [ds.StudyInstanceUID]
    finally:
        context.client.close()


def test_store_as_and_answers_for_a_restricted_principal(tmp_path: Path) -> None:
    context = _archived(tmp_path)
    try:
        anyone = decide([_rule("Store", 1)], "modality", "Store")
        mr = make_dataset(modality="MR")
        assert context.store_as(anyone, to_part10(mr), "MR01").outcome.ok
        decision = decide([_rule("Store", 3, Modality="CT")], "modality", "Store")
        ct = make_dataset(modality="CT")
        stored = context.store_as(decision, to_part10(ct), "CT01")
        assert stored.outcome.ok and stored.rule is not None and stored.rule.index == 3
        refused = context.store_as(decision, to_part10(make_dataset(modality="MR")), "CT01")
        assert refused.outside_rules and refused.outcome.status == NOT_AUTHORIZED
        assert refused.ds is not None and refused.rule is None
        query = decide([_rule("Query", 4, Modality="CT")], "modality", "Query")
        assert query.restricted
        assert _studies(context, query) == [ct.StudyInstanceUID]  # not the MR study
    finally:
        context.client.close()


def test_store_as_refusals_and_failures_leave_nothing_in_flight(tmp_path: Path) -> None:
    context = _archived(tmp_path)
    try:
        decision = decide([_rule("Store", 1)], "modality", "Store")
        ds = make_dataset()
        checked = context.store_as(decision, to_part10(ds), "CT01",
                                   lambda _ds: StoreOutcome(0xA900, "another study"))
        assert (checked.outcome.status, checked.outcome.comment) == (0xA900, "another study")
        assert checked.rule is not None and checked.ds is not None
        assert context.archive.instances.find_one({"_id": ds.SOPInstanceUID}) is None
        garbage = context.store_as(decision, b"not DICOM", "CT01")
        assert garbage.outcome.status == 0xC000 and not garbage.outside_rules
        assert garbage.ds is None and garbage.rule is None

        def broken(_ds: Dataset) -> None:
            raise RuntimeError("boom")

        failed = context.store_as(decision, to_part10(ds), "CT01", broken)
        assert isinstance(failed.error, RuntimeError) and failed.ds is not None
        assert failed.outcome.status == 0xA700 and failed.rule is None
        assert failed.outcome.comment == "internal error: RuntimeError"
        context.stopping.set()
        stopped = context.store_as(decision, to_part10(ds), "CT01")
        assert stopped.stopping and stopped.outcome.status == 0xA700
        started = time.monotonic()
        context.drain(5.0)  # every store_as above ended its store
        assert time.monotonic() - started < 0.1
    finally:
        context.client.close()

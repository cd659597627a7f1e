"""The core context without a network nor a front end: what it decides and counts
(nothing here reaches the database: the client connects on first use)."""

from __future__ import annotations

import dataclasses
import threading
import time

from archive.config import Config
from archive.context import Context


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

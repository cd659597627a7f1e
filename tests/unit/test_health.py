"""The database health state: refusing at once while the database is away, and noticing
when it is back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mongomock
import pytest
from helpers import make_dataset, to_part10
from pymongo.errors import AutoReconnect, ServerSelectionTimeoutError

from archive import health as health_module
from archive.health import DatabaseHealth
from archive.storage import OUT_OF_RESOURCES, SUCCESS, Archive

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Switchable:
    """A database whose ping answers or not; counts the pings."""

    def __init__(self) -> None:
        self.answers = True
        self.pings = 0

    def command(self, name: str) -> dict[str, Any]:
        assert name == "ping"
        self.pings += 1
        if not self.answers:
            raise ServerSelectionTimeoutError("injected: no server")
        return {"ok": 1}


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ping intervals short enough for a unit test."""
    monkeypatch.setattr(health_module, "DOWN_INTERVAL", 0.05)
    monkeypatch.setattr(health_module, "UP_INTERVAL", 0.2)


def test_a_store_while_the_database_is_down_is_refused_at_once(tmp_path: Path) -> None:
    db = mongomock.MongoClient().archive
    pinged = Switchable()
    pinged.answers = False
    health = DatabaseHealth(pinged)  # type: ignore[arg-type]
    health.mark_down("injected")
    archive = Archive(db, journal=tmp_path / "journal.jsonl", health=health)

    started = time.monotonic()
    outcome = archive.store(to_part10(make_dataset()))

    assert time.monotonic() - started < 0.5
    assert (outcome.status, outcome.comment) == (OUT_OF_RESOURCES, "database unavailable")
    assert outcome.sop_instance_uid
    assert db.instances.count_documents({}) == 0 and db["fs.files"].count_documents({}) == 0
    assert not archive.pending()

    pinged.answers = True  # back: without a watcher, the next look pings again
    time.sleep(health_module.DOWN_INTERVAL)
    assert archive.store(to_part10(make_dataset())).status == SUCCESS


def test_check_pings_while_up_and_not_while_known_down() -> None:
    pinged = Switchable()
    health = DatabaseHealth(pinged)  # type: ignore[arg-type]
    assert health.check() and pinged.pings == 1
    pinged.answers = False
    assert not health.check()
    assert not health.up and "ServerSelectionTimeoutError" in health.reason
    pings = pinged.pings
    assert not health.check()
    assert pinged.pings == pings  # known down: no second wait on a dead server


def test_the_watcher_sees_an_outage_and_the_return(fast: None) -> None:
    pinged = Switchable()
    health = DatabaseHealth(pinged)  # type: ignore[arg-type]
    health.start()
    try:
        pinged.answers = False
        health.suspect(AutoReconnect("injected: connection reset"))
        deadline = time.monotonic() + 2
        while health.up and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not health.up
        assert not health.wait_up(0.2)
        pinged.answers = True
        assert health.wait_up(2)
    finally:
        health.stop()


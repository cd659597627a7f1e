"""Searching the audit trail on the embedded FerretDB (``acl.audit.search``: the
console's Audit page, ``archive audit``).

The newest entries are looked for in windows of ``at``, the entry's time as text, which
FerretDB searches in its index; the answers must be exactly those of a search of the
whole trail, whatever the filter, the page and the entries (some in the future of
another node's clock, some written before ``at`` existed).
"""

from __future__ import annotations

import datetime
import random
from typing import Any

import pytest
from conftest import FerretDB, unique_name
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acl import audit

pytestmark = pytest.mark.ferretdb

NOW = audit.now()
USERS = ("alice", "bob", "carol")
EVENTS = ("C-STORE", "C-FIND", "A-ASSOCIATE", "DELETE")
STATUSES = (0x0000, 0x0000, 0xC000, 0xA700, 0x0107, 0xFF00)


def _entry(n: int, moment: datetime.datetime, rng: random.Random, legacy: bool
           ) -> dict[str, Any]:
    entry = {"time": moment, "kind": "operation", "principal": rng.choice(USERS),
             "event": rng.choice(EVENTS), "status": rng.choice(STATUSES),
             "allowed": rng.random() > 0.1, "request": f"entry {n}"}
    return entry if legacy else audit.stamp(entry)


@pytest.fixture(scope="module")
def trail(ferretdb: FerretDB) -> Any:
    """1,500 entries: a third in the last hour (a few in the same millisecond), the rest
    over two years, a few a minute ahead (another node's clock), and the oldest ones
    written before ``at`` existed."""
    name = unique_name("audit")
    db = ferretdb.client[name]
    log = audit.AuditLog(db)
    log.start()  # its indexes
    log.stop()
    rng = random.Random(7)
    moments = [NOW - datetime.timedelta(seconds=rng.uniform(0, 3600)) for _ in range(480)]
    moments += [moments[-1]] * 20  # the same millisecond: the order is still defined
    moments += [NOW - datetime.timedelta(days=rng.uniform(0, 730)) for _ in range(900)]
    moments += [NOW + datetime.timedelta(seconds=rng.uniform(1, 60)) for _ in range(20)]
    legacy_before = NOW - datetime.timedelta(days=600)
    moments += [legacy_before - datetime.timedelta(days=rng.uniform(0, 200))
                for _ in range(80)]
    docs = [_entry(n, moment, rng, legacy=moment < legacy_before)
            for n, moment in enumerate(moments)]
    for start in range(0, len(docs), 500):
        db[audit.COLLECTION].insert_many(docs[start:start + 500])
    every = list(db[audit.COLLECTION].find({}))
    yield db, every
    ferretdb.client.drop_database(name)


def _expected(every: list[dict[str, Any]], user: str | None, event: str | None,
              since: datetime.datetime | None, until: datetime.datetime | None,
              failures: bool, offset: int, limit: int) -> list[str]:
    def naive(moment: datetime.datetime) -> datetime.datetime:
        return moment.astimezone(datetime.timezone.utc).replace(tzinfo=None)

    found = [e for e in every
             if (user is None or e["principal"] == user)
             and (event is None or e["event"] == event)
             and (since is None or e["time"] >= naive(since))
             and (until is None or e["time"] < naive(until))
             and (not failures or audit.is_failure(e))]
    found.sort(key=lambda e: (e["time"], e["_id"]), reverse=True)
    found = found[offset:]
    return [e["request"] for e in (found[:limit] if limit else found)]


AGO = st.sampled_from([None, 1800, 86400 * 3, 86400 * 40, 86400 * 800])


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=st.sampled_from([None, *USERS]), event=st.sampled_from([None, *EVENTS]),
       since=AGO, until=AGO, failures=st.booleans(), offset=st.integers(0, 120),
       limit=st.sampled_from([0, 1, 10, 51, 400]))
def test_a_search_answers_as_a_search_of_the_whole_trail(
        trail: Any, user: str | None, event: str | None, since: int | None,
        until: int | None, failures: bool, offset: int, limit: int) -> None:
    db, every = trail
    since_at = NOW - datetime.timedelta(seconds=since) if since is not None else None
    until_at = NOW - datetime.timedelta(seconds=until) if until is not None else None
    found = audit.search(db, user=user, event=event, since=since_at, until=until_at,
                         failures=failures, offset=offset, limit=limit)
    assert [e["request"] for e in found] == _expected(
        every, user, event, since_at, until_at, failures, offset, limit)
    assert all("at" not in e and "_id" not in e for e in found)


def test_the_newest_entries_are_searched_in_an_index(trail: Any) -> None:
    """The window's condition reaches SQLite as a search of the ``at`` index (a scan
    would decode the whole trail, 2.4 s per 100,000 entries)."""
    db, every = trail
    window = {"at": {"$gte": audit.at_text(NOW - audit.WINDOWS[0])}}
    for condition in (window, {"$and": [{"event": "C-STORE"}, window]}):
        plan = db.command("explain", {"find": audit.COLLECTION, "filter": condition})
        detail = " | ".join(str(p) for p in plan["queryPlanner"].get("Plan", []))
        assert "USING INDEX" in detail and "SCAN" not in detail.replace("USING", ""), detail
    newest = audit.entries(db, limit=5)  # archive audit: oldest first
    assert [e["request"] for e in newest] == list(reversed(_expected(
        every, None, None, None, None, False, 0, 5)))


def test_at_sorts_as_the_time_does() -> None:
    moments = [datetime.datetime(2026, 1, 2, 3, 4, 5, 999999, tzinfo=datetime.timezone.utc),
               datetime.datetime(2026, 1, 2, 3, 4, 6, tzinfo=datetime.timezone.utc),
               datetime.datetime(2026, 1, 2, 4, 4, 6, 1000,
                                 tzinfo=datetime.timezone(datetime.timedelta(hours=1))),
               datetime.datetime(2026, 1, 2, 3, 4, 6, 1500)]  # naive: UTC, as pymongo reads
    assert [audit.at_text(m) for m in moments] == [
        "2026-01-02T03:04:05.999Z", "2026-01-02T03:04:06.000Z", "2026-01-02T03:04:06.001Z",
        "2026-01-02T03:04:06.001Z"]

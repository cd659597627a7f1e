"""What the console's admin pages read: the audit trail searched (by user, operation,
time, failures, a page at a time) and who may do what to given instances."""

from __future__ import annotations

import datetime
from typing import Any

import mongomock
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_acl_rules import document, rule

from acl import audit
from acl.review import OTHERS, principals, review
from archive.query import evaluate

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")

T0 = datetime.datetime(2026, 12, 1, 10, tzinfo=datetime.timezone.utc)

entry_values = st.fixed_dictionaries({
    "principal": st.sampled_from(["alice", "bob", "anonymous"]),
    "event": st.sampled_from(audit.EVENTS),
    "minute": st.integers(0, 120),
}, optional={
    "allowed": st.booleans(),
    "status": st.one_of(st.sampled_from([0x0000, 0x0001, 0x0107, 0x0110, 0x0124, 0x02FF,
                                         0x0300, 0xA700, 0xA900, 0xB000, 0xC000, 0xCFFF,
                                         0xD000, 0xFE00, 0xFF00]),
                        st.integers(0, 0xFFFF)),
})


def _entries(values: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**{k: v for k, v in value.items() if k != "minute"},
             "time": T0 + datetime.timedelta(minutes=value["minute"], milliseconds=n)}
            for n, value in enumerate(values)]


@settings(max_examples=40, deadline=None)
@given(st.lists(entry_values, max_size=40), st.sampled_from([None, "alice", "bob"]),
       st.sampled_from([None, "C-FIND", "A-ABORT", "DELETE"]), st.booleans(), st.booleans(),
       st.integers(0, 60), st.integers(30, 121))
def test_search_finds_what_its_conditions_say(values: list[dict[str, Any]], user: str | None,
                                              event: str | None, failures: bool,
                                              associations: bool, start: int,
                                              end: int) -> None:
    """The database's filter is the documented predicate (failures: is_failure), the
    newest first, a page at a time without gap or overlap."""
    db = mongomock.MongoClient(tz_aware=True)["audit"]
    written = _entries(values)
    if written:
        db[audit.COLLECTION].insert_many([dict(e) for e in written])
    since, until = T0 + datetime.timedelta(minutes=start), T0 + datetime.timedelta(minutes=end)
    expected = sorted((e for e in written
                       if (user is None or e["principal"] == user)
                       and (event is None or e["event"] == event)
                       and (not associations or e["event"] in audit.ASSOCIATION_EVENTS)
                       and (not failures or audit.is_failure(e))
                       and since <= e["time"] < until), key=lambda e: e["time"], reverse=True)
    conditions = {"user": user, "event": event, "since": since, "until": until,
                  "failures": failures, "associations": associations}
    assert [e["time"] for e in audit.search(db, **conditions, limit=0)] == \
        [e["time"] for e in expected]
    pages = [audit.search(db, **conditions, offset=offset, limit=7)
             for offset in range(0, len(expected) + 7, 7)]
    assert [e["time"] for page in pages for e in page] == [e["time"] for e in expected]


def test_failures_are_refusals_failure_statuses_and_broken_associations() -> None:
    assert audit.is_failure({"event": "C-FIND", "allowed": False, "status": 0x0124})
    assert audit.is_failure({"event": "C-STORE", "allowed": True, "status": 0xA700})
    assert audit.is_failure({"event": "C-MOVE", "allowed": True, "status": 0x0110})
    assert audit.is_failure({"event": "A-ABORT", "allowed": True})
    assert audit.is_failure({"event": "HTTP-AUTH-RJ", "allowed": False})
    for status in (0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xFE00, 0xFF00):  # warnings...
        assert not audit.is_failure({"event": "C-STORE", "allowed": True, "status": status})
    assert not audit.is_failure({"event": "A-RELEASE", "allowed": True})


def test_search_values_are_data_not_operators() -> None:
    db = mongomock.MongoClient(tz_aware=True)["audit"]
    db[audit.COLLECTION].insert_many([{"principal": "alice", "event": "C-FIND", "time": T0}])
    assert audit.search(db, user={"$ne": ""}) == []  # type: ignore[arg-type]
    assert audit.search(db, event={"$gt": ""}) == []  # type: ignore[arg-type]
    assert len(audit.search(db, user="alice")) == 1


RULES = [rule("*", "Echo", 1), rule("admin", "*", 2), rule("admin", "Delete", 3),
         rule("alice", "Query", 4, PatientID="ALICE-*"),
         rule("alice", "Retrieve", 5, PatientID="ALICE-*", Modality="CT"),
         rule("carol", "*", 6, Modality="MR"), rule("*", "Query", 7, StudyDescription="Open*"),
         rule("curator", "Delete", 8, Modality="MR")]


def test_who_may_do_what_to_a_study() -> None:
    """A study of two CT instances and one MR instance of patient ALICE-1."""
    study = [document(patient_id="ALICE-1", modality="CT", StudyDescription="Head"),
             document(patient_id="ALICE-1", modality="CT", StudyDescription="Head"),
             document(patient_id="ALICE-1", modality="MR", StudyDescription="Head")]
    who = principals(RULES, also=["dave"])
    assert who == ["admin", "alice", "carol", "curator", "dave", "anonymous", OTHERS]
    table = {(a.principal, a.service): a for row in review(RULES, study, who) for a in row}
    verdicts = {key: (a.verdict, a.allowed, [r.index for r in a.rules])
                for key, a in table.items()}
    assert verdicts["admin", "Query"] == ("all", 3, [2])
    assert verdicts["admin", "Delete"] == ("all", 3, [3])
    assert verdicts["admin", "Modify"] == ("none", 0, [])  # "*" does not give it
    assert verdicts["alice", "Query"] == ("all", 3, [4])
    assert verdicts["alice", "Retrieve"] == ("some", 2, [5])
    assert verdicts["alice", "Store"] == ("none", 0, [])
    assert verdicts["carol", "Retrieve"] == ("some", 1, [6])
    assert verdicts["curator", "Delete"] == ("some", 1, [8])
    assert verdicts["dave", "Query"] == verdicts["anonymous", "Query"] == \
        verdicts[OTHERS, "Query"] == ("none", 0, [])
    opened = [document(patient_id="X", StudyDescription="Open day")]
    table = {(a.principal, a.service): a for row in review(RULES, opened, who) for a in row}
    assert table[OTHERS, "Query"].verdict == "all"  # the "*" rule, for any other user
    assert table["alice", "Query"].rules[0].index == 7


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["ALICE-1", "ALICE-2", "BOB-1"]),
                          st.sampled_from(["CT", "MR"])), max_size=8))
def test_a_review_counts_what_each_request_would_be_allowed(
        instances: list[tuple[str, str]]) -> None:
    """Each cell counts the instances the principal's decision lets through: those
    its instance filter matches (what a request is restricted to)."""
    from acl.rules import decide

    docs = [document(patient_id=p, modality=m) for p, m in instances]
    who = principals(RULES)
    for row in review(RULES, docs, who):
        for access in row:
            decision = decide(RULES, access.principal, access.service)
            restriction = decision.instance_filter()
            expected = 0 if not decision.allowed else sum(
                1 for d in docs if restriction is None or evaluate(restriction, d))
            assert access.allowed == expected and access.total == len(docs)


@settings(max_examples=25, deadline=None)
@given(st.lists(entry_values, max_size=60), st.integers(1, 12), st.integers(1, 8))
def test_recent_activity_is_the_newest_of_the_trail(values: list[dict[str, Any]],
                                                    batch: int, trim_every: int) -> None:
    """What the dashboard lists (audit_recent, trimmed) is what a search of the whole
    trail finds newest, for everyone and for one principal."""
    db = mongomock.MongoClient(tz_aware=True)["audit"]
    writer = audit.AuditLog(db, batch=batch, linger=0.001, recent_kept=5,
                            recent_trim_every=trim_every)
    writer.start()
    for entry in _entries(sorted(values, key=lambda v: v["minute"])):
        writer.record(entry)
    writer.stop()
    for kind, condition in ((audit.ASSOCIATION, {"associations": True}),
                            (audit.FAILURE, {"failures": True})):
        for user in (None, "alice"):
            shown = audit.recent(db, kind, user, limit=3)
            newest = audit.search(db, user=user, **condition, limit=0)
            if user is None:  # everyone's: the newest three, whatever the trims
                assert [e["time"] for e in shown] == [e["time"] for e in newest[:3]]
            else:  # hers among the 5 (to 5 + trim_every) newest kept
                assert [e["time"] for e in shown] == [e["time"] for e in newest if any(
                    e["time"] == k["time"] for k in audit.recent(db, kind, None, 0))][:3]
            assert all("recent" not in e and "_id" not in e for e in shown)
        assert db[audit.RECENT_COLLECTION].count_documents({"recent": kind}) < 5 + trim_every

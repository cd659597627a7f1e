"""Access rules: decisions, pattern matching, visibility of a restricted principal, the
atomic replacement of rulesets, and the audit writer.

Patterns are matched by the C-FIND code (``pattern_filter`` + ``evaluate``); these tests
check the rule semantics on top of it.  Visibility runs the real Finder over an archive
stored by the real :meth:`Archive.store` in mongomock (the end-to-end tests run it on
FerretDB).
"""

from __future__ import annotations

import time
from typing import Any
from unittest import mock

import mongomock
import pymongo
import pytest
from helpers import CT_IMAGE, MR_IMAGE, make_dataset, to_part10
from pydicom import Dataset
from pymongo.errors import PyMongoError

from acl.audit import AuditLog, format_entry, parse_since
from acl.patterns import PatternError, compile_pattern, matches_everything, to_json
from acl.rules import (
    NOT_AUTHORIZED,
    ConcurrentApply,
    Rule,
    RuleStore,
    admit_store,
    decide,
    diff,
    error_comment,
    instance_document,
)
from acl.visibility import responses
from archive.find import Finder
from archive.model import IMAGE, PATIENT, SERIES, STUDY
from archive.query import evaluate, translate
from archive.storage import Archive

SR = "1.2.840.10008.5.1.4.1.1.88.11"

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")


def rule(principal: str, service: str, index: int = 1, **pattern: Any) -> Rule:
    return Rule(principal, service, to_json(pattern) if pattern else None, index)


def document(**attributes: Any) -> dict[str, Any]:
    """The instance document a dataset with these attributes would be stored as."""
    return instance_document(make_dataset(**attributes))


# --- decisions ---------------------------------------------------------------------------


def test_no_rules_deny_everything() -> None:
    for service in ("Echo", "Store", "Query", "Retrieve"):
        decision = decide([], "admin", service)
        assert not decision.allowed
        assert decision.deciding_rule() is None
        assert decision.comment() == f"not authorized: no {service} rule for admin"


def test_principal_and_service_must_both_apply() -> None:
    rules = [rule("alice", "Query", 1), rule("*", "Echo", 2), rule("bob", "*", 3)]
    assert decide(rules, "alice", "Query").allowed
    assert not decide(rules, "alice", "Retrieve").allowed
    assert decide(rules, "anonymous", "Echo").deciding_rule().index == 2
    assert decide(rules, "bob", "Store").deciding_rule().index == 3
    assert not decide(rules, "Alice", "Query").allowed  # user names are exact
    assert not decide(rules, "*", "Query").allowed  # "*" in a rule, not a user


def test_delete_and_modify_are_given_by_name_only_never_by_star() -> None:
    """A "*" rule (the administrator's everything) gives the four services that destroy
    nothing; data is deleted or modified, and the audit trail read, only under a rule
    that says so."""
    rules = [rule("admin", "*", 1), rule("*", "*", 2), rule("curator", "Delete", 3,
                                                             PatientID="TRIAL42-*")]
    for service in ("Delete", "Modify", "Admin"):
        assert not decide(rules, "admin", service).allowed
        assert not decide(rules, "anonymous", service).allowed
        assert decide(rules, "admin", service).comment() == \
            f"not authorized: no {service} rule for admin"
    curator = decide(rules, "curator", "Delete")
    assert curator.restricted
    assert evaluate(curator.instance_filter(), document(patient_id="TRIAL42-7"))
    assert not evaluate(curator.instance_filter(), document(patient_id="TRIAL43-7"))
    assert not decide(rules, "curator", "Modify").allowed


def test_a_rule_without_pattern_lifts_every_restriction() -> None:
    rules = [rule("alice", "Query", 1, StudyDescription="A"), rule("*", "Query", 2)]
    decision = decide(rules, "alice", "Query")
    assert decision.allowed and not decision.restricted
    assert decision.instance_filter() is None
    assert decision.patterns == ()
    assert decision.deciding_rule(document(StudyDescription="B")).index == 2


def test_patterns_of_all_applicable_rules_are_ored() -> None:
    rules = [rule("alice", "Retrieve", 1, StudyDescription="A"),
             rule("*", "Retrieve", 2, Modality="MR"),
             rule("bob", "Retrieve", 3, Modality="CT")]
    decision = decide(rules, "alice", "Retrieve")
    assert decision.restricted and len(decision.patterns) == 2
    allowed = decision.instance_filter()
    assert evaluate(allowed, document(StudyDescription="A", modality="CT"))
    assert evaluate(allowed, document(StudyDescription="B", modality="MR"))
    assert not evaluate(allowed, document(StudyDescription="B", modality="CT"))
    assert decision.deciding_rule(document(StudyDescription="B", modality="MR")).index == 2
    assert decision.deciding_rule(document(StudyDescription="B", modality="CT")) is None


def test_a_pattern_of_universal_values_is_no_restriction() -> None:
    assert compile_pattern(to_json({"PatientID": "*", "StudyDescription": "*"})) is None
    assert matches_everything(to_json({"PatientID": "*", "StudyDescription": "*"}))
    assert not matches_everything(to_json({"PatientID": "*", "StudyDescription": "A"}))
    assert not decide([rule("a", "Query", 1, PatientID="*")], "a", "Query").restricted


@pytest.mark.parametrize("raw", ["", "   ", [], "\\", {"ProcedureCodeSequence": {}}])
def test_an_empty_value_is_refused_not_read_as_everything(raw: object) -> None:
    pattern = raw if isinstance(raw, dict) else {"PatientID": raw, "Modality": "CT"}
    with pytest.raises(PatternError) as caught:
        to_json(pattern)  # type: ignore[arg-type]
    assert "would match every dataset" in str(caught.value)
    if not isinstance(raw, dict):
        assert caught.value.key == "PatientID"
        assert "PatientID: \"*\"" in str(caught.value)  # what to write instead


@pytest.mark.parametrize(("pattern", "matching", "other"), [
    ({"PatientID": "TRIAL42-*"}, {"patient_id": "TRIAL42-007"}, {"patient_id": "TRIAL4-007"}),
    ({"PatientID": "P?"}, {"patient_id": "P1"}, {"patient_id": "P10"}),
    ({"StudyDate": "20240101-20240131"}, {"StudyDate": "20240115"}, {"StudyDate": "20240201"}),
    ({"StudyDate": "-20231231"}, {"StudyDate": "20231231"}, {"StudyDate": "20240101"}),
    ({"Modality": "CT\\MR"}, {"modality": "MR"}, {"modality": "US"}),
    ({"Modality": ["CT", "MR"]}, {"modality": "CT"}, {"modality": "SR"}),
    ({"PatientName": "doe^j*"}, {"patient_name": "DOE^JANE"}, {"patient_name": "ROE^JANE"}),
    ({"InstanceNumber": "5"}, {"InstanceNumber": 5}, {"InstanceNumber": 6}),
    ({"StudyDescription": '""'}, {}, {"StudyDescription": "x"}),
    ({"RequestAttributesSequence": {"ScheduledProcedureStepID": "S1*"}},
     {"RequestAttributesSequence": [Dataset()]}, {}),
])
def test_patterns_match_as_c_find_does(pattern: dict[str, Any], matching: dict[str, Any],
                                       other: dict[str, Any]) -> None:
    if "RequestAttributesSequence" in matching:
        item = Dataset()
        item.ScheduledProcedureStepID = "S12"
        matching = {"RequestAttributesSequence": [item]}
        item2 = Dataset()
        item2.ScheduledProcedureStepID = "T12"
        other = {"RequestAttributesSequence": [item2]}
    decision = decide([Rule("u", "Store", to_json(pattern), 1)], "u", "Store")
    assert decision.deciding_rule(document(**matching)) is not None
    assert decision.deciding_rule(document(**other)) is None


@pytest.mark.parametrize("value", [
    "a.b$c", "$where", "(x|y)*", "^[z]+$", "a+b.*", '{"$ne": null}', "..", "a{2}",
])
def test_values_with_dollars_dots_and_regex_characters_stay_data(value: str) -> None:
    decision = decide([Rule("u", "Query", to_json({"PatientID": value}), 1)], "u", "Query")
    literal = value.replace("*", "")
    same = document(patient_id=value if "*" not in value else literal + "tail")
    assert decision.deciding_rule(same) is not None
    for other in ("ab$c", "x", "a.b$cd" if "*" not in value else "zz", "", "y"):
        if other != literal and not (value.endswith("*") and other.startswith(literal)):
            assert decision.deciding_rule(document(patient_id=other)) is None, other


def test_pattern_keys_are_never_field_names_or_operators() -> None:
    with pytest.raises(PatternError):
        to_json({"$where": "1"})
    with pytest.raises(PatternError):
        to_json({"dataset.00100020": "x"})


def test_error_comments_fit_lo() -> None:
    decision = decide([], "u" * 100, "Retrieve")
    assert len(decision.comment()) == 64
    assert error_comment("a\\b\nc\u00e9") == "a?b?c?"
    assert NOT_AUTHORIZED == 0x0124


def test_store_is_judged_on_the_would_be_instance_document() -> None:
    rules = [rule("modality", "Store", 1, Modality="CT", PatientID="TRIAL-*")]
    decision = decide(rules, "modality", "Store")
    accepted = to_part10(make_dataset(patient_id="TRIAL-1", modality="CT"))
    refused = to_part10(make_dataset(patient_id="TRIAL-1", modality="MR"))
    ds, chosen, admit = admit_store(decision, accepted, "CT01")
    assert chosen is not None and str(ds.PatientID) == "TRIAL-1" and admit is not None
    assert admit_store(decision, refused, "CT01")[1] is None
    unrestricted = decide([rule("*", "Store", 2)], "modality", "Store")
    assert admit_store(unrestricted, refused)[0] is None  # not even parsed


# --- fast path: where a pattern decides --------------------------------------------------


@pytest.mark.parametrize(("pattern", "levels"), [
    ({"PatientID": "P*"}, {PATIENT, STUDY, SERIES, IMAGE}),
    ({"StudyDescription": "A"}, {STUDY, SERIES, IMAGE}),
    ({"StudyDescription": "A", "PatientName": "X*"}, {STUDY, SERIES, IMAGE}),
    ({"Modality": "CT"}, {SERIES, IMAGE}),
    ({"SOPClassUID": CT_IMAGE}, {IMAGE}),
    ({"InstanceNumber": "1", "StudyDescription": "A"}, {IMAGE}),
    ({"StudyDescription": "A", "AccessionNumber": "*"}, {STUDY, SERIES, IMAGE}),
])
def test_patterns_decide_at_the_levels_storing_all_their_keys(pattern: dict[str, Any],
                                                              levels: set[str]) -> None:
    compiled = compile_pattern(to_json(pattern))
    assert compiled is not None
    assert set(compiled.filters) == levels


# --- an archive in mongomock ------------------------------------------------------------


def _image(patient: str, study: str, series: str, sop: str, modality: str,
           description: str, sop_class: str = CT_IMAGE, number: int = 1) -> bytes:
    return to_part10(make_dataset(
        patient_id=patient, patient_name=f"{patient}^NAME", study_uid=study, series_uid=series,
        sop_uid=sop, sop_class=sop_class, modality=modality, StudyDescription=description,
        InstanceNumber=number))


CORPUS = [
    # patient, study, series, sop, modality, description, class, number
    ("P1", "1.1", "1.1.1", "1.1.1.1", "CT", "Trial A", CT_IMAGE, 1),
    ("P1", "1.1", "1.1.1", "1.1.1.2", "CT", "Trial A", CT_IMAGE, 2),
    ("P1", "1.1", "1.1.2", "1.1.2.1", "MR", "Trial A", MR_IMAGE, 1),
    ("P1", "1.2", "1.2.1", "1.2.1.1", "CT", "Other", CT_IMAGE, 1),
    ("P2", "2.1", "2.1.1", "2.1.1.1", "SR", "Trial A", SR, 1),
    ("P3", "3.1", "3.1.1", "3.1.1.1", "MR", "Secret", MR_IMAGE, 1),
    ("P3", "3.1", "3.1.1", "3.1.1.2", "MR", "Secret", MR_IMAGE, 2),
]


@pytest.fixture(scope="module")
def archive_db(tmp_path_factory: pytest.TempPathFactory) -> Any:
    db = mongomock.MongoClient(tz_aware=True)["archive"]
    archive = Archive(db, journal=tmp_path_factory.mktemp("journal") / "journal.jsonl")
    for row in CORPUS:
        assert archive.store(_image(*row)).ok
    return db


KEYS = {
    PATIENT: ("PatientID", "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
              "NumberOfPatientRelatedInstances"),
    STUDY: ("StudyInstanceUID", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
            "ModalitiesInStudy", "SOPClassesInStudy", "NumberOfPatientRelatedInstances"),
    SERIES: ("SeriesInstanceUID", "NumberOfSeriesRelatedInstances",
             "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries"),
    IMAGE: ("SOPInstanceUID", "NumberOfSeriesRelatedInstances", "NumberOfStudyRelatedInstances",
            "ModalitiesInStudy"),
}
UNIQUE = {PATIENT: "PatientID", STUDY: "StudyInstanceUID", SERIES: "SeriesInstanceUID",
          IMAGE: "SOPInstanceUID"}


def find(db: Any, level: str, patterns: list[dict[str, Any]] | None,
         **match: str) -> dict[str, dict[str, Any]]:
    """Responses by unique key, each as {keyword: value}; patterns None: unrestricted."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword in KEYS[level]:
        setattr(identifier, keyword, match.pop(keyword, ""))
    for keyword, value in match.items():
        setattr(identifier, keyword, value)
    query = translate(identifier, "PATIENT")
    finder = Finder(db)
    asked = list(identifier.keys())
    if patterns is None:
        found = list(finder.responses(query, identifier))
    else:
        compiled = [compile_pattern(to_json(p)) for p in patterns]
        found = list(responses(finder, query, identifier, compiled, "PATIENT"))
    assert list(identifier.keys()) == asked  # the request is not modified
    result = {}
    for ds in found:
        row = {}
        for keyword in KEYS[level]:
            value = ds[keyword].value
            if keyword.endswith("InStudy") and value:
                value = sorted([value] if isinstance(value, str) else value)
            row[keyword] = value
        result[str(ds[UNIQUE[level]].value)] = row
    return result


def _counts(rows: dict[str, dict[str, Any]], keyword: str) -> dict[str, Any]:
    return {uid: row[keyword] for uid, row in rows.items()}


def test_unrestricted_counts_as_stored(archive_db: Any) -> None:
    patients = find(archive_db, PATIENT, None)
    assert _counts(patients, "NumberOfPatientRelatedInstances") == {"P1": "4", "P2": "1",
                                                                    "P3": "2"}


def test_study_pattern_hides_other_studies_at_every_level(archive_db: Any) -> None:
    pattern = [{"StudyDescription": "Trial A"}]
    patients = find(archive_db, PATIENT, pattern)
    assert set(patients) == {"P1", "P2"}
    assert patients["P1"] == {"PatientID": "P1", "NumberOfPatientRelatedStudies": "1",
                              "NumberOfPatientRelatedSeries": "2",
                              "NumberOfPatientRelatedInstances": "3"}
    studies = find(archive_db, STUDY, pattern)
    assert set(studies) == {"1.1", "2.1"}
    assert studies["1.1"]["NumberOfStudyRelatedInstances"] == "3"
    assert studies["1.1"]["ModalitiesInStudy"] == ["CT", "MR"]
    assert studies["1.1"]["SOPClassesInStudy"] == sorted([CT_IMAGE, MR_IMAGE])
    assert studies["1.1"]["NumberOfPatientRelatedInstances"] == "3"  # not 4
    assert set(find(archive_db, SERIES, pattern)) == {"1.1.1", "1.1.2", "2.1.1"}
    assert set(find(archive_db, IMAGE, pattern)) == {"1.1.1.1", "1.1.1.2", "1.1.2.1", "2.1.1.1"}


def test_series_pattern_counts_only_visible_series(archive_db: Any) -> None:
    pattern = [{"Modality": "CT"}]
    patients = find(archive_db, PATIENT, pattern)
    assert set(patients) == {"P1"}
    assert patients["P1"]["NumberOfPatientRelatedStudies"] == "2"
    assert patients["P1"]["NumberOfPatientRelatedSeries"] == "2"
    assert patients["P1"]["NumberOfPatientRelatedInstances"] == "3"
    studies = find(archive_db, STUDY, pattern)
    assert studies["1.1"] == {
        "StudyInstanceUID": "1.1", "NumberOfStudyRelatedSeries": "1",
        "NumberOfStudyRelatedInstances": "2", "ModalitiesInStudy": ["CT"],
        "SOPClassesInStudy": [CT_IMAGE], "NumberOfPatientRelatedInstances": "3"}
    series = find(archive_db, SERIES, pattern)
    assert set(series) == {"1.1.1", "1.2.1"}
    assert series["1.1.1"]["NumberOfStudyRelatedInstances"] == "2"
    assert series["1.1.1"]["NumberOfStudyRelatedSeries"] == "1"
    images = find(archive_db, IMAGE, pattern)
    assert images["1.1.1.1"]["ModalitiesInStudy"] == ["CT"]


def test_instance_pattern_walks_to_the_instances(archive_db: Any) -> None:
    pattern = [{"InstanceNumber": "2"}]
    patients = find(archive_db, PATIENT, pattern)
    assert _counts(patients, "NumberOfPatientRelatedInstances") == {"P1": "1", "P3": "1"}
    series = find(archive_db, SERIES, pattern)
    assert _counts(series, "NumberOfSeriesRelatedInstances") == {"1.1.1": "1", "3.1.1": "1"}
    assert set(find(archive_db, IMAGE, pattern)) == {"1.1.1.2", "3.1.1.2"}


def test_patterns_are_ored_across_levels(archive_db: Any) -> None:
    patterns = [{"StudyDescription": "Other"}, {"Modality": "MR"}]
    studies = find(archive_db, STUDY, patterns)
    assert set(studies) == {"1.1", "1.2", "3.1"}
    assert studies["1.1"]["ModalitiesInStudy"] == ["MR"]
    assert studies["1.1"]["NumberOfStudyRelatedInstances"] == "1"
    assert studies["1.2"]["NumberOfStudyRelatedInstances"] == "1"


def test_hidden_entities_stay_hidden_when_named_by_uid(archive_db: Any) -> None:
    pattern = [{"StudyDescription": "Trial A"}]
    assert find(archive_db, STUDY, pattern, StudyInstanceUID="3.1") == {}
    assert find(archive_db, IMAGE, pattern, StudyInstanceUID="1.2", SeriesInstanceUID="1.2.1",
                SOPInstanceUID="1.2.1.1", PatientID="P1") == {}
    assert find(archive_db, PATIENT, pattern, PatientID="P3") == {}
    assert set(find(archive_db, STUDY, pattern, PatientID="P1")) == {"1.1"}


def test_computed_keys_in_the_identifier_match_visible_counts(archive_db: Any) -> None:
    pattern = [{"Modality": "CT"}]
    # Study 1.1 holds 3 instances, 2 visible: matching on 3 would reveal the third.
    assert set(find(archive_db, STUDY, pattern, NumberOfStudyRelatedInstances="3")) == set()
    assert set(find(archive_db, STUDY, pattern, NumberOfStudyRelatedInstances="2")) == {"1.1"}
    assert set(find(archive_db, STUDY, pattern, ModalitiesInStudy="MR")) == set()
    assert set(find(archive_db, PATIENT, pattern, NumberOfPatientRelatedStudies="2")) == {"P1"}
    assert set(find(archive_db, SERIES, pattern, NumberOfSeriesRelatedInstances="1")) == \
        {"1.2.1"}


def test_level_filters_agree_with_the_instances_below(archive_db: Any) -> None:
    """The fast path decides a level document as its instances would be decided."""
    patterns = [{"StudyDescription": "Trial A"}, {"Modality": "MR"}, {"PatientID": "P1"},
                {"PatientName": "p3^*"}, {"StudyDate": "20240101-20240131"}]
    fields = {PATIENT: "PatientID", STUDY: "StudyInstanceUID", SERIES: "SeriesInstanceUID"}
    instances = list(archive_db.instances.find())
    for pattern in patterns:
        compiled = compile_pattern(to_json(pattern))
        for level, name in fields.items():
            condition = compiled.at(level)
            if condition is None:
                continue
            for doc in archive_db[{"PATIENT": "patients", "STUDY": "studies",
                                   "SERIES": "series"}[level]].find():
                below = [i for i in instances if i[name] == doc["_id"]]
                expected = any(evaluate(compiled.filters[IMAGE], i) for i in below)
                assert evaluate(condition, doc) == expected, (pattern, level, doc["_id"])


# --- rulesets in the database -----------------------------------------------------------


@pytest.fixture
def store() -> RuleStore:
    return RuleStore(mongomock.MongoClient(tz_aware=True)["acl"], refresh_seconds=0.01)


def test_apply_replaces_the_ruleset_and_reports_the_change(store: RuleStore) -> None:
    first = [rule("*", "Echo", 1), rule("alice", "Query", 2, StudyDescription="A")]
    change = store.apply(first, "one.yaml")
    assert [r.index for r in change.added] == [1, 2] and not change.removed
    loaded = store.load()
    assert [r.key for r in loaded.rules] == [r.key for r in first]
    assert loaded.source == "one.yaml"
    second = [rule("*", "Echo", 1), rule("bob", "*", 2)]
    change = store.apply(second)
    assert [r.principal for r in change.added] == ["bob"]
    assert [r.principal for r in change.removed] == ["alice"]
    assert store.rules.count_documents({}) == 2  # the old ruleset is gone
    assert store.state.count_documents({}) == 1


def test_apply_of_the_same_rules_writes_nothing(store: RuleStore) -> None:
    rules = [rule("*", "Echo", 1), rule("alice", "Query", 2, StudyDescription="A")]
    store.apply(rules)
    before = store.load().id
    assert not store.apply([Rule(r.principal, r.service, r.pattern, r.index) for r in rules])
    assert store.load().id == before
    assert diff(rules, list(reversed(rules))).reordered


def test_dry_run_changes_nothing(store: RuleStore) -> None:
    change = store.apply([rule("*", "Echo", 1)], dry_run=True)
    assert change.added and store.load().id is None
    assert store.rules.count_documents({}) == 0


def test_a_concurrent_apply_loses_cleanly(store: RuleStore) -> None:
    store.apply([rule("*", "Echo", 1)])
    original_load = store.load

    def racing_load() -> Any:
        seen = original_load()
        other = RuleStore(store.rules.database)
        other.apply([rule("mallory", "*", 1)])  # wins meanwhile
        return seen

    store.load = racing_load  # type: ignore[method-assign]
    with pytest.raises(ConcurrentApply):
        store.apply([rule("alice", "*", 1)])
    store.load = original_load  # type: ignore[method-assign]
    assert [r.principal for r in store.load().rules] == ["mallory"]
    assert store.rules.count_documents({}) == 1


def test_a_reader_racing_an_apply_never_sees_half_a_ruleset(store: RuleStore) -> None:
    """The apply completes (old rules deleted) between the reader's pointer read and
    its rules read: the reader notices the count and reads the pointer again."""
    old = [rule(f"u{i}", "Query", i + 1) for i in range(3)]
    new = [rule("*", "Echo", 1), rule("v", "Store", 2)]
    store.apply(old)
    original_find, calls = store.rules.find, []

    def racing_find(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            RuleStore(store.rules.database).apply(new)
        return original_find(*args, **kwargs)

    with mock.patch.object(store.rules, "find", racing_find):
        loaded = store.load()
    assert [r.key for r in loaded.rules] == [r.key for r in new]
    assert len(calls) >= 2


def test_nodes_see_applied_rules_after_the_refresh_delay(store: RuleStore) -> None:
    assert not store.decide("alice", "Query").allowed
    store.apply([rule("alice", "Query", 1)])
    time.sleep(0.02)
    assert store.decide("alice", "Query").allowed


def test_database_away_keeps_the_last_rules_and_errors_deny(store: RuleStore) -> None:
    store.apply([rule("*", "Echo", 1)])
    assert store.decide("anyone", "Echo").allowed
    time.sleep(0.02)
    with mock.patch.object(store.state, "find_one", side_effect=PyMongoError("away")):
        assert store.decide("anyone", "Echo").allowed
    with mock.patch.object(store, "current", side_effect=RuntimeError("bug")):
        assert not store.decide("anyone", "Echo").allowed
    fresh = RuleStore(store.rules.database)
    with mock.patch.object(fresh.state, "find_one", side_effect=PyMongoError("away")):
        assert not fresh.decide("anyone", "Echo").allowed  # never read: nothing allowed


def test_unusable_stored_rules_are_dropped_not_obeyed(store: RuleStore) -> None:
    store.apply([rule("alice", "Query", 1, StudyDescription="A")])
    store.rules.update_many({}, {"$set": {"pattern": {"00080020": {"vr": "DA",
                                                                   "Value": ["garbage"]}}}})
    assert store.load().rules == ()


# --- audit -------------------------------------------------------------------------------


def test_audit_writer_batches_and_flushes_at_stop() -> None:
    db = mongomock.MongoClient(tz_aware=True)["audit"]
    log = AuditLog(db, batch=7)
    log.start()
    for n in range(100):
        log.record({"time": n, "principal": "p", "event": "C-STORE", "kind": "operation"})
    log.stop()
    assert db.audit.count_documents({}) == 100
    assert log.lost == 0


def test_audit_entries_are_written_in_order_after_the_linger_in_batches() -> None:
    """Entries recorded while the writer lingers reach the database soon after, without
    a stop, all of them, in order, in inserts of at most ``batch``."""
    db = mongomock.MongoClient(tz_aware=True)["audit"]
    log = AuditLog(db, batch=7, linger=0.1)
    inserts: list[int] = []
    insert_many = log.collection.insert_many

    def counted(entries: list[dict[str, Any]], **kwargs: Any) -> Any:
        inserts.append(len(entries))
        return insert_many(entries, **kwargs)

    log.collection.insert_many = counted  # type: ignore[method-assign]
    log.start()
    try:
        for n in range(20):
            log.record({"time": n, "principal": "p", "event": "C-FIND", "kind": "operation"})
        deadline = time.monotonic() + 5
        while db.audit.count_documents({}) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [e["time"] for e in db.audit.find().sort("_id", 1)] == list(range(20))
        assert sum(inserts) == 20 and max(inserts) <= 7
    finally:
        log.stop()
    assert log.lost == 0


def test_audit_writer_gives_up_within_its_grace_when_the_database_is_away() -> None:
    """The node stops in bounded time with its database away; what was queued is lost,
    counted and logged, whether one batch or many wait."""
    client = pymongo.MongoClient("mongodb://127.0.0.1:1/", serverSelectionTimeoutMS=200,
                                 connectTimeoutMS=200)
    log = AuditLog(client["audit"], batch=2, linger=0.0)
    log.start()
    for n in range(9):
        log.record({"time": n, "principal": "p", "event": "C-STORE", "kind": "operation"})
    started = time.monotonic()
    log.stop(grace=1.0)
    assert time.monotonic() - started < 2.5
    assert log.lost == 9
    client.close()


def test_audit_lines_and_since() -> None:
    when = parse_since("2024-05-01T10:00")
    assert when.isoformat() == "2024-05-01T10:00:00+00:00"
    assert (parse_since("1h", when) - when).total_seconds() == -3600
    with pytest.raises(ValueError):
        parse_since("yesterday")
    line = format_entry({"time": when, "principal": "alice", "calling_ae": "SCU",
                         "address": "127.0.0.1", "port": 4000, "kind": "operation",
                         "event": "C-FIND", "service": "Query", "allowed": False,
                         "status": 0x0124, "request": "STUDY PatientID=X"})
    assert line.startswith("2024-05-01T10:00:00.000Z alice SCU@127.0.0.1:4000 C-FIND Query "
                           "DENIED 0x0124")


def test_rules_compare_by_content_not_position() -> None:
    assert rule("a", "Query", 1, PatientID="X").key == rule("a", "Query", 7, PatientID="X").key

"""Rules files: parsing with DICOM keywords or tags, validation reported with line
numbers (every problem, each naming the rule), and export that apply takes back as is."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import mongomock
import pytest

from acl.rules import RuleStore
from acl.yamlrules import RulesFileError, dump, load, parse

ROOT = Path(__file__).resolve().parents[2]


def rules_of(text: str) -> list[Any]:
    return parse(textwrap.dedent(text), "rules.yaml")


def problems_of(text: str) -> list[tuple[int, str]]:
    with pytest.raises(RulesFileError) as caught:
        parse(textwrap.dedent(text), "rules.yaml")
    return [(p.line, p.message) for p in caught.value.problems]


def test_the_example_of_the_issue() -> None:
    rules = rules_of("""\
        rules:
          - {principal: "*", service: Echo}
          - {principal: admin, service: "*"}
          - principal: alice
            service: Query
            pattern: {StudyDescription: "Some study", PatientID: "TRIAL42-*"}
        """)
    assert [(r.principal, r.service, r.index) for r in rules] == [
        ("*", "Echo", 1), ("admin", "*", 2), ("alice", "Query", 3)]
    assert rules[2].pattern == {"00081030": {"vr": "LO", "Value": ["Some study"]},
                                "00100020": {"vr": "LO", "Value": ["TRIAL42-*"]}}
    assert [r.source for r in rules] == ["rules.yaml:2", "rules.yaml:3", "rules.yaml:4"]


def test_the_shipped_example_gives_echo_to_all_and_everything_but_deleting_to_admin() -> None:
    rules = load(ROOT / "config" / "acl.yaml")
    assert [(r.principal, r.service, r.pattern) for r in rules] == [
        ("*", "Echo", None), ("admin", "*", None), ("admin", "Admin", None)]


@pytest.mark.parametrize("key", ["StudyDescription", "0008,1030", "(0008,1030)", "00081030",
                                 "(0008, 1030)", "0008103a".replace("a", "0")])
def test_keys_are_keywords_or_tags(key: str) -> None:
    rules = rules_of(f"""\
        rules:
          - principal: u
            service: Query
            pattern: {{"{key}": "Some study"}}
        """)
    assert rules[0].pattern == {"00081030": {"vr": "LO", "Value": ["Some study"]}}


def test_values_are_read_as_written_not_as_yaml_types() -> None:
    rules = rules_of("""\
        rules:
          - principal: u
            service: store
            pattern:
              StudyTime: 10:30
              PatientID: 00123
              AccessionNumber: yes
              InstanceNumber: 5
              Modality: [CT, MR]
              BodyPartExamined: CHEST\\ABDOMEN
              PatientName: Yamada^Tarou=山田^太郎
              StudyDescription: "#1: a.b$c"
              RequestAttributesSequence: {ScheduledProcedureStepID: "S1*"}
        """)
    pattern = rules[0].pattern
    assert rules[0].service == "Store"  # services are case-insensitive
    assert pattern["00080030"]["Value"] == ["10:30"]
    assert pattern["00100020"]["Value"] == ["00123"]
    assert pattern["00080050"]["Value"] == ["yes"]
    assert pattern["00200013"] == {"vr": "IS", "Value": [5]}
    assert pattern["00080060"]["Value"] == ["CT", "MR"]
    assert pattern["00180015"]["Value"] == ["CHEST", "ABDOMEN"]
    assert pattern["00100010"]["Value"] == [{"Alphabetic": "Yamada^Tarou",
                                             "Ideographic": "山田^太郎"}]
    assert pattern["00081030"]["Value"] == ["#1: a.b$c"]
    assert pattern["00400275"] == {"vr": "SQ", "Value": [
        {"00400009": {"vr": "SH", "Value": ["S1*"]}}]}


def test_no_pattern_and_empty_rules() -> None:
    rules = rules_of("""\
        rules:
          - {principal: u, service: Query, pattern: }
          - {principal: v, service: Query, pattern: {}}
        """)
    assert [r.pattern for r in rules] == [None, None]
    assert rules_of("rules: []\n") == []
    assert rules_of("rules:\n") == []


@pytest.mark.parametrize(("text", "line", "message"), [
    ("""\
     rules:
       - {principal: "*", service: Echo}
       - principal: alice
         service: Query
         pattern:
           StudyDescripton: x
     """, 6, "rule 2 (principal 'alice'): pattern: 'StudyDescripton' is neither a DICOM "
             "keyword nor a tag"),
    ("""\
     rules:
       - principal: bob
         service: Qurey
     """, 3, "rule 1 (principal 'bob'): unknown service 'Qurey' (Echo, Store, Query, "
             "Retrieve, Delete, Modify, Admin or \"*\")"),
    ("""\
     rules:
       - principal: carol
         service: Query
         pattern: {PatientID: "P*",
                   StudyDate: "20240101-2024"}
     """, 5, "rule 1 (principal 'carol'): pattern: StudyDate (0008,0020) has an invalid "
             "DA value"),
    ("""\
     rules:
       - principal: carol
         service: Query
         pattern:
           StudyDate: 20240101-20241301
     """, 5, "'20241301' is not a calendar date"),
    ("""\
     rules:
       - {principal: x, service: Echo}
       - service: Query
         pattern: {Modality: CT}
     """, 3, "rule 2: missing principal"),
    ("""\
     rules:
       - principal:
         service: Query
     """, 2, "rule 1: missing principal"),
    ("""\
     rules:
       - principal: dave
     """, 2, "rule 1 (principal 'dave'): missing service"),
    ("""\
     rules:
       - principal: dave
         service: Echo
         servce: Query
     """, 4, "unknown field 'servce'"),
    ("""\
     rules:
       - principal: dave
         service: Echo
         service: Query
     """, 4, "field 'service' given twice"),
    ("""\
     rules:
       - principal: erin
         service: Query
         pattern:
           Modality: CT
           Modality: MR
     """, 6, "pattern key Modality given twice"),
    ("""\
     rules:
       - principal: erin
         service: Query
         pattern:
           StudyDescription: a
           0008,1030: b
     """, 6, "0008,1030 names the same attribute as StudyDescription"),
    ("""\
     rules:
       - principal: erin
         service: Query
         pattern: {NumberOfStudyRelatedInstances: 5}
     """, 4, "computed by the archive"),
    ("""\
     rules:
       - principal: erin
         service: Query
         pattern: {QueryRetrieveLevel: STUDY}
     """, 4, "query control key"),
    ("""\
     rules:
       - principal: erin
         service: Query
         pattern: {PixelData: x}
     """, 4, "binary"),
    ("""\
     rules:
       - principal: erin
         service: Query
         pattern: {InstanceNumber: "1-5"}
     """, 4, "not an integer"),
    ("""\
     rules:
       - principal: erin
         service: Query
         pattern: {StudyDescription: {a: b}}
     """, 4, "not a sequence"),
    ("""\
     rules:
       - principal: erin
         service: Query
         pattern: {RequestAttributesSequence: [{ScheduledProcedureStepID: a}, {}]}
     """, 4, "exactly one item"),
    ("""\
     rules:
       - principal: erin
         service: Query
         pattern: [Modality, CT]
     """, 4, "pattern must be a mapping"),
    ("""\
     rules:
       - principal: erin
         service: Query
         pattern: {Modality: CT
     """, 5, "not valid YAML"),
    ("""\
     rules:
       - just a string
     """, 2, "rule 1: expected a mapping"),
    ("""\
     rule:
       - {principal: x, service: Echo}
     """, 1, "unknown top-level key 'rule'"),
    ("- {principal: x, service: Echo}\n", 1, "expected a mapping with a 'rules:' list"),
    ("", 1, "expected a mapping with a 'rules:' list"),
])
def test_problems_name_the_rule_and_its_line(text: str, line: int, message: str) -> None:
    problems = problems_of(text)
    assert problems, text
    found_line, found = problems[0]
    assert found_line == line
    assert any(part in found for part in message.split("|")), found


def test_every_problem_is_reported_at_once() -> None:
    problems = problems_of("""\
        rules:
          - {principal: a, service: Nope}
          - {service: Echo}
          - principal: c
            service: Query
            pattern: {Foo: 1, StudyDate: "x"}
        """)
    assert [line for line, _ in problems] == [2, 3, 6, 6]


def test_the_error_text_has_file_and_line() -> None:
    with pytest.raises(RulesFileError) as caught:
        parse("rules:\n  - {principal: a, service: Nope}\n", "my.yaml")
    assert str(caught.value).startswith("my.yaml:2: rule 1 (principal 'a'): unknown service")


TRICKY = """\
rules:
  - {principal: "*", service: Echo}
  - principal: "o'neil: #1"
    service: Retrieve
    pattern:
      PatientID: "*"
      StudyDescription: "a.b$c (x|y) [z] ^$ # : yes null"
      StudyTime: 10:30-11:00
      AccessionNumber: '00123'
      Modality: CT\\MR
      PatientName: DOE^J*=ドウ
      InstanceNumber: 5
      SliceThickness: 1.50
      RequestAttributesSequence: {ScheduledProcedureStepID: "S?"}
      OperatorsName: '""'
"""


def test_export_reads_back_to_the_same_rules() -> None:
    rules = parse(TRICKY, "tricky.yaml")
    again = parse(dump(rules, "a header\nof two lines"), "export.yaml")
    assert [r.key for r in again] == [r.key for r in rules]


def test_delete_and_modify_rules_are_read_and_exported() -> None:
    rules = parse("""\
rules:
  - {principal: curator, service: delete, pattern: {PatientID: "TRIAL42-*"}}
  - {principal: editor, service: Modify}
""", "services.yaml")
    assert [(r.principal, r.service) for r in rules] == [("curator", "Delete"),
                                                          ("editor", "Modify")]
    assert [r.key for r in parse(dump(rules), "export.yaml")] == [r.key for r in rules]


def test_an_admin_rule_takes_no_pattern() -> None:
    """Admin reads the whole audit trail: no pattern could narrow it, so none is taken."""
    rules = parse("rules:\n  - {principal: auditor, service: admin}\n", "admin.yaml")
    assert [(r.principal, r.service, r.pattern) for r in rules] == [("auditor", "Admin", None)]
    with pytest.raises(RulesFileError) as refused:
        parse("""\
rules:
  - principal: auditor
    service: Admin
    pattern: {PatientID: "TRIAL42-*"}
""", "admin.yaml")
    assert str(refused.value) == ("admin.yaml:4: rule 1 (principal 'auditor'): Admin rules "
                                  "take no pattern (what they give is not a dataset)")


def test_delete_for_anyone_is_warned_about() -> None:
    from acl.cli import anyone_deletes

    rules = parse("""\
rules:
  - {principal: "*", service: Delete, pattern: {PatientID: "TEST-*"}}
  - {principal: "*", service: "*"}
  - {principal: curator, service: Delete}
""", "anyone.yaml")
    assert anyone_deletes(rules) == [
        "anyone.yaml:2: rule 1 (principal '*'): gives Delete to anyone, anonymous included"]


def test_apply_of_the_export_is_a_no_op() -> None:
    store = RuleStore(mongomock.MongoClient(tz_aware=True)["acl"])
    assert store.apply(parse(TRICKY, "tricky.yaml"), "tricky.yaml")
    ruleset = store.load()
    exported = dump(ruleset.rules)
    assert not store.apply(parse(exported, "export.yaml"), "export.yaml")
    assert store.load().id == ruleset.id

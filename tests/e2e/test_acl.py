"""Access control end to end: a real node on FerretDB, pynetdicom SCUs with user
identities (username only; ``auth.backend: none``), rules applied by the CLI.

For each service: denied without a rule (0x0124 and an Error Comment), allowed with
one, restricted by a pattern.  A restricted user sees only its studies at every
level and in every computed key, cannot retrieve others even by exact UID, cannot
store outside its pattern (nothing written).  Values with ``$``, dots and regex
characters stay data.  Rules applied during traffic take effect on an open
association.  ``acl apply`` of an invalid file changes nothing.  The audit trail
records it all.
"""

from __future__ import annotations

import textwrap
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from acl_clients import (
    REFRESH,
    archive_cli,
    by_key,
    c_find,
    c_get,
    c_get_final,
    c_move,
    scu,
    use_rules,
)
from helpers import (
    CT_IMAGE,
    MR_IMAGE,
    ROOT,
    StoreSCP,
    consistency_problems,
    make_dataset,
    settled_counters,
    to_part10,
    wait_for,
)
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import (
    Verification,
)

pytestmark = [pytest.mark.network,
              pytest.mark.filterwarnings("ignore:Invalid value for VR")]

UID = "1.2.826.0.1.3680043.10.1041"

# patient, study, series, instance numbers, modality, description
CORPUS = [
    ("A.B$C(1)", "1", "1", (1, 2), "CT", "Trial A"),
    ("A.B$C(1)", "1", "2", (1,), "MR", "Trial A"),
    ("A.B$C(1)", "2", "1", (1,), "CT", "Other"),
    ("AXB$C(1)", "3", "1", (1,), "MR", "Trial A"),
    ("P3", "4", "1", (1, 2), "CT", "Secret"),
]


def study_uid(study: str) -> str:
    return f"{UID}.{study}"


def series_uid(study: str, series: str) -> str:
    return f"{UID}.{study}.{series}"


def sop_uid(study: str, series: str, number: int) -> str:
    return f"{UID}.{study}.{series}.{number}"


def corpus_datasets() -> list[Dataset]:
    datasets = []
    for patient, study, series, numbers, modality, description in CORPUS:
        for number in numbers:
            ds = make_dataset(
                patient_id=patient, patient_name=f"{patient[:3]}^TEST",
                study_uid=study_uid(study), series_uid=series_uid(study, series),
                sop_uid=sop_uid(study, series, number),
                sop_class=CT_IMAGE if modality == "CT" else MR_IMAGE, modality=modality,
                StudyDescription=description, InstanceNumber=number)
            item = Dataset()
            item.ScheduledProcedureStepID = f"SPS{study}"
            ds.RequestAttributesSequence = [item]
            datasets.append(dcmread(BytesIO(to_part10(ds))))
    return datasets


BASE_RULES = """\
rules:
  - {principal: "*", service: Echo}
  - {principal: admin, service: "*"}
  - principal: alice
    service: Query
    pattern: {StudyDescription: Trial A}
  - principal: alice
    service: Retrieve
    pattern: {StudyDescription: Trial A}
  - principal: alice
    service: Store
    pattern: {StudyDescription: "Trial A*", PatientID: "A.B$C(*"}
  - principal: carol
    service: Query
    pattern: {Modality: CT}
  - principal: dave
    service: "*"
    pattern: {PatientID: "A.B$C(*"}
  - principal: frank
    service: Query
    pattern: {InstanceNumber: 2}
  - principal: gina
    service: Query
    pattern: {RequestAttributesSequence: {ScheduledProcedureStepID: SPS3}}
"""


# --- the node ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path_factory.mktemp("acl-capture") / "in").start()
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def node(module_node_factory: Any, capture: StoreSCP) -> Any:
    running = module_node_factory.start({
        "acl": {"enabled": True, "refresh_seconds": REFRESH},
        "auth": {"backend": "none"},
        "destinations": {"CAPTURE": {"host": "127.0.0.1", "port": capture.port}},
    })
    # No rules: nothing is allowed, not even the administrator's store.
    with scu(running, "admin") as assoc:
        refused = assoc.send_c_store(corpus_datasets()[0])
        assert refused.Status == 0x0124
        assert refused.ErrorComment == "not authorized: no Store rule for admin"
    use_rules(running, BASE_RULES)
    with scu(running, "admin") as assoc:
        for ds in corpus_datasets():
            assert assoc.send_c_store(ds).Status == 0x0000
    return running


@pytest.fixture
def base_rules(node: Any) -> Iterator[Any]:
    """Tests that change the rules put the module's rules back."""
    yield node
    use_rules(node, BASE_RULES)


# --- Echo ---------------------------------------------------------------------------------


def test_echo_denied_without_a_rule_allowed_with_one(base_rules: Any) -> None:
    node = base_rules
    with scu(node) as assoc:
        assert assoc.send_c_echo().Status == 0x0000  # rule 1: anyone
    use_rules(node, """\
        rules:
          - {principal: admin, service: "*"}
          - {principal: bob, service: Echo, pattern: {Modality: CT}}
        """)
    with scu(node) as anonymous, scu(node, "bob") as bob, scu(node, "admin") as admin:
        denied = anonymous.send_c_echo()
        assert denied.Status == 0x0124
        assert denied.ErrorComment == "not authorized: no Echo rule for anonymous"
        assert bob.send_c_echo().Status == 0x0000  # an Echo rule, whatever its pattern
        assert admin.send_c_echo().Status == 0x0000
        assert anonymous.is_established  # a denial is not an abort


# --- Query ------------------------------------------------------------------------------------


PATIENT_KEYS = {"NumberOfPatientRelatedStudies": "", "NumberOfPatientRelatedSeries": "",
                "NumberOfPatientRelatedInstances": ""}
STUDY_KEYS = {"NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": "",
              "ModalitiesInStudy": "", "SOPClassesInStudy": ""}


def test_query_denied_without_a_rule(node: Any) -> None:
    with scu(node, "bob") as bob:
        status, matches, final = c_find(bob, "PATIENT", PatientID="")
        assert (status, matches) == (0x0124, [])
        assert final.ErrorComment == "not authorized: no Query rule for bob"


def test_admin_sees_everything(node: Any) -> None:
    with scu(node, "admin") as admin:
        _, patients, _ = c_find(admin, "PATIENT", PatientID="", **PATIENT_KEYS)
    rows = by_key(patients, "PatientID", "NumberOfPatientRelatedInstances")
    assert rows == {"A.B$C(1)": {"NumberOfPatientRelatedInstances": "4"},
                    "AXB$C(1)": {"NumberOfPatientRelatedInstances": "1"},
                    "P3": {"NumberOfPatientRelatedInstances": "2"}}


def test_a_study_pattern_hides_other_studies_at_every_level(node: Any) -> None:
    with scu(node, "alice") as alice:
        status, patients, _ = c_find(alice, "PATIENT", PatientID="", **PATIENT_KEYS)
        assert status == 0x0000
        assert by_key(patients, "PatientID", *PATIENT_KEYS) == {
            "A.B$C(1)": {"NumberOfPatientRelatedStudies": "1",
                         "NumberOfPatientRelatedSeries": "2",
                         "NumberOfPatientRelatedInstances": "3"},
            "AXB$C(1)": {"NumberOfPatientRelatedStudies": "1",
                         "NumberOfPatientRelatedSeries": "1",
                         "NumberOfPatientRelatedInstances": "1"}}
        _, studies, _ = c_find(alice, "STUDY", PatientID="A.B$C(1)", StudyInstanceUID="",
                               NumberOfPatientRelatedInstances="", **STUDY_KEYS)
        assert by_key(studies, "StudyInstanceUID", "NumberOfPatientRelatedInstances",
                      *STUDY_KEYS) == {study_uid("1"): {
                          "NumberOfPatientRelatedInstances": "3",
                          "NumberOfStudyRelatedSeries": "2",
                          "NumberOfStudyRelatedInstances": "3",
                          "ModalitiesInStudy": ["CT", "MR"],
                          "SOPClassesInStudy": sorted([CT_IMAGE, MR_IMAGE])}}
        _, series, _ = c_find(alice, "SERIES", PatientID="A.B$C(1)",
                              StudyInstanceUID=study_uid("1"), SeriesInstanceUID="",
                              NumberOfSeriesRelatedInstances="")
        assert by_key(series, "SeriesInstanceUID", "NumberOfSeriesRelatedInstances") == {
            series_uid("1", "1"): {"NumberOfSeriesRelatedInstances": "2"},
            series_uid("1", "2"): {"NumberOfSeriesRelatedInstances": "1"}}
        _, images, _ = c_find(alice, "IMAGE", PatientID="A.B$C(1)",
                              StudyInstanceUID=study_uid("1"),
                              SeriesInstanceUID=series_uid("1", "1"), SOPInstanceUID="")
        assert {str(i.SOPInstanceUID) for i in images} == {sop_uid("1", "1", 1),
                                                           sop_uid("1", "1", 2)}
        # The hidden study does not exist for alice, even named by its UIDs.
        for level, keys in [
            ("STUDY", {"PatientID": "A.B$C(1)", "StudyInstanceUID": study_uid("2")}),
            ("SERIES", {"PatientID": "A.B$C(1)", "StudyInstanceUID": study_uid("2"),
                        "SeriesInstanceUID": series_uid("2", "1")}),
            ("IMAGE", {"PatientID": "A.B$C(1)", "StudyInstanceUID": study_uid("2"),
                       "SeriesInstanceUID": series_uid("2", "1"),
                       "SOPInstanceUID": sop_uid("2", "1", 1)}),
            ("PATIENT", {"PatientID": "P3"}),
            ("STUDY", {"PatientID": "A.B$C(1)", "StudyInstanceUID": "",
                       "NumberOfStudyRelatedInstances": "1"}),
        ]:
            assert c_find(alice, level, **keys)[:2] == (0x0000, []), (level, keys)


def test_a_series_pattern_counts_only_visible_series(node: Any) -> None:
    with scu(node, "carol") as carol:
        _, patients, _ = c_find(carol, "PATIENT", PatientID="", **PATIENT_KEYS)
        assert by_key(patients, "PatientID", *PATIENT_KEYS) == {
            "A.B$C(1)": {"NumberOfPatientRelatedStudies": "2",
                         "NumberOfPatientRelatedSeries": "2",
                         "NumberOfPatientRelatedInstances": "3"},
            "P3": {"NumberOfPatientRelatedStudies": "1", "NumberOfPatientRelatedSeries": "1",
                   "NumberOfPatientRelatedInstances": "2"}}
        _, studies, _ = c_find(carol, "STUDY", PatientID="A.B$C(1)", StudyInstanceUID="",
                               **STUDY_KEYS)
        rows = by_key(studies, "StudyInstanceUID", *STUDY_KEYS)
        assert rows[study_uid("1")] == {"NumberOfStudyRelatedSeries": "1",
                                        "NumberOfStudyRelatedInstances": "2",
                                        "ModalitiesInStudy": ["CT"],
                                        "SOPClassesInStudy": [CT_IMAGE]}
        assert set(rows) == {study_uid("1"), study_uid("2")}
        # Matching on computed keys uses the visible values too.
        assert c_find(carol, "STUDY", PatientID="A.B$C(1)", StudyInstanceUID="",
                      ModalitiesInStudy="MR")[:2] == (0x0000, [])
        assert c_find(carol, "STUDY", PatientID="A.B$C(1)", StudyInstanceUID="",
                      NumberOfStudyRelatedInstances="3")[:2] == (0x0000, [])
        status, found, _ = c_find(carol, "STUDY", PatientID="A.B$C(1)", StudyInstanceUID="",
                                  NumberOfStudyRelatedInstances="2", ModalitiesInStudy="CT")
        assert status == 0x0000
        assert by_key(found, "StudyInstanceUID", "NumberOfStudyRelatedInstances",
                      "ModalitiesInStudy") == {study_uid("1"): {
                          "NumberOfStudyRelatedInstances": "2", "ModalitiesInStudy": ["CT"]}}


def test_an_instance_pattern_walks_down_to_the_instances(node: Any) -> None:
    with scu(node, "frank") as frank:
        _, patients, _ = c_find(frank, "PATIENT", PatientID="", **PATIENT_KEYS)
        assert by_key(patients, "PatientID", *PATIENT_KEYS) == {
            patient: {"NumberOfPatientRelatedStudies": "1", "NumberOfPatientRelatedSeries": "1",
                      "NumberOfPatientRelatedInstances": "1"} for patient in ("A.B$C(1)", "P3")}
        _, studies, _ = c_find(frank, "STUDY", PatientID="P3", StudyInstanceUID="",
                               **STUDY_KEYS)
        assert by_key(studies, "StudyInstanceUID", *STUDY_KEYS) == {study_uid("4"): {
            "NumberOfStudyRelatedSeries": "1", "NumberOfStudyRelatedInstances": "1",
            "ModalitiesInStudy": ["CT"], "SOPClassesInStudy": [CT_IMAGE]}}
        _, images, _ = c_find(frank, "IMAGE", PatientID="P3", StudyInstanceUID=study_uid("4"),
                              SeriesInstanceUID=series_uid("4", "1"), SOPInstanceUID="")
        assert {str(i.SOPInstanceUID) for i in images} == {sop_uid("4", "1", 2)}


def test_a_sequence_pattern(node: Any) -> None:
    with scu(node, "gina") as gina:
        _, series, _ = c_find(gina, "SERIES", PatientID="", StudyInstanceUID="",
                              SeriesInstanceUID="", NumberOfStudyRelatedInstances="")
        assert by_key(series, "SeriesInstanceUID", "NumberOfStudyRelatedInstances") == {
            series_uid("3", "1"): {"NumberOfStudyRelatedInstances": "1"}}
        _, patients, _ = c_find(gina, "PATIENT", PatientID="")
        assert {str(p.PatientID) for p in patients} == {"AXB$C(1)"}


def test_dollars_dots_and_regex_characters_stay_data(node: Any) -> None:
    with scu(node, "dave") as dave, scu(node, "admin") as admin:
        _, patients, _ = c_find(dave, "PATIENT", PatientID="")
        assert {str(p.PatientID) for p in patients} == {"A.B$C(1)"}  # not AXB$C(1)
        for value, expected in [("A.B$C(1)", {"A.B$C(1)"}), ("A.B$C(*", {"A.B$C(1)"}),
                                ("A?B$C(1)", {"A.B$C(1)", "AXB$C(1)"}), (".*", set()),
                                ("A.B$C(1|", set()), ('{"$ne": null}', set())]:
            _, found, _ = c_find(admin, "PATIENT", PatientID=value)
            assert {str(p.PatientID) for p in found} == expected, value


# --- Retrieve -----------------------------------------------------------------------------------


def test_retrieve_denied_without_a_rule(node: Any) -> None:
    status, completed, received = c_get(node, "carol", "STUDY", PatientID="A.B$C(1)",
                                        StudyInstanceUID=study_uid("1"))
    assert (status, completed, received) == (0x0124, 0, [])


def test_get_sends_only_visible_instances(node: Any) -> None:
    status, completed, received = c_get(node, "alice", "STUDY", PatientID="A.B$C(1)",
                                        StudyInstanceUID=study_uid("1"))
    assert (status, completed) == (0x0000, 3)
    assert sorted(received) == sorted([sop_uid("1", "1", 1), sop_uid("1", "1", 2),
                                       sop_uid("1", "2", 1)])
    # Patient level: the other study of the same patient stays behind.
    status, completed, received = c_get(node, "alice", "PATIENT", PatientID="A.B$C(1)")
    assert (status, completed, len(received)) == (0x0000, 3, 3)
    # Hidden ones, even by exact UID: nothing, answered exactly as for UIDs that do not
    # exist (0xC000, same comment).
    for level, keys in [
        ("STUDY", {"PatientID": "A.B$C(1)", "StudyInstanceUID": study_uid("2")}),
        ("IMAGE", {"PatientID": "P3", "StudyInstanceUID": study_uid("4"),
                   "SeriesInstanceUID": series_uid("4", "1"),
                   "SOPInstanceUID": sop_uid("4", "1", 1)}),
    ]:
        hidden = c_get_final(node, "alice", level, **keys)
        absent = c_get_final(node, "alice", level, **{k: f"{v}9" for k, v in keys.items()})
        assert hidden == absent == (0xC000, "no instance matches the identifier", 0, []), level


def test_move_sends_only_visible_instances(node: Any, capture: StoreSCP) -> None:
    capture.take()
    assert c_move(node, "alice", "CAPTURE", "STUDY", PatientID="P3",
                  StudyInstanceUID=study_uid("4")) == (0xC000, 0)  # hidden: not found
    assert c_move(node, "alice", "CAPTURE", "STUDY", PatientID="AXB$C(1)",
                  StudyInstanceUID=study_uid("3")) == (0x0000, 1)
    assert c_move(node, "carol", "CAPTURE", "STUDY", PatientID="AXB$C(1)",
                  StudyInstanceUID=study_uid("3"))[0] == 0x0124
    received = wait_for(capture.take, 10, message="the moved instance")
    assert set(received) == {sop_uid("3", "1", 1)}


# --- rules change under traffic ----------------------------------------------------------------


def test_rules_applied_during_traffic_take_effect_on_open_associations(
        base_rules: Any) -> None:
    node = base_rules
    seen: list[tuple[int, frozenset[str]]] = []
    stop = threading.Event()
    problems: list[str] = []

    with scu(node, "erin") as erin:
        def query() -> None:
            while not stop.is_set():
                try:
                    status, found, _ = c_find(erin, "STUDY", StudyInstanceUID="")
                    seen.append((status, frozenset(str(s.StudyInstanceUID) for s in found)))
                except Exception as exc:  # noqa: BLE001 - reported below
                    problems.append(repr(exc))
                    return

        use_rules(node, BASE_RULES + "  - {principal: erin, service: Query, "
                                     "pattern: {StudyDescription: Other}}\n")
        worker = threading.Thread(target=query)
        worker.start()
        try:
            wait_for(lambda: (0, frozenset({study_uid("2")})) in seen, 10,
                     message="erin to see the Other study")
            # The CLI, during traffic: the running association follows.
            text = BASE_RULES + ("  - {principal: erin, service: Query, "
                                 "pattern: {StudyDescription: Secret}}\n")
            path = Path(node.directory) / "erin.yaml"
            path.write_text(text, encoding="utf-8")
            applied = archive_cli(node, "acl", "apply", str(path))
            assert applied.returncode == 0, applied.stderr
            assert "+ rule 10 (erin Query: StudyDescription=Secret" in applied.stdout
            wait_for(lambda: seen[-1] == (0, frozenset({study_uid("4")})), 10,
                     message="erin to see the Secret study instead")
            use_rules(node, BASE_RULES)  # erin loses Query
            wait_for(lambda: seen[-1][0] == 0x0124, 10, message="erin denied")
        finally:
            stop.set()
            worker.join(30)
        assert not problems
        assert erin.is_established
        statuses = {status for status, _ in seen}
        assert statuses <= {0x0000, 0x0124}
        assert erin.send_c_echo().Status == 0x0000


# --- the command line --------------------------------------------------------------------------


def test_apply_of_an_invalid_file_changes_nothing(node: Any, tmp_path: Path) -> None:
    before = archive_cli(node, "acl", "export")
    assert before.returncode == 0, before.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        rules:
          - {principal: "*", service: Echo}
          - principal: mallory
            service: "*"
            pattern:
              StudyDate: 20240101-2024
          - {principal: admin, service: Everything}
        """), encoding="utf-8")
    result = archive_cli(node, "acl", "apply", str(bad))
    assert result.returncode == 2
    assert f"{bad}:6: rule 2 (principal 'mallory'): pattern: StudyDate (0008,0020) has an " \
           "invalid DA value" in result.stderr
    assert f"{bad}:7: rule 3 (principal 'admin'): unknown service 'Everything'" \
        in result.stderr
    assert "nothing changed" in result.stderr
    after = archive_cli(node, "acl", "export")
    assert after.stdout == before.stdout


def test_dry_run_export_and_round_trip(node: Any, tmp_path: Path) -> None:
    exported = archive_cli(node, "acl", "export", "-o", str(tmp_path / "rules.yaml"))
    assert exported.returncode == 0, exported.stderr
    again = archive_cli(node, "acl", "apply", str(tmp_path / "rules.yaml"))
    assert again.returncode == 0
    assert again.stdout.startswith("no change:")
    smaller = tmp_path / "smaller.yaml"
    smaller.write_text("rules:\n  - {principal: admin, service: '*'}\n  - {principal: zoe, "
                       "service: Echo}\n", encoding="utf-8")
    dry = archive_cli(node, "acl", "apply", str(smaller), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "+ rule 2 (zoe Echo: any dataset" in dry.stdout
    assert "- rule 3 (alice Query: StudyDescription=Trial A" in dry.stdout
    assert "nothing changed" in dry.stdout
    assert archive_cli(node, "acl", "export").stdout == \
        (tmp_path / "rules.yaml").read_text(encoding="utf-8")


def test_check_says_which_rule_decides(node: Any, tmp_path: Path) -> None:
    allowed = archive_cli(node, "acl", "check", "--user", "alice", "--service", "Query",
                          "StudyDescription=Trial A", "PatientID=X")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.startswith("allowed by rule 3 (alice Query: StudyDescription=Trial A")
    denied = archive_cli(node, "acl", "check", "--user", "alice", "--service", "query",
                         "StudyDescription=Other")
    assert denied.returncode == 1
    assert denied.stdout.startswith("denied: the dataset matches none of the Query rules")
    nobody = archive_cli(node, "acl", "check", "--user", "bob", "--service", "Retrieve")
    assert (nobody.returncode, nobody.stdout.split(":")[0]) == (1, "denied")
    path = tmp_path / "outside.dcm"
    path.write_bytes(to_part10(make_dataset(patient_id="AXB$C(5)",
                                            StudyDescription="Trial A")))
    stored = archive_cli(node, "acl", "check", "--user", "alice", "--service", "Store",
                         "--dataset", str(path))
    assert stored.returncode == 1
    admin = archive_cli(node, "acl", "check", "--user", "admin", "--service", "Store",
                        "--dataset", str(path))
    assert admin.returncode == 0 and admin.stdout.startswith("allowed by rule 2 (admin *")


def test_audit_records_associations_and_operations(node: Any) -> None:
    before = node.db.audit.count_documents({"principal": "bob"})
    with scu(node, "bob") as bob:
        assert bob.send_c_echo().Status == 0x0000
        assert c_find(bob, "STUDY", StudyInstanceUID="")[0] == 0x0124

    def bob_entries() -> list[dict[str, Any]]:
        entries = list(node.db.audit.find({"principal": "bob"}).sort("time", 1))
        return entries if len(entries) >= before + 4 else []

    entries = wait_for(bob_entries, 30, message="bob's audit entries")
    events = [(e["event"], e.get("allowed"), e.get("status")) for e in entries[-4:]]
    assert events == [("A-ASSOCIATE", True, None), ("C-ECHO", True, 0),
                      ("C-FIND", False, 0x0124), ("A-RELEASE", True, None)]
    find = entries[-2]
    assert find["service"] == "Query" and find["request"] == "STUDY"
    assert find["calling_ae"] == "ACLSCU" and find["called_ae"] == node.ae_title
    assert find["address"] == "127.0.0.1" and find["comment"].startswith("not authorized")
    stores = list(node.db.audit.find({"principal": "admin", "event": "C-STORE"}))
    assert len(stores) >= len(corpus_datasets())
    assert stores[-1]["allowed"] and stores[-1]["request"].startswith(UID)
    listed = archive_cli(node, "audit", "--user", "bob", "--limit", "4")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 4
    assert " bob ACLSCU@127.0.0.1:" in lines[2] and "C-FIND Query DENIED 0x0124" in lines[2]
    assert "A-RELEASE" in lines[3]
    recent = archive_cli(node, "audit", "--user", "bob", "--since", "10m", "--limit", "0")
    assert len(recent.stdout.splitlines()) == len(entries)
    future = archive_cli(node, "audit", "--since", "2999-01-01")
    assert (future.returncode, future.stdout) == (0, "")


def test_rejected_associations_are_audited(node: Any) -> None:
    ae = AE(ae_title="KRBSCU")
    ae.add_requested_context(Verification)
    item = UserIdentityNegotiation()
    item.user_identity_type = 3  # Kerberos: refused by every backend
    item.primary_field = b"a-kerberos-ticket"
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, ext_neg=[item])
    try:
        assert assoc.is_rejected
    finally:
        ae.shutdown()
    entry = wait_for(lambda: node.db.audit.find_one({"event": "A-ASSOCIATE-RJ",
                                                     "calling_ae": "KRBSCU"}), 10,
                     message="the rejection's audit entry")
    assert entry["allowed"] is False and entry["principal"] == "anonymous"
    assert entry["user"] is None  # a ticket is a credential, never recorded


# --- Store (last: it adds a patient) ------------------------------------------------------


def test_store_outside_the_pattern_is_refused_and_nothing_written(node: Any) -> None:
    inside = make_dataset(patient_id="A.B$C(9)", StudyDescription="Trial A2",
                          study_uid=f"{UID}.90", series_uid=f"{UID}.90.1", sop_uid=f"{UID}.90.1.1")
    outside = [
        make_dataset(patient_id="A.B$C(9)", StudyDescription="Other", sop_uid=f"{UID}.91"),
        make_dataset(patient_id="AXB$C(9)", StudyDescription="Trial A", sop_uid=f"{UID}.92"),
    ]
    files_before = node.db["fs.files"].count_documents({})
    with scu(node, "alice") as alice, scu(node, "bob") as bob:
        for ds in outside:
            refused = alice.send_c_store(dcmread(BytesIO(to_part10(ds))))
            assert refused.Status == 0x0124
            assert refused.ErrorComment == \
                "not authorized: dataset outside the Store rules of alice"
        refused = bob.send_c_store(dcmread(BytesIO(to_part10(inside))))
        assert (refused.Status, refused.ErrorComment) == (
            0x0124, "not authorized: no Store rule for bob")
        assert node.db.instances.find_one({"_id": f"{UID}.90.1.1"}) is None
        assert node.db["fs.files"].count_documents({}) == files_before
        assert alice.send_c_store(dcmread(BytesIO(to_part10(inside)))).Status == 0x0000
    for ds in outside:
        assert node.db.instances.find_one({"_id": str(ds.SOPInstanceUID)}) is None
    assert node.db["fs.files"].count_documents({}) == files_before + 1
    assert consistency_problems(node.db) == []


def test_the_archive_stays_consistent(node: Any) -> None:
    assert consistency_problems(node.db) == []
    assert settled_counters(node.db) == []


def test_a_new_archive_starts_with_the_shipped_rules_once(node_factory: Any) -> None:
    """First start on an empty database applies config/acl.yaml: echo for anyone,
    everything for admin; a later start keeps whatever rules the admin applied."""
    shipped = {"acl": {"enabled": True, "refresh_seconds": REFRESH,
                       "initial_rules": str(ROOT / "config" / "acl.yaml")},
               "auth": {"backend": "none"}}
    running = node_factory.start(shipped)
    dataset = corpus_datasets()[0]
    with scu(running) as assoc:
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(dataset).Status == 0x0124  # anonymous may not store
    with scu(running, "admin") as assoc:
        assert assoc.send_c_store(dataset).Status == 0x0000
    assert "applied the 3 access rules" in running.log()

    use_rules(running, """
        rules:
          - {principal: admin, service: Store}
    """)
    running.restart()
    with scu(running) as assoc:
        assert assoc.send_c_echo().Status == 0x0124  # the admin's rules stayed in force

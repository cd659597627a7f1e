"""Deleting, over the wire: ``archive delete`` on a running node's database and
DICOMweb ``DELETE`` on the node (a subprocess on the real FerretDB), checked with
DCMTK / pynetdicom C-STORE and C-FIND, and ``archive check``.

- what is deleted is gone at once for C-FIND, and every count is exact;
- deletes racing with C-STORE into the same study and with C-FIND leave an exact
  archive: every store acknowledged after a delete is stored and counted;
- the database killed in the middle of a delete: once it is back, the node's journal
  replay finishes the delete, and nothing is orphaned;
- a user deletes only what her Delete rules allow; what they hide is answered 404 as
  what does not exist, and is kept.
"""

from __future__ import annotations

import getpass
import json
import random
import signal
import subprocess
import sys
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import requests
from acl_clients import archive_cli, find_as, use_rules
from conftest import FerretDB, node_environment
from helpers import (
    CT_IMAGE,
    ROOT,
    association,
    consistency_problems,
    identifier,
    make_dataset,
    settled_counters,
    storescu,
    to_part10,
    wait_for,
)
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

from acl.users import write_users

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

PASSWORDS = {"admin": "admin-secret", "curator": "curator-secret", "alice": "alice-secret"}
RULES = """
rules:
  - {principal: "*", service: Echo}
  - {principal: admin, service: "*"}
  - {principal: admin, service: Delete}
  - {principal: curator, service: Query}
  - {principal: curator, service: Delete, pattern: {PatientID: "TRIAL42-*"}}
  - {principal: alice, service: Query}
"""
STORE_CONTEXTS = [(CT_IMAGE, ExplicitVRLittleEndian)]


def write_study(folder: Path, count: int, *, patient_id: str, study_uid: str | None = None,
                series: int = 1, modality: str = "CT") -> tuple[str, list[Path]]:
    """``count`` small instances of one study in ``series`` series, as Part-10 files."""
    study_uid = study_uid or generate_uid()
    series_uids = [generate_uid() for _ in range(series)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        ds = make_dataset(patient_id=patient_id, study_uid=study_uid,
                          series_uid=series_uids[n % series], modality=modality,
                          InstanceNumber=n + 1)
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        path.write_bytes(to_part10(ds))
        paths.append(path)
    return study_uid, paths


def send(node: Any, paths: list[Path]) -> None:
    result = storescu(node, *paths)
    assert set(result.responses.values()) == {"Success"}, result.responses


def find(node: Any, level: str, user: str = "admin", **keys: Any) -> list[Any]:
    """C-FIND (Study Root) answers, acting for ``user`` with her password."""
    return find_as(node, level, user, PASSWORDS[user], **keys)


def check_clean(node: Any) -> None:
    assert settled_counters(node.db) == []
    assert consistency_problems(node.db) == []
    result = archive_cli(node, "check", "--grace", "0")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def node(module_node_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    users = tmp_path_factory.mktemp("delete-users") / "users.yaml"
    write_users(users, {name: bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()
                        for name, p in PASSWORDS.items()})
    running = module_node_factory({
        "acl": {"enabled": True, "refresh_seconds": 0.2},
        "auth": {"backend": "file", "users_file": str(users),
                 "ae_principals": {"STORESCU": {"principal": "admin",
                                                "addresses": ["127.0.0.1"]}},
                 "ae_principals_without_password": True,
                 "throttle": {"user_failures": 1000, "peer_failures": 1000}},
    })
    use_rules(running, RULES)
    return running


def http_delete(node: Any, path: str, user: str | None) -> requests.Response:
    return requests.delete(f"{node.http_url}{path}", timeout=60,
                           auth=(user, PASSWORDS[user]) if user else None)


# --- archive delete ----------------------------------------------------------------------


def test_the_command_deletes_a_study_and_a_query_right_after_sees_it_gone(
        node: Any, tmp_path: Path) -> None:
    gone, gone_files = write_study(tmp_path / "a", 6, patient_id="CLI-1", series=2)
    kept, kept_files = write_study(tmp_path / "b", 3, patient_id="CLI-1")
    send(node, gone_files + kept_files)
    wait_for(lambda: settled_counters(node.db) == [], 30)

    dry = archive_cli(node, "delete", f"StudyInstanceUID={gone}", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"study {gone}" in dry.stdout and "6 instances in 2 series (whole study)" in dry.stdout
    assert "dry run: would delete 6 instances of 1 studies" in dry.stdout
    assert len(find(node, "STUDY", PatientID="CLI-1")) == 2  # nothing deleted

    done = archive_cli(node, "delete", f"StudyInstanceUID={gone}")
    assert done.returncode == 0, done.stderr
    assert "deleted 6 instances of 1 studies" in done.stdout
    studies = find(node, "STUDY", PatientID="CLI-1", StudyInstanceUID="",
                   NumberOfStudyRelatedInstances="")
    assert [(s.StudyInstanceUID, s.NumberOfStudyRelatedInstances) for s in studies] == [
        (kept, 3)]
    patient = node.db.patients.find_one({"_id": "CLI-1"})
    assert (patient["NumberOfPatientRelatedStudies"], patient["studies"]) == (1, [kept])
    assert node.db.instances.count_documents({"StudyInstanceUID": gone}) == 0
    check_clean(node)

    audit = archive_cli(node, "audit", "--user", getpass.getuser(), "--limit", "1")
    assert "DELETE Delete allowed 0x0000 instances=6" in audit.stdout
    assert "established=os-user" in audit.stdout
    assert f"StudyInstanceUID={gone}" in audit.stdout


def test_more_than_one_study_asks_first(node: Any, tmp_path: Path) -> None:
    one, files_one = write_study(tmp_path / "a", 2, patient_id="TRIAL42-001")
    two, files_two = write_study(tmp_path / "b", 2, patient_id="TRIAL42-002")
    other, files_other = write_study(tmp_path / "c", 1, patient_id="TRIAL43-001")
    send(node, files_one + files_two + files_other)
    wait_for(lambda: settled_counters(node.db) == [], 30)

    declined = archive_cli(node, "delete", "PatientID=TRIAL42-*", stdin="n\n")
    assert declined.returncode == 1
    assert "Delete 4 instances of 2 studies (2 patients)? [y/N]" in declined.stderr
    assert node.db.instances.count_documents({"PatientID": {"$in": ["TRIAL42-001",
                                                                   "TRIAL42-002"]}}) == 4
    accepted = archive_cli(node, "delete", "PatientID=TRIAL42-*", "--yes", "--json")
    assert accepted.returncode == 0, accepted.stderr
    report = json.loads(accepted.stdout[accepted.stdout.index("{"):])
    assert (report["deleted"], report["studies"], report["patients"]) == (4, 2, 2)
    assert [s.PatientID for s in find(node, "STUDY", PatientID="TRIAL4*")] == ["TRIAL43-001"]
    check_clean(node)


#: (keys, what the refusal says) for every command that changes or removes instances
REFUSED_KEYS = [
    (["Nonsense=1"], "neither a DICOM keyword nor a tag"),
    (["PatientID"], "expected KEY=VALUE"),
    (["NumberOfStudyRelatedInstances=3"], "computed by the archive"),
    (["PatientID=A", "0010,0020=B"], "PatientID given twice"),
]
CHANGING = [["delete"], ["modify", "--set", "StudyDescription=X"], ["rejected", "purge"]]


@pytest.mark.parametrize("command, keys, message", [
    *[(command, keys, message) for command in CHANGING for keys, message in REFUSED_KEYS],
    # a purge may take every rejected instance; a delete or a correction must select
    *[(command, ["PatientID=*"], "match every instance") for command in CHANGING[:2]],
])
def test_keys_that_select_nothing_definite_are_refused(node: Any, command: list[str],
                                                       keys: list[str], message: str) -> None:
    """The commands that change or remove instances read their keys alike."""
    result = archive_cli(node, *command, *keys, "--yes")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_nothing_matching_exits_1(node: Any) -> None:
    result = archive_cli(node, "delete", f"StudyInstanceUID={generate_uid()}")
    assert result.returncode == 1
    assert "no stored instance matches" in result.stderr


# --- DICOMweb DELETE ---------------------------------------------------------------------


def test_http_delete_of_a_series_then_of_an_instance(node: Any, tmp_path: Path) -> None:
    study, files = write_study(tmp_path / "a", 4, patient_id="WEB-1", series=2)
    send(node, files)
    wait_for(lambda: settled_counters(node.db) == [], 30)
    series = sorted({d["SeriesInstanceUID"] for d in node.db.instances.find(
        {"StudyInstanceUID": study})})
    response = http_delete(node, f"/studies/{study}/series/{series[0]}", "admin")
    assert response.status_code == 204, response.text
    left = find(node, "STUDY", StudyInstanceUID=study, NumberOfStudyRelatedSeries="",
                NumberOfStudyRelatedInstances="")
    assert (left[0].NumberOfStudyRelatedSeries, left[0].NumberOfStudyRelatedInstances) == (1, 2)
    sop = node.db.instances.find_one({"SeriesInstanceUID": series[1]})["_id"]
    response = http_delete(node, f"/studies/{study}/series/{series[1]}/instances/{sop}",
                           "admin")
    assert response.status_code == 204
    assert http_delete(node, f"/studies/{study}/series/{series[1]}/instances/{sop}",
                       "admin").status_code == 404  # gone
    assert find(node, "IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series[1],
                SOPInstanceUID="")[0].SOPInstanceUID != sop
    check_clean(node)


def test_a_restricted_user_deletes_only_what_her_rules_allow(node: Any, tmp_path: Path
                                                             ) -> None:
    allowed, allowed_files = write_study(tmp_path / "a", 2, patient_id="TRIAL42-100")
    hidden, hidden_files = write_study(tmp_path / "b", 2, patient_id="TRIAL99-100")
    send(node, allowed_files + hidden_files)
    wait_for(lambda: settled_counters(node.db) == [], 30)

    # outside her Delete rules: 404, exactly as a study that does not exist, and kept
    refused = http_delete(node, f"/studies/{hidden}", "curator")
    missing = http_delete(node, f"/studies/{generate_uid()}", "curator")
    assert (refused.status_code, refused.text) == (missing.status_code, missing.text) == (
        404, "no such study\n")
    assert node.db.instances.count_documents({"StudyInstanceUID": hidden}) == 2
    # no Delete rule at all: 403; a "*" rule does not give Delete
    assert http_delete(node, f"/studies/{hidden}", "alice").status_code == 403
    assert http_delete(node, f"/studies/{hidden}", None).status_code == 403
    assert node.db.instances.count_documents({"StudyInstanceUID": hidden}) == 2
    # within them: deleted
    assert http_delete(node, f"/studies/{allowed}", "curator").status_code == 204
    assert find(node, "STUDY", StudyInstanceUID=allowed) == []
    audit = archive_cli(node, "audit", "--user", "curator", "--limit", "3")
    lines = [line for line in audit.stdout.splitlines() if " DELETE " in line]
    assert len(lines) == 3 and "instances=2" in lines[-1]
    check_clean(node)


def test_only_the_instances_her_rules_match_go(node: Any, tmp_path: Path,
                                               node_factory: Any) -> None:
    """A study holding two patients' instances (hierarchy_conflicts: accept): she deletes
    her patient's, the other patient's stay, and the study's counts are exact."""
    mixed = node_factory({"hierarchy_conflicts": "accept", "acl": {"enabled": True,
                                                                    "refresh_seconds": 0.2},
                          "auth": node.config["auth"]})
    use_rules(mixed, RULES)
    study, mine = write_study(tmp_path / "a", 2, patient_id="TRIAL42-200")
    _, theirs = write_study(tmp_path / "b", 2, patient_id="OTHER-200", study_uid=study)
    send(mixed, mine + theirs)
    wait_for(lambda: settled_counters(mixed.db) == [], 30)
    assert http_delete(mixed, f"/studies/{study}", "curator").status_code == 204
    assert sorted(d["PatientID"] for d in mixed.db.instances.find()) == ["OTHER-200"] * 2
    assert find(mixed, "STUDY", StudyInstanceUID=study, NumberOfStudyRelatedInstances=""
                )[0].NumberOfStudyRelatedInstances == 2
    check_clean(mixed)


def test_bad_paths_are_400(node: Any) -> None:
    assert http_delete(node, "/studies/1.2.*", "admin").status_code == 400
    assert http_delete(node, "/studies/1.2%2F3", "admin").status_code == 400


# --- concurrency and failures ----------------------------------------------------------


def test_deletes_racing_with_stores_and_queries_leave_an_exact_archive(
        node_factory: Any) -> None:
    """C-STORE streams into the study being deleted (and another one) while C-FIND asks
    and DELETE runs again and again: every store acknowledged after the last delete is
    there and counted; the other study is whole; every C-FIND succeeds."""
    racing = node_factory()
    study, series, other, other_series = (generate_uid() for _ in range(4))
    stop = threading.Event()
    acknowledged: dict[str, list[str]] = {study: [], other: []}
    errors: list[str] = []

    def store() -> None:
        with association(racing, STORE_CONTEXTS) as assoc:
            n = 0
            while not stop.is_set():
                n += 1
                target = study if n % 3 else other
                ds = make_dataset(patient_id="RACE", study_uid=target,
                                  series_uid=series if target == study else other_series,
                                  InstanceNumber=n)
                status = assoc.send_c_store(dcmread(BytesIO(to_part10(ds)))).Status
                if status == 0x0000:
                    acknowledged[target].append(str(ds.SOPInstanceUID))
                else:
                    errors.append(f"C-STORE 0x{status:04X}")

    def query() -> None:
        with association(racing, [(FIND, ExplicitVRLittleEndian)]) as assoc:
            while not stop.is_set():
                for status, _ in assoc.send_c_find(identifier(
                        "STUDY", PatientID="RACE", NumberOfStudyRelatedInstances=""), FIND):
                    if status.Status not in (0xFF00, 0x0000):
                        errors.append(f"C-FIND 0x{status.Status:04X}")

    threads = [threading.Thread(target=store), threading.Thread(target=query)]
    for thread in threads:
        thread.start()
    before_last: set[str] = set()
    try:
        time.sleep(1.0)
        for _ in range(6):
            before_last = set(acknowledged[study])  # acknowledged before this delete
            response = requests.delete(f"{racing.http_url}/studies/{study}", timeout=60)
            assert response.status_code in (204, 404, 409), response.text
            time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert errors == []
    assert len(acknowledged[study]) > 5 and acknowledged[other]  # the stores did run
    wait_for(lambda: not racing.journal_pending(), 30)
    stored = {d["_id"] for d in racing.db.instances.find({}, {"_id": 1})}
    assert set(acknowledged[other]) <= stored  # the other study is whole
    # the study holds acknowledged instances only, none acknowledged before the last
    # delete was asked; those acknowledged while it ran are either gone or counted
    in_study = {d["_id"] for d in racing.db.instances.find({"StudyInstanceUID": study})}
    assert before_last and in_study <= set(acknowledged[study]) - before_last
    counted = find_open(racing, "STUDY", StudyInstanceUID=study,
                        NumberOfStudyRelatedInstances="")
    assert [int(s.NumberOfStudyRelatedInstances) for s in counted] == (
        [len(in_study)] if in_study else [])
    check_clean(racing)


def test_a_database_killed_in_the_middle_of_a_delete_orphans_nothing(
        node_factory: Any, private_ferretdb: FerretDB, tmp_path: Path) -> None:
    node = node_factory(ferret=private_ferretdb)
    study, files = write_study(tmp_path / "big", 400, patient_id="KILL-1", series=3)
    kept, kept_files = write_study(tmp_path / "kept", 3, patient_id="KILL-1")
    send(node, files + kept_files)
    wait_for(lambda: settled_counters(node.db) == [], 60)

    command = subprocess.Popen(
        [sys.executable, "-m", "archive", "delete", f"StudyInstanceUID={study}",
         "--config", str(node.config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=node_environment())
    # the delete's journal entry appears before anything is removed: kill then
    deadline = time.monotonic() + 60
    while not list(node.journal.glob("delete-*.json")):
        assert command.poll() is None, command.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.001)
    # of the delete's 1 s here, 0.09 s are between its journal entry's writing and
    # removal (the rest selects before and exits after): stopped somewhere in the first
    # half of that, the database killed meanwhile, then let go into the dead database
    # (a delay of up to 0.1 s once let the delete end first)
    delay = random.uniform(0, 0.045)
    print(f"delete stopped {delay:.2f} s after its journal entry appeared, database killed")
    time.sleep(delay)
    command.send_signal(signal.SIGSTOP)
    try:
        assert list(node.journal.glob("delete-*.json")), "the delete ended before the kill"
        private_ferretdb.stop(kill=True)
    finally:
        command.send_signal(signal.SIGCONT)
    out, err = command.communicate(timeout=120)
    assert command.returncode == 1, out + err
    assert "finished when the database answers again" in err
    assert list(node.journal.glob("delete-*.json"))  # the intent survives
    private_ferretdb.start()
    # the node replays the entry of the dead command once the database answers
    wait_for(lambda: not node.journal_pending(), 60)
    assert "journal replayed" in node.log()
    assert node.db.instances.count_documents({"StudyInstanceUID": study}) == 0
    assert node.db.instances.count_documents({"StudyInstanceUID": kept}) == 3
    assert [s.StudyInstanceUID for s in find_open(node, "STUDY", PatientID="KILL-1",
                                                          StudyInstanceUID="")] == [kept]
    check_clean(node)


def find_open(node: Any, level: str, **keys: Any) -> list[Any]:
    """C-FIND on a node without access control (no user identity)."""
    found = []
    with association(node, [(FIND, ExplicitVRLittleEndian)]) as assoc:
        for status, answer in assoc.send_c_find(identifier(level, **keys), FIND):
            assert status.Status in (0xFF00, 0x0000), hex(status.Status)
            if status.Status == 0xFF00:
                found.append(answer)
    return found

"""Rejection notes (IHE IOCM), over the wire: a Key Object Selection document with a
rejection title, sent by DCMTK's storescu or pynetdicom to the node (a subprocess on the
real FerretDB), hides what it references from C-FIND, C-GET and WADO-RS; ``archive
rejected list`` shows it, ``archive rejected purge`` deletes it.

- the note is stored, the referenced instances leave every count, their files stay
  until the purge, a re-send of one is refused until then;
- notes naming unknown instances, instances of another study or patient, another SOP
  class, instances already rejected, or sent twice are refused, and nothing is rejected
  nor stored;
- a sender needs Delete rights on what it rejects, and one restricted by its Delete
  rules is answered about another patient's instances exactly as about unknown ones.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import threading
import time
from collections.abc import Iterable
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import requests
from acl_clients import archive_cli, c_find, c_get, scu, use_rules
from dicomweb_client.api import DICOMwebClient
from helpers import (
    CT_IMAGE,
    MR_IMAGE,
    association,
    consistency_problems,
    make_dataset,
    settled_counters,
    storescu,
    to_part10,
    wait_for,
)
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from test_delete import check_clean

from archive.rejection import KEY_OBJECT_SELECTION as KOS

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

RULES = """
rules:
  - {principal: "*", service: Echo}
  - {principal: admin, service: "*"}
  - {principal: admin, service: Delete}
  - {principal: curator, service: Store}
  - {principal: curator, service: Query}
  - {principal: curator, service: Delete, pattern: {PatientID: "TRIAL42-*"}}
  - {principal: alice, service: Store}
  - {principal: alice, service: Query}
"""
CONTEXTS = [(KOS, ExplicitVRLittleEndian), (CT_IMAGE, ExplicitVRLittleEndian),
            (MR_IMAGE, ExplicitVRLittleEndian)]


@pytest.fixture(scope="module")
def node(module_node_factory: Any) -> Any:
    running = module_node_factory({"acl": {"enabled": True, "refresh_seconds": 0.2}})
    use_rules(running, RULES)
    return running


def study(patient: str, *series_sizes: int, study_uid: str | None = None
          ) -> tuple[str, list[list[Dataset]]]:
    """A study of CT instances, one list per series."""
    study_uid = study_uid or generate_uid()
    series = []
    for size in series_sizes:
        series_uid = generate_uid()
        series.append([make_dataset(patient_id=patient, study_uid=study_uid,
                                    series_uid=series_uid, InstanceNumber=n + 1)
                       for n in range(size)])
    return study_uid, series


def note(patient: str, study_uid: str, instances: Iterable[Dataset], code: str = "113001",
         *, referenced_study: str | None = None, sop_class: str | None = None) -> Dataset:
    """A rejection note (KOS titled with a CID 7011 code) referencing ``instances``."""
    ds = make_dataset(patient_id=patient, study_uid=study_uid, sop_class=KOS, modality="KO")
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator = code, "DCM"
    title.CodeMeaning = "Rejected for Quality Reasons"
    ds.ConceptNameCodeSequence = [title]
    ds.ValueType = "CONTAINER"
    by_series: dict[str, list[Dataset]] = {}
    for inst in instances:
        by_series.setdefault(str(inst.SeriesInstanceUID), []).append(inst)
    evidence = Dataset()
    evidence.StudyInstanceUID = referenced_study or study_uid
    evidence.ReferencedSeriesSequence = []
    for series_uid, members in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedSOPSequence = []
        for inst in members:
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class or inst.SOPClassUID
            ref.ReferencedSOPInstanceUID = inst.SOPInstanceUID
            item.ReferencedSOPSequence.append(ref)
        evidence.ReferencedSeriesSequence.append(item)
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence] if by_series else []
    return ds


def send(node: Any, user: str, *datasets: Dataset) -> list[tuple[int, str]]:
    """(status, Error Comment) of each C-STORE, pynetdicom acting for ``user``."""
    answers = []
    with association(node, CONTEXTS, user=user) as assoc:
        for ds in datasets:
            response = assoc.send_c_store(dcmread(BytesIO(to_part10(ds))))
            answers.append((int(response.Status), str(response.get("ErrorComment", ""))))
    return answers


def stored(node: Any, user: str, *series: list[Dataset]) -> None:
    datasets = [ds for members in series for ds in members]
    assert send(node, user, *datasets) == [(0x0000, "")] * len(datasets)
    wait_for(lambda: settled_counters(node.db) == [], 30)


def study_counts(node: Any, study_uid: str) -> tuple[int, int, list[str]]:
    """(series, instances, modalities) C-FIND answers for the study, as admin."""
    with scu(node, "admin") as assoc:
        status, found, _ = c_find(assoc, "STUDY", StudyInstanceUID=study_uid,
                                  NumberOfStudyRelatedSeries="",
                                  NumberOfStudyRelatedInstances="", ModalitiesInStudy="")
    assert status == 0x0000 and len(found) == 1
    modalities = found[0].ModalitiesInStudy
    return (int(found[0].NumberOfStudyRelatedSeries),
            int(found[0].NumberOfStudyRelatedInstances),
            sorted([modalities] if isinstance(modalities, str) else modalities))


def test_a_note_sent_by_storescu_hides_its_instances_until_purged(node: Any,
                                                                  tmp_path: Path) -> None:
    study_uid, (bad, good) = study("IOCM-1", 4, 2)
    stored(node, "admin", bad, good)
    files_before = node.db["fs.files"].count_documents({})
    kos = note("IOCM-1", study_uid, bad)
    path = tmp_path / "note.dcm"
    path.write_bytes(to_part10(kos))

    result = storescu(node, path, extra_args=["-usr", "admin"])
    assert result.responses == {str(path): "Success"}, result.output

    # the note is stored and counted; the 4 rejected instances are nowhere to be seen
    assert study_counts(node, study_uid) == (2, 3, ["CT", "KO"])
    with scu(node, "admin") as assoc:
        status, found, _ = c_find(assoc, "IMAGE", StudyInstanceUID=study_uid,
                                  SeriesInstanceUID=str(bad[0].SeriesInstanceUID),
                                  SOPInstanceUID="")
    assert (status, found) == (0x0000, [])
    status, _, received = c_get(node, "admin", "SERIES", StudyInstanceUID=study_uid,
                                SeriesInstanceUID=str(bad[0].SeriesInstanceUID))
    assert (status, received) == (0xC000, [])
    status, _, received = c_get(node, "admin", "SERIES", StudyInstanceUID=study_uid,
                                SeriesInstanceUID=str(good[0].SeriesInstanceUID))
    assert sorted(received) == sorted(str(ds.SOPInstanceUID) for ds in good)
    wado = requests.get(f"{node.http_url}/studies/{study_uid}/series/"
                        f"{bad[0].SeriesInstanceUID}/instances/{bad[0].SOPInstanceUID}",
                        auth=("admin", "x"), timeout=30)
    assert wado.status_code == 404
    # kept: the files stay, and the archive is consistent with them
    assert node.db["fs.files"].count_documents({}) == files_before + 1
    assert consistency_problems(node.db) == [] and settled_counters(node.db) == []

    listed = archive_cli(node, "rejected", "list", f"StudyInstanceUID={study_uid}")
    assert listed.returncode == 0, listed.stderr
    lines = [line for line in listed.stdout.splitlines() if "113001" in line]
    assert len(lines) == 4 and all("Rejected for Quality Reasons" in line
                                   and f"note {kos.SOPInstanceUID}" in line
                                   and " by admin " in line for line in lines)
    assert {re.search(r"instance (\S+):", line).group(1) for line in lines} == {  # type: ignore[union-attr]
        str(ds.SOPInstanceUID) for ds in bad}
    audit = archive_cli(node, "audit", "--user", "admin", "--limit", "40")
    assert "REJECT Delete allowed 0x0000 instances=4 series=1" in audit.stdout, audit.stdout

    # a re-send is refused until the purge, then stored again
    assert send(node, "admin", bad[0]) == [(0xA771, "subsequent occurrence of rejected "
                                                    "object (113001)")]
    dry = archive_cli(node, "rejected", "purge", f"StudyInstanceUID={study_uid}", "--dry-run")
    assert dry.returncode == 0 and "would purge 4 rejected instances of 1 studies" in dry.stdout
    purged = archive_cli(node, "rejected", "purge", f"StudyInstanceUID={study_uid}")
    assert purged.returncode == 0, purged.stderr
    assert "purged 4 rejected instances of 1 studies" in purged.stdout
    assert node.db["fs.files"].count_documents({}) == files_before - 4 + 1
    assert node.db.rejected.count_documents({"StudyInstanceUID": study_uid}) == 0
    audited = node.db.audit.find_one({"event": "PURGE", "request": {
        "$regex": f"StudyInstanceUID={re.escape(study_uid)}$"}})
    assert (audited["service"], audited["status"], audited["counts"]["instances"],
            audited["established"]) == ("Delete", 0, 4, "os-user")
    assert send(node, "admin", bad[0]) == [(0x0000, "")]
    wait_for(lambda: settled_counters(node.db) == [], 30)
    assert study_counts(node, study_uid) == (3, 4, ["CT", "KO"])
    check_clean(node)


def test_a_corrected_instance_rejected_then_purged_leaves_no_original_behind(
        node: Any) -> None:
    """archive modify keeps each original beside the corrected file (the instance's
    history); rejecting the instance keeps both, purging it deletes both."""
    study_uid, (members,) = study("IOCM-FIX", 2)
    stored(node, "admin", members)
    files_before = node.db["fs.files"].count_documents({})
    fixed = archive_cli(node, "modify", f"StudyInstanceUID={study_uid}", "--set",
                        "StudyDescription=corrected")
    assert fixed.returncode == 0, fixed.stderr
    originals = {d["_id"]: d["history"][0]["file_id"] for d in node.db.instances.find(
        {"StudyInstanceUID": study_uid}, {"history": 1})}
    assert node.db["fs.files"].count_documents({}) == files_before + 2
    rejected, kept = (str(ds.SOPInstanceUID) for ds in members)
    assert send(node, "admin", note("IOCM-FIX", study_uid, members[:1])) == [(0x0000, "")]
    check_clean(node)  # the rejected instance's original is owned, not an orphan

    purged = archive_cli(node, "rejected", "purge", f"StudyInstanceUID={study_uid}")
    assert purged.returncode == 0, purged.stderr
    assert node.db["fs.files"].find_one({"_id": originals[rejected]}) is None
    assert node.db["fs.files"].find_one({"_id": originals[kept]}) is not None
    # the kept instance: its file and original; the note; the purged one: nothing
    assert node.db["fs.files"].count_documents({}) == files_before + 2 + 1 - 2
    check_clean(node)


def _refusals() -> list[Any]:
    """(case name, build(archive state) -> note, expected status, comment prefix)."""
    def unknown(s: dict[str, Any]) -> Dataset:
        ghost = make_dataset(patient_id="IOCM-2", study_uid=s["study"],
                             series_uid=s["series"][0][0].SeriesInstanceUID)
        return note("IOCM-2", s["study"], [s["series"][0][0], ghost])

    def of_another_study(s: dict[str, Any]) -> Dataset:  # named as if in this study
        moved = s["other"][0][0].copy()
        moved.StudyInstanceUID = s["study"]
        moved.SeriesInstanceUID = s["series"][0][0].SeriesInstanceUID
        return note("IOCM-2", s["study"], [s["series"][0][0], moved])

    def naming_another_study(s: dict[str, Any]) -> Dataset:
        return note("IOCM-2", s["study"], s["other"][0], referenced_study=s["other_study"])

    def of_another_patient(s: dict[str, Any]) -> Dataset:
        return note("IOCM-9", s["study"], s["series"][0])

    def wrong_class(s: dict[str, Any]) -> Dataset:
        return note("IOCM-2", s["study"], s["series"][0], sop_class=MR_IMAGE)

    def nothing(s: dict[str, Any]) -> Dataset:
        return note("IOCM-2", s["study"], [])

    return [
        ("unknown instance", unknown, 0xA772, "rejection failed: no such instance"),
        ("instance of another study", of_another_study, 0xA772,
         "rejection failed: no such instance"),
        ("reference to another study", naming_another_study, 0xA772,
         "rejection failed: reference outside the note's study"),
        ("instances of another patient", of_another_patient, 0xA772,
         "rejection failed: no such instance"),
        ("another SOP class", wrong_class, 0xA773, "rejection failed: class-instance conflict"),
        ("no reference", nothing, 0xC000, "rejection note references no instance"),
    ]


@pytest.fixture(scope="module")
def refusable(node: Any) -> dict[str, Any]:
    """A study of patient IOCM-2, and another study of the same patient."""
    study_uid, series = study("IOCM-2", 3)
    other_study, other = study("IOCM-2", 2)
    stored(node, "admin", *series, *other)
    return {"study": study_uid, "series": series, "other_study": other_study, "other": other}


@pytest.mark.parametrize("case, build, status, comment", _refusals(),
                         ids=[r[0] for r in _refusals()])
def test_notes_naming_what_is_not_there_reject_nothing(
        node: Any, refusable: dict[str, Any], case: str, build: Any, status: int,
        comment: str) -> None:
    kos = build(refusable)
    [(answered, text)] = send(node, "admin", kos)
    assert (answered, text) == (status, comment), case
    # nothing rejected, the note not stored
    assert study_counts(node, refusable["study"]) == (1, 3, ["CT"])
    assert study_counts(node, refusable["other_study"]) == (1, 2, ["CT"])
    assert node.db.instances.find_one({"_id": str(kos.SOPInstanceUID)}) is None
    assert node.db.rejected.count_documents({"PatientID": "IOCM-2"}) == 0


def test_already_rejected_and_duplicate_notes(node: Any) -> None:
    study_uid, (series,) = study("IOCM-3", 3)
    stored(node, "admin", series)
    first = note("IOCM-3", study_uid, series[:2])
    assert send(node, "admin", first) == [(0x0000, "")]
    # the same note again; another note for the same reason (nothing to do); another reason
    assert send(node, "admin", first) == [(0xA770, "rejection note already received")]
    assert send(node, "admin", note("IOCM-3", study_uid, series[:1])) == [(0x0000, "")]
    [(status, comment)] = send(node, "admin", note("IOCM-3", study_uid, series, "113037"))
    assert (status, comment) == (0xA774, "rejection failed: already rejected")
    wait_for(lambda: settled_counters(node.db) == [], 30)
    assert study_counts(node, study_uid) == (3, 3, ["CT", "KO"])  # 1 image, 2 notes
    check_clean(node)


def test_who_may_reject(node: Any) -> None:
    mine, (my_series,) = study("TRIAL42-7", 2)
    theirs, (their_series,) = study("TRIAL99-7", 2)
    stored(node, "admin", my_series, their_series)

    # no Delete rule at all: refused as such, nothing learnt about the instances
    assert send(node, "alice", note("TRIAL42-7", mine, my_series)) == [
        (0x0124, "not authorized: no Delete rule for alice")]
    # outside her Delete rules: answered exactly as an instance that does not exist
    hidden = note("TRIAL99-7", theirs, their_series[:1])
    ghost = make_dataset(patient_id="TRIAL99-7", study_uid=theirs,
                         series_uid=their_series[0].SeriesInstanceUID)
    missing = note("TRIAL99-7", theirs, [ghost])
    [refused] = send(node, "curator", hidden)
    [unknown] = send(node, "curator", missing)
    assert refused == unknown == (0xA772, "rejection failed: no such instance")
    assert study_counts(node, theirs) == (1, 2, ["CT"])
    # within them: rejected
    assert send(node, "curator", note("TRIAL42-7", mine, my_series[:1])) == [(0x0000, "")]
    wait_for(lambda: settled_counters(node.db) == [], 30)
    assert study_counts(node, mine) == (2, 2, ["CT", "KO"])
    audit = archive_cli(node, "audit", "--user", "curator", "--limit", "10")
    assert "REJECT Delete allowed 0x0000 instances=1" in audit.stdout, audit.stdout


def test_deleting_a_study_purges_its_rejected_instances(node: Any) -> None:
    """A delete of a study (DICOMweb DELETE, the console's, ``archive delete``) leaves
    nothing of it behind: its rejected instances' documents and files go too, and a
    re-send of one is stored again, not refused as a subsequent occurrence."""
    by_web, (bad, good) = study("TRIAL42-D1", 3, 2)
    by_cli, (cli_bad, cli_good) = study("IOCM-D2", 2, 1)
    stored(node, "admin", bad, good, cli_bad, cli_good)
    files_before = node.db["fs.files"].count_documents({})
    assert send(node, "admin", note("TRIAL42-D1", by_web, bad),
                note("IOCM-D2", by_cli, cli_bad)) == [(0x0000, "")] * 2
    wait_for(lambda: settled_counters(node.db) == [], 30)
    assert node.db.rejected.count_documents({"StudyInstanceUID": by_web}) == 3

    # Delete rules restricted to other patients: 404, and the rejected copies stay
    url = f"{node.http_url}/studies/{by_cli}"
    response = requests.delete(url, auth=("curator", "x"), timeout=60)
    assert response.status_code == 404
    assert node.db.rejected.count_documents({"StudyInstanceUID": by_cli}) == 2

    response = requests.delete(f"{node.http_url}/studies/{by_web}", auth=("curator", "x"),
                               timeout=60)
    assert response.status_code == 204, response.text
    assert node.db.rejected.count_documents({"StudyInstanceUID": by_web}) == 0
    entry = wait_for(lambda: node.db.audit.find_one({
        "event": "DELETE", "principal": "curator", "request": {"$regex": re.escape(by_web)},
        "http_status": 204}), 30)
    assert entry["counts"] == {"instances": 3, "series": 2, "studies": 1, "patients": 1,
                               "rejected": 3}

    confirm = requests.get(f"http://127.0.0.1:{node.http_port}/studies/{by_cli}/delete",
                           auth=("admin", "x"), timeout=60)  # the console's Delete
    assert confirm.status_code == 200, confirm.text
    assert "purges the <b>2</b> rejected instances it holds" in confirm.text
    dry = archive_cli(node, "delete", f"StudyInstanceUID={by_cli}", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would delete 2 instances of 1 studies (1 patients) and 2 rejected instances" \
        in dry.stdout
    deleted = archive_cli(node, "delete", f"StudyInstanceUID={by_cli}", "--json")
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout)["rejected"] == 2
    assert node.db.rejected.count_documents({"StudyInstanceUID": by_cli}) == 0

    # every file of both studies is gone, notes and rejected originals included
    assert node.db["fs.files"].count_documents({}) == files_before - 8
    assert send(node, "admin", bad[0], cli_bad[0]) == [(0x0000, "")] * 2
    wait_for(lambda: settled_counters(node.db) == [], 30)
    assert study_counts(node, by_web) == (1, 1, ["CT"])
    check_clean(node)


def test_archive_import_applies_a_rejection_note(node: Any, tmp_path: Path) -> None:
    study_uid, (series,) = study("IOCM-4", 2)
    stored(node, "admin", series)
    kos = note("IOCM-4", study_uid, series[:1], "113038")
    path = tmp_path / "note.dcm"
    path.write_bytes(to_part10(kos))
    result = archive_cli(node, "import", str(path))
    assert result.returncode == 0 and "stored 1, skipped 0, failed 0" in result.stdout, (
        result.stdout + result.stderr)
    wait_for(lambda: settled_counters(node.db) == [], 30)
    assert study_counts(node, study_uid) == (2, 2, ["CT", "KO"])  # 1 image, the note
    listed = archive_cli(node, "rejected", "list", "PatientID=IOCM-4", "--json")
    [row] = json.loads(listed.stdout)["rejected"]
    assert (row["SOPInstanceUID"], row["code"], row["meaning"], row["by"][:15]) == (
        str(series[0].SOPInstanceUID), "113038", "Incorrect Modality Worklist Entry",
        "archive import ")
    again = archive_cli(node, "import", str(path))  # the same note: refused, a failed file
    assert again.returncode == 1 and "0xA770 rejection note already received" in again.stderr


def test_a_note_sent_by_stow_rs(node: Any) -> None:
    """dicomweb-client's STOW-RS, acting for curator: her Delete rules apply as on C-STORE."""
    study_uid, (series,) = study("TRIAL42-8", 2)
    stored(node, "admin", series)
    session = requests.Session()
    session.auth = ("curator", "x")
    client = DICOMwebClient(node.http_url, session=session)
    kos = note("TRIAL42-8", study_uid, series[:1], "113037")
    answer = client.store_instances([dcmread(BytesIO(to_part10(kos)))])
    assert "FailedSOPSequence" not in answer
    wait_for(lambda: settled_counters(node.db) == [], 30)
    assert study_counts(node, study_uid) == (2, 2, ["CT", "KO"])
    assert node.db.rejected.find_one({"_id": str(series[0].SOPInstanceUID)})[
        "rejection"]["by"] == "curator"
    audit = archive_cli(node, "audit", "--user", "curator", "--limit", "10")
    assert "REJECT Delete allowed 0x0000 instances=1 series=1" in audit.stdout, audit.stdout


def test_a_node_killed_in_the_middle_of_a_rejection_leaves_both_or_neither(
        node_factory: Any) -> None:
    """SIGKILL at a random instant after the rejection's journal entry appears: after the
    restart's journal replay, the note is stored and every instance rejected, or neither,
    and every count is exact."""
    victim = node_factory()
    study_uid, (series,) = study("IOCM-KILL", 200)
    with association(victim, CONTEXTS) as assoc:
        assert {int(assoc.send_c_store(dcmread(BytesIO(to_part10(ds)))).Status)
                for ds in series} == {0}
    wait_for(lambda: settled_counters(victim.db) == [], 30)
    kos = note("IOCM-KILL", study_uid, series)

    def sender() -> None:
        with contextlib.suppress(Exception):  # the association dies with the node
            send(victim, "admin", kos)

    thread = threading.Thread(target=sender)
    thread.start()
    wait_for(lambda: list(victim.journal.glob("reject-*.json")), 30, interval=0.001)
    delay = random.uniform(0, 0.25)  # the rejection takes ~0.4 s here: in its middle
    print(f"node killed {delay:.2f} s after the rejection's journal entry appeared")
    time.sleep(delay)
    victim.kill()
    thread.join(30)
    victim.launch()
    wait_for(lambda: not victim.journal_pending(), 30)
    note_stored = victim.db.instances.find_one({"_id": str(kos.SOPInstanceUID)}) is not None
    rejected = victim.db.rejected.count_documents({"StudyInstanceUID": study_uid})
    left = victim.db.instances.count_documents({"SeriesInstanceUID": str(
        series[0].SeriesInstanceUID)})
    print(f"after the replay ({'journal replayed' in victim.log()}): note stored "
          f"{note_stored}, {rejected} instances rejected")
    assert (rejected, left) == ((200, 0) if note_stored else (0, 200))
    assert settled_counters(victim.db) == [] and consistency_problems(victim.db) == []

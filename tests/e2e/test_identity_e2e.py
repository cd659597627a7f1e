"""Who an association acts for, end to end: AE-title mappings bound to addresses, the
password backends, and the throttle on wrong passcodes.  Node subprocesses on
FerretDB; pynetdicom SCUs whose source address is chosen by binding the client socket
to another loopback address (all of 127/8 reaches lo), and DCMTK's findscu from
127.0.0.1 as the device that cannot send a user identity.

- ``none`` backend, ``WORKSTATION`` mapped to ``ws`` from 127.0.0.1: findscu and a
  pynetdicom SCU from 127.0.0.1 see the data, the same title from 127.0.0.2 is
  anonymous (denied); the audit says how each principal was established.
- ``file`` backend and the README's old example (``WORKSTATION`` -> ``admin``): without
  ``ae_principals_without_password`` the mapping is inactive (warned at start), so a
  user with a password and narrow rules who drops her identity is anonymous; with a
  wrong passcode she is rejected.  With the key set, the mapping applies from its
  address only, and a verified identity outranks it.
- Brute force: 50 wrong passcodes from one peer are refused after the limits without
  bcrypt (node CPU per refusal measured against a check's), a bystander's C-ECHO from
  another address stays fast, and the real user logs in at once from her known address.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from helpers import (
    CT_IMAGE,
    DCMTK_ENV,
    cpu_seconds,
    identifier,
    make_dataset,
    to_part10,
    wait_for,
)
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from acl.rules import RuleStore
from acl.users import set_password
from acl.yamlrules import parse

pytestmark = [pytest.mark.network, pytest.mark.filterwarnings("ignore:Invalid value for VR")]

FIND = StudyRootQueryRetrieveInformationModelFind
GET = StudyRootQueryRetrieveInformationModelGet
REFRESH = 0.2
UID = "1.2.826.0.1.3680043.10.1041.77"
PASSCODES = {"admin": "Admin-passcode-1", "alice": "Alice-passcode-2"}
WRONG = "Wrong-passcode-3"
HERE, ELSEWHERE = "127.0.0.1", "127.0.0.2"
PERMANENT, TRANSIENT = 0x01, 0x02  # A-ASSOCIATE-RJ results

RULES = """\
rules:
  - {principal: "*", service: Echo}
  - {principal: admin, service: "*"}
  - {principal: ws, service: Query}
  - {principal: ws, service: Retrieve}
  - {principal: alice, service: Query, pattern: {StudyDescription: Trial A}}
  - {principal: alice, service: Retrieve, pattern: {StudyDescription: Trial A}}
"""

STUDIES = {"1": "Trial A", "2": "Secret"}


def as_sent(ds: Dataset) -> Dataset:
    """A dataset as read from a Part-10 file (what send_c_store needs)."""
    return dcmread(BytesIO(to_part10(ds)))


def datasets() -> list[Dataset]:
    return [as_sent(make_dataset(patient_id=f"ID-{n}", study_uid=f"{UID}.{n}",
                                 series_uid=f"{UID}.{n}.1", sop_uid=f"{UID}.{n}.1.1",
                                 sop_class=CT_IMAGE, StudyDescription=description))
            for n, description in STUDIES.items()]


# --- clients ----------------------------------------------------------------------------


@dataclass
class Session:
    """What one association did: rejection (result), C-FIND / C-GET / C-STORE outcomes."""

    rejected: int | None = None
    aborted: bool = False
    seconds: float = 0.0
    echo: int | None = None
    find: tuple[int, list[str]] | None = None  # status, Study Instance UIDs
    got: tuple[int, list[str]] | None = None  # status, SOP Instance UIDs received
    stored: int | None = None


def session(node: Any, *, source: str = HERE, ae_title: str = "WORKSTATION",
            user: str | None = None, passcode: str | None = None, echo: bool = False,
            find: bool = False, get: bool = False, store: Dataset | None = None) -> Session:
    """One association from ``source`` doing what is asked, then released."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for context in (Verification, FIND, GET, CTImageStorage):
        ae.add_requested_context(context)
    ext: list[Any] = [build_role(CTImageStorage, scu_role=True, scp_role=True)] if get \
        else []
    if user is not None:
        item = UserIdentityNegotiation()
        item.user_identity_type = 2 if passcode is not None else 1
        item.primary_field = user.encode()
        if passcode is not None:
            item.secondary_field = passcode.encode()
        ext.append(item)
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    out = Session()
    started = time.perf_counter()
    try:
        assoc = ae.associate(HERE, node.port, ae_title=node.ae_title, ext_neg=ext,
                             bind_address=(source, 0),
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        out.seconds = time.perf_counter() - started
        if assoc.is_rejected:
            out.rejected = assoc.acceptor.primitive.result
            return out
        if not assoc.is_established:  # the connection closed before an answer was read
            out.aborted = True
            return out
        if echo:
            out.echo = int(assoc.send_c_echo().Status)
        if find:
            uids, final = [], 0
            for status, found in assoc.send_c_find(
                    identifier("STUDY", StudyInstanceUID=""), FIND):
                if status.Status == 0xFF00:
                    uids.append(str(found.StudyInstanceUID))
                else:
                    final = int(status.Status)
            out.find = (final, sorted(uids))
        if get:
            final = 0
            for n in STUDIES:
                for status, _ in assoc.send_c_get(
                        identifier("STUDY", StudyInstanceUID=f"{UID}.{n}"), GET):
                    final = max(final, int(status.Status))
            out.got = (final, sorted(received))
        if store is not None:
            out.stored = int(assoc.send_c_store(store).Status)
        assoc.release()
        out.seconds = time.perf_counter() - started
        return out
    finally:
        ae.shutdown()


def findscu(node: Any, ae_title: str = "WORKSTATION") -> tuple[str, int]:
    """DCMTK findscu (no user identity possible) from 127.0.0.1: (final status, answers)."""
    done = subprocess.run(
        ["findscu", "-v", "-sr", "-S", "-aet", ae_title, "-aec", node.ae_title, HERE,
         str(node.port), "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"],
        capture_output=True, text=True, env=DCMTK_ENV, timeout=60)
    output = done.stdout + done.stderr
    answers = sum("Received Find Response" in line and "Pending" in line
                  for line in output.splitlines())
    final = re.findall(r"Received Final Find Response \(([^)]*)\)", output)
    return (final[-1] if final else output), answers


def apply_rules(node: Any, text: str = RULES) -> None:
    RuleStore(node.db).apply(parse(textwrap.dedent(text), "test-rules.yaml"), "test")
    time.sleep(REFRESH * 3)


def audit_entry(node: Any, **condition: Any) -> dict[str, Any]:
    return wait_for(lambda: node.db.audit.find_one(condition, sort=[("time", -1)]), 15,
                    message=f"an audit entry {condition}")


def all_uids() -> list[str]:
    return sorted(f"{UID}.{n}" for n in STUDIES)


# --- nodes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bcrypt at the production cost (12): a check costs what it costs in service."""
    path = tmp_path_factory.mktemp("identity-users") / "users.yaml"
    for name, passcode in PASSCODES.items():
        set_password(path, name, passcode.encode())
    return path


def start(factory: Any, auth: dict[str, Any], users: Path | None = None) -> Any:
    if users is not None:
        auth = {"backend": "file", "users_file": str(users), **auth}
    node = factory.start({"acl": {"enabled": True, "refresh_seconds": REFRESH},
                          "auth": auth})
    apply_rules(node)
    return node


def fill(node: Any, **identity: str) -> None:
    for ds in datasets():
        assert session(node, store=ds, **identity).stored == 0x0000


@pytest.fixture(scope="module")
def open_node(module_node_factory: Any) -> Any:
    """backend none; WORKSTATION -> ws from 127.0.0.1 only."""
    node = start(module_node_factory, {"backend": "none", "ae_principals": {
        "WORKSTATION": {"principal": "ws", "addresses": [f"{HERE}/32"]}}})
    fill(node, user="admin")
    return node


@pytest.fixture(scope="module")
def strict_node(module_node_factory: Any, users_file: Path) -> Any:
    """backend file, the README's old example mapping to admin, the key left off."""
    node = start(module_node_factory, {"ae_principals": {
        "WORKSTATION": {"principal": "admin", "addresses": [HERE]}}}, users_file)
    fill(node, user="admin", passcode=PASSCODES["admin"])
    return node


@pytest.fixture(scope="module")
def device_node(module_node_factory: Any, users_file: Path) -> Any:
    """backend file, WORKSTATION -> ws from 127.0.0.1, ae_principals_without_password."""
    node = start(module_node_factory, {"ae_principals_without_password": True,
                                       "ae_principals": {"WORKSTATION": {
                                           "principal": "ws", "addresses": [HERE]}}},
                 users_file)
    fill(node, user="admin", passcode=PASSCODES["admin"])
    return node


# --- AE titles bound to addresses -------------------------------------------------------


def test_a_mapped_title_acts_as_its_principal_from_its_address_only(open_node: Any) -> None:
    status, answers = findscu(open_node)  # DCMTK, from 127.0.0.1
    assert (status, answers) == ("Success", len(STUDIES)), status
    here = session(open_node, find=True, get=True)
    assert here.find == (0x0000, all_uids())
    assert here.got is not None and len(here.got[1]) == len(STUDIES)
    elsewhere = session(open_node, source=ELSEWHERE, echo=True, find=True, get=True)
    assert elsewhere.echo == 0x0000  # Echo is everyone's
    assert elsewhere.find == (0x0124, [])
    assert elsewhere.got == (0x0124, [])
    [line] = [x for x in open_node.log().splitlines() if "WORKSTATION@127.0.0.2" in x
              and "no mapped principal" in x]
    assert "anonymous" in line and "127.0.0.2 is not in 127.0.0.1/32" in line


def test_audit_says_how_each_principal_was_established(open_node: Any) -> None:
    session(open_node, echo=True)
    session(open_node, source=ELSEWHERE, echo=True)
    session(open_node, ae_title="OTHER", user="admin", echo=True)
    mapped = audit_entry(open_node, event="C-ECHO", calling_ae="WORKSTATION", address=HERE)
    assert (mapped["principal"], mapped["established"]) == ("ws", "ae-title")
    assert mapped["basis"] == "AE title WORKSTATION from 127.0.0.1"
    stranger = audit_entry(open_node, event="A-ASSOCIATE", calling_ae="WORKSTATION",
                           address=ELSEWHERE)
    assert (stranger["principal"], stranger["established"]) == ("anonymous", "anonymous")
    assert "bound elsewhere" in stranger["basis"]
    claimed = audit_entry(open_node, event="C-ECHO", calling_ae="OTHER")
    assert (claimed["principal"], claimed["established"]) == ("admin", "claimed-user")
    listed = subprocess.run(
        [sys.executable, "-m", "archive", "audit", "--config",
         str(open_node.config_path), "--limit", "0"], capture_output=True, text=True,
        timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert "established=ae-title" in listed.stdout
    assert "basis='AE title WORKSTATION from 127.0.0.1'" in listed.stdout


# --- password backends ------------------------------------------------------------------


def test_with_passwords_a_mapping_is_off_unless_the_config_says_so(strict_node: Any,
                                                                   device_node: Any) -> None:
    status, answers = findscu(strict_node)  # README's old example: WORKSTATION -> admin
    assert answers == 0 and status != "Success", status
    assert session(strict_node, find=True).find == (0x0124, [])
    assert session(device_node, find=True).find == (0x0000, all_uids())  # key set
    assert session(device_node, source=ELSEWHERE, find=True).find == (0x0124, [])
    # warned at start, and again once the rules were applied (the nodes start with none)
    assert ("auth.ae_principals.WORKSTATION -> admin: inactive, backend file needs a "
            "password") in strict_node.log()
    for node, line in ((strict_node, "WORKSTATION -> admin: broad rights through rule 2"),
                       (device_node, "WORKSTATION -> ws: broad rights through rule 3")):
        wait_for(lambda node=node, line=line: line in node.log(), 15, message=line)
    assert "inactive" not in device_node.log()


def test_a_user_cannot_widen_her_rights_by_dropping_her_identity(strict_node: Any,
                                                                 device_node: Any) -> None:
    alice = {"user": "alice", "passcode": PASSCODES["alice"]}
    own = session(strict_node, **alice, find=True, get=True)
    assert own.find == (0x0000, [f"{UID}.1"])  # Trial A only
    assert own.got is not None and own.got[1] == [f"{UID}.1.1.1"]
    for node in (strict_node, device_node):
        dropped = session(node, find=True, get=True, store=as_sent(make_dataset(
            patient_id="ID-9", StudyDescription="Planted", sop_class=CT_IMAGE)),
            source=ELSEWHERE if node is device_node else HERE)
        assert dropped.find == (0x0124, [])
        assert dropped.got == (0x0124, [])
        assert dropped.stored == 0x0124
        wrong = session(node, user="alice", passcode=WRONG, find=True)
        assert wrong.rejected == PERMANENT and wrong.find is None  # no fallback
        alone = session(node, user="alice", find=True)  # a name without its passcode
        assert alone.rejected == PERMANENT
    # on the device's own address the identity outranks the mapping
    outranked = session(device_node, **alice, find=True)
    assert outranked.find == (0x0000, [f"{UID}.1"])
    entry = audit_entry(device_node, event="C-FIND", principal="alice")
    assert entry["established"] == "verified-user" and "verified by file" in entry["basis"]
    refused = audit_entry(strict_node, event="A-ASSOCIATE-RJ", calling_ae="WORKSTATION")
    assert (refused["principal"], refused["established"]) == ("anonymous", "refused")


def test_mapping_warnings_follow_the_rules(device_node: Any) -> None:
    apply_rules(device_node, RULES.replace("  - {principal: ws, service: Query}\n",
                                           "  - {principal: ws, service: Store}\n"))
    try:
        wait_for(lambda: "auth.ae_principals.WORKSTATION -> ws: broad rights through "
                 "rule 3 (ws Store" in device_node.log(), 15,
                 message="the warning about the new rules")
    finally:
        apply_rules(device_node)


# --- brute force --------------------------------------------------------------------------


@pytest.fixture
def throttled_node(node_factory: Any, users_file: Path) -> Any:
    return start(node_factory, {"throttle": {
        "peer_failures": 5, "user_failures": 3, "backoff_seconds": 60,
        "max_backoff_seconds": 120}}, users_file)


def test_brute_force_is_throttled_without_starving_others(throttled_node: Any,
                                                          users_file: Path) -> None:
    node = throttled_node
    alice_home, attacker, bystander, new_place = "127.0.0.7", "127.0.0.5", "127.0.0.6", \
        "127.0.0.8"
    first = session(node, source=alice_home, user="alice", passcode=PASSCODES["alice"],
                    echo=True)
    assert first.echo == 0x0000
    results: Counter[int | None] = Counter()
    echoes: list[float] = []
    stop = threading.Event()

    lock = threading.Lock()

    def guess(names: list[str]) -> None:
        for name in names:
            outcome = session(node, source=attacker, ae_title="EVIL", user=name,
                              passcode=WRONG)
            assert outcome.echo is None  # never accepted
            with lock:
                results[outcome.rejected] += 1

    def watch() -> None:
        while not stop.wait(0.2):
            done = session(node, source=bystander, ae_title="BYSTANDER", echo=True)
            echoes.append(done.seconds if done.echo == 0x0000 else float("inf"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    # 40 guesses at alice's passcode, 4 at a time, then 10 at other names: 50 in all
    guessers = [threading.Thread(target=guess, args=(["alice"] * 10,)) for _ in range(4)]
    started = time.perf_counter()
    for thread in guessers:
        thread.start()
    for thread in guessers:
        thread.join(120)
    guess([f"user{n}" for n in range(10)])
    attack = time.perf_counter() - started
    # 20 more, all in the address's back-off: what does a refusal cost the node?
    before = cpu_seconds(node.pid)
    late = [session(node, source=attacker, ae_title="EVIL", user="alice", passcode=WRONG)
            for _ in range(20)]
    refusal_cpu = (cpu_seconds(node.pid) - before) / len(late)
    home = session(node, source=alice_home, user="alice", passcode=PASSCODES["alice"],
                   echo=True)
    elsewhere = session(node, source=new_place, user="alice", passcode=PASSCODES["alice"],
                        echo=True)
    stop.set()
    watcher.join(30)

    assert sum(results.values()) == 50
    # alice's name: 3 free failures + the one starting the back-off; then the address
    # (5 free + 1) with the other names: at most 6 checks ran, 44+ refused unchecked
    # (None: pynetdicom's client now and then sees the connection close before the
    # A-ASSOCIATE-RJ it was sent; the node's log counts those refusals)
    assert results[PERMANENT] <= 6 and results[None] <= 2, results
    log = node.log()
    throttled = [x for x in log.splitlines() if "throttled:" in x and "EVIL@" in x]
    checked = [x for x in log.splitlines() if "authentication refused EVIL@" in x
               and "throttled:" not in x]
    # (four guessers from one address also meet its share of association slots:
    # archive.dimse.connections refuses those before any authentication)
    limited = [x for x in log.splitlines() if " refused in phase " in x and attacker in x]
    assert len(checked) <= 6 and len(throttled) + len(limited) >= 64, \
        (len(checked), len(throttled), len(limited))
    assert len(checked) + len(throttled) + len(limited) == 50 + len(late)
    assert any("user 'alice'" in x for x in throttled)
    assert any("address 127.0.0.5" in x for x in throttled)
    # a refusal costs no bcrypt: well under a check at cost 12 (~0.25 s of CPU)
    assert all(x.rejected == TRANSIENT or x.aborted for x in late), late
    hashed = yaml.safe_load(users_file.read_text())["alice"].encode()
    started = time.process_time()
    bcrypt.checkpw(WRONG.encode(), hashed)
    check_cpu = time.process_time() - started
    assert refusal_cpu < check_cpu / 4, (refusal_cpu, check_cpu)
    # the bystander was never held up; the real user got in at once from home, while
    # her name is in back-off for everyone else
    assert echoes and max(echoes) < 1.5 and statistics.median(echoes) < 0.3, echoes
    assert home.echo == 0x0000 and home.seconds < 2.0, home
    assert elsewhere.rejected == TRANSIENT
    assert attack < 30
    for secret in (*PASSCODES.values(), WRONG):
        assert secret not in log


def test_the_throttle_ends_with_its_back_off(node_factory: Any, users_file: Path) -> None:
    node = start(node_factory, {"throttle": {"peer_failures": 1, "user_failures": 10,
                                             "backoff_seconds": 2}}, users_file)
    assert [session(node, user="alice", passcode=WRONG).rejected for _ in range(3)] == \
        [PERMANENT, PERMANENT, TRANSIENT]
    time.sleep(2.2)
    assert session(node, user="alice", passcode=PASSCODES["alice"], echo=True).echo == 0


def test_config_refuses_the_plain_mapping(tmp_path: Path) -> None:
    config = tmp_path / "archive.yaml"
    config.write_text(yaml.safe_dump({"auth": {"ae_principals": {"WORKSTATION": "admin"}},
                                      "database": {"embedded": {"enabled": False}}}))
    done = subprocess.run([sys.executable, "-m", "archive", "serve", "--config",
                           str(config)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "archive: configuration error: auth.ae_principals.WORKSTATION: an AE title alone is "
        "not a credential; bind it to the device: {principal: admin, addresses: "
        "[192.0.2.10]} (see README, Access control)"]

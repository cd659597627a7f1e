"""Who asks, end to end: real node subprocesses, real OpenLDAP, real TLS certificates.

- ``file`` backend (users written by ``python -m archive user add``): the right passcode
  is accepted and C-ECHO works; a wrong passcode, an unknown user and a username alone
  are rejected (A-ASSOCIATE-RJ rejected-permanent, ACSE, no-reason-given); DCMTK's
  storescu gets the positive response it asks for; the node log has one line per
  refusal with its reason and never a passcode.
- ``ldap`` backend against a private slapd (``ldap_server``): right and wrong passcodes,
  a username that must be DN-escaped, and slapd stopped: rejected-transient within the
  timeout, and the node serves the next association once slapd is back.
- TLS (certificates from the ``openssl`` CLI): a pynetdicom SCU with an SSL context
  echoes; with ``tls.ca_certificate`` a client without a certificate is refused; plain
  TCP to a TLS node fails; an AE title mapped with ``certificate_cn`` or
  ``certificate_sha256`` gets its principal only with that certificate.

(Named ``test_auth_e2e`` because ``tests/unit/test_auth.py`` exists: without
``__init__.py`` files pytest refuses two test modules with the same basename.)
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ldap_server
import pytest
import yaml
from helpers import DCMTK_ENV, ROOT, make_dataset, to_part10
from pynetdicom import AE
from pynetdicom.pdu_items import UserIdentitySubItemRQ
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import Verification

pytestmark = pytest.mark.network

PASSCODES = {"alice": "Alice-passcode-4711", "bob": "Bob-passcode-0815"}
LDAP_USERS = {"carol": "Carol-ldap-passcode-31", "a,b": "Comma-user-passcode-62"}
WRONG = "Wrong-passcode-999"
EVERY_PASSCODE = [*PASSCODES.values(), *LDAP_USERS.values(), WRONG]

PERMANENT = (0x01, 0x02, 0x01)  # rejected-permanent, UL service-provider (ACSE), no reason
TRANSIENT = (0x02, 0x02, 0x01)  # rejected-transient, same source and reason


def _encode_without_checks(primitive: UserIdentityNegotiation) -> UserIdentitySubItemRQ:
    """pynetdicom refuses to send an empty passcode; a careless requestor may."""
    item = UserIdentitySubItemRQ()
    item.from_primitive(primitive)
    return item


@dataclass
class Outcome:
    established: bool
    rejected: bool
    rsd: tuple[int, int, int] | None  # A-ASSOCIATE-RJ result, source, reason
    response: bytes | None  # server response of the User Identity AC item, if any
    echo: int | None
    seconds: float


def associate(node: Any, username: str | None = None, passcode: str | None = None, *,
              kind: int | None = None, positive: bool = True,
              tls: ssl.SSLContext | None = None, ae_title: str = "AUTHSCU") -> Outcome:
    """Request an association (with a User Identity item when ``username`` is given),
    echo if accepted, release, and report what happened."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    ae.add_requested_context(Verification)
    ext_neg = []
    if username is not None:
        item = UserIdentityNegotiation()
        item.user_identity_type = kind or (2 if passcode is not None else 1)
        item.primary_field = username.encode()
        if passcode is not None:
            item.secondary_field = passcode.encode()
        if passcode == "":
            item.from_primitive = lambda: _encode_without_checks(item)  # type: ignore
        item.positive_response_requested = positive
        ext_neg.append(item)
    started = time.perf_counter()
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, ext_neg=ext_neg,
                         tls_args=(tls, "localhost") if tls is not None else None)
    try:
        established = assoc.is_established
        rsd = response = echo = None
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            rsd = (rj.result, rj.result_source, rj.diagnostic)
        if assoc.is_established:
            identity = assoc.acceptor.user_identity
            response = identity.server_response if identity is not None else None
            status = assoc.send_c_echo()
            echo = int(status.Status) if "Status" in status else None
            assoc.release()
        return Outcome(established, assoc.is_rejected, rsd,
                       response, echo, time.perf_counter() - started)
    finally:
        ae.shutdown()


def accepted(outcome: Outcome) -> bool:
    return outcome.echo == 0x0000 and not outcome.rejected


def log_lines(node: Any, pattern: str) -> list[str]:
    return [line for line in node.log().splitlines() if re.search(pattern, line)]


def assert_no_passcode_in(text: str) -> None:
    for secret in EVERY_PASSCODE:
        assert secret not in text, f"a passcode reached the log: {secret}"


def start_node(factory: Any, overrides: dict[str, Any]) -> Any:
    """A node with access rules off: these tests are about who asks, not what they may do
    (with rules on and none applied, every request is denied)."""
    return factory.start({"acl": {"enabled": False}, **overrides})


def user_cli(config: Path, *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHIVE_")}
    return subprocess.run([sys.executable, "-m", "archive", "--config", str(config), "user",
                           *argv], input=stdin, capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=60)


# --- file backend -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Users written by the real command line, as an administrator would."""
    folder = tmp_path_factory.mktemp("users")
    path = folder / "users.yaml"
    config = folder / "archive.yaml"
    config.write_text(yaml.safe_dump({"auth": {"backend": "file", "users_file": str(path)},
                                      "database": {"embedded": {"enabled": False}}}))
    for name, passcode in PASSCODES.items():
        done = user_cli(config, "add", name, "--password-stdin", stdin=passcode + "\n")
        assert done.returncode == 0, done.stderr
    assert user_cli(config, "list").stdout.split() == sorted(PASSCODES)
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert_no_passcode_in(path.read_text())
    return path


@pytest.fixture(scope="module")
def file_node(module_node_factory: Any, users_file: Path) -> Any:
    return start_node(module_node_factory, {"auth": {"backend": "file",
                                               "users_file": str(users_file)}})


def test_file_right_passcode_is_accepted_and_echo_works(file_node: Any) -> None:
    outcome = associate(file_node, "alice", PASSCODES["alice"])
    assert accepted(outcome), outcome
    assert outcome.response == b""  # positive response asked for: empty (types 1 and 2)
    quiet = associate(file_node, "bob", PASSCODES["bob"], positive=False)
    assert accepted(quiet) and quiet.response is None


@pytest.mark.parametrize(("username", "passcode", "reason"), [
    ("alice", WRONG, "wrong passcode"),
    ("mallory", WRONG, "unknown user"),
    ("alice", None, "username without passcode"),
])
def test_file_refusals_reject_the_association(file_node: Any, username: str,
                                              passcode: str | None, reason: str) -> None:
    outcome = associate(file_node, username, passcode)
    assert outcome.rejected and not outcome.established, outcome
    assert outcome.rsd == PERMANENT
    [line] = log_lines(file_node, rf"authentication refused .*user='{username}'.*{reason}")
    assert "AUTHSCU@127.0.0.1:" in line and "backend file" in line


def test_file_node_without_identity_still_serves(file_node: Any) -> None:
    assert accepted(associate(file_node))


def test_file_user_added_while_running(file_node: Any, users_file: Path) -> None:
    config = users_file.parent / "archive.yaml"
    assert associate(file_node, "dave", "Dave-passcode-77").rsd == PERMANENT
    assert user_cli(config, "add", "dave", "--password-stdin",
                    stdin="Dave-passcode-77\n").returncode == 0
    assert accepted(associate(file_node, "dave", "Dave-passcode-77"))
    assert user_cli(config, "remove", "dave").returncode == 0
    assert associate(file_node, "dave", "Dave-passcode-77").rsd == PERMANENT


def test_dcmtk_storescu_gets_its_positive_response(file_node: Any, tmp_path: Path) -> None:
    image = tmp_path / "image.dcm"
    image.write_bytes(to_part10(make_dataset(patient_id="AUTH-1")))

    def storescu(*identity: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["storescu", "-v", "-aec", file_node.ae_title, *identity,
                               "127.0.0.1", str(file_node.port), str(image)],
                              capture_output=True, text=True, env=DCMTK_ENV, timeout=60)

    done = storescu("-usr", "alice", "-pwd", PASSCODES["alice"], "-rsp")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Received Store Response (Success)" in done.stdout + done.stderr
    refused = storescu("-usr", "alice", "-pwd", WRONG)
    assert refused.returncode != 0
    output = refused.stdout + refused.stderr
    assert re.search(r"Rejected Permanent, Source: Service Provider \(ACSE Related\)\s+"
                     r".*Reason: No Reason", output, re.S), output


def test_file_log_has_one_line_reasons_and_no_passcode(file_node: Any) -> None:
    log = file_node.log()
    assert_no_passcode_in(log)
    refusals = log_lines(file_node, "authentication refused")
    assert refusals and all(" backend file): " in line for line in refusals)
    assert log_lines(file_node, r"authenticated AUTHSCU@.* user='alice'")


# --- ldap backend -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not ldap_server.available():
        pytest.fail("slapd is not installed: run ./scripts/setup (apt install slapd)")
    with ldap_server.running_slapd(tmp_path_factory.mktemp("slapd"), LDAP_USERS) as server:
        yield server


@pytest.fixture(scope="module")
def ldap_node(module_node_factory: Any, slapd: ldap_server.Slapd) -> Any:
    return start_node(module_node_factory, {"auth": {"backend": "ldap", "ldap": {
        "url": slapd.url, "bind_dn_template": ldap_server.BIND_DN_TEMPLATE,
        "timeout_seconds": 2}}})


def test_ldap_right_and_wrong_passcode(ldap_node: Any) -> None:
    assert accepted(associate(ldap_node, "carol", LDAP_USERS["carol"]))
    wrong = associate(ldap_node, "carol", WRONG)
    assert wrong.rsd == PERMANENT, wrong
    assert log_lines(ldap_node, r"refused .*user='carol'.*backend ldap\): wrong passcode")
    assert associate(ldap_node, "carol", None).rsd == PERMANENT  # username alone
    empty = associate(ldap_node, "carol", "")  # never an unauthenticated bind
    assert empty.rsd == PERMANENT, empty
    assert log_lines(ldap_node, r"refused .*user='carol'.*backend ldap\): empty passcode")


def test_ldap_usernames_are_dn_escaped(ldap_node: Any) -> None:
    # "a,b" exists (uid=a\,b): found only if the comma is escaped, not read as an RDN
    assert accepted(associate(ldap_node, "a,b", LDAP_USERS["a,b"]))
    for sneaky in ("*)(uid=*", "carol,ou=people", "*"):
        assert associate(ldap_node, sneaky, LDAP_USERS["carol"]).rsd == PERMANENT, sneaky


def test_ldap_down_rejects_quickly_and_node_recovers(ldap_node: Any,
                                                     slapd: ldap_server.Slapd) -> None:
    slapd.stop()
    try:
        down = associate(ldap_node, "carol", LDAP_USERS["carol"])
        assert down.rsd == TRANSIENT, down
        assert down.seconds < 3  # refused connection: no waiting for the timeout
        [line] = log_lines(ldap_node, r"user='carol'.*LDAP unreachable")
        assert "[transient]" in line
        assert accepted(associate(ldap_node))  # still serving, without identity
    finally:
        slapd.start()
    assert accepted(associate(ldap_node, "carol", LDAP_USERS["carol"]))


def test_ldap_hung_rejects_after_the_timeout_and_others_are_served(
        ldap_node: Any, slapd: ldap_server.Slapd) -> None:
    results: list[Outcome] = []
    slapd.pause()  # accepts the connection, never answers the bind
    try:
        waiting = threading.Thread(target=lambda: results.append(
            associate(ldap_node, "carol", LDAP_USERS["carol"])))
        waiting.start()
        time.sleep(0.3)
        other = associate(ldap_node)  # no identity: not held up by the directory
        assert accepted(other) and other.seconds < 1.5, other
        waiting.join(15)
    finally:
        slapd.resume()
    [hung] = results
    assert hung.rsd == TRANSIENT, hung
    assert 1.5 < hung.seconds < 5, hung  # auth.ldap.timeout_seconds: 2
    assert log_lines(ldap_node, r"user='carol'.*LDAP unreachable .*LDAPSocketReceiveError")
    assert accepted(associate(ldap_node, "carol", LDAP_USERS["carol"]))


def test_ldap_log_has_no_passcode(ldap_node: Any) -> None:
    assert_no_passcode_in(ldap_node.log())


# --- TLS ---------------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate (localhost, 127.0.0.1) and a client certificate."""
    d = tmp_path_factory.mktemp("certs")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=Archive Test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for name, usage, san in (("server", "serverAuth", "DNS:localhost,IP:127.0.0.1"),
                             ("client", "clientAuth", "DNS:modality.example")):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(
            f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            f"extendedKeyUsage={usage}\nsubjectAltName={san}\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                "-extfile", f"{name}.ext", cwd=d)
    return {p.stem if p.suffix == ".pem" else p.stem + "_key": p
            for p in d.iterdir() if p.suffix in (".pem", ".key")}


def client_context(certs: dict[str, Path], with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    if with_certificate:
        context.load_cert_chain(str(certs["client"]), str(certs["client_key"]))
    return context


@pytest.fixture(scope="module")
def tls_node(module_node_factory: Any, certs: dict[str, Path]) -> Any:
    return start_node(module_node_factory, {"tls": {"certificate": str(certs["server"]),
                                              "private_key": str(certs["server_key"])}})


@pytest.fixture(scope="module")
def mutual_tls_node(module_node_factory: Any, certs: dict[str, Path],
                    users_file: Path) -> Any:
    return start_node(module_node_factory, {
        "tls": {"certificate": str(certs["server"]), "private_key": str(certs["server_key"]),
                "ca_certificate": str(certs["ca"])},
        "auth": {"backend": "file", "users_file": str(users_file)}})


def test_tls_client_echoes(tls_node: Any, certs: dict[str, Path]) -> None:
    assert accepted(associate(tls_node, tls=client_context(certs, with_certificate=False)))


def test_plain_tcp_to_a_tls_node_fails(tls_node: Any) -> None:
    outcome = associate(tls_node)
    assert not outcome.established and outcome.echo is None, outcome
    assert outcome.seconds < 10


def test_mutual_tls_with_client_certificate_and_passcode(mutual_tls_node: Any,
                                                         certs: dict[str, Path]) -> None:
    context = client_context(certs, with_certificate=True)
    assert accepted(associate(mutual_tls_node, "alice", PASSCODES["alice"], tls=context))
    assert associate(mutual_tls_node, "alice", WRONG, tls=context).rsd == PERMANENT
    assert_no_passcode_in(mutual_tls_node.log())


def test_mutual_tls_refuses_a_client_without_certificate(mutual_tls_node: Any,
                                                         certs: dict[str, Path]) -> None:
    outcome = associate(mutual_tls_node, "alice", PASSCODES["alice"],
                        tls=client_context(certs, with_certificate=False))
    assert not outcome.established and outcome.echo is None, outcome
    assert outcome.seconds < 10
    # and the node is still there for a client that has one
    assert accepted(associate(mutual_tls_node, "alice", PASSCODES["alice"],
                              tls=client_context(certs, with_certificate=True)))


def test_an_idle_connection_does_not_stall_tls_clients(tls_node: Any,
                                                        certs: dict[str, Path]) -> None:
    idle = socket.create_connection(("127.0.0.1", tls_node.port))
    try:
        time.sleep(0.2)  # the server has accepted it and waits for its ClientHello
        with socket.create_connection(("127.0.0.1", tls_node.port), timeout=3) as raw, \
                client_context(certs, False).wrap_socket(raw, server_hostname="localhost"):
            pass
    finally:
        idle.close()


# --- AE titles bound to client certificates ------------------------------------------------


@pytest.fixture(scope="module")
def certificate_bound_node(module_node_factory: Any, certs: dict[str, Path]) -> Any:
    """Mutual TLS; four AE titles mapped to ``viewer`` from 127.0.0.1, each bound to a
    certificate: the client's CN, the client's SHA-256, another key, another CN."""
    from acl.rules import RuleStore
    from acl.yamlrules import parse

    der = ssl.PEM_cert_to_DER_cert(certs["client"].read_text())
    client_sha = hashlib.sha256(der).hexdigest()
    viewer = {"principal": "viewer", "addresses": ["127.0.0.1"]}
    node = module_node_factory.start({
        "tls": {"certificate": str(certs["server"]), "private_key": str(certs["server_key"]),
                "ca_certificate": str(certs["ca"])},
        "acl": {"enabled": True, "refresh_seconds": 0.2},
        "auth": {"backend": "none", "ae_principals": {
            "BYCN": {**viewer, "certificate_cn": "client"},
            "BYSHA": {**viewer, "certificate_sha256": ":".join(
                client_sha[i:i + 2] for i in range(0, 64, 2)).upper()},
            "OTHERKEY": {**viewer, "certificate_sha256": "00" * 32},
            "OTHERCN": {**viewer, "certificate_cn": "server"}}}})
    RuleStore(node.db).apply(parse("rules:\n  - {principal: viewer, service: Echo}\n", "t"))
    time.sleep(0.6)
    return node


@pytest.mark.parametrize(("ae_title", "echo"), [
    ("BYCN", 0x0000), ("BYSHA", 0x0000), ("OTHERKEY", 0x0124), ("OTHERCN", 0x0124)])
def test_ae_title_bound_to_a_client_certificate(certificate_bound_node: Any,
                                                certs: dict[str, Path], ae_title: str,
                                                echo: int) -> None:
    outcome = associate(certificate_bound_node, tls=client_context(certs, True),
                        ae_title=ae_title)
    assert outcome.echo == echo, outcome  # only viewer may echo: anonymous is refused
    [line] = log_lines(certificate_bound_node, rf"{ae_title}@127\.0\.0\.1:\d+:? (acts as|no)")
    if echo == 0x0000:
        assert "acts as viewer (AE title" in line and "certificate CN 'client'" in line
    else:
        assert "no mapped principal, anonymous" in line and "certificate" in line

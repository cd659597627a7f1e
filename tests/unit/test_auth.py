"""Authentication without a network: the users file, the backends, DN escaping, the
EVT_USER_ID handler and the ``archive user`` command (through ``archive.cli.main``)."""

from __future__ import annotations

import io
import logging
import os
import stat
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bcrypt
import pytest
import yaml
from ldap3.utils.dn import parse_dn

from acl import auth, users
from acl.auth import (
    FileAuthenticator,
    LdapAuthenticator,
    NoneAuthenticator,
    Refused,
    escape_dn_value,
)
from archive import cli
from archive.config import Auth, ConfigError
from archive.dimse import user_identity

FAST = 4  # bcrypt cost for the tests (the hash embeds it; checks are as fast)
SECRET = "s3cret-Passcode-äö"


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "conf" / "users.yaml"
    users.set_password(path, "alice", SECRET.encode(), rounds=FAST)
    users.set_password(path, "bob", b"bob-passcode", rounds=FAST)
    return path


# --- the users file -------------------------------------------------------------------


def test_file_holds_bcrypt_hashes_never_the_password(users_file: Path) -> None:
    text = users_file.read_text(encoding="utf-8")
    assert SECRET not in text and "bob-passcode" not in text
    data = yaml.safe_load(text)
    assert set(data) == {"alice", "bob"}
    for name, hashed in data.items():
        assert users.is_bcrypt_hash(hashed), name
    assert bcrypt.checkpw(SECRET.encode(), data["alice"].encode())
    # a random salt per hash: the same password twice gives two different hashes
    users.set_password(users_file, "carol", SECRET.encode(), rounds=FAST)
    again = yaml.safe_load(users_file.read_text(encoding="utf-8"))
    assert again["carol"] != again["alice"]


def test_file_is_written_atomically_with_mode_0600(users_file: Path) -> None:
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    os.chmod(users_file, 0o644)
    inode = users_file.stat().st_ino
    assert users.set_password(users_file, "alice", b"new-one", rounds=FAST) is False
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    assert users_file.stat().st_ino != inode  # replaced by rename, not rewritten in place
    leftovers = [p.name for p in users_file.parent.iterdir()
                 if p.name not in ("users.yaml", "users.yaml.lock")]
    assert leftovers == []
    assert users.remove_user(users_file, "bob") is True
    assert users.remove_user(users_file, "bob") is False
    assert set(users.read_users(users_file)) == {"alice"}


def test_refuses_names_and_passwords_it_cannot_store_faithfully(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    for name in ("", " alice", "al\nice", "x" * 200):
        with pytest.raises(ValueError):
            users.set_password(path, name, b"pw", rounds=FAST)
    with pytest.raises(ValueError, match="72 bytes"):
        users.set_password(path, "alice", b"x" * 73, rounds=FAST)
    with pytest.raises(ValueError):
        users.set_password(path, "alice", b"", rounds=FAST)
    assert not path.exists()


def test_example_users_file_is_empty() -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "users.yaml"
    assert users.read_users(example) == {}


# --- the backends ---------------------------------------------------------------------


def test_file_backend_accepts_the_right_passcode(users_file: Path) -> None:
    backend = FileAuthenticator(users_file)
    assert backend.authenticate("alice", SECRET.encode()) == "alice"
    assert backend.authenticate("bob", b"bob-passcode") == "bob"


@pytest.mark.parametrize(("username", "passcode", "reason"), [
    ("alice", b"wrong", "wrong passcode"),
    ("alice", SECRET.upper().encode(), "wrong passcode"),
    ("Alice", SECRET.encode(), "unknown user"),
    ("mallory", SECRET.encode(), "unknown user"),
    ("alice", None, "username without passcode"),
    ("alice", b"", "empty passcode"),
    ("alice", SECRET.encode() + b"x" * 80, "wrong passcode"),  # > 72 bytes: no crash
])
def test_file_backend_refuses(users_file: Path, username: str, passcode: bytes | None,
                              reason: str) -> None:
    with pytest.raises(Refused, match=reason) as caught:
        FileAuthenticator(users_file).authenticate(username, passcode)
    assert caught.value.transient is False


def test_file_backend_never_compares_plain_text(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    path.write_text("eve: plain-password\n", encoding="utf-8")
    with pytest.raises(Refused, match="no bcrypt hash"):
        FileAuthenticator(path).authenticate("eve", b"plain-password")


def test_file_backend_sees_changes_without_restart(users_file: Path) -> None:
    backend = FileAuthenticator(users_file)
    with pytest.raises(Refused, match="unknown user"):
        backend.authenticate("dave", b"dave-pw")
    users.set_password(users_file, "dave", b"dave-pw", rounds=FAST)
    assert backend.authenticate("dave", b"dave-pw") == "dave"
    users.remove_user(users_file, "dave")
    with pytest.raises(Refused, match="unknown user"):
        backend.authenticate("dave", b"dave-pw")


def test_file_backend_problems_are_transient(tmp_path: Path) -> None:
    missing = FileAuthenticator(tmp_path / "absent.yaml")
    with pytest.raises(Refused, match="not found") as caught:
        missing.authenticate("alice", b"pw")
    assert caught.value.transient
    assert "WARNING" in missing.describe()
    broken = tmp_path / "broken.yaml"
    broken.write_text("alice: [unclosed\n", encoding="utf-8")
    with pytest.raises(Refused, match="not valid YAML") as caught:
        FileAuthenticator(broken).authenticate("alice", b"pw")
    assert caught.value.transient


def test_unknown_user_costs_as_much_as_a_wrong_passcode(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    users.set_password(path, "alice", b"pw", rounds=8)
    backend = FileAuthenticator(path)

    def seconds(name: str) -> float:
        started = time.perf_counter()
        with pytest.raises(Refused):
            backend.authenticate(name, b"nope")
        return time.perf_counter() - started

    seconds("nobody")  # creates the dummy hash of cost 8 once
    wrong, unknown = min(seconds("alice") for _ in range(3)), min(
        seconds("nobody") for _ in range(3))
    assert 0.5 < unknown / wrong < 2, (wrong, unknown)


def test_none_backend_takes_the_username_as_given() -> None:
    backend = NoneAuthenticator()
    assert backend.authenticate("anyone", None) == "anyone"
    assert backend.authenticate("anyone", b"whatever") == "anyone"
    assert "trusted" in backend.describe()


def test_from_config() -> None:
    assert isinstance(auth.from_config(Auth()), NoneAuthenticator)
    assert isinstance(auth.from_config(Auth(backend="file")), FileAuthenticator)
    cfg = Auth(backend="ldap")
    assert isinstance(auth.from_config(cfg), LdapAuthenticator)
    cfg.ldap.bind_dn_template = "uid=fixed,dc=example,dc=org"
    with pytest.raises(ConfigError, match="bind_dn_template"):
        auth.from_config(cfg)


# --- LDAP: DN escaping, refusals before any network -------------------------------------

TEMPLATE = "uid={username},ou=people,dc=example,dc=org"


@pytest.mark.parametrize(("username", "escaped"), [
    ("alice", "alice"),
    ("*)(uid=*", r"\2a\29\28uid\=\2a"),
    ("a,dc=x", r"a\,dc\=x"),
    ("admin,ou=people,dc=example,dc=org", r"admin\,ou\=people\,dc\=example\,dc\=org"),
    ('x+cn=y;"<>', r'x\+cn\=y\;\"\<\>'),
    ("back\\slash", r"back\\slash"),
    ("#hash", r"\#hash"),
    (" lead", r"\ lead"),
    ("trail ", r"trail\ "),
    ("nul\x00byte", r"nul\00byte"),
    ("Jürgen", "Jürgen"),
])
def test_dn_escaping(username: str, escaped: str) -> None:
    assert escape_dn_value(username) == escaped
    dn = LdapAuthenticator("ldap://127.0.0.1:9", TEMPLATE, 1).dn(username)
    assert dn == f"uid={escaped},ou=people,dc=example,dc=org"
    rdns = parse_dn(dn, escape=False)
    assert [attr for attr, _, _ in rdns] == ["uid", "ou", "dc", "dc"]
    assert rdns[0][1] == escaped


def test_ldap_refuses_without_a_passcode_before_binding() -> None:
    backend = LdapAuthenticator("ldap://192.0.2.1:389", TEMPLATE, 30)  # never contacted
    started = time.monotonic()
    with pytest.raises(Refused, match="without passcode"):
        backend.authenticate("alice", None)
    with pytest.raises(Refused, match="empty passcode"):  # an unauthenticated bind
        backend.authenticate("alice", b"")
    with pytest.raises(Refused, match="UTF-8"):
        backend.authenticate("alice", b"\xff\xfe")
    assert time.monotonic() - started < 1


def test_ldap_unreachable_is_a_quick_transient_refusal() -> None:
    with __import__("socket").socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = LdapAuthenticator(f"ldap://127.0.0.1:{port}", TEMPLATE, 1.5)
    assert backend.receive_timeout == 2  # ldap3 needs whole seconds there
    started = time.monotonic()
    with pytest.raises(Refused, match="LDAP unreachable") as caught:
        backend.authenticate("alice", b"the-passcode")
    assert time.monotonic() - started < 2
    assert caught.value.transient
    assert "the-passcode" not in caught.value.reason


# --- the EVT_USER_ID handler ------------------------------------------------------------


class FakeAssoc:
    def __init__(self, positive: bool = False) -> None:
        self.requestor = SimpleNamespace(
            ae_title="MODALITY", address="127.0.0.1", port=40000,
            user_identity=SimpleNamespace(positive_response_requested=positive))


def fake_event(kind: int, primary: bytes, secondary: bytes | None = None,
               positive: bool = False) -> Any:
    return SimpleNamespace(assoc=FakeAssoc(positive), user_id_type=kind,
                           primary_field=primary, secondary_field=secondary)


@pytest.fixture
def file_node(users_file: Path) -> Any:
    return fake_node(FileAuthenticator(users_file))


def fake_node(authenticator: Any, guard: Any = None, **context: Any) -> Any:
    """The node as the handlers see it: its identities, and the core context."""
    return SimpleNamespace(identities={}, context=SimpleNamespace(
        authenticator=authenticator, guard=guard, **context))


def test_handler_accepts_and_remembers_the_principal(file_node: Any) -> None:
    event = fake_event(2, b"alice", SECRET.encode(), positive=True)
    assert user_identity.handle_user_id(event, file_node) == (True, b"")  # positive response
    assert file_node.identities == {id(event.assoc): "alice"}
    quiet = fake_event(2, b"bob", b"bob-passcode")
    assert user_identity.handle_user_id(quiet, file_node) == (True, None)
    user_identity.forget_identity(SimpleNamespace(assoc=event.assoc), file_node)
    user_identity.forget_identity(SimpleNamespace(assoc=event.assoc), file_node)  # idempotent
    assert file_node.identities == {id(quiet.assoc): "bob"}


@pytest.mark.parametrize(("event", "reason"), [
    (fake_event(2, b"alice", b"wrong-passcode-123"), "wrong passcode"),
    (fake_event(2, b"mallory", b"wrong-passcode-123"), "unknown user"),
    (fake_event(1, b"alice"), "username without passcode"),
    (fake_event(2, b"", b"wrong-passcode-123"), "empty username"),
    (fake_event(2, b"\xffalice", b"wrong-passcode-123"), "not valid UTF-8"),
    (fake_event(2, b"al\nice", b"wrong-passcode-123"), "control characters"),
    (fake_event(5, b"eyJhbGciOi.jwt", None), "JWT identities are not supported"),
])
def test_handler_refuses_on_one_line_without_the_passcode(
        file_node: Any, event: Any, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="acl.auth"):
        assert user_identity.handle_user_id(event, file_node) == (False, None)
    assert file_node.identities == {}
    assert getattr(event.assoc, user_identity.REFUSAL_ATTRIBUTE) is False  # rejected-permanent
    [record] = caplog.records
    line = record.getMessage()
    assert "\n" not in line
    assert "MODALITY@127.0.0.1:40000" in line and reason in line and "backend file" in line
    assert "wrong-passcode-123" not in line


def test_handler_marks_backend_trouble_transient(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    node = fake_node(FileAuthenticator(tmp_path / "absent.yaml"))
    event = fake_event(2, b"alice", b"pw")
    with caplog.at_level(logging.INFO, logger="acl.auth"):
        assert user_identity.handle_user_id(event, node) == (False, None)
    assert getattr(event.assoc, user_identity.REFUSAL_ATTRIBUTE) is True
    assert "[transient]" in caplog.text


def test_handler_survives_a_backend_bug(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(NoneAuthenticator):
        def authenticate(self, username: str, passcode: bytes | None) -> str:
            raise RuntimeError(f"boom {passcode!r}")

    node = fake_node(Broken())
    with caplog.at_level(logging.INFO, logger="acl.auth"):
        assert user_identity.handle_user_id(fake_event(2, b"alice", b"hidden-pw"), node) == (False,
                                                                                     None)
    assert "internal error builtins.RuntimeError" in caplog.text and "hidden-pw" not in caplog.text


# --- the pynetdicom patches -------------------------------------------------------------


def test_install_is_idempotent_and_patches_both_methods() -> None:
    from pynetdicom.acse import ACSE

    user_identity.install()
    first = (ACSE._check_user_identity, ACSE.send_reject)
    user_identity.install()
    assert (ACSE._check_user_identity, ACSE.send_reject) == first
    assert hasattr(first[0], "__wrapped__") and hasattr(first[1], "__wrapped__")


@pytest.mark.parametrize(("kind", "positive", "expected"), [
    (2, True, b""), (1, True, b""), (2, False, None), (5, True, None)])
def test_positive_response_for_username_identities(kind: int, positive: bool,
                                                   expected: bytes | None) -> None:
    acse_like = SimpleNamespace(requestor=SimpleNamespace(user_identity=SimpleNamespace(
        positive_response_requested=positive, user_identity_type=kind)))
    check = user_identity._positive_response(lambda self: (True, None))
    verified, response = check(acse_like)
    assert verified
    assert (None if response is None else response.server_response) == expected
    assert user_identity._positive_response(lambda self: (False, None))(acse_like) == (False, None)


def test_rejection_result_follows_the_refusal() -> None:
    sent: list[tuple[int, int, int]] = []
    send = user_identity._refusal_result(lambda self, *rsd: sent.append(rsd))
    plain = SimpleNamespace(assoc=SimpleNamespace())
    permanent = SimpleNamespace(assoc=SimpleNamespace(**{user_identity.REFUSAL_ATTRIBUTE: False}))
    transient = SimpleNamespace(assoc=SimpleNamespace(**{user_identity.REFUSAL_ATTRIBUTE: True}))
    send(plain, 2, 2, 1)
    send(permanent, 2, 2, 1)
    send(transient, 2, 2, 1)
    send(permanent, 2, 3, 2)  # local limit exceeded stays what it is
    assert sent == [(2, 2, 1), (1, 2, 1), (2, 2, 1), (2, 3, 2)]


# --- archive user add | remove | list ---------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "archive.yaml"
    path.write_text(yaml.safe_dump({
        "auth": {"backend": "file", "users_file": str(tmp_path / "users.yaml")},
        "database": {"embedded": {"enabled": False}},
    }), encoding="utf-8")
    return path


def run(config: Path, *argv: str, stdin: str = "",
        monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return cli.main(["--config", str(config), "user", *argv])


def test_user_cli_add_list_remove(config: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = config.parent / "users.yaml"
    monkeypatch.setattr(users, "ROUNDS", FAST)
    assert run(config, "add", "alice", "--password-stdin", stdin="cli-secret-1\n",
               monkeypatch=monkeypatch) == 0
    assert run(config, "add", "bob", "--password-stdin", stdin="cli-secret-2\r\n",
               monkeypatch=monkeypatch) == 0
    out = capsys.readouterr().out
    assert "added user alice" in out and "cli-secret" not in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "cli-secret" not in path.read_text(encoding="utf-8")
    backend = FileAuthenticator(path)
    assert backend.authenticate("alice", b"cli-secret-1") == "alice"
    assert backend.authenticate("bob", b"cli-secret-2") == "bob"  # no stray \r

    assert run(config, "list", monkeypatch=monkeypatch) == 0
    assert capsys.readouterr().out.split() == ["alice", "bob"]

    assert run(config, "add", "alice", "--password-stdin", stdin="changed-3\n",
               monkeypatch=monkeypatch) == 0
    assert "changed the password of alice" in capsys.readouterr().out
    assert backend.authenticate("alice", b"changed-3") == "alice"

    assert run(config, "remove", "bob", monkeypatch=monkeypatch) == 0
    assert run(config, "remove", "bob", monkeypatch=monkeypatch) == 1
    assert "no user 'bob'" in capsys.readouterr().err
    assert run(config, "list", monkeypatch=monkeypatch) == 0
    assert capsys.readouterr().out.split() == ["alice"]


def test_user_cli_refusals(config: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    path = config.parent / "users.yaml"
    assert run(config, "add", "alice", "--password-stdin", stdin="",
               monkeypatch=monkeypatch) == 2
    assert run(config, "add", "alice", "--password-stdin", stdin="x" * 73 + "\n",
               monkeypatch=monkeypatch) == 2
    assert run(config, "add", "alice", monkeypatch=monkeypatch) == 2  # not a terminal
    assert "use --password-stdin" in capsys.readouterr().err
    assert run(config, "add", " alice", "--password-stdin", stdin="pw\n",
               monkeypatch=monkeypatch) == 2
    assert not path.exists()
    assert run(config, "list", monkeypatch=monkeypatch) == 0  # no file: no users
    assert capsys.readouterr().out == ""


def test_user_cli_prompts_twice_on_a_terminal(config: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = config.parent / "users.yaml"
    monkeypatch.setattr(users, "ROUNDS", FAST)
    answers: list[str] = []
    prompts: list[str] = []

    def getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return answers.pop(0)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(users.getpass, "getpass", getpass)
    answers[:] = ["typed-1", "typed-2"]
    monkeypatch.setattr(sys, "stdin", Tty())
    assert cli.main(["--config", str(config), "user", "add", "carol"]) == 2
    assert "differ" in capsys.readouterr().err and not path.exists()
    answers[:] = ["typed-1", "typed-1"]
    assert cli.main(["--config", str(config), "user", "add", "carol"]) == 0
    assert len(prompts) == 4 and "carol" in prompts[0]
    assert FileAuthenticator(path).authenticate("carol", b"typed-1") == "carol"


# --- in process, over loopback: the bindings and patches with a real pynetdicom ----------


def test_identity_lives_exactly_as_long_as_its_association(users_file: Path) -> None:
    from pynetdicom import AE, evt
    from pynetdicom.pdu_primitives import UserIdentityNegotiation
    from pynetdicom.sop_class import Verification

    user_identity.install()
    node = fake_node(FileAuthenticator(users_file))
    seen: list[str | None] = []

    def on_echo(event: Any) -> int:
        seen.append(node.identities.get(id(event.assoc)))
        return 0x0000

    server_ae = AE("SERVER")
    server_ae.add_supported_context(Verification)
    server = server_ae.start_server(("127.0.0.1", 0), block=False,
                                    evt_handlers=[(evt.EVT_C_ECHO, on_echo),
                                                  *user_identity.handlers(node)])
    try:
        def connect(passcode: str) -> Any:
            ae = AE("CLIENT")
            ae.add_requested_context(Verification)
            item = UserIdentityNegotiation()
            item.user_identity_type = 2
            item.primary_field = b"alice"
            item.secondary_field = passcode.encode()
            item.positive_response_requested = True
            return ae.associate("127.0.0.1", server.server_address[1], ext_neg=[item])

        released = connect(SECRET)
        assert released.is_established
        assert released.acceptor.user_identity.server_response == b""
        assert released.send_c_echo().Status == 0
        released.release()
        aborted = connect(SECRET)
        assert aborted.send_c_echo().Status == 0
        aborted.abort()
        refused = connect("wrong")
        assert refused.is_rejected
        rj = refused.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x02, 0x01)
        deadline = time.monotonic() + 5
        while node.identities and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        server_ae.shutdown()
    assert seen == ["alice", "alice"]
    assert node.identities == {}


# --- throttling and the principal, through the handler ----------------------------------


def test_handler_refuses_throttled_attempts_transient_without_checking(
        users_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    from acl.auth import Guard
    from archive.config import Throttle

    checks: list[str] = []

    class Counting(FileAuthenticator):
        def authenticate(self, username: str, passcode: bytes | None) -> str:
            checks.append(username)
            return super().authenticate(username, passcode)

    node = fake_node(Counting(users_file), Guard(Throttle(peer_failures=1, user_failures=10)))
    events = [fake_event(2, b"alice", b"wrong-passcode-123") for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="acl.auth"):
        assert [user_identity.handle_user_id(e, node) for e in events] == [(False, None)] * 3
    assert checks == ["alice", "alice"]  # the third was never checked
    refused = user_identity.REFUSAL_ATTRIBUTE
    assert [getattr(e.assoc, refused) for e in events] == [False, False, True]
    last = caplog.records[-1].getMessage()
    assert "throttled: address 127.0.0.1 has 2 recent failures" in last
    assert last.endswith("[transient]") and "wrong-passcode-123" not in caplog.text


def test_principal_is_decided_once_per_association_and_says_how(
        caplog: pytest.LogCaptureFixture) -> None:
    from acl import identity
    from archive.config import AePrincipal

    cfg = Auth(backend="file", ae_principals_without_password=True,
               ae_principals={"MODALITY": AePrincipal("ct", ["127.0.0.1"])})
    node = fake_node(SimpleNamespace(name="file"), ae_bindings=identity.bindings(cfg),
                     cfg=SimpleNamespace(auth=cfg))
    here, there, refused, verified = FakeAssoc(), FakeAssoc(), FakeAssoc(), FakeAssoc()
    there.requestor.address = "127.0.0.9"
    setattr(refused, user_identity.REFUSAL_ATTRIBUTE, False)
    node.identities[id(verified)] = "alice"
    with caplog.at_level(logging.INFO, logger="acl.auth"):
        for assoc in (here, here, there, there, refused, verified):
            user_identity.principal_of(assoc, node)
    principal_of = user_identity.principal_of
    assert [principal_of(a, node).name for a in (here, there, refused, verified)] == \
        ["ct", "anonymous", "anonymous", "alice"]
    assert [principal_of(a, node).established for a in (here, there, refused, verified)
            ] == [identity.AE_TITLE, identity.NONE, identity.REFUSED, identity.VERIFIED]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4  # one per association
    assert lines[0].endswith("acts as ct (AE title MODALITY from 127.0.0.1)")
    assert caplog.records[1].levelname == "WARNING"
    assert "MODALITY@127.0.0.9:40000: no mapped principal, anonymous" in lines[1]

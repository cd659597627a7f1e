"""Bearer tokens (acl.tokens): their shape, hash and judgement, the store on mongomock,
and the DICOMweb side of them (archive.web.auth) without a network."""

from __future__ import annotations

import datetime
from pathlib import Path

import bcrypt
import mongomock
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymongo.errors import ServerSelectionTimeoutError

from acl import identity, tokens
from acl.auth import FileAuthenticator, Guard, NoneAuthenticator
from acl.users import write_users
from archive.config import Throttle
from archive.web.auth import INVALID_TOKEN, HttpAuthenticator, Unauthenticated, claimed

T0 = datetime.datetime(2026, 12, 2, 8, 0, tzinfo=datetime.timezone.utc)


def test_issued_tokens_parse_back_and_differ() -> None:
    issued = [tokens.new_token() for _ in range(200)]
    assert len({i.id for i in issued}) == len({i.secret for i in issued}) == 200
    for one in issued:
        assert tokens.parse(one.token) == one
        assert one.token.startswith("dat_") and len(one.secret) == 43  # 256 bits


@given(st.text(max_size=80))
def test_anything_else_is_no_token(text: str) -> None:
    parsed = tokens.parse(text)
    assert parsed is None or parsed.token == text


@pytest.mark.parametrize("text", [
    "dat_0123456789abcdef_" + "A" * 42, "dat_0123456789ABCDEF_" + "A" * 43,
    "dat_0123456789abcdef_" + "A" * 43 + "\n", "xat_0123456789abcdef_" + "A" * 43,
    "dat_0123456789abcdef_" + "A" * 42 + "=", "Bearer dat_0123456789abcdef_" + "A" * 43])
def test_near_misses_are_no_token(text: str) -> None:
    assert tokens.parse(text) is None


@given(st.lists(st.tuples(st.integers(1, 999), st.sampled_from("smhdw")), min_size=1,
                max_size=3))
def test_durations(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{u}" for n, u in parts)
    seconds = sum(n * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[u]
                  for n, u in parts)
    if seconds > 3653 * 86400:  # ten years at most
        with pytest.raises(ValueError, match="at most 3653 days"):
            tokens.parse_duration(text)
    else:
        assert tokens.parse_duration(text) == datetime.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "90", "d", "1.5d", "-1d", "0s", "1y", "4000d", "1d "
                                  "1h", "12 h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        tokens.parse_duration(text)


def test_never_expires() -> None:
    assert tokens.parse_duration("never") is None


def test_the_record_keeps_a_salted_hash_never_the_secret() -> None:
    issued = tokens.new_token()
    one = tokens.make_record(issued, "alice", "", T0, None)
    two = tokens.make_record(issued, "alice", "", T0, None)
    assert issued.secret.encode() not in repr(one.document()).encode()
    assert one.salt != two.salt and one.hash != two.hash  # salted
    assert tokens.judge(one, issued.secret, T0) is one


@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
               min_size=43, max_size=43))
def test_another_secret_opens_nothing(secret: str) -> None:
    issued = tokens.new_token()
    record = tokens.make_record(issued, "alice", "", T0, None)
    if secret != issued.secret:
        with pytest.raises(tokens.Invalid, match="wrong secret"):
            tokens.judge(record, secret, T0)


def test_expired_and_revoked_tokens_open_nothing() -> None:
    issued = tokens.new_token()
    record = tokens.make_record(issued, "alice", "", T0, datetime.timedelta(hours=1))
    assert tokens.judge(record, issued.secret, T0 + datetime.timedelta(minutes=59))
    with pytest.raises(tokens.Invalid, match="expired"):
        tokens.judge(record, issued.secret, T0 + datetime.timedelta(hours=1))
    revoked = tokens.Record(**{**record.__dict__, "revoked": T0})
    with pytest.raises(tokens.Invalid, match="revoked"):
        tokens.judge(revoked, issued.secret, T0)
    with pytest.raises(tokens.Invalid, match="unknown token id"):
        tokens.judge(None, issued.secret, T0)


# --- the store ---------------------------------------------------------------------------


@pytest.fixture
def store() -> tokens.TokenStore:
    return tokens.TokenStore(mongomock.MongoClient(tz_aware=True)["t"])


def test_issue_verify_revoke(store: tokens.TokenStore) -> None:
    issued, record = store.issue("alice", datetime.timedelta(days=1), "viewer")
    assert store.verify(issued.token).user == "alice"
    [listed] = store.records()
    assert (listed.id, listed.user, listed.label, listed.revoked) == (
        issued.id, "alice", "viewer", None)
    assert store.revoke(issued.id).revoked is None  # as it was before
    with pytest.raises(tokens.Invalid, match="revoked"):
        store.verify(issued.token)
    assert store.revoke(issued.id).revoked is not None  # already revoked: said so
    assert store.revoke("0123456789abcdef") is None
    with pytest.raises(tokens.Invalid, match="malformed"):
        store.verify("not-a-token")


def test_last_use_is_written_once_a_minute(store: tokens.TokenStore) -> None:
    _, record = store.issue("alice", None)
    writes = []
    update = store.collection.update_one
    store.collection.update_one = lambda *a, **k: writes.append(a) or update(*a, **k)
    for clock in (100.0, 110.0, 159.0, 161.0):
        store.touch(record, clock, T0)
    assert len(writes) == 2
    assert store.get(record.id).last_used == T0


# --- DICOMweb: the bearer scheme ---------------------------------------------------------


def _throttle(**limits: object) -> Throttle:
    return Throttle(**{"user_failures": 3, "peer_failures": 100, **limits})


def test_bearer_acts_for_the_tokens_user(store: tokens.TokenStore) -> None:
    issued, _ = store.issue("alice", None, "ohif")
    web = HttpAuthenticator(NoneAuthenticator(), Guard(_throttle()), tokens=store)
    principal = web.principal(f"Bearer {issued.token}", "192.0.2.1")
    assert principal.name == "alice" and principal.established == identity.TOKEN
    assert issued.id in principal.basis and "ohif" in principal.basis
    assert issued.secret not in principal.basis


def test_every_invalid_token_gets_the_same_answer(store: tokens.TokenStore) -> None:
    issued, _ = store.issue("alice", None)
    other, _ = store.issue("bob", datetime.timedelta(seconds=1),
                           at=tokens.now() - datetime.timedelta(minutes=1))
    store.revoke(store.issue("carol", None)[1].id)
    revoked = store.records()[-1]
    web = HttpAuthenticator(NoneAuthenticator(), Guard(_throttle(user_failures=100)),
                            tokens=store)
    wrong_secret = tokens.Issued(issued.id, tokens.new_token().secret).token
    unknown_id = tokens.Issued("0123456789abcdef", issued.secret).token
    reasons = set()
    for token in (wrong_secret, unknown_id, other.token, "garbage",
                  tokens.Issued(revoked.id, "x" * 43).token):
        with pytest.raises(Unauthenticated) as refused:
            web.principal(f"Bearer {token}", "192.0.2.1")
        assert (refused.value.challenge, refused.value.transient) == (INVALID_TOKEN, False)
        reasons.add(refused.value.reason)
    assert len(reasons) == 5  # the log tells them apart, the client is told the same


def test_bearer_guesses_are_throttled_per_token_id(store: tokens.TokenStore) -> None:
    issued, _ = store.issue("alice", None)
    web = HttpAuthenticator(NoneAuthenticator(), Guard(_throttle()), tokens=store)
    guess = tokens.Issued(issued.id, tokens.new_token().secret).token
    outcomes = []
    for n in range(6):
        try:
            web.principal(f"Bearer {guess}", f"198.51.100.{n}")
        except Unauthenticated as exc:
            outcomes.append(exc.transient)
    # three free failures, a fourth starts a back-off: refused unchecked (503) from then
    assert outcomes == [False, False, False, False, True, True]
    assert claimed(f"Bearer {guess}") == {"token": issued.id}


def test_a_token_of_a_removed_user_is_refused(store: tokens.TokenStore,
                                              tmp_path: Path) -> None:
    users = tmp_path / "users.yaml"
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    write_users(users, {"alice": hashed, "bob": hashed})
    issued, _ = store.issue("alice", None)
    web = HttpAuthenticator(FileAuthenticator(users), None, tokens=store)
    assert web.principal(f"Bearer {issued.token}", "192.0.2.1").name == "alice"
    write_users(users, {"bob": hashed})
    with pytest.raises(Unauthenticated, match="no longer known to backend file"):
        web.principal(f"Bearer {issued.token}", "192.0.2.1")


def test_database_away_is_transient(store: tokens.TokenStore) -> None:
    issued, _ = store.issue("alice", None)
    suspected = []
    away = HttpAuthenticator(NoneAuthenticator(), None, tokens=store, available=lambda: False)
    with pytest.raises(Unauthenticated) as refused:
        away.principal(f"Bearer {issued.token}", "192.0.2.1")
    assert refused.value.transient

    def fail(*args: object, **kwargs: object) -> None:
        raise ServerSelectionTimeoutError("no server")

    store.collection.find_one = fail
    failing = HttpAuthenticator(NoneAuthenticator(), None, tokens=store,
                                database_error=suspected.append)
    with pytest.raises(Unauthenticated) as refused:
        failing.principal(f"Bearer {issued.token}", "192.0.2.1")
    assert refused.value.transient and len(suspected) == 1

"""Bearer tokens for DICOMweb: issued and revoked by an administrator, kept hashed.

A token reads ``dat_<id>_<secret>``: ``id`` is 16 hexadecimal digits, public (it names
the token in ``archive token list`` and in the audit trail); ``secret`` is 32 random
bytes in base64url (256 bits: no one guesses it, so a fast salted hash is enough where
a password needs bcrypt).  The ``tokens`` collection keeps, per id, the user, a label,
the creation and expiry times, the revocation time, the last use, and a salt with
HMAC-SHA256(salt, secret): never the secret, which is shown once, when issued.

A token is looked up by its id and its secret compared in constant time; an unknown id
costs the same comparison (against a dummy), so that nothing but the log tells an
unknown id from a wrong secret.  The parsing, hashing and judging are pure functions;
:class:`TokenStore` adds the database.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import re
import secrets
import threading
from dataclasses import dataclass
from typing import Any

from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

COLLECTION = "tokens"
PREFIX = "dat_"
ID_BYTES, SECRET_BYTES, SALT_BYTES = 8, 32, 16
_TOKEN = re.compile(r"dat_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_DURATION = re.compile(r"(\d{1,6})([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: Longest lifetime ``--expires`` takes (ten years: longer is a typo, or ``never``).
MAX_LIFETIME = datetime.timedelta(days=3653)
#: ``last_used`` is written at most this often per token (a write per request would
#: cost the database more than the request).
TOUCH_SECONDS = 60.0
#: Compared against when the id is unknown: the same work as a wrong secret.
_DUMMY_SALT = secrets.token_bytes(SALT_BYTES)

ACTIVE, REVOKED, EXPIRED = "active", "revoked", "expired"


class Invalid(Exception):
    """A token that authenticates no one; ``reason`` is for the log only (the client
    is told the same for every invalid token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- pure parts ------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    id: str
    secret: str

    @property
    def token(self) -> str:
        return f"{PREFIX}{self.id}_{self.secret}"


def new_token() -> Issued:
    return Issued(secrets.token_hex(ID_BYTES),
                  base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES))
                  .rstrip(b"=").decode("ascii"))


def parse(token: str) -> Issued | None:
    """The id and secret of a token as a client sends it; None if it has not the
    shape of one (then it is just an invalid token)."""
    found = _TOKEN.fullmatch(token)
    return Issued(found.group(1), found.group(2)) if found else None


def public_id(token: str) -> str | None:
    """The id part of a token-shaped value, for the audit trail of a refusal."""
    parsed = parse(token)
    return parsed.id if parsed else None


def digest(salt: bytes, secret: str) -> bytes:
    return hmac.new(salt, secret.encode("ascii"), hashlib.sha256).digest()


def parse_duration(text: str) -> datetime.timedelta | None:
    """``90d``, ``12h``, ``1w2d``, ``3600s``...; ``never``: None.  ValueError if not."""
    text = text.strip().lower()
    if text == "never":
        return None
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration (e.g. 90d, 12h, 1w, 30m, or never)")
    seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError("a token must live longer than 0 seconds")
    lifetime = datetime.timedelta(seconds=seconds)
    if lifetime > MAX_LIFETIME:
        raise ValueError("at most 3653 days (ten years); 'never' for no expiry")
    return lifetime


@dataclass(frozen=True)
class Record:
    """A token as the ``tokens`` collection keeps it."""

    id: str
    user: str
    label: str
    created: datetime.datetime
    expires: datetime.datetime | None
    revoked: datetime.datetime | None
    last_used: datetime.datetime | None
    salt: bytes
    hash: bytes

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> Record:
        return cls(doc["_id"], doc["user"], doc.get("label", ""), _utc(doc["created"]),
                   _utc(doc.get("expires")), _utc(doc.get("revoked")),
                   _utc(doc.get("last_used")), bytes(doc["salt"]), bytes(doc["hash"]))

    def document(self) -> dict[str, Any]:
        return {"_id": self.id, "user": self.user, "label": self.label,
                "created": self.created, "expires": self.expires, "revoked": self.revoked,
                "last_used": self.last_used, "salt": self.salt, "hash": self.hash}

    def state(self, now: datetime.datetime) -> str:
        if self.revoked is not None:
            return REVOKED
        if self.expires is not None and now >= self.expires:
            return EXPIRED
        return ACTIVE

    def describe(self) -> str:
        return f"token {self.id}" + (f" ({self.label})" if self.label else "")


def _utc(value: datetime.datetime | None) -> datetime.datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=datetime.timezone.utc)


def make_record(issued: Issued, user: str, label: str, now: datetime.datetime,
                lifetime: datetime.timedelta | None) -> Record:
    salt = secrets.token_bytes(SALT_BYTES)
    # MongoDB keeps milliseconds: what is stored is what list shows and verify compares
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    return Record(issued.id, user, label, now, now + lifetime if lifetime else None, None,
                  None, salt, digest(salt, issued.secret))


def judge(record: Record | None, secret: str, now: datetime.datetime) -> Record:
    """The record a secret opens, or :class:`Invalid`; the same comparison is made
    whether the id is known or not."""
    if record is None:
        hmac.compare_digest(digest(_DUMMY_SALT, secret), bytes(32))
        raise Invalid("unknown token id")
    if not hmac.compare_digest(digest(record.salt, secret), record.hash):
        raise Invalid(f"wrong secret for {record.describe()}")
    state = record.state(now)
    if state != ACTIVE:
        raise Invalid(f"{record.describe()} of {record.user} is {state}")
    return record


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# --- the collection --------------------------------------------------------------------


class TokenStore:
    """The ``tokens`` collection: issue, list, revoke, verify."""

    def __init__(self, db: Database) -> None:
        self.collection = db[COLLECTION]
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()

    def issue(self, user: str, lifetime: datetime.timedelta | None, label: str = "",
              at: datetime.datetime | None = None) -> tuple[Issued, Record]:
        while True:
            issued = new_token()
            record = make_record(issued, user, label, at or now(), lifetime)
            try:
                self.collection.insert_one(record.document())
            except DuplicateKeyError:  # two ids alike: 1 in 2^64, draw again
                continue
            return issued, record

    def records(self) -> list[Record]:
        return [Record.from_document(d) for d in self.collection.find().sort("created", 1)]

    def get(self, token_id: str) -> Record | None:
        doc = self.collection.find_one({"_id": str(token_id)})
        return Record.from_document(doc) if doc else None

    def revoke(self, token_id: str, at: datetime.datetime | None = None) -> Record | None:
        """The token as it was before (None: no such id); revoked from now on."""
        at = at or now()
        found = self.collection.find_one_and_update(
            {"_id": str(token_id), "revoked": None}, {"$set": {"revoked": at}})
        if found is not None:
            return Record.from_document(found)
        return self.get(token_id)

    def verify(self, token: str, at: datetime.datetime | None = None) -> Record:
        """The active record of a token, or :class:`Invalid`; PyMongoError when the
        database does not answer."""
        parsed = parse(token)
        if parsed is None:  # the client knows the shape of what it sent: nothing to hide
            raise Invalid("not a token of this archive (malformed)")
        return judge(self.get(parsed.id), parsed.secret, at or now())

    def touch(self, record: Record, clock: float, at: datetime.datetime | None = None
              ) -> None:
        """Note a use, at most once per :data:`TOUCH_SECONDS` per token (best effort)."""
        with self._lock:
            last = self._touched.get(record.id)
            if last is not None and clock - last < TOUCH_SECONDS:
                return
            self._touched[record.id] = clock
            if len(self._touched) > 10_000:
                self._touched.clear()
        # the request itself will say whether the database is away
        with contextlib.suppress(PyMongoError):
            self.collection.update_one({"_id": record.id},
                                       {"$set": {"last_used": at or now()}})

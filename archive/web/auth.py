"""Who asks over HTTP: Basic credentials checked by ``auth.backend`` as DIMSE does, or a
bearer token an administrator issued (``archive token``, :mod:`acl.tokens`).

The user name and password of an ``Authorization: Basic`` header go through the same
checks as a DICOM User Identity (username+passcode): the backend
(:mod:`acl.auth`: none / file / LDAP) behind the same :class:`acl.auth.Guard`
(per-address and per-user back-off, bounded concurrent checks).  No header: the
principal is ``anonymous``, as for an association without identity.  AE-title
mappings have no HTTP counterpart.

HTTP has no association: a client sends its credentials with every request.  A bcrypt
check costs ~0.25 s of CPU, so a verified (user, password) pair is remembered for
:data:`CACHE_SECONDS` under a salted SHA-256 of both (never the password itself); a
user removed from the users file keeps working that long at most.

``Authorization: Bearer dat_...``: the token is looked up by its id in the database on
every request (one read by primary key; a revoked token stops at once), behind the
same guard, with the token id standing for the user name in the per-user limit.  The
request acts for the token's user, unless the backend says that user no longer exists
(the ``file`` backend: removed from the users file), which refuses the token.  Every
invalid token gets the same 401 (RFC 6750 ``error="invalid_token"``); only the log
says why.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from pymongo.errors import PyMongoError

from acl import identity
from acl.auth import Authenticator, Guard, Refused, valid_username
from acl.tokens import Invalid, TokenStore, public_id

#: How long a verified (user, password) pair is taken without a new check.
CACHE_SECONDS = 30.0
CACHE_ENTRIES = 1024
#: What a 401 answer asks for: either scheme (RFC 7235: challenges, comma-separated).
CHALLENGE = 'Basic realm="dicom-archive", charset="UTF-8", Bearer realm="dicom-archive"'
BASIC_CHALLENGE = 'Basic realm="dicom-archive", charset="UTF-8"'
#: The answer to every unusable bearer token (RFC 6750 section 3.1).
INVALID_TOKEN = 'Bearer realm="dicom-archive", error="invalid_token"'


class Unauthenticated(Exception):
    """Credentials refused: 401 with ``challenge``, or 503 when the backend could not
    decide."""

    def __init__(self, reason: str, transient: bool = False,
                 challenge: str = CHALLENGE) -> None:
        super().__init__(reason)
        self.reason, self.transient, self.challenge = reason, transient, challenge


@dataclass(frozen=True)
class Credentials:
    username: str
    password: bytes


def parse_basic(header: str | None) -> Credentials | None:
    """The credentials of an Authorization header; None without one.  Raises
    :class:`Unauthenticated` for another scheme or a malformed value."""
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise Unauthenticated(f"authorization scheme {scheme[:20]!r} not supported "
                              "(Basic or Bearer)")
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise Unauthenticated("malformed Basic credentials (not base64)",
                              challenge=BASIC_CHALLENGE) from None
    raw_user, sep, password = decoded.partition(b":")
    if not sep:
        raise Unauthenticated("malformed Basic credentials (no colon)",
                              challenge=BASIC_CHALLENGE)
    try:
        username = valid_username(raw_user)
    except Refused as exc:
        raise Unauthenticated(exc.reason, challenge=BASIC_CHALLENGE) from None
    return Credentials(username, password)


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header; None for another header."""
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def claimed(header: str | None) -> dict[str, str]:
    """What refused credentials claimed, for the audit trail: ``user`` (Basic) or
    ``token`` (the public id of a bearer token)."""
    token = bearer_token(header)
    if token is not None:
        token_id = public_id(token)
        return {"token": token_id} if token_id else {}
    try:
        credentials = parse_basic(header)
    except Unauthenticated:
        return {}
    return {"user": credentials.username[:64]} if credentials else {}


class HttpAuthenticator:
    """Principal of a request, from its Authorization header and peer address."""

    def __init__(self, authenticator: Authenticator, guard: Guard | None,
                 clock: Callable[[], float] = time.monotonic,
                 tokens: TokenStore | None = None,
                 available: Callable[[], bool] = lambda: True,
                 database_error: Callable[[Exception], None] = lambda exc: None) -> None:
        self.authenticator = authenticator
        self.guard = guard
        self.clock = clock
        #: bearer tokens (None: only Basic); ``available`` says whether the database
        #: answers, ``database_error`` is told when a look-up failed
        self.tokens = tokens
        self.available = available
        self.database_error = database_error
        self._salt = os.urandom(16)
        self._lock = threading.Lock()
        self._verified: OrderedDict[bytes, tuple[float, str]] = OrderedDict()

    def principal(self, header: str | None, address: str) -> identity.Principal:
        """Who asks; raises :class:`Unauthenticated` (the request gets 401 / 503)."""
        token = bearer_token(header)
        if token is not None and self.tokens is not None:
            return self._bearer(self.tokens, token, address)
        credentials = parse_basic(header)
        if credentials is None:
            return identity.Principal(identity.ANONYMOUS, identity.NONE,
                                      f"no credentials, HTTP from {address}")
        key = hashlib.sha256(self._salt + credentials.username.encode() + b"\0"
                             + credentials.password).digest()
        now = self.clock()
        with self._lock:
            cached = self._verified.get(key)
            if cached is not None and cached[0] > now:
                return self._principal(cached[1], address)
        backend = self.authenticator

        def check() -> str:
            return backend.authenticate(credentials.username, credentials.password)

        try:
            if self.guard is None:
                name = check()
            else:
                name = self.guard.authenticate(address, credentials.username, check)
        except Refused as exc:
            raise Unauthenticated(exc.reason, exc.transient) from None
        with self._lock:
            self._verified[key] = (now + CACHE_SECONDS, name)
            self._verified.move_to_end(key)
            while len(self._verified) > CACHE_ENTRIES:
                self._verified.popitem(last=False)
        return self._principal(name, address)

    def _bearer(self, tokens: TokenStore, token: str, address: str) -> identity.Principal:
        """The principal of a bearer token, checked on every request."""
        if not self.available():
            raise Unauthenticated("database unavailable: bearer token not checked",
                                  transient=True, challenge=INVALID_TOKEN)
        opened = []
        backend = self.authenticator

        def check() -> str:
            try:
                record = tokens.verify(token)
            except Invalid as exc:
                raise Refused(exc.reason) from None
            except PyMongoError as exc:
                self.database_error(exc)
                raise Refused(f"database unavailable: bearer token not checked "
                              f"({type(exc).__name__})", transient=True) from None
            if backend.knows(record.user) is False:
                raise Refused(f"{record.describe()}: user {record.user!r} no longer known "
                              f"to backend {backend.name}")
            opened.append(record)
            return record.user

        key = f"token:{public_id(token) or '?'}"
        try:
            name = check() if self.guard is None else \
                self.guard.authenticate(address, key, check, cheap=True)
        except Refused as exc:
            raise Unauthenticated(exc.reason, exc.transient, INVALID_TOKEN) from None
        tokens.touch(opened[0], self.clock())
        return identity.Principal(name, identity.TOKEN,
                                  f"{opened[0].describe()}, HTTP from {address}")

    def _principal(self, name: str, address: str) -> identity.Principal:
        backend = self.authenticator.name
        if backend in identity.PASSWORD_BACKENDS:
            return identity.Principal(name, identity.VERIFIED,
                                      f"user verified by {backend}, HTTP from {address}")
        return identity.Principal(name, identity.CLAIMED,
                                  f"user name as claimed (backend {backend}), "
                                  f"HTTP from {address}")

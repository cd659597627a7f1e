"""Who asks over HTTP: Basic credentials checked by ``auth.backend``, as DIMSE does.

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

from acl import identity
from acl.auth import Authenticator, Guard, Refused, valid_username

#: How long a verified (user, password) pair is taken without a new check.
CACHE_SECONDS = 30.0
CACHE_ENTRIES = 1024
#: What the 401 answer asks for.
CHALLENGE = 'Basic realm="dicom-archive", charset="UTF-8"'


class Unauthenticated(Exception):
    """Credentials refused: 401, or 503 when the backend could not decide."""

    def __init__(self, reason: str, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.transient = reason, transient


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
                              "(HTTP Basic only)")
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise Unauthenticated("malformed Basic credentials (not base64)") from None
    raw_user, sep, password = decoded.partition(b":")
    if not sep:
        raise Unauthenticated("malformed Basic credentials (no colon)")
    try:
        username = valid_username(raw_user)
    except Refused as exc:
        raise Unauthenticated(exc.reason) from None
    return Credentials(username, password)


class HttpAuthenticator:
    """Principal of a request, from its Authorization header and peer address."""

    def __init__(self, authenticator: Authenticator, guard: Guard | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.authenticator = authenticator
        self.guard = guard
        self.clock = clock
        self._salt = os.urandom(16)
        self._lock = threading.Lock()
        self._verified: OrderedDict[bytes, tuple[float, str]] = OrderedDict()

    def principal(self, header: str | None, address: str) -> identity.Principal:
        """Who asks; raises :class:`Unauthenticated` (the request gets 401 / 503)."""
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

    def _principal(self, name: str, address: str) -> identity.Principal:
        backend = self.authenticator.name
        if backend in identity.PASSWORD_BACKENDS:
            return identity.Principal(name, identity.VERIFIED,
                                      f"user verified by {backend}, HTTP from {address}")
        return identity.Principal(name, identity.CLAIMED,
                                  f"user name as claimed (backend {backend}), "
                                  f"HTTP from {address}")

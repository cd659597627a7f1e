"""Who asks: DICOM User Identity Negotiation (PS3.7 D.3.3.7) checked by a backend.

An association may carry a User Identity item: a username (type 1), or a username and
a passcode (type 2).  The backend chosen by ``auth.backend`` decides:

``none``
    accepts the username as given and ignores any passcode: nothing is verified, so
    use it only on a trusted network, where whoever can connect may claim any name.
``file``
    ``auth.users_file`` maps user names to bcrypt hashes (managed with
    ``python -m archive user``; see :mod:`acl.users`).  A username without a passcode
    is refused: it proves nothing.
``ldap``
    a simple bind to ``auth.ldap.url`` as ``auth.ldap.bind_dn_template`` with
    ``{username}`` replaced by the RFC 4514-escaped username, within
    ``auth.ldap.timeout_seconds``.  A username without a passcode is refused (an
    empty password would be an unauthenticated bind, which most servers accept).

Kerberos, SAML and JWT identities (types 3-5) are refused by every backend.

Throttling (:class:`Guard`, limits in :mod:`acl.throttle`, ``auth.throttle``): a peer
address or a user name with too many recent failures is in back-off, and its attempts
are refused *before* any check runs (rejected-transient, one log line); addresses that
authenticated a user before are exempt from that user's limit, so guesses from
elsewhere cannot lock her out.  At most ``auth.throttle.concurrent_checks`` checks run
at once (one more for a user from a known address), so that checks cannot starve the
other clients of CPU; an attempt waits ``check_wait_seconds`` at most for its turn.

The pynetdicom side (the EVT_USER_ID handler, the association's principal, two patches
of pynetdicom's acceptor) is the DICOM front end's: :mod:`archive.dimse.user_identity`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import bcrypt
import ldap3
from ldap3.core.exceptions import LDAPException

from acl.throttle import Limits, Throttle
from acl.users import UsersFileError, is_bcrypt_hash, read_users
from archive.config import Auth, ConfigError
from archive.config import Throttle as ThrottleConfig

log = logging.getLogger("acl.auth")

USERNAME, USERNAME_PASSCODE = 1, 2
IDENTITY_TYPES = {1: "username", 2: "username+passcode", 3: "Kerberos", 4: "SAML", 5: "JWT"}
MAX_USERNAME_LENGTH = 256

#: Compared against when the user is unknown, so that an unknown user costs the same
#: time as a wrong passcode (no user enumeration by timing); one per bcrypt cost.
_DUMMY_HASHES: dict[int, bytes] = {
    12: b"$2b$12$JyPQ0RrlqIURtuQIRdeWbePQW880wcmyQ4jhQR3xRAGWsybl7cHfi",
}


def _dummy_hash(users: dict[str, str]) -> bytes:
    """A hash of no one's password, with the cost of the file's own hashes."""
    cost = next((int(h[4:6]) for h in users.values() if is_bcrypt_hash(h)), 12)
    cost = min(max(cost, 4), 16)
    if cost not in _DUMMY_HASHES:
        _DUMMY_HASHES[cost] = bcrypt.hashpw(os.urandom(16).hex().encode(), bcrypt.gensalt(cost))
    return _DUMMY_HASHES[cost]


class Refused(Exception):
    """An identity the backend does not accept.  ``reason`` goes to the log only;
    ``transient`` when the backend could not decide (try again later)."""

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


def valid_username(raw: bytes | None) -> str:
    """A user name as credentials carry it (DICOM User Identity, HTTP Basic): UTF-8,
    not empty, at most MAX_USERNAME_LENGTH characters, no control character; else
    Refused."""
    if not raw:
        raise Refused("empty username")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("username is not valid UTF-8") from None
    if len(name) > MAX_USERNAME_LENGTH:
        raise Refused(f"username longer than {MAX_USERNAME_LENGTH} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise Refused("username contains control characters")
    return name


# --- backends -----------------------------------------------------------------------


class Authenticator:
    """Base class: ``authenticate`` returns the principal or raises :class:`Refused`."""

    name = "?"

    def authenticate(self, username: str, passcode: bytes | None) -> str:
        raise NotImplementedError

    def knows(self, username: str) -> bool | None:
        """Whether ``username`` is (still) a user; None when the backend cannot tell
        without her password (LDAP).  A bearer token of a user the backend no longer
        knows is refused."""
        return None

    def describe(self) -> str:
        return self.name


class NoneAuthenticator(Authenticator):
    """Trusted network: the username is taken as given, the passcode ignored."""

    name = "none"

    def authenticate(self, username: str, passcode: bytes | None) -> str:
        return username

    def knows(self, username: str) -> bool | None:
        return True

    def describe(self) -> str:
        return "none (usernames taken as given, passcodes ignored: trusted networks only)"


class FileAuthenticator(Authenticator):
    """bcrypt hashes in a YAML file, re-read whenever the file changes."""

    name = "file"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}

    def users(self) -> dict[str, str]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise Refused(f"users file {self.path} not found", transient=True) from None
        except OSError as exc:
            raise Refused(f"users file {self.path}: {exc.strerror}", transient=True) from None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if stamp != self._stamp:
                try:
                    users = read_users(self.path)
                except FileNotFoundError:
                    raise Refused(f"users file {self.path} not found", transient=True) from None
                except UsersFileError as exc:
                    raise Refused(f"users file unusable: {exc}", transient=True) from None
                if st.st_mode & 0o077:
                    log.warning("users file %s is readable by group or others (mode %o); "
                                "chmod 600 it", self.path, st.st_mode & 0o777)
                self._users, self._stamp = users, stamp
            return self._users

    def authenticate(self, username: str, passcode: bytes | None) -> str:
        if passcode is None:
            raise Refused("username without passcode (the file backend needs a passcode)")
        if not passcode:
            raise Refused("empty passcode")
        users = self.users()
        stored = users.get(username)
        if stored is None:
            _checkpw(passcode, _dummy_hash(users))
            raise Refused("unknown user")
        if not is_bcrypt_hash(stored):
            raise Refused("the users file holds no bcrypt hash for this user")
        if not _checkpw(passcode, stored.encode("ascii")):
            raise Refused("wrong passcode")
        return username

    def knows(self, username: str) -> bool | None:
        return username in self.users()

    def describe(self) -> str:
        try:
            count = f"{len(self.users())} users"
        except Refused as exc:
            count = f"WARNING: {exc.reason}; every user identity will be refused"
        return f"file ({self.path}, {count})"


def _checkpw(passcode: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(passcode, hashed)
    except ValueError:  # longer than bcrypt's 72 bytes (bcrypt >= 5), or a bad hash
        return False


def escape_dn_value(value: str) -> str:
    """Escape an attribute value for use inside a DN (RFC 4514 section 2.4).

    The special characters get a backslash; control characters, DEL and the LDAP
    filter metacharacters ``*()`` are hex-escaped (harmless in a DN, and they keep a
    username from ever reading like a filter).  The result is always one RDN value.
    """
    out: list[str] = []
    for char in value:
        if char in '\\",+;<>=':
            out.append("\\" + char)
        elif ord(char) < 0x20 or char in "\x7f*()":
            out.append("".join(f"\\{byte:02x}" for byte in char.encode("utf-8")))
        else:
            out.append(char)
    if out and out[0] in ("#", " "):
        out[0] = "\\" + out[0]
    if out and out[-1] == " ":
        out[-1] = "\\ "
    return "".join(out)


class LdapAuthenticator(Authenticator):
    """A simple bind as the user's DN; a new connection per authentication."""

    name = "ldap"
    #: LDAP results meaning "the server cannot decide now" (any other refusal, such as
    #: unwillingToPerform from a password policy, is permanent).
    TRANSIENT_RESULTS = {3: "timeLimitExceeded", 51: "busy", 52: "unavailable",
                         80: "other"}

    def __init__(self, url: str, bind_dn_template: str, timeout: float) -> None:
        if "{username}" not in bind_dn_template:
            raise ConfigError("auth.ldap.bind_dn_template: must contain {username}")
        if timeout <= 0:
            raise ConfigError("auth.ldap.timeout_seconds: must be positive")
        self.url = url
        self.template = bind_dn_template
        self.timeout = timeout
        # ldap3 packs the receive timeout into SO_RCVTIMEO as whole seconds on Linux
        # (struct.error with a float): round up.
        self.receive_timeout = max(1, math.ceil(timeout))
        # ldaps:// checks the server certificate against the system's CAs
        self.tls = ldap3.Tls(validate=ssl.CERT_REQUIRED)

    def dn(self, username: str) -> str:
        return self.template.replace("{username}", escape_dn_value(username))

    def authenticate(self, username: str, passcode: bytes | None) -> str:
        if passcode is None:
            raise Refused("username without passcode (the ldap backend needs a passcode)")
        if not passcode:
            raise Refused("empty passcode")
        try:
            password = passcode.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused("passcode is not valid UTF-8") from None
        server = ldap3.Server(self.url, connect_timeout=self.timeout, get_info=ldap3.NONE,
                              tls=self.tls)
        conn = ldap3.Connection(server, user=self.dn(username), password=password,
                                authentication=ldap3.SIMPLE, receive_timeout=self.receive_timeout,
                                auto_referrals=False, read_only=True, raise_exceptions=False)
        try:
            bound = conn.bind()
            result = dict(conn.result or {})
        except (LDAPException, OSError) as exc:  # refused, timed out, TLS failure
            message = _scrub(str(exc).splitlines()[0] if str(exc) else "", password)
            raise Refused(f"LDAP unreachable ({self.url}): {type(exc).__name__} {message}",
                          transient=True) from None
        finally:
            with contextlib.suppress(Exception):  # closing a dead connection
                conn.unbind()
        if bound:
            return username
        code = result.get("result")
        description = result.get("description") or "?"
        if code == 49:
            raise Refused("wrong passcode or unknown user (LDAP invalidCredentials)")
        if code in self.TRANSIENT_RESULTS:
            raise Refused(f"LDAP server could not answer: {code} {description}",
                          transient=True)
        raise Refused(f"LDAP refused the bind: {code} {description}")

    def describe(self) -> str:
        return f"ldap ({self.url}, {self.template}, timeout {self.timeout:g} s)"


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def from_config(cfg: Auth) -> Authenticator:
    """The backend ``auth.backend`` names."""
    if cfg.backend == "file":
        return FileAuthenticator(cfg.users_file)
    if cfg.backend == "ldap":
        return LdapAuthenticator(cfg.ldap.url, cfg.ldap.bind_dn_template,
                                 cfg.ldap.timeout_seconds)
    if cfg.backend == "none":
        return NoneAuthenticator()
    raise ConfigError(f"auth.backend: unknown backend {cfg.backend!r}")


# --- throttling --------------------------------------------------------------------


class CheckSlots:
    """At most ``size`` credential checks at once, plus ``reserved`` more for users
    coming from an address known for them (so that a flood of guesses from elsewhere
    cannot keep the real user waiting)."""

    def __init__(self, size: int, reserved: int = 1) -> None:
        self.size, self.reserved = size, reserved
        self._busy = 0
        self._cond = threading.Condition()

    def acquire(self, trusted: bool, timeout: float) -> bool:
        limit = self.size + (self.reserved if trusted else 0)
        with self._cond:
            if not self._cond.wait_for(lambda: self._busy < limit, timeout):
                return False
            self._busy += 1
            return True

    def release(self) -> None:
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()


class Guard:
    """Throttle (optional) and check slots around a backend's ``authenticate``."""

    def __init__(self, cfg: ThrottleConfig, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.throttle = Throttle(Limits.from_config(cfg), clock) if cfg.enabled else None
        self.slots = CheckSlots(cfg.concurrent_checks)
        self.wait = cfg.check_wait_seconds
        self.clock = clock

    def _admit(self, address: str, username: str) -> None:
        if self.throttle is None:
            return
        refusal = self.throttle.check(address, username)
        if refusal is not None:
            raise Refused(refusal.describe(self.clock()), transient=True)

    def authenticate(self, address: str, username: str,
                     check: Callable[[], str], cheap: bool = False) -> str:
        """``check()`` (the backend) unless throttled; its outcome counted.  A
        ``cheap`` check (a bearer token's hash and look-up) takes no check slot: the
        slots bound the CPU of bcrypt checks and the waits on LDAP."""
        self._admit(address, username)
        if cheap:
            return self._counted(address, username, check)
        trusted = self.throttle is not None and self.throttle.known(address, username)
        if not self.slots.acquire(trusted, self.wait):
            raise Refused(f"busy: {self.slots.size} credential checks running for over "
                          f"{self.wait:g} s", transient=True)
        try:
            self._admit(address, username)  # failures recorded while this one waited
            return self._counted(address, username, check)
        finally:
            self.slots.release()

    def _counted(self, address: str, username: str, check: Callable[[], str]) -> str:
        try:
            principal = check()
        except Refused as exc:
            if self.throttle is not None and not exc.transient:
                self.throttle.record(address, username, False)
            raise
        if self.throttle is not None:
            self.throttle.record(address, username, True)
        return principal

"""Limits on failed authentications, per peer address and per user name, with back-off.

Why: without them a client may try hundreds of passcodes a minute, and each try costs
the node a bcrypt check (~0.25 s of CPU at cost 12) or an LDAP bind.  Each key (a peer
address, a user name) keeps a count of *strikes* (failed checks) that decays by one
every ``forgive_seconds``.  Up to ``free`` strikes cost nothing; each further failure
starts a back-off, ``backoff_seconds`` doubled per strike up to
``max_backoff_seconds``; strikes are forgiven only outside back-offs, so a client
retrying as soon as it may waits 1, 2, 4, ... s, then ``max_backoff_seconds`` per
try.  During a back-off the key's attempts are refused *before* any check runs, and a
refused attempt changes nothing (it neither counts nor extends the back-off), so a
back-off always ends when it said it would.

The per-user limit protects an account from guesses spread over many addresses; it
must not become a way to lock the real user out.  So an address that has
authenticated a user successfully before is *known* for that user: it is exempt from
that user's limit, and its own failures do not count towards it.  Per-address limits
apply to every address, known or not.  IPv6 peers are counted per /64 (one host
usually holds a whole /64).

Pure: no I/O, and time comes from an injected clock (``time.monotonic`` by default),
so a sequence of (time, peer, user, outcome) events always gives the same answers.
Thread-safe (one lock; nothing slow happens under it).  Memory is bounded: at most
``max_entries`` keys per table, the least recently updated dropped first.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PEER, USER = "peer", "user"


@dataclass(frozen=True)
class Limits:
    peer_failures: int = 10
    user_failures: int = 5
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 300.0
    forgive_seconds: float = 60.0
    max_entries: int = 10_000
    known_per_user: int = 32

    @classmethod
    def from_config(cls, cfg: Any) -> Limits:
        """From ``auth.throttle`` (:class:`archive.config.Throttle`)."""
        return cls(cfg.peer_failures, cfg.user_failures, cfg.backoff_seconds,
                   cfg.max_backoff_seconds, cfg.forgive_seconds)

    def backoff(self, over: float) -> float:
        """The back-off after the ``over``-th strike beyond the free ones (over >= 1)."""
        doublings = min(over - 1, 64)
        return min(self.backoff_seconds * 2 ** doublings, self.max_backoff_seconds)

    @property
    def extra_strikes(self) -> int:
        """Strikes beyond the free ones that still lengthen the back-off: more would
        only make the key take longer to recover."""
        ratio = self.max_backoff_seconds / self.backoff_seconds
        return math.ceil(math.log2(ratio)) + 1 if ratio > 1 else 1


@dataclass
class _Count:
    strikes: float = 0.0
    at: float = 0.0
    until: float = -math.inf

    def decayed(self, now: float, forgive: float) -> float:
        return max(0.0, self.strikes - max(0.0, now - self.at) / forgive)


@dataclass(frozen=True)
class Refusal:
    """An attempt refused without checking: ``scope`` (peer or user) is in back-off
    until ``until`` (clock time)."""

    scope: str
    key: str
    strikes: int
    until: float

    def describe(self, now: float) -> str:
        what = f"address {self.key}" if self.scope == PEER else f"user {self.key!r}"
        return (f"throttled: {what} has {self.strikes} recent failures, back-off "
                f"{max(0.0, self.until - now):.1f} s more")


def peer_key(address: str) -> str:
    """What a peer is counted as: its IPv4 address, or its IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Throttle:
    """Per-peer and per-user failure counts with back-off (see the module docstring)."""

    def __init__(self, limits: Limits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or Limits()
        self.clock = clock
        self._lock = threading.Lock()
        self._peers: OrderedDict[str, _Count] = OrderedDict()
        self._users: OrderedDict[str, _Count] = OrderedDict()
        self._known: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()

    # -- questions ----------------------------------------------------------------------

    def known(self, address: str, user: str) -> bool:
        """Has ``address`` authenticated ``user`` successfully before?"""
        with self._lock:
            return address in self._known.get(user, ())

    def check(self, address: str, user: str) -> Refusal | None:
        """None: go ahead and check the credentials; else why not (nothing recorded)."""
        now = self.clock()
        with self._lock:
            key = peer_key(address)
            count = self._peers.get(key)
            if count is not None and now < count.until:
                return Refusal(PEER, key, round(count.strikes), count.until)
            if address not in self._known.get(user, ()):
                count = self._users.get(user)
                if count is not None and now < count.until:
                    return Refusal(USER, user, round(count.strikes), count.until)
        return None

    # -- outcomes -----------------------------------------------------------------------

    def record(self, address: str, user: str, ok: bool) -> None:
        """The outcome of a check that ran (never of a refused attempt)."""
        now = self.clock()
        with self._lock:
            if ok:
                self._remember(address, user)
                return
            self._strike(self._peers, peer_key(address), self.limits.peer_failures, now)
            if address not in self._known.get(user, ()):
                self._strike(self._users, user, self.limits.user_failures, now)

    def _strike(self, table: OrderedDict[str, _Count], key: str, free: int,
                now: float) -> None:
        limits = self.limits
        count = table.pop(key, None) or _Count()
        strikes = min(count.decayed(now, limits.forgive_seconds) + 1,
                      free + limits.extra_strikes)
        count.strikes = strikes
        if strikes > free:
            count.until = max(count.until, now + limits.backoff(strikes - free))
        count.at = max(now, count.until)  # nothing is forgiven during a back-off
        table[key] = count  # most recently updated last
        while len(table) > limits.max_entries:
            table.popitem(last=False)

    def _remember(self, address: str, user: str) -> None:
        addresses = self._known.pop(user, None) or OrderedDict()
        addresses.pop(address, None)
        addresses[address] = None
        while len(addresses) > self.limits.known_per_user:
            addresses.popitem(last=False)
        self._known[user] = addresses
        while len(self._known) > self.limits.max_entries:
            self._known.popitem(last=False)

    def size(self) -> int:
        """Entries held (for tests of the memory bound)."""
        with self._lock:
            return len(self._peers) + len(self._users) + len(self._known)

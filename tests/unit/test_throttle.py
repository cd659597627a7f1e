"""The authentication throttle as a function of (time, peer, user, outcome) events.

Hypothesis generates event sequences; each is run through :class:`acl.auth.Guard` (the
wiring the node uses) with a fake clock and a fake backend that counts its checks.
Properties: a peer in back-off is refused until the back-off ends, and not after;
a user's known address is never refused because of other addresses' failures;
refused attempts never run the check; the number of checks is bounded; everything
recovers with time; memory stays bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acl.auth import Guard, Refused
from acl.throttle import PEER, USER, Limits, Throttle, peer_key
from archive.config import Throttle as ThrottleConfig

ADDRESSES = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "2001:db8::1", "2001:db8::2",
             "::ffff:10.0.0.1"]
USERS = ["alice", "bob", "mallory"]
CONFIG = ThrottleConfig(peer_failures=4, user_failures=3, backoff_seconds=1.0,
                        max_backoff_seconds=32.0, forgive_seconds=20.0)
LIMITS = Limits.from_config(CONFIG)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Step:
    time: float
    address: str
    user: str
    good: bool
    checked: bool
    refusal: str | None  # the Refused reason when throttled
    #: when refused for its address: the end of that back-off, as the throttle said then
    peer_until: float | None = None


@dataclass
class Run:
    clock: Clock
    guard: Guard
    steps: list[Step] = field(default_factory=list)
    checks: int = 0


def simulate(events: list[tuple[float, str, str, bool]]) -> Run:
    """Each event: wait dt, then one authentication of user from address, with the
    right passcode (good) or not."""
    clock = Clock()
    run = Run(clock, Guard(CONFIG, clock))
    for dt, address, user, good in events:
        clock.now += dt
        called = []

        def backend(user: str = user, good: bool = good, called: list[bool] = called) -> str:
            called.append(True)
            run.checks += 1
            if not good:
                raise Refused("wrong passcode")
            return user

        try:
            run.guard.authenticate(address, user, backend)
            refusal = None
        except Refused as exc:
            refusal = exc.reason if exc.transient else None
        peer_until = None
        if refusal is not None and run.guard.throttle is not None:
            said = run.guard.throttle.check(address, user)  # pure: records nothing
            if said is not None and said.scope == PEER:
                peer_until = said.until
        run.steps.append(Step(clock.now, address, user, good, bool(called), refusal,
                              peer_until))
    return run


def throttle(run: Run) -> Throttle:
    assert run.guard.throttle is not None
    return run.guard.throttle


delays = st.one_of(st.just(0.0), st.floats(0, 3), st.floats(0, 80))
events = st.lists(st.tuples(delays, st.sampled_from(ADDRESSES), st.sampled_from(USERS),
                            st.booleans()), max_size=120)
#: Quick attempts on two users: successes make known addresses, failures pile up.
crowded = st.lists(st.tuples(st.sampled_from([0.0, 0.5, 2.0, 30.0]), st.sampled_from(ADDRESSES),
                             st.sampled_from(USERS[:2]),
                             st.sampled_from([False, False, True])), max_size=80)
#: Mostly failures, to reach the limits often.
hostile = st.lists(st.tuples(delays, st.sampled_from(ADDRESSES), st.sampled_from(USERS),
                             st.sampled_from([False, False, False, True])), max_size=120)


@settings(max_examples=300, deadline=None)
@given(hostile)
def test_refused_attempts_never_run_the_check(sequence: list) -> None:
    run = simulate(sequence)
    for step in run.steps:
        assert step.checked == (step.refusal is None), step
    assert run.checks == sum(step.refusal is None for step in run.steps)


@settings(max_examples=300, deadline=None)
@given(hostile)
def test_a_peer_in_back_off_is_refused_until_it_ends_and_not_after(sequence: list) -> None:
    run = simulate(sequence)
    back_off: dict[str, float] = {}  # peer key -> end of its back-off, as announced
    for step in run.steps:
        key = peer_key(step.address)
        if step.time < back_off.get(key, -math.inf):
            assert step.refusal is not None and "address" in step.refusal, step
        elif key in back_off and step.refusal is not None:
            assert "address" not in step.refusal  # its back-off is over
        if step.checked and not step.good:
            back_off.pop(key, None)  # a new failure may start a new back-off
        if step.peer_until is not None:  # as the throttle announced it at that moment
            back_off[key] = step.peer_until


@settings(max_examples=300, deadline=None)
@given(st.one_of(crowded, hostile))
def test_a_known_address_is_never_refused_for_other_addresses_failures(sequence: list
                                                                       ) -> None:
    run = simulate(sequence)
    known: set[tuple[str, str]] = set()
    own_failures: dict[str, int] = {}
    for step in run.steps:
        if (step.address, step.user) in known and step.refusal is not None:
            # only its own address's failures can hold it back
            assert "address" in step.refusal, step
            assert own_failures.get(peer_key(step.address), 0) > CONFIG.peer_failures
        if step.checked:
            if step.good:
                known.add((step.address, step.user))
            else:
                key = peer_key(step.address)
                own_failures[key] = own_failures.get(key, 0) + 1


@settings(max_examples=200, deadline=None)
@given(hostile)
def test_checks_per_peer_are_bounded(sequence: list) -> None:
    """Whatever the sequence, failed checks from one peer in any span of L seconds stay
    below free + L/forgive + L/backoff + 2 (without the throttle: unbounded)."""
    run = simulate(sequence)
    failures: dict[str, list[float]] = {}
    for step in run.steps:
        if step.checked and not step.good:
            failures.setdefault(peer_key(step.address), []).append(step.time)
    for times in failures.values():
        for i, start in enumerate(times):
            for j in range(i, len(times)):
                span = times[j] - start
                bound = (CONFIG.peer_failures + span / CONFIG.forgive_seconds
                         + span / CONFIG.backoff_seconds + 2)
                assert j - i + 1 <= bound


@settings(max_examples=200, deadline=None)
@given(hostile)
def test_limits_recover_over_time(sequence: list) -> None:
    run = simulate(sequence)
    limiter = throttle(run)
    run.clock.now += CONFIG.max_backoff_seconds
    for address in ADDRESSES:
        for user in USERS:
            assert limiter.check(address, user) is None
    # and after the strikes are forgiven, each peer has its whole allowance again
    run.clock.now += CONFIG.forgive_seconds * (CONFIG.peer_failures + LIMITS.extra_strikes)
    peers = {peer_key(a): a for a in reversed(ADDRESSES)}  # one address per peer
    for n, address in enumerate(peers.values()):
        for k in range(CONFIG.peer_failures + 1):  # the last one starts a back-off
            user = f"fresh-{n}-{k}"  # no user limit in the way
            assert limiter.check(address, user) is None, (address, k)
            limiter.record(address, user, False)
        refusal = limiter.check(address, "fresh")
        assert refusal is not None and refusal.scope == PEER


def test_guesses_from_many_addresses_hit_the_user_limit_not_the_real_user() -> None:
    clock = Clock()
    limiter = Throttle(LIMITS, clock)
    limiter.record("192.0.2.7", "alice", True)  # her workstation
    for n in range(CONFIG.user_failures + 1):  # the last one starts a back-off
        assert limiter.check(f"198.51.100.{n}", "alice") is None
        limiter.record(f"198.51.100.{n}", "alice", False)
    refusal = limiter.check("198.51.100.200", "alice")  # a fresh address: user limit
    assert refusal is not None and refusal.scope == USER
    assert "user 'alice'" in refusal.describe(clock.now)
    assert limiter.check("192.0.2.7", "alice") is None  # she still gets in at once
    assert limiter.check("198.51.100.200", "bob") is None  # other users unaffected
    clock.now += refusal.until - clock.now
    assert limiter.check("198.51.100.200", "alice") is None  # and it ends


def test_back_off_doubles_up_to_its_maximum() -> None:
    clock = Clock()
    limiter = Throttle(LIMITS, clock)
    waits = []
    for n in range(CONFIG.peer_failures + 8):
        refusal = limiter.check("10.9.9.9", f"u{n}")
        if refusal is not None:
            waits.append(round(refusal.until - clock.now, 3))
            clock.now = refusal.until
        limiter.record("10.9.9.9", f"u{n}", False)
    assert waits[:6] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert max(waits) <= CONFIG.max_backoff_seconds


def test_ipv6_peers_count_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert peer_key("2001:db8::1") == peer_key("2001:db8::ffff") == "2001:db8::/64"
    assert peer_key("2001:db8:0:1::1") != peer_key("2001:db8::1")
    assert peer_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert peer_key("not-an-address") == "not-an-address"


def test_memory_stays_bounded() -> None:
    clock = Clock()
    limiter = Throttle(Limits(max_entries=50, known_per_user=4), clock)
    for n in range(2000):
        limiter.record(f"10.{n // 250}.{n % 250}.1", f"user{n}", n % 3 == 0)
        limiter.record(f"10.0.0.{n % 200}", "alice", True)
    assert limiter.size() <= 150
    assert sum(limiter.known(f"10.0.0.{n}", "alice") for n in range(200)) == 4


def test_transient_refusals_do_not_count() -> None:
    clock = Clock()
    guard = Guard(CONFIG, clock)

    def unreachable() -> str:
        raise Refused("LDAP unreachable", transient=True)

    for _ in range(CONFIG.peer_failures * 3):
        with pytest.raises(Refused, match="unreachable"):
            guard.authenticate("10.0.0.1", "alice", unreachable)
    assert guard.authenticate("10.0.0.1", "alice", lambda: "alice") == "alice"


def test_disabled_throttle_still_bounds_concurrent_checks() -> None:
    guard = Guard(ThrottleConfig(enabled=False, concurrent_checks=1,
                                 check_wait_seconds=0.05))
    assert guard.throttle is None
    assert guard.slots.acquire(False, 0.01)  # someone else's check is running
    try:
        with pytest.raises(Refused, match="busy") as caught:
            guard.authenticate("10.0.0.1", "alice", lambda: "alice")
        assert caught.value.transient
    finally:
        guard.slots.release()
    for _ in range(CONFIG.peer_failures * 3):  # no limit on failures
        with pytest.raises(Refused, match="wrong"):
            guard.authenticate("10.0.0.1", "alice",
                               lambda: (_ for _ in ()).throw(Refused("wrong passcode")))


def test_a_known_user_gets_a_reserved_check_slot() -> None:
    guard = Guard(ThrottleConfig(check_wait_seconds=0.05))
    guard.authenticate("10.0.0.5", "alice", lambda: "alice")  # known from now on
    assert guard.slots.acquire(False, 0.01)  # the ordinary slot is taken
    try:
        assert not guard.slots.acquire(False, 0.01)
        assert guard.authenticate("10.0.0.5", "alice", lambda: "alice") == "alice"
        with pytest.raises(Refused, match="busy"):
            guard.authenticate("10.0.0.6", "alice", lambda: "alice")
    finally:
        guard.slots.release()

"""Wrong passcodes under brute force: how many the node checks, and what it costs others.

A node with ``auth.backend: file`` (one user, bcrypt cost 12, the production cost) on
its embedded FerretDB.  For ``--seconds`` (60), ``--attackers`` (4) threads send
associations with user ``alice`` and wrong passcodes, as fast as the node answers, from
127.0.0.1.  Meanwhile a bystander without user identity echoes from 127.0.0.2 every
0.5 s, and alice logs in from 127.0.0.3 (where she logged in once before the attack)
every 5 s.  All clients are pynetdicom SCUs in this process.

Reported: attempts per minute, wrong passcodes *checked* per minute (rejected-permanent:
the backend ran bcrypt), attempts refused without a check (rejected-transient), the
bystander's association + C-ECHO latency (median, 95th percentile, max) and alice's
login latency.  ``--source-ref REF`` runs the archive as committed at REF.

    .venv/bin/python -m benchmarks.bench_auth [--source-ref HEAD] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    RESULTS,
    RUNS,
    ArchiveNode,
    CpuMeter,
    checkout,
    wait_for_quiet,
)

PASSCODE = "Alice-real-passcode-42"
WRONG = "not-the-passcode"
BYSTANDER, ALICE, ATTACKER = "127.0.0.2", "127.0.0.3", "127.0.0.1"


def attempt(node: ArchiveNode, source: str, user: str | None = None,
            passcode: str | None = None, ae_title: str = "BENCHSCU") -> tuple[str, float]:
    """One association (+ C-ECHO if accepted): (outcome, seconds)."""
    from pynetdicom import AE
    from pynetdicom.pdu_primitives import UserIdentityNegotiation
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    ext = []
    if user is not None:
        item = UserIdentityNegotiation()
        item.user_identity_type = 2
        item.primary_field = user.encode()
        item.secondary_field = (passcode or "").encode()
        ext.append(item)
    started = time.perf_counter()
    try:
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, ext_neg=ext,
                             bind_address=(source, 0))
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            outcome = "echo" if status and status.Status == 0 else "echo-failed"
        elif assoc.is_rejected:
            result = assoc.acceptor.primitive.result
            outcome = {1: "rejected-permanent", 2: "rejected-transient"}.get(result, "rejected")
        else:
            outcome = "aborted"
    finally:
        ae.shutdown()
    return outcome, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run(source: str | None, seconds: float, attackers: int) -> dict[str, Any]:
    from acl.users import set_password

    workdir = RUNS / "auth"
    node = ArchiveNode(workdir, source=source, acl_rules=({"principal": "*", "service": "*"},),
                       extra_config={"auth": {"backend": "file",
                                              "users_file": str(workdir / "users.yaml")}})
    set_password(workdir / "users.yaml", "alice", PASSCODE.encode())
    wait_for_quiet()
    with node:
        first = attempt(node, ALICE, "alice", PASSCODE)
        if first[0] != "echo":
            raise SystemExit(f"alice cannot log in before the attack: {first}")
        stop = threading.Event()
        outcomes: Counter[str] = Counter()
        echoes: list[float] = []
        logins: list[tuple[str, float]] = []
        lock = threading.Lock()

        def attacker() -> None:
            while not stop.is_set():
                outcome, _ = attempt(node, ATTACKER, "alice", WRONG)
                with lock:
                    outcomes[outcome] += 1

        def bystander() -> None:
            while not stop.wait(0.5):
                outcome, elapsed = attempt(node, BYSTANDER)
                if outcome == "echo":
                    echoes.append(elapsed)
                else:
                    echoes.append(float("inf"))

        def alice() -> None:
            while not stop.wait(5.0):
                logins.append(attempt(node, ALICE, "alice", PASSCODE))

        threads = [threading.Thread(target=attacker) for _ in range(attackers)]
        threads += [threading.Thread(target=bystander), threading.Thread(target=alice)]
        with CpuMeter([node.pid]) as meter:
            for thread in threads:
                thread.start()
            time.sleep(seconds)
            stop.set()
            for thread in threads:
                thread.join(60)
    per_minute = 60.0 / seconds
    attempts = sum(outcomes.values())
    return {
        "source": source or "work tree", "seconds": seconds, "attackers": attackers,
        "attempts_per_min": attempts * per_minute,
        "checked_per_min": outcomes["rejected-permanent"] * per_minute,
        "refused_unchecked_per_min": outcomes["rejected-transient"] * per_minute,
        "outcomes": dict(outcomes),
        "bystander_echo_s": {"n": len(echoes), "median": statistics.median(echoes),
                             "p95": percentile(echoes, 0.95), "max": max(echoes)},
        "alice_logins": [{"outcome": o, "s": round(t, 3)} for o, t in logins],
        "cpu": meter.result,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-ref", help="run the archive as committed at this ref")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--attackers", type=int, default=4)
    args = parser.parse_args(argv)
    source = str(checkout(args.source_ref)) if args.source_ref else None
    result = run(source, args.seconds, args.attackers)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "auth.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    echo = result["bystander_echo_s"]
    logins = result["alice_logins"]
    print(f"attempts/min {result['attempts_per_min']:.0f}, wrong passcodes checked/min "
          f"{result['checked_per_min']:.0f}, refused without check/min "
          f"{result['refused_unchecked_per_min']:.0f}")
    print(f"bystander echo (n={echo['n']}): median {echo['median'] * 1000:.0f} ms, "
          f"p95 {echo['p95'] * 1000:.0f} ms, max {echo['max'] * 1000:.0f} ms")
    print("alice logins: " + ", ".join(f"{x['outcome']} {x['s'] * 1000:.0f} ms"
                                        for x in logins))
    print(f"node CPU {sum(result['cpu']['system_cpu_s'].values()):.1f} s, foreign cores "
          f"{result['cpu']['foreign_cores']:.2f}; {Path(out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

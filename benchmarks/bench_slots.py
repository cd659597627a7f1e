"""Slot exhaustion: what another peer gets while one peer holds hostile connections.

    python -m benchmarks.bench_slots [--refs 39cd50d,HEAD] [--kinds silent,partial_rq,trickle]
                                     [--counts 10,50] [--cap 45]

For each git ref (the archive as committed there, see ``harness.checkout``), starts the
archive with its shipped connection settings (``max_associations: 10``; the rest as the
ref's defaults), then for each hostile kind and count: opens that many connections of
that kind from one peer (127.0.0.2, 127.0.0.3, ... a fresh address each time; kinds from
``tests/hostile.py``), waits 0.5 s, and times a C-ECHO and a C-STORE (pynetdicom, new
association each) from 127.0.0.1; then waits (at most ``--cap`` seconds) for the node to
close the hostile connections.  Prints, per row: the other peer's echo and store
(status and milliseconds, or "refused" with the A-ASSOCIATE-RJ reason), the node's CPU
(% of one core, over 2 s with the hostile connections open; pynetdicom polls each
connection every millisecond), how many hostile connections the node refused at once,
how many it held and for how long at most, and how many it still held at ``--cap``.

Results: ``bench-data/results/slots.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import harness as h

# The hostile peers are the test suite's (tests/hostile.py): one definition of each kind.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hostile import Siege  # noqa: E402

#: A refused connection closes within this.
AT_ONCE = 0.5
#: Seconds over which the node's CPU is measured while the hostile connections are open.
CPU_WINDOW = 2.0


def _associate(port: int, contexts: list[tuple[str, list[str]]]) -> tuple[Any, Any]:
    from pynetdicom import AE

    ae = AE(ae_title="OTHERPEER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    return ae, ae.associate(h.LOOPBACK, port, ae_title="ARCHIVE")


def _outcome(assoc: Any, operation: Any) -> str:
    if not assoc.is_established:
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            return f"refused RJ {rj.result}/{rj.result_source}/{rj.diagnostic}"
        return "refused (no association)"
    status = operation()
    assoc.release()
    return f"0x{int(status.Status):04X}" if "Status" in status else "no response"


def echo(port: int) -> tuple[str, float]:
    from pynetdicom.sop_class import Verification

    started = time.monotonic()
    ae, assoc = _associate(port, [(Verification, ["1.2.840.10008.1.2"])])
    try:
        result = _outcome(assoc, assoc.send_c_echo)
    finally:
        ae.shutdown()
    return result, time.monotonic() - started


def store(port: int) -> tuple[str, float]:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "SLOTS", "BENCH^SLOTS", "OT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    started = time.monotonic()
    ae, assoc = _associate(port, [(ds.SOPClassUID, [ExplicitVRLittleEndian])])
    try:
        result = _outcome(assoc, lambda: assoc.send_c_store(ds))
    finally:
        ae.shutdown()
    return result, time.monotonic() - started


def run(ref: str, kinds: list[str], counts: list[int], cap: float) -> list[dict[str, Any]]:
    rows = []
    source = h.checkout(ref)
    sha = source.name
    peer = 2
    with h.ArchiveNode(h.RUNS / "slots" / sha, source=source) as node:
        assert isinstance(node, h.ArchiveNode)
        for kind in kinds:
            for count in counts:
                siege = Siege(node.port, kind, f"127.0.0.{peer}", count=count).start()
                peer += 1
                try:
                    time.sleep(0.5)
                    cpu = h.cpu_seconds(node.pid)
                    time.sleep(CPU_WINDOW)  # what holding them costs the node
                    cpu = (h.cpu_seconds(node.pid) - cpu) / CPU_WINDOW
                    echo_result, echo_seconds = echo(node.port)
                    store_result, store_seconds = store(node.port)
                    siege.wait_closed(cap)
                    # before closing our side: what the node closed, what it still held
                    now = time.monotonic()
                    lasted = [(now if c.closed is None else c.closed) - c.opened
                              for c in siege.connections]
                    still_open = sum(c.open for c in siege.connections)
                finally:
                    siege.close()
                refused = sum(t < AT_ONCE for t in lasted)
                held = [t for t in lasted if t >= AT_ONCE]
                row = {"ref": ref, "commit": sha, "kind": kind, "hostile": count,
                       "echo": echo_result, "echo_ms": round(echo_seconds * 1000, 1),
                       "store": store_result, "store_ms": round(store_seconds * 1000, 1),
                       "node_cpu_%": round(cpu * 100), "refused_at_once": refused,
                       "held": len(held),
                       "held_max_s": round(max(held), 1) if held else 0.0,
                       "still_open": still_open}
                rows.append(row)
                print(h.table(list(row), [list(row.values())]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_slots")
    parser.add_argument("--refs", default="39cd50d,HEAD",
                        help="git refs to compare (default: before the guard, and HEAD)")
    parser.add_argument("--kinds", default="silent,partial_rq,trickle")
    parser.add_argument("--counts", default="10,50")
    parser.add_argument("--cap", type=float, default=45.0,
                        help="seconds to wait for the node to close the hostile connections")
    args = parser.parse_args(argv)
    rows = []
    for ref in args.refs.split(","):
        rows += run(ref, args.kinds.split(","), [int(n) for n in args.counts.split(",")],
                    args.cap)
    print()
    columns = ["ref", "kind", "hostile", "echo", "echo_ms", "store", "store_ms",
               "node_cpu_%", "refused_at_once", "held", "held_max_s", "still_open"]
    print(h.table(columns, [[row[c] for c in columns] for row in rows]))
    path = h.write_results("slots", {"rows": rows, "environment": h.environment_info()})
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

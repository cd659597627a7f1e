"""A bare pynetdicom Storage SCP: the Python floor of ``bench_store``.

    python -m benchmarks.pyscp --port PORT --out DIR [--aet PYSCP]

Accepts pynetdicom's storage SOP classes with its default transfer syntaxes, and
Verification; writes every dataset received as a Part-10 file ``DIR/<SOP Instance
UID>.dcm`` (``event.encoded_dataset()``: the bytes as received, never decoded) and
answers Success.  No database, no parsing, no fsync (like storescp).  TCP_NODELAY is set
on every association's socket, as the archive does: pynetdicom leaves Nagle on, and each
C-STORE response would then wait for a delayed ACK.  Runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification


def _nodelay(event: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pyscp",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--aet", default="PYSCP")
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--out", type=Path, required=True, help="folder the files go to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    def store(event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        (out / f"{uid}.dcm").write_bytes(event.encoded_dataset(include_meta=True))
        return 0x0000

    ae = AE(ae_title=args.aet)
    ae.maximum_associations = 10
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    server = ae.start_server((args.bind, args.port), block=False, evt_handlers=[
        (evt.EVT_C_STORE, store), (evt.EVT_CONN_OPEN, _nodelay)])
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

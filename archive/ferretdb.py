"""The embedded database: a FerretDB server (SQLite handler) the node starts itself.

FerretDB speaks the MongoDB wire protocol, so the archive talks to it through pymongo
exactly as to MongoDB.  It listens on loopback only, with telemetry disabled, and keeps
its SQLite files under a local folder so the data survives restarts.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path

from archive.config import EmbeddedDatabase

log = logging.getLogger("archive.ferretdb")


class DatabaseUnavailable(Exception):
    """The embedded database could not be started."""


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def find_binary(configured: str) -> str:
    path = Path(configured)
    if path.is_file():
        return str(path)
    found = shutil.which("ferretdb")
    if found:
        return found
    raise DatabaseUnavailable(
        f"database.embedded.binary: FerretDB not found at {configured} nor on PATH "
        "(run ./scripts/setup, which builds it)")


def command(binary: str, data_dir: Path, port: int) -> list[str]:
    return [
        binary, "--handler=sqlite", f"--sqlite-url=file:{data_dir.resolve()}/",
        f"--listen-addr=127.0.0.1:{port}", "--telemetry=disable",
        f"--state-dir={data_dir.resolve()}", "--log-level=warn", "--debug-addr=-",
    ]


class EmbeddedFerretDB:
    """Start FerretDB unless one already answers on the port; stop what we started."""

    def __init__(self, cfg: EmbeddedDatabase) -> None:
        self.cfg = cfg
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.cfg.port}/"

    def start(self, timeout: float = 20.0) -> str:
        if port_open(self.cfg.port):
            log.info("using the database already listening on 127.0.0.1:%d", self.cfg.port)
            return self.uri
        data_dir = Path(self.cfg.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        binary = find_binary(self.cfg.binary)
        logfile = (data_dir / "ferretdb.log").open("ab")
        self.process = subprocess.Popen(command(binary, data_dir, self.cfg.port),
                                        stdout=logfile, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DatabaseUnavailable(
                    f"FerretDB exited with status {self.process.returncode}; "
                    f"see {data_dir / 'ferretdb.log'}")
            if port_open(self.cfg.port):
                log.info("FerretDB %s started on 127.0.0.1:%d (data in %s)", binary,
                         self.cfg.port, data_dir)
                return self.uri
            time.sleep(0.1)
        self.stop()
        raise DatabaseUnavailable(f"FerretDB did not listen on port {self.cfg.port} "
                                  f"within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

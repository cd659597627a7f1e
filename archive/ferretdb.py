"""The embedded database: a FerretDB server (SQLite handler) the node starts and watches.

FerretDB speaks the MongoDB wire protocol, so the archive talks to it through pymongo
exactly as to MongoDB.  It listens on loopback only, with telemetry disabled, and keeps
its SQLite files under a local folder so the data survives restarts.

Supervision, so that a crash never leaves a database nobody owns nor a node without one:

- FerretDB dies with the process that started it (Linux ``PR_SET_PDEATHSIG``), even when
  that process is killed with SIGKILL.  It runs in its own session, so a Ctrl-C meant for
  the node does not stop the database under the stores the node lets finish.
- ``<data_dir>/ferretdb.pid`` names the FerretDB serving the data folder, the node that
  owns it and the port.  At start, a FerretDB already on the port is used only if it
  serves the same data folder and its owner is alive (two nodes on one embedded
  database); one whose owner is gone is stopped and replaced; anything else on the port
  is an error naming it.
- A FerretDB that has not listened by the end of the start's wait but is working (its
  CPU time grows: the first start of a new build rebuilding its indexes) is waited for,
  with a line saying so at every further wait, up to a limit that grows with the size
  of its data (:func:`working_limit`); one that idles has hung and is stopped, and so
  is one still working at the limit.
- :meth:`EmbeddedFerretDB.supervise` restarts FerretDB when it exits while the node runs
  (back-off from ``restart_delay_seconds``, doubling), and tells the node at once, so that
  requests needing the database are refused rather than left waiting (archive.health).

CPUs (``separate_cpus``): the process that starts FerretDB (the node, or a one-shot
command such as ``archive import``) moves to the lower half of the CPUs it may use and
FerretDB runs on the upper half (:func:`split_cpus`).  Each C-STORE hands
work back and forth between the two over loopback: left to itself, the scheduler (most
likely) woke each on the other's CPU (a loopback send wakes its reader there), where it
waited for the other to yield.  Apart, one association stored ~10% more instances a second and
four ~30% more, each process spending less CPU per instance.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from archive.config import EmbeddedDatabase

log = logging.getLogger("archive.ferretdb")

#: Restart delays double up to this many seconds ...
MAX_RESTART_DELAY = 60.0
#: ... and start again from ``restart_delay_seconds`` once FerretDB ran this long.
STABLE_SECONDS = 60.0
PIDFILE = "ferretdb.pid"
#: A FerretDB not listening yet at the end of a start's wait is waited for again if it
#: used at least this share of the wait in CPU time (one that idles has hung).
BUSY_SHARE = 0.05
#: How long a working FerretDB is waited for at most: this long, or this long per GiB
#: of its SQLite files if that is more.  An index rebuild took ~0.7 s per 1,000
#: instances, some 20 s per GiB; the limit leaves ten times that and more.
BUSY_LIMIT_SECONDS = 600.0
BUSY_LIMIT_PER_GIB = 300.0
#: Whether /proc tells which process listens on a port (Linux).
HAVE_PROC = Path("/proc/net/tcp").exists()


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


#: Go's garbage collector target for the embedded FerretDB: at Go's default (100) it
#: spent a fifth of FerretDB's CPU collecting the short-lived documents of each
#: request; at 400 FerretDB's CPU per stored instance drops by ~20% and its peak
#: memory grows from ~32 to ~55 MB (1,000-odd CT/MR stores).  GOGC set in the node's
#: environment wins.
GOGC = "400"


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GOGC", GOGC)
    return env


def command(binary: str, data_dir: Path, port: int) -> list[str]:
    return [
        binary, "--handler=sqlite", f"--sqlite-url=file:{data_dir.resolve()}/",
        f"--listen-addr=127.0.0.1:{port}", "--telemetry=disable",
        f"--state-dir={data_dir.resolve()}", "--log-level=warn", "--debug-addr=-",
    ]


# --- processes, as /proc shows them --------------------------------------------------


@dataclass(frozen=True)
class Process:
    """A process, told apart from a later one given the same pid by its start time."""

    pid: int
    started: int

    @classmethod
    def of(cls, pid: int) -> Process | None:
        started = start_time(pid)
        return None if started is None else cls(pid, started)

    def alive(self) -> bool:
        return start_time(self.pid) == self.started


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), None if
    there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), None if there is no such process."""
    fields = _stat(pid)
    return None if not fields or fields[0] == "Z" else int(fields[19])  # a zombie is gone


def cpu_seconds(pid: int) -> float | None:
    """CPU time ``pid`` has used (user and system), None if there is no such process."""
    fields = _stat(pid)
    return None if not fields else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parent_pid(pid: int) -> int | None:
    fields = _stat(pid)
    return None if not fields else int(fields[1])


def command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def describe(pid: int) -> str:
    """``pid 123 (ferretdb --handler=sqlite ...)`` for messages."""
    cmd = " ".join(command_line(pid))
    return f"pid {pid} ({cmd[:80]}{'...' if len(cmd) > 80 else ''})" if cmd else f"pid {pid}"


def listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` (IPv4 and IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def holds(pid: int, inodes: set[str]) -> bool:
    """Whether process ``pid`` has one of these sockets open."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


def listener(port: int) -> int | None:
    """The process listening on ``port``, None if this user cannot see it."""
    inodes = listening_inodes(port)
    if inodes:
        for entry in os.listdir("/proc"):
            if entry.isdigit() and holds(int(entry), inodes):
                return int(entry)
    return None


def working_limit(data_dir: Path) -> float:
    """Seconds a FerretDB working without listening is waited for at most: more for a
    larger database (:data:`BUSY_LIMIT_PER_GIB`)."""
    size = 0
    for path in data_dir.glob("*.sqlite*"):
        with contextlib.suppress(OSError):
            size += path.stat().st_size
    return max(BUSY_LIMIT_SECONDS, BUSY_LIMIT_PER_GIB * size / 2**30)


def serves(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` is a FerretDB keeping its data in ``data_dir``."""
    args = command_line(pid)
    return bool(args) and "ferretdb" in Path(args[0]).name.lower() \
        and f"--state-dir={data_dir}" in args


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` making the child receive SIGTERM when its parent dies (Linux).

    The kernel sends it when the *thread* that forked the child ends: FerretDB is
    started from the main thread or from the supervisor's, which live as long as the node.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl: nobody would tell us
            os._exit(1)
    return preexec


def split_cpus(available: set[int]) -> tuple[set[int], set[int]] | None:
    """(the node's CPUs, FerretDB's): the lower half of ``available`` and the upper
    half, FerretDB's the larger (the node's Python runs one thread at a time); None
    when there are fewer than two."""
    cpus = sorted(available)
    if len(cpus) < 2:
        return None
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:])


def pin_process(cpus: set[int]) -> None:
    """Every thread of this process (and those it starts later) on ``cpus``."""
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(int(task), cpus)


# --- the pidfile ---------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """The pidfile: which FerretDB serves the data folder, for which node, on which port."""

    pid: int
    started: int
    node_pid: int
    node_started: int
    data_dir: str
    port: int

    @property
    def ferretdb(self) -> Process:
        return Process(self.pid, self.started)

    @property
    def node(self) -> Process:
        return Process(self.node_pid, self.node_started)


def read_owner(path: Path) -> Owner | None:
    try:
        return Owner(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def write_owner(path: Path, owner: Owner) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(asdict(owner)) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --- the server ----------------------------------------------------------------------


class EmbeddedFerretDB:
    """A FerretDB serving ``data_dir`` on the port: started here, or another live node's."""

    def __init__(self, cfg: EmbeddedDatabase) -> None:
        self.cfg = cfg
        self.port = cfg.port
        self.data_dir = Path(cfg.data_dir).resolve()
        self.pidfile = self.data_dir / PIDFILE
        #: the FerretDB started here, if any
        self.process: subprocess.Popen[bytes] | None = None
        #: the FerretDB in use: ours, or another node's
        self.server: Process | None = None
        #: the pid of the node whose FerretDB is shared, None when it is ours
        self.shared_with: int | None = None
        self._me = Process.of(os.getpid()) or Process(os.getpid(), 0)
        #: (this process's CPUs, FerretDB's) when FerretDB is started here apart (see
        #: above); read before any start moves this process
        self.cpus = (split_cpus(os.sched_getaffinity(0))
                     if cfg.separate_cpus and hasattr(os, "sched_setaffinity") else None)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    # -- starting -----------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> str:
        """Make a FerretDB of our data folder listen on the port; its URI.

        Raises DatabaseUnavailable, naming what holds the port, when that is not one.
        """
        with self._lock:
            for _ in range(3):  # another node may be starting one at the same moment
                if self._acquire(timeout):
                    return self.uri
        raise DatabaseUnavailable(f"FerretDB could not be started on port {self.port}: "
                                  "see the log above")

    def _acquire(self, timeout: float) -> bool:
        """Share, replace or start; False to try again (lost a race to the port)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        owner = read_owner(self.pidfile)
        if not port_open(self.port):
            self._wait_for_previous(owner)
            return self._spawn(timeout)
        holder = self._holder()
        owner = self._owner_of(holder, owner)
        if owner is not None:
            if owner.node.alive():
                self.process, self.server = None, holder
                self.shared_with = owner.node_pid
                log.info("sharing the embedded database with node pid %d: FerretDB pid %d "
                         "on 127.0.0.1:%d (data in %s)", owner.node_pid, holder.pid,
                         self.port, self.data_dir)
                return True
            log.warning("FerretDB pid %d on 127.0.0.1:%d (data in %s) was left running by "
                        "node pid %d, which is gone: stopping it", holder.pid, self.port,
                        self.data_dir, owner.node_pid)
        else:  # no pidfile names it: only an orphan (its parent gone) may be replaced
            parent = parent_pid(holder.pid)
            if parent not in (None, 0, 1):
                raise DatabaseUnavailable(
                    f"database.embedded.port {self.port}: 127.0.0.1:{self.port} is held by "
                    f"FerretDB {describe(holder.pid)} serving {self.data_dir}, started by "
                    f"{describe(parent)}, not by an archive node: stop it")
            log.warning("FerretDB pid %d on 127.0.0.1:%d (data in %s) has no owner: "
                        "stopping it", holder.pid, self.port, self.data_dir)
        _terminate(holder)
        return self._spawn(timeout)

    def _holder(self) -> Process:
        """The FerretDB of our data folder on the port; anything else is an error."""
        pid = listener(self.port)
        where = f"database.embedded.port {self.port}: 127.0.0.1:{self.port} is held by"
        if pid is None:
            raise DatabaseUnavailable(
                f"{where} a process this user cannot see, not by a FerretDB of "
                f"{self.data_dir}: stop it or set database.embedded.port to a free port")
        process = Process.of(pid)
        if process is None or not serves(pid, self.data_dir):
            raise DatabaseUnavailable(
                f"{where} {describe(pid)}, not by a FerretDB of {self.data_dir}: stop it "
                "or set database.embedded.port to a free port")
        return process

    def _owner_of(self, holder: Process, owner: Owner | None) -> Owner | None:
        """The pidfile entry naming ``holder``, if any.  A node writes it just after its
        FerretDB listens: one that started a moment ago gets two seconds to do so."""
        deadline = time.monotonic() + 2
        while owner is None or owner.ferretdb != holder or owner.port != self.port:
            if time.monotonic() > deadline or not holder.alive():
                return None
            time.sleep(0.1)
            owner = read_owner(self.pidfile)
        return owner

    def _wait_for_previous(self, owner: Owner | None) -> None:
        """Refuse a second FerretDB on our data folder; let one that is stopping finish."""
        if owner is None or not owner.ferretdb.alive() \
                or not serves(owner.pid, self.data_dir):
            return
        if owner.port != self.port:
            raise DatabaseUnavailable(
                f"{self.data_dir} is served by FerretDB pid {owner.pid} on port {owner.port} "
                f"(node pid {owner.node_pid}): one data folder takes one FerretDB; set "
                f"database.embedded.port to {owner.port} to share it")
        deadline = time.monotonic() + 10  # stopping (or starting): wait for either end
        while owner.ferretdb.alive() and not port_open(self.port) \
                and time.monotonic() < deadline:
            time.sleep(0.1)

    def _preexec(self) -> Callable[[], None] | None:
        """What the child runs before FerretDB: dies with us, on its CPUs."""
        die = _die_with_parent()
        if self.cpus is None:
            return die
        cpus = self.cpus[1]

        def preexec() -> None:
            if die is not None:
                die()
            with contextlib.suppress(OSError):  # refused (a sandbox): anywhere, as before
                os.sched_setaffinity(0, cpus)
        return preexec

    def _spawn(self, timeout: float) -> bool:
        binary = find_binary(self.cfg.binary)
        if self.cpus is not None:  # this process apart from the FerretDB it starts
            pin_process(self.cpus[0])
        log_path = self.data_dir / "ferretdb.log"
        with log_path.open("ab") as logfile:
            process = subprocess.Popen(
                command(binary, self.data_dir, self.port), stdout=logfile,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env=environment(), preexec_fn=self._preexec())
        began = deadline = time.monotonic()
        deadline += timeout
        used, limit = 0.0, 0.0
        while True:
            if process.poll() is not None:
                if port_open(self.port):  # another node's FerretDB won the port
                    log.info("another FerretDB took 127.0.0.1:%d first", self.port)
                    return False
                raise DatabaseUnavailable(
                    f"FerretDB exited with status {process.returncode} at start: "
                    f"{_last_line(log_path)} (see {log_path})")
            if not HAVE_PROC:  # cannot tell whose listener it is: take the port's word
                if port_open(self.port):
                    break
            elif holds(process.pid, listening_inodes(self.port)):
                break
            if time.monotonic() > deadline:
                # still working (the first start of a new build rebuilding its indexes:
                # ferretdb/README.md, patch 12): wait on; one that idles has hung
                now = cpu_seconds(process.pid) if HAVE_PROC else None
                waited = time.monotonic() - began
                if now is not None and now - used >= BUSY_SHARE * timeout:
                    if not used:
                        limit = working_limit(self.data_dir)
                        log.warning("FerretDB has not listened on port %d within %.0f s but "
                                    "is working (rebuilding its indexes after an upgrade? "
                                    "see %s): waiting on, %.0f s at most", self.port,
                                    timeout, log_path, limit)
                    elif waited >= limit:
                        _stop_child(process)
                        raise DatabaseUnavailable(
                            f"FerretDB worked for {waited:.0f} s without listening on port "
                            f"{self.port} (the limit for its data; see {log_path}): stopped")
                    else:
                        log.info("FerretDB pid %d still working, not listening yet: %.0f s, "
                                 "%.0f s of CPU", process.pid, waited, now)
                    used, deadline = now, time.monotonic() + timeout
                    continue
                _stop_child(process)
                raise DatabaseUnavailable(f"FerretDB did not listen on port {self.port} "
                                          f"within {timeout:.0f} s (see {log_path})")
            time.sleep(0.05)
        self.process = process
        self.server = Process.of(process.pid)
        self.shared_with = None
        if self.server is None:  # died this instant: the caller tries again
            return False
        write_owner(self.pidfile, Owner(process.pid, self.server.started, self._me.pid,
                                        self._me.started, str(self.data_dir), self.port))
        log.info("FerretDB pid %d started on 127.0.0.1:%d (data in %s)", process.pid,
                 self.port, self.data_dir)
        return True

    # -- watching -----------------------------------------------------------------------

    def supervise(self, on_down: Callable[[str], None]) -> None:
        """Restart FerretDB whenever it exits, until :meth:`stop`; ``on_down(reason)``
        is called the moment it is seen gone."""
        self._watcher = threading.Thread(target=self._watch, args=(on_down,),
                                         name="ferretdb-supervisor", daemon=True)
        self._watcher.start()

    def _watch(self, on_down: Callable[[str], None]) -> None:
        delay = self.cfg.restart_delay_seconds
        while True:
            running_since = time.monotonic()
            reason = self._wait_exit()
            if reason is None:  # stopping
                return
            on_down(reason)
            if time.monotonic() - running_since >= STABLE_SECONDS:
                delay = self.cfg.restart_delay_seconds
            # a node sharing another's FerretDB leaves that node the first go at it
            wait = delay if self.process is not None else 2 * delay
            log.warning("%s: database unavailable, restarting it in %.1f s", reason, wait)
            while True:
                if self._stopping.wait(wait):
                    return
                try:
                    self.start()
                    break
                except DatabaseUnavailable as exc:
                    delay = wait = min(2 * delay, MAX_RESTART_DELAY)
                    log.error("FerretDB restart failed: %s; next attempt in %.1f s", exc, wait)
            delay = min(2 * delay, MAX_RESTART_DELAY)  # if it dies again soon, wait longer

    def _wait_exit(self) -> str | None:
        """Block until the FerretDB in use exits: why, or None once stopping."""
        server, process = self.server, self.process
        if server is None:
            return "FerretDB is not running"
        try:
            handle: int | None = os.pidfd_open(server.pid)
        except (AttributeError, OSError):  # no pidfd (old kernel), or gone already
            handle = None
        try:
            while server.alive():
                if self._stopping.is_set():
                    return None
                if handle is not None:  # readable the moment the process exits
                    select.select([handle], [], [], 0.5)
                else:
                    self._stopping.wait(0.2)
        finally:
            if handle is not None:
                os.close(handle)
        if self._stopping.is_set():  # stopped by stop()
            return None
        if process is not None and process.pid == server.pid:
            status = process.wait()
            how = (f"was killed by {signal.Signals(-status).name}" if status < 0
                   else f"exited with status {status}")
            return f"FerretDB pid {server.pid} {how}"
        return f"the shared FerretDB pid {server.pid} is gone"

    # -- stopping -----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop watching, and stop FerretDB if it is ours (another node's is left)."""
        self._stopping.set()
        with self._lock:
            process, self.process = self.process, None
            if process is not None:
                _stop_child(process)
                owner = read_owner(self.pidfile)
                if owner is not None and owner.pid == process.pid:
                    with contextlib.suppress(OSError):
                        self.pidfile.unlink()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(5)


def _stop_child(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _terminate(process: Process, timeout: float = 10.0) -> None:
    """Stop a FerretDB that is not our child: SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not process.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)
        deadline = time.monotonic() + wait
        while process.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
    if process.alive():
        raise DatabaseUnavailable(f"FerretDB pid {process.pid} does not stop")


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""

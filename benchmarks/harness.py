"""Shared machinery of the benchmarks: systems under test, DCMTK clients, timing, results.

Systems under test, each a context manager that starts a fresh instance on free loopback
ports and stops it (SIGTERM, then SIGKILL of its own process group) on exit:

- :class:`ArchiveNode`: this archive, ``python -m archive serve --config <generated
  yaml>`` with its embedded FerretDB in a private data folder;
- :class:`Orthanc`: ``/usr/sbin/Orthanc`` with a generated JSON configuration;
- :class:`StoreSCP`: DCMTK's ``storescp`` writing files (or discarding them).

DCMTK clients, run with ``TCP_NODELAY=1`` (without it each instance costs ~88 ms on
loopback), each returning the wall-clock time and what the tool reported:
:func:`echoscu`, :func:`storescu`, :func:`findscu`, :func:`movescu`, :func:`getscu`.

Everything a run writes goes under ``bench-data/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
BENCH_DATA = REPO / "bench-data"
RESULTS = BENCH_DATA / "results"
RUNS = BENCH_DATA / "runs"
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() \
    else sys.executable
FERRETDB = REPO / ".tools" / "bin" / "ferretdb"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
#: Orthanc's DICOMweb plugin as Debian's orthanc-dicomweb installs it (scripts/setup).
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
LOOPBACK = "127.0.0.1"
CLIENT_AET = "BENCHSCU"

# pynetdicom installs its own echoscu/storescu/findscu/... into the virtual environment's
# bin: with the environment activated they would shadow DCMTK's, which every benchmark
# means (and whose options they do not take). Tools are found without that directory.
_VENV_BINS = {str(Path(sys.prefix) / "bin"), str(REPO / ".venv" / "bin")}
os.environ["PATH"] = os.pathsep.join(
    d for d in os.environ.get("PATH", os.defpath).split(os.pathsep)
    if d.rstrip("/") not in _VENV_BINS)


class BenchmarkError(RuntimeError):
    """A system under test failed, or did not do all it was asked: the run is invalid."""


# --- ports, waiting, timing --------------------------------------------------------

_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback TCP port nothing listens on, never the same twice in one process."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise BenchmarkError("no free TCP port found")


def port_open(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               process: subprocess.Popen[bytes] | None = None, interval: float = 0.1,
               log: Path | None = None) -> None:
    """Poll ``predicate`` until true; fail early when ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BenchmarkError(f"{what}: process exited with status {process.returncode}"
                                 + _tail(log))
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(interval)
    raise BenchmarkError(f"{what}: not ready within {timeout:.0f} s" + _tail(log))


def _tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {log} ---\n" + "\n".join(text)


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.elapsed`` (seconds, perf_counter)."""

    def __init__(self) -> None:
        self.started = self.stopped = 0.0

    def __enter__(self) -> Stopwatch:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return (self.stopped or time.perf_counter()) - self.started


def timed(function: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """``(seconds, result)`` of one call."""
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def repeat(function: Callable[[], float], runs: int, warmup: int = 1) -> dict[str, float]:
    """Run a function returning seconds ``warmup + runs`` times; min/median/mean/max."""
    for _ in range(warmup):
        function()
    return summary([function() for _ in range(runs)])


def summary(samples: list[float]) -> dict[str, float]:
    """Runs, min/median/mean/max of timings in seconds."""
    samples = sorted(samples)
    mid = len(samples) // 2
    median = samples[mid] if len(samples) % 2 else (samples[mid - 1] + samples[mid]) / 2
    return {"runs": len(samples), "min": samples[0], "median": median,
            "mean": sum(samples) / len(samples), "max": samples[-1]}


# --- systems under test ----------------------------------------------------------


class Service:
    """A server process we start in its own session and stop by its id."""

    name = "service"

    #: Working directory of the process (the archive runs from a checkout, see source=).
    cwd: Path = REPO

    def __init__(self, workdir: str | Path, fresh: bool = True) -> None:
        self.workdir = Path(workdir).resolve()
        if fresh and self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = self.workdir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    # subclasses: command(), ready(), and optionally environment()
    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    startup_timeout = 60.0

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BenchmarkError(f"{self.name} is not running")
        return self.process.pid

    def start(self) -> Service:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.cwd, env=self.environment(), start_new_session=True)
        try:
            wait_until(self.ready, self.startup_timeout, f"{self.name} start-up",
                       self.process, log=self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the process group it leads (ours only)."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # children it may have left behind (e.g. the embedded FerretDB after a crash)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        self.process = None
        return process.returncode

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def checkout(ref: str) -> Path:
    """The archive's packages (archive/, acl/) as of git ``ref``, extracted (read-only
    ``git archive``) under bench-data/src/<commit>: other engineers edit the shared work
    tree while benchmarks run, and ``ArchiveNode(source=...)`` runs a fixed version."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                         capture_output=True, text=True, check=False).stdout.strip()
    if not sha:
        raise BenchmarkError(f"git: {ref!r} is not a commit")
    dest = BENCH_DATA / "src" / sha[:12]
    if not (dest / "archive" / "__init__.py").exists():
        top = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", sha],
                             capture_output=True, text=True, check=True).stdout.split()
        paths = [p for p in ("archive", "acl", "config") if p in top]
        staging = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, *paths],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(staging)], input=archive, check=True)
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    return dest


#: Access rules letting anyone do anything: what a benchmark applies by default when the
#: archive has access control (it denies everything until rules are applied).
ALLOW_ALL: tuple[dict[str, str], ...] = ({"principal": "*", "service": "*"},)


#: Associations one peer address may hold at once in the archive as shipped
#: (``connections.associations_per_peer``); every benchmark client is 127.0.0.1.
ARCHIVE_PER_PEER = 4


def archive_associations_config(associations: int) -> dict[str, Any]:
    """``extra_config`` letting ``associations`` concurrent associations from loopback
    into an :class:`ArchiveNode`: nothing up to :data:`ARCHIVE_PER_PEER` (so that
    commits without the ``connections`` section still run), else a raised limit."""
    if associations <= ARCHIVE_PER_PEER:
        return {}
    return {"max_associations": max(10, associations),
            "connections": {"associations_per_peer": associations,
                            "pending_per_peer": associations}}


class ArchiveNode(Service):
    """This archive, ``python -m archive serve`` on its own embedded FerretDB.

    ``wrapper`` is prepended to the command (e.g. ``["py-spy", "record", ..., "--"]``)
    and ``python_args`` go between the interpreter and ``-m archive`` (e.g.
    ``["-m", "cProfile", "-o", "node.prof"]``; mind that cProfile sees the main thread
    only, and pynetdicom serves each association in a thread of its own).  ``module``
    replaces ``archive`` as the entry point (``benchmarks.phase_node`` times phases).
    """

    name = "archive"

    def __init__(self, workdir: str | Path, ae_title: str = "ARCHIVE", port: int | None = None,
                 db_port: int | None = None, log_level: str = "INFO",
                 destinations: Mapping[str, tuple[str, int]] | None = None,
                 extra_config: Mapping[str, Any] | None = None, fresh: bool = True,
                 wrapper: Sequence[str] = (), python_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, module: str = "archive",
                 acl_rules: Sequence[Mapping[str, Any]] | None = ALLOW_ALL,
                 ferretdb: str | Path = FERRETDB, source: str | Path | None = None) -> None:
        super().__init__(workdir, fresh)
        if source is not None:  # a checkout of another commit (see checkout())
            self.cwd = Path(source).resolve()
        self.module = module
        self.acl_rules = acl_rules
        self.ae_title = ae_title
        self.host = LOOPBACK
        self.port = port or free_port()
        self.db_port = db_port or free_port()
        self.wrapper, self.python_args = list(wrapper), list(python_args)
        self.extra_env = dict(env or {})
        config: dict[str, Any] = {
            "ae_title": ae_title, "bind_address": LOOPBACK, "port": self.port,
            "max_associations": 10, "log_level": log_level, "duplicate_policy": "replace",
            "journal": str(self.workdir / "journal.jsonl"),
            "database": {
                "uri": f"mongodb://{LOOPBACK}:{self.db_port}/", "name": "archive",
                "gridfs_bucket": "fs", "timeout_seconds": 5,
                "embedded": {"enabled": True, "binary": str(Path(ferretdb).resolve()),
                             "data_dir": str(self.workdir / "ferretdb"), "port": self.db_port},
            },
            "destinations": {ae: {"host": host, "port": port}
                             for ae, (host, port) in (destinations or {}).items()},
        }
        if self.receives_into_files():  # never the checkout's own data/ folder
            config["receive"] = {"folder": str(self.workdir / "incoming")}
        if "class Http" in (self.cwd / "archive" / "config.py").read_text("utf-8"):
            config["http"] = {"enabled": False}  # DICOMweb: never the shared port 8080
        self.config = _deep_merge(config, extra_config or {})
        self.config_path = self.workdir / "archive.yaml"
        self.write_config()

    def write_config(self) -> None:
        import yaml

        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False),
                                    encoding="utf-8")

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHIVE_")}
        if self.cwd != REPO:  # the checkout comes first (cwd), benchmarks/ from here
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env.update(self.extra_env)
        return env

    def command(self) -> list[str]:
        return [*self.wrapper, PYTHON, *self.python_args, "-m", self.module, "serve",
                "--config", str(self.config_path)]

    def receives_into_files(self) -> bool:
        """Whether the archive run receives C-STORE datasets into ``receive.folder``."""
        return "class Receive" in (self.cwd / "archive" / "config.py").read_text("utf-8")

    def has_acl(self) -> bool:
        """Whether the archive run has access rules (it then denies unless allowed)."""
        config = self.cwd / "archive" / "config.py"
        return (self.cwd / "acl").is_dir() and "class Acl" in config.read_text("utf-8")

    def apply_acl(self) -> None:
        """``archive acl apply`` the node's rules (before start: it uses the database)."""
        import yaml

        rules = self.workdir / "acl.yaml"
        rules.write_text(yaml.safe_dump({"rules": [dict(r) for r in self.acl_rules or []]}),
                         encoding="utf-8")
        done = self.cli("acl", "apply", str(rules))
        if done.returncode != 0:
            raise BenchmarkError(f"archive acl apply failed ({done.returncode}): "
                                 f"{done.stdout}{done.stderr}")

    def start(self) -> ArchiveNode:
        if port_open(self.db_port):
            raise BenchmarkError(f"port {self.db_port} is taken: the node would use that "
                                 "database instead of a fresh one")
        if self.acl_rules is not None and self.has_acl():
            self.apply_acl()
        super().start()
        return self

    def ready(self) -> bool:
        return port_open(self.port) and echoscu(self.host, self.port, self.ae_title).ok

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``python -m archive ARGS --config <this node's config>``."""
        return subprocess.run([PYTHON, "-m", "archive", *args, "--config", str(self.config_path)],
                              cwd=self.cwd, env=self.environment(), capture_output=True, text=True,
                              timeout=timeout, check=False)

    def stats(self) -> dict[str, Any]:
        """``archive stats --json``: patients, studies, series, instances, per modality."""
        done = self.cli("stats", "--json")
        if done.returncode != 0:
            raise BenchmarkError(f"archive stats failed ({done.returncode}): {done.stderr}")
        return json.loads(done.stdout)

    def disk_usage(self) -> int:
        return _du(self.workdir / "ferretdb")


class Orthanc(Service):
    """Orthanc from Debian with a generated configuration, fresh storage by default."""

    name = "orthanc"

    def __init__(self, workdir: str | Path, aet: str = "ORTHANC", dicom_port: int | None = None,
                 http_port: int | None = None,
                 modalities: Mapping[str, tuple[str, int]] | None = None,
                 extra_config: Mapping[str, Any] | None = None, fresh: bool = True,
                 client_port: int | None = None, nodelay: bool = True) -> None:
        super().__init__(workdir, fresh)
        self.nodelay = nodelay
        self.aet = self.ae_title = aet
        self.host = LOOPBACK
        self.port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        config: dict[str, Any] = {
            "Name": f"bench-{aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "DicomAet": aet, "DicomPort": self.port, "HttpPort": self.http_port,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "HttpServerEnabled": True, "SslEnabled": False, "DicomTlsEnabled": False,
            # the benchmarks' client AE (findscu, getscu, movescu +P on client_port)
            "DicomModalities": {ae: [ae, host, port] for ae, (host, port) in {
                CLIENT_AET: (LOOPBACK, client_port or 1), **(modalities or {})}.items()},
            "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "Plugins": [], "SaveJobs": False, "LimitFindResults": 0,
            "LimitFindInstances": 0, "UnknownSopClassAccepted": False,
        }
        self.config = _deep_merge(config, extra_config or {})
        self.config_path = self.workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(self.config, indent=2), encoding="utf-8")

    def environment(self) -> dict[str, str]:
        # Orthanc's DICOM stack is DCMTK, which reads TCP_NODELAY from the environment:
        # without it each C-STORE response waits for a delayed ACK (~40-90 ms).
        env = {**os.environ, "TCP_NODELAY": "1"} if self.nodelay else dict(os.environ)
        if not self.nodelay:
            env.pop("TCP_NODELAY", None)
        return env

    def command(self) -> list[str]:
        return [ORTHANC, str(self.config_path)]

    def ready(self) -> bool:
        return (port_open(self.http_port) and self.rest("GET", "/system") is not None
                and echoscu(self.host, self.port, self.aet).ok)

    def rest(self, method: str, path: str, body: Any = None, timeout: float = 300) -> Any:
        data = None if body is None else (body if isinstance(body, bytes)
                                          else json.dumps(body).encode())
        request = urllib.request.Request(f"http://{LOOPBACK}:{self.http_port}{path}",
                                         data=data, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            payload = response.read()
        try:
            return json.loads(payload)
        except ValueError:
            return payload

    def statistics(self) -> dict[str, Any]:
        """``GET /statistics``: CountPatients, CountStudies, CountSeries, CountInstances..."""
        return self.rest("GET", "/statistics")

    def disk_usage(self) -> int:
        return _du(self.workdir / "storage") + _du(self.workdir / "index")


class StoreSCP(Service):
    """DCMTK's storescp: one association at a time, files written to ``output_dir``
    (``ignore=True``: received and discarded, a pure network sink)."""

    name = "storescp"

    def __init__(self, workdir: str | Path, aet: str = "STORESCP", port: int | None = None,
                 output_dir: str | Path | None = None, ignore: bool = False,
                 accept_all: bool = True, extra: Sequence[str] = (), fresh: bool = True) -> None:
        super().__init__(workdir, fresh)
        self.aet = self.ae_title = aet
        self.host = LOOPBACK
        self.port = port or free_port()
        self.output_dir = Path(output_dir) if output_dir else self.workdir / "files"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.ignore, self.accept_all, self.extra = ignore, accept_all, list(extra)

    def environment(self) -> dict[str, str]:
        return {**os.environ, "TCP_NODELAY": "1"}

    def command(self) -> list[str]:
        return ["storescp", "-aet", self.aet, "-od", str(self.output_dir), "-dhl",
                *(["+xa"] if self.accept_all else []), *(["--ignore"] if self.ignore else []),
                *self.extra, str(self.port)]

    def ready(self) -> bool:
        return port_open(self.port) and echoscu(self.host, self.port, self.aet).ok

    def files(self) -> list[Path]:
        return [p for p in self.output_dir.rglob("*") if p.is_file()]

    def count_files(self) -> int:
        return len(self.files())

    def clear(self) -> None:
        shutil.rmtree(self.output_dir, ignore_errors=True)
        self.output_dir.mkdir(parents=True)

    def disk_usage(self) -> int:
        return _du(self.output_dir)


class PyStoreSCP(StoreSCP):
    """A bare pynetdicom Storage SCP (``python -m benchmarks.pyscp``): every dataset
    received is written as a file, nothing else.  What any node built on pynetdicom
    pays before doing its own work: the Python floor beside storescp's."""

    name = "pyscp"

    def __init__(self, workdir: str | Path, aet: str = "PYSCP", port: int | None = None,
                 output_dir: str | Path | None = None, fresh: bool = True) -> None:
        super().__init__(workdir, aet=aet, port=port, output_dir=output_dir, fresh=fresh)

    def command(self) -> list[str]:
        return [PYTHON, "-m", "benchmarks.pyscp", "--aet", self.aet, "--port", str(self.port),
                "--out", str(self.output_dir)]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc), zombies included."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                queue.extend(int(c) for c in task.read_text().split())
    return found


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (state) on: the command name may hold spaces."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reaped_children_cpu_seconds(pid: int) -> float:
    """User + system CPU time of the children a process has waited for (cutime+cstime):
    where storescp --fork's per-association processes end up once reaped."""
    fields = _stat_fields(pid)
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def parent_pid(pid: int) -> int:
    return int(_stat_fields(pid)[1])


def process_name(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


class CpuMeter:
    """CPU used during a measurement: by the system under test (per process), by the
    clients this process ran (storescu...), and by everything else on the machine.

    For each process in ``pids`` it counts its own CPU time and that of the children it
    reaped meanwhile; processes started meanwhile below one of ``pids`` (storescp
    ``--fork`` forks one per association) are counted too, alive or zombie.  The result
    has the CPU by process name (``system_cpu_s``) and by pid (``by_pid``, with each
    one's name and parent, see :func:`node_and_database`).

    Other engineers' test runs share the 2 cores: ``foreign_cores`` says how many cores'
    worth of CPU other processes took meanwhile, so a disturbed run can be recognised.
    """

    def __init__(self, pids: Iterable[int] = ()) -> None:
        self.pids = list(pids)

    def __enter__(self) -> CpuMeter:
        import resource

        self._wall = time.perf_counter()
        self._machine = _machine_jiffies()
        self._children = _rusage_cpu(resource.RUSAGE_CHILDREN)
        self._self = _rusage_cpu(resource.RUSAGE_SELF)
        self._procs: dict[int, tuple[str, int, float, float]] = {}
        for pid in self.pids:
            with contextlib.suppress(OSError):
                self._procs[pid] = (process_name(pid), parent_pid(pid), cpu_seconds(pid),
                                    reaped_children_cpu_seconds(pid))
        # processes already there but not asked for (e.g. FerretDB under CpuMeter([node]))
        self._known = {p for pid in self._procs for p in process_tree(pid)}
        self.result: dict[str, Any] = {}
        return self

    def __exit__(self, *exc: object) -> None:
        import resource

        wall = time.perf_counter() - self._wall
        busy, total = _machine_jiffies()
        tick = os.sysconf("SC_CLK_TCK")
        machine_busy = (busy - self._machine[0]) / tick
        by_pid: dict[str, dict[str, Any]] = {}
        # first the processes started meanwhile (zombies keep their times until reaped),
        # then the parents' reaped-children times: a child reaped in between would be
        # counted twice, one reaped after would not be, in a window of microseconds
        for root in self._procs:
            for pid in process_tree(root):
                if pid not in self._known and str(pid) not in by_pid:
                    with contextlib.suppress(OSError, ValueError):
                        by_pid[str(pid)] = {"name": process_name(pid), "ppid": parent_pid(pid),
                                            "cpu_s": cpu_seconds(pid), "started": True}
        vanished = []
        for pid, (name, ppid, own, reaped) in self._procs.items():
            try:
                used = cpu_seconds(pid) - own + reaped_children_cpu_seconds(pid) - reaped
            except (OSError, ValueError):
                vanished.append(name)
                continue
            by_pid[str(pid)] = {"name": name, "ppid": ppid, "cpu_s": used, "started": False}
        processes: dict[str, float] = {}
        for entry in by_pid.values():
            processes[entry["name"]] = processes.get(entry["name"], 0.0) + entry["cpu_s"]
        clients = _rusage_cpu(resource.RUSAGE_CHILDREN) - self._children
        harness = _rusage_cpu(resource.RUSAGE_SELF) - self._self
        ours = sum(processes.values()) + clients + harness
        self.result = {
            "wall_s": wall, "system_cpu_s": processes, "by_pid": by_pid,
            "vanished": vanished, "client_cpu_s": clients,
            "harness_cpu_s": harness, "machine_busy_cores": machine_busy / wall,
            "foreign_cores": max(machine_busy - ours, 0.0) / wall,
            "load_average": os.getloadavg(),
        }


def measured_tree(cpu: Mapping[str, Any], root: int) -> set[str]:
    """The pids (as :class:`CpuMeter` keys them) of ``root`` and its descendants in a
    :class:`CpuMeter` result."""
    by_pid = cpu["by_pid"]
    tree, grew = {str(root)}, True
    while grew:
        grew = False
        for pid, entry in by_pid.items():
            if pid not in tree and str(entry["ppid"]) in tree:
                tree.add(pid)
                grew = True
    return tree


def own_cpu(cpu: Mapping[str, Any], root: int) -> dict[str, Any]:
    """A :class:`CpuMeter` result of several systems narrowed to the process tree of
    ``root`` (other processes' CPU, ``foreign_cores``, counts neither system)."""
    tree = measured_tree(cpu, root)
    by_pid = {pid: entry for pid, entry in cpu["by_pid"].items() if pid in tree}
    processes: dict[str, float] = {}
    for entry in by_pid.values():
        processes[entry["name"]] = processes.get(entry["name"], 0.0) + entry["cpu_s"]
    return {**cpu, "by_pid": by_pid, "system_cpu_s": processes}


def turn_order(systems: Sequence[T], run: int) -> list[T]:
    """Every other run in the reverse order: systems timed in turns, none always first."""
    return list(systems) if run % 2 == 0 else list(systems)[::-1]


def node_and_database(cpu: Mapping[str, Any], root: int) -> tuple[float, float]:
    """CPU seconds of a system under test started as process ``root``, from a
    :class:`CpuMeter` result: (node, database).  The node is ``root`` and the processes
    of its tree with its name (storescp's forks); the database is the rest of its tree
    (the archive's embedded FerretDB).  Orthanc (SQLite in-process), storescp and the
    bare pynetdicom SCP have no database process: 0.0."""
    by_pid = cpu["by_pid"]
    if str(root) not in by_pid:
        raise BenchmarkError(f"process {root} was not measured")
    tree = measured_tree(cpu, root)
    name = by_pid[str(root)]["name"]
    node = sum(by_pid[p]["cpu_s"] for p in tree if by_pid[p]["name"] == name)
    database = sum(by_pid[p]["cpu_s"] for p in tree if by_pid[p]["name"] != name)
    return node, database


def busy_cores(window: float = 2.0) -> float:
    """How many cores' worth of CPU the whole machine used over ``window`` seconds."""
    before = _machine_jiffies()[0]
    time.sleep(window)
    return (_machine_jiffies()[0] - before) / os.sysconf("SC_CLK_TCK") / window


def wait_for_quiet(max_busy_cores: float = 0.3, timeout: float = 600.0,
                   window: float = 2.0, quiet: bool = False) -> float:
    """Wait (up to ``timeout``) until other processes leave the machine nearly idle;
    returns the last load measured.  Benchmarks call it before each system."""
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        load = busy_cores(window)
        if load <= max_busy_cores or time.monotonic() >= deadline:
            if announced and not quiet:
                print(f"  machine load now {load:.2f} cores", file=sys.stderr)
            return load
        if not announced and not quiet:
            print(f"  waiting for the machine to quieten (busy {load:.2f} cores, other "
                  f"processes), up to {timeout:.0f} s", file=sys.stderr)
            announced = True


def _rusage_cpu(who: int) -> float:
    import resource

    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# --- DCMTK clients ---------------------------------------------------------------


@dataclass
class ToolRun:
    """One DCMTK client run: the command, its exit status, its output and wall time."""

    argv: list[str]
    returncode: int
    elapsed: float
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def lines(self, prefix: str = "") -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith(prefix)]

    def errors(self) -> list[str]:
        return self.lines("E:") + self.lines("F:")

    def describe(self, lines: int = 20) -> str:
        tail = "\n".join(self.output.splitlines()[-lines:])
        return f"$ {' '.join(self.argv)}\n(exit {self.returncode})\n{tail}"


def run_tool(argv: Sequence[str], timeout: float | None = None,
             cwd: str | Path | None = None) -> ToolRun:
    """Run a DCMTK tool with TCP_NODELAY=1; output is kept in a temporary file (not a
    pipe, so a chatty tool never blocks on a full pipe while being timed).

    The timeout is a timer that kills the tool, not ``subprocess.run(timeout=)``: that
    polls the child with sleeps growing to 50 ms, which rounded every time measured up
    to the next poll (C-FIND times came in steps of 50 ms on every system).
    """
    env = {**os.environ, "TCP_NODELAY": "1"}
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd)
        timer = threading.Timer(timeout, proc.kill) if timeout is not None else None
        if timer is not None:
            timer.start()
        try:
            code = proc.wait()  # waitpid: returns when the tool ends
        finally:
            if timer is not None:
                timer.cancel()
        elapsed = time.perf_counter() - started
        out.seek(0)
        output = out.read().decode("utf-8", errors="replace")
    if code == -9 and timeout is not None:
        output += f"\n(timed out after {timeout} s)"
    return ToolRun(list(argv), code, elapsed, output)


def echoscu(host: str, port: int, aec: str, aet: str = CLIENT_AET,
            timeout: float = 10) -> ToolRun:
    return run_tool(["echoscu", "-aet", aet, "-aec", aec, "-to", "5", host, str(port)],
                    timeout=timeout)


@dataclass
class StoreRun:
    """storescu: instances sent, and the responses by status."""

    run: ToolRun
    succeeded: int
    warnings: int
    failed: int

    @property
    def elapsed(self) -> float:
        return self.run.elapsed

    @property
    def ok(self) -> bool:
        return self.run.ok and self.failed == 0 and not self.run.errors()

    def check(self, expected: int | None = None) -> StoreRun:
        """Raise BenchmarkError unless every file was stored (``expected`` of them)."""
        if not self.ok or (expected is not None and self.succeeded + self.warnings != expected):
            raise BenchmarkError(
                f"storescu: {self.succeeded} succeeded, {self.warnings} warnings, "
                f"{self.failed} failed (expected {expected})\n{self.run.describe()}")
        return self


_STORE_RESPONSE = re.compile(r"Received Store Response(?: \(([^)]*)\))?")


def storescu(host: str, port: int, aec: str, paths: Iterable[str | Path],
             aet: str = CLIENT_AET, scan_directories: bool = True, recurse: bool = True,
             pattern: str | None = "*.dcm", required_only: bool = True,
             extra: Sequence[str] = (), timeout: float | None = None) -> StoreRun:
    """Send files or folders over ONE association (``storescu -v ...``).

    Verbose mode is used to count the responses: one line per instance, negligible
    beside the transfer.  ``pattern`` keeps other files (a corpus' manifest.json) out.
    """
    argv = ["storescu", "-v", "-aet", aet, "-aec", aec]
    if scan_directories:
        argv.append("+sd")
        if recurse:
            argv.append("+r")
        if pattern:
            argv += ["+sp", pattern]
    if required_only:
        argv.append("-R")
    argv += [*extra, host, str(port), *map(str, paths)]
    run = run_tool(argv, timeout=timeout)
    succeeded = warnings = failed = 0
    for line in run.lines("I: Received Store Response"):
        match = _STORE_RESPONSE.search(line)
        status = (match.group(1) or "") if match else ""
        if status == "Success":
            succeeded += 1
        elif status.startswith("Warning"):
            warnings += 1
        else:
            failed += 1
    failed += sum(1 for line in run.lines() if "Store Failed" in line or "Store SCU Failed" in line)
    return StoreRun(run, succeeded, warnings, failed)


@dataclass
class ParallelStoreRun:
    """Several storescu processes at once, one association each: wall time from the
    first start to the last exit, and each one's run."""

    runs: list[StoreRun]
    elapsed: float

    @property
    def ok(self) -> bool:
        return all(run.ok for run in self.runs)

    @property
    def succeeded(self) -> int:
        return sum(run.succeeded + run.warnings for run in self.runs)

    def check(self, expected: Sequence[int]) -> ParallelStoreRun:
        """Raise BenchmarkError unless storescu ``i`` stored ``expected[i]`` files."""
        for run, count in zip(self.runs, expected, strict=True):
            run.check(count)
        return self


def storescu_parallel(host: str, port: int, aec: str, parts: Sequence[Sequence[str | Path]],
                      **kwargs: Any) -> ParallelStoreRun:
    """:func:`storescu` of each part at once (one process and association per part)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(parts)) as pool:
        started = time.perf_counter()
        runs = list(pool.map(lambda paths: storescu(host, port, aec, paths, **kwargs), parts))
        elapsed = time.perf_counter() - started
    return ParallelStoreRun(runs, elapsed)


Keys = Mapping[str, str] | Sequence[str]


def key_arguments(keys: Keys) -> list[str]:
    """``{"PatientName": "SMITH*", "StudyDate": ""}`` (or ``["PatientName=SMITH*"]``,
    keywords or ``gggg,eeee``) as ``-k`` arguments; an empty value asks for the key."""
    items = [f"{k}={v}" for k, v in keys.items()] if isinstance(keys, Mapping) else list(keys)
    return [arg for item in items for arg in ("-k", item)]


_MODELS = {"patient": "-P", "study": "-S", "psonly": "-O", "worklist": "-W"}


@dataclass
class QueryRun:
    """findscu: the number of matches (pending responses) and the final status."""

    run: ToolRun
    answers: int
    status: str
    extract_dir: Path | None = None

    @property
    def elapsed(self) -> float:
        return self.run.elapsed

    @property
    def ok(self) -> bool:
        return self.run.ok and self.status == "Success" and not self.run.errors()

    def check(self, expected: int | None = None) -> QueryRun:
        if not self.ok or (expected is not None and self.answers != expected):
            raise BenchmarkError(f"findscu: {self.answers} answers, final status "
                                 f"{self.status!r} (expected {expected})\n{self.run.describe()}")
        return self

    def responses(self) -> list[Any]:
        """The matches as pydicom datasets (needs ``extract=True``)."""
        from pydicom import dcmread

        if self.extract_dir is None:
            raise BenchmarkError("findscu was run without extract=True")
        return [dcmread(p) for p in sorted(self.extract_dir.glob("rsp*.dcm"))]


_FINAL = re.compile(r"Received Final (?:Find|Move|Get) Response(?: \(([^)]*)\))?")


def _final_status(run: ToolRun) -> str:
    for line in reversed(run.lines()):
        match = _FINAL.search(line)
        if match:
            return (match.group(1) or "").strip()
    return ""


def findscu(host: str, port: int, aec: str, level: str, keys: Keys, model: str = "study",
            aet: str = CLIENT_AET, extract: bool = False, extra: Sequence[str] = (),
            timeout: float | None = None) -> QueryRun:
    """One C-FIND: ``findscu -v -S -k QueryRetrieveLevel=LEVEL -k ...``.

    Answers are counted from the verbose log (one ``Find Response`` line per pending
    response, no dataset dump: ``-sr``).  ``extract=True`` also writes them as files
    (``rsp0001.dcm``...) into a temporary folder, see :meth:`QueryRun.responses`.
    """
    argv = ["findscu", "-v", "-sr", "-aet", aet, "-aec", aec, _MODELS[model],
            "-k", f"QueryRetrieveLevel={level.upper()}", *key_arguments(keys)]
    extract_dir = None
    if extract:
        extract_dir = Path(tempfile.mkdtemp(prefix="findscu-", dir=_scratch()))
        argv += ["-X", "-od", str(extract_dir)]
    argv += [*extra, host, str(port)]
    run = run_tool(argv, timeout=timeout)
    answers = sum(1 for line in run.lines("I: Received Find Response")
                  if "Pending" in line)
    return QueryRun(run, answers, _final_status(run), extract_dir)


@dataclass
class RetrieveRun:
    """movescu/getscu: sub-operation counts from the final response, files received."""

    run: ToolRun
    status: str
    completed: int | None
    failed: int | None
    warning: int | None
    received: int
    output_dir: Path | None = None

    @property
    def elapsed(self) -> float:
        return self.run.elapsed

    @property
    def ok(self) -> bool:
        return (self.run.ok and self.status == "Success" and not self.failed
                and not self.run.errors())

    def check(self, expected: int | None = None) -> RetrieveRun:
        done = self.completed if self.completed is not None else self.received
        if not self.ok or (expected is not None and done != expected):
            raise BenchmarkError(
                f"{Path(self.run.argv[0]).name}: status {self.status!r}, completed "
                f"{self.completed}, failed {self.failed}, warning {self.warning}, received "
                f"{self.received} (expected {expected})\n{self.run.describe()}")
        return self


_SUBOPS = {name: re.compile(rf"{name.capitalize()} Suboperations\s*:\s*(\d+)")
           for name in ("completed", "failed", "warning")}
_DIMSE_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4}):?\s*(.*)")


def _final_counts(run: ToolRun) -> dict[str, int | None]:
    """Sub-operation counts of the final response (the last occurrence of each)."""
    counts: dict[str, int | None] = {}
    for name, pattern in _SUBOPS.items():
        found = pattern.findall(run.output)
        counts[name] = int(found[-1]) if found else None
    return counts


def _retrieve_status(run: ToolRun) -> str:
    """"Success", "Warning" or the failure text of the final C-MOVE/C-GET response."""
    found = _DIMSE_STATUS.findall(run.output)
    if found:  # debug mode: the last response's status
        code, text = found[-1]
        value = int(code, 16)
        if value == 0:
            return "Success"
        if value == 0xB000:
            return "Warning"
        if value not in (0xFF00, 0xFF01):
            return f"0x{code.upper()} {text.strip()}"
    errors = [line for line in run.lines() if "error status" in line
              or "DIMSE status is" in line or line.startswith(("E:", "F:"))]
    if errors:
        return errors[-1][3:].strip()
    finished = any(line.startswith("I: Received Final Move Response")
                   or line.startswith("I: Final status report") for line in run.lines())
    return "Success" if finished and run.ok else ""


def movescu(host: str, port: int, aec: str, level: str, keys: Keys, destination: str,
            model: str = "study", aet: str = CLIENT_AET, receive_port: int | None = None,
            output_dir: str | Path | None = None, ignore: bool = False, debug: bool = True,
            extra: Sequence[str] = (), timeout: float | None = None) -> RetrieveRun:
    """One C-MOVE to ``destination`` (``movescu -d ... -aem DEST``).

    Debug mode (``-d``, ~30 log lines per instance into a temporary file) is what makes
    movescu print the sub-operation counts; ``debug=False`` runs it with ``-v`` (the
    counts are then None and ``received`` is the only count).

    With ``receive_port`` movescu is its own storage SCP (``+P``, destination =
    ``aet``): files land in ``output_dir`` (or are discarded with ``ignore``), and
    ``received`` counts them.  Otherwise the destination is another node (e.g. a
    :class:`StoreSCP` the moving system knows) and ``received`` stays 0.  Beware that
    movescu as its own SCP sometimes adds ~1 s (it polls for the sub-association):
    for timings, prefer a :class:`StoreSCP` destination or :func:`getscu`.
    """
    argv = ["movescu", "-d" if debug else "-v", "-aet", aet, "-aec", aec, "-aem", destination,
            _MODELS[model], "-k", f"QueryRetrieveLevel={level.upper()}", *key_arguments(keys)]
    out = _prepare_output(output_dir, receive_port is not None and not ignore, "movescu-")
    if receive_port is not None:
        argv += ["+P", str(receive_port), "+xa"]
        argv += ["--ignore"] if ignore else ["-od", str(out)]
    argv += [*extra, host, str(port)]
    run = run_tool(argv, timeout=timeout)
    received = _received(run, out)
    return RetrieveRun(run, _retrieve_status(run), **_final_counts(run), received=received,
                       output_dir=out)


def getscu(host: str, port: int, aec: str, level: str, keys: Keys, model: str = "study",
           aet: str = CLIENT_AET, output_dir: str | Path | None = None, ignore: bool = False,
           extra: Sequence[str] = (), timeout: float | None = None) -> RetrieveRun:
    """One C-GET (``getscu -v``): instances come back on the same association; the
    final sub-operation counts are in getscu's verbose report."""
    argv = ["getscu", "-v", "-aet", aet, "-aec", aec, _MODELS[model],
            "-k", f"QueryRetrieveLevel={level.upper()}", *key_arguments(keys)]
    out = _prepare_output(output_dir, not ignore, "getscu-")
    argv += ["--ignore"] if ignore else ["-od", str(out)]
    argv += [*extra, host, str(port)]
    run = run_tool(argv, timeout=timeout)
    return RetrieveRun(run, _retrieve_status(run), **_final_counts(run),
                       received=_received(run, out), output_dir=out)


def _prepare_output(output_dir: str | Path | None, needed: bool, prefix: str) -> Path | None:
    if not needed:
        return None
    if output_dir is None:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=_scratch()))
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _received(run: ToolRun, out: Path | None) -> int:
    if out is not None:
        return sum(1 for p in out.iterdir() if p.is_file())
    # --ignore: count the C-STORE requests the tool answered
    return sum(1 for line in run.lines("I: Received") if "C-STORE Request" in line
               or "Store Request" in line)


def _scratch() -> Path:
    path = BENCH_DATA / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- reporting -------------------------------------------------------------------


def _version(argv: Sequence[str]) -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10,
                             check=False)
        return ((out.stdout or out.stderr).strip().splitlines() or [""])[0]
    return ""


def environment_info() -> dict[str, Any]:
    """What a result depends on: machine, versions, commit."""
    import pydicom
    import pymongo
    import pynetdicom

    commit = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = bool(_version(["git", "-C", str(REPO), "status", "--porcelain", "--",
                           "archive", "acl"]))
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip()
                    for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    return {
        "commit": commit + (" + uncommitted changes in archive/ or acl/" if dirty else ""),
        "cpus": os.cpu_count(), "cpu": cpu, "platform": platform.platform(),
        "python": platform.python_version(), "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__, "pymongo": pymongo.__version__,
        "dcmtk": _version(["storescu", "--version"]),
        "orthanc": _version([ORTHANC, "--version"]),
        "ferretdb": _version([str(FERRETDB), "--version"]),
        "ferretdb_build": _ferretdb_build(),
    }


def _ferretdb_build() -> str:
    """The build tag scripts/setup records (v1.24.2 plus patches) and the binary's hash."""
    import hashlib

    tag = ""
    with contextlib.suppress(OSError):
        tag = (FERRETDB.parent.parent / "ferretdb.build").read_text().strip()
    digest = ""
    with contextlib.suppress(OSError):
        digest = hashlib.sha256(FERRETDB.read_bytes()).hexdigest()[:12]
    return f"{tag or 'unknown'} sha256:{digest}"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table, numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in cells[1:]) for i in range(len(headers))]
    out = []
    for n, row in enumerate(cells):
        out.append("  ".join(c.rjust(w) if numeric[i] and n else c.ljust(w)
                             for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}"
    return "" if value is None else str(value)


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("x%"))
        return True
    except ValueError:
        return text == ""


def chosen_systems(parser: argparse.ArgumentParser, text: str,
                   known: Sequence[str]) -> list[str]:
    """The systems a ``--systems a,b,c`` option names, in its order; a usage error
    names those that are not in ``known``."""
    systems = [s.strip() for s in text.split(",") if s.strip()]
    unknown = set(systems) - set(known)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    return systems


def write_results(name: str, data: Mapping[str, Any]) -> Path:
    """``bench-data/results/NAME.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


@contextlib.contextmanager
def running(*services: Service) -> Iterator[tuple[Service, ...]]:
    """Start several services (in order) and stop them all (in reverse) on exit."""
    with contextlib.ExitStack() as stack:
        for service in services:
            stack.enter_context(service)
        yield services

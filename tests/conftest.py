"""Shared fixtures: a real FerretDB, archive nodes run as subprocesses, pydicom's files.

Fixtures (the API other suites rely on):

``ferretdb`` (session)       FerretDB on a free port, data in a temporary folder:
                             ``.uri``, ``.port``, ``.client``, ``.stop()``, ``.start()``.
``private_ferretdb``         the same, a server of the test's own (to stop it).
``mongo_db``                 a pymongo Database with a unique name on ``ferretdb``, dropped
                             afterwards.
``node_factory``             ``start(overrides=None, *, ferret=None, database=None)`` ->
                             :class:`RunningNode` (``python -m archive serve`` subprocess).
``module_node_factory``      the same with module scope, to share one node in a module.
``testdata_files``           pydicom's shipped files :meth:`Archive.parse` accepts.
``unstorable_files``         and those it refuses.
``certificate`` (session)    a self-signed server certificate for 127.0.0.1 and localhost
                             and its key (PEM files), made by the openssl command.

Helpers ``storescu(node, *files, extra_args=())`` and ``echoscu(node)`` live in
``helpers`` and are importable from here too.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal as signals
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import pymongo
import pytest
import yaml

# ``helpers`` sits beside this file, ``benchmarks`` (whose harness runs Orthanc for the
# peer tests) beside ``tests``: importable whatever pytest's import mode or layout.
_TESTS = str(Path(__file__).resolve().parent)
for _path in (_TESTS, str(Path(_TESTS).parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from helpers import (  # noqa: E402, F401 - re-exported for the other suites
    ROOT,
    StoreResult,
    association,
    consistency_problems,
    deep_merge,
    echoscu,
    free_port,
    port_open,
    storescu,
    wait_for,
)

#: The FerretDB the tests run. ARCHIVE_TEST_FERRETDB points them at another build, only to
#: check that a patch's test fails without the patch (see ferretdb/patches/).
FERRETDB_BINARY = Path(os.environ.get("ARCHIVE_TEST_FERRETDB")
                       or ROOT / ".tools" / "bin" / "ferretdb")


# --- FerretDB ----------------------------------------------------------------------


class FerretDB:
    """A FerretDB server (SQLite handler) on loopback, data kept in ``data_dir``."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.data_dir / "ferretdb.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._client: pymongo.MongoClient | None = None
        #: nodes using this server, stopped before it is closed
        self.nodes: list[RunningNode] = []

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    @property
    def client(self) -> pymongo.MongoClient:
        if self._client is None:
            self._client = pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=10_000,
                                               connectTimeoutMS=5_000)
        return self._client

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        binary = FERRETDB_BINARY if FERRETDB_BINARY.is_file() else (
            None if "ARCHIVE_TEST_FERRETDB" in os.environ else shutil.which("ferretdb"))
        if binary is None:
            pytest.fail(f"FerretDB not found at {FERRETDB_BINARY} nor on PATH: run ./scripts/setup")
        data = self.data_dir.resolve()
        return [str(binary), "--handler=sqlite", f"--sqlite-url=file:{data}/",
                f"--listen-addr=127.0.0.1:{self.port}", "--telemetry=disable",
                f"--state-dir={data}", "--log-level=warn", "--debug-addr=-"]

    def start(self, timeout: float = 20) -> FerretDB:
        if self.running:
            return self
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"FerretDB did not start on port {self.port}:\n"
                            f"{self.log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        while True:
            try:  # a restart: the client's pool may still hold the killed server's sockets
                self.client.admin.command("ping")
                return self
            except pymongo.errors.AutoReconnect:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self, timeout: float = 10, *, kill: bool = False) -> None:
        """Stop the server: SIGTERM (FerretDB then serves open connections for ~3 s
        more), or ``kill``: SIGKILL, the database gone at once, as in a crash."""
        if self.process is None or self.process.poll() is not None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        if self._client is not None:
            self._client.close()
            self._client = None
        self.stop()


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed server certificate for 127.0.0.1 and localhost, and its key (PEM)."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make the test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="session")
def ferretdb(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = FerretDB(tmp_path_factory.mktemp("ferretdb")).start()
    yield server
    server.close()


@pytest.fixture
def private_ferretdb(tmp_path: Path) -> Any:
    server = FerretDB(tmp_path / "private-ferretdb").start()
    yield server
    server.close()


def unique_name(prefix: str = "t") -> str:
    """A database name FerretDB accepts, unique in the session."""
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def _drop(ferret: FerretDB, name: str) -> None:
    if ferret.running:
        with contextlib.suppress(pymongo.errors.PyMongoError):
            ferret.client.drop_database(name)


@pytest.fixture
def mongo_db(ferretdb: FerretDB) -> Any:
    name = unique_name("db")
    yield ferretdb.client[name]
    _drop(ferretdb, name)


# --- the node as a subprocess ------------------------------------------------------


def node_environment() -> dict[str, str]:
    """The environment for ``python -m archive``: no ARCHIVE_* leaking from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHIVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def write_config(directory: Path, ferret: FerretDB, database: str,
                 overrides: dict[str, Any] | None = None, port: int | None = None) -> Path:
    """A node configuration for tests: external FerretDB, files under ``directory``.

    Access control is off unless ``overrides`` turns it on (``{"acl": {"enabled":
    True}}``); even then no initial rules are applied, so with no rules every request is
    refused (``{"acl": {"initial_rules": "config/acl.yaml"}}`` for the shipped ones).
    """
    directory.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "ae_title": "ARCHIVE",
        "bind_address": "127.0.0.1",
        "port": port or free_port(),
        "log_level": "INFO",
        "journal": str(directory / "journal"),
        "receive": {"folder": str(directory / "incoming")},
        "database": {"uri": ferret.uri, "name": database, "embedded": {"enabled": False}},
        "http": {"port": free_port()},  # DICOMweb (archive.web), never the default 8080
    }
    data["acl"] = {"enabled": False, "initial_rules": ""}
    deep_merge(data, overrides)
    path = directory / "archive.yaml"
    # the archive refuses YAML anchors and aliases: write repeated values out
    path.write_text(yaml.dump(data, Dumper=_NoAliases, sort_keys=False), encoding="utf-8")
    return path


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


class RunningNode:
    """``python -m archive serve --config FILE`` running in the background."""

    def __init__(self, directory: Path, config_path: Path, ferret: FerretDB) -> None:
        self.directory = directory
        self.config_path = config_path
        self.ferret = ferret
        self.config: dict[str, Any] = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        self.port: int = self.config["port"]
        http = self.config.get("http") or {}
        #: DICOMweb port (None: switched off)
        self.http_port: int | None = http.get("port") if http.get("enabled", True) else None
        self.ae_title: str = self.config["ae_title"]
        self.database: str = self.config["database"]["name"]
        self.journal = Path(self.config["journal"])
        #: where the node receives C-STORE datasets (archive.dimse.receiving)
        self.incoming = ROOT / self.config.get("receive", {}).get("folder", "data/incoming")
        self.log_path = directory / "node.log"
        self.process: subprocess.Popen[bytes] | None = None
        ferret.nodes.append(self)

    @property
    def http_url(self) -> str:
        """The DICOMweb base URL (archive.web)."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    @property
    def db(self) -> pymongo.database.Database:
        return self.ferret.client[self.database]

    def journal_pending(self) -> list[Path]:
        """Journal entries of unfinished stores (archive.journal: one file each)."""
        return sorted(self.journal.glob("*.json")) if self.journal.is_dir() else []

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") \
            if self.log_path.exists() else ""

    def launch(self, timeout: float = 30) -> RunningNode:
        seen = len(self.log())
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "archive", "serve", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=node_environment(),
                start_new_session=True)
        deadline = time.monotonic() + timeout
        opened: float | None = None
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"the node exited with status {self.process.returncode} "
                            f"before listening:\n{self.log()[-4000:]}")
            if opened is None and port_open(self.port):
                opened = time.monotonic()
            # The port accepting is not proof enough: another process may hold it (the
            # node then dies binding); the node says when it listens.
            if opened is not None and (" listening on " in self.log()[seen:]
                                       or time.monotonic() - opened > 2) \
                    and (self.http_port is None or port_open(self.http_port)):
                return self
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the node did not listen on {self.port} within {timeout:.0f} s:"
                            f"\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def stop(self, signal: int = signals.SIGTERM, timeout: float = 20) -> int:
        """Signal the node and wait for it; its exit status (negative: killed)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def restart(self) -> RunningNode:
        self.stop()
        return self.launch()


class NodeFactory:
    """Starts nodes in folders under ``base``; :meth:`close` stops them all."""

    def __init__(self, base: Path, default_ferret: FerretDB | None) -> None:
        self.base = base
        self.default_ferret = default_ferret
        self.nodes: list[tuple[RunningNode, bool]] = []
        self._counter = itertools.count(1)

    def __call__(self, overrides: dict[str, Any] | None = None, *,
                 ferret: FerretDB | None = None, database: str | None = None) -> RunningNode:
        return self.start(overrides, ferret=ferret, database=database)

    def start(self, overrides: dict[str, Any] | None = None, *, ferret: FerretDB | None = None,
              database: str | None = None) -> RunningNode:
        ferret = ferret or self.default_ferret
        if ferret is None:
            pytest.fail("node_factory needs a FerretDB")
        directory = self.base / f"node{next(self._counter)}"
        config_path = write_config(directory, ferret, database or unique_name("node"),
                                   overrides)
        node = RunningNode(directory, config_path, ferret)
        self.nodes.append((node, database is None))
        return node.launch()

    def close(self) -> None:
        for node, owned_database in reversed(self.nodes):
            node.stop(timeout=20)
            if owned_database:
                _drop(node.ferret, node.database)
        self.nodes.clear()


@pytest.fixture
def node_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """``start(overrides=None, *, ferret=None, database=None) -> RunningNode``.

    Uses the session ``ferretdb`` unless ``ferret`` is given (it is only started when
    needed, so tests on a ``private_ferretdb`` do not start the shared one).
    """
    factory = _LazyFactory(request, tmp_path / "nodes")
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_node_factory(request: pytest.FixtureRequest,
                        tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A module-scoped ``node_factory``: nodes shared by the tests of a module."""
    factory = _LazyFactory(request, tmp_path_factory.mktemp("module-nodes"))
    yield factory
    factory.close()


class _LazyFactory(NodeFactory):
    def __init__(self, request: pytest.FixtureRequest, base: Path) -> None:
        super().__init__(base, None)
        self.request = request

    def start(self, overrides: dict[str, Any] | None = None, *, ferret: FerretDB | None = None,
              database: str | None = None) -> RunningNode:
        if ferret is None and self.default_ferret is None:
            self.default_ferret = self.request.getfixturevalue("ferretdb")
        return super().start(overrides, ferret=ferret, database=database)


# --- pydicom's test files ----------------------------------------------------------


def _classify_testdata() -> tuple[list[Path], list[Path]]:
    from pydicom.data import get_testdata_file

    from archive.storage import Archive, StoreRefused

    folder = Path(get_testdata_file("CT_small.dcm")).parent
    storable, unstorable = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            try:
                Archive.parse(path.read_bytes())
            except StoreRefused:
                unstorable.append(path)
            else:
                storable.append(path)
    return storable, unstorable


@pytest.fixture(scope="session")
def _testdata() -> tuple[list[Path], list[Path]]:
    return _classify_testdata()


@pytest.fixture(scope="session")
def testdata_files(_testdata: tuple[list[Path], list[Path]]) -> list[Path]:
    """pydicom's shipped files that :meth:`archive.storage.Archive.parse` accepts."""
    return list(_testdata[0])


@pytest.fixture(scope="session")
def unstorable_files(_testdata: tuple[list[Path], list[Path]]) -> list[Path]:
    """pydicom's shipped files that :meth:`archive.storage.Archive.parse` refuses."""
    return list(_testdata[1])

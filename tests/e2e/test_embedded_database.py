"""The node on its embedded FerretDB: the database lives and dies with the node, what
holds the port is checked, a crashed FerretDB comes back, requests fail fast meanwhile.

Every test runs ``python -m archive serve`` with ``database.embedded.enabled`` on a data
folder and port of its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import FERRETDB_BINARY, FerretDB, RunningNode, node_environment, write_config
from helpers import (
    CT_IMAGE,
    ROOT,
    association,
    consistency_problems,
    free_port,
    identifier,
    port_open,
    settled_counters,
    wait_for,
    write_images,
)
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

pytestmark = [pytest.mark.ferretdb, pytest.mark.network,
              pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture
def database(tmp_path: Path) -> Any:
    """The embedded database's folder and port (the node starts the server); a client."""
    handle = FerretDB(tmp_path / "ferretdb")  # never started here: the node does it
    yield handle
    if handle._client is not None:
        handle._client.close()


def embedded(database: FerretDB, **settings: Any) -> dict[str, Any]:
    """Overrides making a node run ``database`` itself; access control as shipped, the
    test client (calling AE PYSCU) acting as admin."""
    return {
        "database": {"name": "archive", "embedded": {
            "enabled": True, "binary": str(FERRETDB_BINARY), "data_dir": str(database.data_dir),
            "port": database.port, **settings}},
        "acl": {"enabled": True, "initial_rules": "config/acl.yaml"},
        "auth": {"ae_principals": {"PYSCU": {"principal": "admin", "addresses": ["127.0.0.1"]}}},
    }


def pidfile(database: FerretDB) -> dict[str, Any]:
    return json.loads((database.data_dir / "ferretdb.pid").read_text())


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def images(tmp_path: Path, count: int) -> list[Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [dcmread(p) for p in write_images(tmp_path / "images", count)]


STORE_CONTEXTS = [(CT_IMAGE, ExplicitVRLittleEndian)]


def test_kill_9_of_the_node_takes_its_ferretdb_along(node_factory: Any, database: FerretDB,
                                                     tmp_path: Path) -> None:
    node = node_factory(embedded(database), ferret=database)
    ferretdb = pidfile(database)["pid"]
    assert running(ferretdb) and pidfile(database)["node_pid"] == node.pid
    with association(node, STORE_CONTEXTS) as assoc:
        assert assoc.send_c_store(images(tmp_path, 1)[0]).Status == 0x0000

    node.stop(signal.SIGKILL)

    wait_for(lambda: not running(ferretdb), 15, message=f"FerretDB pid {ferretdb} to exit")
    wait_for(lambda: not port_open(database.port), 5, message="the database port to close")
    node.launch()  # a clean start on the same data: nothing left to replace
    assert "left running" not in node.log()
    assert database.client.archive.instances.count_documents({}) == 1
    ferretdb = pidfile(database)["pid"]
    assert node.stop() == 0, node.log()[-4000:]  # a graceful stop takes it along too
    assert not running(ferretdb)
    assert not (database.data_dir / "ferretdb.pid").exists()


def test_the_embedded_ferretdb_collects_garbage_less_often(node_factory: Any,
                                                         database: FerretDB) -> None:
    """GOGC 400 (archive.ferretdb.GOGC): a fifth less FerretDB CPU per stored
    instance; a GOGC the site sets for the node is passed on instead."""
    node_factory(embedded(database), ferret=database)
    environ = Path(f"/proc/{pidfile(database)['pid']}/environ").read_bytes().split(b"\0")
    assert f"GOGC={os.environ.get('GOGC', '400')}".encode() in environ


def _cpus_of_threads(pid: int) -> set[frozenset[int]]:
    """The CPU sets the threads of ``pid`` may run on (one entry per distinct set)."""
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: nothing to separate")
def test_the_node_and_its_ferretdb_run_on_separate_cpus(node_factory: Any,
                                                        database: FerretDB) -> None:
    """``separate_cpus`` (on by default): every thread of the node on the lower half of
    the CPUs, FerretDB on the upper half; off: both anywhere, as the scheduler likes."""
    available = sorted(os.sched_getaffinity(0))
    half = len(available) // 2
    node = node_factory(embedded(database), ferret=database)
    ferretdb = pidfile(database)["pid"]
    assert _cpus_of_threads(node.pid) == {frozenset(available[:half])}
    assert _cpus_of_threads(ferretdb) == {frozenset(available[half:])}
    node.stop()
    node = node_factory(embedded(database, separate_cpus=False), ferret=database)
    assert _cpus_of_threads(node.pid) == {frozenset(available)}
    assert _cpus_of_threads(pidfile(database)["pid"]) == {frozenset(available)}


def test_ferretdb_starts_where_its_cpus_cannot_be_set(database: FerretDB) -> None:
    """A system that refuses the affinity (here: a CPU that does not exist) leaves
    FerretDB where the scheduler puts it, rather than failing the node's start."""
    from archive.config import EmbeddedDatabase
    from archive.ferretdb import EmbeddedFerretDB

    server = EmbeddedFerretDB(EmbeddedDatabase(binary=str(FERRETDB_BINARY),
                                               data_dir=str(database.data_dir),
                                               port=database.port))
    server.cpus = (os.sched_getaffinity(0), {4095})  # (this test process stays as it is)
    try:
        assert server.start() == f"mongodb://127.0.0.1:{database.port}/"
        assert port_open(database.port)
    finally:
        server.stop()


def test_an_orphan_ferretdb_on_the_port_is_replaced(node_factory: Any, database: FerretDB,
                                                    tmp_path: Path) -> None:
    from archive.ferretdb import Owner, Process, write_owner

    # What a node killed before it could stop its FerretDB leaves: FerretDB still serving
    # the data folder, the pidfile naming a node that is gone.
    orphan = FerretDB(database.data_dir, database.port).start()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    orphan_process = Process.of(orphan.process.pid)
    write_owner(database.data_dir / "ferretdb.pid", Owner(
        orphan_process.pid, orphan_process.started, int(gone.stdout), 0,
        str(database.data_dir.resolve()), database.port))
    orphan.client.archive.marker.insert_one({"_id": "kept"})
    orphan.client.close()
    orphan._client = None

    node = node_factory(embedded(database), ferret=database)

    assert orphan.process.wait(15) is not None  # stopped by the node
    assert (f"FerretDB pid {orphan_process.pid} on 127.0.0.1:{database.port}"
            in node.log()) and f"node pid {int(gone.stdout)}, which is gone" in node.log()
    replacement = pidfile(database)
    assert replacement["pid"] != orphan_process.pid and replacement["node_pid"] == node.pid
    assert database.client.archive.marker.find_one({"_id": "kept"}) is not None
    with association(node, STORE_CONTEXTS) as assoc:
        assert assoc.send_c_store(images(tmp_path, 1)[0]).Status == 0x0000


def test_something_else_on_the_port_is_a_one_line_error(database: FerretDB,
                                                        tmp_path: Path) -> None:
    config = write_config(tmp_path / "node", database, "archive", embedded(database))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", database.port))
        squatter.listen()
        result = subprocess.run(
            [sys.executable, "-m", "archive", "serve", "--config", str(config)],
            capture_output=True, text=True, cwd=ROOT, env=node_environment(), timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"archive: database.embedded.port {database.port}: "
                               f"127.0.0.1:{database.port} is held by pid {os.getpid()} (")
    assert f"not by a FerretDB of {database.data_dir.resolve()}" in lines[0]


def test_two_nodes_share_one_embedded_database(node_factory: Any, database: FerretDB,
                                               tmp_path: Path) -> None:
    first = node_factory(embedded(database, restart_delay_seconds=0.5), ferret=database)
    second = node_factory(embedded(database, restart_delay_seconds=0.5), ferret=database)
    assert (f"sharing the embedded database with node pid {first.pid}: FerretDB pid "
            f"{pidfile(database)['pid']}") in second.log()
    sent = images(tmp_path, 3)
    for node, ds in ((first, sent[0]), (second, sent[1])):
        with association(node, STORE_CONTEXTS) as assoc:
            assert assoc.send_c_store(ds).Status == 0x0000

    first.stop(signal.SIGKILL)  # its FerretDB goes with it: the second node starts its own

    wait_for(lambda: "FerretDB pid" in second.log() and " started on " in second.log(), 30,
             message="the second node to start a FerretDB")
    assert pidfile(database)["node_pid"] == second.pid
    available = sorted(os.sched_getaffinity(0))
    if len(available) > 1:  # the node that starts a FerretDB moves apart from it then
        assert _cpus_of_threads(second.pid) == {frozenset(available[:len(available) // 2])}
    with association(second, STORE_CONTEXTS) as assoc:
        status = wait_for(lambda: assoc.send_c_store(sent[2]).Status == 0x0000, 10,
                          interval=0.5, message="a store through the second node")
    assert status
    assert database.client.archive.instances.count_documents({}) == 3


def test_requests_fail_fast_while_ferretdb_is_down_and_it_comes_back(
        node_factory: Any, database: FerretDB, tmp_path: Path) -> None:
    overrides = embedded(database, restart_delay_seconds=3)
    overrides["destinations"] = {"STORESCP": {"host": "127.0.0.1", "port": free_port()}}
    node: RunningNode = node_factory(overrides, ferret=database)
    sent = images(tmp_path, 60)
    contexts = [*STORE_CONTEXTS,
                (StudyRootQueryRetrieveInformationModelFind, ExplicitVRLittleEndian),
                (StudyRootQueryRetrieveInformationModelMove, ExplicitVRLittleEndian)]
    study = identifier("STUDY", StudyInstanceUID=str(sent[0].StudyInstanceUID))
    outcomes: list[tuple[int, float]] = []
    with association(node, contexts) as assoc:
        for ds in sent[:2]:
            assert assoc.send_c_store(ds).Status == 0x0000
        killed = pidfile(database)["pid"]
        os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
        during = iter(sent[2:])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until a store succeeds: FerretDB is back
            started = time.monotonic()
            status = assoc.send_c_store(next(during)).Status
            outcomes.append((status, time.monotonic() - started))
            assert assoc.send_c_echo().Status == 0x0000
            if status == 0x0000:
                break
            if len(outcomes) == 1:  # a query and a retrieve, while it is down
                found = [s.Status for s, _ in assoc.send_c_find(
                    study, StudyRootQueryRetrieveInformationModelFind)]
                moved = [s.Status for s, _ in assoc.send_c_move(
                    study, "STORESCP", StudyRootQueryRetrieveInformationModelMove)]
            time.sleep(0.2)
        later = [assoc.send_c_store(next(during)).Status for _ in range(3)]

    failures = outcomes[:-1]
    assert outcomes[-1][0] == 0x0000, outcomes
    assert len(failures) >= 5, outcomes  # the outage lasted the 3 s restart delay
    assert {status for status, _ in failures} == {0xA700}
    assert max(seconds for _, seconds in failures) < 2.0, outcomes
    assert (found, moved) == ([0xA700], [0xA701])
    assert later == [0x0000] * 3
    assert pidfile(database)["pid"] != killed
    log = node.log()
    assert f"FerretDB pid {killed} was killed by SIGKILL: database unavailable, " \
           "restarting it in 3.0 s" in log
    assert log.count("database available again") == 1
    db = database.client.archive
    assert db.instances.count_documents({}) == 2 + 1 + 3
    assert consistency_problems(db) == []
    assert settled_counters(db) == []

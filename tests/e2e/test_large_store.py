"""Large instances over the network: received into a file, streamed into GridFS.

A 200 MiB instance (written once per session) is sent to a node subprocess, its dataset
bytes verbatim (pynetdicom, as ``raw_sending``): the node's peak resident memory stays
far below the instance's size (it took 600 MiB more before datasets were received to
disk), and the GridFS copy is the file it sent.  Moved to DCMTK's storescp, it costs the
node as little memory, and storescp receives the dataset bytes stored.  Refusals still
hold for a large file, and no received file outlives its store: not after success,
refusal, a connection that ends in the middle of a dataset, nor the death of the node.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import RunningNode
from helpers import (
    DCMTK_ENV,
    association,
    consistency_problems,
    free_port,
    port_open,
    raw_sending,
    split_part10,
    wait_for,
)
from hostile import SECONDARY_CAPTURE, a_associate_rq, c_store_rq, connect, read_pdu
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as STUDY_MOVE

from archive.gridstore import GridStore
from benchmarks.bench_large_store import RssPoller, reset_peak, status_kib
from benchmarks.corpus import write_large_instance

pytestmark = [pytest.mark.network, pytest.mark.ferretdb,
              pytest.mark.filterwarnings("ignore::UserWarning")]

MIB = 1024 * 1024
#: The node's peak resident memory during the store may exceed its size before by this
#: much at most: well under the instance's 200 MiB (measured: 5 MiB; before: 604 MiB).
BOUND = 120 * MIB


@pytest.fixture(scope="session")
def large_instance(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 MiB of 16-bit pixels, explicit VR little endian."""
    return write_large_instance(tmp_path_factory.mktemp("large") / "large.dcm", 200 * MIB)


def uids(path: Path) -> tuple[str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID)


def send(node: RunningNode, path: Path) -> Any:
    """C-STORE the file's dataset bytes verbatim; the response."""
    sop_class, _ = uids(path)
    with raw_sending(), association(node, [(sop_class, ExplicitVRLittleEndian)]) as assoc:
        assoc.dimse_timeout = 300  # the node answers once the whole file is in GridFS
        return assoc.send_c_store(path)


def digest(chunks: Any) -> tuple[bytes, str]:
    """(preamble and meta group, SHA-256 of the dataset bytes) of a Part-10 stream whose
    first chunk holds the meta group."""
    head, rest = split_part10(next(chunks))
    sha = hashlib.sha256(rest)
    for chunk in chunks:
        sha.update(chunk)
    return head, sha.hexdigest()


def file_chunks(path: Path) -> Any:
    with open(path, "rb") as fh:
        while chunk := fh.read(MIB):
            yield chunk


def received_files(node: RunningNode) -> list[str]:
    return sorted(p.name for p in node.incoming.glob("*")) if node.incoming.is_dir() else []


def received_bytes(node: RunningNode) -> int:
    """Bytes in the node's received files (one being written, here)."""
    total = 0
    for path in node.incoming.glob("recv-*"):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def counts(node: RunningNode) -> tuple[int, int, int]:
    db = node.db
    return (db.instances.count_documents({}), db["fs.files"].count_documents({}),
            db["fs.chunks"].count_documents({}))


@dataclass
class StoredLarge:
    """A node that received the large instance, and what that cost its memory."""

    node: RunningNode
    destination_port: int
    status: int
    before: int
    peak: int


@pytest.fixture(scope="module")
def stored_large(module_node_factory: Any, large_instance: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> StoredLarge:
    """The large instance stored once, its cost measured; the move test reuses it."""
    port = free_port()
    node = module_node_factory.start(
        {"destinations": {"BIGSCP": {"host": "127.0.0.1", "port": port}}})
    pid = node.pid
    assert pid is not None
    warm = write_large_instance(tmp_path_factory.mktemp("warm") / "warm.dcm", MIB)
    assert send(node, warm).Status == 0x0000  # what a first store loads
    time.sleep(0.5)  # the batched level updates written
    before = status_kib(pid, "VmRSS") * 1024
    peak_reset = reset_peak(pid)
    with RssPoller(pid) as poller:
        response = send(node, large_instance)
    peak = (status_kib(pid, "VmHWM") if peak_reset else poller.peak_kib) * 1024
    return StoredLarge(node, port, int(response.Status), before, peak)


def test_a_200_mib_instance_costs_the_node_far_less_memory_than_its_size(
        stored_large: StoredLarge, large_instance: Path, record_property: Any) -> None:
    node, before, peak = stored_large.node, stored_large.before, stored_large.peak
    record_property("node_rss_before_mib", round(before / MIB, 1))
    record_property("node_peak_mib", round(peak / MIB, 1))
    assert stored_large.status == 0x0000
    assert peak - before < BOUND, f"peak {peak / MIB:.0f} MiB, {before / MIB:.0f} before"
    sop_class, sop_instance = uids(large_instance)
    doc = node.db.instances.find_one({"_id": sop_instance}, {"file_id": 1, "size": 1})
    head, stored = digest(iter(GridStore(node.db).stream(doc["file_id"])))
    sent_head, sent = digest(file_chunks(large_instance))
    assert stored == sent  # the dataset bytes as sent
    # before them, the meta group pynetdicom builds for a received dataset, as before
    meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                            transfer_syntax=ExplicitVRLittleEndian)
    assert head == b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    assert doc["size"] == large_instance.stat().st_size - len(sent_head) + len(head)
    assert received_files(node) == []
    assert consistency_problems(node.db) == []


def test_a_200_mib_instance_moved_costs_the_node_far_less_memory_than_its_size(
        stored_large: StoredLarge, large_instance: Path, tmp_path: Path,
        record_property: Any) -> None:
    """The dataset is read from its spooled file as its PDUs are sent, a few ahead: not
    queued whole for the DUL thread, as pynetdicom's own send does."""
    node, port = stored_large.node, stored_large.destination_port
    pid = node.pid
    assert pid is not None and stored_large.status == 0x0000
    out = tmp_path / "received"
    out.mkdir()
    scp = subprocess.Popen(["storescp", "+B", "+uf", "-aet", "BIGSCP", "-od", str(out),
                            str(port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), 10, 0.02, "storescp to listen")
        before = status_kib(pid, "VmRSS") * 1024
        peak_reset = reset_peak(pid)
        identifier = dcmread(large_instance, stop_before_pixels=True)
        request = Dataset()
        request.QueryRetrieveLevel = "STUDY"
        request.StudyInstanceUID = identifier.StudyInstanceUID
        with RssPoller(pid) as poller, association(node, [(STUDY_MOVE, ExplicitVRLittleEndian)]) \
                as assoc:
            assoc.dimse_timeout = 300
            statuses = [int(status.Status) for status, _ in
                        assoc.send_c_move(request, "BIGSCP", STUDY_MOVE)]
        peak = (status_kib(pid, "VmHWM") if peak_reset else poller.peak_kib) * 1024
    finally:
        scp.terminate()
        scp.wait(10)
    record_property("node_rss_before_mib", round(before / MIB, 1))
    record_property("node_peak_mib", round(peak / MIB, 1))
    assert statuses == [0x0000]
    assert peak - before < BOUND, f"peak {peak / MIB:.0f} MiB, {before / MIB:.0f} before"
    (received,) = out.iterdir()
    assert digest(file_chunks(received))[1] == digest(file_chunks(large_instance))[1]


def test_its_pixel_data_as_dicomweb_bulk_data_costs_the_node_far_less_memory_than_its_size(
        stored_large: StoredLarge, large_instance: Path) -> None:
    """WADO-RS bulk data of a 200 MiB Pixel Data value: sent as it is read from GridFS,
    a megabyte at a time, never held whole; the bytes are the stored value."""
    node = stored_large.node
    pid = node.pid
    assert pid is not None and stored_large.status == 0x0000
    ds = dcmread(large_instance, defer_size=1024)
    raw = ds.get_item("PixelData", keep_deferred=True)
    with open(large_instance, "rb") as fh:
        fh.seek(raw.value_tell)
        expected = hashlib.sha256()
        left = raw.length
        while left:
            chunk = fh.read(min(MIB, left))
            expected.update(chunk)
            left -= len(chunk)
    url = (f"{node.http_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
           f"/instances/{ds.SOPInstanceUID}/bulkdata/7FE00010")
    before = status_kib(pid, "VmRSS") * 1024
    peak_reset = reset_peak(pid)
    received, head, tail = hashlib.sha256(), b"", b""
    size = 0
    with RssPoller(pid) as poller, requests.get(url, stream=True, timeout=300) as answer:
        assert answer.status_code == 200, answer.text
        closing = f"\r\n--{answer.headers['content-type'].split('boundary=')[1]}--\r\n"
        for chunk in answer.iter_content(MIB):
            if not head:  # the part's headers, then the value
                head, chunk = chunk.split(b"\r\n\r\n", 1)
            data = tail + chunk  # the closing delimiter is not the value's
            tail = data[-len(closing):]
            received.update(data[:-len(closing)])
            size += len(data) - len(tail)
    peak = (status_kib(pid, "VmHWM") if peak_reset else poller.peak_kib) * 1024
    assert tail == closing.encode()
    assert (size, received.hexdigest()) == (raw.length, expected.hexdigest())
    assert peak - before < BOUND, f"peak {peak / MIB:.0f} MiB, {before / MIB:.0f} before"


def test_a_large_instance_cut_in_its_pixel_data_is_refused(node_factory: Any,
                                                           tmp_path: Path) -> None:
    node = node_factory()  # 4 MiB: above receive.in_memory_max_mb, stored from its file
    path = write_large_instance(tmp_path / "cut.dcm", 4 * MIB)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 1000)
    response = send(node, path)
    assert response.Status == 0xC000
    assert response.ErrorComment.startswith("truncated: (7FE0,0010) needs")
    assert counts(node) == (0, 0, 0)
    assert received_files(node) == []
    assert "Traceback" not in node.log()


@pytest.mark.parametrize("ending", ["closed", "aborted"])
def test_a_connection_that_ends_in_a_dataset_leaves_no_file(node_factory: Any,
                                                            ending: str) -> None:
    node = node_factory()
    sock = connect(node.port, "127.0.0.1")
    try:
        sock.sendall(a_associate_rq(contexts=(SECONDARY_CAPTURE,)))
        assert read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
        pdus = c_store_rq(dataset_size=2 * MIB, context_id=1)  # 16 KiB PDUs
        sock.sendall(b"".join(pdus[:100]))  # the command and 1.6 MiB of the dataset
        wait_for(lambda: received_files(node), 10, message="the dataset's file")
        if ending == "aborted":
            sock.sendall(struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0, 0))  # A-ABORT
    finally:
        sock.close()
    wait_for(lambda: not received_files(node), 10, message="the file deleted")
    # the line follows the unlink: a loaded machine may read the log in between
    wait_for(lambda: "partly received dataset deleted" in node.log(), 10,
             message="the line saying so")
    assert counts(node) == (0, 0, 0)


def test_what_a_node_killed_while_receiving_left_is_deleted_at_start(
        node_factory: Any, large_instance: Path) -> None:
    node = node_factory()
    outcome: list[Any] = []

    def sender() -> None:
        try:
            outcome.append(send(node, large_instance).Status)
        except Exception as exc:  # noqa: BLE001 - the association dies with the node
            outcome.append(exc)

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    wait_for(lambda: received_bytes(node) > 10 * MIB, 60, interval=0.05,
             message="10 MiB received")
    assert node.stop(signal.SIGKILL) == -signal.SIGKILL
    thread.join(60)
    left = received_files(node)
    assert len(left) == 1 and left[0].startswith(f"recv-{node.pid}-"), left

    node.launch()

    assert received_files(node) == []
    assert "removed 1 partly received datasets" in node.log()
    assert outcome and outcome[0] != 0x0000
    assert counts(node) == (0, 0, 0)

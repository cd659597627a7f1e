"""``archive.dimse.receiving``: where C-STORE datasets arrive, and that none is left behind."""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import warnings
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import _config, dimse_messages
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from archive.dimse.receiving import Receiver, Spool, meta_group

LIMIT = 1000


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Receiver:
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)
    for name in ("NamedTemporaryFile", "create_file_meta", "write_file_meta_info"):
        monkeypatch.setattr(dimse_messages, name, getattr(dimse_messages, name))
    receiver = Receiver(tmp_path / "incoming", in_memory_max_bytes=LIMIT)
    receiver.prepare()
    receiver.install()
    return receiver


def dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)


def test_start_removes_what_dead_nodes_left_and_nothing_else(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    dead, alive = dead_pid(), os.getppid()
    left = [folder / f"recv-{dead}-abc123.dcm", folder / f"recv-{os.getpid()}-x.dcm"]
    kept = [folder / f"recv-{alive}-def456.dcm",  # another node still receiving
            folder / "notes.txt", folder / "recv-abc.dcm", folder / f"recv-{dead}-x.dcm.bak"]
    for path in left + kept:
        path.write_bytes(b"partial")

    assert Receiver(folder, LIMIT).prepare() == len(left)

    assert sorted(folder.iterdir()) == sorted(kept)


def test_start_creates_the_folder(tmp_path: Path) -> None:
    receiver = Receiver(tmp_path / "a" / "incoming", LIMIT)
    assert receiver.prepare() == 0
    assert receiver.folder.is_dir()


def receive(size: int, sop_class: str = "1.2.840.10008.5.1.4.1.1.7",
            sop_instance: str = "1.2.3.4", syntax: str = ExplicitVRLittleEndian
            ) -> tuple[Any, Any]:
    """A C-STORE-RQ of a ``size``-byte dataset through pynetdicom's DIMSE decoding, as
    the node receives it (16 KiB PDUs); the request primitive and an event for it."""
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = 2
    request.DataSet = BytesIO(os.urandom(size))
    outgoing = C_STORE_RQ()
    outgoing.primitive_to_message(request)
    assoc = SimpleNamespace(_accepted_cx={1: SimpleNamespace(transfer_syntax=[syntax])})
    message = DIMSEMessage()
    for primitive in outgoing.encode_msg(1, 16382):
        message.decode_msg(primitive, assoc)
    received = message.message_to_primitive()
    event = SimpleNamespace(request=received, dataset_path=received._dataset_path)
    return received, event


def part10(request: Any, dataset: bytes, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """What ``event.encoded_dataset(include_meta=True)`` gave before."""
    meta = create_file_meta(sop_class_uid=request.AffectedSOPClassUID,
                            sop_instance_uid=request.AffectedSOPInstanceUID,
                            transfer_syntax=syntax)
    return b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + dataset


def test_a_small_dataset_is_received_in_memory_no_file_made(receiver: Receiver) -> None:
    _, event = receive(200)
    received = receiver.dataset(event)
    assert isinstance(received, bytes)
    assert received[128:132] == b"DICM" and len(received) <= LIMIT
    assert list(receiver.folder.iterdir()) == []


def test_a_large_dataset_is_received_into_a_file_of_the_folder(receiver: Receiver) -> None:
    request, event = receive(50_000)
    received = receiver.dataset(event)
    assert isinstance(received, Path)
    assert received.parent == receiver.folder
    assert received.name.startswith(f"recv-{os.getpid()}-") and received.suffix == ".dcm"
    assert received.stat().st_size > LIMIT
    # what pynetdicom does after the handler: close, delete
    request._dataset_file.close()
    os.unlink(request._dataset_file.name)
    assert list(receiver.folder.iterdir()) == []


def test_both_hold_the_bytes_encoded_dataset_gave(receiver: Receiver) -> None:
    for size in (100, 50_000):
        request, event = receive(size)
        received = receiver.dataset(event)
        data = received if isinstance(received, bytes) else received.read_bytes()
        head = data[:len(data) - size]
        assert data == part10(request, data[len(head):])
        request._dataset_file.close()


#: UIDs as senders write them: digits and dots of any length up to 64 (odd lengths are
#: padded), and a few that are no UID at all (pydicom encodes those itself).
uids = st.one_of(st.from_regex(r"[0-9][0-9.]{0,63}", fullmatch=True),
                 st.sampled_from(["1.2.840.10008.1.2.1", "1.2.3 ", "ÿ.1", "1.2.x"]))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sop_class=uids, sop_instance=uids, syntax=uids)
def test_the_meta_group_of_a_received_dataset_is_pydicoms_byte_for_byte(
        receiver: Receiver, sop_class: str, sop_instance: str, syntax: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of invalid UIDs, and writes them
        request, event = receive(100, sop_class, sop_instance, syntax)
        expected = part10(request, b"", syntax)
    received = receiver.dataset(event)
    assert isinstance(received, bytes)
    assert received[:len(expected)] == expected
    if all(re.fullmatch(r"[0-9.]+", uid) for uid in (sop_class, sop_instance, syntax)):
        assert meta_group(sop_class, sop_instance, syntax) is not None  # not pydicom's


def test_a_spool_pynetdicom_drops_without_deleting_its_file_is_deleted(
        receiver: Receiver) -> None:
    spool = dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
    assert isinstance(spool, Spool)
    spool.write(b"x" * (LIMIT + 1))  # spilled to its file
    path = Path(spool.name)
    assert path.exists()
    del spool  # an association ended: the DIMSE message and its spool are dropped
    gc.collect()
    assert not path.exists()


def test_a_spool_is_memory_up_to_the_limit_then_its_file() -> None:
    spool = Spool(Path("/nonexistent-folder"), 10)
    assert spool.write(b"0123456789") == 10
    spool.file.flush()
    assert spool.in_memory() == b"0123456789"
    with pytest.raises(FileNotFoundError):  # the 11th byte goes to the file
        spool.write(b"a")


def test_a_limit_of_zero_receives_everything_into_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 0)
    spool.write(b"\x00" * 128)
    spool.close()
    assert spool.in_memory() is None
    assert Path(spool.name).read_bytes() == b"\x00" * 128


def event_closing(message: Any = None) -> Any:
    return SimpleNamespace(assoc=SimpleNamespace(dimse=SimpleNamespace(message=message)))


def test_a_connection_closed_during_a_dataset_deletes_its_file(receiver: Receiver) -> None:
    spool = dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
    spool.write(b"half a dataset" * 100)
    path = Path(spool.name)
    assert path.exists()
    receiver.discard_partial(event_closing(SimpleNamespace(_data_set_file=spool)))
    assert spool.closed and not path.exists()
    receiver.discard_partial(event_closing(None))  # between messages: nothing to do
    receiver.discard_partial(event_closing(SimpleNamespace(_data_set_file=None)))

"""``archive.receiving``: where C-STORE datasets arrive, and that none is left behind."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom import _config, dimse_messages

from archive.receiving import Receiver


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Receiver:
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)
    monkeypatch.setattr(dimse_messages, "NamedTemporaryFile",
                        dimse_messages.NamedTemporaryFile)
    return Receiver(tmp_path / "incoming", in_memory_max_bytes=100)


def dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)


def test_start_removes_what_dead_nodes_left_and_nothing_else(receiver: Receiver) -> None:
    folder = receiver.folder
    folder.mkdir(parents=True)
    dead, alive = dead_pid(), os.getppid()
    left = [folder / f"recv-{dead}-abc123.dcm", folder / f"recv-{os.getpid()}-x.dcm"]
    kept = [folder / f"recv-{alive}-def456.dcm",  # another node still receiving
            folder / "notes.txt", folder / "recv-abc.dcm", folder / f"recv-{dead}-x.dcm.bak"]
    for path in left + kept:
        path.write_bytes(b"partial")

    assert receiver.prepare() == len(left)

    assert sorted(folder.iterdir()) == sorted(kept)


def test_start_creates_the_folder(receiver: Receiver) -> None:
    assert receiver.prepare() == 0
    assert receiver.folder.is_dir()


def test_pynetdicom_receives_into_the_folder_under_the_nodes_name(receiver: Receiver) -> None:
    receiver.prepare()
    receiver.install()
    assert _config.STORE_RECV_CHUNKED_DATASET is True
    # what pynetdicom's DIMSE decoder calls for a C-STORE-RQ with a dataset
    handle = dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
    path = Path(handle.name)
    assert path.parent == receiver.folder
    assert path.name.startswith(f"recv-{os.getpid()}-") and path.suffix == ".dcm"
    handle.write(b"DICM")
    handle.close()
    os.unlink(handle.name)  # what pynetdicom does after the handler
    del handle
    gc.collect()
    assert list(receiver.folder.iterdir()) == []


def test_a_file_pynetdicom_drops_without_deleting_it_is_deleted(receiver: Receiver) -> None:
    receiver.prepare()
    receiver.install()
    handle = dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
    handle.write(b"half a dataset")
    path = Path(handle.name)
    del handle  # an association ended: the DIMSE message and its file are dropped
    gc.collect()
    assert not path.exists()


def event(path: Path | None = None, message: Any = None) -> Any:
    return SimpleNamespace(dataset_path=path,
                           assoc=SimpleNamespace(dimse=SimpleNamespace(message=message)))


@pytest.mark.parametrize("size,in_memory", [(0, True), (100, True), (101, False)])
def test_small_datasets_are_stored_from_memory_large_ones_from_their_file(
        receiver: Receiver, tmp_path: Path, size: int, in_memory: bool) -> None:
    path = tmp_path / "received.dcm"
    path.write_bytes(b"x" * size)
    got = receiver.dataset(event(path))
    assert got == (path.read_bytes() if in_memory else path)


def test_a_connection_closed_during_a_dataset_deletes_its_file(receiver: Receiver) -> None:
    receiver.prepare()
    receiver.install()
    handle = dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
    handle.write(b"half a dataset")
    path = Path(handle.name)
    receiver.discard_partial(event(message=SimpleNamespace(_data_set_file=handle)))
    assert handle.closed and not path.exists()
    receiver.discard_partial(event(message=None))  # between messages: nothing to do
    receiver.discard_partial(event(message=SimpleNamespace(_data_set_file=None)))

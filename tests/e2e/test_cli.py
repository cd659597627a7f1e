"""``python -m archive import | stats`` and configuration errors, as subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import FerretDB, node_environment, unique_name, write_config
from helpers import ROOT, free_port, make_dataset, to_part10, write_images
from pydicom import dcmread
from pydicom.data import get_testdata_file

from archive.gridstore import GridStore

pytestmark = [pytest.mark.ferretdb, pytest.mark.filterwarnings("ignore::UserWarning")]

SUMMARY = "stored {}, skipped {}, failed {}"


def archive(config: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "archive", "--config", str(config), *args],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**node_environment(), **(env or {})}, timeout=timeout)


@pytest.fixture
def cli_config(ferretdb: FerretDB, tmp_path: Path) -> Any:
    name = unique_name("cli")
    path = write_config(tmp_path / "cli", ferretdb, name)
    yield path, ferretdb.client[name]
    ferretdb.client.drop_database(name)


@pytest.fixture
def import_tree(tmp_path: Path) -> dict[str, Any]:
    """A folder to import: Part-10 files (one in a sub-folder), a bare dataset, and
    files the import must skip, each for its own reason."""
    root = tmp_path / "incoming"
    images = write_images(root / "series", 3)
    nested = root / "deeper" / "still"
    nested.mkdir(parents=True)
    ct = nested / "CT_small.dcm"
    shutil.copyfile(get_testdata_file("CT_small.dcm"), ct)
    mr = root / "MR_small_bigendian.dcm"
    shutil.copyfile(get_testdata_file("MR_small_bigendian.dcm"), mr)
    bare = root / "rtstruct-without-meta.dcm"
    shutil.copyfile(get_testdata_file("rtstruct.dcm"), bare)
    text = root / "README.txt"
    text.write_text("not an image\n")
    empty = root / "empty.dcm"
    empty.write_bytes(b"")
    no_uid_ds = make_dataset()
    del no_uid_ds.SOPInstanceUID
    no_uid = root / "no-sop-instance-uid.dcm"
    no_uid.write_bytes(to_part10(no_uid_ds))
    no_study_ds = make_dataset()
    del no_study_ds.StudyInstanceUID
    no_study = root / "no-study.dcm"
    no_study.write_bytes(to_part10(no_study_ds))
    return {"root": root, "stored": [*images, ct, mr], "bare": bare,
            "skipped": {text: "not a DICOM", empty: "not a DICOM",
                        no_uid: "SOP Instance UID", no_study: "StudyInstanceUID"}}


def test_import_a_folder(cli_config: tuple[Path, Any], import_tree: dict[str, Any]) -> None:
    config, db = cli_config

    result = archive(config, "import", str(import_tree["root"]))

    stored = len(import_tree["stored"]) + 1  # and the bare dataset
    skipped = import_tree["skipped"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == SUMMARY.format(stored, len(skipped), 0)
    for path, reason in skipped.items():
        lines = [line for line in result.stdout.splitlines()
                 if line.startswith(f"skipped {path}: ")]
        assert len(lines) == 1, result.stdout
        assert reason in lines[0]
    assert "100%" in result.stderr  # the progress bar reached the end
    assert f"{stored + len(skipped)}/{stored + len(skipped)}" in result.stderr

    assert db.instances.count_documents({}) == stored
    files = GridStore(db)
    for path in import_tree["stored"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        doc = db.instances.find_one({"_id": uid})
        assert doc is not None, path.name
        assert doc["source"] == "import"
        assert files.read(doc["file_id"]) == path.read_bytes(), path.name


def test_import_wraps_a_bare_dataset_in_a_part10_file(cli_config: tuple[Path, Any],
                                                      import_tree: dict[str, Any]) -> None:
    config, db = cli_config
    bare = import_tree["bare"]
    result = archive(config, "import", "--quiet", str(bare))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == SUMMARY.format(1, 0, 0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = dcmread(bare, force=True)
        doc = db.instances.find_one({"_id": str(original.SOPInstanceUID)})
        stored = GridStore(db).read(doc["file_id"])
        wrapped = dcmread(_io(stored))
    assert stored[128:132] == b"DICM"
    assert wrapped.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert wrapped.file_meta.TransferSyntaxUID == doc["TransferSyntaxUID"]
    assert wrapped.StructureSetLabel == original.StructureSetLabel
    assert len(wrapped.ROIContourSequence) == len(original.ROIContourSequence)
    assert doc["dataset"]["30060020"]["vr"] == "SQ"  # Structure Set ROI Sequence


def _io(data: bytes) -> Any:
    from io import BytesIO

    return BytesIO(data)


def test_quiet_import_has_no_progress_bar_but_still_explains_skips(
        cli_config: tuple[Path, Any], import_tree: dict[str, Any]) -> None:
    config, _ = cli_config
    result = archive(config, "import", "--quiet", str(import_tree["root"]))
    assert result.returncode == 0, result.stderr
    assert "%|" not in result.stderr
    assert sum(line.startswith("skipped ") for line in result.stdout.splitlines()) == \
        len(import_tree["skipped"])


def test_import_names_files_it_cannot_read(cli_config: tuple[Path, Any],
                                           tmp_path: Path) -> None:
    config, db = cli_config
    missing = tmp_path / "gone.dcm"
    result = archive(config, "import", "--quiet", str(missing))
    assert result.returncode == 0, result.stderr
    assert f"skipped {missing}: cannot read" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == SUMMARY.format(0, 1, 0)
    assert db.instances.count_documents({}) == 0


def test_import_counts_failures_and_exits_1(ferretdb: FerretDB, tmp_path: Path) -> None:
    name = unique_name("cli")
    config = write_config(tmp_path / "cli", ferretdb, name, {"duplicate_policy": "reject"})
    images = write_images(tmp_path / "images", 3)
    try:
        first = archive(config, "import", "--quiet", str(images[0]))
        assert first.returncode == 0, first.stderr
        second = archive(config, "import", "--quiet", str(tmp_path / "images"))
        assert second.returncode == 1, second.stderr
        assert second.stdout.strip().splitlines()[-1] == SUMMARY.format(2, 0, 1)
        assert f"failed {images[0]}: 0x0111" in second.stdout
        assert ferretdb.client[name].instances.count_documents({}) == 3
    finally:
        ferretdb.client.drop_database(name)


def test_stats_prints_the_counts(cli_config: tuple[Path, Any], tmp_path: Path) -> None:
    config, db = cli_config
    write_images(tmp_path / "a", 3, patient_id="P-A")
    write_images(tmp_path / "b", 2, patient_id="P-B", modality="MR",
                 sop_class="1.2.840.10008.5.1.4.1.1.4")
    shutil.copyfile(get_testdata_file("CT_small.dcm"), tmp_path / "a" / "ct.dcm")
    assert archive(config, "import", "--quiet", str(tmp_path / "a"),
                   str(tmp_path / "b")).returncode == 0

    text = archive(config, "stats")
    as_json = archive(config, "stats", "--json")

    assert text.returncode == 0, text.stderr
    lines = {line.split()[0]: line.split()[1] for line in text.stdout.splitlines()
             if line.strip() and len(line.split()) == 2 and not line.startswith(" ")}
    assert lines == {"patients": "3", "studies": "3", "series": "3", "instances": "6"}
    assert "instances per modality:" in text.stdout
    modality_lines = {tuple(line.split()) for line in text.stdout.splitlines()
                      if line.startswith("  ")}
    assert ("CT", "4") in modality_lines
    assert ("MR", "2") in modality_lines
    assert ("1.2.840.10008.5.1.4.1.1.2", "4") in modality_lines

    assert as_json.returncode == 0, as_json.stderr
    stats = json.loads(as_json.stdout)
    assert {k: stats[k] for k in ("patients", "studies", "series", "instances")} == \
        {"patients": 3, "studies": 3, "series": 3, "instances": 6}
    assert stats["modalities"] == {"CT": 4, "MR": 2}
    assert db.instances.count_documents({}) == stats["instances"]


def test_stats_of_an_empty_archive(cli_config: tuple[Path, Any]) -> None:
    config, _ = cli_config
    result = archive(config, "stats", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"patients": 0, "studies": 0, "series": 0,
                                         "instances": 0, "modalities": {}, "sop_classes": {}}


@pytest.mark.parametrize("command", ["stats", "import", "serve"])
def test_configuration_error_exits_2_naming_the_key(tmp_path: Path, command: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("port: 11112\ndatabase:\n  embedded:\n    port: 99999\n")
    args = [command] + ([str(tmp_path)] if command == "import" else [])
    result = archive(config, *args, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == ("archive: configuration error: database.embedded.port: "
                                     "99999 is not a TCP port")
    assert result.stdout == ""


def test_environment_override_error_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "ok.yaml"
    config.write_text("ae_title: ARCHIVE\n")
    result = archive(config, "stats", env={"ARCHIVE_PORT": "eleven"}, timeout=30)
    assert result.returncode == 2
    assert "configuration error: port: expected int" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_configuration_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    result = archive(missing, "stats", timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == \
        f"archive: configuration error: {missing}: configuration file not found"


def test_archive_script_is_installed() -> None:
    script = Path(sys.executable).parent / "archive"
    assert script.exists()
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True,
                            env=node_environment(), timeout=30)
    assert result.returncode == 0
    for command in ("serve", "import", "stats"):
        assert command in result.stdout
    assert os.access(script, os.X_OK)


@pytest.mark.parametrize("command", ["stats", "serve"])
def test_unreachable_database_is_one_line_not_a_traceback(tmp_path: Path,
                                                          command: str) -> None:
    config = tmp_path / "archive.yaml"
    config.write_text(
        f"port: {free_port()}\njournal: {tmp_path / 'journal'}\ndatabase:\n"
        "  uri: mongodb://127.0.0.1:9/\n  timeout_seconds: 1\n  embedded:\n    enabled: false\n")
    result = archive(config, command, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "127.0.0.1:9" in result.stderr

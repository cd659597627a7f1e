"""The command line as a user runs it: ``python -m archive ...`` and the ``archive``
script as subprocesses, their exit statuses, stdout and stderr (redirected, as in a
script, and on a terminal where that changes what is shown)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import warnings
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from conftest import FerretDB, node_environment, unique_name, write_config
from helpers import ROOT, free_port, make_dataset, port_open, to_part10, wait_for, write_images
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from archive.gridstore import GridStore
from archive.storage import ensure_indexes

pytestmark = [pytest.mark.ferretdb, pytest.mark.filterwarnings("ignore::UserWarning")]

SUMMARY = re.compile(r"^stored (\d+), skipped (\d+), failed (\d+) into database (\S+) \((.*)\)$")
FERRETDB_BINARY = ROOT / ".tools" / "bin" / "ferretdb"


def archive(config: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "archive", "--config", str(config), *args],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**node_environment(), **(env or {})}, timeout=timeout, **kw)


def summary(result: subprocess.CompletedProcess[str]) -> tuple[int, int, int]:
    """(stored, skipped, failed) of ``archive import``'s last line on stdout."""
    found = SUMMARY.match(result.stdout.strip().splitlines()[-1])
    assert found, result.stdout
    return int(found.group(1)), int(found.group(2)), int(found.group(3))


def problems(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """``archive import: OUTCOME PATH: REASON`` lines of stderr, by path; nothing else
    may be there."""
    lines: dict[str, str] = {}
    for line in result.stderr.splitlines():
        found = re.fullmatch(r"archive import: (failed|skipped) (.+?): (.+)", line)
        assert found, f"unexpected line on stderr: {line!r}"
        lines[found.group(2)] = f"{found.group(1)}: {found.group(3)}"
    return lines


def uid_of(path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return str(dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)


@pytest.fixture
def cli_config(ferretdb: FerretDB, tmp_path: Path) -> Any:
    name = unique_name("cli")
    path = write_config(tmp_path / "cli", ferretdb, name)
    yield path, ferretdb.client[name]
    ferretdb.client.drop_database(name)


@pytest.fixture
def import_tree(tmp_path: Path) -> dict[str, Any]:
    """A folder to import: Part-10 files (one in a sub-folder), a bare dataset, files a
    folder may hold that are no DICOM (skipped), and DICOM files the archive refuses or
    cannot read (failed)."""
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
    truncated = root / "cut-in-pixel-data.dcm"
    image = make_dataset(Rows=64, Columns=64, BitsAllocated=16, PixelData=b"\1\0" * 4096)
    truncated.write_bytes(to_part10(image)[:-1000])
    broken = root / "broken-link.dcm"
    broken.symlink_to(root / "gone.dcm")
    return {"root": root, "stored": [*images, ct, mr], "bare": bare, "cut": image,
            "skipped": {text: "not a DICOM file", empty: "not a DICOM file"},
            "failed": {no_uid: "0xC000 no SOP Instance UID",
                       no_study: "0xC000 no StudyInstanceUID",
                       truncated: "0xC000 truncated: (7FE0,0010) needs",
                       broken: f"broken symbolic link to {root / 'gone.dcm'}"}}


# --- archive import --------------------------------------------------------------------


def test_import_a_folder(cli_config: tuple[Path, Any], import_tree: dict[str, Any]) -> None:
    config, db = cli_config

    result = archive(config, "import", str(import_tree["root"]))

    stored = len(import_tree["stored"]) + 1  # and the bare dataset
    skipped, failed = import_tree["skipped"], import_tree["failed"]
    assert result.returncode == 1  # something failed
    assert summary(result) == (stored, len(skipped), len(failed))
    lines = problems(result)  # one line per problem, nothing else (no log, no bar)
    assert set(lines) == {str(p) for p in [*skipped, *failed]}
    for path, reason in skipped.items():
        assert lines[str(path)] == f"skipped: {reason}"
    for path, reason in failed.items():
        assert lines[str(path)].startswith(f"failed: {reason}"), lines[str(path)]

    assert db.instances.count_documents({}) == stored
    files = GridStore(db)
    for path in import_tree["stored"]:
        doc = db.instances.find_one({"_id": uid_of(path)})
        assert doc is not None, path.name
        assert doc["source"] == "import"
        assert files.read(doc["file_id"]) == path.read_bytes(), path.name
    cut = str(import_tree["cut"].SOPInstanceUID)  # cut short: nothing of it stored
    assert db.instances.find_one({"_id": cut}) is None


def test_import_of_good_files_only_exits_0(cli_config: tuple[Path, Any],
                                           import_tree: dict[str, Any]) -> None:
    """Files in a folder that are no DICOM are skipped: not a failure."""
    config, _ = cli_config
    for path in import_tree["failed"]:
        path.unlink()
    result = archive(config, "import", str(import_tree["root"]))
    assert result.returncode == 0, result.stderr
    assert summary(result) == (len(import_tree["stored"]) + 1, 2, 0)


def test_named_paths_that_cannot_be_imported_fail(cli_config: tuple[Path, Any],
                                                  tmp_path: Path) -> None:
    """A path given on the command line must be imported: missing, a broken link, a file
    that is no DICOM are failures (exit 1), not skips."""
    config, db = cli_config
    missing = tmp_path / "gone.dcm"
    link = tmp_path / "link.dcm"
    link.symlink_to(missing)
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    good = write_images(tmp_path / "good", 1)[0]

    result = archive(config, "import", str(missing), str(link), str(text), str(good))

    assert result.returncode == 1
    assert summary(result) == (1, 0, 3)
    assert problems(result) == {
        str(missing): "failed: no such file or directory",
        str(link): f"failed: broken symbolic link to {missing}",
        str(text): "failed: not a DICOM file"}
    assert db.instances.count_documents({}) == 1


def test_import_wraps_a_bare_dataset_in_a_part10_file(cli_config: tuple[Path, Any],
                                                      import_tree: dict[str, Any]) -> None:
    config, db = cli_config
    bare = import_tree["bare"]
    result = archive(config, "import", "--quiet", str(bare))
    assert result.returncode == 0, result.stderr
    assert summary(result) == (1, 0, 0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = dcmread(bare, force=True)
        doc = db.instances.find_one({"_id": str(original.SOPInstanceUID)})
        stored = GridStore(db).read(doc["file_id"])
        wrapped = dcmread(BytesIO(stored))
    assert stored[128:132] == b"DICM"
    assert wrapped.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert wrapped.file_meta.TransferSyntaxUID == doc["TransferSyntaxUID"]
    assert wrapped.StructureSetLabel == original.StructureSetLabel
    assert len(wrapped.ROIContourSequence) == len(original.ROIContourSequence)
    assert doc["dataset"]["30060020"]["vr"] == "SQ"  # Structure Set ROI Sequence


ENCODINGS = {"implicit little": (True, True, "1.2.840.10008.1.2"),
             "explicit little": (False, True, "1.2.840.10008.1.2.1"),
             "explicit big": (False, False, "1.2.840.10008.1.2.2")}


def test_files_without_a_meta_group_are_all_stored_the_same_way(
        cli_config: tuple[Path, Any], tmp_path: Path) -> None:
    """A dataset without meta group, bare or after the DICM preamble, in any of three
    encodings: each is stored, wrapped in a meta group naming the encoding it was in,
    with every attribute -- never skipped, never stored without a transfer syntax."""
    config, db = cli_config
    folder = tmp_path / "no-meta"
    folder.mkdir()
    expected: dict[str, tuple[str, Any]] = {}
    for name, (implicit, little, syntax) in ENCODINGS.items():
        for preamble in (b"", b"\0" * 128 + b"DICM"):
            ds = make_dataset(InstanceNumber=len(expected) + 1, Rows=2, Columns=2,
                              BitsAllocated=16, PixelData=b"\1\0\2\0\3\0\4\0")
            del ds.SpecificCharacterSet
            buffer = DicomBytesIO()
            buffer.is_implicit_VR, buffer.is_little_endian = implicit, little
            write_dataset(buffer, ds)
            path = folder / f"{name.replace(' ', '-')}{'-dicm' if preamble else ''}.dcm"
            path.write_bytes(preamble + buffer.getvalue())
            expected[str(ds.SOPInstanceUID)] = (syntax, ds)

    result = archive(config, "import", str(folder))

    assert result.returncode == 0, result.stderr
    assert summary(result) == (6, 0, 0)
    files = GridStore(db)
    for uid, (syntax, original) in expected.items():
        doc = db.instances.find_one({"_id": uid})
        assert doc is not None and doc["TransferSyntaxUID"] == syntax
        stored = dcmread(BytesIO(files.read(doc["file_id"])))
        assert stored.file_meta.TransferSyntaxUID == syntax
        assert stored.file_meta.MediaStorageSOPInstanceUID == uid
        assert stored.PixelData == original.PixelData
        assert stored.InstanceNumber == original.InstanceNumber


def test_quiet_import_says_failures_only(cli_config: tuple[Path, Any],
                                         import_tree: dict[str, Any]) -> None:
    config, _ = cli_config
    result = archive(config, "import", "--quiet", str(import_tree["root"]))
    assert result.returncode == 1
    assert set(problems(result)) == {str(p) for p in import_tree["failed"]}
    assert all(v.startswith("failed: ") for v in problems(result).values())


def test_json_report(cli_config: tuple[Path, Any], import_tree: dict[str, Any]) -> None:
    config, db = cli_config
    result = archive(config, "import", "--json", str(import_tree["root"]))
    assert result.returncode == 1
    report = json.loads(result.stdout)
    stored = len(import_tree["stored"]) + 1
    assert (report["stored"], report["skipped"], report["failed"]) == (stored, 2, 4)
    by_path = {f["path"]: f for f in report["files"]}
    assert len(by_path) == stored + 6
    ct = by_path[str(import_tree["stored"][3])]
    assert (ct["outcome"], ct["status"], ct["sop_instance_uid"]) == \
        ("stored", "0x0000", uid_of(import_tree["stored"][3]))
    cut = by_path[str(next(p for p in import_tree["failed"] if "cut" in p.name))]
    assert (cut["outcome"], cut["status"]) == ("failed", "0xC000")
    assert report["database"]["name"] == db.name


def test_import_counts_store_failures_and_exits_1(ferretdb: FerretDB, tmp_path: Path) -> None:
    name = unique_name("cli")
    config = write_config(tmp_path / "cli", ferretdb, name, {"duplicate_policy": "reject"})
    images = write_images(tmp_path / "images", 3)
    try:
        first = archive(config, "import", "--quiet", str(images[0]))
        assert first.returncode == 0, first.stderr
        second = archive(config, "import", "--quiet", str(tmp_path / "images"))
        assert second.returncode == 1, second.stderr
        assert summary(second) == (2, 0, 1)
        assert problems(second)[str(images[0])].startswith("failed: 0x0111")
        assert ferretdb.client[name].instances.count_documents({}) == 3
    finally:
        ferretdb.client.drop_database(name)


def test_progress_bar_on_a_terminal_only(cli_config: tuple[Path, Any], tmp_path: Path) -> None:
    """Redirected, stderr gets no bar at all (checked by every test above); on a
    terminal the bar is drawn there, and the summary still goes to stdout."""
    config, _ = cli_config
    folder = tmp_path / "images"
    write_images(folder, 3)
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    process = subprocess.Popen(
        [sys.executable, "-m", "archive", "--config", str(config), "import", str(folder)],
        stdout=subprocess.PIPE, stderr=child, cwd=ROOT, env=node_environment(), text=True)
    os.close(child)
    drawn = b""
    try:
        while True:  # read as it is drawn: a pty's buffer is gone once the writer exits
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the writer closed its side
                break
            if not chunk:
                break
            drawn += chunk
        stdout, _ = process.communicate(timeout=120)
    finally:
        os.close(main)
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, "")
    assert done.returncode == 0
    assert summary(done) == (3, 0, 0)
    assert b"3/3" in drawn and b"100%" in drawn, drawn


# --- archive stats ---------------------------------------------------------------------


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
    assert text.stderr == ""
    first, *rest = text.stdout.splitlines()
    assert first == f"database {db.name} (mongodb://127.0.0.1:{db.client.address[1]}/)"
    lines = {line.split()[0]: line.split()[1] for line in rest
             if line.strip() and len(line.split()) == 2 and not line.startswith(" ")}
    assert lines == {"patients": "3", "studies": "3", "series": "3", "instances": "6"}
    assert "instances per modality:" in text.stdout
    modality_lines = {tuple(line.split()) for line in rest if line.startswith("  ")}
    assert ("CT", "4") in modality_lines
    assert ("MR", "2") in modality_lines
    assert ("1.2.840.10008.5.1.4.1.1.2", "4") in modality_lines

    assert as_json.returncode == 0, as_json.stderr
    stats = json.loads(as_json.stdout)
    assert {k: stats[k] for k in ("patients", "studies", "series", "instances")} == \
        {"patients": 3, "studies": 3, "series": 3, "instances": 6}
    assert stats["modalities"] == {"CT": 4, "MR": 2}
    assert stats["database"] == {"name": db.name,
                                 "uri": f"mongodb://127.0.0.1:{db.client.address[1]}/",
                                 "data_dir": None, "node_pid": None}
    assert db.instances.count_documents({}) == stats["instances"]


def test_stats_of_an_empty_archive(cli_config: tuple[Path, Any]) -> None:
    config, db = cli_config
    ensure_indexes(db)  # what a node does at its first start: an archive, empty
    result = archive(config, "stats", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    del stats["database"]
    assert stats == {"patients": 0, "studies": 0, "series": 0, "instances": 0,
                     "modalities": {}, "sop_classes": {}}


@pytest.mark.parametrize("command", [("stats",), ("check",), ("acl", "export"), ("audit",)])
def test_reading_a_database_nothing_was_stored_in_is_an_error(
        cli_config: tuple[Path, Any], command: tuple[str, ...]) -> None:
    """Not zeros, not an empty rule set: the wrong database, said in one line."""
    config, db = cli_config
    result = archive(config, *command)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f"archive: no database {db.name} (mongodb://127.0.0.1:{db.client.address[1]}/): "
        "nothing was ever stored there (wrong --config, database.name or data folder?)")
    assert db.name not in db.client.list_database_names()


# --- the embedded database: the running node's, or one for the command ----------------


def embedded_config(folder: Path, data_dir: Path | str | None = None) -> tuple[Path, int]:
    """A configuration with the embedded FerretDB, and the port it listens on."""
    folder.mkdir(parents=True, exist_ok=True)
    config, port = folder / "archive.yaml", free_port()
    config.write_text(
        f"port: {free_port()}\njournal: {folder / 'journal'}\n"
        f"receive: {{folder: {folder / 'incoming'}}}\n"
        "acl: {enabled: false, initial_rules: ''}\n"
        "database:\n  timeout_seconds: 5\n  embedded:\n"
        f"    data_dir: {data_dir or folder / 'data'}\n    port: {port}\n"
        f"    binary: {FERRETDB_BINARY}\n", encoding="utf-8")
    return config, port


def test_one_shot_commands_use_the_running_nodes_database(tmp_path: Path) -> None:
    """Without a node, a command starts the embedded FerretDB of the data folder and says
    so; with the node running, it shares the node's and says that; either way, on
    stderr, nothing but problems (no INFO lines)."""
    config, embedded_port = embedded_config(tmp_path / "site")
    data = (tmp_path / "site" / "data").resolve()
    first = write_images(tmp_path / "first", 2)
    imported = archive(config, "import", str(tmp_path / "first"))
    assert (imported.returncode, imported.stderr) == (0, "")
    assert summary(imported) == (2, 0, 0)
    assert imported.stdout.strip().endswith(
        f", data in {data}, started for this command: no node is running on it)")

    alone = archive(config, "stats", "--json")
    assert (alone.returncode, alone.stderr) == (0, "")
    assert json.loads(alone.stdout)["instances"] == 2
    assert json.loads(alone.stdout)["database"]["node_pid"] is None

    log = (tmp_path / "node.log").open("wb")
    node = subprocess.Popen([sys.executable, "-m", "archive", "serve", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=node_environment(), start_new_session=True)
    try:
        node_log = tmp_path / "node.log"
        wait_for(lambda: " listening on " in node_log.read_text(), 30, message="the node")
        listening = next(line for line in node_log.read_text().splitlines()
                         if " listening on " in line)
        assert listening.endswith(
            f"(database archive at mongodb://127.0.0.1:{embedded_port}/)"), listening

        write_images(tmp_path / "second", 1)
        shared_import = archive(config, "import", str(tmp_path / "second"))
        shared = archive(config, "stats")
        assert (shared_import.returncode, shared_import.stderr) == (0, "")
        assert (shared.returncode, shared.stderr) == (0, "")
        assert shared.stdout.splitlines()[0] == (
            f"database archive (embedded FerretDB on mongodb://127.0.0.1:{embedded_port}/, "
            f"data in {data}, shared with the running node pid {node.pid})")
        assert "instances         3" in shared.stdout
        assert node.poll() is None and port_open(embedded_port)  # still the node's
    finally:
        node.terminate()
        node.wait(30)
        log.close()
    assert first  # the files stay where they were
    assert all(p.exists() for p in first)


def test_reading_a_data_folder_that_does_not_exist_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "elsewhere" / "data"
    config, _ = embedded_config(tmp_path / "site", missing)
    for command in (("stats",), ("check", "--json"), ("acl", "export")):
        result = archive(config, *command)
        assert result.returncode == 2, result
        assert result.stdout == ""
        assert result.stderr.strip() == (
            f"archive: no embedded database in {missing} (database.embedded.data_dir: the "
            "folder does not exist); run from the archive's folder or give its --config")
    assert not (tmp_path / "elsewhere").exists()


# --- help, version, configuration -----------------------------------------------------


def test_help_names_every_command_with_its_description() -> None:
    script = Path(sys.executable).parent / "archive"
    assert script.exists() and os.access(script, os.X_OK)
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True,
                            env=node_environment(), timeout=30)
    assert result.returncode == 0
    assert "`" not in result.stdout  # no reStructuredText
    section = result.stdout.split("\ncommands:\n")[1].split("\n\n")[0]
    entries = [line.split(None, 1) for line in section.splitlines() if line[2:3] != " "]
    assert [name for name, _ in entries] == ["serve", "import", "stats", "check", "delete",
                                             "rejected", "query", "modify", "acl", "audit", "user",
                                             "token"]
    assert all(len(description) > 10 for _, description in entries)
    assert "{" not in result.stdout


def test_version() -> None:
    from archive import __version__

    result = subprocess.run([sys.executable, "-m", "archive", "--version"], capture_output=True,
                            text=True, env=node_environment(), timeout=30, cwd=ROOT)
    assert (result.returncode, result.stdout.strip()) == (0, f"archive {__version__}")


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


@pytest.mark.parametrize("command", ["stats", "serve"])
def test_unreachable_database_is_one_line_not_a_traceback(tmp_path: Path,
                                                          command: str) -> None:
    config = tmp_path / "archive.yaml"
    config.write_text(
        f"port: {free_port()}\njournal: {tmp_path / 'journal'}\ndatabase:\n"
        "  uri: mongodb://reader:s3cret@127.0.0.1:9/\n  timeout_seconds: 1\n  embedded:\n"
        "    enabled: false\n")
    result = archive(config, command, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "127.0.0.1:9" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout  # never the password

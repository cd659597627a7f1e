"""Bad administrator input at the command line, as subprocesses: alias bombs, patterns
that would match everything, read-only data folders.  Each gets one line on stderr
and exit status 2, quickly; never a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import FerretDB, node_environment, unique_name, write_config
from helpers import ROOT, free_port

from acl.rules import Rule, RuleStore

BOMB_LEVELS = 8  # 9^8 = 43 million strings once expanded: 46 s and 2.2 GB before


def archive(config: Path, *args: str, prefix: tuple[str, ...] = (),
            timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    result = subprocess.run([*prefix, sys.executable, "-m", "archive", "--config",
                             str(config), *args], capture_output=True, text=True, cwd=ROOT,
                            env=node_environment(), timeout=timeout)
    return result, time.perf_counter() - started


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def alias_bomb(indent: str, first: str, last: str) -> str:
    lines = [f'{indent}{first}: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{indent}k{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]"
              for i in range(1, BOMB_LEVELS)]
    lines.append(f"{indent}{last}: *a{BOMB_LEVELS - 1}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def offline_config(tmp_path: Path) -> Path:
    """A configuration whose database is never reached: the files are refused first."""
    path = tmp_path / "archive.yaml"
    path.write_text(f"port: {free_port()}\njournal: {tmp_path / 'journal'}\n"
                    "acl: {initial_rules: ''}\ndatabase:\n  uri: mongodb://127.0.0.1:9/\n"
                    "  timeout_seconds: 1\n  embedded: {enabled: false}\n", encoding="utf-8")
    return path


@pytest.fixture
def db_config(ferretdb: FerretDB, tmp_path: Path) -> Any:
    name = unique_name("badcli")
    path = write_config(tmp_path / "cli", ferretdb, name)
    yield path, ferretdb.client[name]
    ferretdb.client.drop_database(name)


# --- alias bombs ---------------------------------------------------------------------------


@pytest.mark.parametrize("dry_run", [False, True], ids=["apply", "dry-run"])
def test_an_alias_bomb_in_the_rules_is_refused_in_one_line_quickly(
        offline_config: Path, tmp_path: Path, dry_run: bool) -> None:
    rules = tmp_path / "bomb.yaml"
    rules.write_text("rules:\n  - principal: alice\n    service: Query\n    pattern:\n"
                     + alias_bomb("      ", "PatientName", "PatientID"), encoding="utf-8")
    result, seconds = archive(offline_config, "acl", "apply", str(rules),
                              *(["--dry-run"] if dry_run else []))
    assert result.returncode == 2
    assert one_line(result) == (f"archive acl apply: {rules}:5: anchor &a0 refused (anchors "
                                "and aliases are not allowed); nothing changed")
    assert seconds < 15  # Python's start-up: the file itself costs milliseconds


def test_an_alias_bomb_in_the_configuration_is_refused_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "archive.yaml"
    config.write_text("ae_title: ARCHIVE\n" + alias_bomb("", "x", "y"), encoding="utf-8")
    result, seconds = archive(config, "stats")
    assert result.returncode == 2
    assert one_line(result) == (f"archive: configuration error: {config}: line 2: anchor "
                                "&a0 refused (anchors and aliases are not allowed)")
    assert seconds < 15


def test_an_alias_bomb_in_the_users_file_is_refused_in_one_line(offline_config: Path,
                                                                tmp_path: Path) -> None:
    users = tmp_path / "users.yaml"
    users.write_text(alias_bomb("", "alice", "bob"), encoding="utf-8")
    result, seconds = archive(offline_config, "user", "list", "--file", str(users))
    assert result.returncode != 0
    assert one_line(result).startswith(f"archive user: {users}: line 1: anchor &a0 refused")
    assert seconds < 15


# --- patterns that would match everything --------------------------------------------------


EMPTY_VALUE = textwrap.dedent("""\
    rules:
      - {principal: admin, service: "*"}
      - principal: alice
        service: Query
        pattern:
          StudyDescription: Trial A
          PatientID: ""
    """)


@pytest.mark.parametrize("dry_run", [False, True], ids=["apply", "dry-run"])
def test_an_empty_pattern_value_is_refused_naming_rule_line_and_the_fix(
        db_config: tuple[Path, Any], tmp_path: Path, dry_run: bool) -> None:
    config, db = db_config
    rules = tmp_path / "rules.yaml"
    rules.write_text(EMPTY_VALUE, encoding="utf-8")
    result, _ = archive(config, "acl", "apply", str(rules), *(["--dry-run"] if dry_run else []))
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith(f"archive acl apply: {rules}:7: rule 2 (principal 'alice'): "
                           "pattern: PatientID has an empty value, which would match every "
                           "dataset")
    assert "PatientID: \"*\" for any value" in line
    assert "PatientID: '\"\"' for datasets without one" in line
    assert line.endswith("nothing changed")
    assert db.acl_rules.count_documents({}) == 0


def test_a_pattern_of_only_universal_keys_is_applied_with_a_warning(
        db_config: tuple[Path, Any], tmp_path: Path) -> None:
    config, db = db_config
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - principal: alice\n    service: Query\n"
                     "    pattern: {PatientID: \"*\", StudyDescription: \"*\"}\n",
                     encoding="utf-8")
    for args in (["--dry-run"], []):
        result, _ = archive(config, "acl", "apply", str(rules), *args)
        assert result.returncode == 0, result.stderr
        assert one_line(result) == (
            f"archive acl apply: warning: {rules}:2: rule 1 (principal 'alice'): pattern "
            "PatientID=*, StudyDescription=* matches every dataset: it restricts nothing "
            "(give a value, or drop the pattern)")
    assert db.acl_rules.count_documents({}) == 1
    check, _ = archive(config, "acl", "check", "--user", "alice", "--service", "Query")
    assert check.returncode == 0
    assert "matches every dataset" in one_line(check)


def test_check_refuses_rules_in_force_with_an_empty_value(db_config: tuple[Path, Any]) -> None:
    config, db = db_config
    # as an archive applied it before empty values were refused
    legacy = Rule("alice", "Query", {"00100020": {"vr": "LO"}}, 1, "old.yaml:6")
    RuleStore(db).apply([legacy], source="old.yaml")
    result, _ = archive(config, "acl", "check", "--user", "alice", "--service", "Query",
                        "PatientID=P1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("archive acl check: old.yaml:6: rule 1 (principal 'alice'): "
                               "pattern: PatientID has an empty value")
    assert "apply it again" in lines[-1]


# --- read-only data folders ----------------------------------------------------------------


def read_only(folder: Path) -> tuple[str, ...]:
    """A command prefix under which ``folder`` is a read-only bind mount (a private
    mount namespace: root's permission bypass does not apply to a read-only mount)."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to mount a folder read-only")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"cannot make a mount namespace here: {probe.stderr.strip()}")
    return ("unshare", "-rm", "sh", "-c", f'mount --bind -o ro "{folder}" "{folder}" && '
            'exec "$0" "$@"')


def test_a_read_only_embedded_database_folder_is_one_line_exit_2(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "archive.yaml"
    config.write_text(f"journal: {tmp_path / 'journal'}\nacl: {{initial_rules: ''}}\n"
                      "database:\n  timeout_seconds: 1\n  embedded:\n"
                      f"    data_dir: {data / 'ferretdb'}\n    port: {free_port()}\n"
                      f"    binary: {ROOT / '.tools/bin/ferretdb'}\n", encoding="utf-8")
    for command in ("stats", "serve"):
        result, _ = archive(config, command, prefix=read_only(data), timeout=60)
        assert result.returncode == 2
        assert one_line(result) == (f"archive: {data / 'ferretdb'}: not writable "
                                    "(Read-only file system)")


def test_a_read_only_journal_folder_is_one_line_exit_2(db_config: tuple[Path, Any],
                                                       tmp_path: Path) -> None:
    config, _ = db_config
    data = tmp_path / "journal-folder"
    data.mkdir()
    text = config.read_text(encoding="utf-8")
    config.write_text("\n".join(f"journal: {data / 'journal'}"
                                if line.startswith("journal:") else line
                                for line in text.splitlines()) + "\n", encoding="utf-8")
    result, _ = archive(config, "serve", prefix=read_only(data), timeout=60)
    assert result.returncode == 2
    assert one_line(result) == (f"archive: {data / 'journal'}: not writable "
                                "(Read-only file system)")

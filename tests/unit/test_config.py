"""Configuration errors: exit status 2 and one line naming the key, through the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import deep_merge

from archive import cli, config
from archive.config import ConfigError

#: A configuration that loads; nothing in it can reach a database quickly or by accident.
VALID: dict[str, Any] = {
    "ae_title": "ARCHIVE",
    "port": 11112,
    "journal": "journal.jsonl",
    "database": {"uri": "mongodb://127.0.0.1:9/", "name": "archive", "timeout_seconds": 0.5,
                 "embedded": {"enabled": False}},
    "destinations": {"STORESCP": {"host": "127.0.0.1", "port": 11113}},
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in [*config.ENVIRONMENT, "ARCHIVE_CONFIG"]:
        monkeypatch.delenv(variable, raising=False)


def write(tmp_path: Path, data: Any = None, text: str | None = None) -> Path:
    path = tmp_path / "archive.yaml"
    if text is None:
        text = yaml.safe_dump(data, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def with_changes(changes: dict[str, Any]) -> dict[str, Any]:
    data = yaml.safe_load(yaml.safe_dump(VALID))
    return deep_merge(data, changes)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = cli.main(list(argv))
    err = capsys.readouterr().err
    return status, err


def assert_config_error(status: int, err: str, *fragments: str, one_line: bool = True) -> None:
    assert status == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    if one_line:
        assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("archive: configuration error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_the_shipped_configuration_is_valid() -> None:
    cfg = config.load(Path(__file__).resolve().parents[2] / "config" / "archive.yaml", {})
    assert (cfg.ae_title, cfg.port, cfg.duplicate_policy) == ("ARCHIVE", 11112, "replace")
    assert cfg.database.embedded.enabled is True
    assert cfg.destinations["STORESCP"].port == 11113


def test_the_test_baseline_is_valid(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, VALID), {})
    assert cfg.database.timeout_seconds == 0.5
    assert isinstance(cfg.database.timeout_seconds, float)


def test_restart_delay_takes_whole_and_fractional_seconds(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, VALID), {}).database.embedded.restart_delay_seconds == 1
    for value in (3, 0.25, 60):
        changes = {"database": {"embedded": {"restart_delay_seconds": value}}}
        cfg = config.load(write(tmp_path, with_changes(changes)), {})
        assert cfg.database.embedded.restart_delay_seconds == value


@pytest.mark.parametrize("subcommand_first", [False, True])
def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      subcommand_first: bool) -> None:
    missing = str(tmp_path / "nowhere.yaml")
    argv = ["stats", "--config", missing] if subcommand_first else \
        ["--config", missing, "stats"]
    status, err = run_cli(capsys, *argv)
    assert_config_error(status, err, missing, "not found")


def test_archive_config_variable_names_the_default_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    missing = str(tmp_path / "from-env.yaml")
    monkeypatch.setenv("ARCHIVE_CONFIG", missing)
    status, err = run_cli(capsys, "stats")
    assert_config_error(status, err, missing)


@pytest.mark.parametrize("text,fragment", [
    ("port: [unclosed\n", "not valid YAML"),
    ("- a\n- list\n", "top level must be a mapping"),
])
def test_unreadable_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                         fragment: str) -> None:
    status, err = run_cli(capsys, "--config", str(write(tmp_path, text=text)), "stats")
    # PyYAML's explanation (with the line and column) spans several lines
    assert_config_error(status, err, fragment, one_line=False)


@pytest.mark.parametrize("changes,key", [
    ({"colour": "blue"}, "colour"),
    ({"database": {"embedded": {"enabeld": True}}}, "database.embedded.enabeld"),
    ({"database": {"gridfs": "fs"}}, "database.gridfs"),
    ({"destinations": {"STORESCP": {"hostname": "x"}}}, "destinations.STORESCP.hostname"),
    ({"auth": {"ldap": {"uri": "ldap://x"}}}, "auth.ldap.uri"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     changes: dict[str, Any], key: str) -> None:
    path = write(tmp_path, with_changes(changes))
    status, err = run_cli(capsys, "--config", str(path), "stats")
    assert_config_error(status, err, f"{key}: unknown key")


@pytest.mark.parametrize("changes,key", [
    ({"port": "11112"}, "port"),
    ({"port": 11112.5}, "port"),
    ({"max_associations": True}, "max_associations"),
    ({"ae_title": 42}, "ae_title"),
    ({"database": {"timeout_seconds": "fast"}}, "database.timeout_seconds"),
    ({"database": {"embedded": {"enabled": "yes"}}}, "database.embedded.enabled"),
    ({"database": {"embedded": "off"}}, "database.embedded"),
    ({"database": {"embedded": {"restart_delay_seconds": "1s"}}},
     "database.embedded.restart_delay_seconds"),
    ({"database": None}, "database"),
    ({"accept": {"sop_classes": [1, 2]}}, "accept.sop_classes"),
    ({"accept": {"transfer_syntaxes": {"a": 1}}}, "accept.transfer_syntaxes"),
    ({"destinations": {"PACS": "127.0.0.1:104"}}, "destinations.PACS"),
    ({"destinations": {"PACS": {"host": "h", "port": "104"}}}, "destinations.PACS.port"),
    ({"query": {"pn_case_insensitive": 1}}, "query.pn_case_insensitive"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_wrong_type(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                    changes: dict[str, Any], key: str) -> None:
    path = write(tmp_path, with_changes(changes))
    status, err = run_cli(capsys, "--config", str(path), "stats")
    assert_config_error(status, err, f"{key}:")


def test_missing_required_destination_port(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, with_changes({"destinations": {"PACS": {"host": "h"}}}))
    status, err = run_cli(capsys, "--config", str(path), "stats")
    assert_config_error(status, err, "destinations.PACS", "port")


@pytest.mark.parametrize("changes,key", [
    ({"duplicate_policy": "overwrite"}, "duplicate_policy"),
    ({"log_level": "verbose"}, "log_level"),
    ({"log_level": "info"}, "log_level"),
    ({"auth": {"backend": "kerberos"}}, "auth.backend"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_choice(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                    changes: dict[str, Any], key: str) -> None:
    path = write(tmp_path, with_changes(changes))
    status, err = run_cli(capsys, "--config", str(path), "stats")
    assert_config_error(status, err, f"{key}:", "is not one of")


@pytest.mark.parametrize("changes,key", [
    ({"port": 0}, "port"),
    ({"port": 65536}, "port"),
    ({"port": -104}, "port"),
    ({"database": {"embedded": {"port": 70000}}}, "database.embedded.port"),
    ({"destinations": {"STORESCP": {"port": 0}}}, "destinations.STORESCP.port"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_port(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                  changes: dict[str, Any], key: str) -> None:
    path = write(tmp_path, with_changes(changes))
    status, err = run_cli(capsys, "--config", str(path), "stats")
    assert_config_error(status, err, f"{key}:", "not a TCP port")


@pytest.mark.parametrize("changes,key", [
    ({"ae_title": ""}, "ae_title"),
    ({"ae_title": "   "}, "ae_title"),
    ({"ae_title": "A" * 17}, "ae_title"),
    ({"destinations": {"A" * 17: {"host": "h", "port": 104}}}, "destinations.AAAA"),
    ({"max_associations": 0}, "max_associations"),
    ({"max_pdu_length": 4095}, "max_pdu_length"),
    ({"max_pdu_length": (1 << 20) + 1}, "max_pdu_length"),
    ({"database": {"timeout_seconds": 0}}, "database.timeout_seconds"),
    ({"database": {"embedded": {"restart_delay_seconds": 0}}},
     "database.embedded.restart_delay_seconds"),
    ({"database": {"embedded": {"restart_delay_seconds": 600}}},
     "database.embedded.restart_delay_seconds"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_value(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                   changes: dict[str, Any], key: str) -> None:
    path = write(tmp_path, with_changes(changes))
    status, err = run_cli(capsys, "--config", str(path), "stats")
    assert_config_error(status, err, key)


# --- environment overrides ---------------------------------------------------------


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    cfg = config.load(path, {
        "ARCHIVE_PORT": "12345", "ARCHIVE_MONGO_URI": "mongodb://db.example:27018/",
        "ARCHIVE_DATABASE": "other", "ARCHIVE_AE_TITLE": "ARCHIVE2",
        "ARCHIVE_BIND_ADDRESS": "0.0.0.0", "ARCHIVE_EMBEDDED_DATABASE": "true",
        "ARCHIVE_LOG_LEVEL": "DEBUG",
    })
    assert cfg.port == 12345
    assert cfg.database.uri == "mongodb://db.example:27018/"
    assert cfg.database.name == "other"
    assert cfg.ae_title == "ARCHIVE2"
    assert cfg.bind_address == "0.0.0.0"
    assert cfg.database.embedded.enabled is True
    assert cfg.log_level == "DEBUG"
    # the rest of the file is untouched
    assert cfg.database.timeout_seconds == 0.5
    assert cfg.destinations["STORESCP"].port == 11113


def test_environment_fills_keys_the_file_lacks(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, {"ae_title": "X"}), {"ARCHIVE_MONGO_URI": "mongodb://h/"})
    assert cfg.database.uri == "mongodb://h/"
    assert cfg.database.name == "archive"


@pytest.mark.parametrize("variable,value,key", [
    ("ARCHIVE_PORT", "abc", "port"),
    ("ARCHIVE_PORT", "", "port"),
    ("ARCHIVE_PORT", "70000", "port"),
    ("ARCHIVE_PORT", "0", "port"),
    ("ARCHIVE_AE_TITLE", "", "ae_title"),
    ("ARCHIVE_AE_TITLE", "A_TITLE_TOO_LONG_", "ae_title"),
    ("ARCHIVE_LOG_LEVEL", "chatty", "log_level"),
])
def test_bad_environment_override(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch, variable: str, value: str,
                                  key: str) -> None:
    monkeypatch.setenv(variable, value)
    status, err = run_cli(capsys, "--config", str(write(tmp_path, VALID)), "stats")
    assert_config_error(status, err, f"{key}:")


def test_environment_override_into_a_non_mapping(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCHIVE_MONGO_URI", "mongodb://h/")
    path = write(tmp_path, with_changes({"database": "mongodb://x/"}))
    status, err = run_cli(capsys, "--config", str(path), "stats")
    assert_config_error(status, err, "database")


@pytest.mark.parametrize("variable,value,key", [
    pytest.param("ARCHIVE_MONGO_URI", "http://127.0.0.1:27017/", "database.uri",),
    pytest.param("ARCHIVE_MONGO_URI", "mongodb://", "database.uri",),
    pytest.param("ARCHIVE_DATABASE", "", "database.name",),
    pytest.param("ARCHIVE_DATABASE", "a/b", "database.name",),
])
def test_bad_database_override(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch, variable: str, value: str,
                               key: str) -> None:
    monkeypatch.setenv(variable, value)
    status, err = run_cli(capsys, "--config", str(write(tmp_path, VALID)), "stats")
    assert_config_error(status, err, f"{key}:")


def test_accept_lists_take_all_or_a_list_only(tmp_path: Path) -> None:
    path = write(tmp_path, with_changes({"accept": {"transfer_syntaxes": "everything"}}))
    with pytest.raises(ConfigError, match="accept.transfer_syntaxes"):
        config.load(path, {})


def test_config_error_message_is_the_exception_text(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^duplicate_policy: 'x' is not one of"):
        config.load(write(tmp_path, with_changes({"duplicate_policy": "x"})), {})


# --- auth: AE-title principals bound to devices, throttle limits -------------------------


def test_plain_ae_title_mapping_is_refused_with_the_new_form(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, with_changes({"auth": {"ae_principals": {"WORKSTATION": "admin"}}}))
    status, err = run_cli(capsys, "--config", str(path), "stats")
    assert_config_error(status, err, "auth.ae_principals.WORKSTATION: an AE title alone is "
                        "not a credential",
                        "{principal: admin, addresses: [192.0.2.10]}")


def test_bound_ae_principals_and_throttle_load(tmp_path: Path) -> None:
    sha = "AB:" * 31 + "CD"
    cfg = config.load(write(tmp_path, with_changes({
        "tls": {"certificate": "s.pem", "ca_certificate": "ca.pem"},
        "auth": {"backend": "file", "ae_principals_without_password": True,
                 "ae_principals": {
                     "CT01": {"principal": "modality-ct", "addresses": ["192.0.2.21"]},
                     "VIEW": {"principal": "viewer", "addresses": ["0.0.0.0/0", "::/0"],
                              "certificate_cn": "viewer3", "certificate_sha256": sha}},
                 "throttle": {"peer_failures": 3, "max_backoff_seconds": 60}}})), {})
    assert cfg.auth.ae_principals["CT01"].addresses == ["192.0.2.21"]
    assert cfg.auth.ae_principals["VIEW"].certificate_sha256 == sha
    assert cfg.auth.ae_principals_without_password is True
    assert (cfg.auth.throttle.peer_failures, cfg.auth.throttle.user_failures) == (3, 5)
    assert cfg.auth.throttle.max_backoff_seconds == 60.0


def test_auth_defaults_are_safe(tmp_path: Path) -> None:
    for cfg in (config.load(write(tmp_path, VALID), {}),
                config.load(Path(__file__).resolve().parents[2] / "config" / "archive.yaml",
                            {})):
        assert cfg.auth.ae_principals == {}
        assert cfg.auth.ae_principals_without_password is False
        t = cfg.auth.throttle
        assert t.enabled and (t.peer_failures, t.user_failures, t.concurrent_checks) == (10, 5, 1)
        assert (t.backoff_seconds, t.max_backoff_seconds, t.forgive_seconds,
                t.check_wait_seconds) == (1.0, 300.0, 60.0, 5.0)


def _binding(**changes: Any) -> dict[str, Any]:
    return {"principal": "modality-ct", "addresses": ["192.0.2.21"], **changes}


@pytest.mark.parametrize("changes,fragments", [
    ({"ae_principals": {"CT01": {"principal": "x"}}},
     ("auth.ae_principals.CT01.addresses:", "0.0.0.0/0")),
    ({"ae_principals": {"CT01": _binding(addresses=[])}}, ("auth.ae_principals.CT01.addresses",)),
    ({"ae_principals": {"CT01": _binding(addresses=["ct01.example.org"])}},
     ("auth.ae_principals.CT01.addresses:", "'ct01.example.org' is not an IP address")),
    ({"ae_principals": {"CT01": _binding(addresses=["192.0.2.21/24"])}},
     ("auth.ae_principals.CT01.addresses:", "not an IP address or network")),
    ({"ae_principals": {"CT01": _binding(addresses="192.0.2.21")}},
     ("auth.ae_principals.CT01.addresses:",)),
    ({"ae_principals": {"CT01": _binding(adresses=["192.0.2.21"])}},
     ("auth.ae_principals.CT01.adresses: unknown key",)),
    ({"ae_principals": {"CT01": _binding(principal="*")}},
     ("auth.ae_principals.CT01.principal:",)),
    ({"ae_principals": {"CT01": _binding(principal=" ")}},
     ("auth.ae_principals.CT01.principal:",)),
    ({"ae_principals": {"A_VERY_LONG_AE_TITLE": _binding()}},
     ("auth.ae_principals.A_VERY_LONG_AE_TITLE:", "1 to 16")),
    ({"ae_principals": {"CT01": _binding(certificate_sha256="abc")}},
     ("auth.ae_principals.CT01.certificate_sha256:", "64 hexadecimal")),
    ({"ae_principals": {"CT01": _binding(certificate_cn="ct01")}},
     ("auth.ae_principals.CT01:", "mutual TLS")),
    ({"ae_principals_without_password": "yes"}, ("auth.ae_principals_without_password:",)),
    ({"throttle": {"peer_failures": 0}}, ("auth.throttle.peer_failures:", "at least 1")),
    ({"throttle": {"user_failures": -1}}, ("auth.throttle.user_failures:",)),
    ({"throttle": {"concurrent_checks": 0}}, ("auth.throttle.concurrent_checks:",)),
    ({"throttle": {"backoff_seconds": 0}}, ("auth.throttle.backoff_seconds:", "positive")),
    ({"throttle": {"forgive_seconds": -5}}, ("auth.throttle.forgive_seconds:",)),
    ({"throttle": {"check_wait_seconds": 0}}, ("auth.throttle.check_wait_seconds:",)),
    ({"throttle": {"max_backoff_seconds": 0.5}}, ("auth.throttle.max_backoff_seconds:",)),
    ({"throttle": {"peer_failures": "10"}}, ("auth.throttle.peer_failures:",)),
    ({"throttle": {"enabled": "no"}}, ("auth.throttle.enabled:",)),
    ({"throttle": {"lockout": True}}, ("auth.throttle.lockout: unknown key",)),
], ids=lambda v: "" if isinstance(v, dict) else v[0])
def test_bad_auth_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           changes: dict[str, Any], fragments: tuple[str, ...]) -> None:
    path = write(tmp_path, with_changes({"auth": changes}))
    status, err = run_cli(capsys, "--config", str(path), "stats")
    assert_config_error(status, err, *fragments)


# --- connections (archive.dimse.connections) -------------------------------------------


def test_connection_limits_default_below_max_associations(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, VALID), {})
    limits = cfg.connections
    assert limits.associations_per_peer < cfg.max_associations
    assert limits.pending_per_peer <= limits.max_pending
    assert limits.request_timeout < limits.acse_timeout


def test_shipped_connection_settings_are_the_defaults() -> None:
    shipped = config.load(Path(__file__).resolve().parents[2] / "config" / "archive.yaml", {})
    assert shipped.connections == config.Connections()


def test_connection_timeouts_take_integers_and_fractions(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, with_changes(
        {"connections": {"request_timeout": 2, "dimse_timeout": 0.5}})), {})
    assert cfg.connections.request_timeout == 2.0
    assert isinstance(cfg.connections.request_timeout, float)
    assert cfg.connections.dimse_timeout == 0.5


@pytest.mark.parametrize("changes,key", [
    ({"connections": {"pending_per_peer": "4"}}, "connections.pending_per_peer"),
    ({"connections": {"associations_per_peer": 2.5}}, "connections.associations_per_peer"),
    ({"connections": {"max_pending": True}}, "connections.max_pending"),
    ({"connections": {"request_timeout": "10s"}}, "connections.request_timeout"),
    ({"connections": {"network_timeout": None}}, "connections.network_timeout"),
    ({"connections": 10}, "connections"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_connection_keys_of_the_wrong_type(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           changes: dict[str, Any], key: str) -> None:
    status, err = run_cli(capsys, "--config", str(write(tmp_path, with_changes(changes))),
                          "stats")
    assert_config_error(status, err, f"{key}:")


@pytest.mark.parametrize("changes,key,fragment", [
    ({"connections": {"pending_per_peer": 0}}, "connections.pending_per_peer", "at least 1"),
    ({"connections": {"associations_per_peer": -1}}, "connections.associations_per_peer",
     "at least 1"),
    ({"connections": {"max_pending": 0}}, "connections.max_pending", "at least 1"),
    ({"connections": {"associations_per_peer": 11}}, "connections.associations_per_peer",
     "more than max_associations (10)"),
    ({"max_associations": 2}, "connections.associations_per_peer",
     "more than max_associations (2)"),
    ({"connections": {"pending_per_peer": 30}}, "connections.pending_per_peer",
     "more than connections.max_pending (20)"),
    ({"connections": {"request_timeout": 0}}, "connections.request_timeout", "above 0"),
    ({"connections": {"acse_timeout": -5}}, "connections.acse_timeout", "above 0"),
    ({"connections": {"dimse_timeout": 1e9}}, "connections.dimse_timeout", "at most 86400"),
    ({"connections": {"network_timeout": float("nan")}}, "connections.network_timeout",
     "above 0"),
    ({"connections": {"request_timeout": float("inf")}}, "connections.request_timeout",
     "at most"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_connection_values_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        changes: dict[str, Any], key: str,
                                        fragment: str) -> None:
    status, err = run_cli(capsys, "--config", str(write(tmp_path, with_changes(changes))),
                          "stats")
    assert_config_error(status, err, f"{key}:", fragment)


def test_unknown_connection_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, with_changes({"connections": {"idle_timeout": 60}}))
    status, err = run_cli(capsys, "--config", str(path), "stats")
    assert_config_error(status, err, "connections.idle_timeout: unknown key",
                        "network_timeout")


@pytest.mark.parametrize(("uri", "shown"), [
    ("mongodb://127.0.0.1:27017/", "mongodb://127.0.0.1:27017/"),
    ("mongodb://reader:s3cret@db1:27017,db2:27017/?authSource=admin",
     "mongodb://reader:***@db1:27017,db2:27017/?authSource=admin"),
    ("mongodb+srv://app:p%40ss@cluster.example.org/", "mongodb+srv://app:***@cluster.example.org/"),
    ("mongodb://user@host/", "mongodb://user@host/"),
])
def test_a_database_uri_is_shown_without_its_password(uri: str, shown: str) -> None:
    assert config.display_uri(uri) == shown


# --- receive -------------------------------------------------------------------------


def test_shipped_receive_settings_are_the_defaults() -> None:
    shipped = config.load(Path(__file__).resolve().parents[2] / "config" / "archive.yaml", {})
    assert shipped.receive == config.Receive()
    assert shipped.receive.folder.startswith("data/")


def test_receive_threshold_takes_whole_and_fractional_mebibytes(tmp_path: Path) -> None:
    for value, expected in ((0, 0), (0.5, 512 * 1024), (16, 16 << 20), (1024, 1 << 30)):
        cfg = config.load(write(tmp_path, with_changes(
            {"receive": {"in_memory_max_mb": value}})), {})
        assert cfg.receive.in_memory_max_bytes == expected


@pytest.mark.parametrize("changes,key,fragment", [
    ({"receive": {"in_memory_max_mb": -1}}, "receive.in_memory_max_mb", "between 0"),
    ({"receive": {"in_memory_max_mb": 1025}}, "receive.in_memory_max_mb", "and 1024"),
    ({"receive": {"in_memory_max_mb": float("nan")}}, "receive.in_memory_max_mb", "between"),
    ({"receive": {"in_memory_max_mb": "16MB"}}, "receive.in_memory_max_mb", "expected float"),
    ({"receive": {"folder": ""}}, "receive.folder", "a folder is needed"),
    ({"receive": {"folder": 3}}, "receive.folder", "expected str"),
    ({"receive": {"spool": "x"}}, "receive.spool", "unknown key"),
    ({"receive": "data/incoming"}, "receive", "expected a mapping"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_receive_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              changes: dict[str, Any], key: str, fragment: str) -> None:
    status, err = run_cli(capsys, "--config", str(write(tmp_path, with_changes(changes))),
                          "stats")
    assert_config_error(status, err, f"{key}:", fragment)


def test_serve_refuses_a_receive_folder_it_cannot_write(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = config.load(write(tmp_path, with_changes(
        {"receive": {"folder": str(blocker / "incoming")}})), {})
    assert cli.unwritable_folder(cfg, "serve") == \
        f"{blocker / 'incoming'}: not writable (Not a directory)"
    assert cli.unwritable_folder(cfg, "import") is None  # only the node receives

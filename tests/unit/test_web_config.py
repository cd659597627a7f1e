"""The ``http:`` section (DICOMweb): defaults, the environment override, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from archive import config
from archive.config import ConfigError

BASE = {"database": {"embedded": {"enabled": False}}}


def load(tmp_path: Path, data: dict, environ: dict[str, str] | None = None) -> config.Config:
    path = tmp_path / "archive.yaml"
    path.write_text(yaml.safe_dump({**BASE, **data}), encoding="utf-8")
    return config.load(path, environ or {})


def test_defaults_and_shipped_file(tmp_path: Path) -> None:
    cfg = load(tmp_path, {})
    assert (cfg.http.enabled, cfg.http.port, cfg.http.max_results) == (True, 8080, 10000)
    shipped = config.load(Path(__file__).resolve().parents[2] / "config" / "archive.yaml", {})
    assert shipped.http == cfg.http


def test_environment_port(tmp_path: Path) -> None:
    assert load(tmp_path, {}, {"ARCHIVE_HTTP_PORT": "9090"}).http.port == 9090


@pytest.mark.parametrize("http,message", [
    ({"port": 0}, "http.port"),
    ({"port": 11112}, "http.port: 11112 is the DICOM port too"),
    ({"max_results": 0}, "http.max_results"),
    ({"enabled": "yes"}, "http.enabled"),
    ({"base_path": "/x"}, "http.base_path: unknown key"),
    ({"public_url": "pacs.example.org/dicom-web"}, "http.public_url: .* is not an http"),
    ({"public_url": "https://pacs.example.org/dicom-web?x=1"}, "http.public_url"),
    ({"fhir_timezone": "Europe/Paris"}, "http.fhir_timezone: .* is not a UTC offset"),
    ({"fhir_timezone": "+14:30"}, "http.fhir_timezone"),
    ({"fhir_timezone": "0100"}, "http.fhir_timezone"),
    ({"max_connections": 0}, "http.max_connections"),
    ({"connections_per_peer": 0}, "http.connections_per_peer"),
    ({"max_connections": 10, "connections_per_peer": 11},
     r"http.connections_per_peer \(11\) is more than http.max_connections \(10\)"),
    ({"request_timeout": 0}, "http.request_timeout"),
    ({"request_timeout": "30s"}, "http.request_timeout"),
    ({"min_body_rate": 0}, "http.min_body_rate"),
    ({"min_body_rate": "1k"}, "http.min_body_rate"),
])
def test_refusals(tmp_path: Path, http: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, {"http": http})


def test_disabled_may_share_nothing(tmp_path: Path) -> None:
    assert load(tmp_path, {"http": {"enabled": False, "port": 11112}}).http.enabled is False


def test_tls_and_cors_are_off_by_default(tmp_path: Path) -> None:
    http = load(tmp_path, {}).http
    assert (http.tls.certificate, http.tls.private_key) == ("", "")
    assert (http.cors.allow_origins, http.cors.allow_credentials) == ([], False)


def test_tls_and_cors_as_written(tmp_path: Path) -> None:
    http = load(tmp_path, {"http": {
        "tls": {"certificate": "c.pem", "private_key": "k.pem"},
        "cors": {"allow_origins": ["https://viewer.example.org", "http://[::1]:3000",
                                   "http://localhost:3000"], "allow_credentials": True}}}).http
    assert (http.tls.certificate, http.tls.private_key) == ("c.pem", "k.pem")
    assert http.cors.allow_origins[1] == "http://[::1]:3000" and http.cors.allow_credentials


@pytest.mark.parametrize("http,message", [
    ({"tls": {"private_key": "k.pem"}}, "http.tls.private_key: given without"),
    ({"tls": {"certificate": "c.pem", "ca_certificate": "ca.pem"}},
     "http.tls.ca_certificate: unknown key"),
    ({"cors": {"allow_origins": ["https://viewer.example.org/"]}}, "is not an origin"),
    ({"cors": {"allow_origins": ["viewer.example.org"]}}, "is not an origin"),
    ({"cors": {"allow_origins": "https://viewer.example.org"}}, "expected a list"),
    ({"cors": {"allow_origins": ["*"], "allow_credentials": True}},
     "allow_credentials: not with allow_origins '\\*'"),
])
def test_tls_and_cors_refusals(tmp_path: Path, http: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, {"http": http})

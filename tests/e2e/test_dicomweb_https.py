"""DICOMweb over HTTPS (``http.tls``), over the network: ``archive serve`` with the real
FerretDB, a certificate made by the openssl command for the test, httpx verifying it;
certificate files that cannot be used stop the node with one line."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import node_environment, write_config
from helpers import ROOT

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

VIEWER = "http://viewer.example:3000"  # an origin the node was not told of


def test_https_with_the_configured_certificate(node_factory: Any,
                                               certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    node = node_factory({"http": {"tls": {"certificate": str(cert),
                                          "private_key": str(key)}}})
    url = f"https://127.0.0.1:{node.http_port}/dicom-web/studies"
    trusted = ssl.create_default_context(cafile=str(cert))
    answer = httpx.get(url, verify=trusted, timeout=30)
    assert answer.status_code == 200 and answer.json() == []
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(url, timeout=30)  # the system's CAs do not know it: it is ours
    with pytest.raises(httpx.HTTPError):  # no plain HTTP on the port
        httpx.get(url.replace("https://", "http://"), timeout=10)
    assert f"DICOMweb listening on https://127.0.0.1:{node.http_port}/dicom-web" in node.log()
    assert "HTTP connection from 127.0.0.1 closed: TLS handshake failed (HTTP_REQUEST)" \
        in node.log()  # one line, no traceback
    # no CORS unless configured: a browser gets no permission from this node
    answer = httpx.get(url, verify=trusted, headers={"Origin": VIEWER}, timeout=30)
    assert not [h for h in answer.headers if h.startswith("access-control-")]


def _serve(ferretdb: Any, tmp_path: Path, tls: dict[str, str]
           ) -> subprocess.CompletedProcess[str]:
    config = write_config(tmp_path / "node", ferretdb, "webtls", {"http": {"tls": tls}})
    return subprocess.run([sys.executable, "-m", "archive", "serve", "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT, env=node_environment(),
                          timeout=60, stdin=subprocess.DEVNULL)


def test_a_missing_certificate_stops_the_node_with_one_line(
        ferretdb: Any, tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    missing = tmp_path / "nowhere.pem"
    done = _serve(ferretdb, tmp_path, {"certificate": str(missing),
                                       "private_key": str(certificate[1])})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == \
        f"archive: http.tls.certificate: {missing}: cannot read (No such file or directory)"
    assert "Traceback" not in done.stderr


def test_a_certificate_that_is_not_one_stops_the_node(
        ferretdb: Any, tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    other_key = tmp_path / "other.pem"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
                    "-out", str(other_key)], check=True, capture_output=True, timeout=60)
    encrypted = tmp_path / "encrypted.pem"  # must fail, not prompt for a pass phrase
    subprocess.run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:pw",
                    "-out", str(encrypted)], check=True, capture_output=True, timeout=60)
    for tls, expected in (({"certificate": str(key), "private_key": str(key)}, str(key)),
                          ({"certificate": str(cert), "private_key": str(other_key)},
                           "KEY_VALUES_MISMATCH"),
                          ({"certificate": str(cert), "private_key": str(encrypted)},
                           "(unencrypted) private key")):
        done = _serve(ferretdb, tmp_path, tls)
        assert done.returncode == 2, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("archive: http.tls: ") and expected in last, last
        assert "Traceback" not in done.stderr

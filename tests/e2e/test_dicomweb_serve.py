"""``archive serve`` and its DICOMweb port: switched off, a port already taken, and a
SIGTERM while a STOW-RS request is being received (it finishes, then the node stops)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import node_environment, write_config
from helpers import ROOT, echoscu, free_port, image_dataset, port_open, to_part10

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]


def test_http_disabled(node_factory: Any) -> None:
    node = node_factory({"http": {"enabled": False, "port": free_port()}})
    assert echoscu(node).returncode == 0
    assert not port_open(node.config["http"]["port"])
    assert "DICOMweb" not in node.log()


def test_http_port_taken_is_one_line_and_status_2(ferretdb: Any, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        config = write_config(tmp_path / "node", ferretdb, "webtaken",
                              {"http": {"port": port}})
        done = subprocess.run([sys.executable, "-m", "archive", "serve", "--config",
                               str(config)], capture_output=True, text=True, cwd=ROOT,
                              env=node_environment(), timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == \
        f"archive: http.port {port}: cannot listen on 127.0.0.1:{port}"


def test_sigterm_lets_a_stow_in_flight_finish(node_factory: Any) -> None:
    node = node_factory()
    ds = image_dataset(patient_id="TERM-1")
    data = to_part10(ds)
    boundary = "termboundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
            + f"\r\n--{boundary}--\r\n".encode())
    half = len(body) // 2
    with socket.create_connection(("127.0.0.1", node.http_port), timeout=30) as sock:
        sock.sendall((f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
                      f'Content-Type: multipart/related; type="application/dicom"; '
                      f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
                      "Connection: close\r\n\r\n").encode() + body[:half])
        time.sleep(0.3)
        node.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert node.running  # waiting for the request
        sock.sendall(body[half:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert node.process.wait(30) == 0
    assert node.db.instances.find_one({"_id": ds.SOPInstanceUID}) is not None
    log = node.log()
    assert log.index("DICOMweb stopped") < log.index("stopping: waiting for stores")
    # one core context for both front ends: built (and its backend announced) once
    assert log.count(" authentication: ") == 1


def test_public_url_is_the_base_of_every_url_in_answers(node_factory: Any) -> None:
    """Behind a reverse proxy the URLs in answers are the proxy's, not the node's."""
    public = "https://pacs.example.org/dicom-web"
    node = node_factory({"http": {"public_url": public + "/"}})
    ds = image_dataset(patient_id="PROXY-1")
    boundary = "proxyboundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + to_part10(ds) + f"\r\n--{boundary}--\r\n".encode())
    stored = requests.post(f"{node.http_url}/studies", data=body, timeout=30, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert stored.status_code == 200, stored.text
    study = f"{public}/studies/{ds.StudyInstanceUID}"
    assert stored.json()["00081190"]["Value"] == [study]
    [found] = requests.get(f"{node.http_url}/studies", timeout=30,
                           params={"PatientID": "PROXY-1"}).json()
    assert found["00081190"]["Value"] == [study]
    [metadata] = requests.get(f"{node.http_url}/studies/{ds.StudyInstanceUID}/metadata",
                              timeout=30).json()
    assert metadata["7FE00010"]["BulkDataURI"] == (
        f"{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        "/bulkdata/7FE00010")
    # FHIR: its own base beside the DICOMweb one, the DICOMweb one as the endpoint
    fhir = node.http_url.replace("/dicom-web", "/fhir")
    bundle = requests.get(f"{fhir}/ImagingStudy", params={"patient": "PROXY-1",
                                                          "_count": 1}, timeout=30).json()
    [entry] = bundle["entry"]
    assert entry["fullUrl"] == f"https://pacs.example.org/fhir/ImagingStudy/{ds.StudyInstanceUID}"
    assert bundle["link"][0]["url"].startswith("https://pacs.example.org/fhir/ImagingStudy?")
    assert entry["resource"]["contained"][0]["address"] == public

"""HTTP connections that hold the node (``archive.web.guard``, ``archive.dimse.reactors``):
the node as a subprocess on the real FerretDB, raw TCP clients, DCMTK.

- a thousand idle HTTP connections do not cost the DICOM service: associations are
  served while the node holds more than 1,024 descriptors (pynetdicom's ``select``
  aborted them);
- an HTTP connection over ``http.max_connections`` or ``http.connections_per_peer`` is
  closed at once, one that sends no whole request head within ``http.request_timeout``
  (trickling or silent) is closed then; requests, and keep-alive between them, work as
  before;
- a request body that comes slower than ``http.min_body_rate`` is closed once its grace
  has run out; one above the rate is served, and so is a large one while the node,
  not the client, is what holds it up;
- with ``http.tls``, a connection is counted from the moment it opens, and one that has
  not finished its TLS handshake within ``http.request_timeout`` is closed (asyncio
  would keep it 60 s, uncounted).
"""

from __future__ import annotations

import base64
import http.client
import os
import resource
import select
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import (
    echoscu,
    image_dataset,
    storescu,
    stow_body,
    to_part10,
    wait_for,
    write_images,
)

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=(source, 0))
    sock.settimeout(10)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` (EOF or reset) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except (ConnectionResetError, ssl.SSLEOFError):  # no TLS close_notify: ended too
        return True
    except TimeoutError:
        return False


def _get(sock: socket.socket, path: str = "/dicom-web/studies?limit=1") -> bytes:
    """One request on an open connection (keep-alive), its response read whole (head
    and Content-Length bytes of body); the status line."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a response"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of a response"
        body += chunk
    assert len(body) == length, "more bytes than the response holds"
    return head.split(b"\r\n", 1)[0]


def test_idle_http_connections_leave_the_dicom_service_alone(node_factory: Any,
                                                              tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if wanted < 2400:
        pytest.skip(f"this machine lets a process open {hard} files: 2,400 are needed")
    if soft < wanted:  # the node (a child) inherits it; so do this test's own sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    node = node_factory({"http": {"max_connections": 2000, "connections_per_peer": 2000,
                                  "request_timeout": 120}})
    held = [_connect(node.http_port) for _ in range(1100)]
    try:
        wait_for(lambda: len(os.listdir(f"/proc/{node.pid}/fd")) > 1100, 20)
        assert echoscu(node).returncode == 0, node.log()[-2000:]
        files = write_images(tmp_path, 5)
        result = storescu(node, *files)
        assert set(result.responses.values()) == {"Success"}, result.output
    finally:
        for sock in held:
            sock.close()


def test_http_connection_limits_and_request_timeout(node_factory: Any) -> None:
    node = node_factory({"http": {"max_connections": 12, "connections_per_peer": 8,
                                  "request_timeout": 1.5}})
    port = node.http_port
    time.sleep(1)  # the start-up's probe of the port has been let go
    # per peer: the 9th connection from one address is closed at once, not another's
    mine = [_connect(port) for _ in range(8)]
    extra = _connect(port)
    assert _closed_within(extra, 1.0)
    others = [_connect(port, "127.0.0.2") for _ in range(4)]
    assert not _closed_within(others[0], 0.3)
    # everyone's: the 13th is closed at once, whoever opens it
    over = _connect(port, "127.0.0.3")
    assert _closed_within(over, 1.0)
    # the DICOM service is not concerned
    assert echoscu(node).returncode == 0
    # silent connections are closed once request_timeout has passed ...
    began = time.monotonic()
    assert all(_closed_within(sock, 5) for sock in mine + others)
    assert 1.0 < time.monotonic() - began < 5
    # ... and so is one trickling a request head, whatever it sends
    trickling = _connect(port)
    began = time.monotonic()
    closed = False
    for byte in b"GET /dicom-web/studies HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40:
        try:
            trickling.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        if _closed_within(trickling, 0.1):
            closed = True
            break
    assert closed and time.monotonic() - began < 5
    # requests are served, and the connection kept between them (keep-alive)
    with _connect(port) as sock:
        assert _get(sock).startswith(b"HTTP/1.1 200")
        time.sleep(0.5)
        assert _get(sock).startswith(b"HTTP/1.1 200")
        assert _closed_within(sock, 8)  # idle after the answers: closed in the end
    log = node.log()
    assert "HTTP connection from 127.0.0.1 refused: http.connections_per_peer (8)" in log
    assert "HTTP connection from 127.0.0.3 refused: the server holds " \
           "http.max_connections (12)" in log
    assert "closed: no request within http.request_timeout (1.5 s)" in log


def test_tls_handshakes_count_and_are_held_to_request_timeout(
        node_factory: Any, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    node = node_factory({"http": {"max_connections": 12, "connections_per_peer": 4,
                                  "request_timeout": 1.5,
                                  "tls": {"certificate": str(cert), "private_key": str(key)}}})
    port = node.http_port
    trusted = ssl.create_default_context(cafile=str(cert))
    time.sleep(1)  # the start-up's probe of the port has been let go
    silent = [_connect(port) for _ in range(4)]  # no ClientHello: handshakes not begun
    extra = _connect(port)
    assert _closed_within(extra, 1.0), "the 5th connection of one peer was not refused"
    # another peer is served meanwhile, over TLS
    https = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=trusted,
                                        source_address=("127.0.0.2", 0))
    https.request("GET", "/dicom-web/studies")
    assert https.getresponse().status == 200
    https.close()
    began = time.monotonic()
    assert all(_closed_within(sock, 5) for sock in silent)
    assert 1.0 < time.monotonic() - began < 5
    # a handshake done, then nothing: closed once request_timeout has passed since it opened
    sock = _connect(port)
    time.sleep(1.0)
    quiet = trusted.wrap_socket(sock, server_hostname="127.0.0.1")
    began = time.monotonic()
    assert _closed_within(quiet, 5)
    assert time.monotonic() - began < 1.2
    log = node.log()
    assert "HTTP connection from 127.0.0.1 refused: http.connections_per_peer (4) reached" \
        in log
    assert "HTTP connection from 127.0.0.1 closed: no TLS handshake within " \
           "http.request_timeout (1.5 s)" in log
    assert "Traceback" not in log and "Exception in callback" not in log


def _stow_head(port: int, length: int, content_type: str) -> socket.socket:
    """A connection that has sent the head of a STOW-RS request (as admin, whom the
    shipped rules let store), its body still to come."""
    sock = _connect(port)
    sock.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Basic {base64.b64encode(b'admin:x').decode()}\r\n"
                 f"Content-Type: {content_type}\r\nAccept: application/dicom+json\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode())
    return sock


def _trickle(sock: socket.socket, body: bytes, rate: float, piece: int = 200) -> bool:
    """Send ``body`` at ``rate`` bytes a second; False if the server closed first.  What
    the server answers meanwhile is left to read."""
    for start in range(0, len(body), piece):
        try:
            sock.sendall(body[start:start + piece])
            time.sleep(piece / rate)
            if select.select([sock], [], [], 0)[0] and sock.recv(1, socket.MSG_PEEK) == b"":
                return False
        except OSError:
            return False
    return True


def test_a_request_body_slower_than_min_body_rate_is_cut(node_factory: Any) -> None:
    """A STOW-RS body trickled below http.min_body_rate is closed once its grace
    (http.request_timeout) and what it sent have run out; one sent above the rate is
    stored, though it takes longer than request_timeout; so is a large one sent fast."""
    node = node_factory({"http": {"request_timeout": 1.5, "min_body_rate": 4000}})
    time.sleep(1)  # the start-up's probe of the port has been let go
    body, content_type = stow_body([to_part10(image_dataset())])
    assert len(body) > 8000
    # 1,000 bytes/s against 4,000: cut after ~1.5 s + 1/4 of the time it sent
    slow = _stow_head(node.http_port, len(body), content_type)
    began = time.monotonic()
    assert not _trickle(slow, body, 1000)
    assert 1.5 < time.monotonic() - began < 5
    # 6,000 bytes/s: seconds for the body, more than request_timeout, and stored
    body, content_type = stow_body([to_part10(image_dataset()) for _ in range(2)])
    steady = _stow_head(node.http_port, len(body), content_type)
    began = time.monotonic()
    assert _trickle(steady, body, 6000)
    assert time.monotonic() - began > 1.5
    steady.settimeout(30)
    assert steady.recv(65536).startswith(b"HTTP/1.1 200"), node.log()[-2000:]
    steady.close()
    assert "closed: request body slower than http.min_body_rate (4000 bytes/s)" in node.log()


def test_the_body_clock_stops_while_the_node_has_not_read_what_came(
        node_factory: Any) -> None:
    """A large STOW-RS sent at full speed: the node stores each instance as its part
    arrives and stops reading meanwhile (uvicorn's flow control), for far longer than
    the body's grace and what its bytes earn at this rate. That time is the node's, not
    the client's: the upload is served whole."""
    node = node_factory({"http": {"request_timeout": 1.0, "min_body_rate": 1e7}})
    images = [to_part10(image_dataset()) for _ in range(400)]
    body, content_type = stow_body(images)
    began = time.monotonic()
    answer = requests.post(f"{node.http_url}/studies", data=body, auth=("admin", "x"),
                           timeout=120, headers={"Content-Type": content_type})
    took = time.monotonic() - began
    assert answer.status_code == 200, answer.text[:500]
    assert len(answer.json()["00081199"]["Value"]) == 400
    assert took > 1.0 + len(body) / 1e7, f"stored in {took:.1f} s: no pause was tested"

"""HTTP connections that hold the node (``archive.web.guard``, ``archive.dimse.reactors``):
the node as a subprocess on the real FerretDB, raw TCP clients, DCMTK.

- a thousand idle HTTP connections do not cost the DICOM service: associations are
  served while the node holds more than 1,024 descriptors (pynetdicom's ``select``
  aborted them);
- an HTTP connection over ``http.max_connections`` or ``http.connections_per_peer`` is
  closed at once, one that sends no whole request head within ``http.request_timeout``
  (trickling or silent) is closed then; requests, and keep-alive between them, work as
  before.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import echoscu, storescu, wait_for, write_images

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
    except ConnectionResetError:
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

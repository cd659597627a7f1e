"""The HTTP server: uvicorn in a thread of the ``archive serve`` process.

It serves the archive's :class:`~archive.context.Context`, the object the DICOM node
serves too.  Started after the context and the node, stopped before them:
:meth:`WebServer.stop` stops accepting, lets requests in flight finish (a STOW-RS part
being stored is also counted by the context's ``begin_store``, which the node's and the
context's stops wait for), then returns.

With ``http.tls`` it serves HTTPS only (TLS 1.2 or later): the certificate and key are
loaded before anything listens, and a file that is missing, unreadable or not a
certificate (key) stops ``archive serve`` with one line naming the key at fault.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time

import uvicorn

from archive.config import Http, HttpTls
from archive.context import Context
from archive.web import console, guard
from archive.web.app import BASE_PATH, create_app

log = logging.getLogger("archive.web")


class WebServerError(Exception):
    """The server could not start (the port is taken, the address is not ours)."""


def ssl_context(tls: HttpTls) -> ssl.SSLContext | None:
    """The server side of ``http.tls`` (None: plain HTTP); WebServerError naming the
    key at fault when its files cannot be used."""
    if not tls.certificate:
        return None
    for key, path in (("certificate", tls.certificate), ("private_key", tls.private_key)):
        if not path:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise WebServerError(f"http.tls.{key}: {path}: cannot read "
                                 f"({exc.strerror or type(exc).__name__})") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:  # an encrypted key must fail here, not prompt for a pass phrase
        context.load_cert_chain(tls.certificate, tls.private_key or None, password=b"")
    except (ssl.SSLError, ValueError) as exc:
        key = f" with key {tls.private_key}" if tls.private_key else ""
        raise WebServerError(f"http.tls: {tls.certificate}{key}: not a usable PEM "
                             f"certificate and (unencrypted) private key "
                             f"({getattr(exc, 'reason', None) or exc})") from None
    return context


class WebServer:
    def __init__(self, context: Context, host: str, port: int, grace_seconds: float = 30.0,
                 tls: HttpTls | None = None) -> None:
        self.host, self.port = host, port
        http = getattr(context.cfg, "http", None) or Http()
        self.console = http.console
        tls = tls or HttpTls()
        self.ssl = ssl_context(tls)
        app = create_app(context, console.routes if self.console else None)
        self.config = uvicorn.Config(
            app, host=host, port=port, log_config=None, access_log=False, lifespan="off",
            server_header=False, timeout_graceful_shutdown=int(grace_seconds),
            timeout_keep_alive=5, http=guard.protocol(http, self.ssl))  # guard: TLS
        self.server = uvicorn.Server(self.config)
        self.thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> None:
        """Serve in a thread; return once listening (WebServerError if it cannot)."""
        self.thread = threading.Thread(target=self._run, name="dicomweb", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise WebServerError(f"http.port {self.port}: cannot listen on "
                                     f"{self.host}:{self.port}")
            time.sleep(0.02)
        scheme = "https" if self.ssl else "http"
        log.info("DICOMweb listening on %s://%s:%d%s%s", scheme, self.host, self.port,
                 BASE_PATH, f", the web console on {scheme}://{self.host}:{self.port}/"
                 if self.console else " (web console off)")

    def _run(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot bind:
            self.server.run()                  # start() reports it

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Stop accepting, let the requests in flight finish (up to the grace)."""
        if self.thread is None:
            return
        self.server.should_exit = True
        self.thread.join(grace_seconds + 5)
        log.info("DICOMweb stopped")

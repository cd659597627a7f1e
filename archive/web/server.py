"""The HTTP server: uvicorn in a thread of the ``archive serve`` process.

It serves the archive's :class:`~archive.context.Context`, the object the DICOM node
serves too.  Started after the context and the node, stopped before them:
:meth:`WebServer.stop` stops accepting, lets requests in flight finish (a STOW-RS part
being stored is also counted by the context's ``begin_store``, which the node's and the
context's stops wait for), then returns.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import uvicorn

from archive.context import Context
from archive.web.app import BASE_PATH, create_app

log = logging.getLogger("archive.web")


class WebServerError(Exception):
    """The server could not start (the port is taken, the address is not ours)."""


class WebServer:
    def __init__(self, context: Context, host: str, port: int, grace_seconds: float = 30.0) -> None:
        self.host, self.port = host, port
        self.config = uvicorn.Config(
            create_app(context), host=host, port=port, log_config=None, access_log=False,
            lifespan="off", server_header=False, timeout_graceful_shutdown=int(grace_seconds),
            timeout_keep_alive=5)
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
        log.info("DICOMweb listening on http://%s:%d%s", self.host, self.port, BASE_PATH)

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

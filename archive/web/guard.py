"""HTTP connections: how many one client may hold, and how long it may stay silent.

uvicorn (0.55, h11) keeps a connection that sends nothing for as long as its client
keeps it open: its keep-alive timer starts only after a response, and any byte
received stops it.  1,100 idle connections made the node's process hold 1,100
descriptors -- pynetdicom then aborted every new DICOM association, before
:mod:`archive.dimse.reactors` watched sockets with ``poll`` -- and a few thousand more
would take every descriptor the process may open.  Here a connection

- is closed at once when the server already holds ``http.max_connections``, or its
  peer (IP address) ``http.connections_per_peer`` (a browser opens 6 per host; a
  reverse proxy's many clients share one address: raise it there);
- is closed when it has not sent a whole request head ``http.request_timeout`` seconds
  after it opened, or after the previous response ended (a trickle does not restart
  the clock);
- is closed when a request body comes slower than ``http.min_body_rate`` bytes a
  second: the body has ``request_timeout`` seconds, and one more second for every
  ``min_body_rate`` bytes received (Apache's mod_reqtimeout).  The clock runs only
  while the node waits for the client: not while the application has not read what
  came (uvicorn's flow control pauses reading), nor while a client that asked for
  ``100-continue`` waits for it.  A request whose body is whole has no limit here.

With ``http.tls``, the TLS handshake is done here rather than by uvicorn's server, so
that a connection counts against the limits from the moment it opens (uvicorn counts
it once its protocol is made, after the handshake) and has ``http.request_timeout``
seconds, handshake included, to send its request head (asyncio's own handshake limit
is 60 s: connections that never finish one held the node's descriptors uncounted).

Refusals are logged one line per peer and reason at most every :data:`LOG_EVERY`
seconds, with how many there were.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from asyncio import sslproto
from collections.abc import Callable
from typing import ClassVar

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle
from uvicorn.protocols.utils import get_remote_addr

from archive.config import Http

log = logging.getLogger("archive.web")

#: Seconds between two log lines about one peer's refused or closed connections.
LOG_EVERY = 10.0
#: (peer, reason) -> (time of the last line, connections since)
_told: dict[tuple[str, str], tuple[float, int]] = {}


def protocol(http: Http, tls: ssl.SSLContext | None = None) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with ``http``'s limits (the ``http`` of uvicorn.Config);
    with ``tls``, serving HTTPS (uvicorn is then given no certificate of its own)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "max_connections": http.max_connections,
        "connections_per_peer": http.connections_per_peer,
        "request_timeout": http.request_timeout, "min_body_rate": http.min_body_rate,
        "tls": tls, "handshaking": set()})


class _WatchedFlow(FlowControl):
    """uvicorn's flow control, telling the connection when reading stops or resumes
    (the body's clock stops while the application has not read what came)."""

    def __init__(self, transport: asyncio.Transport, changed: Callable[[], None]) -> None:
        super().__init__(transport)
        self._changed = changed

    def pause_reading(self) -> None:
        super().pause_reading()
        self._changed()

    def resume_reading(self) -> None:
        super().resume_reading()
        self._changed()


class GuardedH11Protocol(H11Protocol):
    """One HTTP connection, closed when over a limit or silent too long (module
    docstring).  Runs in the server's event loop thread only."""

    max_connections: ClassVar[int]
    connections_per_peer: ClassVar[int]
    request_timeout: ClassVar[float]
    min_body_rate: ClassVar[float]
    tls: ClassVar[ssl.SSLContext | None] = None
    #: this server's connections in their TLS handshake (not in uvicorn's yet)
    handshaking: ClassVar[set[GuardedH11Protocol]]
    #: the peer's address, and when the connection opened (TLS: before its handshake)
    peer: str = "?"
    opened: float | None = None
    _deadline: asyncio.TimerHandle | None = None
    #: the request whose body is timed, its seconds left, since when they count (None:
    #: not counting), and the timer at their end
    _body_cycle: RequestResponseCycle | None = None
    _body_left: float = 0.0
    _body_since: float | None = None
    _body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.tls is not None and self.opened is None:  # a TCP connection: TLS first
            self._begin_tls(transport)
            return
        self.handshaking.discard(self)
        super().connection_made(transport)
        self.flow = _WatchedFlow(transport, self._time_body)
        if self.opened is None:
            self.peer, self.opened = self.client[0] if self.client else "?", self.loop.time()
        if self._refused():
            transport.close()
        else:  # the time the handshake took is the head's
            self._arm(self.opened + self.request_timeout - self.loop.time())

    def _refused(self) -> bool:
        """Whether this connection is one too many (told); counts those handshaking."""
        everyone = [*self.connections, *self.handshaking]
        if len(everyone) > self.max_connections:
            _tell(self.peer, f"refused: the server holds http.max_connections "
                             f"({self.max_connections})")
            return True
        if self.peer != "?" and sum(1 for c in everyone if getattr(c, "peer", None)
                                    == self.peer) > self.connections_per_peer:
            _tell(self.peer, f"refused: http.connections_per_peer "
                             f"({self.connections_per_peer}) reached")
            return True
        return False

    def _begin_tls(self, transport: asyncio.Transport) -> None:
        """Count the connection, then wrap it in TLS as asyncio's TLS server would, with
        ``request_timeout`` for the handshake; the wrapper calls connection_made again,
        with the TLS transport, once the handshake is done."""
        address = get_remote_addr(transport)
        self.peer, self.opened = address[0] if address else "?", self.loop.time()
        self.handshaking.add(self)
        if self._refused():
            self.handshaking.discard(self)
            self.transport = transport  # closed: uvicorn's connection_lost closes it too
            transport.close()
            return
        done = self.loop.create_future()
        done.add_done_callback(self._handshake_ended)
        wrapper = sslproto.SSLProtocol(self.loop, self, self.tls, done, server_side=True,
                                       ssl_handshake_timeout=self.request_timeout)
        transport.set_protocol(wrapper)
        wrapper.connection_made(transport)

    def _handshake_ended(self, done: asyncio.Future[None]) -> None:
        """Done, failed or given up by the client: no longer handshaking; a failure told."""
        self.handshaking.discard(self)
        failure = None if done.cancelled() else done.exception()
        if isinstance(failure, ConnectionAbortedError):  # SSLProtocol's handshake timeout
            _tell(self.peer, f"closed: no TLS handshake within http.request_timeout "
                             f"({self.request_timeout:g} s)")
        elif failure is not None:
            reason = getattr(failure, "reason", None) or type(failure).__name__
            _tell(self.peer, f"closed: TLS handshake failed ({reason})")

    def data_received(self, data: bytes) -> None:
        if self._body_cycle is not None and self._body_cycle is self.cycle:
            self._body_left += len(data) / self.min_body_rate
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            self._disarm()  # a request head arrived: it is being served
            if cycle is not self._body_cycle:  # its body's clock
                self._body_cycle, self._body_left = cycle, self.request_timeout
                self._body_since = None
        self._time_body()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # for the next request; a pipelined one disarms it at once
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._body_cycle = None
        self._time_body()
        super().connection_lost(exc)

    def _body_awaited(self) -> bool:
        """Whether the node waits for the client to send the body of the request."""
        cycle = self._body_cycle
        return (cycle is not None and cycle is self.cycle and cycle.more_body
                and not cycle.response_complete and not cycle.disconnected
                and not cycle.waiting_for_100_continue and not self.flow.read_paused
                and not self.transport.is_closing())

    def _time_body(self) -> None:
        """Charge the time waited for the body since the last call, then close the
        connection if its time is up, or set the timer for what is left."""
        now = self.loop.time()
        if self._body_since is not None:
            self._body_left -= now - self._body_since
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._body_since = now if self._body_awaited() else None
        if self._body_since is None:
            return
        if self._body_left > 0:
            self._body_timer = self.loop.call_later(self._body_left, self._time_body)
            return
        self._body_since = None
        _tell(self.peer, f"closed: request body slower than http.min_body_rate "
              f"({self.min_body_rate:g} bytes/s)")
        self.transport.close()

    def _arm(self, seconds: float | None = None) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(
            self.request_timeout if seconds is None else max(seconds, 0.0), self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.cycle is None or self.cycle.response_complete:
            _tell(self.peer, f"closed: no request within http.request_timeout "
                  f"({self.request_timeout:g} s)")
            self.transport.close()


def _tell(peer: str, reason: str) -> None:
    """One line per peer and reason every LOG_EVERY seconds, with the count."""
    key = (peer, reason)
    now = time.monotonic()
    last, count = _told.get(key, (-LOG_EVERY, 0))
    count += 1
    if now - last < LOG_EVERY:
        _told[key] = (last, count)
        return
    if len(_told) > 10_000:  # peers come and go: forget the old ones
        _told.clear()
    _told[key] = (now, 0)
    log.warning("HTTP connection from %s %s%s", peer, reason,
                f" ({count} since the last line)" if count > 1 else "")

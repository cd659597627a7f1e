"""pynetdicom's two reactor threads per association, woken by work instead of polling.

pynetdicom 3.0 runs two loops per association, and both poll:

- the DUL thread (``DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay`` (1 ms)
  whenever a turn found nothing to do, then checks the socket (a ``select`` with no
  timeout) and the queue of PDUs to send;
- the association thread (``Association._run_reactor``) sleeps 1 ms before every turn,
  then looks for a decoded DIMSE message, a release or abort, a dead DUL thread and the
  idle timer.

On one association, which is strictly sequential (the peer waits for each C-STORE
response), a request then waits up to a millisecond for the DUL thread to read it and
another for the association thread to see it, and the response up to a third one for
the DUL thread to send it; the ~2,000 idle turns a second cost CPU and the GIL that the
handler needs.  :func:`install` replaces both loops with the same loops (copied from
pynetdicom 3.0.4, the pinned version) in which only the wait differs:

- the DUL thread blocks in ``select`` on its socket and on a wake-up socket pair
  written whenever a primitive is queued to be sent (``to_provider_queue``) or the
  thread is told to stop (``_kill_thread``), at most until the ARTIM timer expires;
- the association thread waits on an event set whenever the DUL thread hands it a
  message or primitive (``dimse.msg_queue``, ``to_user_queue``), its DUL thread ends,
  it is told to stop (``_kill``), or a sender pauses it (``_reactor_checkpoint``
  cleared by pynetdicom's ``send_*``, or replaced by
  :func:`archive.dimse.common.reactor_held`).

Both waits end after :data:`LONGEST_WAIT` anyway, so a wake-up missed through some
path not listed here costs latency, never a hang (and the network idle timer is
checked as often).  Another pynetdicom version keeps its own loops (:func:`install`
checks the version).

Sockets are watched with ``poll``, here and in ``AssociationSocket.ready`` (replaced
too): pynetdicom's ``select`` refuses a descriptor of 1024 or more, which it took for
a closed connection and aborted the association at once -- so a process holding a
thousand descriptors (idle HTTP connections, say) answered every new association with
an abort.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import threading
import time
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket

log = logging.getLogger(__name__)

#: The pynetdicom versions whose loops these replace (copied from 3.0.4).
VERSIONS = ("3.0.",)
#: Longest a reactor waits without being woken (timers are checked this often).
LONGEST_WAIT = 0.05

LOGGER = logging.getLogger("pynetdicom.dul")
ASSOC_LOGGER = logging.getLogger("pynetdicom.association")

_installed = False


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A ``queue.Queue`` (its class swapped in place) that calls ``_on_put`` after each
    put."""

    _on_put: Any

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._on_put()


def _waking(q: queue.Queue, on_put: Any) -> None:  # type: ignore[type-arg]
    q.__class__ = _WakingQueue
    q._on_put = on_put  # type: ignore[attr-defined]


class _Waker:
    """A socket pair the DUL thread selects on; any thread writes a byte to wake it."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self._lock = threading.Lock()  # no byte written to a closed (reused) descriptor
        self.closed = False

    def wake(self) -> None:
        with self._lock:
            if self.closed:
                return
            with contextlib.suppress(OSError):  # full: it is awake already
                self.writer.send(b"\0")

    def drain(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except OSError:  # empty (or closed)
            pass

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self.reader.close()
            self.writer.close()


class _Checkpoint(threading.Event):
    """The association reactor's checkpoint: clearing it (a sender pausing the reactor)
    wakes the reactor so that it reaches the checkpoint at once."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake

    def clear(self) -> None:
        super().clear()
        self._wake.set()


def wake(assoc: Any) -> None:
    """Wake ``assoc``'s reactor if it waits (for a caller that changed what it checks)."""
    event = getattr(assoc, "_wake", None)
    if isinstance(event, threading.Event):
        event.set()


# -- the DUL thread ----------------------------------------------------------------------

def _dul_kill_get(self: Any) -> bool:
    return self.__dict__.get("_kill_flag", False)


def _dul_kill_set(self: Any, value: bool) -> None:
    self.__dict__["_kill_flag"] = value
    waker = self.__dict__.get("_waker")
    if value and waker is not None:
        waker.wake()


def _dul_wait(dul: Any) -> None:
    """Until the peer sends, a primitive is queued, the thread is told to stop, the
    ARTIM timer expires, or :data:`LONGEST_WAIT`."""
    waker: _Waker = dul._waker
    timeout = LONGEST_WAIT
    artim = dul.artim_timer
    if artim.timeout is not None and artim._start_time is not None \
            and artim._end_time is None:
        timeout = max(0.0, min(timeout, artim.remaining))
    watched: list[Any] = [waker.reader]
    sock = dul.socket
    raw = getattr(sock, "socket", None) if getattr(sock, "_is_connected", False) else None
    if raw is not None:
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return  # decrypted bytes waiting that poll cannot see
        watched.append(raw)
    try:
        _poll(watched, timeout)
    except (OSError, ValueError, TypeError):  # the socket closed meanwhile: the turn finds out
        time.sleep(dul._run_loop_delay)
    waker.drain()


def _poll(sockets: list[Any], timeout: float) -> list[tuple[int, int]]:
    """``poll`` for reading on ``sockets``, at most ``timeout`` seconds: what is ready
    (readable, at its end, or in error: a read finds out which)."""
    poller = select.poll()
    for sock in sockets:
        poller.register(sock, select.POLLIN)
    return poller.poll(int(timeout * 1000 + 0.999) if timeout > 0 else 0)


def _socket_ready(self: AssociationSocket) -> bool:
    """pynetdicom 3.0.4's ``AssociationSocket.ready`` with ``poll`` instead of
    ``select`` (module docstring): whether data waits to be read; Evt17 when the socket
    is closed."""
    if self.socket is None or self._is_connected is False:
        return False
    try:
        ready = _poll([self.socket], 0)
    except (OSError, ValueError, TypeError):  # closed: no descriptor left
        self.event_queue.put("Evt17")
        return False
    if any(events & select.POLLNVAL for _, events in ready):
        self.event_queue.put("Evt17")
        return False
    if isinstance(self.socket, ssl.SSLSocket):  # decrypted bytes poll cannot see (#528)
        return bool(ready) or bool(self.socket.pending())
    return bool(ready)


def _dul_init(self: Any, *args: Any, **kwargs: Any) -> None:
    self.__dict__["_waker"] = _Waker()
    _original_dul_init(self, *args, **kwargs)
    _waking(self.to_provider_queue, self._waker.wake)


def _dul_run_reactor(self: Any) -> None:
    """pynetdicom 3.0.4's ``DULServiceProvider.run_reactor``; the sleep replaced by
    :func:`_dul_wait`."""
    try:
        self._idle_timer.start()
        sleep = False

        while True:
            # Let the assoc reactor off the leash
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True

            if sleep:
                _dul_wait(self)

            if self._kill_thread:
                break

            # Check the ARTIM timer first so its event is placed on the queue
            #   ahead of any other events this loop
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                # Either encode and send a primitive OR receive and decode a PDU
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                LOGGER.error("Exception in DUL.run(), aborting association")
                LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            self.state_machine.do_action(event)
            sleep = False
    finally:
        self._waker.close()
        wake(self.assoc)  # its reactor checks whether this thread is alive


# -- the association thread --------------------------------------------------------------

def _assoc_kill_get(self: Any) -> bool:
    return self.__dict__.get("_kill_flag", False)


def _assoc_kill_set(self: Any, value: bool) -> None:
    self.__dict__["_kill_flag"] = value
    if value:
        wake(self)


def _checkpoint_get(self: Any) -> threading.Event:
    return self.__dict__["_checkpoint"]


def _checkpoint_set(self: Any, value: threading.Event) -> None:
    self.__dict__["_checkpoint"] = value
    wake(self)  # a reactor_held checkpoint: the reactor is to reach it now


def _assoc_init(self: Any, *args: Any, **kwargs: Any) -> None:
    self.__dict__["_wake"] = woken = threading.Event()
    _original_assoc_init(self, *args, **kwargs)
    checkpoint = _Checkpoint(woken)
    checkpoint.set()
    self._reactor_checkpoint = checkpoint
    _waking(self.dimse.msg_queue, woken.set)
    _waking(self.dul.to_user_queue, woken.set)


def _assoc_run_reactor(self: Any) -> None:
    """pynetdicom 3.0.4's ``Association._run_reactor``; the 1 ms sleep before every
    turn replaced by a wait for a wake-up when the previous turn served nothing."""
    woken: threading.Event = self._wake
    served = False
    self._is_paused = False
    while not self._kill:
        if not served:
            woken.wait(LONGEST_WAIT)
        woken.clear()
        served = False

        # Will block until `_reactor_checkpoint` is set()
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            served = True
            self._serve_request(msg, context_id)

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            ASSOC_LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            ASSOC_LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            ASSOC_LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()

            self.kill()
            return


_original_dul_init = DULServiceProvider.__init__
_original_assoc_init = Association.__init__


def install() -> bool:
    """Replace the loops (once per process) if pynetdicom is a version they were copied
    from; whether they are in place."""
    global _installed
    if _installed:
        return True
    if not pynetdicom.__version__.startswith(VERSIONS):
        log.warning("pynetdicom %s: its polling reactors kept (these are for %s)",
                    pynetdicom.__version__, ", ".join(VERSIONS))
        return False
    DULServiceProvider.__init__ = _dul_init  # type: ignore[method-assign]
    DULServiceProvider.run_reactor = _dul_run_reactor  # type: ignore[method-assign]
    DULServiceProvider._kill_thread = property(_dul_kill_get, _dul_kill_set)  # type: ignore[attr-defined]
    Association.__init__ = _assoc_init  # type: ignore[method-assign]
    Association._run_reactor = _assoc_run_reactor  # type: ignore[method-assign]
    Association._kill = property(_assoc_kill_get, _assoc_kill_set)  # type: ignore[attr-defined]
    Association._reactor_checkpoint = property(_checkpoint_get, _checkpoint_set)  # type: ignore[attr-defined]
    AssociationSocket.ready = property(_socket_ready)  # type: ignore[assignment,method-assign]
    _installed = True
    return True

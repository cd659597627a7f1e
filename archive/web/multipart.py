"""``multipart/related`` (RFC 2387 over RFC 2046) as DICOMweb sends it: written as a
stream of chunks, parsed incrementally.

The parser never holds a part: it hands out each part's bytes as they arrive, keeping
back only the few bytes that could be the start of the next delimiter, so a STOW-RS
request of gigabytes costs the node what its spool writes hold (``archive.web.stow``).
Everything that is no well-formed multipart body -- no delimiter, headers without their
blank line or longer than :data:`MAX_HEADER_BYTES`, a body cut before its closing
delimiter -- raises :class:`MultipartError`, whose message the client receives.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.message import Message

#: Longest header block of one part: DICOMweb parts carry one or two short headers.
MAX_HEADER_BYTES = 16 * 1024
#: RFC 2046 5.1.1: 1 to 70 characters of bchars, the last one no space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")

CRLF = b"\r\n"


class MultipartError(ValueError):
    """A body that is not the multipart message its Content-Type announces."""


@dataclass(frozen=True)
class MediaType:
    """A parsed Content-Type or Accept item: ``type/subtype`` (lower case) and its
    parameters (names lower case, values unquoted)."""

    type: str
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> MediaType:
        message = Message()
        message["content-type"] = text
        params = message.get_params(header="content-type") or []
        main = (params[0][0] if params else "").strip().lower()
        if "/" not in main:
            # email falls back to text/plain for junk; keep what was sent
            main = text.split(";", 1)[0].strip().lower()
        values = {}
        for name, value in params[1:]:
            values[name.strip().lower()] = str(value)
        return cls(main, values)


def boundary_of(content_type: str) -> str:
    """The boundary of a ``multipart/related`` Content-Type, checked (RFC 2046)."""
    media = MediaType.parse(content_type)
    if not media.type.startswith("multipart/"):
        raise MultipartError(f"not a multipart body: {media.type or 'no Content-Type'}")
    boundary = media.params.get("boundary")
    if not boundary:
        raise MultipartError("multipart Content-Type without a boundary parameter")
    if not _BOUNDARY.fullmatch(boundary):
        raise MultipartError("invalid multipart boundary (RFC 2046: 1-70 characters)")
    return boundary


# --- writing ---------------------------------------------------------------------------


def new_boundary() -> str:
    return secrets.token_hex(16)


def part_header(boundary: str, content_type: str, extra: Iterable[tuple[str, str]] = ()
                ) -> bytes:
    """The delimiter and headers that open one part (after the previous part)."""
    lines = [f"--{boundary}", f"Content-Type: {content_type}",
             *(f"{name}: {value}" for name, value in extra)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


#: Bytes a streamed body is sent in at most (pieces of many small instances joined).
PIECE_BYTES = 1024 * 1024


def coalesce(chunks: Iterable[bytes], size: int = PIECE_BYTES) -> Iterator[bytes]:
    """The same bytes in pieces of about ``size``: each piece a streamed response
    yields costs a hop to the event loop and a socket write (0.5 ms of the node's CPU
    per instance of a study sent part by part, measured); a large chunk passes whole."""
    pending: list[bytes] = []
    held = 0
    for chunk in chunks:
        pending.append(chunk)
        held += len(chunk)
        if held >= size:
            yield b"".join(pending)
            pending, held = [], 0
    if pending:
        yield b"".join(pending)


def closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("latin-1")


def write(boundary: str, parts: Iterable[tuple[str, Iterable[bytes]]]) -> Iterator[bytes]:
    """A multipart body, chunk by chunk, from ``(content type, chunks)`` per part."""
    for content_type, chunks in parts:
        yield part_header(boundary, content_type)
        yield from chunks
        yield CRLF
    yield closing(boundary)


# --- parsing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PartStart:
    """A part begins; its headers, names lower case."""

    headers: dict[str, str]


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd

_PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _EPILOGUE = range(5)


class Parser:
    """Incremental parser: :meth:`feed` bytes as they arrive, get events back;
    :meth:`close` at the end of the body."""

    def __init__(self, boundary: str) -> None:
        self.delimiter = b"\r\n--" + boundary.encode("latin-1")
        # the first delimiter may open the body without a CRLF before it
        self._buffer = bytearray(CRLF)
        self._state = _PREAMBLE
        self.parts = 0

    def feed(self, data: bytes) -> list[Event]:
        self._buffer += data
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def close(self) -> list[Event]:
        """Events left at the end of the body; raises if it was cut short."""
        events = self.feed(b"")
        if self._state == _PREAMBLE:
            raise MultipartError("no multipart delimiter in the body (wrong boundary?)")
        if self._state != _EPILOGUE:
            raise MultipartError("multipart body cut short: no closing delimiter")
        return events

    def _step(self, events: list[Event]) -> bool:
        """Consume what the buffer allows in the current state; whether to go on."""
        buf = self._buffer
        if self._state == _PREAMBLE:
            at = buf.find(self.delimiter)
            if at < 0:  # the preamble is ignored: keep only a possible delimiter start
                del buf[: max(0, len(buf) - len(self.delimiter) + 1)]
                return False
            del buf[: at + len(self.delimiter)]
            self._state = _AFTER_DELIMITER
            return True
        if self._state == _AFTER_DELIMITER:
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self._state = _EPILOGUE
                return True
            end = buf.find(CRLF)
            if end < 0:
                if len(buf) > 1024:
                    raise MultipartError("malformed multipart delimiter line")
                return False
            if buf[:end].strip(b" \t"):  # only transport padding may follow a boundary
                raise MultipartError("malformed multipart delimiter line")
            del buf[: end + 2]
            self._state = _HEADERS
            return True
        if self._state == _HEADERS:
            if buf[:2] == CRLF:  # a part without headers
                headers, consumed = b"", 2
            else:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEADER_BYTES:
                        raise MultipartError(f"part headers longer than "
                                             f"{MAX_HEADER_BYTES} bytes")
                    return False
                headers, consumed = bytes(buf[:end]), end + 4
            if consumed - 4 > MAX_HEADER_BYTES:
                raise MultipartError(f"part headers longer than {MAX_HEADER_BYTES} bytes")
            del buf[:consumed]
            self.parts += 1
            events.append(PartStart(_headers(headers)))
            self._state = _BODY
            return True
        if self._state == _BODY:
            at = buf.find(self.delimiter)
            if at < 0:
                keep = len(self.delimiter) - 1
                if len(buf) > keep:
                    events.append(PartData(bytes(buf[: len(buf) - keep])))
                    del buf[: len(buf) - keep]
                return False
            if at:
                events.append(PartData(bytes(buf[:at])))
            del buf[: at + len(self.delimiter)]
            events.append(PartEnd())
            self._state = _AFTER_DELIMITER
            return True
        buf.clear()  # epilogue: ignored
        return False


def _headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    text = block.decode("latin-1")
    lines: list[str] = []
    for line in text.split("\r\n") if text else []:
        if line[:1] in (" ", "\t") and lines:  # folded (obsolete, still legal here)
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise MultipartError(f"malformed part header line {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


def parse(boundary: str, body: bytes, chunk: int = 65536) -> list[tuple[dict[str, str], bytes]]:
    """A whole body's parts (tests and small bodies)."""
    parser = Parser(boundary)
    parts: list[tuple[dict[str, str], bytes]] = []
    current: tuple[dict[str, str], bytearray] | None = None
    events: list[Event] = []
    for start in range(0, max(len(body), 1), chunk):
        events += parser.feed(body[start:start + chunk])
    events += parser.close()
    for event in events:
        if isinstance(event, PartStart):
            current = (event.headers, bytearray())
        elif isinstance(event, PartData) and current is not None:
            current[1].extend(event.data)
        elif isinstance(event, PartEnd) and current is not None:
            parts.append((current[0], bytes(current[1])))
            current = None
    return parts

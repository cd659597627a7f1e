"""The multipart/related writer and incremental parser of DICOMweb (archive.web.multipart):
whatever the parts hold and however the body is cut into chunks, parsing what was
written gives the parts back; malformed bodies raise MultipartError with a message."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archive.web.multipart import (
    MultipartError,
    Parser,
    PartData,
    PartEnd,
    PartStart,
    boundary_of,
    coalesce,
    new_boundary,
    parse,
    write,
)

# parts whose bytes look like the syntax around them: CRLF, dashes, a boundary's start
tricky = st.lists(st.sampled_from([b"\r\n", b"--", b"-", b"\r", b"\n", b"x", b"\0", b"--b",
                                   b"\r\n--", b"DICM"]), max_size=40).map(b"".join)
contents = st.one_of(st.binary(max_size=300), tricky)


def body_of(boundary: str, parts: list[bytes]) -> bytes:
    return b"".join(write(boundary, [("application/dicom", [p]) for p in parts]))


def feed_in_chunks(boundary: str, body: bytes, cuts: list[int]) -> list[bytes]:
    parser = Parser(boundary)
    events = []
    start = 0
    for cut in sorted({c % (len(body) + 1) for c in cuts}) + [len(body)]:
        events += parser.feed(body[start:cut])
        start = cut
    events += parser.close()
    parts, current = [], None
    for event in events:
        if isinstance(event, PartStart):
            assert event.headers == {"content-type": "application/dicom"}
            current = bytearray()
        elif isinstance(event, PartData):
            assert current is not None
            current += event.data
        else:
            assert isinstance(event, PartEnd) and current is not None
            parts.append(bytes(current))
            current = None
    return parts


@settings(max_examples=300, deadline=None)
@given(st.lists(contents, max_size=5), st.lists(st.integers(0, 10_000), max_size=12))
def test_what_is_written_parses_back_whatever_the_chunks(parts: list[bytes],
                                                         cuts: list[int]) -> None:
    boundary = new_boundary()
    body = body_of(boundary, parts)
    assert feed_in_chunks(boundary, body, cuts) == parts


@settings(max_examples=100, deadline=None)
@given(st.lists(contents, min_size=1, max_size=3), st.binary(max_size=50),
       st.binary(max_size=50))
def test_preamble_and_epilogue_are_ignored(parts: list[bytes], preamble: bytes,
                                           epilogue: bytes) -> None:
    boundary = "b" * 20
    body = body_of(boundary, parts)
    if boundary.encode() in preamble:
        return
    framed = (preamble + b"\r\n" if preamble else b"") + body + epilogue
    assert [data for _, data in parse(boundary, framed, chunk=7)] == parts


def test_headers_and_transport_padding() -> None:
    body = (b"--xyz  \t\r\nContent-Type: application/dicom;\r\n transfer-syntax=1.2\r\n"
            b"Content-Location: a\r\n\r\nDATA\r\n--xyz\r\n\r\nNOHEADERS\r\n--xyz--")
    [(first, data), (second, more)] = parse("xyz", body)
    assert first == {"content-type": "application/dicom; transfer-syntax=1.2",
                     "content-location": "a"}
    assert (data, second, more) == (b"DATA", {}, b"NOHEADERS")


@pytest.mark.parametrize("body,message", [
    (b"", "no multipart delimiter"),
    (b"just some bytes", "no multipart delimiter"),
    (b"--xyz\r\nContent-Type: a\r\n\r\ndata", "cut short"),
    (b"--xyz\r\nContent-Type: a", "cut short"),
    (b"--xyz\r\nno colon\r\n\r\ndata\r\n--xyz--", "malformed part header"),
    (b"--xyzmore\r\n\r\ndata\r\n--xyz--", "malformed multipart delimiter"),
    (b"--xyz\r\n" + b"X-Long: " + b"a" * 20_000 + b"\r\n\r\n", "longer than"),
])
def test_malformed_bodies(body: bytes, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        parse("xyz", body)


def test_memory_stays_bounded_while_a_part_streams() -> None:
    parser = Parser("xyz")
    parser.feed(b"--xyz\r\n\r\n")
    for _ in range(100):
        events = parser.feed(b"a" * 65536)
        assert sum(len(e.data) for e in events if isinstance(e, PartData)) > 60000
        assert len(parser._buffer) < 64


@pytest.mark.parametrize("content_type,boundary", [
    ('multipart/related; type="application/dicom"; boundary=abc', "abc"),
    ('Multipart/Related; boundary="a b:c"; type=application/dicom', "a b:c"),
])
def test_boundary_of(content_type: str, boundary: str) -> None:
    assert boundary_of(content_type) == boundary


@pytest.mark.parametrize("content_type,message", [
    ("application/dicom", "not a multipart body"),
    ("multipart/related", "without a boundary"),
    ('multipart/related; boundary="' + "a" * 71 + '"', "invalid multipart boundary"),
    ('multipart/related; boundary="ends with space "', "invalid multipart boundary"),
])
def test_boundary_refusals(content_type: str, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        boundary_of(content_type)


@given(st.lists(st.binary(max_size=300), max_size=40), st.integers(1, 500))
def test_coalesce_keeps_the_bytes_in_fewer_pieces(chunks: list[bytes], size: int) -> None:
    pieces = list(coalesce(chunks, size))
    assert b"".join(pieces) == b"".join(chunks)
    assert all(len(piece) >= size for piece in pieces[:-1])
    assert len(pieces) <= len(chunks)

"""Frames and bulk values read out of stored files (archive.bulkdata), through GridFS
(archive.gridstore.GridFile), against what pydicom reads from the same files."""

from __future__ import annotations

import io
from unittest import mock

import mongomock
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from archive import bulkdata
from archive.gridstore import GridStore
from archive.web.wado import parse_frame_list, with_bulk_uris

SMALL_CHUNKS = 97  # odd and tiny: every read crosses chunk boundaries


def stored(data: bytes, chunk_size: int = SMALL_CHUNKS) -> io.RawIOBase:
    store = GridStore(mongomock.MongoClient().db)
    file_id = store.put(data, "x.dcm", {})
    store.files.update_one({"_id": file_id}, {"$set": {"chunkSize": chunk_size}})
    store.chunks.delete_many({"files_id": file_id})
    for n in range(-(-len(data) // chunk_size)):
        store.chunks.insert_one({"_id": store.chunk_id(file_id, n), "files_id": file_id,
                                 "n": n, "data": data[n * chunk_size:(n + 1) * chunk_size]})
    return store.open(file_id)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.binary(min_size=0, max_size=1000),
       steps=st.lists(st.tuples(st.integers(0, 1100), st.integers(0, 400)), max_size=12))
def test_grid_file_reads_as_bytes_io(data: bytes, steps: list[tuple[int, int]]) -> None:
    grid, plain = stored(data), io.BytesIO(data)
    for offset, size in steps:
        assert grid.seek(offset) == plain.seek(offset)
        assert grid.read(size) == plain.read(size)
        assert grid.tell() == plain.tell()


def image(rows: int, columns: int, samples: int, bits: int, frames: int, syntax: str,
          pixels: bytes) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels
    ds["PixelData"].VR = "OB" if bits <= 8 else "OW"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(rows=st.integers(1, 7), columns=st.integers(1, 7), samples=st.sampled_from([1, 3]),
       bits=st.sampled_from([1, 8, 16, 32]), frames=st.integers(1, 5),
       syntax=st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                               ExplicitVRBigEndian]),
       seed=st.integers(0, 2**32 - 1), data=st.data())
def test_native_frames_are_pydicoms_frames(rows: int, columns: int, samples: int, bits: int,
                                           frames: int, syntax: str, seed: int,
                                           data: st.DataObject) -> None:
    if bits == 1 and samples == 3:
        samples = 1
    rng = np.random.default_rng(seed)
    pixels_per_frame = rows * columns * samples
    if bits == 1:
        bits_all = rng.integers(0, 2, pixels_per_frame * frames, dtype=np.uint8)
        raw = np.packbits(bits_all, bitorder="little").tobytes()
    else:
        values = rng.integers(0, 2**bits, pixels_per_frame * frames, dtype=np.uint64)
        raw = values.astype(f"<u{bits // 8}").tobytes()
    part10 = image(rows, columns, samples, bits, frames, syntax, raw + b"\0" * (len(raw) % 2))
    reference = dcmread(io.BytesIO(part10))
    wanted = data.draw(st.lists(st.integers(1, frames), min_size=1, max_size=6))
    found = bulkdata.Frames(stored(part10))
    assert found.count == frames
    assert found.transfer_syntax == ExplicitVRLittleEndian
    for n in wanted:
        frame = found.read(n)
        if bits == 1:
            unpacked = np.unpackbits(np.frombuffer(frame, np.uint8), bitorder="little")
            expected = bits_all[(n - 1) * pixels_per_frame:n * pixels_per_frame]
            assert np.array_equal(unpacked[:pixels_per_frame], expected)
        else:
            array = np.frombuffer(frame, f"<u{bits // 8}")
            expected = reference.pixel_array if frames > 1 else reference.pixel_array[None]
            assert np.array_equal(array, expected[n - 1].reshape(-1)), (n, syntax)


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(size=st.integers(1, 300), bits=st.sampled_from([8, 16]),
       syntax=st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                               ExplicitVRBigEndian]), chunk=st.sampled_from([2, 6, 64, 1 << 20]),
       seed=st.integers(0, 2**32 - 1))
def test_native_pixel_data_as_bulk_data_is_read_piece_by_piece(
        size: int, bits: int, syntax: str, chunk: int, seed: int) -> None:
    """The value as PS3.18 sends it (little-endian words), the same whatever the pieces
    it is read in: never the whole value at once."""
    raw = np.random.default_rng(seed).integers(0, 256, size * 2, dtype=np.uint8).tobytes()
    part10 = image(1, size, 1, bits, 2 if bits == 8 else 1, syntax, raw)
    value = dcmread(io.BytesIO(part10))["PixelData"]
    little = bytes(value.value) if syntax != ExplicitVRBigEndian or bits == 8 else \
        np.frombuffer(value.value, ">u2").astype("<u2").tobytes()
    with mock.patch.object(bulkdata, "CHUNK", chunk):
        (part,) = list(bulkdata.read_bulk(stored(part10), (0x7FE00010,)).parts)
        pieces = list(part)
    assert b"".join(pieces) == little
    assert max(map(len, pieces)) <= chunk


def test_encapsulated_frames_and_numbers_past_the_last() -> None:
    fragments = [bytes([n]) * (300 + 2 * n) for n in range(3)]
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    ds.Rows = ds.Columns = 4
    ds.NumberOfFrames = 3
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 8, 8, 7
    ds.PhotometricInterpretation, ds.PixelRepresentation = "MONOCHROME2", 0
    ds.PixelData = encapsulate(fragments, has_bot=False)
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = RLELossless
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    found = bulkdata.Frames(stored(buffer.getvalue()))
    assert found.transfer_syntax == RLELossless
    assert [found.read(n) for n in (3, 1, 2, 1)] == [fragments[i] for i in (2, 0, 1, 0)]
    with pytest.raises(bulkdata.NotFound, match="frame 4: the instance has 3 frames"):
        found.check([1, 4])
    bulk = bulkdata.read_bulk(stored(buffer.getvalue()), (0x7FE00010,))
    assert list(bulk.parts) == fragments and bulk.transfer_syntax == RLELossless


def test_an_instance_without_pixel_data() -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(bulkdata.NotFound, match="no Pixel Data"):
        bulkdata.Frames(stored(buffer.getvalue()))


@given(st.lists(st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 999_999)), max_size=6),
       st.integers(0, 0xFFFFFFFF))
def test_bulk_data_paths_round_trip(steps: list[tuple[int, int]], last: int) -> None:
    path = (*(n for step in steps for n in step), last)
    assert bulkdata.parse_path(bulkdata.format_path(path)) == path


@pytest.mark.parametrize("text", ["", "7FE0", "7FE00010/x/00100010", "7FE00010/0",
                                  "../7FE00010", "7fe0001g", "7FE00010/-1/00100010"])
def test_malformed_bulk_data_paths(text: str) -> None:
    with pytest.raises(ValueError):
        bulkdata.parse_path(text)


@pytest.mark.parametrize(("text", "numbers"), [("1", [1]), ("3,1,3", [3, 1, 3])])
def test_frame_lists(text: str, numbers: list[int]) -> None:
    assert parse_frame_list(text) == numbers


@pytest.mark.parametrize("text", ["0", "1,,2", "-1", "1.5", "a", ",", "1 ,2", "1" * 10])
def test_malformed_frame_lists(text: str) -> None:
    with pytest.raises(ValueError):
        parse_frame_list(text)


def test_bulk_data_uris_are_rewritten_at_every_depth_without_touching_the_rest() -> None:
    dataset = {
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^J"}]},
        "7FE00010": {"vr": "OW", "BulkDataURI": "gridfs:abc#7FE00010"},
        "00880200": {"vr": "SQ", "Value": [
            {"00280010": {"vr": "US", "Value": [64]}},
            {"7FE00010": {"vr": "OB", "BulkDataURI": "gridfs:abc#7FE00010"}}]},
        "00091001": {"vr": "OB", "BulkDataURI": "https://elsewhere/x"},
    }
    before = repr(dataset)
    out = with_bulk_uris(dataset, "http://h/p")
    assert repr(dataset) == before  # the stored document is not changed
    assert out["7FE00010"]["BulkDataURI"] == "http://h/p/7FE00010"
    assert out["00880200"]["Value"][1]["7FE00010"]["BulkDataURI"] == \
        "http://h/p/00880200/1/7FE00010"
    assert out["00880200"]["Value"][0] is dataset["00880200"]["Value"][0]
    assert out["00091001"] is dataset["00091001"]
    assert out["00100010"] is dataset["00100010"]
    plain = {"00100010": dataset["00100010"]}
    assert with_bulk_uris(plain, "http://h/p") is plain

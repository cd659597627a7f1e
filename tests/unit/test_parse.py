"""``Archive.parse``: files cut short and key values that would corrupt the documents.

pydicom reads a truncated file without complaint (Pixel Data comes back short), so each
case checks what a sender sees: status 0xC000, an Error Comment saying why, nothing
written.  ``archive import`` shares ``parse`` (through ``importer.read_part10``).
"""

from __future__ import annotations

import struct
import tempfile
import unicodedata
from pathlib import Path
from typing import Any
from unittest import mock

import mongomock
import pytest
from helpers import CT_IMAGE, image_dataset, make_dataset, to_part10
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from archive import dicomjson, storage
from archive.identifiers import problem
from archive.importer import read_part10
from archive.storage import CANNOT_UNDERSTAND, Archive, StoreRefused

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                DeflatedExplicitVRLittleEndian]


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    return Archive(mongomock.MongoClient().archive, "fs", "replace", tmp_path / "j.jsonl")


def nothing_written(archive: Archive) -> bool:
    return all(archive.db[c].count_documents({}) == 0 for c in
               ("instances", "series", "studies", "patients", "fs.files", "fs.chunks"))


def refused(archive: Archive, data: bytes) -> str:
    """The Error Comment of a refusal, the same from the bytes as from a file holding
    them (how a large dataset is stored), values left in the file from 1 KiB on."""
    outcome = archive.store(data)
    assert outcome.status == CANNOT_UNDERSTAND, outcome
    assert len(outcome.comment) <= 64
    assert nothing_written(archive)
    with tempfile.TemporaryDirectory() as folder, \
            mock.patch.object(storage, "DEFER_SIZE", dicomjson.MIN_DEFER_SIZE):
        path = Path(folder) / "sent.dcm"
        path.write_bytes(data)
        assert archive.store(path) == outcome
    assert nothing_written(archive)
    return outcome.comment


def encapsulated(fragments: list[bytes]) -> bytes:
    ds = image_dataset()
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return to_part10(ds, JPEGBaseline8Bit)


def with_sequence_last() -> bytes:
    """A dataset whose last element is a sequence of undefined length."""
    ds = make_dataset()
    item = make_dataset()
    ds.add_new(0x00400275, "SQ", Sequence([item]))  # Request Attributes Sequence
    ds.add_new(0x7FE00010, "OW", b"\x00\x01" * 100)
    del ds[0x7FE00010]
    ds[0x00400275].is_undefined_length = True
    for item in ds[0x00400275].value:
        item.is_undefined_length_sequence_item = True
    return to_part10(ds)


# --- truncated files -------------------------------------------------------------------


@pytest.mark.parametrize("syntax", UNCOMPRESSED)
def test_the_whole_file_is_stored(archive: Archive, syntax: str, tmp_path: Path) -> None:
    data = to_part10(image_dataset(), syntax)
    assert archive.store(data).ok
    path = tmp_path / "whole.dcm"
    path.write_bytes(data)
    assert archive.store(path).ok  # from its file too (a re-send: it replaces)


@pytest.mark.parametrize("syntax", UNCOMPRESSED)
@pytest.mark.parametrize("missing", [1, 2, 7, 100, 4000, 8191, 8192 + 3],
                         ids=lambda n: f"minus{n}")
def test_a_file_cut_in_pixel_data_is_refused_as_truncated(archive: Archive, syntax: str,
                                                          missing: int) -> None:
    data = to_part10(image_dataset(), syntax)
    if syntax == DeflatedExplicitVRLittleEndian:  # its last byte pads the deflated stream
        missing += 1
    assert "truncated" in refused(archive, data[:-missing])


def test_the_comment_names_the_element_cut_short(archive: Archive) -> None:
    data = to_part10(image_dataset())
    assert refused(archive, data[:-10]) == "truncated: (7FE0,0010) needs 8192 bytes, 8182 left"


def test_a_file_cut_in_an_element_header_is_refused(archive: Archive) -> None:
    data = to_part10(image_dataset())
    # Pixel Data's header is 12 bytes; cut inside it, leaving only a few of its bytes.
    cut = len(data) - 8192 - 12 + 5
    assert "truncated" in refused(archive, data[:cut])


def test_a_file_cut_in_any_other_element_is_refused(archive: Archive) -> None:
    ds = make_dataset(StudyDescription="a description that ends the dataset")
    ds.add_new(0x00291010, "LO", "private text at the very end")
    data = to_part10(ds)
    assert "truncated: (0029,1010)" in refused(archive, data[:-4])


@pytest.mark.parametrize("missing", [1, 8, 9, 20, 600], ids=lambda n: f"minus{n}")
def test_encapsulated_pixel_data_cut_short_is_refused(archive: Archive, missing: int) -> None:
    data = encapsulated([b"\xff\xd8" + bytes(500) + b"\xff\xd9", b"\xff\xd8" + bytes(300)
                         + b"\xff\xd9"])
    assert archive.store(data).ok  # whole: stored as received
    archive.db.client.drop_database("archive")
    assert "truncated" in refused(archive, data[:-missing])


def test_a_sequence_without_its_delimiter_is_refused(archive: Archive) -> None:
    data = with_sequence_last()
    assert data.endswith(struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    assert archive.store(data).ok
    archive.db.client.drop_database("archive")
    assert "truncated" in refused(archive, data[:-8])
    assert "truncated" in refused(archive, data[:-16])  # item delimiter gone too


def test_import_refuses_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.dcm"
    path.write_bytes(to_part10(image_dataset())[:-100])
    with pytest.raises(StoreRefused) as caught:
        read_part10(path)
    assert caught.value.status == CANNOT_UNDERSTAND
    assert "truncated" in caught.value.comment


def test_pydicoms_own_truncated_files_are_refused() -> None:
    from pydicom.data import get_testdata_file

    for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
        with pytest.raises(StoreRefused, match="truncated"):
            Archive.parse(Path(get_testdata_file(name)).read_bytes())
        with pytest.raises(StoreRefused, match="truncated"):
            Archive.parse(Path(get_testdata_file(name)))


# --- key values ------------------------------------------------------------------------

KEYS = [("SOPInstanceUID", "sop_uid"), ("SOPClassUID", "sop_class"),
        ("StudyInstanceUID", "study_uid"), ("SeriesInstanceUID", "series_uid"),
        ("PatientID", "patient_id")]


def with_key(argument: str, value: str) -> bytes:
    kwargs: dict[str, Any] = {argument: value}
    return to_part10(make_dataset(**kwargs))


@pytest.mark.parametrize(("keyword", "argument"), KEYS)
@pytest.mark.parametrize("bad", ["\x00", "\x01", "\n", "\x7f"], ids=repr)
def test_a_control_character_in_a_key_is_refused_naming_it(archive: Archive, keyword: str,
                                                           argument: str, bad: str) -> None:
    value = f"1.2.826.0.1{bad}5" if argument != "sop_class" else f"{CT_IMAGE}{bad}1"
    comment = refused(archive, with_key(argument, value))
    assert keyword in comment
    assert "NUL" in comment if bad == "\x00" else "U+00" in comment


@pytest.mark.parametrize(("keyword", "argument"), KEYS[:4])
def test_a_uid_longer_than_64_is_refused(archive: Archive, keyword: str,
                                         argument: str) -> None:
    comment = refused(archive, with_key(argument, "1." + "2" * 63))
    assert comment.startswith(keyword)
    assert "64" in comment


@pytest.mark.parametrize("value", [
    "1.2.826.0.1.3\x00",             # UI padding
    "1.2.826.0.1.3 ",                # space padding, as some writers pad
    "1." + "2" * 62,                 # exactly 64 characters
    "1.2.826.01.3",                  # a leading zero: invalid, harmless
    "1.2.826.0.1.ABC",               # letters: invalid, harmless
])
def test_padding_and_unusual_but_harmless_uids_are_accepted(archive: Archive,
                                                            value: str) -> None:
    outcome = archive.store(with_key("sop_uid", value))
    assert outcome.ok, outcome
    assert archive.db.instances.find_one({"_id": value.rstrip("\x00 ")}) is not None


def test_a_patient_id_with_padding_is_accepted(archive: Archive) -> None:
    assert archive.store(with_key("patient_id", "PAT-9\x00")).ok


@pytest.mark.parametrize(("tag", "keyword", "vr"), [
    (0x00080018, "SOPInstanceUID", "OB"), (0x00080018, "SOPInstanceUID", "IS"),
    (0x0020000E, "SeriesInstanceUID", "PN"), (0x00100020, "PatientID", "OB"),
])
def test_a_key_sent_with_a_vr_whose_json_is_not_text_is_refused(
        archive: Archive, tag: int, keyword: str, vr: str) -> None:
    """Its DICOM JSON would be bytes, a number or a name: the documents would be keyed
    on something else than the value (an instance with _id "", found in a test)."""
    value = b"1.2.826.0.1.77"
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    head += struct.pack("<HL", 0, len(value)) if vr in ("OB", "UN") else \
        struct.pack("<H", len(value))
    data = to_part10(make_dataset()) + head + value  # a later copy of the tag wins
    comment = refused(archive, data)
    assert comment.startswith(f"{keyword} (")
    assert f"has VR {vr}" in comment


def test_import_refuses_a_truncated_bare_dataset(tmp_path: Path) -> None:
    """A dataset without meta group is re-encoded on import, which would hide the cut."""
    from helpers import dataset_bytes

    whole = tmp_path / "bare.dcm"
    whole.write_bytes(dataset_bytes(to_part10(image_dataset())))
    part10, _ = read_part10(whole)  # whole: wrapped and accepted
    assert Archive.parse(part10) is not None
    cut = tmp_path / "bare-cut.dcm"
    cut.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(StoreRefused, match="truncated"):
        read_part10(cut)


@given(st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=80))
@settings(max_examples=300, deadline=None)
def test_a_key_value_names_its_first_control_character_or_lone_surrogate(text: str) -> None:
    """Whatever the characters (any category, lone surrogates included), a key value is
    refused for its first control character or surrogate after padding is removed, and
    for nothing else but its length."""
    core = text.rstrip("\x00 ").lstrip(" ")
    bad = next((c for c in core if unicodedata.category(c) in ("Cc", "Cs")), None)
    found = problem("PatientID", "0010,0020", text, "LO")
    if bad is None:
        assert found is None
    else:
        assert found == (f"PatientID (0010,0020) contains "
                         f"{'NUL' if bad == chr(0) else f'U+{ord(bad):04X}'}")

"""Transcoding to uncompressed over the test files bundled with pydicom: every transfer
syntax they come in, the pixels after equal to what pydicom decodes from the original,
lossy kept lossy, what cannot be decoded refused with its reason."""

from __future__ import annotations

import re
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import make_dataset, to_part10
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSNearLossless,
)

from archive import transcode
from archive.transcode import Undecodable

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: pydicom test files its own decoders (and so ours) cannot decode: a corrupt JPEG
#: stream and a JPEG 2000 fragment cut by a sequence delimiter.
#: pydicom's bundled test files (get_testdata_files would also try to download others).
TESTDATA = Path(pydicom.__file__).parent / "data" / "test_files"
UNDECODABLE = {"JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"}


def _read(path: str) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def _images() -> dict[str, tuple[str, str]]:
    """name -> (path, transfer syntax) of every pydicom test image not in the uncompressed
    little endian syntaxes (those are sent as stored, never transcoded)."""
    found = {}
    for path in sorted(str(p) for p in TESTDATA.rglob("*") if p.is_file()):
        try:
            ds = _read(path)
            syntax = str(ds.file_meta.TransferSyntaxUID)
        except Exception:  # noqa: BLE001 - not a Part-10 file, or no transfer syntax
            continue
        if "PixelData" in ds and syntax not in transcode.UNCOMPRESSED:
            found[Path(path).name] = (path, syntax)
    return found


IMAGES = _images()
DECODABLE = sorted(set(IMAGES) - UNDECODABLE)


def test_the_test_files_cover_every_syntax_the_brief_names() -> None:
    syntaxes = {syntax for _, syntax in IMAGES.values()}
    assert syntaxes >= {
        "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2"}
    assert all(transcode.decodable(s) for s in syntaxes)


@pytest.mark.parametrize("target", transcode.UNCOMPRESSED)
@pytest.mark.parametrize("name", DECODABLE)
def test_pixels_after_are_those_pydicom_decodes_from_the_original(name: str,
                                                                  target: str) -> None:
    path, syntax = IMAGES[name]
    original = _read(path)
    out = transcode.to_uncompressed(Path(path).read_bytes(), target)
    got = pydicom.dcmread(BytesIO(out))
    assert got.file_meta.TransferSyntaxUID == target
    assert got.original_encoding == (UID(target).is_implicit_VR, True)
    assert "PixelData" in got and not got["PixelData"].is_undefined_length
    np.testing.assert_array_equal(got.pixel_array, original.pixel_array)
    # The same instance: its identity and the rest of its attributes unchanged.
    assert got.SOPInstanceUID == original.SOPInstanceUID
    assert got.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    changed = {"PixelData", "PhotometricInterpretation", "PlanarConfiguration",
               "NumberOfFrames", "LossyImageCompression", "LossyImageCompressionMethod",
               "LossyImageCompressionRatio"}
    # (Private elements read back from implicit VR take the VR pydicom guesses.)
    for elem in original:
        if elem.keyword not in changed and elem.VR not in ("SQ", "UN") \
                and not (elem.tag.is_private and got.original_encoding[0]) \
                and elem.tag.element != 0 and elem.tag not in (0x7FE00001, 0x7FE00002):
            assert got[elem.tag].value == elem.value, elem


@pytest.mark.parametrize("name", DECODABLE)
def test_lossy_sources_stay_flagged_lossy(name: str) -> None:
    path, syntax = IMAGES[name]
    original = _read(path)
    got = pydicom.dcmread(BytesIO(transcode.to_uncompressed(Path(path).read_bytes())))
    if transcode.is_lossy(syntax):
        assert got.LossyImageCompression == "01"
        if original.get("LossyImageCompression") != "01":  # said here: how, too
            assert transcode.LOSSY_METHODS[syntax] in got.LossyImageCompressionMethod
    else:
        assert got.get("LossyImageCompression") == original.get("LossyImageCompression")
        assert "LossyImageCompressionMethod" not in got or \
            got.LossyImageCompressionMethod == original.LossyImageCompressionMethod


def test_a_near_lossless_image_not_flagged_gets_flag_method_and_ratio() -> None:
    path, syntax = IMAGES["JPEGLSNearLossless_16.dcm"]
    assert syntax == JPEGLSNearLossless
    original = _read(path)
    assert "LossyImageCompression" not in original
    got = pydicom.dcmread(BytesIO(transcode.to_uncompressed(Path(path).read_bytes())))
    assert got.LossyImageCompression == "01"
    assert got.LossyImageCompressionMethod == "ISO_14495_1"
    ratio = float(got.LossyImageCompressionRatio)
    assert ratio == pytest.approx(len(got.PixelData) / sum(
        len(f) for f in pydicom.encaps.generate_fragments(original.PixelData)), rel=1e-3)


def test_ycbcr_jpeg_becomes_rgb_as_pydicom_decodes_it() -> None:
    path, _ = IMAGES["SC_rgb_jpeg_dcmtk.dcm"]
    assert _read(path).PhotometricInterpretation == "YBR_FULL"
    got = pydicom.dcmread(BytesIO(transcode.to_uncompressed(Path(path).read_bytes())))
    assert (got.PhotometricInterpretation, got.PlanarConfiguration) == ("RGB", 0)


@pytest.mark.parametrize("name", sorted(UNDECODABLE))
def test_what_cannot_be_decoded_fails_with_its_reason(name: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    path, syntax = IMAGES[name]
    with pytest.raises(Undecodable, match=re.escape(
            f"cannot decode {transcode.name(syntax)}: ")) as exc:
        transcode.to_uncompressed(Path(path).read_bytes())
    assert "\n" not in str(exc.value) and len(str(exc.value)) <= 200
    assert not [r for r in caplog.records if r.exc_info], "a traceback per plugin logged"


def test_a_syntax_without_decoder_is_refused_before_reading_pixels() -> None:
    assert not transcode.decodable(MPEG2MPML)
    assert not transcode.decodable("1.2.3.4")
    with pytest.raises(Undecodable, match="no decoder for MPEG2"):
        transcode.to_uncompressed(_with_syntax(make_dataset(), MPEG2MPML))


def test_a_compressed_syntax_without_pixel_data_only_changes_encoding() -> None:
    ds = _with_syntax(make_dataset(), JPEGLosslessSV1)
    got = pydicom.dcmread(BytesIO(transcode.to_uncompressed(ds, ImplicitVRLittleEndian)))
    assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert got.PatientID == ds.PatientID and "PixelData" not in got


def test_not_a_dicom_file_is_undecodable() -> None:
    with pytest.raises(Undecodable, match="cannot read"):
        transcode.to_uncompressed(b"garbage" * 50)


# --- frames, as the DICOMweb front end asks for them ---------------------------------


@pytest.mark.parametrize("name", DECODABLE)
def test_each_frame_is_the_slice_of_the_transcoded_pixel_data(name: str) -> None:
    path, _ = IMAGES[name]
    data = Path(path).read_bytes()
    whole = pydicom.dcmread(BytesIO(transcode.to_uncompressed(data)))
    count = transcode.number_of_frames(whole)
    frames = [transcode.uncompressed_frame(data, n) for n in range(count)]
    size = len(frames[0])
    assert all(len(f) == size for f in frames)
    assert b"".join(frames) == whole.PixelData[:size * count]
    pixels = whole.pixel_array.reshape((count, *whole.pixel_array.shape[-2 - (
        whole.SamplesPerPixel > 1):]))
    for n in range(count):
        np.testing.assert_array_equal(transcode.frame_pixels(data, n), pixels[n])


def test_frames_of_a_multiframe_instance_are_decoded_one_at_a_time() -> None:
    path, syntax = IMAGES["examples_ybr_color.dcm"]
    assert syntax == JPEGBaseline8Bit
    ds = _read(path)
    assert ds.NumberOfFrames == 30
    np.testing.assert_array_equal(transcode.frame_pixels(ds, 29), ds.pixel_array[29])
    with pytest.raises(IndexError, match="no frame 31: the instance has 30"):
        transcode.uncompressed_frame(ds, 30)


def test_frames_of_native_little_endian_data_are_sliced_as_stored() -> None:
    ds = make_dataset(Rows=2, Columns=2, BitsAllocated=16, BitsStored=12, HighBit=11,
                      PixelRepresentation=0, SamplesPerPixel=1, NumberOfFrames=3,
                      PhotometricInterpretation="MONOCHROME2", PixelData=bytes(range(24)))
    data = to_part10(ds, ExplicitVRLittleEndian)
    assert [transcode.uncompressed_frame(data, n) for n in range(3)] == \
        [bytes(range(8 * n, 8 * n + 8)) for n in range(3)]
    with pytest.raises(Undecodable):
        transcode.frame_pixels(_with_syntax(ds, JPEG2000), 0)


def _with_syntax(ds: Dataset, syntax: str) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return ds

"""Which representation a WADO-RS client gets for frames and bulk data, from its
Accept header (PS3.18 8.7): as stored when it takes that, decoded when it takes only
uncompressed data and a decoder exists, else 406.  (Instances: test_web_qido.)"""

from __future__ import annotations

import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from archive.web.negotiation import NotAcceptable, frame_representation

OCTET = "application/octet-stream"
ELE = ExplicitVRLittleEndian


@pytest.mark.parametrize(("accept", "stored", "decodable", "answer"), [
    (None, JPEGBaseline8Bit, True, ("image/jpeg", JPEGBaseline8Bit)),
    ("*/*", RLELossless, False, ("image/dicom-rle", RLELossless)),
    # OHIF's request: octet-stream with any syntax takes what is stored
    ("multipart/related; type=application/octet-stream; transfer-syntax=*",
     JPEG2000Lossless, True, ("image/jp2", JPEG2000Lossless)),
    ('multipart/related; type="image/jpeg"', JPEGBaseline8Bit, True,
     ("image/jpeg", JPEGBaseline8Bit)),
    # octet-stream without a syntax means Explicit VR Little Endian: decoded
    ('multipart/related; type="application/octet-stream"', JPEG2000Lossless, True,
     (OCTET, ELE)),
    (f'multipart/related; type="{OCTET}"; transfer-syntax={ELE}', RLELossless, True,
     (OCTET, ELE)),
    # a later range that takes the stored syntax wins over decoding
    (f'multipart/related; type="{OCTET}", multipart/related; type="image/jp2"',
     JPEG2000Lossless, True, ("image/jp2", JPEG2000Lossless)),
    ('multipart/related; type="application/octet-stream"', ELE, False, (OCTET, ELE)),
])
def test_frame_representation(accept: str | None, stored: str, decodable: bool,
                              answer: tuple[str, str]) -> None:
    assert frame_representation(accept, stored, decodable) == answer


@pytest.mark.parametrize(("accept", "stored", "decodable", "says"), [
    ('multipart/related; type="application/octet-stream"', JPEG2000Lossless, False,
     "cannot be decoded"),
    ('multipart/related; type="image/jpeg"', JPEG2000Lossless, True, "image/jp2"),
    ('multipart/related; type="image/jpeg"', ELE, True, "uncompressed"),
    ("image/jpeg", JPEGBaseline8Bit, True, "image/jpeg"),
    ('multipart/related; type="application/octet-stream"; q=0', ELE, True, "uncompressed"),
])
def test_frames_not_acceptable(accept: str, stored: str, decodable: bool, says: str) -> None:
    with pytest.raises(NotAcceptable, match=says):
        frame_representation(accept, stored, decodable)


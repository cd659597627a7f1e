"""WADO-RS frames and bulk data over the network: the node as ``archive serve`` with the
real FerretDB, pydicom's test files of every transfer syntax stored by STOW-RS,
``dicomweb-client`` (and raw requests where a header matters) as the client.

What a viewer needs: each frame, alone, in the transfer syntax it was stored in, that
decodes to the pixels pydicom reads from the original file; every BulkDataURI of the
metadata resolvable to the value it stands for; rendered images and thumbnails that
show the frame; what a restricted user may not see answered as what does not exist.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from acl_clients import node_with_users
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from helpers import image_dataset, make_dataset, stow, to_part10
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import apply_modality_lut, pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, generate_uid

from archive.web.multipart import parse

pytestmark = [pytest.mark.network, pytest.mark.ferretdb]

PASSWORDS = {"admin": "admin-secret", "alice": "alice-secret"}
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
RULES = """
rules:
  - {principal: admin, service: "*"}
  - {principal: alice, service: Retrieve, pattern: {PatientID: "ALICE-*"}}
"""
AS_STORED = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
PIXEL_DATA = 0x7FE00010


@pytest.fixture(scope="module")
def node(module_node_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return node_with_users(module_node_factory, tmp_path_factory.mktemp("frames-users"),
                           PASSWORDS, RULES)


def client(node: Any, user: str = "admin") -> DICOMwebClient:
    return DICOMwebClient(node.http_url,
                          session=create_session_from_user_pass(user, PASSWORDS[user]))


def store(node: Any, files: list[bytes]) -> None:
    answer = stow(node, files, auth=("admin", PASSWORDS["admin"]))
    assert answer.status_code == 200, answer.text


@pytest.fixture(scope="module")
def images(node: Any, testdata_files: list[Path]) -> dict[str, Dataset]:
    """pydicom's test files with Pixel Data that pydicom itself can split into frames,
    stored; by SOP Instance UID (a UID sent twice: the last copy)."""
    chosen: dict[str, bytes] = {}
    for path in testdata_files:
        data = path.read_bytes()
        ds = dcmread(BytesIO(data))
        if "PixelData" not in ds or "TransferSyntaxUID" not in ds.file_meta:
            continue
        try:
            expected_frames(ds)
        except Exception:  # noqa: BLE001 - pydicom cannot read it either: not a case
            continue
        chosen[str(ds.SOPInstanceUID)] = data
    store(node, list(chosen.values()))
    return {uid: dcmread(BytesIO(data)) for uid, data in chosen.items()}


def count(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames") or 1)


def expected_frames(ds: Dataset) -> list[bytes]:
    """The frames as pydicom reads them from the original: encapsulated ones as its
    own fragment parser splits them, native ones cut from the value, little endian."""
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_encapsulated:
        return list(generate_frames(ds.PixelData, number_of_frames=count(ds)))
    data = native_value(ds)
    if ds.BitsAllocated == 1:
        bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
        size = ds.Rows * ds.Columns * ds.SamplesPerPixel
        return [np.packbits(bits[i * size:(i + 1) * size], bitorder="little").tobytes()
                for i in range(count(ds))]
    size = len(pixel_array(ds, index=0, raw=True).tobytes()) \
        if ds.PhotometricInterpretation != "YBR_FULL_422" else \
        ds.Rows * ds.Columns * 2 * (ds.BitsAllocated // 8)
    assert len(data) >= size * count(ds)
    return [data[i * size:(i + 1) * size] for i in range(count(ds))]


def native_value(ds: Dataset) -> bytes:
    """Native Pixel Data as PS3.18 sends it: little endian."""
    data = ds.PixelData
    if ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian and (
            ds.BitsAllocated > 8 or ds["PixelData"].VR == "OW"):
        width = max(ds.BitsAllocated // 8, 2)  # 8-bit OW: swapped in pairs
        data = np.frombuffer(data[:len(data) // width * width], f">u{width}"
                             ).astype(f"<u{width}").tobytes()
    return data


def url(node: Any, ds: Dataset) -> str:
    return (f"{node.http_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")


def single_frame(ds: Dataset, frame: bytes, syntax: str) -> Dataset:
    """A one-frame dataset of ``ds``'s image attributes around ``frame`` as received."""
    one = Dataset()
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored",
                    "HighBit", "PixelRepresentation", "PhotometricInterpretation",
                    "PlanarConfiguration"):
        if keyword in ds:
            setattr(one, keyword, ds[keyword].value)
    one.file_meta = FileMetaDataset()
    one.file_meta.TransferSyntaxUID = syntax
    one.PixelData = encapsulate([frame]) if ds.file_meta.TransferSyntaxUID.is_encapsulated \
        else frame
    return one


def test_every_frame_of_every_syntax(node: Any, images: dict[str, Dataset]) -> None:
    web = client(node)
    syntaxes = set()
    for ds in images.values():
        expected = expected_frames(ds)
        numbers = list(range(1, count(ds) + 1))
        got = web.retrieve_instance_frames(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                           ds.SOPInstanceUID, numbers,
                                           media_types=(("application/octet-stream", "*"),))
        assert got == expected, (ds.filename, ds.file_meta.TransferSyntaxUID.name)
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
    # the archive's test data covers native and several compressed syntaxes
    assert len(syntaxes) >= 8 and any(s.is_encapsulated for s in syntaxes)


def test_frames_decode_to_the_original_pixels(node: Any, images: dict[str, Dataset]) -> None:
    """Each frame, alone, decodes to what pydicom decodes from the original (where
    pydicom has a decoder for the syntax)."""
    decoded = 0
    for ds in images.values():
        try:
            original = pixel_array(ds, index=count(ds) - 1, raw=True)
        except Exception:  # noqa: BLE001 - no decoder here for this syntax
            continue
        answer = requests.get(f"{url(node, ds)}/frames/{count(ds)}", timeout=30,
                              headers={"Accept": AS_STORED}, auth=("admin", "admin-secret"))
        assert answer.status_code == 200, answer.text
        boundary = answer.headers["content-type"].split("boundary=")[1]
        [(headers, frame)] = parse(boundary, answer.content)
        syntax = headers["content-type"].split("transfer-syntax=")[1]
        stored = ds.file_meta.TransferSyntaxUID
        assert syntax == (stored if stored.is_encapsulated else ExplicitVRLittleEndian)
        if ds.BitsAllocated == 1:
            continue  # pydicom reads no single packed frame but the first
        assert np.array_equal(pixel_array(single_frame(ds, frame, syntax), raw=True),
                              original), ds.filename
        decoded += 1
    assert decoded >= 10


def test_media_types_and_negotiation(node: Any, images: dict[str, Dataset]) -> None:
    jpeg = next(ds for ds in images.values()
                if ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50")
    native = next(ds for ds in images.values()
                  if ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian)
    admin = ("admin", PASSWORDS["admin"])

    def get(ds: Dataset, accept: str | None) -> requests.Response:
        headers = {"Accept": accept} if accept is not None else {}
        return requests.get(f"{url(node, ds)}/frames/1", headers=headers, auth=admin,
                            timeout=30)

    answer = get(jpeg, 'multipart/related; type="image/jpeg"')
    assert answer.status_code == 200
    assert 'type="image/jpeg"' in answer.headers["content-type"]
    assert get(jpeg, None).status_code == 200
    decoded = get(jpeg, 'multipart/related; type="application/octet-stream"')
    assert decoded.status_code == 200  # decoded: see test_compressed_frames_decoded...
    refused = get(jpeg, 'multipart/related; type="image/jp2"')
    assert refused.status_code == 406 and "image/jpeg" in refused.text
    assert get(native, 'multipart/related; type="application/octet-stream"'
               ).status_code == 200
    assert get(native, 'multipart/related; type="image/jpeg"').status_code == 406


def bulk_values(ds: Dataset, metadata: dict[str, Any], path: tuple[Any, ...] = ()
                ) -> list[tuple[str, tuple[Any, ...]]]:
    """(BulkDataURI, path) of every bulk value of one instance's metadata."""
    found = []
    for key, elem in metadata.items():
        if "BulkDataURI" in elem:
            found.append((elem["BulkDataURI"], (*path, int(key, 16))))
        for i, item in enumerate(elem.get("Value", []) if elem.get("vr") == "SQ" else []):
            found.extend(bulk_values(ds, item, (*path, int(key, 16), i)))
    return found


def value_at(ds: Dataset, path: tuple[Any, ...]) -> Any:
    node: Any = ds
    for i, step in enumerate(path):
        node = node[step] if i % 2 == 0 else node.value[step]
    return node


def test_every_bulk_data_uri_resolves(node: Any, images: dict[str, Dataset]) -> None:
    web = client(node)
    checked, pixels = 0, 0
    for ds in images.values():
        metadata = web.retrieve_instance_metadata(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        for uri, path in bulk_values(ds, metadata):
            assert uri.startswith(url(node, ds) + "/bulkdata/"), uri
            parts = web.retrieve_bulkdata(uri, media_types=(("application/octet-stream",
                                                             "*"),))
            pixels += path == (PIXEL_DATA,)
            if path == (PIXEL_DATA,) and ds.file_meta.TransferSyntaxUID.is_encapsulated:
                assert parts == expected_frames(ds)  # each frame, compressed
            elif path == (PIXEL_DATA,):
                assert parts == [native_value(ds)]
            else:
                elem = value_at(ds, path)
                if elem.VR in ("FL", "FD"):
                    assert len(parts[0]) == elem.VM * (4 if elem.VR == "FL" else 8)
                else:
                    value = elem.value
                    if not ds.is_little_endian and elem.VR in ("OW", "OL", "OF", "OD"):
                        value = None  # swapped: checked by the native frames above
                    assert value is None or parts == [value], (ds.filename, path)
            checked += 1
    # Pixel Data over 1 KiB is bulk data (below, it is inline)
    assert pixels == sum(len(ds.PixelData) > 1024 for ds in images.values())
    assert checked > pixels  # other bulk values too (overlays, private blobs, icons)


def test_restricted_user_gets_no_frame_or_bulk_data_of_hidden_instances(
        node: Any, images: dict[str, Dataset]) -> None:
    ds = image_dataset(patient_id="ALICE-7", study_uid=generate_uid())
    store(node, [to_part10(ds)])
    hidden = next(iter(images.values()))  # pydicom's files are not ALICE-*
    alice = ("alice", PASSWORDS["alice"])
    mine = requests.get(f"{url(node, ds)}/frames/1", auth=alice, timeout=30)
    assert mine.status_code == 200
    absent = "1.2.3.999"
    for suffix in ("/frames/1", "/bulkdata/7FE00010", "/rendered", "/thumbnail",
                   "/frames/1/rendered"):
        a = requests.get(url(node, hidden) + suffix, auth=alice, timeout=30)
        b = requests.get(url(node, hidden).rsplit("/", 1)[0] + f"/{absent}{suffix}",
                         auth=alice, timeout=30)
        assert (a.status_code, a.text) == (b.status_code, b.text) == (404, b.text)
        assert requests.get(url(node, hidden) + suffix, auth=("admin", "admin-secret"),
                            timeout=30).status_code == 200


@pytest.mark.parametrize(("suffix", "status", "says"), [
    ("/frames/0", 400, "start at 1"),
    ("/frames/1,x", 400, "positive integers"),
    ("/frames/", 404, ""),
    ("/frames/2", 404, "has 1 frame"),
    ("/bulkdata/7FE0", 400, "not a tag"),
    ("/bulkdata/00100010", 404, "not a binary value"),
    ("/bulkdata/00091000", 404, "no 00091000"),
    ("/bulkdata/00081140/5/00081155", 404, ""),
])
def test_bad_frame_and_bulk_data_requests(node: Any, suffix: str, status: int, says: str
                                          ) -> None:
    ds = image_dataset(patient_id="BAD-1", study_uid=generate_uid())
    store(node, [to_part10(ds)])
    answer = requests.get(url(node, ds) + suffix, auth=("admin", PASSWORDS["admin"]),
                          timeout=30)
    assert answer.status_code == status, answer.text
    assert says in answer.text
    # and the node keeps serving
    assert requests.get(f"{url(node, ds)}/frames/1", auth=("admin", PASSWORDS["admin"]),
                        timeout=30).status_code == 200



def decodable(images: dict[str, Dataset]) -> list[Dataset]:
    found = []
    for ds in images.values():
        try:
            pixel_array(ds, index=0)
        except Exception:  # noqa: BLE001 - no decoder here for this syntax
            continue
        found.append(ds)
    return found


def correlation(image: Image.Image, ds: Dataset) -> float:
    """Of the rendered grey levels with pydicom's first frame after the Modality LUT."""
    expected = np.asarray(apply_modality_lut(pixel_array(ds, index=0), ds), np.float64)
    got = np.asarray(image.convert("L"), np.float64)
    if str(ds.PhotometricInterpretation) == "MONOCHROME1":
        got = 255 - got
    if expected.std() == 0 or got.std() == 0:
        return 1.0 if expected.std() == got.std() else 0.0
    return float(np.corrcoef(expected.ravel(), got.ravel())[0, 1])


def test_rendered_frames_show_the_image(node: Any, images: dict[str, Dataset]) -> None:
    admin = ("admin", PASSWORDS["admin"])
    shown = 0
    for ds in decodable(images):
        answer = requests.get(f"{url(node, ds)}/frames/1/rendered", auth=admin, timeout=30,
                              headers={"Accept": "image/png"})
        assert answer.status_code == 200, (ds.filename, answer.text)
        assert answer.headers["content-type"] == "image/png"
        image = Image.open(BytesIO(answer.content))
        assert image.size == (ds.Columns, ds.Rows)
        if ds.SamplesPerPixel == 1 and ds.PhotometricInterpretation != "PALETTE COLOR" \
                and "WindowCenter" not in ds:
            # scaled to the frame's own range: the same picture, grey level for level
            assert correlation(image, ds) > 0.99, ds.filename
        shown += 1
    assert shown >= 10


def test_window_viewport_quality_and_thumbnails(node: Any, images: dict[str, Dataset]
                                                ) -> None:
    admin = ("admin", PASSWORDS["admin"])
    ct = next(ds for ds in images.values() if ds.get("Modality") == "CT"
              and ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian)
    base = f"{url(node, ct)}/rendered"

    def get(suffix: str, **params: str) -> requests.Response:
        return requests.get(suffix, params=params, auth=admin, timeout=30)

    default = get(base)
    assert default.status_code == 200 and default.headers["content-type"] == "image/jpeg"
    bone = get(base, window="300,1500,LINEAR")
    narrow = get(base, window="40,80,LINEAR")
    levels = [np.asarray(Image.open(BytesIO(a.content)).convert("L")).std()
              for a in (bone, narrow)]
    assert levels[0] != levels[1]  # the window changes what is shown
    small = Image.open(BytesIO(get(base, viewport="64,32").content))
    assert max(small.size) <= 64 and small.size[1] <= 32
    large = Image.open(BytesIO(get(base, viewport="4096,4096").content))
    assert large.size == (ct.Columns, ct.Rows)  # never enlarged
    assert len(get(base, quality="10").content) < len(get(base, quality="100").content)
    thumbnail = Image.open(BytesIO(get(f"{url(node, ct)}/thumbnail").content))
    assert max(thumbnail.size) == 128
    for level_url in (f"{node.http_url}/studies/{ct.StudyInstanceUID}",
                      f"{node.http_url}/studies/{ct.StudyInstanceUID}/series/"
                      f"{ct.SeriesInstanceUID}"):
        answer = get(f"{level_url}/thumbnail")
        assert answer.status_code == 200 and Image.open(BytesIO(answer.content)).size


def test_a_study_thumbnail_shows_an_image_whatever_else_the_study_holds(node: Any) -> None:
    """A study whose middle instance is a report (no pixel data) shows its one image; a
    study without images answers 404, saying so."""
    admin = ("admin", PASSWORDS["admin"])
    study, series = generate_uid(), generate_uid()
    image = image_dataset(patient_id="THUMB-1", study_uid=study, series_uid=series)
    reports = [make_dataset(patient_id="THUMB-1", study_uid=study, sop_class=BASIC_TEXT_SR,
                            modality="SR", InstanceNumber=n) for n in (2, 3)]
    store(node, [to_part10(ds) for ds in (image, *reports)])
    answer = requests.get(f"{node.http_url}/studies/{study}/thumbnail", auth=admin, timeout=30)
    assert answer.status_code == 200 and Image.open(BytesIO(answer.content)).size
    only_reports = generate_uid()
    store(node, [to_part10(make_dataset(patient_id="THUMB-2", study_uid=only_reports,
                                        sop_class=BASIC_TEXT_SR, modality="SR"))])
    answer = requests.get(f"{node.http_url}/studies/{only_reports}/thumbnail", auth=admin,
                          timeout=30)
    assert (answer.status_code, answer.text.strip()) == (404, "no image in this study")


@pytest.mark.parametrize(("params", "accept", "status", "says"), [
    ({"window": "40,80"}, None, 400, "center,width,function"),
    ({"window": "40,-1,LINEAR"}, None, 400, "positive"),
    ({"window": "x,80,LINEAR"}, None, 400, "not a number"),
    ({"viewport": "0,10"}, None, 400, "viewport"),
    ({"viewport": "99999,10"}, None, 400, "viewport"),
    ({"quality": "0"}, None, 400, "quality"),
    ({}, "image/gif", 406, "image/jpeg or image/png"),
])
def test_bad_rendering_requests(node: Any, images: dict[str, Dataset], params: dict[str, str],
                                accept: str | None, status: int, says: str) -> None:
    ds = decodable(images)[0]
    headers = {"Accept": accept} if accept else {}
    answer = requests.get(f"{url(node, ds)}/rendered", params=params, headers=headers,
                          auth=("admin", PASSWORDS["admin"]), timeout=30)
    assert answer.status_code == status and says in answer.text, answer.text


def compressed(images: dict[str, Dataset]) -> list[Dataset]:
    """The compressed images pydicom decodes here."""
    return [ds for ds in decodable(images) if ds.file_meta.TransferSyntaxUID.is_compressed]


def test_compressed_frames_decoded_when_only_uncompressed_is_taken(
        node: Any, images: dict[str, Dataset]) -> None:
    """A client that takes only uncompressed frames (PS3.18's default for
    application/octet-stream) gets each frame decoded: the pixels pydicom decodes."""
    admin = ("admin", PASSWORDS["admin"])
    found = compressed(images)
    assert len({ds.file_meta.TransferSyntaxUID for ds in found}) >= 5
    for ds in found:
        last = count(ds)
        answer = requests.get(f"{url(node, ds)}/frames/{last}", auth=admin, timeout=60,
                              headers={"Accept": 'multipart/related; '
                                                 'type="application/octet-stream"'})
        assert answer.status_code == 200, (ds.filename, answer.text)
        boundary = answer.headers["content-type"].split("boundary=")[1]
        [(headers, frame)] = parse(boundary, answer.content)
        assert headers["content-type"] == \
            f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
        expected = pixel_array(ds, index=last - 1)
        assert frame == expected.astype(expected.dtype.newbyteorder("<")).tobytes(), \
            ds.filename


def test_instances_transcoded_when_the_stored_syntax_is_not_taken(
        node: Any, images: dict[str, Dataset]) -> None:
    """WADO-RS of an instance without a transfer-syntax parameter: Explicit VR Little
    Endian (PS3.18's default), decoded; with transfer-syntax=*: the stored bytes."""
    admin = ("admin", PASSWORDS["admin"])
    for ds in compressed(images)[:6]:
        answer = requests.get(url(node, ds), auth=admin, timeout=60, headers={
            "Accept": 'multipart/related; type="application/dicom"'})
        assert answer.status_code == 200, (ds.filename, answer.text)
        boundary = answer.headers["content-type"].split("boundary=")[1]
        [(headers, data)] = parse(boundary, answer.content)
        assert headers["content-type"].endswith(f"transfer-syntax={ExplicitVRLittleEndian}")
        back = dcmread(BytesIO(data))
        assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert np.array_equal(back.pixel_array, pixel_array(ds)), ds.filename
        stored = requests.get(url(node, ds), auth=admin, timeout=60, headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        [(_, original)] = parse(stored.headers["content-type"].split("boundary=")[1],
                                stored.content)
        assert dcmread(BytesIO(original)).file_meta.TransferSyntaxUID == \
            ds.file_meta.TransferSyntaxUID


def test_an_instance_that_cannot_be_decoded_is_406_with_the_reason(node: Any) -> None:
    """pydicom's JPEG-lossy.dcm: a JPEG stream its decoders refuse."""
    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file("JPEG-lossy.dcm")).read_bytes()
    ds = dcmread(BytesIO(data))
    ds.PatientID, ds.SOPInstanceUID = "UNDECODABLE-1", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    store(node, [buffer.getvalue()])
    admin = ("admin", PASSWORDS["admin"])
    answer = requests.get(url(node, ds), auth=admin, timeout=60, headers={
        "Accept": 'multipart/related; type="application/dicom"'})
    assert answer.status_code == 406 and "cannot decode" in answer.text, answer.text
    frame = requests.get(f"{url(node, ds)}/frames/1", auth=admin, timeout=60, headers={
        "Accept": 'multipart/related; type="application/octet-stream"'})
    assert frame.status_code == 500 and "cannot decode" in frame.text, frame.text
    assert requests.get(url(node, ds), auth=admin, timeout=60, headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    ).status_code == 200

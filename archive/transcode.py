"""Transcoding to an uncompressed transfer syntax, for a peer that accepts no other.

An instance is stored as it was received; a C-MOVE/C-GET destination or a DICOMweb
client that does not accept its transfer syntax gets it in Explicit or Implicit VR
Little Endian instead.  What changes is only what PS3.5 8.2 and decoding require:

* The Pixel Data of a compressed instance is decoded by pydicom's decoders (pylibjpeg's
  libjpeg and openjpeg plugins for JPEG and JPEG 2000, CharLS through pyjpegls for
  JPEG-LS, pydicom's own for RLE): the values
  are exactly those pydicom decodes from the original, YCbCr converted to RGB as pydicom
  does (Photometric Interpretation, Planar Configuration and Number of Frames follow).
  The encapsulation-only elements (Extended Offset Table and its lengths) go.
* A transfer syntax that allows lossy compression marks the instance lossy: Lossy Image
  Compression "01", its method (and ratio) added to Lossy Image Compression Method/Ratio
  -- decompressing does not make it the original again (PS3.3 C.7.6.1.1.5).  An encoder
  may have used such a syntax losslessly; that cannot be told from the attributes, so
  it is marked lossy all the same, never the other way round.
* Deflated data is inflated; Explicit VR Big Endian is swapped to little endian (its
  Pixel Data as pydicom reads it).
* The SOP Instance UID is kept: the instance is the same one, in another encoding.

What cannot be decoded (no decoder for the syntax, or a stream the decoder refuses)
raises :class:`Undecodable` with a one-line reason.  No front end is imported here.
"""

from __future__ import annotations

import array
import functools
import logging
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.multival import MultiValue
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

if TYPE_CHECKING:
    import numpy as np

T = TypeVar("T")

#: The syntaxes instances are transcoded to, in order of preference.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: Syntaxes re-encoded without decoding Pixel Data (big endian: swapped).
NATIVE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian})
#: Syntaxes whose compression may be lossy, and the method Lossy Image Compression
#: Method names for each (PS3.3 C.7.6.1.1.5.1).
LOSSY_METHODS = {
    JPEGBaseline8Bit: "ISO_10918_1", JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1", JPEG2000: "ISO_15444_1",
    JPEG2000MC: "ISO_15444_2", HTJ2K: "ISO_15444_15",
}
#: Decoding plugins preferred to pydicom's first choice: CharLS (pyjpegls) decodes
#: JPEG-LS three times as fast as libjpeg (25 against 82 ms for 512 x 512 x 16 bits).
PREFERRED_PLUGINS = {JPEGLSLossless: "pyjpegls", JPEGLSNearLossless: "pyjpegls"}
#: Elements that only describe encapsulated Pixel Data (PS3.3 C.7.6.3, PS3.5 A.4).
_ENCAPSULATION_ONLY = (0x7FE00001, 0x7FE00002, 0x7FE00003)
#: Byte-swap unit of the binary VRs a big endian dataset holds as raw bytes.
_SWAP = {"OW": "H", "OF": "I", "OL": "I", "OD": "Q", "OV": "Q"}
#: A dataset, a Part-10 file's bytes, its path, or a binary file positioned at its start.
Source = Dataset | bytes | Path | BinaryIO


class _PluginTracebacks(logging.Filter):
    """pydicom logs each decoding plugin that fails with its traceback, at ERROR; the
    reasons are in :class:`Undecodable`'s message, which the caller logs in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_PluginTracebacks())


class Undecodable(ValueError):
    """The instance cannot be transcoded; the message is the reason, on one line."""


def name(syntax: str) -> str:
    """A transfer syntax's name, or its UID when pydicom knows no name for it."""
    known = UID(syntax).name
    return known if known and known != syntax else syntax


@functools.lru_cache(maxsize=64)
def decodable(syntax: str) -> bool:
    """Can an instance in ``syntax`` be transcoded to an uncompressed syntax here?

    True for the native syntaxes and for the compressed ones a decoder is installed
    for; a particular stream may still fail to decode (:class:`Undecodable`).
    """
    if syntax in NATIVE:
        return True
    uid = UID(syntax)
    if not uid.is_transfer_syntax or not uid.is_compressed:
        return False
    from pydicom.pixels import get_decoder  # numpy and the plugins: loaded when needed

    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:  # no decoder in pydicom for it (MPEG, retired JPEG...)
        return False


def is_lossy(syntax: str) -> bool:
    """Does ``syntax`` allow lossy compression (so its decoded pixels may not be the
    original ones)?"""
    return syntax in LOSSY_METHODS


def read(source: Source) -> Dataset:
    """The dataset of ``source``, its file meta included (a Dataset is returned as is)."""
    if isinstance(source, Dataset):
        return source
    if isinstance(source, bytes | bytearray | memoryview):
        source = BytesIO(source)
    try:
        return dcmread(source, force=False)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds
        raise Undecodable(_one_line(f"cannot read the stored file: {exc}")) from None


def syntax_of(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not syntax:
        raise Undecodable("stored file has no transfer syntax")
    return syntax


def uncompress(ds: Dataset) -> Dataset:
    """``ds`` in place, re-encoded as Explicit VR Little Endian (see the module doc)."""
    syntax = syntax_of(ds)
    if not decodable(syntax):
        raise Undecodable(f"no decoder for {name(syntax)}")
    try:
        if syntax == ExplicitVRBigEndian:
            _to_little_endian(ds)
        elif syntax not in NATIVE:
            _decompress(ds, syntax)
    except Undecodable:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise many kinds
        raise Undecodable(_one_line(f"cannot decode {name(syntax)}: "
                                    f"{type(exc).__name__}: {exc}")) from None
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_uncompressed(source: Source, out: BinaryIO,
                       target: str = ExplicitVRLittleEndian) -> None:
    """Write ``source`` to ``out`` as a Part-10 file in ``target`` (an uncompressed
    little endian syntax)."""
    if target not in UNCOMPRESSED:
        raise ValueError(f"not an uncompressed target: {target}")
    ds = uncompress(read(source))
    tsyntax = UID(target)
    meta = ds.file_meta if isinstance(ds.get("file_meta"), FileMetaDataset) \
        else FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = tsyntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if "ImplementationVersionName" in meta:
        del meta.ImplementationVersionName
    ds.file_meta = meta
    try:
        # Every element converted from its raw bytes: a dataset whose encoding is not
        # the one its transfer syntax says (pydicom reads it all the same) is written
        # again from values, not from raw elements of the wrong encoding.
        for _ in ds.iterall():
            pass
        dcmwrite(out, ds, implicit_vr=tsyntax.is_implicit_VR, little_endian=True,
                 enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - an element pydicom cannot encode
        raise Undecodable(_one_line(f"cannot encode in {name(target)}: "
                                    f"{type(exc).__name__}: {exc}")) from None


def to_uncompressed(part10: Source, target: str = ExplicitVRLittleEndian) -> bytes:
    """The Part-10 file of ``part10`` transcoded to ``target`` (see the module doc)."""
    out = BytesIO()
    write_uncompressed(part10, out, target)
    return out.getvalue()


def number_of_frames(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def frame_pixels(source: Source, index: int) -> np.ndarray:
    """Frame ``index`` (from 0) of ``source``'s Pixel Data as pydicom decodes it:
    YCbCr as RGB, the values :func:`to_uncompressed` writes."""
    from pydicom.pixels import pixel_array

    ds = read(source)
    syntax = syntax_of(ds)
    if not decodable(syntax):
        raise Undecodable(f"no decoder for {name(syntax)}")
    if not 0 <= index < number_of_frames(ds):
        raise IndexError(f"no frame {index + 1}: the instance has {number_of_frames(ds)}")
    try:
        return _with_plugins(syntax, lambda plugin: pixel_array(
            ds, index=index, decoding_plugin=plugin))
    except Exception as exc:  # noqa: BLE001 - decoders raise many kinds
        raise Undecodable(_one_line(f"cannot decode {name(syntax)}: "
                                    f"{type(exc).__name__}: {exc}")) from None


def uncompressed_frame(source: Source, index: int) -> bytes:
    """Frame ``index`` (from 0) as it is in the Pixel Data :func:`to_uncompressed`
    writes: little endian, native encoding (an answer to a WADO-RS frame request in
    an uncompressed syntax).

    Native little endian data is sliced as stored (its 1-bit frames included); the rest
    is decoded frame by frame (Photometric Interpretation becomes RGB where
    :func:`to_uncompressed` makes it so).
    """
    ds = read(source)
    syntax = syntax_of(ds)
    count = number_of_frames(ds)
    if not 0 <= index < count:
        raise IndexError(f"no frame {index + 1}: the instance has {count}")
    if syntax in NATIVE:
        if syntax == ExplicitVRBigEndian:
            ds = uncompress(ds)
        return _native_frame(ds, index, count)
    pixels = frame_pixels(ds, index)
    return pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()


def _native_frame(ds: Dataset, index: int, count: int) -> bytes:
    data = ds.PixelData
    bits = int(ds.BitsAllocated) * int(ds.Rows) * int(ds.Columns) \
        * int(ds.get("SamplesPerPixel", 1))
    if bits % 8 == 0:
        size = bits // 8
        return bytes(data[index * size:(index + 1) * size])
    import numpy as np  # 1-bit frames that do not end on a byte boundary

    unpacked = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    return np.packbits(unpacked[index * bits:(index + 1) * bits], bitorder="little").tobytes()


def _decompress(ds: Dataset, syntax: str) -> None:
    """Pixel Data decoded as pydicom decodes it; the lossy flags set where due."""
    if "PixelData" not in ds:  # no image: only the encoding changes
        return
    from pydicom.pixels import decompress

    compressed = sum(len(f) for f in _fragments(ds))
    _with_plugins(syntax, lambda plugin: decompress(
        ds, as_rgb=True, generate_instance_uid=False, decoding_plugin=plugin))
    for tag in _ENCAPSULATION_ONLY:
        if tag in ds:
            del ds[tag]
    if is_lossy(syntax):
        _mark_lossy(ds, LOSSY_METHODS[syntax], len(ds.PixelData), compressed)


def _with_plugins(syntax: str, decode: Callable[[str], T]) -> T:
    """``decode(plugin)`` with the preferred plugin for ``syntax`` if it is installed,
    then with pydicom's own order (which tries them all) if that one fails."""
    from pydicom.pixels import get_decoder

    preferred = PREFERRED_PLUGINS.get(syntax, "")
    if preferred and preferred in get_decoder(UID(syntax)).available_plugins:
        try:
            return decode(preferred)
        except Exception:  # noqa: BLE001 - the others may decode it
            pass
    return decode("")


def _fragments(ds: Dataset) -> list[bytes]:
    from pydicom.encaps import generate_fragments

    try:
        return list(generate_fragments(ds.PixelData))
    except Exception:  # noqa: BLE001 - the decoder says what is wrong, if anything
        return []


def _mark_lossy(ds: Dataset, method: str, uncompressed: int, compressed: int) -> None:
    """Lossy Image Compression "01" and, if it was not said yet, how (PS3.3 C.7.6.1.1.5)."""
    if ds.get("LossyImageCompression") == "01":
        return  # already said, with whatever method and ratio were recorded
    ds.LossyImageCompression = "01"
    methods = _values(ds, "LossyImageCompressionMethod")
    ratios = _values(ds, "LossyImageCompressionRatio")
    if len(ratios) == len(methods) and compressed:
        ratios.append(f"{uncompressed / compressed:.4g}")
        ds.LossyImageCompressionRatio = ratios
    methods.append(method)
    ds.LossyImageCompressionMethod = methods


def _values(ds: Dataset, keyword: str) -> list[object]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue) else [value]


def _to_little_endian(ds: Dataset) -> None:
    """Swap a big endian dataset's raw binary values to little endian, in place.

    Pixel Data is taken as pydicom reads it (so 32-bit pixels in OW come out as pydicom
    decodes them); other OW/OF/OL/OD/OV values are swapped by their word size, which is
    undefined for UN values (their structure is unknown): those are refused.
    """
    for elem in ds:
        if elem.VR == "SQ":
            for child in elem.value or []:
                _to_little_endian(child)
        elif elem.tag == 0x7FE00010 and elem.value:
            elem.value = _pixel_data_little_endian(ds)
        elif elem.VR == "UN" and elem.value:
            raise Undecodable(f"big endian element {elem.tag} has VR UN: cannot be swapped")
        elif elem.VR in _SWAP and elem.value:
            words = array.array(_SWAP[elem.VR])
            if len(elem.value) % words.itemsize:
                raise Undecodable(f"big endian element {elem.tag} has an odd length")
            words.frombytes(elem.value)
            words.byteswap()
            elem.value = words.tobytes()


def _pixel_data_little_endian(ds: Dataset) -> bytes:
    bits = int(ds.get("BitsAllocated", 0))
    if bits == 8 and ds["PixelData"].VR == "OB":
        return bytes(ds.PixelData)  # bytes have no order
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if bits not in (1, 8, 16, 32, 64) or photometric.endswith("_422"):
        raise Undecodable(f"big endian pixel data of {bits} bits "
                          f"({photometric or 'no photometric interpretation'}) is ambiguous")
    from pydicom.pixels import pack_bits, pixel_array

    pixels = pixel_array(ds, raw=True)
    if bits == 1:
        return pack_bits(pixels, pad=True)
    data = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
    return data + b"\0" * (len(data) % 2)


#: What pydicom says before each plugin's own reason.
_PLUGINS_FAILED = "Unable to decode as exceptions were raised by all available plugins:"


def _one_line(text: str) -> str:
    return " ".join(text.replace(_PLUGINS_FAILED, "").split())[:200]

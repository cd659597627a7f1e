"""Reading files for ``archive import``: Part-10 files as they are, bare datasets wrapped."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from archive.part10 import Incomplete, check_bare
from archive.storage import CANNOT_UNDERSTAND, Archive, StoreRefused


def _wrap(ds: Dataset) -> bytes:
    """Give a dataset read without File Meta Information a Part-10 header.

    Older tools write bare datasets; they are re-encoded once, in the encoding they
    were read with, so the archive holds a proper Part-10 file for them.
    """
    implicit, little = ds.original_encoding
    syntax = (ImplicitVRLittleEndian if implicit else
              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=implicit, little_endian=little)
    return buffer.getvalue()


def read_part10(path: Path) -> tuple[bytes, Dataset]:
    """The Part-10 bytes to store and their parsed dataset, or StoreRefused (skip)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, f"cannot read: {exc.strerror}") from None
    try:
        return data, Archive.parse(data)
    except StoreRefused as refused:
        if "not a DICOM" not in refused.comment:
            raise
    try:
        ds = dcmread(BytesIO(data), force=True)
        if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
            raise ValueError
    except Exception:  # noqa: BLE001 - anything unreadable is simply not DICOM
        raise StoreRefused(CANNOT_UNDERSTAND, "not a DICOM file") from None
    try:  # re-encoding would hide a dataset cut short: check it as read
        check_bare(data, *(bool(flag) for flag in ds.original_encoding))
    except Incomplete as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, str(exc)[:64]) from None
    part10 = _wrap(ds)
    return part10, Archive.parse(part10)

"""The meta group's UIDs read without pydicom: a stored file is named from them before
its dataset is parsed (archive.storage._described_by_meta)."""

from __future__ import annotations

from io import BytesIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from archive import part10
from archive.storage import _described_by_meta

SOP, SYNTAX = 0x00020003, 0x00020010
uids = st.lists(st.integers(0, 10**12), min_size=2, max_size=8).map(
    lambda parts: ".".join(map(str, parts))[:64].rstrip("."))


def _file(sop: str, syntax: str, implementation: str | None = None) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = syntax
    if implementation is not None:
        meta.ImplementationClassUID = implementation
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPInstanceUID = sop
    ds.PatientName = "Doe^John"
    out = BytesIO()
    ds.save_as(out, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True,
               enforce_file_format=True)
    return out.getvalue()


@settings(max_examples=150, deadline=None)
@given(sop=uids, syntax=st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
       implementation=st.none() | uids)
def test_the_meta_uids_are_those_pydicom_reads(sop: str, syntax: str,
                                               implementation: str | None) -> None:
    data = _file(sop, syntax, implementation)
    meta = dcmread(BytesIO(data)).file_meta
    assert part10.meta_uids(data, SOP, SYNTAX) == {
        SOP: meta.MediaStorageSOPInstanceUID, SYNTAX: meta.TransferSyntaxUID}
    assert _described_by_meta(data) == (f"{sop}.dcm", {"SOPInstanceUID": sop,
                                                         "TransferSyntaxUID": syntax})


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, 400), junk=st.binary(max_size=64))
def test_a_file_cut_short_or_garbled_names_nothing_it_does_not_hold(cut: int,
                                                                   junk: bytes) -> None:
    """Cut anywhere, or its meta group overwritten with junk: no exception, and only
    values that are in the file."""
    data = _file("1.2.3.4", ExplicitVRLittleEndian)
    for variant in (data[:cut], data[:132] + junk + data[132 + len(junk):]):
        found = part10.meta_uids(variant, SOP, SYNTAX)
        assert all(value.encode() in variant for value in found.values())
        described = _described_by_meta(variant)
        assert described is None or described[0] == "1.2.3.4.dcm"


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")
def test_a_name_that_is_no_plain_uid_is_not_taken() -> None:
    """A UID with other characters than digits and dots (a bad sender, or an attack on
    the file's name): the file is named after the parse, from the checked dataset."""
    assert _described_by_meta(_file("1.2.3.4", ExplicitVRLittleEndian)) is not None
    assert _described_by_meta(_file("1.2.$where.4", ExplicitVRLittleEndian)) is None
    assert _described_by_meta(_file("1." + "2" * 70, ExplicitVRLittleEndian)) is None
    assert _described_by_meta(b"not DICOM") is None

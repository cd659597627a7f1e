"""A corrected file is the original but for the corrected values: every other element's
bytes are the original's, in every transfer syntax, with the old values recorded."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pytest
from helpers import image_dataset, make_dataset, split_part10, to_part10
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from archive import part10
from archive.rewrite import BadChange, parse_change, rewrite

SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
            DeflatedExplicitVRLittleEndian]
#: Person names and descriptions a user might type (no backslash: a value separator).
TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x17F,
                             blacklist_characters="\\^="), min_size=1, max_size=40
               ).map(str.strip).filter(bool)


def element_bytes(data: bytes, syntax: str) -> dict[int, bytes]:
    """Each top-level element's bytes, by tag."""
    start = part10.dataset_start(data)
    body = data[start:]
    if syntax == DeflatedExplicitVRLittleEndian:
        body = zlib.decompress(body, -zlib.MAX_WBITS)
    implicit, little = syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian
    return {tag: body[s:e] for tag, s, e in part10.top_level(body, 0, implicit, little)}


def corrected(tmp_path: Path, original: bytes, *changes: str) -> bytes:
    source = tmp_path / "original.dcm"
    source.write_bytes(original)
    out = io.BytesIO()
    rewrite(source, out, {e.tag: e for e in map(parse_change, changes)}, "TEST",
            "20261202120000")
    return out.getvalue()


@settings(max_examples=25, deadline=None)
@given(syntax=st.sampled_from(SYNTAXES), name=TEXT, description=TEXT,
       had_description=st.booleans())
def test_only_the_corrected_elements_change(tmp_path_factory: pytest.TempPathFactory,
                                            syntax: str, name: str, description: str,
                                            had_description: bool) -> None:
    extra = {"StudyDescription": "OLD"} if had_description else {}
    ds = image_dataset(**extra)
    ds.OtherPatientNames = "SMITH^A\\SMITH^B"
    seq = Dataset()
    seq.CodeValue = "X"
    ds.ProcedureCodeSequence = Sequence([seq])
    original = to_part10(ds, syntax)
    new = corrected(tmp_path_factory.mktemp("rw"), original, f"PatientName={name}",
                    f"StudyDescription={description}")
    before, after = element_bytes(original, syntax), element_bytes(new, syntax)
    changed = {0x00100010, 0x00081030, 0x04000561}
    assert {t: b for t, b in before.items() if t not in changed} == \
        {t: b for t, b in after.items() if t not in changed}
    # the meta group is the original's (the same transfer syntax, the same UIDs)
    assert split_part10(new)[0] == split_part10(original)[0]
    read = dcmread(io.BytesIO(new))
    assert (str(read.PatientName), read.StudyDescription) == (name, description)
    [item] = read.OriginalAttributesSequence
    [old] = item.ModifiedAttributesSequence
    assert str(old.PatientName) == "DOE^JOHN"
    assert old.StudyDescription == ("OLD" if had_description else "")
    assert item.ReasonForTheAttributeModification == "CORRECT"
    part10.check(new, read)  # whole: every declared length satisfied


def test_a_second_correction_appends_to_the_record(tmp_path: Path) -> None:
    first = corrected(tmp_path, to_part10(make_dataset()), "PatientName=A^B")
    second = corrected(tmp_path, first, "PatientName=C^D")
    read = dcmread(io.BytesIO(second))
    assert [str(i.ModifiedAttributesSequence[0].PatientName)
            for i in read.OriginalAttributesSequence] == ["DOE^JOHN", "A^B"]


def test_a_value_already_there_is_no_change(tmp_path: Path) -> None:
    read = dcmread(io.BytesIO(corrected(tmp_path, to_part10(make_dataset()),
                                        "PatientName=DOE^JOHN", "PatientID=NEW")))
    [item] = read.OriginalAttributesSequence
    assert [e.keyword for e in item.ModifiedAttributesSequence[0]] == ["PatientID"]


@pytest.mark.parametrize("change, message", [
    ("SOPInstanceUID=1.2.3", "cannot be changed"),
    ("StudyInstanceUID=1.2.3", "cannot be changed"),
    ("SpecificCharacterSet=ISO_IR 100", "cannot be changed"),
    ("PixelData=1", "cannot be changed"),
    ("Rows=12", "only text values"),
    ("ProcedureCodeSequence=x", "only text values"),
    ("Nonsense=1", "neither a DICOM keyword nor a tag"),
    ("(0009,0010)=x", "private"),
    ("PatientName", "expected Keyword=value"),
    ("StudyDate=yesterday", "StudyDate"),
    ("PatientBirthDate=19700230", "'19700230' is not a date"),  # 8 digits, no such day
])
def test_changes_that_are_refused(change: str, message: str) -> None:
    with pytest.raises(BadChange, match=message.replace("(", r"\(")):
        parse_change(change)


def test_a_value_the_character_set_cannot_hold_is_refused(tmp_path: Path) -> None:
    ascii_only = make_dataset()
    del ascii_only.SpecificCharacterSet
    with pytest.raises(BadChange, match="declares no Specific Character Set"):
        corrected(tmp_path, to_part10(ascii_only), "PatientName=MÜLLER^JÖRG")
    utf8 = dcmread(io.BytesIO(corrected(tmp_path, to_part10(make_dataset()),
                                        "PatientName=MÜLLER^JÖRG")))
    assert str(utf8.PatientName) == "MÜLLER^JÖRG"

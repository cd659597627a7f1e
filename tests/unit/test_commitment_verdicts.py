"""Storage commitment verdicts on generated archives (hypothesis): the pure item check
(:func:`archive.commitment.judge`, :func:`files_to_check`) and the report built from it
(:func:`archive.dimse.commitment.event_information`).

The property that matters most to a restricted requester: whatever is hidden from her
gets the verdict it would get if it did not exist, and its file is never read.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from archive.commitment import (
    CLASS_INSTANCE_CONFLICT,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    SOP_CLASS_NOT_SUPPORTED,
    Reference,
    files_to_check,
    judge,
    unique,
)
from archive.dimse.commitment import ALL_COMMITTED, SOME_FAILED, Invalid, event_information, parse

CT, MR, UNKNOWN_CLASS = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.3.99"
INSTANCES = [f"1.2.3.{n}" for n in range(1, 7)]


def supported(sop_class: str) -> bool:
    return sop_class != UNKNOWN_CLASS


def visible(doc: Any) -> bool:
    return doc["PatientID"] == "MINE"


references = st.lists(st.builds(Reference, st.sampled_from([CT, MR, UNKNOWN_CLASS]),
                                st.sampled_from(INSTANCES)), min_size=1, max_size=10)


@st.composite
def archives(draw: Any) -> tuple[dict[str, dict[str, Any]], set[Any]]:
    """Instance documents (some hidden, some of unsupported classes stored anyway, some
    without a file) and the files that are whole."""
    documents = {}
    for n, uid in enumerate(draw(st.sets(st.sampled_from(INSTANCES)))):
        documents[uid] = {"_id": uid, "SOPClassUID": draw(st.sampled_from([CT, MR,
                                                                           UNKNOWN_CLASS])),
                          "PatientID": draw(st.sampled_from(["MINE", "HIDDEN"])),
                          "file_id": draw(st.sampled_from([f"f{n}", None])),
                          "size": draw(st.integers(0, 5000))}
    files = {doc["file_id"] for doc in documents.values() if doc["file_id"]}
    whole = draw(st.sets(st.sampled_from(sorted(files)))) if files else set()
    return documents, whole


@given(references, archives())
def test_one_verdict_per_reference_committed_exactly_when_stored_whole_and_visible(
        refs: list[Reference], archive: tuple[dict[str, Any], set[Any]]) -> None:
    documents, whole = archive
    verdicts = judge(refs, documents, visible, whole, supported)
    assert [v.reference for v in verdicts] == refs
    for verdict in verdicts:
        ref, doc = verdict.reference, documents.get(verdict.reference.sop_instance)
        shown = doc is not None and visible(doc)
        if not shown:
            expected = NO_SUCH_OBJECT_INSTANCE if supported(ref.sop_class) \
                else SOP_CLASS_NOT_SUPPORTED
        elif doc["SOPClassUID"] != ref.sop_class:
            expected = CLASS_INSTANCE_CONFLICT
        elif doc["file_id"] not in whole:
            expected = PROCESSING_FAILURE
        else:
            expected = None
        assert verdict.reason == expected
        assert verdict.committed == (expected is None)


@given(references, archives())
def test_a_hidden_instance_is_answered_as_one_that_does_not_exist(
        refs: list[Reference], archive: tuple[dict[str, Any], set[Any]]) -> None:
    documents, whole = archive
    shown_only = {uid: doc for uid, doc in documents.items() if visible(doc)}
    assert judge(refs, documents, visible, whole, supported) == \
        judge(refs, shown_only, visible, whole, supported)
    to_read = files_to_check(refs, documents, visible)
    assert to_read == files_to_check(refs, shown_only, visible)
    hidden_files = {doc["file_id"] for doc in documents.values() if not visible(doc)}
    assert not set(to_read) & (hidden_files - {None})


@given(references, archives())
def test_only_the_files_that_decide_are_read_with_their_recorded_length(
        refs: list[Reference], archive: tuple[dict[str, Any], set[Any]]) -> None:
    documents, _ = archive
    expected = {}
    for ref in refs:
        doc = documents.get(ref.sop_instance)
        if doc and visible(doc) and doc["SOPClassUID"] == ref.sop_class and doc["file_id"]:
            expected[doc["file_id"]] = doc["size"]
    assert files_to_check(refs, documents, visible) == expected


@given(references)
def test_unique_keeps_the_first_of_each_reference_in_order(refs: list[Reference]) -> None:
    once = unique(refs)
    assert len(once) == len(set(refs))
    assert once == sorted(set(refs), key=refs.index)


@given(references, archives())
def test_the_report_names_every_reference_once_in_the_right_sequence(
        refs: list[Reference], archive: tuple[dict[str, Any], set[Any]]) -> None:
    documents, whole = archive
    verdicts = judge(unique(refs), documents, visible, whole, supported)
    event_type, ds = event_information("1.2.3.4", verdicts, "ARCHIVE")
    good = [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
            for i in ds.get("ReferencedSOPSequence", [])]
    bad = [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID, i.FailureReason)
           for i in ds.get("FailedSOPSequence", [])]
    assert good == [(v.reference.sop_class, v.reference.sop_instance)
                    for v in verdicts if v.committed]
    assert bad == [(v.reference.sop_class, v.reference.sop_instance, v.reason)
                   for v in verdicts if not v.committed]
    assert event_type == (SOME_FAILED if bad else ALL_COMMITTED)
    assert ds.TransactionUID == "1.2.3.4"


def _request(**changes: Any) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = "1.2.3.4"
    item = Dataset()
    item.ReferencedSOPClassUID = CT
    item.ReferencedSOPInstanceUID = "1.2.3.5"
    ds.ReferencedSOPSequence = [item]
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_request_is_read_and_malformed_ones_are_refused_with_a_reason() -> None:
    assert parse(_request()) == ("1.2.3.4", [Reference(CT, "1.2.3.5")])
    for changes, comment in (({"TransactionUID": ""}, "Transaction UID"),
                             ({"TransactionUID": "1.2\x013"}, "Transaction UID"),
                             ({"TransactionUID": "1." * 40}, "Transaction UID"),
                             ({"ReferencedSOPSequence": []}, "Referenced SOP Sequence")):
        try:
            parse(_request(**changes))
        except Invalid as exc:
            assert exc.status == 0x0115 and comment in exc.comment
        else:
            raise AssertionError(f"{changes} accepted")
    # what the archive stores it may be asked about: unusual UIDs are data
    odd = _request()
    odd.ReferencedSOPSequence[0].ReferencedSOPInstanceUID = "$where"
    assert parse(odd)[1] == [Reference(CT, "$where")]


def test_a_database_failure_during_the_check_is_a_processing_failure_for_each() -> None:
    """The modality may ask again: nothing is committed, nothing is said to be absent."""
    from types import SimpleNamespace

    from pymongo.errors import AutoReconnect

    from archive.commitment import verify

    suspected: list[BaseException] = []

    def find(*args: Any, **kwargs: Any) -> Any:
        raise AutoReconnect("connection lost")

    archive = SimpleNamespace(instances=SimpleNamespace(find=find),
                              health=SimpleNamespace(suspect=suspected.append))
    refs = [Reference(CT, "1.2.3.1"), Reference(MR, "1.2.3.2"), Reference(CT, "1.2.3.1")]
    verdicts = verify(archive, refs, None, supported)  # type: ignore[arg-type]
    assert [(v.reference, v.reason) for v in verdicts] == [
        (Reference(CT, "1.2.3.1"), PROCESSING_FAILURE), (Reference(MR, "1.2.3.2"),
                                                         PROCESSING_FAILURE)]
    assert len(suspected) == 1

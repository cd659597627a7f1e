"""Presentation context negotiation: the requestor's order of transfer syntaxes decides.

pynetdicom would pick the first syntax of the acceptor's list; ``archive.negotiation``
makes the archive accept the first one the requestor proposes that it supports
(PS3.8 9.3.2.2), so a modality sending JPEG 2000 stores what it compressed.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom import ALL_TRANSFER_SYNTAXES, acse
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from archive.dimse import negotiation

PRIVATE_SYNTAX = "1.2.826.0.1.3680043.10.2024.1.1"  # supported by no one


def _context(abstract: str, syntaxes: list[str], context_id: int | None = None,
             scu_role: bool | None = None, scp_role: bool | None = None) -> PresentationContext:
    cx = PresentationContext()
    cx.abstract_syntax = abstract
    cx.transfer_syntax = syntaxes
    cx.context_id = context_id
    cx.scu_role, cx.scp_role = scu_role, scp_role
    return cx


SUPPORTED = [_context(uid, list(ALL_TRANSFER_SYNTAXES), scu_role=True, scp_role=True)
             for uid in (CTImageStorage, MRImageStorage)]


@settings(max_examples=150)
@given(st.lists(st.sampled_from([*ALL_TRANSFER_SYNTAXES[:8], PRIVATE_SYNTAX]),
                min_size=1, max_size=5, unique=True),
       st.sampled_from([CTImageStorage, MRImageStorage]),
       st.sampled_from([None, True, False]))
def test_the_first_proposed_syntax_we_support_is_accepted(
        proposed: list[str], abstract: str, scp_role: bool | None) -> None:
    negotiation.install()
    rq = _context(abstract, proposed, context_id=1, scu_role=None if scp_role is None else True,
                  scp_role=scp_role)
    roles = {} if scp_role is None else {abstract: (True, scp_role)}
    results, role_items = acse.negotiate_as_acceptor([rq], SUPPORTED, roles)
    (result,) = results
    supported = [ts for ts in proposed if ts in ALL_TRANSFER_SYNTAXES]
    if supported:
        assert result.result == 0x00
        assert result.transfer_syntax == [supported[0]]
    else:
        assert result.result == 0x04  # transfer syntaxes not supported
    assert result.context_id == 1 and result.abstract_syntax == abstract
    # everything else (roles, results) as pynetdicom's own negotiation decides it
    plain, plain_roles = acse.negotiate_as_acceptor.__wrapped__([rq], SUPPORTED, roles)
    assert (result.result, result.as_scu, result.as_scp) == \
        (plain[0].result, plain[0].as_scu, plain[0].as_scp)
    assert [(i.sop_class_uid, i.scu_role, i.scp_role) for i in role_items] == \
        [(i.sop_class_uid, i.scu_role, i.scp_role) for i in plain_roles]
    # the supported contexts are never changed by a negotiation
    assert all(cx.transfer_syntax == list(ALL_TRANSFER_SYNTAXES) for cx in SUPPORTED)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@given(st.one_of(st.sampled_from([CTImageStorage, "1.2.840.10008.1.2", "1" * 65, "1.2.a",
                                  "", "01.2"]),
                 st.text(alphabet="0123456789.", max_size=70)))
def test_remembered_uid_checks_decide_as_pynetdicom_does(value: str) -> None:
    """The UIDs of association requests are checked once per process: the same UID
    or the same refusal as pynetdicom's own check, every time."""
    from pynetdicom import pdu_items, utils

    negotiation.install()

    def outcome(check: object) -> object:
        try:
            return ("ok", check(value.encode(), "uid", False, False))  # type: ignore[operator]
        except ValueError:
            return ("refused",)

    expected = outcome(utils.set_uid)  # pynetdicom's own
    assert outcome(pdu_items.set_uid) == expected
    assert outcome(pdu_items.set_uid) == expected  # remembered (or refused again)

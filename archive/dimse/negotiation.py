"""Presentation context negotiation that keeps the sender's transfer syntax.

pynetdicom accepts, within a proposed context, the first transfer syntax of *its own*
list.  A modality proposing ``[JPEG 2000, Explicit VR Little Endian]`` would then have
to decompress, or fail if it cannot (DCMTK storescu cannot): an archive stores what it
is sent, so the requestor's order of preference decides, as the standard intends
(PS3.8 9.3.2.2).  The wrapper reorders the acceptor's list per proposed context and
delegates the rest (roles, rejections) to pynetdicom unchanged.

The UIDs of an association request are checked once per UID and process rather than on
every association (:func:`_remembered_uids`): a C-GET requestor proposes every storage
SOP class, and checking them cost more than the retrieve of a small study.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from pydicom.uid import UID
from pynetdicom import (
    _config,
    acse,
    pdu_items,
    pdu_primitives,
    presentation,
    utils,
)
from pynetdicom.presentation import PresentationContext


def _reordered(rq: PresentationContext, ac: PresentationContext) -> PresentationContext:
    """``ac`` with the requestor's transfer syntaxes first, in its order.

    Built from ``ac``'s own UID objects, set on the context's fields: pynetdicom's
    setters validate every UID again (regular expressions), which for a C-GET
    requestor proposing each storage SOP class against the archive's ~30 transfer
    syntaxes was two fifths of the node's CPU for the whole C-GET of a study.
    """
    context = PresentationContext()
    context._abstract_syntax = ac.abstract_syntax
    ours = {str(ts): ts for ts in ac.transfer_syntax}
    preferred = list(dict.fromkeys(ours[ts] for ts in rq.transfer_syntax if ts in ours))
    context._transfer_syntax = preferred + [ts for ts in ac.transfer_syntax
                                            if ts not in preferred]
    context.scu_role, context.scp_role = ac.scu_role, ac.scp_role
    return context


def _prefer_requestor(original: Callable[..., Any]) -> Callable[..., Any]:
    def negotiate(rq_contexts: list[PresentationContext], ac_contexts: list[PresentationContext],
                  roles: dict[str, Any] | None = None) -> tuple[list[Any], list[Any]]:
        supported = {cx.abstract_syntax: cx for cx in ac_contexts}
        results: list[Any] = []
        role_items: dict[str, Any] = {}
        for rq in rq_contexts:
            ac = supported.get(rq.abstract_syntax)
            acceptable = [_reordered(rq, ac)] if ac is not None else list(ac_contexts)
            result, role_list = original([rq], acceptable, roles)
            results.extend(result)
            for item in role_list:
                role_items[item.sop_class_uid] = item
        return results, list(role_items.values())
    negotiate.__wrapped__ = original  # type: ignore[attr-defined]
    return negotiate


class SharedContexts(list):  # type: ignore[type-arg]
    """The server's supported contexts, shared by its associations instead of copied.

    pynetdicom deep-copies them for every association it accepts: with every storage
    SOP class and transfer syntax that is ~65 ms of UID copying per association, more
    than a whole C-FIND.  Negotiation only reads them (``_reordered`` builds new
    contexts), so each association gets a new list of the same context objects.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return list(self)


def share_contexts(server: Any) -> None:
    """Let a started pynetdicom server hand its contexts to associations uncopied."""
    server.contexts = SharedContexts(server.contexts)


#: UIDs whose validation is remembered: the SOP classes and transfer syntaxes that
#: association requests name (a few hundred); others only evict each other.
UID_CACHE_SIZE = 1024


def _remembered_uids() -> None:
    """pynetdicom checks every UID of an association request with pydicom's regular
    expressions, several times over (``set_uid``, ``validate_uid``, ``UID()``): for a
    C-GET requestor proposing every storage SOP class, a third of the node's CPU in the
    C-GET of a study.  The outcome depends on the UID and on whether conformance is
    enforced only, so it is computed once per UID; an invalid UID still raises (and
    is not remembered).  Only the association's PDU items, primitives and presentation
    contexts use the remembered ones: the instance UIDs of DIMSE messages, each seen
    once, would only fill the cache."""
    set_uid, validate_uid = utils.set_uid, utils.validate_uid

    @functools.lru_cache(maxsize=UID_CACHE_SIZE)
    def remembered_set(value: str, name: str, allow_empty: bool, allow_none: bool,
                       validate: bool, _enforced: bool) -> UID | None:
        return set_uid(value, name, allow_empty, allow_none, validate)

    def fast_set(value: Any, name: str, allow_empty: bool = True, allow_none: bool = True,
                 validate: bool = True) -> UID | None:
        if isinstance(value, bytes):  # as pynetdicom decodes them from PDUs
            value = utils.decode_bytes(value)
        if isinstance(value, str):
            return remembered_set(str(value), name, allow_empty, allow_none, validate,
                                  _config.ENFORCE_UID_CONFORMANCE)
        return set_uid(value, name, allow_empty, allow_none, validate)

    @functools.lru_cache(maxsize=UID_CACHE_SIZE)
    def remembered_validate(uid: str, _enforced: bool) -> bool:
        return validate_uid(UID(uid))

    def fast_validate(uid: UID) -> bool:
        return remembered_validate(str(uid), _config.ENFORCE_UID_CONFORMANCE)

    @functools.lru_cache(maxsize=UID_CACHE_SIZE)
    def remembered_uid(value: str) -> UID:
        return UID(value)

    fast_set.__wrapped__ = set_uid  # type: ignore[attr-defined]
    for module in (pdu_items, pdu_primitives, presentation):
        if getattr(module, "set_uid", None) is set_uid:
            module.set_uid = fast_set  # type: ignore[attr-defined]
        if getattr(module, "validate_uid", None) is validate_uid:
            module.validate_uid = fast_validate  # type: ignore[attr-defined]
    # add_transfer_syntax makes a UID of each (the only use of the name there)
    presentation.UID = remembered_uid  # type: ignore[attr-defined]


def install() -> None:
    """Patch pynetdicom's acceptor negotiation and its UID checks of association
    requests, once per process."""
    if not hasattr(pdu_items.set_uid, "__wrapped__"):
        _remembered_uids()
    for name in ("negotiate_as_acceptor", "negotiate_unrestricted"):
        current = getattr(acse, name)
        if not hasattr(current, "__wrapped__"):
            setattr(acse, name, _prefer_requestor(current))

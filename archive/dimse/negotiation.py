"""Presentation context negotiation that keeps the sender's transfer syntax.

pynetdicom accepts, within a proposed context, the first transfer syntax of *its own*
list.  A modality proposing ``[JPEG 2000, Explicit VR Little Endian]`` would then have
to decompress, or fail if it cannot (DCMTK storescu cannot): an archive stores what it
is sent, so the requestor's order of preference decides, as the standard intends
(PS3.8 9.3.2.2).  The wrapper reorders the acceptor's list per proposed context and
delegates the rest (roles, rejections) to pynetdicom unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pynetdicom import acse
from pynetdicom.presentation import PresentationContext


def _reordered(rq: PresentationContext, ac: PresentationContext) -> PresentationContext:
    context = PresentationContext()
    context.abstract_syntax = ac.abstract_syntax
    ours = set(ac.transfer_syntax)
    preferred = [ts for ts in rq.transfer_syntax if ts in ours]
    context.transfer_syntax = preferred + [ts for ts in ac.transfer_syntax if ts not in preferred]
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


def install() -> None:
    """Patch pynetdicom's acceptor negotiation once per process."""
    for name in ("negotiate_as_acceptor", "negotiate_unrestricted"):
        current = getattr(acse, name)
        if not hasattr(current, "__wrapped__"):
            setattr(acse, name, _prefer_requestor(current))

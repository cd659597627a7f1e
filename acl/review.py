"""Who may do what to given datasets: ``archive acl check`` over many principals.

For an administrator reviewing the rules (the web console's rules page): each
principal the rules name, ``anonymous`` and any other user, against each service about
datasets, judged on each instance document exactly as a request is
(:func:`acl.rules.decide`, :meth:`acl.rules.Decision.deciding_rule`) and as
``archive acl check --user U --service S --dataset FILE`` judges one file.  Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from acl.identity import ANONYMOUS
from acl.rules import ANY, DELETE, MODIFY, QUERY, RETRIEVE, STORE, Rule, decide

#: The services about datasets, in the order a review shows them.
DATA_SERVICES = (QUERY, RETRIEVE, STORE, DELETE, MODIFY)
#: The row of users the rules do not name: only ``*`` rules apply to them.
OTHERS = ANY


@dataclass(frozen=True)
class Access:
    """What one principal may do with one service to the instances reviewed."""

    principal: str
    service: str
    #: how many of the instances it may use the service on
    allowed: int
    total: int
    #: the rules that allow it, first deciding rule first
    rules: tuple[Rule, ...]

    @property
    def verdict(self) -> str:
        """``all``, ``some`` or ``none`` of the instances."""
        if not self.allowed:
            return "none"
        return "all" if self.allowed == self.total else "some"


def principals(rules: Iterable[Rule], also: Iterable[str] = ()) -> list[str]:
    """The principals worth a row: those the rules name, ``also`` (a user being
    checked), ``anonymous``, and :data:`OTHERS` last."""
    named = {r.principal for r in rules if r.principal != ANY} | {
        p for p in also if p and p != ANY}
    return [*sorted(named - {ANONYMOUS}), ANONYMOUS, OTHERS]


def review(rules: Sequence[Rule], documents: Sequence[Mapping[str, Any]],
           who: Sequence[str], services: Sequence[str] = DATA_SERVICES
           ) -> list[list[Access]]:
    """A row per principal of ``who``, a cell per service: on how many of the instance
    ``documents`` the rules let it use the service, and by which rules."""
    table = []
    for principal in who:
        row = []
        for service in services:
            decision = decide(rules, principal, service)
            allowed, deciding = 0, {}
            if decision.allowed:
                for doc in documents:
                    rule = decision.deciding_rule(doc)
                    if rule is not None:
                        allowed += 1
                        deciding.setdefault(rule.index, rule)
            row.append(Access(principal, service, allowed, len(documents),
                              tuple(deciding[i] for i in sorted(deciding))))
        table.append(row)
    return table

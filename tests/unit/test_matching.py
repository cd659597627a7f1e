"""Wild card matching (archive/matching.py) against a reference, and its cost.

The reference is the textbook dynamic programme over (pattern, value) prefixes, which
cannot back-track; the archive's matcher must agree with it on every pattern and value
hypothesis generates, through both ways the archive uses it (a wild card value, and the
regular expression query.py writes for MongoDB, read back by evaluate), and MongoDB's
own reading of that expression (Python's ``re`` stands in for PCRE on small inputs).
"""

from __future__ import annotations

import re
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from archive import matching
from archive.query import evaluate

alphabet = st.sampled_from("ab*?.^$\\[(é ")
patterns = st.text(alphabet, max_size=9)
values = st.text(st.sampled_from("ab.^$\\[(éÉ *?"), max_size=12)


def reference(pattern: str, value: str) -> bool:
    """Does ``value`` match ``pattern`` (``*`` any run, ``?`` one character)?"""
    rows = [[False] * (len(value) + 1) for _ in range(len(pattern) + 1)]
    rows[0][0] = True
    for i, char in enumerate(pattern, 1):
        for j in range(len(value) + 1):
            if char == "*":
                rows[i][j] = rows[i - 1][j] or (j > 0 and rows[i][j - 1])
            elif j > 0 and char in ("?", value[j - 1]):
                rows[i][j] = rows[i - 1][j - 1]
    return rows[len(pattern)][len(value)]


@settings(max_examples=3000, deadline=None)
@given(pattern=patterns, value=values)
def test_the_matcher_agrees_with_the_reference(pattern: str, value: str) -> None:
    expected = reference(pattern, value)
    assert matching.matches(pattern, value) is expected
    expression = matching.regex(pattern)
    assert matching.from_regex(expression).matches(value) is expected
    assert evaluate({"f": {"$regex": expression}}, {"f": value}) is expected
    assert (re.search(expression, value) is not None) is expected  # what a server reads


@settings(max_examples=1000, deadline=None)
@given(pattern=patterns, value=values)
def test_case_folding_agrees_with_the_reference(pattern: str, value: str) -> None:
    expected = reference(matching.fold(pattern), matching.fold(value))
    assert matching.matches(pattern, value, fold_case=True) is expected
    assert evaluate({"f": {"$regex": matching.regex(pattern), "$options": "i"}},
                    {"f": value}) is expected


@settings(max_examples=1000, deadline=None)
@given(pattern=patterns, value=values)
def test_the_servers_prefix_selects_a_superset(pattern: str, value: str) -> None:
    prefix = matching.prefix_regex(matching.regex(pattern))
    if reference(pattern, value):
        assert prefix is None or re.search(prefix, value) is not None


def test_pathological_patterns_cost_linear_time() -> None:
    """``*?*?...b`` and ``*a*a...b`` against long values: exponential for a back-tracking
    engine (which froze the node), a few milliseconds here, growing with the value."""
    cases = [("*?" * 30 + "b", False), ("*a" * 30 + "b", False),
             ("?" * 40 + "*" * 40 + "a*" * 20, True), ("*a?" * 25 + "*", True)]
    for pattern, expected in cases:
        assert matching.matches(pattern, "a" * 200) is reference(pattern, "a" * 200)
        for length in (1_000, 10_000):
            started = time.perf_counter()
            assert matching.matches(pattern, "a" * length) is expected
            assert time.perf_counter() - started < 0.2, (pattern[:12], length)


def test_expressions_the_archive_did_not_write_are_refused() -> None:
    for expression in ("^a.*b$", "a", "^(a|b)$", "^a+$", "^[ab]$"):
        try:
            matching.from_regex(expression)
        except ValueError:
            continue
        raise AssertionError(f"{expression!r} accepted")

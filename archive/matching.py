"""Wild card matching (PS3.4 C.2.2.2.4) in time linear in the value, whatever the pattern.

C-FIND values and access-rule patterns come from the network or from administrators:
``*?*?*?...b`` against a long value makes a back-tracking regular expression engine
(Python's ``re``, PCRE) take exponential time, and Python's ``re`` holds the GIL while
it does, which froze every association of the node.  A wild card pattern is simple
enough not to need one:

- a run of ``*`` and ``?`` is equivalent to its ``?`` count followed by one ``*`` if the
  run had any: ``*?*?`` == ``??*`` (a star absorbs any order);
- between stars, the literal segments (``?`` inside them matching one character) must
  appear in order; taking the leftmost occurrence of each is always right (a later one
  leaves less room for the rest, never more), and the last segment is anchored at the
  end.

So matching is one left-to-right pass in which each segment is searched for once:
O(len(value) x len(pattern)) in the worst case, with no back-tracking across segments.

The archive writes wild cards to MongoDB as anchored regular expressions built by
:func:`regex` (``[\\s\\S]*`` for ``*``, ``[\\s\\S]`` for ``?``, every other character
escaped); :func:`from_regex` reads such an expression back, so the local evaluation of
a filter (``archive.query.evaluate``) never hands one to ``re``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

_ANY_RUN = r"[\s\S]*"
_ANY_ONE = r"[\s\S]"


@dataclass(frozen=True)
class _Segment:
    """Literal characters between stars; ``None`` stands for ``?`` (any one character)."""

    chars: tuple[str | None, ...]

    def matches_at(self, value: str, start: int) -> bool:
        if start + len(self.chars) > len(value):
            return False
        return all(c is None or value[start + i] == c for i, c in enumerate(self.chars))

    def find(self, value: str, start: int) -> int:
        """Leftmost position >= ``start`` where the segment matches, or -1."""
        if not self.chars:
            return start
        if None not in self.chars:  # plain text: str.find is linear in practice
            return value.find("".join(self.chars), start)  # type: ignore[arg-type]
        for position in range(start, len(value) - len(self.chars) + 1):
            if self.matches_at(value, position):
                return position
        return -1


@dataclass(frozen=True)
class Wildcard:
    """A compiled wild card pattern.

    ``head`` must match at the start, ``tail`` at the end, ``middle`` in order between
    them; without any star the whole value must be ``head`` exactly.
    """

    head: _Segment
    middle: tuple[_Segment, ...]
    tail: _Segment | None  # None: no star at all
    fold_case: bool = False

    @property
    def prefix(self) -> str:
        """The literal characters every match starts with."""
        chars = []
        for c in self.head.chars:
            if c is None:
                break
            chars.append(c)
        return "".join(chars)

    def matches(self, value: str) -> bool:
        if self.fold_case:
            value = fold(value)
        if self.tail is None:
            return len(value) == len(self.head.chars) and self.head.matches_at(value, 0)
        if len(value) < len(self.head.chars) + len(self.tail.chars):
            return False
        if not self.head.matches_at(value, 0):
            return False
        end = len(value) - len(self.tail.chars)
        if not self.tail.matches_at(value, end):
            return False
        position = len(self.head.chars)
        for segment in self.middle:
            found = segment.find(value, position)
            if found < 0 or found + len(segment.chars) > end:
                return False
            position = found + len(segment.chars)
        return True


def fold(text: str) -> str:
    """Case folding that keeps one character per character, so ``?`` still counts one.

    ``str.lower`` turns a few characters into two (U+0130); those are kept as they are.
    """
    folded = text.lower()
    if len(folded) == len(text):
        return folded
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


def compile_wildcard(text: str, fold_case: bool = False) -> Wildcard:
    """Compile a DICOM wild card value: ``*`` any run of characters, ``?`` any one."""
    if fold_case:
        text = fold(text)
    segments: list[list[str | None]] = [[]]
    for char in text:
        if char == "*":
            if segments[-1] or len(segments) == 1:
                segments.append([])
            continue
        segments[-1].append(None if char == "?" else char)
    if len(segments) == 1:
        return Wildcard(_Segment(tuple(segments[0])), (), None, fold_case)
    # A star was seen: segments[0] is the head, segments[-1] the tail (possibly empty).
    head, *middle, tail = (_Segment(tuple(s)) for s in segments)
    return Wildcard(head, tuple(m for m in middle if m.chars), tail, fold_case)


def matches(text: str, value: str, fold_case: bool = False) -> bool:
    """Whether ``value`` matches the wild card value ``text``."""
    return _cached(text, fold_case).matches(value)


@lru_cache(maxsize=1024)
def _cached(text: str, fold_case: bool) -> Wildcard:
    return compile_wildcard(text, fold_case)


# --- the regular expressions the archive sends to MongoDB ---------------------------


def canonical(text: str) -> str:
    """The same wild card with each run of ``*``/``?`` written ``?...?*`` (or ``?...?``).

    Equivalent, and the regular expression built from it has at most one unbounded
    repetition per run, which keeps a back-tracking engine's work polynomial.
    """
    return re.sub(r"[*?]+", lambda m: "?" * m.group().count("?")
                  + ("*" if "*" in m.group() else ""), text)


def regex(text: str) -> str:
    """An anchored regular expression matching what the wild card value matches."""
    parts = []
    for part in re.split(r"(\*|\?)", canonical(text)):
        if part == "*":
            parts.append(_ANY_RUN)
        elif part == "?":
            parts.append(_ANY_ONE)
        else:
            parts.append(re.escape(part))
    return "^" + "".join(parts) + "$"


_TOKEN = re.compile(r"\[\\s\\S\]\*|\[\\s\\S\]|\\(.)|(.)", re.DOTALL)
_SPECIAL = frozenset(".^$*+?{}[]\\|()")


@lru_cache(maxsize=1024)
def from_regex(expression: str, fold_case: bool = False) -> Wildcard:
    """The compiled wild card a :func:`regex` (or :func:`prefix_regex`) expression was
    built from.

    Raises ValueError for any other expression: the archive never hands a regular
    expression to a back-tracking engine.
    """
    if not expression.startswith("^"):
        raise ValueError(f"not a wild card expression: {expression[:40]!r}")
    segments: list[list[str | None]] = [[]]
    position, anchored = 1, False
    while position < len(expression):
        found = _TOKEN.match(expression, position)
        if found is None:  # pragma: no cover - every character matches some token
            raise ValueError(f"not a wild card expression: {expression[:40]!r}")
        token, escaped, plain = found.group(0), found.group(1), found.group(2)
        position = found.end()
        if token == _ANY_RUN:
            segments.append([])
        elif token == _ANY_ONE:
            segments[-1].append(None)
        elif escaped is not None:
            segments[-1].append(escaped)
        elif plain == "$" and position == len(expression):
            anchored = True
        elif plain in _SPECIAL:  # an operator regex() never writes
            raise ValueError(f"not a wild card expression: {expression[:40]!r}")
        else:
            segments[-1].append(plain)
    if not anchored:  # a prefix: anything may follow
        segments.append([])
    if fold_case:
        segments = [[None if c is None else fold(c) for c in s] for s in segments]
    if len(segments) == 1:
        return Wildcard(_Segment(tuple(segments[0])), (), None, fold_case)
    head, *middle, tail = (_Segment(tuple(s)) for s in segments)
    return Wildcard(head, tuple(m for m in middle if m.chars), tail, fold_case)


def prefix_regex(expression: str) -> str | None:
    """An anchored prefix expression selecting a superset of what a :func:`regex`
    expression matches (None: no literal prefix, anything may match).

    Servers evaluate it in time linear in the prefix and can use an index for it.
    """
    prefix = from_regex(expression).prefix
    return "^" + re.escape(prefix) if prefix else None

"""YAML of the administrators' files, parsed with bounds.

The configuration, the access rules and the users file are small, hand-written and
need no anchors or aliases; an alias "bomb" of 600 bytes expanded to gigabytes in the
rules' reader (46 s and 2.2 GB before it was refused).  Every file is therefore
refused, with one line naming it, when it is larger than :data:`MAX_BYTES`, nests
deeper than :data:`MAX_DEPTH`, or holds an anchor (``&``) or alias (``*``).  The checks
run while the node graph is composed, before anything is built from it, so a refused
file costs what reading its text costs.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.events import AliasEvent, CollectionStartEvent, ScalarEvent
from yaml.nodes import Node

#: Largest file read (the shipped files are a few KiB).
MAX_BYTES = 1024 * 1024
#: Deepest nesting, in nodes from the root to a leaf (the rules nest about six deep).
MAX_DEPTH = 32


class YamlLimitError(yaml.YAMLError):
    """A file beyond the bounds; ``line`` is 1-based (0: the whole file)."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(message)
        self.message, self.line = message, line

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader refusing anchors, aliases and deep nesting as it composes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, AliasEvent):
            raise YamlLimitError(f"alias *{event.anchor} refused (anchors and aliases are "
                                 "not allowed)", line)
        if isinstance(event, ScalarEvent | CollectionStartEvent) and event.anchor:
            raise YamlLimitError(f"anchor &{event.anchor} refused (anchors and aliases are "
                                 "not allowed)", line)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlLimitError(f"nested deeper than {MAX_DEPTH} levels", line)
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1


def _check_size(text: str) -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise YamlLimitError(f"{size} bytes, more than the {MAX_BYTES} a file may have")


def compose(text: str) -> Node | None:
    """The node graph of a document (``yaml.compose``), within the bounds."""
    _check_size(text)
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_node()  # type: ignore[no-any-return]
    finally:
        loader.dispose()


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` within the bounds."""
    _check_size(text)
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def describe(exc: yaml.YAMLError) -> str:
    """One line for an error: where, and what (PyYAML's messages span several)."""
    if isinstance(exc, YamlLimitError):
        return str(exc)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}: {problem}" if mark is not None else str(problem)

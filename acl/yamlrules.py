"""Rules as administrators write them: YAML with DICOM keywords and matching values.

```yaml
rules:
  - {principal: "*", service: Echo}
  - {principal: admin, service: "*"}
  - principal: alice
    service: Query
    pattern: {StudyDescription: "Some study", PatientID: "TRIAL42-*"}
```

The file is read as YAML *nodes*, not through YAML's typing: a pattern value is the
text as written (``10:30`` stays a time, not the sexagesimal integer 630; ``00123``
stays a Patient ID, not octal), and every problem is reported with its line.
:func:`parse` validates everything before anything is applied and reports all the
problems at once, each naming the rule (1-based index and principal) and its line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from acl.patterns import PatternError, RawValue, parse_key, to_json, to_text
from acl.rules import ANY, RETRIEVE, SERVICES, UNPATTERNED, Rule
from archive import yamlfile

_NULL = "tag:yaml.org,2002:null"
_FIELDS = ("principal", "service", "pattern", "destinations")


@dataclass(frozen=True)
class Problem:
    """One problem of a rules file, at a line (1-based)."""

    line: int
    message: str


class RulesFileError(Exception):
    """A rules file that cannot be applied; ``problems`` lists every problem found."""

    def __init__(self, filename: str, problems: Sequence[Problem]) -> None:
        self.filename = filename
        self.problems = tuple(problems)
        super().__init__("\n".join(f"{filename}:{p.line}: {p.message}" for p in self.problems))


def load(path: str | Path) -> list[Rule]:
    """The rules of a file; RulesFileError when it cannot be read or is invalid."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesFileError(str(path), [Problem(0, f"cannot read: {exc}")]) from None
    return parse(text, str(path))


def parse(text: str, filename: str = "<rules>") -> list[Rule]:
    """Validate a whole rules file and return its rules, or raise RulesFileError."""
    try:
        root = yamlfile.compose(text)
    except yamlfile.YamlLimitError as exc:
        raise RulesFileError(filename, [Problem(exc.line, exc.message)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 0
        problem = getattr(exc, "problem", None) or str(exc)
        raise RulesFileError(filename, [Problem(line, f"not valid YAML: {problem}")]) from None
    problems: list[Problem] = []
    items = _rule_nodes(root, problems)
    rules = []
    for index, node in enumerate(items, 1):
        rule = _rule(node, index, filename, problems)
        if rule is not None:
            rules.append(rule)
    if problems:
        raise RulesFileError(filename, problems)
    return rules


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _rule_nodes(root: Node | None, problems: list[Problem]) -> list[Node]:
    """The items of the top-level ``rules:`` list."""
    if not isinstance(root, MappingNode):
        line = _line(root) if root is not None else 1
        problems.append(Problem(line, "expected a mapping with a 'rules:' list"))
        return []
    found: Node | None = None
    for key, value in root.value:
        if not isinstance(key, ScalarNode) or key.value != "rules":
            problems.append(Problem(_line(key), f"unknown top-level key {_scalar(key)!r} "
                                                "(only 'rules')"))
        elif found is not None:
            problems.append(Problem(_line(key), "'rules' given twice"))
        else:
            found = value
    if found is None:
        if not problems:
            problems.append(Problem(_line(root), "no 'rules:' list"))
        return []
    if isinstance(found, ScalarNode) and found.tag == _NULL:
        return []  # "rules:" with nothing: no rules at all
    if not isinstance(found, SequenceNode):
        problems.append(Problem(_line(found), "'rules' must be a list of rules"))
        return []
    return list(found.value)


def _rule(node: Node, index: int, filename: str, problems: list[Problem]) -> Rule | None:
    """One rule, or None after recording its problems."""
    if not isinstance(node, MappingNode):
        problems.append(Problem(_line(node), f"rule {index}: expected a mapping with "
                                             "principal, service and optional pattern"))
        return None
    fields: dict[str, tuple[Node, Node]] = {}
    before = len(problems)
    for key, value in node.value:
        name = _scalar(key)
        if name not in _FIELDS:
            fields.setdefault("?" + name, (key, value))
        elif name in fields:
            fields["!" + name] = (key, value)
        else:
            fields[name] = (key, value)
    principal = _principal(fields.get("principal"))
    who = f"rule {index} (principal {principal!r})" if principal else f"rule {index}"

    def problem(at: Node, message: str) -> None:
        problems.append(Problem(_line(at), f"{who}: {message}"))

    for name, (key, _) in fields.items():
        if name.startswith("?"):
            problem(key, f"unknown field {name[1:]!r} (fields: {', '.join(_FIELDS)})")
        elif name.startswith("!"):
            problem(key, f"field {name[1:]!r} given twice")
    if not principal:
        problem(fields["principal"][1] if "principal" in fields else node,
                "missing principal (a user name, or \"*\" for anyone)")
    service = _service(fields.get("service"), node, problem)
    pattern = _pattern(fields.get("pattern"), problem)
    destinations = _destinations(fields.get("destinations"), service, problem)
    if service in UNPATTERNED and "pattern" in fields:
        problem(fields["pattern"][0], f"{service} rules take no pattern (what they give is "
                "not a dataset)")
    if len(problems) > before or service is None:
        return None
    try:
        return Rule(principal, service, pattern, index, f"{filename}:{_line(node)}",
                    destinations)
    except PatternError as exc:
        problem(node, f"pattern: {exc}")
        return None


def _scalar(node: Node) -> str:
    return node.value if isinstance(node, ScalarNode) else f"<{node.id}>"


def _principal(entry: tuple[Node, Node] | None) -> str:
    if entry is None or not isinstance(entry[1], ScalarNode) or entry[1].tag == _NULL:
        return ""
    return entry[1].value.strip()


def _service(entry: tuple[Node, Node] | None, rule: Node, problem: Any) -> str | None:
    choices = ", ".join(SERVICES) + " or \"*\""
    if entry is None:
        problem(rule, f"missing service ({choices})")
        return None
    node = entry[1]
    text = node.value.strip() if isinstance(node, ScalarNode) and node.tag != _NULL else ""
    canonical = {s.lower(): s for s in (*SERVICES, ANY)}.get(text.lower())
    if canonical is None:
        problem(node, f"unknown service {text!r} ({choices})" if text
                else f"missing service ({choices})")
    return canonical


def _destinations(entry: tuple[Node, Node] | None, service: str | None,
                  problem: Any) -> tuple[str, ...]:
    """Move Destinations of a Retrieve rule: a list of AE titles."""
    if entry is None:
        return ()
    node = entry[1]
    values = node.value if isinstance(node, SequenceNode) else [node]
    titles = []
    for value in values:
        title = value.value.strip() if isinstance(value, ScalarNode) else ""
        if not 0 < len(title) <= 16 or "\\" in title:
            problem(value, "destinations: a list of AE titles (1 to 16 characters)")
            return ()
        titles.append(title)
    if service not in (RETRIEVE, ANY):
        problem(entry[0], "destinations apply to Retrieve rules only")
    return tuple(titles)


def _pattern(entry: tuple[Node, Node] | None, problem: Any) -> dict[str, Any] | None:
    """The pattern as DICOM JSON, each bad key reported at its own line."""
    if entry is None:
        return None
    node = entry[1]
    if isinstance(node, ScalarNode) and node.tag == _NULL:
        return None
    if not isinstance(node, MappingNode):
        problem(node, "pattern must be a mapping of attributes to values")
        return None
    raw: dict[str, RawValue] = {}
    spelled: dict[int, str] = {}
    ok = True
    for key, value in node.value:
        name = _scalar(key)
        if name in raw:
            problem(key, f"pattern key {name} given twice")
            ok = False
            continue
        raw[name] = _raw(value)
        try:
            to_json({name: raw[name]})
            tag = parse_key(name)
        except PatternError as exc:
            problem(key, f"pattern: {exc}")
            ok = False
            continue
        if tag in spelled:
            problem(key, f"pattern: {name} names the same attribute as {spelled[tag]}")
            ok = False
        spelled.setdefault(tag, name)
    return (to_json(raw) or None) if ok else None


def _raw(node: Node) -> RawValue:
    """A pattern value as written: text, list or mapping; YAML typing ignored."""
    if isinstance(node, MappingNode):
        return {_scalar(k): _raw(v) for k, v in node.value}
    if isinstance(node, SequenceNode):
        return [_raw(v) for v in node.value]
    return "" if node.tag == _NULL else str(node.value)


def dump(rules: Sequence[Rule], header: str = "") -> str:
    """Rules as a YAML file that :func:`parse` reads back to the same rules."""
    items: list[dict[str, Any]] = []
    for rule in rules:
        item: dict[str, Any] = {"principal": rule.principal, "service": rule.service}
        if rule.pattern:
            item["pattern"] = to_text(rule.pattern)
        if rule.destinations:
            item["destinations"] = list(rule.destinations)
        items.append(item)
    body = yaml.safe_dump({"rules": items}, sort_keys=False, allow_unicode=True,
                          default_flow_style=False, width=100)
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comments + body

"""The packages' layout, from the imports themselves: arrows point down only.

    archive/cli.py      the command line (nothing imports it)
    archive/dimse/      the DICOM front end       archive/web/  the HTTP front end
    acl/                who may do what
    archive/ (rest)     the core; archive/context.py, the context the front ends
                        receive, is its top: the one core module that builds acl's parts

Every import counts, those inside functions and under TYPE_CHECKING too: a lazy import
going up is still a back-edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FRONT_ENDS = ("archive.dimse", "archive.web")
TOP = ("archive.cli", "archive.__main__")


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("archive", "acl"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _all_imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # ``from archive import answers``: the module
                full = f"{node.module}.{alias.name}"
                names.add(full if full in MODULES else node.module)
    return names


IMPORTS = {name: _all_imports(path) for name, path in MODULES.items()}
#: module -> the modules of this project it imports
GRAPH = {name: {t for t in targets if t in MODULES} for name, targets in IMPORTS.items()}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _core(name: str) -> bool:
    return name.startswith("archive") and not _within(name, FRONT_ENDS + TOP)


def test_the_core_and_acl_import_no_front_end_nor_the_command_line() -> None:
    wrong = {(name, target) for name, targets in GRAPH.items()
             if _core(name) or name.startswith("acl")
             for target in targets if _within(target, FRONT_ENDS + TOP)}
    assert wrong == set()


def test_front_ends_do_not_know_each_other_nor_the_command_line() -> None:
    wrong = {(name, target) for name, targets in GRAPH.items()
             for front in FRONT_ENDS if _within(name, (front,))
             for target in targets
             if _within(target, TOP) or _within(target, tuple(f for f in FRONT_ENDS
                                                              if f != front))}
    assert wrong == set()


def test_only_the_context_builds_on_acl_in_the_core() -> None:
    users = {name for name, targets in GRAPH.items()
             if _core(name) and any(t.startswith("acl") for t in targets)}
    assert users <= {"archive.context"}


def test_the_core_and_acl_need_no_pynetdicom() -> None:
    """DIMSE is the DICOM front end's business: the core and acl run without it."""
    wrong = {(name, target) for name, targets in IMPORTS.items()
             if _core(name) or name.startswith("acl")
             for target in targets if _within(target, ("pynetdicom",))}
    assert wrong == set()


def test_no_import_cycle() -> None:
    """Tarjan's strongly connected components: every one a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        on_stack.add(name)
        for target in GRAPH[name]:
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in on_stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == name:
                    break
            if len(component) > 1 or name in GRAPH[name]:
                cycles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert cycles == []


def test_the_graph_is_read() -> None:
    """The checks above see the imports (a parser that found none would pass them)."""
    assert "acl.cli" in GRAPH["archive.cli"]
    assert "archive.storage" in GRAPH["archive.context"]
    # both front ends are read, and reach the core through the same context
    assert "archive.context" in GRAPH["archive.dimse.node"]
    assert {"archive.context", "archive.web.stow"} <= GRAPH["archive.web.app"]
    assert "archive.web.server" in GRAPH["archive.cli"]  # imported inside run_serve

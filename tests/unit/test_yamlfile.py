"""Bounded YAML: every administrator's file refuses anchors, aliases, deep nesting and
excessive size, quickly, with one line naming the file (config, rules, users)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from acl import yamlrules
from acl.users import UsersFileError, read_users
from archive import config, yamlfile


def alias_bomb(levels: int = 9, key: str = "x") -> str:
    """The "billion laughs": each level lists the previous one nine times."""
    lines = [f'{key}0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{key}{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]"
              for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def rules_bomb(levels: int = 9) -> str:
    head = "rules:\n  - principal: alice\n    service: Query\n    pattern:\n"
    body = "".join(f"      {line}\n" for line in alias_bomb(levels, "k").splitlines())
    return head + body.replace("k0:", "PatientName:").replace(
        f"k{levels - 1}:", "PatientID:")


def nested(depth: int) -> str:
    """``depth`` nodes from the root to the leaf: the mapping, lists, the scalar."""
    return "a: " + "[" * (depth - 2) + "1" + "]" * (depth - 2) + "\n"


@pytest.mark.parametrize(("text", "line", "needle"), [
    ("a: &x 1\nb: *x\n", 1, "anchor &x"),
    ("a: 1\nb: *x\n", 2, "alias *x"),
    ("a:\n  - &item {b: 1}\n", 2, "anchor &item"),
    (alias_bomb(), 1, "anchor &a0"),
    (nested(yamlfile.MAX_DEPTH + 1), 1, "nested deeper than 32"),
])
def test_anchors_aliases_and_deep_nesting_are_refused_with_the_line(text: str, line: int,
                                                                    needle: str) -> None:
    for parse in (yamlfile.safe_load, yamlfile.compose):
        with pytest.raises(yamlfile.YamlLimitError) as caught:
            parse(text)
        assert caught.value.line == line
        assert needle in str(caught.value)
        assert "\n" not in str(caught.value)


def test_nesting_up_to_the_limit_and_ordinary_files_are_read() -> None:
    assert yamlfile.safe_load(nested(yamlfile.MAX_DEPTH)) is not None
    shipped = Path(__file__).resolve().parents[2] / "config"
    for name in ("archive.yaml", "acl.yaml"):
        text = (shipped / name).read_text(encoding="utf-8")
        assert yamlfile.safe_load(text) == yaml.safe_load(text)


def test_a_file_over_the_size_limit_is_refused_before_parsing() -> None:
    text = "a: [" + "1," * (yamlfile.MAX_BYTES // 2) + "1]\n"
    started = time.perf_counter()
    with pytest.raises(yamlfile.YamlLimitError, match="more than the 1048576"):
        yamlfile.safe_load(text)
    assert time.perf_counter() - started < 0.5


def test_the_alias_bomb_is_refused_quickly_in_the_rules(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(rules_bomb(), encoding="utf-8")
    started = time.perf_counter()
    with pytest.raises(yamlrules.RulesFileError) as caught:
        yamlrules.load(path)
    assert time.perf_counter() - started < 1
    (problem,) = caught.value.problems
    assert problem.line == 5
    assert "anchor &a0 refused" in problem.message


def test_the_alias_bomb_is_refused_quickly_in_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "archive.yaml"
    path.write_text("ae_title: ARCHIVE\n" + alias_bomb(), encoding="utf-8")
    started = time.perf_counter()
    with pytest.raises(config.ConfigError) as caught:
        config.load(path, environ={})
    assert time.perf_counter() - started < 1
    assert str(caught.value) == f"{path}: line 2: anchor &a0 refused (anchors and aliases " \
                                "are not allowed)"


def test_the_alias_bomb_is_refused_quickly_in_the_users_file(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    path.write_text(alias_bomb(), encoding="utf-8")
    started = time.perf_counter()
    with pytest.raises(UsersFileError) as caught:
        read_users(path)
    assert time.perf_counter() - started < 1
    assert str(caught.value).startswith(f"{path}: line 1: anchor &a0 refused")


def test_yaml_syntax_errors_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "archive.yaml"
    path.write_text("ae_title: [unclosed\n", encoding="utf-8")
    with pytest.raises(config.ConfigError) as caught:
        config.load(path, environ={})
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"{path}: not valid YAML (line ")

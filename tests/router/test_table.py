from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from memfusion.errors import InvalidInput, NotFound
from memfusion.kv import POLICIES
from memfusion.router import Rule, Table, load_table, parse_table
from memfusion.router.table import KNOWN_POLICIES


def test_shipped_table_loads_and_names_real_policies() -> None:
    table = load_table()
    assert table.rules[-1].unconditional
    for rule in table.rules:
        assert rule.policy in POLICIES
        assert all(f in POLICIES for f in rule.fallbacks)
    assert set(KNOWN_POLICIES) <= set(POLICIES)


def test_matching_is_first_rule_that_holds() -> None:
    table = load_table()
    assert table.match("chat", 1000, None).policy == "dense"
    assert table.match("document", 20_000, None).policy == "quest"
    assert table.match("document", 100_000, None).why.startswith("long documents")
    assert table.match("code", 40_000, None).policy == "paged"
    assert table.match("chat", 1000, 10).policy == "window"  # the tight-latency rule comes first
    assert table.match("chat", 20_000, None).unconditional  # no chat rule above 8K: the default


def test_unknown_strategy_is_a_clear_error() -> None:
    with pytest.raises(InvalidInput, match=r"unknown strategy 'magic'.*valid policies: cca, dense"):
        parse_table({"rule": [{"policy": "magic"}]})
    with pytest.raises(InvalidInput, match="unknown strategy 'nope'"):
        parse_table({"rule": [{"policy": "dense", "fallbacks": ["nope"]}]})
    with pytest.raises(InvalidInput, match="unknown task"):
        parse_table({"rule": [{"policy": "dense", "task": "poetry"}]})
    with pytest.raises(InvalidInput, match="unknown fields"):
        parse_table({"rule": [{"policy": "dense", "colour": "red"}]})
    with pytest.raises(InvalidInput, match="last rule must match everything"):
        parse_table({"rule": [{"policy": "dense", "task": "chat"}]})
    with pytest.raises(InvalidInput, match="min_score"):
        parse_table({"retrieval": {"min_score": 3.0}, "rule": [{"policy": "dense"}]})


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        load_table(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rule]\npolicy=")
    with pytest.raises(InvalidInput, match="not valid TOML"):
        load_table(bad)


def test_toml_round_trip(tmp_path: Path) -> None:
    table = load_table().with_retrieval(min_score=0.4321, margin=0.0375)
    text = table.to_toml()
    again = parse_table(tomllib.loads(text))
    assert again.rules == table.rules
    assert again.retrieval.min_score == 0.4321
    assert again.retrieval.margin == 0.0375
    assert isinstance(again, Table) and isinstance(again.rules[0], Rule)

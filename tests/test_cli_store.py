"""``memfusion store ...`` driven through typer's CliRunner on a temporary sqlite store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from memfusion.cli import app
from memfusion.cli_store import EXIT_BAD_INPUT, EXIT_CONFLICT, EXIT_NOT_FOUND

runner = CliRunner()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mem.db'}"


def store(*args: str) -> Result:
    return runner.invoke(app, ["store", *args, "--embedder", "hashing"])


def ok_json(*args: str) -> Any:
    result = store(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def json_lines(*args: str) -> list[Any]:
    result = store(*args, "--json")
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_put_get_history_search_audit_round_trip(url: str) -> None:
    v1 = ok_json("put", url, "ns", "pet", "the cat sat on the mat", "--meta", '{"topic": "cats"}', "--actor", "ann")
    assert (v1["namespace"], v1["key"], v1["version"], v1["text"]) == ("ns", "pet", 1, "the cat sat on the mat")
    assert (v1["metadata"], v1["actor"], v1["deleted"]) == ({"topic": "cats"}, "ann", False)
    v2 = ok_json(
        "put",
        url,
        "ns",
        "pet",
        "the dog chased the ball",
        "--expected-version",
        "1",
        "--reason",
        "new pet",
        "--ttl",
        "3600",
    )
    assert (v2["version"], v2["reason"], v2["metadata"]) == (2, "new pet", {})
    assert v2["expires_at"] is not None
    ok_json("put", url, "ns", "car", "a red car", "--meta", '{"topic": "cars"}')

    got = ok_json("get", url, "ns", "pet")
    assert (got["version"], got["text"]) == (2, "the dog chased the ball")
    old = ok_json("get", url, "ns", "pet", "--as-of", v1["committed_at"])
    assert (old["version"], old["text"]) == (1, "the cat sat on the mat")

    versions = json_lines("history", url, "ns", "pet")
    assert [(r["version"], r["text"], r["actor"]) for r in versions] == [
        (1, "the cat sat on the mat", "ann"),
        (2, "the dog chased the ball", "memfusion"),
    ]

    hits = json_lines("search", url, "ns", "dog ball", "-k", "1")
    assert [(h["record"]["key"], h["record"]["version"]) for h in hits] == [("pet", 2)]
    assert 0.0 < hits[0]["score"] <= 1.0 + 1e-6
    filtered = json_lines("search", url, "ns", "dog ball", "--filter", '{"topic": "cars"}')
    assert [h["record"]["key"] for h in filtered] == ["car"]

    entries = json_lines("audit", url, "ns")
    assert [(e["op"], e["key"], e["old_version"], e["new_version"]) for e in entries] == [
        ("put", "pet", None, 1),
        ("put", "pet", 1, 2),
        ("put", "car", None, 1),
    ]
    assert [e["reason"] for e in entries] == [None, "new pet", None]
    assert len(json_lines("audit", url, "ns", "--limit", "1")) == 1

    gone = ok_json("delete", url, "ns", "car", "--expected-version", "1")
    assert (gone["version"], gone["deleted"]) == (2, True)


def test_tables_by_default(url: str) -> None:
    result = store("put", url, "ns", "pet", "the cat")
    assert result.exit_code == 0 and "stored ns/pet version 1" in result.stdout
    for args in (("get", url, "ns", "pet"), ("history", url, "ns", "pet"), ("search", url, "ns", "cat")):
        result = store(*args)
        assert result.exit_code == 0, result.output
        assert "the cat" in result.stdout


def test_compare_and_set_conflict_names_current_version(url: str) -> None:
    ok_json("put", url, "ns", "k", "first")
    ok_json("put", url, "ns", "k", "second")
    result = store("put", url, "ns", "k", "third", "--expected-version", "1")
    assert result.exit_code == EXIT_CONFLICT == 3
    assert "current version: 2" in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1
    assert ok_json("get", url, "ns", "k")["text"] == "second"  # nothing changed
    assert store("delete", url, "ns", "k", "--expected-version", "7").exit_code == EXIT_CONFLICT


def test_not_found(url: str) -> None:
    for args in (("get", url, "ns", "nope"), ("delete", url, "ns", "nope")):
        result = store(*args)
        assert result.exit_code == EXIT_NOT_FOUND == 4
        assert result.stderr.startswith("error: not found:") and "nope" in result.stderr
        assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ("put", "{url}", "ns", "k", "text", "--meta", "{not json"),
        ("put", "{url}", "ns", "k", "text", "--meta", "[1, 2]"),
        ("search", "{url}", "ns", "q", "--filter", "{'topic': 1}"),
        ("get", "{url}", "ns", "k", "--as-of", "yesterday"),
        ("put", "{url}", "bad namespace!", "k", "text"),
        ("search", "{url}", "ns", "q", "-k", "0"),
        ("check", "mysql://nowhere/db"),
    ],
)
def test_bad_input_exits_2_with_one_line(url: str, args: tuple[str, ...]) -> None:
    result = store(*(a.replace("{url}", url) for a in args))
    assert result.exit_code == EXIT_BAD_INPUT == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_bad_json_message_names_the_option(url: str) -> None:
    assert "--meta is not valid JSON" in store("put", url, "ns", "k", "t", "--meta", "{x").stderr
    assert "--filter must be a JSON object" in store("search", url, "ns", "q", "--filter", '"s"').stderr
    assert ok_json("check", url)["records"] == 0  # nothing was written by the refused put


def test_check_and_repair_clean_store(url: str) -> None:
    ok_json("put", url, "ns", "k", "hello world")
    report = ok_json("check", url)
    assert report == {
        "ok": True,
        "records": 1,
        "indexed": 1,
        "missing": [],
        "stale": [],
        "orphans": [],
        "broken_chains": [],
        "live_mismatch": [],
    }
    assert store("check", url).exit_code == 0
    assert ok_json("repair", url)["ok"] is True
    assert ok_json("get", url, "ns", "k")["text"] == "hello world"


def test_check_exits_1_when_not_ok(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from memfusion.store import ConsistencyReport
    from memfusion.store.sqlite import SQLiteStore

    ok_json("put", url, "ns", "k", "hello world")
    monkeypatch.setattr(SQLiteStore, "check", lambda self: ConsistencyReport(records=1, indexed=0, missing=[1]))
    result = store("check", url, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["missing"] == [1] and json.loads(result.stdout)["ok"] is False

"""In-process checks of the pieces: keys and rights, the token bucket, limits, deadlines, configs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import threading
import typing
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memfusion.errors import InvalidInput
from memfusion.router.table import TASK_TYPES
from memfusion.serve.app import ServeConfig
from memfusion.serve.auth import ENV_VAR, ApiKey, KeyRing, Right, hash_key, new_key
from memfusion.serve.limits import Limits, RateLimited, RateLimiter, RequestTimeout, TokenBucket, run_bounded
from memfusion.serve.run import RunConfig
from memfusion.serve.schemas import Task


def _entry(name: str, key: str, namespaces: dict[str, str], **extra: object) -> dict[str, object]:
    return {"name": name, "key_sha256": hash_key(key), "namespaces": namespaces, **extra}


def test_hash_is_sha256_and_new_keys_are_distinct() -> None:
    assert hash_key("abc") == hashlib.sha256(b"abc").hexdigest()
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100 and all(k.startswith("mf_") and len(k) >= 40 for k in keys)


def test_keyring_json_and_toml_give_the_same_rights(tmp_path: typing.Any) -> None:
    entries = [_entry("a", "ka", {"alice": "rw", "shared": "r"}), _entry("ops", "ko", {"*": "r", "x": "rw"})]
    (tmp_path / "keys.json").write_text(json.dumps({"keys": entries}))
    toml = "\n".join(
        f'[[keys]]\nname = "{e["name"]}"\nkey_sha256 = "{e["key_sha256"]}"\nnamespaces = {{ '
        + ", ".join(f'"{ns}" = "{r}"' for ns, r in typing.cast(dict[str, str], e["namespaces"]).items())
        + " }\n"
        for e in entries
    )
    (tmp_path / "keys.toml").write_text(toml)
    for ring in (
        KeyRing.load(tmp_path / "keys.json"),
        KeyRing.load(tmp_path / "keys.toml"),
        KeyRing.load(environ={ENV_VAR: toml}),
        KeyRing.load(environ={ENV_VAR: json.dumps({"keys": entries})}),
    ):
        a, ops = ring.authenticate("ka"), ring.authenticate("ko")
        assert a is not None and a.name == "a" and ops is not None and ops.name == "ops"
        assert a.right("alice") is Right.READ_WRITE and a.right("shared") is Right.READ and a.right("bob") is None
        assert a.may("shared", write=False) and not a.may("shared", write=True) and not a.may("bob", write=False)
        assert not a.admin and ops.admin
        assert ops.right("anything") is Right.READ and ops.right("x") is Right.READ_WRITE  # the stronger one wins
        assert ring.authenticate("kb") is None and ring.authenticate("") is None and ring.authenticate(None) is None


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        ([], "lists no API key"),
        ([{"name": "a", "namespaces": {}}], "'key_sha256' is missing"),
        ([{"name": "a", "key_sha256": "ABC", "namespaces": {}}], "64 lower-case hex"),
        ([_entry("a", "k", {"alice": "w"})], "must be 'r' (read) or 'rw'"),
        ([_entry("a", "k", {"bad ns": "r"})], "namespace 'bad ns' is not allowed"),
        ([_entry("a", "k", {}), _entry("a", "k2", {})], "names must be unique"),
        ([_entry("a", "k", {}), _entry("b", "k", {})], "same key_sha256"),
        ([_entry("a", "k", {}, rate_per_s=0)], "rate_per_s must be a positive number"),
        ([_entry("a", "k", {}, burst=1.5)], "burst must be a positive integer"),
        ([_entry("a", "k", {}, colour="red")], "unknown field(s) ['colour']"),
        ([_entry("a", "k", [])], "namespaces must be an object"),
    ],
)
def test_bad_keys_files_say_what_is_wrong(keys: list[object], words: str) -> None:
    with pytest.raises(InvalidInput) as info:
        KeyRing.parse(json.dumps({"keys": keys}))
    assert words in str(info.value)


def test_unreadable_or_absent_keys(tmp_path: typing.Any) -> None:
    with pytest.raises(InvalidInput, match="cannot read the keys file"):
        KeyRing.load(tmp_path / "nope.json")
    with pytest.raises(InvalidInput, match=f"--keys FILE or set {ENV_VAR}"):
        KeyRing.load(environ={})
    with pytest.raises(InvalidInput, match="neither JSON"):
        KeyRing.parse("keys = [")
    with pytest.raises(InvalidInput, match='"keys" list'):
        KeyRing.parse('{"key": []}')


def test_api_key_rights_table() -> None:
    k = ApiKey("k", hash_key("x"), {"a": Right.READ, "b": Right.READ_WRITE})
    table = {(ns, w): k.may(ns, w) for ns in ("a", "b", "c") for w in (False, True)}
    assert table == {
        ("a", False): True, ("a", True): False,
        ("b", False): True, ("b", True): True,
        ("c", False): False, ("c", True): False,
    }  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.1, 100.0),
    capacity=st.integers(1, 20),
    gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=60),
)
def test_token_bucket_admits_what_the_formula_allows(rate: float, capacity: int, gaps: list[float]) -> None:
    """Against a hand-written reference: tokens(t) = min(C, tokens + rate * dt); a request takes 1.
    And the bound: admitted in [0, t] <= C + rate * t."""
    bucket = TokenBucket(rate, capacity, now=0.0)
    tokens, t, admitted = float(capacity), 0.0, 0
    for gap in gaps:
        t += gap
        tokens = min(float(capacity), tokens + gap * rate)
        wait = bucket.take(t)
        if tokens >= 1.0:
            tokens -= 1.0
            admitted += 1
            assert wait == 0.0
        else:
            assert wait == pytest.approx((1.0 - tokens) / rate)
            assert wait > 0
    assert admitted <= capacity + rate * t + 1e-9


def test_rate_limiter_keeps_one_bucket_per_key() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    for _ in range(3):
        limiter.check("a", rate=1.0, burst=3)
    with pytest.raises(RateLimited) as info:
        limiter.check("a", rate=1.0, burst=3)
    assert info.value.retry_after == pytest.approx(1.0)
    limiter.check("b", rate=1.0, burst=3)  # another key: its own bucket
    now[0] = 1.0
    limiter.check("a", rate=1.0, burst=3)  # one token back after 1 s


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"max_body_bytes": 0}, "max_body_bytes must be a positive integer"),
        ({"rate_per_s": math.nan}, "rate_per_s must be a positive number"),
        ({"burst": True}, "burst must be a positive integer"),
        ({"generate_timeout_s": -1}, "generate_timeout_s must be a positive number"),
        ({"max_new_tokens": 5000}, "at most 4096"),
    ],
)
def test_limits_are_validated(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        Limits(**kwargs)  # type: ignore[arg-type]


def test_run_and_serve_configs_are_validated() -> None:
    ring = KeyRing.parse(json.dumps({"keys": [_entry("a", "k", {})]}))
    with pytest.raises(InvalidInput, match="port"):
        RunConfig(port=70000)
    with pytest.raises(InvalidInput, match="log_level"):
        RunConfig(log_level="loud")
    with pytest.raises(InvalidInput, match="keys must be a KeyRing"):
        ServeConfig("sqlite:///x.db", keys="keys.json")  # type: ignore[arg-type]
    assert RunConfig().loopback and RunConfig(host="::1").loopback and not RunConfig(host="0.0.0.0").loopback
    assert ServeConfig("sqlite:///x.db", ring).model == "none"


def test_run_bounded_returns_times_out_and_skips_what_never_started() -> None:
    release, ran = threading.Event(), []

    def blocker() -> None:
        release.wait(30)

    def late() -> None:
        ran.append(True)

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            assert await run_bounded(pool, lambda: 7, 5.0) == 7
            message = re.escape("the call did not finish within its 0.05 s deadline, sorry")
            with pytest.raises(RequestTimeout, match=message):
                await run_bounded(pool, blocker, 0.05, "the call", ", sorry")
            with pytest.raises(RequestTimeout):  # queued behind the blocker: its deadline passes in the queue
                await run_bounded(pool, late, 0.05)
            release.set()
            await asyncio.sleep(0)
        assert ran == []  # it never ran: its deadline had passed when the thread got to it

    asyncio.run(scenario())


def test_the_task_literal_is_the_routers_list() -> None:
    assert set(typing.get_args(Task)) == set(TASK_TYPES)


def test_hash_key_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "memfusion.cli_serve", "hash-key"], capture_output=True, text=True, check=True
    ).stdout
    lines = dict(line.split(":", 1) for line in out.strip().splitlines())
    key, digest = lines["key"].strip(), lines["key_sha256"].strip()
    assert digest == hashlib.sha256(key.encode()).hexdigest()
    again = subprocess.run(
        [sys.executable, "-m", "memfusion.cli_serve", "hash-key", "-"], input=key + "\n", capture_output=True, text=True
    )
    assert again.stdout.strip() == f"key_sha256: {digest}"


def test_serve_without_keys_or_store_exits_2(tmp_path: typing.Any) -> None:
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    base = [sys.executable, "-m", "memfusion.cli_serve"]
    no_keys = subprocess.run([*base, "--store", f"sqlite:///{tmp_path}/m.db"], capture_output=True, text=True, env=env)
    assert no_keys.returncode == 2 and "no API keys" in no_keys.stderr
    no_store = subprocess.run(base, capture_output=True, text=True, env=env)
    assert no_store.returncode == 2 and "--store" in no_store.stderr
    keys = tmp_path / "k.json"
    keys.write_text(json.dumps({"keys": [_entry("a", "k", {})]}))
    bad_url = subprocess.run(
        [*base, "--store", "mysql://x", "--keys", str(keys), "--port", "0"], capture_output=True, text=True, env=env
    )
    assert bad_url.returncode == 2 and "unknown store URL scheme" in bad_url.stderr

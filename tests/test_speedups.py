"""The fast stack is what the entry points run with, and each piece can be switched off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from arq.connections import ArqRedis

from core import speedups
from core.redis import connect
from core.settings import Settings

REPO = Path(__file__).resolve().parent.parent
PROBE = """
import asyncio, json, worker_settings
from core.redis import connect
from core.settings import get_settings
async def main():
    redis = connect(get_settings())
    await redis.ping()
    conn = await redis.connection_pool.get_connection()
    parser = type(conn._parser).__name__
    await redis.connection_pool.release(conn)
    await redis.aclose()
    return parser
loop = asyncio.new_event_loop()
parser = loop.run_until_complete(main())
print(json.dumps({"loop": type(loop).__module__.split(".")[0], "parser": parser}))
"""


def probe(redis_url: str, value: str | None) -> dict[str, str]:
    """What a process that imports the worker's entry point runs with."""
    env = {**os.environ, "REDIS_URL": redis_url}
    env.pop(speedups.ENV, None)
    if value is not None:
        env[speedups.ENV] = value
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    result: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(
    ("value", "loop", "parser"),
    [
        (None, "uvloop", "_AsyncHiredisParser"),  # the default: everything
        ("none", "asyncio", "_AsyncRESP2Parser"),
        ("hiredis", "asyncio", "_AsyncHiredisParser"),
        ("uvloop,orjson", "uvloop", "_AsyncRESP2Parser"),
    ],
)
def test_the_worker_entry_point_runs_the_stack_it_is_told(
    settings: Settings, value: str | None, loop: str, parser: str
) -> None:
    assert probe(settings.redis_url, value) == {"loop": loop, "parser": parser}


def test_an_unknown_speedup_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(speedups.ENV, "uvloop,turbo")
    speedups.enabled.cache_clear()
    try:
        with pytest.raises(ValueError, match="turbo"):
            speedups.enabled()
    finally:
        speedups.enabled.cache_clear()


@pytest.mark.parametrize("value", ["orjson", "none"])
def test_both_encoders_write_the_same_json(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(speedups.ENV, value)
    speedups.enabled.cache_clear()
    try:
        sample = {"text": 'café ✓ \u2028 "q"', "n": 1.5, "when": datetime(2026, 1, 2, tzinfo=UTC)}
        written = json.loads(speedups.dumps(sample))
        assert written == {**sample, "when": "2026-01-02T00:00:00+00:00"}
    finally:
        speedups.enabled.cache_clear()


async def test_the_api_client_talks_to_redis_through_hiredis(
    settings: Settings, redis: ArqRedis
) -> None:
    client = connect(settings)
    try:
        assert await client.ping()
        conn = await client.connection_pool.get_connection()
        assert type(conn._parser).__name__ == "_AsyncHiredisParser"
        await client.connection_pool.release(conn)
    finally:
        await client.aclose()

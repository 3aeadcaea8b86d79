"""The fast stack is what the entry points run with, and each piece can be switched off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime

import pytest
from arq.connections import ArqRedis
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from asyncjobs import speedups
from asyncjobs.redis import connect
from asyncjobs.settings import Settings

PROBE = """
import asyncio, json, arq.cli
from asyncjobs.redis import connect
from asyncjobs.settings import get_settings
async def main():
    redis = connect(get_settings())
    await redis.ping()
    conn = await redis.connection_pool.get_connection()
    parser, packer = type(conn._parser).__name__, type(conn).__name__
    await redis.connection_pool.release(conn)
    await redis.aclose()
    return parser, packer
def run_worker(settings_cls, **kwargs):  # what arq's CLI calls once it is set up
    loop = asyncio.new_event_loop()
    parser, packer = loop.run_until_complete(main())
    name = type(loop).__module__.split(".")[0]
    print(json.dumps({"loop": name, "parser": parser, "packer": packer}))
arq.cli.run_worker = run_worker
arq.cli.cli(["worker_settings.WorkerSettings"], standalone_mode=False)
"""


def probe(redis_url: str, value: str | None) -> dict[str, str]:
    """What the worker's entry point (`arq worker_settings.WorkerSettings`) runs with."""
    env = {**os.environ, "REDIS_URL": redis_url}
    env.pop(speedups.ENV, None)
    if value is not None:
        env[speedups.ENV] = value
    with tempfile.TemporaryDirectory() as folder:  # no developer's `.env` there
        out = subprocess.run(
            [sys.executable, "-c", PROBE], cwd=folder, env=env, capture_output=True, text=True,
            timeout=60, check=True,
        )  # fmt: skip
    result: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


HIREDIS = ("_AsyncHiredisParser", "HiredisPackingConnection")
PYTHON = ("_AsyncRESP2Parser", "Connection")


@pytest.mark.parametrize(
    ("value", "loop", "redis_client"),
    [
        (None, "uvloop", HIREDIS),  # the default: everything
        ("none", "asyncio", PYTHON),
        ("hiredis", "asyncio", HIREDIS),
        ("uvloop,orjson", "uvloop", PYTHON),
    ],
)
def test_the_worker_entry_point_runs_the_stack_it_is_told(
    settings: Settings, value: str | None, loop: str, redis_client: tuple[str, str]
) -> None:
    parser, packer = redis_client
    assert probe(settings.redis_url, value) == {"loop": loop, "parser": parser, "packer": packer}


PACKED_ARGS: list[tuple[object, ...]] = [
    ("SET", "key", "value"),
    ("SCRIPT LOAD", "return 1"),  # two words of a command name
    (b"SCRIPT EXISTS", b"abc"),
    ("HSET", "h", "café ✓", b"\x00\xff raw", 7, -3, 0.1, 1e20, 2**70, -0.0),
    ("SET", "big", "x" * 100_000),  # beyond redis-py's buffer cutoff: same bytes either way
    ("EVALSHA", "a" * 40, 2, "k1", "k2", *[f"arg{i}" for i in range(60)]),
]


@pytest.mark.parametrize("args", PACKED_ARGS)
def test_hiredis_packs_the_bytes_redis_py_packs(args: tuple[object, ...]) -> None:
    """Checked against redis-py's own packer, not against a copy of the protocol."""
    ours = b"".join(speedups.HiredisPackingConnection().pack_command(*args))
    theirs = b"".join(Connection().pack_command(*args))  # type: ignore[arg-type]
    assert ours == theirs


def test_what_hiredis_does_not_take_goes_the_python_way() -> None:
    packer = speedups.HiredisPackingConnection()
    assert b"".join(packer.pack_command("SET", "k", memoryview(b"mv"))).endswith(b"$2\r\nmv\r\n")
    with pytest.raises(DataError):  # redis-py's own refusal, with its message
        packer.pack_command("SET", "k", True)


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

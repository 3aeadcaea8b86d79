"""The fast stack every process uses: uvloop as the event loop, hiredis under redis-py, orjson
for the JSON the project writes itself. Each is an ordinary dependency; each falls back to the
standard one when it cannot be imported (a platform without a wheel) or when switched off.

ASYNCJOBS_SPEEDUPS lists the ones to use (default `uvloop,hiredis,orjson`; `none` for none):
the benchmark's ablation (`python -m bench.stack`) runs the engine with each on its own and all
together, in one run.
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import date, datetime, time
from functools import cache
from typing import Any, Literal
from urllib.parse import urlsplit

from redis.asyncio.connection import Connection

Speedup = Literal["uvloop", "hiredis", "orjson"]
ALL: tuple[Speedup, ...] = ("uvloop", "hiredis", "orjson")
ENV = "ASYNCJOBS_SPEEDUPS"


@cache
def enabled() -> frozenset[str]:
    """The speedups asked for (all by default) that can also be imported here."""
    raw = os.environ.get(ENV, ",".join(ALL)).strip().lower()
    wanted = set() if raw in ("", "none") else {part.strip() for part in raw.split(",")}
    unknown = wanted - set(ALL)
    if unknown:
        raise ValueError(f"{ENV}: unknown {sorted(unknown)}; choose from {', '.join(ALL)}")
    return frozenset(name for name in wanted if _importable(name))


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def install_event_loop() -> str:
    """Make uvloop the event loop of this process (before any loop exists); its name."""
    if "uvloop" in enabled():
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    return "asyncio"


def redis_pool_options(url: str | None = None) -> dict[str, Any]:
    """Connection-pool keywords: redis-py takes hiredis for parsing by itself when it is
    installed, so switching it off means naming the pure-Python parser; for packing, a plain
    `redis://` pool gets HiredisPackingConnection (TLS and Unix sockets keep their classes)."""
    if "hiredis" in enabled():
        plain = url is not None and urlsplit(url).scheme == "redis"
        return {"connection_class": HiredisPackingConnection} if plain else {}
    from redis._parsers import _AsyncRESP2Parser

    return {"parser_class": _AsyncRESP2Parser}


class HiredisPackingConnection(Connection):
    """redis-py's asyncio connection packs each command in Python, argument by argument (its
    sync connection hands that to hiredis); a scrape's document-save script has some fifty
    arguments, and packing them was a tenth of a scrape job's CPU. This one packs with hiredis,
    as the sync one does, into the same bytes; anything hiredis does not take (a memoryview,
    a bool that redis-py refuses with a clear error) goes the Python way."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if "hiredis" not in enabled():
            return super().pack_command(*args)
        import hiredis

        first = args[0].encode() if isinstance(args[0], str) else args[0]
        if isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])  # "SCRIPT LOAD": two words on the wire
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return super().pack_command(*args)


def _orjson_dumps(value: Any) -> str:
    import orjson

    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def _json_dumps(value: Any) -> str:
    return json.dumps(value, default=_default, ensure_ascii=False, separators=(",", ":"))


def _default(value: Any) -> str:
    """What orjson does by itself: times in ISO 8601; anything else as its str()."""
    return value.isoformat() if isinstance(value, datetime | date | time) else str(value)


def dumps(value: Any) -> str:
    """Compact JSON for what the project writes per job (documents, log lines): times in ISO
    8601, anything else that is not JSON as its str()."""
    return _orjson_dumps(value) if "orjson" in enabled() else _json_dumps(value)


def describe() -> str:
    """For the start-up log: which speedups this process runs with."""
    return ", ".join(sorted(enabled())) or "none"

"""Lua scripts kept as `.lua` files (package data) beside the module that wraps them.

Each script file lives in a `lua/` folder of its package and starts by naming every KEYS and
ARGV entry it reads (`local queue = KEYS[1]`), so the file reads on its own. Python code never
builds a script call's lists by hand: each script has one typed wrapper (a function or a small
dataclass) that takes named arguments and calls `LuaScript.run`.

A script's text is read and its SHA computed once per process; it is registered once per client
(redis-py's `AsyncScript`, which loads it again after a Redis restart or failover).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript

_REGISTERED_ATTR = "_asyncjobs_lua_scripts"  # a dict on each client: script name -> AsyncScript

Arg = str | bytes | int | float


class LuaScript:
    """One `.lua` file of a package, e.g. `LuaScript("jobs.engine", "claim")` reads
    jobs/engine/lua/claim.lua."""

    def __init__(self, package: str, name: str) -> None:
        self.name = f"{package}:{name}"
        self.text = files(package).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")

    def on(self, redis: Redis) -> AsyncScript:
        """The script registered on `redis`, once per client."""
        registered: dict[str, AsyncScript] | None = getattr(redis, _REGISTERED_ATTR, None)
        if registered is None:
            registered = {}
            setattr(redis, _REGISTERED_ATTR, registered)
        script = registered.get(self.name)
        if script is None:
            script = registered[self.name] = redis.register_script(self.text)
        return script

    async def run(
        self,
        redis: Redis,
        keys: Sequence[str | bytes],
        args: Sequence[Arg],
        pipe: Pipeline | None = None,
    ) -> Any:
        """Call the script on `redis` (or queue the call on `pipe`, a pipeline of `redis`: redis-py
        then checks with SCRIPT EXISTS before the pipeline goes, one round trip more)."""
        return await self.on(redis)(keys=list(keys), args=list(args), client=pipe)

    def queue_eval(self, pipe: Pipeline, keys: Sequence[str | bytes], args: Sequence[Arg]) -> None:
        """Queue the script on `pipe` as EVAL of its text: no SCRIPT EXISTS round trip before
        the pipeline goes, at the cost of sending the text (for a short script in a pipeline
        sent often)."""
        pipe.execute_command("EVAL", self.text, len(keys), *keys, *args)

"""`python -m bench.redisbatch`: CPU per Redis command, sent alone (redis-py's client) or through
the worker jobs' auto-pipelined client (asyncjobs.redis.AutoPipelinedRedis), when 1, 10, 100 or 500
callers send one command each at the same moment, as jobs claimed together do.

Its own redis-server on a free port; uvloop and hiredis, as the worker runs; one table of
microseconds of this process's CPU per command (the client's cost, not Redis's).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from arq.connections import ArqRedis

from asyncjobs import speedups
from asyncjobs.redis import AutoPipelinedRedis
from bench.services import RedisServer

COMMANDS = 20_000  # per cell of the table


async def cpu_per_command(redis: ArqRedis, callers: int) -> float:
    """µs of CPU per GET with `callers` GETs in flight at once, COMMANDS in all."""
    rounds = COMMANDS // callers
    started = time.process_time()
    for _ in range(rounds):
        await asyncio.gather(*(redis.get(f"key:{i}") for i in range(callers)))
    return (time.process_time() - started) / (rounds * callers) * 1e6


async def run(groups: list[int]) -> str:
    folder = Path(tempfile.mkdtemp(prefix="redisbatch-"))
    server = RedisServer(folder)
    try:
        await server.started()
        plain = ArqRedis.from_url(server.url)
        batched = AutoPipelinedRedis.sharing_pool_of(plain)
        lines = [
            "| callers at once | alone µs/command | auto-pipelined µs/command | ratio |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for callers in groups:
            await cpu_per_command(plain, callers)  # warm the pool's connections
            alone = await cpu_per_command(plain, callers)
            together = await cpu_per_command(batched, callers)
            lines.append(f"| {callers} | {alone:.1f} | {together:.1f} | {together / alone:.2f}x |")
        await plain.aclose(close_connection_pool=True)
        return "\n".join(lines)
    finally:
        await server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redisbatch", description=__doc__)
    parser.add_argument("--callers", default="1,10,100,500", help="comma-separated")
    args = parser.parse_args(argv)
    groups = [int(n) for n in args.callers.split(",") if n]
    speedups.install_event_loop()
    print(asyncio.run(run(groups)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The worker's jobs' client (asyncjobs.redis.AutoPipelinedRedis) against a real Redis: commands
sent in the same loop turn share one write, and each caller gets exactly what it would have got
sending its command alone: its reply, its own error, a script loaded on demand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, cast

import pytest
from arq.connections import ArqRedis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from asyncjobs.redis import MAX_BATCH, AutoPipelinedRedis
from tests.conftest import TEST_REDIS_URL


@pytest.fixture
async def clients() -> AsyncIterator[tuple[ArqRedis, AutoPipelinedRedis, list[int]]]:
    """(a plain client, an auto-pipelined one on the same pool, its batch sizes)."""
    plain = ArqRedis.from_url(TEST_REDIS_URL)
    await plain.flushdb()
    batched = AutoPipelinedRedis.sharing_pool_of(plain)
    sizes: list[int] = []
    send = batched._exchange

    async def counting(conn: Any, batch: list[Any], answered: list[int]) -> None:
        sizes.append(len(batch) - answered[0])
        await send(conn, batch, answered)

    batched._exchange = counting  # type: ignore[method-assign]
    try:
        yield plain, batched, sizes
    finally:
        await plain.flushdb()
        await plain.aclose(close_connection_pool=True)


async def test_concurrent_commands_share_writes_and_get_their_own_replies(
    clients: tuple[ArqRedis, AutoPipelinedRedis, list[int]],
) -> None:
    plain, batched, sizes = clients
    n = 300
    await plain.mset({f"k{i}": f"v{i}" for i in range(n)})
    await plain.hset("h", mapping={"a": "1", "b": "2"})  # type: ignore[misc]

    gets = [batched.get(f"k{i}") for i in range(n)]
    others = [
        batched.exists("k0", "k1", "missing"),
        batched.hmget("h", ["a", "b", "c"]),
        batched.incr("counter"),
        batched.set("new", "x", ex=60),
        batched.ttl("new"),
    ]
    replies: list[Any] = list(await asyncio.gather(*gets, *others))

    assert replies[:n] == [f"v{i}".encode() for i in range(n)]
    assert replies[n:] == [2, [b"1", b"2", None], 1, True, 60]
    assert sum(sizes) == n + len(others)
    assert len(sizes) <= -(-(n + len(others)) // MAX_BATCH), sizes  # one write per MAX_BATCH
    # a command alone is still answered, in a batch of one
    assert await batched.get("new") == b"x" and sizes[-1] == 1


async def test_an_error_is_its_callers_alone(
    clients: tuple[ArqRedis, AutoPipelinedRedis, list[int]],
) -> None:
    plain, batched, sizes = clients
    await plain.set("text", "not a number")
    before, wrong, after = await asyncio.gather(
        batched.incr("n"), batched.incr("text"), batched.incr("n"), return_exceptions=True
    )
    assert isinstance(wrong, ResponseError) and "not an integer" in str(wrong)
    assert {before, after} == {1, 2}
    assert sizes == [3]


async def test_scripts_load_on_demand_through_the_batch(
    clients: tuple[ArqRedis, AutoPipelinedRedis, list[int]],
) -> None:
    plain, batched, _ = clients
    await plain.script_flush()
    script = batched.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    results = await asyncio.gather(*(script(keys=["s"], args=[i]) for i in range(1, 11)))
    assert len(set(results)) == 10 and max(results) == sum(range(1, 11))  # each ran once
    assert int(await plain.get("s") or 0) == sum(range(1, 11))


async def test_blocking_commands_do_not_hold_up_the_others(
    clients: tuple[ArqRedis, AutoPipelinedRedis, list[int]],
) -> None:
    plain, batched, sizes = clients
    blocked = asyncio.ensure_future(cast(Awaitable[Any], batched.blpop(["never"], timeout=5)))
    await asyncio.sleep(0)
    assert await asyncio.wait_for(batched.set("quick", "1"), 2) is True
    assert not blocked.done()  # the GET did not wait behind BLPOP on one connection
    assert sizes == [1]  # BLPOP went alone, not in a batch
    await plain.rpush("never", "x")  # type: ignore[misc]
    assert tuple(await asyncio.wait_for(blocked, 5)) == (b"never", b"x")


async def test_a_cancelled_caller_leaves_the_others_their_replies(
    clients: tuple[ArqRedis, AutoPipelinedRedis, list[int]],
) -> None:
    plain, batched, _ = clients
    await plain.set("a", "1")
    first = asyncio.ensure_future(batched.get("a"))
    second = asyncio.ensure_future(batched.incr("b"))
    third = asyncio.ensure_future(batched.get("a"))
    await asyncio.sleep(0)
    second.cancel()
    assert await first == b"1" and await third == b"1"
    assert second.cancelled()
    # cancelled before the batch was written: never sent, as a command sent alone
    assert await plain.get("b") is None


class ReplyCuttingProxy:
    """A TCP proxy in front of the test Redis whose first connection is cut right after the
    reply `cut_after` has passed: the batch's later commands reached Redis, their replies are
    lost, as when a connection drops mid-batch."""

    def __init__(self, redis_host: str, redis_port: int, cut_after: bytes) -> None:
        self.target, self.cut_after = (redis_host, redis_port), cut_after
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        cut = self.cut_after if self.connections == 1 else None
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pump(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, cut: bytes | None
        ) -> None:
            seen = b""
            while data := await src.read(65536):
                seen += data
                if cut is not None and cut in seen:
                    dst.write(data[: len(data) - (len(seen) - seen.index(cut) - len(cut))])
                    break
                dst.write(data)
            for end in (dst, writer, up_writer):
                end.close()

        await asyncio.gather(pump(reader, up_writer, None), pump(up_reader, writer, cut),
                             return_exceptions=True)  # fmt: skip


async def test_after_a_lost_connection_only_unanswered_commands_are_sent_again(
    clients: tuple[ArqRedis, AutoPipelinedRedis, list[int]],
) -> None:
    plain, _, _ = clients
    await plain.set("a", 41)
    kwargs = plain.connection_pool.connection_kwargs
    proxy = ReplyCuttingProxy(kwargs["host"], kwargs["port"], cut_after=b":42\r\n")
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxied = ArqRedis.from_url(
        f"redis://127.0.0.1:{port}/{kwargs.get('db', 0)}",
        retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError],
    )  # fmt: skip
    batched = AutoPipelinedRedis.sharing_pool_of(proxied)
    try:
        a, b, c = await asyncio.wait_for(
            asyncio.gather(batched.incr("a"), batched.incr("b"), batched.incr("c")), 10
        )
    finally:
        await proxied.aclose(close_connection_pool=True)
        server.close()
        await server.wait_closed()
    assert proxy.connections == 2  # the cut one, and the retry's
    assert a == 42 and await plain.get("a") == b"42"  # answered before the cut: not sent again
    # unanswered: sent again, as redis-py sends again a single command whose reply was lost
    # (Redis had run them once already)
    assert (b, c) == (2, 2)

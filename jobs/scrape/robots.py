"""robots.txt, fetched once per origin and cached in Redis for every worker (RFC 9309 rules)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from urllib.robotparser import RobotFileParser

from redis.asyncio import Redis
from yarl import URL

from asyncjobs.keys import ROBOTS_KEY_PREFIX

LOCAL_TTL_S = 60  # a worker re-reads the shared copy in Redis at least this often
DISALLOW_ALL = "\x00disallow-all"  # cached verdict when robots.txt could not be read (5xx)

# Fetches a URL and returns (status, text); raises JobError subclasses on network failure.
FetchText = Callable[[URL], Awaitable[tuple[int, str]]]


@functools.lru_cache(maxsize=256)
def parsed(rules: str) -> RobotFileParser:
    """The rules parsed once for every page of their site, not once per page (a big
    robots.txt has hundreds of lines). Keyed by the text itself, so new rules parse anew."""
    parser = RobotFileParser()
    parser.parse(rules.splitlines())
    return parser


class RobotsPolicy:
    def __init__(self, redis: Redis, user_agent: str, ttl: float, fetch_text: FetchText) -> None:
        self._redis = redis
        self._user_agent = user_agent
        self._ttl = int(ttl)
        self._fetch_text = fetch_text
        self._inflight: dict[str, asyncio.Future[str]] = {}
        self._local: dict[str, tuple[float, str]] = {}  # key -> (expires, rules)

    async def allowed(self, url: URL) -> bool:
        rules = await self._rules_for(url.origin())
        if rules == DISALLOW_ALL:
            return False
        return parsed(rules).can_fetch(self._user_agent, str(url))

    async def _rules_for(self, origin: URL) -> str:
        key = ROBOTS_KEY_PREFIX + str(origin)
        local = self._local.get(key)
        if local is not None and local[0] > time.monotonic():  # no Redis trip per page
            return local[1]
        cached = await self._redis.get(key)
        if cached is not None:
            rules = cached.decode() if isinstance(cached, bytes) else str(cached)
            self._local[key] = (time.monotonic() + min(LOCAL_TTL_S, self._ttl), rules)
            return rules
        # Many jobs of one worker hitting a new host at once fetch its robots.txt once.
        if key not in self._inflight:
            self._inflight[key] = asyncio.ensure_future(self._fetch_rules(key, origin))
            self._inflight[key].add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(self._inflight[key])

    async def _fetch_rules(self, key: str, origin: URL) -> str:
        status, text = await self._fetch_text(origin.with_path("/robots.txt"))
        if 200 <= status < 300:
            rules = text
        elif status >= 500:  # unreachable: RFC 9309 says assume complete disallow
            rules = DISALLOW_ALL
        else:  # 4xx: no robots.txt, everything is allowed
            rules = ""
        await self._redis.set(key, rules, ex=self._ttl)
        return rules

"""The HTTP jobs' own client session: the scraper's SSRF guard with an allowlist of its own.

Internal services are what HTTP jobs usually call, so they get HTTP_JOBS_ALLOWED_CIDRS (networks
reachable although non-public) and HTTP_JOBS_ALLOWED_HOSTS (names whose addresses are not
checked at all), apart from the scraper's SCRAPE_ALLOWED_CIDRS: opening an internal network to
HTTP jobs does not open it to every page a scrape may be pointed at.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from asyncjobs.settings import Network, Settings
from asyncjobs.version import __version__
from jobs.scrape.guard import GuardedResolver

USER_AGENT = f"asyncjobs/{__version__} (http job)"


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """Whether `host` is named in the allowlist: exactly, or under a "*.suffix" entry."""
    name = host.lower().rstrip(".")
    return any(
        name == entry or (entry.startswith("*.") and name.endswith(entry[1:])) for entry in allowed
    )


class AllowlistResolver(AbstractResolver):
    """Resolves as the guard does (only addresses that are public or in `cidrs`), except that
    the names in `hosts` may resolve to any address: the operator named them."""

    def __init__(
        self,
        cidrs: Sequence[Network] = (),
        hosts: Sequence[str] = (),
        inner: AbstractResolver | None = None,
    ) -> None:
        self._inner = inner or ThreadedResolver()
        self._guarded = GuardedResolver(cidrs, inner=self._inner)
        self._hosts = tuple(hosts)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host_allowed(host, self._hosts):
            return await self._inner.resolve(host, port, family)
        return await self._guarded.resolve(host, port, family)

    async def close(self) -> None:
        await self._inner.close()


def make_http_jobs_session(
    settings: Settings, dns: AbstractResolver | None = None
) -> aiohttp.ClientSession:
    """One session per worker for every HTTP job (one pool of HTTP_JOBS_MAX_CONNECTIONS);
    `dns` replaces the system resolver underneath the guard (tests)."""
    resolver = AllowlistResolver(
        settings.http_jobs_allowed_cidrs, settings.http_jobs_allowed_hosts, inner=dns
    )
    connector = aiohttp.TCPConnector(
        resolver=resolver, limit=settings.http_jobs_max_connections, ttl_dns_cache=60
    )
    return aiohttp.ClientSession(
        connector=connector,
        # each request's limit is the job's own deadline (jobs/http/job.py), not aiohttp's
        timeout=aiohttp.ClientTimeout(total=None),
        headers={"User-Agent": USER_AGENT},
        cookie_jar=aiohttp.DummyCookieJar(),  # jobs must not leak cookies into each other
        trust_env=False,
    )

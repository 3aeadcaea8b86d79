"""The scraper refuses non-public addresses unless settings allow them; nothing gets connected."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import ip_address

import pytest
from arq.connections import ArqRedis

from app.settings import Settings
from jobs.errors import PermanentJobError
from jobs.netguard import is_forbidden
from jobs.scrape import Fetcher, make_http_session, scrape_page
from tests.servers import SiteStats


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0",
        "100.64.0.1", "224.0.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::",
    ],
)  # fmt: skip
def test_non_public_addresses_are_forbidden(address: str) -> None:
    assert is_forbidden(ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1::1", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert not is_forbidden(ip_address(address))


def test_allowlist_opens_only_its_networks() -> None:
    from ipaddress import ip_network

    allowed = [ip_network("127.0.0.0/8")]
    assert not is_forbidden(ip_address("127.0.0.1"), allowed)
    assert not is_forbidden(ip_address("::ffff:127.0.0.1"), allowed)
    assert is_forbidden(ip_address("10.0.0.1"), allowed)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "[::ffff:127.0.0.1]"])
async def test_loopback_refused_without_allowlist(
    make_settings: Callable[..., Settings], redis: ArqRedis, site: tuple[str, SiteStats], host: str
) -> None:
    base, stats = site
    port = base.rsplit(":", 1)[1]
    settings = make_settings(scrape_allowed_cidrs=[])
    session = make_http_session(settings)
    try:
        ctx = {"settings": settings, "redis": redis, "fetcher": Fetcher(session, settings, redis)}
        with pytest.raises(PermanentJobError, match="refused to fetch"):
            await scrape_page(ctx, {"url": f"http://{host}:{port}/page/1"})
    finally:
        await session.close()
    assert stats.hits == {}  # the server never saw a request


async def test_redirect_to_forbidden_address_is_refused(
    make_settings: Callable[..., Settings], redis: ArqRedis, site: tuple[str, SiteStats]
) -> None:
    """An allowed server may not bounce the scraper to a forbidden one (here: 127.0.0.2)."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    base, stats = site

    async def bounce(request: web.Request) -> web.Response:
        raise web.HTTPFound(base.replace("127.0.0.1", "127.0.0.2") + "/page/1")

    app = web.Application()
    app.router.add_get("/", bounce)
    bouncer = TestServer(app, host="127.0.0.1")
    await bouncer.start_server()
    settings = make_settings(scrape_allowed_cidrs=["127.0.0.1/32"])
    session = make_http_session(settings)
    try:
        ctx = {"settings": settings, "redis": redis, "fetcher": Fetcher(session, settings, redis)}
        with pytest.raises(PermanentJobError, match=r"127\.0\.0\.2 is not a public address"):
            await scrape_page(ctx, {"url": f"http://127.0.0.1:{bouncer.port}/"})
    finally:
        await session.close()
        await bouncer.close()
    assert stats.hits == {}

"""The scraper refuses non-public addresses unless settings allow them; nothing gets connected."""

from __future__ import annotations

import socket
from collections.abc import Callable
from ipaddress import ip_address

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from asyncjobs.errors import PermanentJobError
from jobs.scrape.guard import is_forbidden
from jobs.scrape.page import scrape_page
from tests.conftest import Ctx
from tests.servers import SiteStats, make_site


async def fetch_refused(ctx: Ctx, url: str) -> str:
    """Scrape `url`, which must fail permanently; the error message."""
    with pytest.raises(PermanentJobError) as refused:
        await scrape_page(ctx, {"url": url})
    return str(refused.value)


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


TEREDO_TO_LOOPBACK = "2001:0:4136:e378:8000:63bf:80ff:fffe"  # client 127.0.0.1 (obfuscated)
TEREDO_TO_PUBLIC = "2001:0:4136:e378:8000:63bf:f7f7:f7f7"  # client 8.8.8.8


@pytest.mark.parametrize(
    ("address", "forbidden"),
    [
        ("64:ff9b::7f00:1", True), ("64:ff9b::a00:1", True), ("64:ff9b::808:808", False),
        ("64:ff9b:1::a9fe:a9fe", True), ("64:ff9b:1::808:808", False),  # RFC 8215 local-use
        ("2002:7f00:1::", True), ("2002:a9fe:a9fe::1", True), ("2002:808:808::1", False),
        ("::7f00:1", True), ("::a00:1", True), ("::808:808", False),  # IPv4-compatible
        ("::ffff:0:127.0.0.1", True), ("::ffff:0:808:808", False),  # IPv4-translated (RFC 2765)
        (TEREDO_TO_LOOPBACK, True), (TEREDO_TO_PUBLIC, False),
    ],
)  # fmt: skip
def test_ipv6_addresses_that_embed_ipv4_are_judged_by_it(address: str, forbidden: bool) -> None:
    """NAT64, 6to4, Teredo and IPv4-compatible addresses reach the IPv4 address they carry
    through a gateway: [64:ff9b::7f00:1] is 127.0.0.1 (they used to pass as global IPv6)."""
    assert is_forbidden(ip_address(address)) is forbidden


def test_allowlist_opens_only_its_networks() -> None:
    from ipaddress import ip_network

    allowed = [ip_network("127.0.0.0/8")]
    assert not is_forbidden(ip_address("127.0.0.1"), allowed)
    assert not is_forbidden(ip_address("::ffff:127.0.0.1"), allowed)
    assert not is_forbidden(ip_address("64:ff9b::7f00:1"), allowed)  # judged by 127.0.0.1
    assert is_forbidden(ip_address("10.0.0.1"), allowed)


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1", "localhost", "2130706433", "[::ffff:127.0.0.1]",  # and other spellings:
        "0177.0.0.1", "0x7f.0.0.1", "0x7f000001", "127.1", "[::ffff:7f00:1]", "[::1]",
        "[64:ff9b::7f00:1]", "[2002:7f00:1::]", "[::7f00:1]",  # NAT64, 6to4, IPv4-compatible
    ],
)  # fmt: skip
async def test_loopback_refused_without_allowlist(
    make_ctx: Callable[..., Ctx], site: tuple[str, SiteStats], host: str
) -> None:
    base, stats = site
    port = base.rsplit(":", 1)[1]
    message = await fetch_refused(make_ctx(scrape_allowed_cidrs=[]), f"http://{host}:{port}/page/1")
    assert "refused to fetch" in message
    assert stats.hits == {}  # the server never saw a request


async def test_redirect_to_forbidden_address_is_refused(make_ctx: Callable[..., Ctx]) -> None:
    """An allowed server may not bounce the scraper to a forbidden one (here: 127.0.0.2, where
    a site listens: with 127.0.0.2 allowed the same redirect reaches it, so its silence is the
    guard's doing, not an empty address's)."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    target_stats = SiteStats()
    target = TestServer(make_site(target_stats), host="127.0.0.2")
    await target.start_server()

    async def bounce(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.2:{target.port}/page/1")

    app = web.Application()
    app.router.add_get("/", bounce)
    bouncer = TestServer(app, host="127.0.0.1")
    await bouncer.start_server()
    start = f"http://127.0.0.1:{bouncer.port}/"
    try:
        message = await fetch_refused(make_ctx(scrape_allowed_cidrs=["127.0.0.1/32"]), start)
        assert "127.0.0.2 is not a public address" in message
        assert target_stats.hits == {}  # the forbidden server never saw a request
        allowed = make_ctx(scrape_allowed_cidrs=["127.0.0.1/32", "127.0.0.2/32"])
        result = await scrape_page(allowed, {"url": start})
        assert result["title"] == "Test page 1"
        assert target_stats.hits == {"/page/1": 1}  # reachable: the refusal above was the guard
    finally:
        await bouncer.close()
        await target.close()


class NamesResolver(AbstractResolver):
    """DNS for names that do not exist on the internet: the one fake the suite needs."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        address = self.names[host]
        return [{"hostname": host, "host": address, "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]  # fmt: skip

    async def close(self) -> None:
        pass


async def test_hostname_resolving_to_loopback_is_refused(
    make_ctx: Callable[..., Ctx], site: tuple[str, SiteStats]
) -> None:
    """DNS says a harmless-looking name is 127.0.0.1: the connector's guard refuses it."""
    base, stats = site
    port = base.rsplit(":", 1)[1]
    dns = NamesResolver({"intranet.example": "127.0.0.1"})
    ctx = make_ctx(dns=dns, scrape_allowed_cidrs=[])
    message = await fetch_refused(ctx, f"http://intranet.example:{port}/page/1")
    assert "intranet.example resolves only to non-public addresses" in message
    assert "127.0.0.1" not in message  # what internal names resolve to stays in the log
    assert stats.hits == {}


async def test_cloud_metadata_address_is_refused_before_connecting(
    make_ctx: Callable[..., Ctx],
) -> None:
    ctx = make_ctx(scrape_allowed_cidrs=[], scrape_allowed_ports=[80, 443])
    message = await fetch_refused(ctx, "http://169.254.169.254/latest/meta-data/")
    assert "169.254.169.254 is not a public address" in message


async def test_ports_outside_the_allowlist_are_refused(
    make_ctx: Callable[..., Ctx], site: tuple[str, SiteStats]
) -> None:
    base, stats = site
    ctx = make_ctx(scrape_allowed_ports=[80, 443])  # loopback allowed, port not
    message = await fetch_refused(ctx, f"{base}/page/1")
    assert "is not allowed (allowed: 80, 443)" in message
    assert stats.hits == {}

"""SSRF guard: the scraper reaches public addresses only, unless settings allow a network.

Two checks, both needed: URLs with an IP literal are checked before the request (aiohttp does not
resolve those), and every hostname is resolved through `GuardedResolver`, which drops forbidden
addresses at connect time, so a DNS answer that changes between checks (rebinding) cannot slip by.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Collection, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

Network = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address

log = logging.getLogger(__name__)

ALLOWED_SCHEMES = frozenset({"http", "https"})


class ForbiddenTargetError(OSError):
    """Raised (as an OSError, so aiohttp treats it like a failed connect) for forbidden targets."""


# IPv6 ranges that carry an IPv4 address in their last 32 bits: NAT64 (RFC 6052 well-known and
# RFC 8215 local-use prefixes) and the deprecated IPv4-compatible ::a.b.c.d.
_LAST_32_BITS_IS_IPV4 = (
    IPv6Network("64:ff9b::/96"),
    IPv6Network("64:ff9b:1::/48"),
    IPv6Network("::/96"),
    IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated (RFC 2765, SIIT)
)


def embedded_ipv4(address: IPv6Address) -> list[IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to: mapped (::ffff:a.b.c.d), 6to4 (2002::/16),
    Teredo (2001::/32: its server and client), NAT64 and IPv4-compatible. A gateway on the path
    turns them into IPv4 traffic, so they are judged by those, not by the IPv6 ranges."""
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)
    if any(address in net for net in _LAST_32_BITS_IS_IPV4) and int(address) > 1:  # not :: ::1
        return [IPv4Address(int(address) & 0xFFFFFFFF)]
    return []


def is_forbidden(address: IPAddress, allowed: Sequence[Network] = ()) -> bool:
    """Everything but global unicast is forbidden: loopback, private, link-local, multicast...
    An IPv6 address that embeds IPv4 addresses is judged by them."""
    if isinstance(address, IPv6Address) and (embedded := embedded_ipv4(address)):
        return any(is_forbidden(v4, allowed) for v4 in embedded)
    if any(address.version == net.version and address in net for net in allowed):
        return False
    return not address.is_global or address.is_multicast


def check_url(
    url: URL, allowed: Sequence[Network] = (), ports: Collection[int] | None = None
) -> None:
    """Scheme, port and literal-IP checks that need no DNS; `ports` None allows any port."""
    if url.scheme not in ALLOWED_SCHEMES:
        raise ForbiddenTargetError(f"scheme {url.scheme!r} is not allowed (use http or https)")
    if ports is not None and url.port not in ports:
        allowed_ports = ", ".join(map(str, sorted(ports)))
        raise ForbiddenTargetError(f"port {url.port} is not allowed (allowed: {allowed_ports})")
    host = url.raw_host or ""
    if not host:
        raise ForbiddenTargetError("URL has no host")
    if (refused := _forbidden_literal(host, tuple(allowed))) is not None:
        raise ForbiddenTargetError(f"address {refused} is not a public address")


@functools.lru_cache(maxsize=4096)
def _forbidden_literal(host: str, allowed: tuple[Network, ...]) -> str | None:
    """The host, when it is an IP literal the scraper may not reach; None for a name (DNS
    answers are checked by GuardedResolver) or an allowed address. Cached: a batch asks about
    the same few hosts thousands of times, and parsing (or failing to parse) costs."""
    try:
        literal = ip_address(host.strip("[]"))
    except ValueError:
        return None
    return str(literal) if is_forbidden(literal, allowed) else None


class GuardedResolver(AbstractResolver):
    """Resolves like the default resolver, then keeps only addresses the scraper may connect to."""

    def __init__(self, allowed: Sequence[Network] = (), inner: AbstractResolver | None = None):
        self._allowed = tuple(allowed)
        self._inner = inner or ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        safe = [r for r in results if not is_forbidden(ip_address(r["host"]), self._allowed)]
        if not safe:  # which internal addresses is the operator's business, not the caller's
            addresses = ", ".join(sorted({r["host"] for r in results}))
            log.warning("refused %s: it resolves to non-public address(es) %s", host, addresses)
            raise ForbiddenTargetError(f"{host} resolves only to non-public addresses")
        return safe

    async def close(self) -> None:
        await self._inner.close()

"""Who may POST: Bridge's source addresses, seen through our own proxies only.

The client address is the socket peer. Only when the peer is one of ``TRUSTED_PROXIES``
do we believe ``X-Forwarded-For``, and then we take the right-most address that is not
itself a trusted proxy: the one our own proxy saw. Anything left of it was written by
the client and may be forged. uvicorn's ``ProxyHeadersMiddleware`` already walks the
header exactly that way (CIDRs and IPv6 included), so we reuse it rather than rewrite it;
``bridgehook serve`` turns off uvicorn's own default trust of ``127.0.0.1``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.types import ASGIApp
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from service.settings import IPNetwork


class SourcePolicy:
    def __init__(self, allowed: Iterable[IPNetwork]) -> None:
        self._allowed = tuple(allowed)
        self._cache: dict[str, bool] = {}

    def allows(self, host: str | None) -> bool:
        if host is None:
            return False
        known = self._cache.get(host)
        if known is not None:
            return known
        allowed = self._check(host)
        if len(self._cache) < 1024:  # a handful of real sources; never grow without bound
            self._cache[host] = allowed
        return allowed

    def _check(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d
        return any(address in network for network in self._allowed)


def behind_proxies(app: ASGIApp, trusted: Iterable[IPNetwork]) -> ASGIApp:
    """Wrap ``app`` so that ``scope["client"]`` is the address our proxies saw."""
    hosts = [str(network) for network in trusted]
    if not hosts:
        return app
    return ProxyHeadersMiddleware(app, trusted_hosts=hosts)  # type: ignore[arg-type,return-value]

"""Who may call the /cmd endpoints: allowed networks and a bearer token.

Both come from the `adminApi` block. Without it the endpoints are open to
every client, as in the original; the start-up banner says which is in force.
The client address is the socket's peer, never a forwarding header, which
any client can write.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from typing import Any

from ociregistry.config import AdminApiSettings
from ociregistry.errors import Denied, Unauthorized

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AdminAccess:
    """Decide whether a request may use the administration endpoints."""

    def __init__(self, settings: AdminApiSettings) -> None:
        self.networks: list[IpNetwork] = [
            ipaddress.ip_network(network, strict=False)
            for network in settings.allowed_networks
        ]
        self._token = settings.token.encode()

    @property
    def is_open(self) -> bool:
        """Tell whether every client may use the endpoints."""
        return not self.networks and not self._token

    def describe(self) -> str:
        """Summarize the restriction for the start-up banner."""
        if self.is_open:
            return "open to every client (see adminApi)"
        parts = []
        if self.networks:
            parts.append("from " + ", ".join(str(n) for n in self.networks))
        if self._token:
            parts.append("with the bearer token")
        return "allowed " + " ".join(parts)

    def check(self, environ: Mapping[str, Any]) -> None:
        """Raise Denied (403) or Unauthorized (401) unless the caller may enter."""
        if self.networks:
            address = peer_address(environ)
            if address is None or not any(address in n for n in self.networks):
                client = environ.get("REMOTE_ADDR") or "unknown"
                raise Denied(f"the admin API is not open to {client}")
        if self._token and not self._has_token(environ):
            raise Unauthorized("the admin API needs Authorization: Bearer <token>")

    def _has_token(self, environ: Mapping[str, Any]) -> bool:
        scheme, _, token = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Constant time, so response times reveal nothing about the token.
        return hmac.compare_digest(token.strip().encode(), self._token)


def peer_address(environ: Mapping[str, Any]) -> IpAddress | None:
    """Return the connected client's address, IPv4-mapped ones as IPv4."""
    text = str(environ.get("REMOTE_ADDR") or "").split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address

"""Serving https from `serverTlsConfig`, and mTLS with `clientAuth: verify`.

A client that fails the handshake (no certificate when one is required, one
we do not trust, plain http on the https port) is logged and disconnected;
it never reaches the registry and never costs more than HANDSHAKE_TIMEOUT.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

import gevent

from ociregistry.config import ServerTlsSettings
from ociregistry.errors import ConfigError

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # seconds a client gets to complete the handshake


def server_ssl_context(tls: ServerTlsSettings) -> ssl.SSLContext:
    """Build the context that serves https; raise ConfigError naming a bad file."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"serverTlsConfig: cannot use cert {tls.cert} with key {tls.key}: "
            f"{_reason(error)}"
        ) from None
    if tls.client_auth == "verify":
        context.verify_mode = ssl.CERT_REQUIRED
        _load_client_cas(context, tls.ca)
    return context


def _load_client_cas(context: ssl.SSLContext, ca: str) -> None:
    """Trust client certificates signed by `ca`, or by the system store."""
    if not ca:
        context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        return
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"serverTlsConfig: cannot use ca {ca}: {_reason(error)}"
        ) from None


def ssl_args(tls: ServerTlsSettings | None) -> dict[str, Any]:
    """Return the gevent server's ssl arguments: none for plain http."""
    if tls is None or not tls.cert:
        return {}
    return {"ssl_context": server_ssl_context(tls)}


def accept_tls(
    wrap_socket: Callable[..., socket.socket],
    ssl_args: dict[str, Any],
    client: socket.socket,
    address: Any,
) -> socket.socket | None:
    """Complete a client's handshake; return None, logged, when it fails."""
    try:
        with gevent.Timeout(HANDSHAKE_TIMEOUT):
            return wrap_socket(client, **ssl_args)
    except gevent.Timeout:
        reason = "timed out"
    except (ssl.SSLError, OSError) as error:
        reason = _reason(error)
    peer = address[0] if isinstance(address, tuple) else address
    log.info('tls handshake failed: "%s": %s', peer, reason)
    return None


def _reason(error: BaseException) -> str:
    """Return the readable part of an OSError or ssl error."""
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason).lower().replace("_", " ")
    strerror = getattr(error, "strerror", None)
    return str(strerror or error).lower()

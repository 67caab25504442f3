"""The extra ports: `GET /health` for probes, and a server for side apps.

Health answers 200 only while the server takes requests: 503 while the
cache is being indexed (and images pre-loaded) at start, and again from the
moment a stop is requested, so a load balancer drains us before we go.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

from gevent import pywsgi

log = logging.getLogger(__name__)

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
TEXT = ("Content-Type", "text/plain; charset=utf-8")


class HealthApp:
    """The WSGI app of the health port: `GET /health` → 200 or 503."""

    def __init__(self, is_ready: Callable[[], bool]) -> None:
        self.is_ready = is_ready

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/health":
            return _answer(environ, start_response, "404 Not Found", "try /health")
        if self.is_ready():
            return _answer(environ, start_response, "200 OK", "ok")
        return _answer(environ, start_response, "503 Service Unavailable", "not ready")


def _answer(
    environ: dict[str, Any], start_response: Callable[..., Any], status: str, text: str
) -> list[bytes]:
    body = f"{text}\n".encode()
    start_response(status, [TEXT, ("Content-Length", str(len(body)))])
    return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


class SideServer:
    """A plain-http WSGI server on an extra port (health or metrics)."""

    def __init__(self, name: str, listener: socket.socket, app: WsgiApp) -> None:
        self.name = name
        error_log = logging.getLogger(f"{__name__}.{name}")
        self.server = pywsgi.WSGIServer(listener, app, log=None, error_log=error_log)

    def start(self) -> None:
        """Start serving in the background."""
        self.server.start()
        host, port = self.server.address[:2]
        log.info('serving %s on: "%s:%d"', self.name, host, port)

    def stop(self) -> None:
        """Stop serving; answers in progress get a second to finish."""
        self.server.stop(timeout=1.0)

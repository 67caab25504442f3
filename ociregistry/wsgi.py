"""WSGI middleware: the access log, common headers, and a crash barrier."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ociregistry.downloads import StreamAborted
from ociregistry.metrics import Metrics
from ociregistry.routes import parse_api_path

log = logging.getLogger("ociregistry.access")
errors_log = logging.getLogger(__name__)

API_VERSION = ("Docker-Distribution-Api-Version", "registry/2.0")
SECRET_HEADERS = frozenset(
    {"HTTP_AUTHORIZATION", "HTTP_PROXY_AUTHORIZATION", "HTTP_COOKIE"}
)
ENDPOINTS = frozenset({"catalog", "tags", "manifests", "blobs", "referrers"})
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def format_latency(seconds: float) -> str:
    """Format a duration the way the Go server's access log does (663.938µs)."""
    for unit, scale, digits in (("s", 1.0, 9), ("ms", 1e-3, 6), ("µs", 1e-6, 3)):
        if seconds >= scale:
            text = f"{seconds / scale:.{digits}f}".rstrip("0").rstrip(".")
            return text + unit
    return f"{round(seconds * 1e9)}ns"


def describe_headers(environ: dict[str, Any]) -> str:
    """List a request's headers for the debug log, credentials withheld."""
    shown = []
    for key, value in environ.items():
        if not key.startswith("HTTP_"):
            continue
        name = key[5:].replace("_", "-").title()
        shown.append(
            f"{name}=<withheld>" if key in SECRET_HEADERS else f"{name}={value}"
        )
    return " ".join(sorted(shown))


def endpoint_of(path: str) -> str:
    """Return the endpoint a request path belongs to, for latency labels."""
    if path.startswith("/cmd/"):
        return "cmd"
    if path in ("/v2", "/v2/"):
        return "v2"
    if path.startswith("/v2/"):
        kind = parse_api_path(path[4:]).kind
        return kind if kind in ENDPOINTS else "other"
    return "other"


class AccessLog:
    """Log and time each request; add the headers every response carries."""

    def __init__(self, app: WsgiApp, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics or Metrics()

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        started = time.perf_counter()
        status = ["-"]
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                'request headers: "%s %s": %s',
                environ.get("REQUEST_METHOD", ""),
                environ.get("PATH_INFO", ""),
                describe_headers(environ),
            )

        def start(status_line: str, headers: list[Any], exc_info: Any = None) -> Any:
            status[0] = status_line.split(" ", 1)[0]
            headers.append(API_VERSION)
            return start_response(status_line, headers, exc_info)

        body = self.app(environ, start)
        return _LoggedBody(body, lambda: self._done(environ, status[0], started))

    def _done(self, environ: dict[str, Any], status: str, started: float) -> None:
        seconds = time.perf_counter() - started
        self.metrics.request_seconds(endpoint_of(environ.get("PATH_INFO", "")), seconds)
        if not log.isEnabledFor(logging.INFO):
            return
        path = environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        log.info(
            "%s:%s%s status=%s latency=%s host=%s ip=%s",
            environ.get("REQUEST_METHOD", ""),
            path,
            f"?{query}" if query else "",
            status,
            format_latency(seconds),
            environ.get("HTTP_HOST", "-"),
            environ.get("REMOTE_ADDR", "-"),
        )


class _LoggedBody:
    """Pass a response body through, logging once it is done or abandoned."""

    def __init__(self, body: Iterable[bytes], on_close: Callable[[], None]) -> None:
        self.body = body
        self.on_close = on_close

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self.body
        except StreamAborted as error:
            errors_log.error("response cut short: %s", error.strerror)
            raise
        except Exception:
            errors_log.exception("response body failed")
            raise StreamAborted("internal error") from None

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self.on_close()

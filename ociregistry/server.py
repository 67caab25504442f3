"""The server lifecycle: bind, banner, registry, serve, stop on a signal."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

import gevent
import gevent.event
import gevent.pool
from gevent import pywsgi

import ociregistry
from ociregistry.config import ServerTlsSettings, Settings
from ociregistry.errors import ConfigError
from ociregistry.logs import setup_logging
from ociregistry.registry import Registry

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0  # seconds in-flight requests get to finish on stop
BACKLOG = 1024
BANNER_RULE = "-" * 70

RegistryFactory = Callable[[Settings, Callable[[], None]], Registry]


def serve(settings: Settings, registry_factory: RegistryFactory = Registry) -> int:
    """Serve the registry until SIGINT, SIGTERM or a stop request; return 0.

    Raise ConfigError when the server cannot start (say, a port in use).
    """
    setup_logging(settings.log_level, settings.log_file)
    refuse_unavailable(settings)
    return ServerLifecycle(settings, registry_factory).run()


class ServerLifecycle:
    """Run one server process: listener, banner, registry, WSGI server, stop."""

    def __init__(
        self, settings: Settings, registry_factory: RegistryFactory = Registry
    ) -> None:
        self.settings = settings
        self.registry_factory = registry_factory
        self._stop_requested = gevent.event.Event()
        self._stop_reason = ""

    def request_stop(self, reason: str = "stop requested") -> None:
        """Ask for a graceful stop; safe from any greenlet or signal handler."""
        if not self._stop_requested.is_set():
            self._stop_reason = reason
            self._stop_requested.set()

    def run(self) -> int:
        """Start everything, wait for a stop request, stop everything."""
        # Bind first: a port in use must fail before the banner or any work.
        listener = self.bind()
        try:
            print_banner(self.settings, sys.stderr)
            with os_errors_reported():
                registry = self.registry_factory(self.settings, self.request_stop)
            try:
                with os_errors_reported():
                    registry.start()
                self.serve_until_stopped(listener, registry)
            finally:
                registry.close()
        finally:
            listener.close()
        log.info("server stopped")
        return 0

    def serve_until_stopped(self, listener: socket.socket, registry: Registry) -> None:
        """Serve on the listener until a stop request, then drain requests."""
        server = make_wsgi_server(listener, registry.wsgi)
        server.start()
        self.install_signal_handlers()
        log.info("server is running")

        self._stop_requested.wait()
        log.info("stopping: %s", self._stop_reason)
        server.stop(timeout=STOP_TIMEOUT)

    def bind(self) -> socket.socket:
        """Return the listening socket; raise ConfigError when it is taken."""
        host, port = self.settings.host, self.settings.port
        try:
            return make_listener(host, port)
        except OSError as error:
            reason = _os_reason(error)
            message = f"cannot listen on {host}:{port}: {reason.lower()}"
            raise ConfigError(message) from None

    def install_signal_handlers(self) -> None:
        """Stop gracefully on SIGINT and SIGTERM."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            reason = f"received {signal.Signals(signum).name}"
            gevent.signal_handler(signum, self.request_stop, reason)


def _os_reason(error: OSError) -> str:
    # Python's create_server appends the address to strerror; errno alone
    # reads better. Resolver errors (gaierror) have negative numbers.
    if error.errno and error.errno > 0:
        return os.strerror(error.errno)
    return str(error.strerror or error).split(" (while attempting")[0]


@contextlib.contextmanager
def os_errors_reported() -> Iterator[None]:
    """Turn an OSError of start-up (a cache root not writable) into one line."""
    try:
        yield
    except OSError as error:
        place = f"{error.filename}: " if error.filename else ""
        raise ConfigError(f"cannot start: {place}{error.strerror}") from None


def make_listener(host: str, port: int) -> socket.socket:
    """Bind and listen on host:port, IPv4 or IPv6 by the form of `host`."""
    # TODO(server): hand this one socket to pre-forked workers when
    # `workers` > 1 — one process serves every request until then.
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG)


def make_wsgi_server(listener: socket.socket, app: Any) -> GracefulWSGIServer:
    """Make the WSGI server for an app; the registry logs requests itself."""
    # TODO(server): pass ssl_args from serverTlsConfig here to serve https.
    error_log = logging.getLogger(f"{__name__}.wsgi")
    # A pool, even unbounded, is what lets stop() wait for requests in flight.
    pool = gevent.pool.Pool()
    return GracefulWSGIServer(listener, app, spawn=pool, log=None, error_log=error_log)


class GracefulHandler(pywsgi.WSGIHandler):  # type: ignore[misc]
    """A request handler that lets a stopping server close idle connections."""

    server: GracefulWSGIServer

    def read_requestline(self) -> str:
        """Wait for the next request, unless the server is stopping."""
        if self.server.is_stopping:
            return ""
        self.server.idle_handlers.add(self)
        try:
            line: str = super().read_requestline()
            return line
        finally:
            self.server.idle_handlers.discard(self)

    def close_if_idle(self) -> None:
        """Wake a handler waiting for a request that will never be served."""
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):
            pass


class GracefulWSGIServer(pywsgi.WSGIServer):  # type: ignore[misc]
    """A WSGI server whose stop ends idle keep-alive connections at once.

    Requests in flight finish (bounded by the stop timeout); connections
    that wait for a next request are closed instead of holding the stop.
    """

    handler_class = GracefulHandler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.is_stopping = False
        self.idle_handlers: set[GracefulHandler] = set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, close idle connections, wait for the rest."""
        self.is_stopping = True
        self.close()
        for handler in list(self.idle_handlers):
            handler.close_if_idle()
        super().stop(timeout=timeout)


def refuse_unavailable(settings: Settings) -> None:
    """Refuse settings this version cannot honour; warn about ignored ones."""
    # TODO(server): serve https, /health, /metrics and worker processes —
    # each is parsed and checked already; until served, https is refused
    # (plain http would betray the operator) and the others are ignored.
    if settings.server_tls is not None:
        raise ConfigError("serverTlsConfig: serving https is not available yet")
    for name, value in (("--health", settings.health), ("--metrics", settings.metrics)):
        if value:
            log.warning("%s is not available yet: port %d is not served", name, value)
    if settings.workers > 1:
        log.warning("workers is not available yet: serving with one process")


def print_banner(settings: Settings, stream: IO[str]) -> None:
    """Write the start-up banner that tells an operator what is running."""
    stream.write(format_banner(settings, datetime.datetime.now().astimezone()))
    stream.flush()


def format_banner(settings: Settings, started: datetime.datetime) -> str:
    """Return the banner lines for settings and a start time (with zone)."""
    version = ociregistry.__version__
    lines = [
        BANNER_RULE,
        "OCI Registry: pull-only, pull-through, caching OCI Distribution Server",
        f"Version: {version}, build date: {ociregistry.build_date()}",
        f"Started: {started:%Y-%m-%d %H:%M:%S.%f %z %Z} (port {settings.port})",
        f"Running as (uid:gid) {os.getuid()}:{os.getgid()}",
        f"Process id: {os.getpid()}",
        f"Tls: {describe_tls(settings.server_tls)}",
        f"Command line: {settings.command_line}",
        BANNER_RULE,
    ]
    return "\n".join(lines) + "\n"


def describe_tls(tls: ServerTlsSettings | None) -> str:
    """Summarize serverTlsConfig for the banner: `none`, or cert and client auth."""
    if tls is None or not tls.cert:
        return "none"
    summary = f"server cert {tls.cert}, client auth {tls.client_auth}"
    if tls.client_auth == "verify":
        summary += f" against {tls.ca or 'the system trust store'}"
    return summary

"""The server lifecycle: bind, banner, registry, serve, stop on a signal."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import gevent
import gevent.event
import gevent.pool
from gevent import pywsgi

import ociregistry
from ociregistry.access import AdminAccess
from ociregistry.config import ServerTlsSettings, Settings
from ociregistry.errors import BadRequest, ConfigError
from ociregistry.health import HealthApp, SideServer
from ociregistry.logs import setup_logging
from ociregistry.metrics import PrometheusMetrics
from ociregistry.registry import Registry
from ociregistry.tls import accept_tls, ssl_args

log = logging.getLogger(__name__)

# Seconds in-flight requests get to finish on stop: within the 30 s that
# Kubernetes and most supervisors wait before they kill.
STOP_TIMEOUT = 25.0
BACKLOG = 1024
BANNER_RULE = "-" * 70
ORPHAN_POLL = 1.0  # seconds between a worker's looks for its parent
MAX_OPEN_FILES = 1 << 20  # the kernel's usual nr_open, for an unlimited hard limit

RegistryFactory = Callable[[Settings, Callable[[], None]], Registry]


def serve(settings: Settings, registry_factory: RegistryFactory = Registry) -> int:
    """Serve the registry until SIGINT, SIGTERM or a stop request; return 0.

    Raise ConfigError when the server cannot start (say, a port in use).
    """
    setup_logging(settings.log_level, settings.log_file)
    raise_open_files_limit()
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
        self._is_serving = False
        self.workers: list[int] = []

    def request_stop(self, reason: str = "stop requested") -> None:
        """Ask for a graceful stop; safe from any greenlet or signal handler."""
        if not self._stop_requested.is_set():
            self._stop_reason = reason
            self._stop_requested.set()

    def run(self) -> int:
        """Start everything, wait for a stop request, stop everything."""
        # Bind first: a port in use or an unusable certificate must fail
        # before the banner or any work.
        server_ssl = ssl_args(self.settings.server_tls)
        listener = self.bind()
        side_listeners = self.bind_side_ports(listener)
        side_servers: list[SideServer] = []
        try:
            print_banner(self.settings, sys.stderr)
            self.workers = self.fork_workers(side_listeners)
            with os_errors_reported():
                registry = self.registry_factory(self.settings, self.request_stop)
            try:
                # Health answers 503 from here until the registry serves.
                side_servers = self.start_side_servers(side_listeners, registry)
                with os_errors_reported():
                    registry.start()
                self.serve_until_stopped(listener, registry, server_ssl)
            finally:
                registry.close()
                for side_server in side_servers:
                    side_server.stop()
        finally:
            for bound in [listener, *side_listeners.values()]:
                bound.close()
            stop_workers(self.workers, STOP_TIMEOUT)
        log.info("server stopped")
        return 0

    def fork_workers(self, side_listeners: dict[str, socket.socket]) -> list[int]:
        """Fork the other `workers` - 1 processes onto the bound listener.

        Each builds its own registry over the shared cache root. Return the
        children's pids in the parent and [] in a child, whose copies of the
        side ports are closed: the parent alone serves /health and /metrics.
        """
        children: list[int] = []
        for _ in range(self.settings.workers - 1):
            pid = os.fork()  # gevent's fork: the child's hub is reinitialised
            if pid == 0:
                for bound in side_listeners.values():
                    bound.close()
                side_listeners.clear()
                gevent.spawn(self._stop_when_orphaned, os.getppid())
                return []
            children.append(pid)
        if children:
            log.info("started %d worker processes: %s", len(children), children)
        return children

    def _stop_when_orphaned(self, parent: int) -> None:
        """Stop a worker whose parent died without stopping it."""
        while os.getppid() == parent:
            gevent.sleep(ORPHAN_POLL)
        self.request_stop("parent process exited")

    def serve_until_stopped(
        self,
        listener: socket.socket,
        registry: Registry,
        server_ssl: dict[str, Any] | None = None,
    ) -> None:
        """Serve on the listener until a stop request, then drain requests."""
        server = make_wsgi_server(listener, registry.wsgi, server_ssl)
        server.start()
        self.install_signal_handlers()
        self._is_serving = True
        log.info("server is running")

        self._stop_requested.wait()
        self._is_serving = False
        log.info("stopping: %s", self._stop_reason)
        signal_workers(self.workers, signal.SIGTERM)
        server.stop(timeout=STOP_TIMEOUT)

    def is_ready(self) -> bool:
        """Tell whether the registry serves: indexed, accepting, not stopping."""
        return self._is_serving and not self._stop_requested.is_set()

    def bind(self, port: int = 0, purpose: str = "") -> socket.socket:
        """Return a listening socket; raise ConfigError when it is taken."""
        host, port = self.settings.host, port or self.settings.port
        try:
            return make_listener(host, port)
        except OSError as error:
            reason = _os_reason(error)
            where = f" for {purpose}" if purpose else ""
            message = f"cannot listen on {host}:{port}{where}: {reason.lower()}"
            raise ConfigError(message) from None

    def bind_side_ports(self, listener: socket.socket) -> dict[str, socket.socket]:
        """Bind the --health and --metrics ports that are switched on.

        On failure, close what is bound, the registry's `listener` included.
        """
        ports = {"health": self.settings.health, "metrics": self.settings.metrics}
        listeners: dict[str, socket.socket] = {}
        try:
            for name, port in ports.items():
                if port:
                    listeners[name] = self.bind(port, f"--{name}")
        except ConfigError:
            for bound in [listener, *listeners.values()]:
                bound.close()
            raise
        return listeners

    def start_side_servers(
        self, listeners: dict[str, socket.socket], registry: Registry
    ) -> list[SideServer]:
        """Serve /health and /metrics on their own ports."""
        servers = []
        if "health" in listeners:
            health = HealthApp(self.is_ready)
            servers.append(SideServer("health", listeners["health"], health))
        metrics = getattr(registry, "metrics", None)
        if "metrics" in listeners and isinstance(metrics, PrometheusMetrics):
            servers.append(
                SideServer("metrics", listeners["metrics"], metrics.wsgi_app())
            )
        for server in servers:
            server.start()
        return servers

    def install_signal_handlers(self) -> None:
        """Stop gracefully on SIGINT and SIGTERM."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            reason = f"received {signal.Signals(signum).name}"
            gevent.signal_handler(signum, self.request_stop, reason)


def raise_open_files_limit() -> None:
    """Lift the soft limit of open files to the hard limit.

    Every client connection holds a file, idle keep-alive ones too; with the
    soft limit of 1024 that shells, systemd and containers leave, a few
    hundred idle clients would stop the server from accepting anyone.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as error:
        log.warning("cannot raise the open files limit from %d: %s", soft, error)
        return
    log.debug("raised the open files limit: from %d to %d", soft, wanted)


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


def signal_workers(children: list[int], signum: int) -> None:
    """Send a signal to worker processes that are still there."""
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def stop_workers(children: list[int], timeout: float) -> None:
    """Send SIGTERM to worker processes and reap them; SIGKILL after `timeout`."""
    signal_workers(children, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in children:
        try:
            with gevent.Timeout(max(deadline - time.monotonic(), 0.1)):
                os.waitpid(pid, 0)
        except gevent.Timeout:
            log.warning("worker %d did not stop in time: killing it", pid)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def make_listener(host: str, port: int) -> socket.socket:
    """Bind and listen on host:port, IPv4 or IPv6 by the form of `host`."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG)


def make_wsgi_server(
    listener: socket.socket, app: Any, server_ssl: dict[str, Any] | None = None
) -> GracefulWSGIServer:
    """Make the WSGI server for an app (https with `server_ssl` from tls.py)."""
    error_log = logging.getLogger(f"{__name__}.wsgi")
    # A pool, even unbounded, is what lets stop() wait for requests in flight.
    pool = gevent.pool.Pool()
    return GracefulWSGIServer(
        listener,
        app,
        spawn=pool,
        log=None,
        error_log=error_log,
        **(server_ssl or {}),
    )


_MALFORMED_BODY = BadRequest("malformed HTTP request").body()
MALFORMED_RESPONSE = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n" + (
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (len(_MALFORMED_BODY), _MALFORMED_BODY)
)


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

    def handle(self) -> None:
        """Serve a connection's requests; a client gone before an answer is fine."""
        # gevent sends the answer to a malformed request unguarded: a client
        # that reset the connection would print a traceback per request.
        with contextlib.suppress(ConnectionError):
            super().handle()

    def _handle_client_error(self, ex: Exception) -> tuple[str, bytes]:
        """Refuse a malformed request: a 400, one log line, no traceback."""
        # gevent prints a traceback for client errors that are not
        # ValueErrors, such as http.client's "got more than 100 headers".
        reason = (str(ex) or type(ex).__name__)[:200]
        address = self.client_address
        client = address[0] if isinstance(address, tuple) else address
        log.info('malformed request refused: "%s": %s', client, reason)
        return "400", MALFORMED_RESPONSE

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

    def handle(self, client: socket.socket, address: Any) -> Any:
        """Serve one connection, with Nagle's algorithm off."""
        # pywsgi writes the headers and the body separately; with Nagle on,
        # the body waits for the client's delayed ACK of the headers (40 ms).
        with contextlib.suppress(OSError):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return super().handle(client, address)

    def wrap_socket_and_handle(self, client: socket.socket, address: Any) -> Any:
        """Serve a TLS client once its handshake succeeds; drop it otherwise."""
        tls_socket = accept_tls(self.wrap_socket, self.ssl_args, client, address)
        if tls_socket is None:
            return None
        with contextlib.closing(tls_socket):
            return self.handle(tls_socket, address)

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, close idle connections, wait for the rest."""
        self.is_stopping = True
        self.close()
        for handler in list(self.idle_handlers):
            handler.close_if_idle()
        super().stop(timeout=timeout)


def print_banner(settings: Settings, stream: IO[str]) -> None:
    """Write the start-up banner that tells an operator what is running."""
    stream.write(format_banner(settings, datetime.datetime.now().astimezone()))
    # Below the box, which keeps the original's shape.
    stream.write(f"Admin API: {AdminAccess(settings.admin_api).describe()}\n")
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

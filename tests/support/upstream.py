"""Run Debian's docker-registry (CNCF distribution 2.8) as a real upstream.

Clients such as skopeo and podman cannot put `host:port` inside a repository
path, so the in-path form `127.0.0.1:OURPORT/<upstream>/<repo>:<tag>` works
only for an upstream on the default port. Each such upstream therefore gets a
loopback address of its own (127.0.0.2, 127.0.0.3, …) on port 80 (443 with
TLS); Linux routes all of 127.0.0.0/8 to the loopback interface.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import urllib3
import yaml

from support.images import Image, ImageIndex
from support.processes import (
    POLL_INTERVAL,
    READY_TIMEOUT,
    ProcessStartError,
    free_port,
    is_port_free,
    read_text,
    stop_process,
    wait_until,
)

REGISTRY_BINARY = "docker-registry"
START_ATTEMPTS = 5

# A gorilla "combined" access line, as docker-registry writes one per request.
ACCESS_LINE = re.compile(
    r"^(?P<client>\S+) \S+ \S+ \[(?P<time>[^\]]+)\] "
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) [^"]*" (?P<status>\d{3}) (?P<size>\S+)'
)

_claimed_addresses: set[tuple[str, int]] = set()
_claim_lock = threading.Lock()


def registry_binary() -> str | None:
    """Return the path of docker-registry, or None when it is not installed."""
    return shutil.which(REGISTRY_BINARY)


def allocate_loopback_address(port: int = 80) -> str:
    """Claim a loopback address other than 127.0.0.1 whose `port` is free."""
    with _claim_lock:
        for last in range(2, 255):
            address = f"127.0.0.{last}"
            if (address, port) in _claimed_addresses:
                continue
            if is_port_free(address, port):
                _claimed_addresses.add((address, port))
                return address
    raise RuntimeError(f"no loopback address with port {port} free")


def release_loopback_address(address: str, port: int) -> None:
    """Give back an address claimed by `allocate_loopback_address`."""
    with _claim_lock:
        _claimed_addresses.discard((address, port))


def make_htpasswd(users: dict[str, str]) -> str:
    """Return htpasswd lines with bcrypt hashes, as docker-registry requires."""
    try:
        import bcrypt
    except ImportError:
        return _htpasswd_with_tool(users)
    lines = []
    for user, password in users.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4))
        lines.append(f"{user}:{hashed.decode()}\n")
    return "".join(lines)


def _htpasswd_with_tool(users: dict[str, str]) -> str:
    """Hash with apache2-utils' `htpasswd -B` when bcrypt is not importable."""
    tool = shutil.which("htpasswd")
    if tool is None:
        raise RuntimeError("htpasswd auth needs the bcrypt package or htpasswd")
    lines = []
    for user, password in users.items():
        result = subprocess.run(
            [tool, "-nbB", "-C", "4", user, password],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        lines.append(result.stdout.strip() + "\n")
    return "".join(lines)


@dataclass
class TlsFiles:
    """Serve https with `cert`/`key`; `client_cas` demand client certificates.

    `ca` verifies the server in this module's own requests, and
    `client_cert`/`client_key` authenticate them when client_cas are set.
    """

    cert: str
    key: str
    ca: str | None = None
    client_cas: list[str] | None = None
    client_cert: str | None = None
    client_key: str | None = None


@dataclass
class ProxySettings:
    """Run docker-registry as a pull-through cache of `remote_url`."""

    remote_url: str
    username: str | None = None
    password: str | None = None


class AccessLine(NamedTuple):
    """One request from docker-registry's access log."""

    method: str
    path: str
    query: str
    status: int
    client: str


def parse_access_log(text: str) -> list[AccessLine]:
    """Return the access lines of a docker-registry log, ignoring the rest."""
    lines = []
    for line in text.splitlines():
        match = ACCESS_LINE.match(line)
        if match:
            path, _, query = match["uri"].partition("?")
            lines.append(
                AccessLine(
                    match["method"], path, query, int(match["status"]), match["client"]
                )
            )
    return lines


class RegistryUpstream:
    """A docker-registry subprocess with its config, storage and log in `workdir`.

    `port=None` claims a loopback address of its own on the default port of the
    scheme (for clients that need the in-path form); `port=0` takes a free
    port on 127.0.0.1; anything else is used as given.
    """

    def __init__(
        self,
        workdir: Path,
        address: str | None = None,
        port: int | None = None,
        htpasswd: dict[str, str] | None = None,
        tls: TlsFiles | None = None,
        proxy: ProxySettings | None = None,
    ):
        self.workdir = Path(workdir)
        self.requested = (address, port)
        self.htpasswd = htpasswd
        self.tls = tls
        self.proxy = proxy
        self.address = address or "127.0.0.1"
        self.port = port or 0
        self.process: subprocess.Popen[bytes] | None = None
        self.content: dict[str, Image | ImageIndex] = {}
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.storage_path = self.workdir / "storage"
        self._log_file: IO[bytes] | None = None
        self._claimed = False

    @property
    def scheme(self) -> str:
        """Return `https` when serving TLS, else `http`."""
        return "https" if self.tls else "http"

    @property
    def host_port(self) -> str:
        """Return `address:port`, always with the port."""
        return f"{self.address}:{self.port}"

    @property
    def namespace(self) -> str:
        """Return the upstream as an image reference names it."""
        default = 443 if self.tls else 80
        return self.address if self.port == default else self.host_port

    @property
    def url(self) -> str:
        """Return the base URL, without a trailing slash."""
        return f"{self.scheme}://{self.host_port}"

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        """Return the first htpasswd user and password, if auth is on."""
        if not self.htpasswd:
            return None
        return next(iter(self.htpasswd.items()))

    def registry_config(self, **extra: Any) -> dict[str, Any]:
        """Return the `registries` entry our server needs to reach this one."""
        entry: dict[str, Any] = {"name": self.namespace, "scheme": self.scheme}
        if self.basic_auth:
            user, password = self.basic_auth
            entry["auth"] = {"user": user, "password": password}
        if self.tls and self.tls.ca:
            entry["tls"] = {"ca": self.tls.ca}
        entry.update(extra)
        return entry

    def config(self) -> dict[str, Any]:
        """Return docker-registry's configuration as a dict."""
        http: dict[str, Any] = {
            "addr": self.host_port,
            "secret": "ociregistry-tests",
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        }
        if self.tls:
            http["tls"] = {"certificate": self.tls.cert, "key": self.tls.key}
            if self.tls.client_cas:
                http["tls"]["clientcas"] = list(self.tls.client_cas)
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {
                "level": "info",
                "formatter": "text",
                "accesslog": {"disabled": False},
            },
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_path)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http,
        }
        if self.htpasswd:
            htpasswd_path = self.workdir / "htpasswd"
            htpasswd_path.write_text(make_htpasswd(self.htpasswd))
            config["auth"] = {
                "htpasswd": {"realm": "test-registry", "path": str(htpasswd_path)}
            }
        if self.proxy:
            config["proxy"] = {"remoteurl": self.proxy.remote_url}
            if self.proxy.username:
                config["proxy"]["username"] = self.proxy.username
                config["proxy"]["password"] = self.proxy.password or ""
        return config

    def start(self, timeout: float = READY_TIMEOUT) -> RegistryUpstream:
        """Start docker-registry and wait until it answers `GET /v2/`.

        When the address was chosen here and another process takes it first,
        start again on a fresh one, a bounded number of times.
        """
        assert self.process is None, "upstream already running"
        binary = registry_binary()
        if binary is None:
            raise ProcessStartError("docker-registry is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)

        for attempt in range(START_ATTEMPTS):
            self._choose_address()
            try:
                self._launch(binary, timeout)
                return self
            except ProcessStartError as error:
                self.stop()
                is_bind_error = "address already in use" in str(error)
                if not (is_bind_error and self._is_chosen_here()):
                    raise
                if attempt == START_ATTEMPTS - 1:
                    raise
        return self

    def _is_chosen_here(self) -> bool:
        """Tell whether the address or port was picked by this class."""
        address, port = self.requested
        return address is None or not port

    def _choose_address(self) -> None:
        """Pick the address and port this start binds."""
        address, port = self.requested
        if port is None:
            self.port = 443 if self.tls else 80
            self.address = address or allocate_loopback_address(self.port)
            self._claimed = address is None
        elif port == 0:
            self.address = address or "127.0.0.1"
            self.port = free_port(self.address)
        else:
            self.address, self.port = address or "127.0.0.1", port

    def _launch(self, binary: str, timeout: float) -> None:
        """Write the config, start the process and wait for readiness."""
        self.config_path.write_text(yaml.safe_dump(self.config()))
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith("REGISTRY_")
        }
        self._log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [binary, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
        )
        self._wait_ready(timeout)

    def client(self) -> urllib3.PoolManager:
        """Return a connection pool set up to talk to this upstream."""
        if not self.tls:
            return urllib3.PoolManager(retries=False, timeout=5.0)
        return urllib3.PoolManager(
            retries=False,
            timeout=5.0,
            cert_reqs="CERT_REQUIRED" if self.tls.ca else "CERT_NONE",
            ca_certs=self.tls.ca,
            cert_file=self.tls.client_cert,
            key_file=self.tls.client_key,
            assert_hostname=False if not self.tls.ca else None,
        )

    def _wait_ready(self, timeout: float) -> None:
        """Poll `GET /v2/` until it answers 200 or 401; raise if the process exits."""
        pool = self.client()

        def is_ready() -> bool:
            code = self.process.poll() if self.process else None
            if code is not None:
                raise ProcessStartError(
                    f"docker-registry exited with {code}:\n{self.read_log()[-3000:]}"
                )
            try:
                return pool.request("GET", self.url + "/v2/").status in (200, 401)
            except urllib3.exceptions.HTTPError:
                return False

        try:
            wait_until(is_ready, timeout, f"docker-registry on {self.url}")
        except TimeoutError as error:
            raise ProcessStartError(f"{error}\n{self.read_log()[-3000:]}") from error

    def stop(self) -> int | None:
        """Stop docker-registry (SIGTERM, then SIGKILL); return its exit code."""
        code = None
        if self.process is not None:
            code = stop_process(self.process)
            self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._claimed:
            release_loopback_address(self.address, self.port)
            self._claimed = False
        return code

    def is_running(self) -> bool:
        """Tell whether the registry process is alive."""
        return self.process is not None and self.process.poll() is None

    def read_log(self) -> str:
        """Return everything docker-registry has logged so far."""
        return read_text(self.log_path)

    def access_lines(self) -> list[AccessLine]:
        """Return every request in the access log, oldest first."""
        return parse_access_log(self.read_log())

    def sync_log(self, timeout: float = 5.0) -> None:
        """Send a marker request and wait until it is logged.

        Each access line is written when its handler returns, so a request
        that finished before the marker was sent is in the log by the time
        the marker is.
        """
        marker = uuid.uuid4().hex
        self.client().request("GET", f"{self.url}/v2/?mark={marker}")
        wait_until(
            lambda: f"mark={marker}" in self.read_log(),
            timeout,
            "access log marker",
            POLL_INTERVAL,
        )

    def request_counts(self, sync: bool = True) -> Counter[tuple[str, str]]:
        """Return how many requests each (method, path) received."""
        if sync:
            self.sync_log()
        return Counter((line.method, line.path) for line in self.access_lines())

    def count_requests(self, path: str, method: str = "GET", sync: bool = True) -> int:
        """Return how many `method` requests for `path` (no query) were logged."""
        return self.request_counts(sync)[(method, path)]

    def blob_path(self, repo: str, digest: str) -> str:
        """Return the API path of a blob, as counted by `count_requests`."""
        return f"/v2/{repo}/blobs/{digest}"

    def manifest_path(self, repo: str, reference: str) -> str:
        """Return the API path of a manifest, as counted by `count_requests`."""
        return f"/v2/{repo}/manifests/{reference}"

    def __enter__(self) -> RegistryUpstream:
        return self.start() if self.process is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

"""A lean HTTP/1.1 keep-alive client and the pull sequence a container client runs.

The benchmark must not be limited by its own load generator, so requests go
over plain (gevent-patched) sockets with hand-rolled parsing: a few tens of
microseconds of Python per request instead of a general client's hundreds.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

RECV_SIZE = 256 * 1024
STREAM_BUFFER = 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
PLATFORM = ("linux", "amd64")


class PullError(Exception):
    """Raised when a server answers wrongly: a status, a digest, a size."""


@dataclass
class Response:
    """A response: status, lower-cased headers and the whole body."""

    status: int
    headers: dict[str, str]
    body: bytes = b""


class Connection:
    """One keep-alive connection to host:port; reconnects when the server closes."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buffer = bytearray()
        self.requests = 0

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buffer.clear()

    def _connect(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buffer.clear()
        return self.sock

    def _send(self, method: str, path: str, headers: dict[str, str]) -> None:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        reused = self.sock is not None
        try:
            self._connect().sendall(data)
        except OSError:
            if not reused:
                raise
            self.close()
            self._connect().sendall(data)
        self.requests += 1

    def _recv(self) -> bytes:
        assert self.sock is not None
        chunk = self.sock.recv(RECV_SIZE)
        if not chunk:
            raise ConnectionResetError("server closed the connection")
        return chunk

    def _read_head(self) -> tuple[int, dict[str, str]]:
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self.buffer) > MAX_HEADER_BYTES:
                raise PullError("response headers too long")
            self.buffer += self._recv()
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[: end + 4]
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> Response:
        """Send a request and read the whole response."""
        try:
            self._send(method, path, headers or {})
            status, response_headers = self._read_head()
            body = b""
            if method != "HEAD" and status not in (204, 304):
                body = self._read_body(response_headers)
            if response_headers.get("connection", "").lower() == "close":
                self.close()
            return Response(status, response_headers, body)
        except BaseException:
            self.close()
            raise

    def _read_body(self, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(headers.get("content-length", "-1"))
        if length < 0:
            while True:
                try:
                    self.buffer += self._recv()
                except ConnectionResetError:
                    break
            body = bytes(self.buffer)
            self.close()
            return body
        while len(self.buffer) < length:
            self.buffer += self._recv()
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return body

    def _read_line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self.buffer += self._recv()
        end = self.buffer.find(b"\r\n")
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    def _read_chunked(self) -> bytes:
        parts = []
        for _ in range(1 << 20):
            size = int(self._read_line().split(b";")[0], 16)
            if size == 0:
                self._read_line()
                break
            while len(self.buffer) < size + 2:
                self.buffer += self._recv()
            parts.append(bytes(self.buffer[:size]))
            del self.buffer[: size + 2]
        return b"".join(parts)

    def stream(
        self,
        path: str,
        sink: Callable[[memoryview], None] | None = None,
        on_first_byte: Callable[[], None] | None = None,
    ) -> int:
        """GET a large body with Content-Length, passing it to `sink`; return size."""
        try:
            self._send("GET", path, {})
            status, headers = self._read_head()
            if status != 200:
                raise PullError(f"GET {path}: HTTP {status}")
            length = int(headers["content-length"])
            return self._drain(length, sink, on_first_byte)
        except BaseException:
            self.close()
            raise

    def _drain(
        self,
        length: int,
        sink: Callable[[memoryview], None] | None,
        on_first_byte: Callable[[], None] | None,
    ) -> int:
        received = 0
        if self.buffer:
            if on_first_byte:
                on_first_byte()
                on_first_byte = None
            head = bytes(self.buffer[:length])
            del self.buffer[:length]
            received += len(head)
            if sink:
                sink(memoryview(head))
        buffer = bytearray(STREAM_BUFFER)
        view = memoryview(buffer)
        assert self.sock is not None
        while received < length:
            count = self.sock.recv_into(view, min(STREAM_BUFFER, length - received))
            if not count:
                raise ConnectionResetError(f"body cut short at {received} bytes")
            if on_first_byte:
                on_first_byte()
                on_first_byte = None
            if sink:
                sink(view[:count])
            received += count
        return received


@dataclass
class Target:
    """A server under test and how it names repositories of the upstream."""

    host: str
    port: int
    prefix: str  # "/v2/" for the anchor, "/v2/<upstream>/" for ours

    def connect(self, timeout: float = 60.0) -> Connection:
        """Open a connection to the server."""
        return Connection(self.host, self.port, timeout)

    def manifest_path(self, repo: str, reference: str) -> str:
        """Return the API path of a manifest."""
        return f"{self.prefix}{repo}/manifests/{reference}"

    def blob_path(self, repo: str, digest: str) -> str:
        """Return the API path of a blob."""
        return f"{self.prefix}{repo}/blobs/{digest}"


@dataclass
class PullStats:
    """What one image pull did."""

    requests: int = 0
    blob_bytes: int = 0
    seconds: float = 0.0


@dataclass
class Puller:
    """Run the full client sequence for images; remembers parsed manifests."""

    target: Target
    parsed: dict[str, Any] = field(default_factory=dict)

    def pull(self, connection: Connection, repo: str, tag: str) -> PullStats:
        """HEAD the tag, GET the index and image manifest, GET every blob."""
        started = time.perf_counter()
        stats = PullStats()
        head = connection.request(
            "HEAD", self.target.manifest_path(repo, tag), {"Accept": ACCEPT}
        )
        stats.requests += 1
        if head.status != 200:
            raise PullError(f"HEAD {repo}:{tag}: HTTP {head.status}")
        digest = head.headers["docker-content-digest"]
        manifest = self.get_manifest(connection, repo, digest, stats)
        if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
            child = pick_platform(manifest)
            manifest = self.get_manifest(connection, repo, child, stats)
        for descriptor in [manifest["config"], *manifest["layers"]]:
            self.get_blob(connection, repo, descriptor, stats)
        stats.seconds = time.perf_counter() - started
        return stats

    def get_manifest(
        self, connection: Connection, repo: str, digest: str, stats: PullStats
    ) -> Any:
        """GET a manifest by digest, check its bytes, return it parsed."""
        response = connection.request(
            "GET", self.target.manifest_path(repo, digest), {"Accept": ACCEPT}
        )
        stats.requests += 1
        if response.status != 200:
            raise PullError(f"GET manifest {repo}@{digest}: HTTP {response.status}")
        check_digest(response.body, digest, f"manifest {repo}@{digest}")
        if digest not in self.parsed:
            self.parsed[digest] = json.loads(response.body)
        return self.parsed[digest]

    def get_blob(
        self,
        connection: Connection,
        repo: str,
        descriptor: dict[str, Any],
        stats: PullStats,
    ) -> None:
        """GET a blob and check its size and digest."""
        digest, size = descriptor["digest"], descriptor["size"]
        if size > 64 * 1024 * 1024:
            hasher = hashlib.sha256()
            received = connection.stream(
                self.target.blob_path(repo, digest), hasher.update
            )
            actual = "sha256:" + hasher.hexdigest()
        else:
            response = connection.request("GET", self.target.blob_path(repo, digest))
            if response.status != 200:
                raise PullError(f"GET blob {digest}: HTTP {response.status}")
            received = len(response.body)
            actual = "sha256:" + hashlib.sha256(response.body).hexdigest()
        stats.requests += 1
        stats.blob_bytes += received
        if received != size or actual != digest:
            raise PullError(f"blob {digest}: got {received} bytes digesting {actual}")


def check_digest(data: bytes, digest: str, what: str) -> None:
    """Raise PullError unless the bytes hash to the digest."""
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise PullError(f"{what}: body digests to {actual}")


def pick_platform(index: dict[str, Any]) -> str:
    """Return the digest of the linux/amd64 entry of an index."""
    for entry in index["manifests"]:
        platform = entry.get("platform", {})
        if (platform.get("os"), platform.get("architecture")) == PLATFORM:
            return str(entry["digest"])
    raise PullError("index has no linux/amd64 image")

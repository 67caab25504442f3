"""Slow and hostile clients: none of them keeps other clients waiting.

While hundreds of idle connections, trickling readers, clients that hang up
mid-blob and requests with huge headers or bodies keep the server busy, a
normal client must still be answered promptly, the server's memory must stay
bounded, and a download a client abandoned must never be half visible.
"""

from __future__ import annotations

import hashlib
import resource
import shutil
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable
from http.client import HTTPResponse

import pytest
import urllib3
from support.cache_checks import assert_cache_sound
from support.fake_upstream import Trickle
from support.images import raw_image
from support.processes import OciServer, wait_until

MIB = 1024 * 1024
REPO = "app/hostile"
IDLE_CONNECTIONS = 500
ABUSE_SECONDS = 4.0
MAX_LATENCY = 1.0  # seconds for a normal manifest GET under abuse
MAX_RSS_KIB = 256 * 1024


def peak_rss_kib(pid: int) -> int:
    """Return a process's peak resident set size (VmHWM) in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def connect(server, receive_buffer: int = 0) -> socket.socket:
    """Open a raw connection to the server, optionally with a tiny window."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect((server.host, server.port))
    return sock


def request_bytes(method: str, path: str, headers: str = "", body: int = 0) -> bytes:
    """Return a raw HTTP/1.1 request head; `body` is its Content-Length."""
    length = f"Content-Length: {body}\r\n" if body else ""
    return f"{method} {path} HTTP/1.1\r\nHost: test\r\n{headers}{length}\r\n".encode()


def exchange(server, head: bytes, body: int = 0) -> int:
    """Send a request (with `body` zero bytes) and return the status."""
    with connect(server) as sock:
        sock.sendall(head)
        chunk = b"\0" * MIB
        for offset in range(0, body, MIB):
            sock.sendall(chunk[: min(MIB, body - offset)])
        response = HTTPResponse(sock, method=head.split(b" ")[0].decode())
        response.begin()
        response.read()
        return response.status


def hang_up(sock: socket.socket) -> None:
    """Close a connection with a reset, as a client that dies does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Abuse:
    """Run misbehaving clients in threads until stopped; count what they did."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.counts: dict[str, int] = {}
        self.statuses: dict[str, set[int]] = {}
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self, name: str, action: Callable[[], int | None], count: int = 1):
        """Repeat an action in `count` threads until stopped."""

        def run() -> None:
            while not self.stop.is_set():
                status = action()
                with self._lock:
                    self.counts[name] = self.counts.get(name, 0) + 1
                    if status is not None:
                        self.statuses.setdefault(name, set()).add(status)

        for _ in range(count):
            thread = threading.Thread(target=run, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        """Stop every abuser and wait for it (bounded)."""
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in self.threads)


@pytest.fixture
def hostile_setup(oci_server, fake_upstream):
    fake = fake_upstream()
    image = raw_image("hostile", [4 * MIB, 64 * 1024])
    fake.add_image(REPO, "1", image)
    server = oci_server(
        "--pull-timeout", "20000", config={"registries": [fake.registry_config()]}
    )
    base = f"/v2/{fake.host_port}/{REPO}"
    client = urllib3.PoolManager(retries=False, timeout=30)
    for path in ["manifests/1"] + [f"blobs/{blob.digest}" for blob in image.blobs]:
        assert client.request("GET", server.url + f"{base}/{path}").status == 200
    return server, fake, image, base


def raise_own_fd_limit(wanted: int) -> None:
    """Let this test process hold `wanted` sockets at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"this process may open only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def open_idle_connections(server, count: int) -> list[socket.socket]:
    """Open connections that send nothing, or half a request line."""
    raise_own_fd_limit(count + 256)
    sockets = []
    for n in range(count):
        sock = connect(server)
        if n % 2:
            sock.sendall(b"GET /v2/ HT")
        sockets.append(sock)
    return sockets


def test_abusive_clients_do_not_delay_a_normal_pull(hostile_setup):
    server, fake, image, base = hostile_setup
    layer = image.layers[0]
    blob_get = request_bytes("GET", f"{base}/blobs/{layer.digest}")

    def trickle_reader() -> None:
        with connect(server, receive_buffer=4096) as sock:
            sock.sendall(blob_get)
            while not abuse.stop.is_set() and sock.recv(1024):
                time.sleep(0.02)  # a reader on a very slow link

    def quitter() -> None:
        sock = connect(server)
        sock.sendall(blob_get)
        sock.recv(64 * 1024)
        hang_up(sock)

    def rude() -> None:
        sock = connect(server)
        sock.sendall(many_headers)
        hang_up(sock)  # before the 400 can be sent
        time.sleep(0.01)  # pacing, so the other abusers get their turn

    huge_header = request_bytes("GET", "/v2/", f"X-Huge: {'h' * 65536}\r\n")
    many_headers = request_bytes(
        "GET", "/v2/", "".join(f"X-Header-{n}: {n}\r\n" for n in range(200))
    )
    upload = request_bytes("PUT", f"{base}/blobs/uploads/", body=32 * MIB)
    get_with_body = request_bytes("GET", "/v2/", body=32 * MIB)
    idle = open_idle_connections(server, IDLE_CONNECTIONS)
    abuse = Abuse()
    abuse.start("trickle", trickle_reader, count=4)
    abuse.start("quit mid-blob", quitter, count=2)
    abuse.start("malformed, then gone", rude)
    abuse.start("huge header", lambda: exchange(server, huge_header))
    abuse.start("many headers", lambda: exchange(server, many_headers))
    abuse.start("huge upload", lambda: exchange(server, upload, 32 * MIB))
    abuse.start("huge GET body", lambda: exchange(server, get_with_body, 32 * MIB))

    latencies = []
    client = urllib3.PoolManager(retries=False, timeout=10)
    deadline = time.monotonic() + ABUSE_SECONDS
    try:
        while time.monotonic() < deadline:
            started = time.monotonic()
            response = client.request("GET", f"{server.url}{base}/manifests/1")
            latencies.append(time.monotonic() - started)
            assert response.status == 200 and response.data == image.bytes
            time.sleep(0.05)  # pacing: a probe every 50 ms, not a wait
    finally:
        abuse.finish()
        for sock in idle:
            sock.close()
    peak = peak_rss_kib(server.pid)

    print(
        f"\nhostile clients: {len(latencies)} manifest GETs, latency median "
        f"{statistics.median(latencies) * 1000:.1f} ms, max "
        f"{max(latencies) * 1000:.1f} ms; server peak RSS {peak // 1024} MiB; "
        f"abuse {abuse.counts}"
    )
    assert max(latencies) < MAX_LATENCY
    assert peak < MAX_RSS_KIB
    assert abuse.statuses["huge header"] == {400}
    assert abuse.statuses["many headers"] == {400}
    assert abuse.statuses["huge upload"] == {405}
    assert abuse.statuses["huge GET body"] == {200}
    assert "Traceback" not in server.read_log()
    assert_cache_sound(server.image_path)


def test_idle_connections_beyond_the_soft_fd_limit_are_served(oci_server, cache_root):
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) is not installed")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * IDLE_CONNECTIONS:
        pytest.skip(f"the hard limit of open files is only {hard}")
    # A soft limit of 256 is below the idle connections; the server must
    # lift it to the hard limit, as systemd and containers leave it at 1024.
    command = (prlimit, f"--nofile=256:{hard}", sys.executable, "-m", "ociregistry")
    server = oci_server("--air-gapped", command=command)
    idle = open_idle_connections(server, IDLE_CONNECTIONS)
    client = urllib3.PoolManager(retries=False, timeout=5)

    try:
        started = time.monotonic()
        response = client.request("GET", f"{server.url}/v2/")
        elapsed = time.monotonic() - started
    finally:
        for sock in idle:
            sock.close()

    assert response.status == 200
    assert elapsed < MAX_LATENCY
    assert "Too many open files" not in server.read_log()


def test_abandoned_download_completes_for_the_next_client(
    oci_server, fake_upstream, cache_root
):
    fake = fake_upstream()
    image = raw_image("abandoned", [2 * MIB])
    layer = image.layers[0]
    fake.add_image(REPO, "1", image)
    blob_path = fake.blob_path(REPO, layer.digest)
    fake.add_fault(blob_path, Trickle(chunk_size=64 * 1024, interval=0.02))
    server = oci_server(config={"registries": [fake.registry_config()]})
    path = f"/v2/{fake.host_port}/{REPO}/blobs/{layer.digest}"
    cached = cache_root / "blobs" / layer.hex

    first = connect(server)
    first.sendall(request_bytes("GET", path))
    first.recv(64 * 1024)
    hang_up(first)
    is_visible_early = cached.exists()
    client = urllib3.PoolManager(retries=False, timeout=30)
    second = client.request("GET", server.url + path)

    assert not is_visible_early
    assert second.status == 200
    assert hashlib.sha256(second.data).hexdigest() == layer.hex
    assert fake.count(blob_path) == 1
    assert cached.exists() and not any((cache_root / ".tmp").iterdir())
    assert_cache_sound(cache_root)


def test_abandoned_download_nobody_wants_still_lands_whole(
    oci_server, fake_upstream, cache_root
):
    fake = fake_upstream()
    image = raw_image("orphan", [2 * MIB])
    layer = image.layers[0]
    fake.add_image(REPO, "1", image)
    fake.add_fault(
        fake.blob_path(REPO, layer.digest), Trickle(chunk_size=64 * 1024, interval=0.01)
    )
    server = oci_server(config={"registries": [fake.registry_config()]})
    cached = cache_root / "blobs" / layer.hex

    sock = connect(server)
    sock.sendall(
        request_bytes("GET", f"/v2/{fake.host_port}/{REPO}/blobs/{layer.digest}")
    )
    sock.recv(64 * 1024)
    hang_up(sock)
    is_visible_early = cached.exists()
    wait_until(cached.exists, 20, "abandoned blob cached")

    assert not is_visible_early
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == layer.hex
    assert not any((cache_root / ".tmp").iterdir())


@pytest.fixture(scope="module")
def air_gapped_server(tmp_path_factory):
    """One air-gapped server for the malformed requests, which cache nothing."""
    workdir = tmp_path_factory.mktemp("malformed")
    (workdir / "cache").mkdir()
    with OciServer(workdir / "cache", workdir, ["--air-gapped"]) as server:
        yield server


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (request_bytes("GET", "/v2/", f"X-Huge: {'h' * 65536}\r\n"), 400),
        (request_bytes("GET", "/v2/", "X-Many: 1\r\n" * 101), 400),
        (request_bytes("GET", "/v2/" + "a" * 20000), 414),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /v2/ HTTP/9.9\r\n\r\n", 400),
        (request_bytes("GET", "/v2/", "Content-Length: -5\r\n"), 400),
        (request_bytes("GET", "/v2/", "Content-Length: lots\r\n"), 400),
        (request_bytes("HEAD", "/v2/", "Content-Length: 10\r\n"), 400),
    ],
    ids=[
        "64KiB-header",
        "101-headers",
        "20KB-request-line",
        "garbage",
        "bad-version",
        "negative-length",
        "non-numeric-length",
        "HEAD-with-body",
    ],
)
def test_malformed_request_gets_4xx_without_a_traceback(
    air_gapped_server, request_head, status
):
    server = air_gapped_server
    logged_before = len(server.read_log())

    answer = exchange(server, request_head)

    assert answer == status
    assert "Traceback" not in server.read_log()[logged_before:]
    assert exchange(server, request_bytes("GET", "/v2/")) == 200

"""Upstream faults at every step of a pull, each against waiting clients.

The steps: connecting, the token exchange, the manifest's headers and body
(by tag and by digest), the blob's headers and body, and the storage host a
blob redirect leads to. At each, the upstream refuses, resets, stalls, fails
with a 5xx, truncates, trickles, or sends the wrong bytes. Every client must
get a clear error (a 502 or 504 naming the upstream, or a body cut short),
within the pull timeout; nothing wrong may be cached; and once the upstream
behaves again, the same pull must work. tests/test_faults.py covers the
faults this file does not repeat.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import urllib3
from support.cache_checks import assert_cache_sound
from support.fake_upstream import (
    DropAfter,
    FakeUpstream,
    Fault,
    InvalidJson,
    Stall,
    Status,
    Trickle,
    WrongBytes,
    WrongContentType,
)
from support.images import Image, raw_image
from support.processes import OciServer, free_port, wait_until

from ociregistry.manifest import Manifest

PULL_TIMEOUT = 1.0  # seconds, as --pull-timeout 1000
WAITERS = 3
# A timed-out pull answers after about PULL_TIMEOUT; the rest is slack for
# a loaded machine.
MAX_WAIT = PULL_TIMEOUT + 4.0


class RawUpstream:
    """A TCP listener that misbehaves below HTTP: resets or never accepts."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.listener.settimeout(0.2)
        self.host_port = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._closed = threading.Event()
        self._filler: socket.socket | None = None
        if mode == "connect-stall":
            # One connection nobody accepts fills the queue of a listener
            # with backlog 0: the kernel then drops every new SYN.
            self._filler = socket.create_connection(self.listener.getsockname())
            return
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with connection:
                self._misbehave(connection)

    def _misbehave(self, connection: socket.socket) -> None:
        connection.settimeout(5)
        try:
            connection.recv(65536)
            if self.mode == "reset-mid-body":
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 300000\r\n\r\n" + b"{" * 1000
                )
        except OSError:
            return
        linger = struct.pack("ii", 1, 0)  # close with a RST, not a FIN
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)

    def close(self) -> None:
        """Stop misbehaving."""
        self._closed.set()
        self.listener.close()
        if self._filler is not None:
            self._filler.close()


@dataclass
class Upstreams:
    """The fakes and the server one module of fault cases shares."""

    server: OciServer
    plain: FakeUpstream
    bearer: FakeUpstream
    redirecting: FakeUpstream
    storage: FakeUpstream

    @property
    def cache_root(self) -> Path:
        return self.server.image_path


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("upstream-faults")
    (workdir / "cache").mkdir()
    fakes = [FakeUpstream(), FakeUpstream(auth="bearer"), FakeUpstream()]
    storage = FakeUpstream()
    fakes[2].redirect_blobs_to(storage)
    # Every upstream a case names is plain http: fakes and raw listeners.
    config = {"registries": [{"name": "*", "scheme": "http"}]}
    timeout = str(int(PULL_TIMEOUT * 1000))
    args = ["--pull-timeout", timeout]
    try:
        with OciServer(workdir / "cache", workdir, args, config=config) as server:
            yield Upstreams(server, *fakes, storage)
    finally:
        for fake in [*fakes, storage]:
            fake.close()


@dataclass(frozen=True)
class Case:
    """A fault: which upstream, which step, how it misbehaves, what to expect.

    `expected` is 502 or 504, or 0 when the client may get either a 5xx or
    a 200 cut short (the fault struck after the first bytes went out).
    """

    upstream: str  # plain, bearer (fault on /token), redirecting, or a raw mode
    step: str  # tag, digest or blob
    fault: Fault | None
    expected: int


CASES = {
    "connect-stalls-manifest": Case("connect-stall", "tag", None, 504),
    "connect-stalls-blob": Case("connect-stall", "blob", None, 504),
    "connect-refused-blob": Case("refused", "blob", None, 502),
    "reset-at-connect-manifest": Case("reset", "tag", None, 502),
    "reset-at-connect-blob": Case("reset", "blob", None, 502),
    "reset-mid-body-manifest": Case("reset-mid-body", "tag", None, 502),
    "reset-mid-body-blob": Case("reset-mid-body", "blob", None, 0),
    "token-service-500": Case("bearer", "tag", Status(status=500), 502),
    "token-service-stalls": Case("bearer", "blob", Stall(), 504),
    "token-service-invalid-json": Case("bearer", "tag", InvalidJson(), 502),
    "manifest-stalls-mid-body": Case("plain", "tag", Stall(after_bytes=100), 504),
    "manifest-truncated": Case("plain", "tag", DropAfter(n_bytes=100), 502),
    "manifest-trickles-past-timeout": Case(
        "plain", "tag", Trickle(chunk_size=32, interval=0.1), 504
    ),
    "manifest-is-a-captive-portal-page": Case(
        "plain", "tag", InvalidJson(body=b"<html>Sign in to the Wi-Fi</html>"), 502
    ),
    "manifest-by-digest-500": Case("plain", "digest", Status(status=500), 502),
    "manifest-by-digest-invalid-json": Case("plain", "digest", InvalidJson(), 502),
    "manifest-by-digest-wrong-bytes": Case("plain", "digest", WrongBytes(), 502),
    "blob-500": Case("plain", "blob", Status(status=500), 502),
    "blob-504": Case("plain", "blob", Status(status=504), 502),
    "blob-truncated-after-headers": Case("plain", "blob", DropAfter(n_bytes=0), 502),
    "blob-stalls-mid-body": Case("plain", "blob", Stall(after_bytes=100_000), 0),
    "redirect-target-500": Case("redirecting", "blob", Status(status=500), 502),
    "redirect-target-stalls": Case("redirecting", "blob", Stall(), 504),
    "redirect-target-truncated": Case(
        "redirecting", "blob", DropAfter(n_bytes=1000), 0
    ),
}


def make_case_image(name: str) -> Image:
    return raw_image(f"upstream-faults-{name}", [256 * 1024, 4096])


def api_path(repo: str, step: str, image: Image) -> str:
    """Return the path under /v2/<upstream>/ a step of the pull asks for."""
    reference = {"tag": "manifests/1", "digest": f"manifests/{image.digest}"}
    return f"{repo}/{reference.get(step, f'blobs/{image.layers[0].digest}')}"


def arrange(upstreams: Upstreams, case: Case, repo: str, image: Image):
    """Put the fault in place; return the upstream name and how to undo it."""
    if case.upstream == "refused":
        return f"127.0.0.1:{free_port()}", lambda: None
    if case.upstream not in ("plain", "bearer", "redirecting"):
        raw = RawUpstream(case.upstream)
        return raw.host_port, raw.close
    fake = getattr(upstreams, case.upstream)
    fake.add(repo, "1", image)
    if case.upstream == "bearer":
        faulty, path = fake, "/token"
    elif case.upstream == "redirecting":
        faulty, path = upstreams.storage, fake.blob_path(repo, image.layers[0].digest)
    else:
        faulty, path = fake, "/v2/" + api_path(repo, case.step, image)
    faulty.add_fault(path, case.fault)
    return fake.host_port, faulty.clear_faults


def pull(url: str) -> tuple[int, bytes, bool, float]:
    """GET a URL; return status, body, whether it came whole, and seconds."""
    client = urllib3.PoolManager(retries=False, timeout=30)
    started = time.monotonic()
    response = client.request("GET", url, preload_content=False)
    try:
        body = response.read()
        whole = len(body) == int(response.headers.get("Content-Length", len(body)))
    except urllib3.exceptions.HTTPError:
        body, whole = b"", False
    return response.status, body, whole, time.monotonic() - started


def cached_urls(root: Path) -> set[str]:
    """Return every image URL the cache root holds a manifest for."""
    return {
        url
        for folder in ("img", "lts")
        for path in (root / folder).iterdir()
        for url in Manifest.from_record(path.read_bytes()).image_urls
    }


def assert_nothing_cached(root: Path, repo: str, image: Image) -> None:
    """Check no manifest of `repo` and no blob of `image` is in the cache."""
    temp = root / ".tmp"
    wait_until(lambda: not any(temp.iterdir()), 10, "temporary files removed")
    assert not [url for url in cached_urls(root) if f"/{repo}" in url]
    assert not {blob.hex for blob in image.blobs} & {
        path.name for path in (root / "blobs").iterdir()
    }
    assert_cache_sound(root)


@pytest.mark.parametrize("name", CASES)
def test_upstream_fault_gives_waiters_a_clear_error_and_caches_nothing(upstreams, name):
    case = CASES[name]
    repo = f"faults/{name}"
    image = make_case_image(name)
    upstream, undo = arrange(upstreams, case, repo, image)
    url = f"{upstreams.server.url}/v2/{upstream}/{api_path(repo, case.step, image)}"

    try:
        with ThreadPoolExecutor(WAITERS) as pool:
            answers = list(pool.map(pull, [url] * WAITERS))
    finally:
        undo()

    for status, body, whole, seconds in answers:
        assert seconds < MAX_WAIT, f"a client waited {seconds:.1f}s"
        if status == 200 and case.expected == 0:
            assert not whole, "a faulty body reached the client whole"
            continue
        assert status == (case.expected or status) and status in (502, 504)
        message = json.loads(body)["errors"][0]["message"]
        assert message.startswith(f"upstream {upstream}")
    assert_nothing_cached(upstreams.cache_root, repo, image)
    if case.upstream in ("plain", "bearer", "redirecting"):
        status, body, whole, _ = pull(url)
        assert status == 200 and whole
        digest = image.digest if case.step != "blob" else image.layers[0].digest
        assert "sha256:" + hashlib.sha256(body).hexdigest() in (digest, image.digest)


@pytest.mark.parametrize(
    ("name", "step", "fault"),
    [
        ("manifest-labelled-text-plain", "tag", WrongContentType()),
        ("blob-labelled-text-html", "blob", WrongContentType(content_type="text/html")),
        # For blobs the pull timeout bounds silence, not the whole transfer:
        # a big layer on a slow link keeps going while bytes arrive.
        ("blob-trickles-past-timeout", "blob", Trickle(chunk_size=8192, interval=0.05)),
    ],
)
def test_upstream_oddity_that_does_not_corrupt_is_served_and_cached(
    upstreams, name, step, fault
):
    repo = f"oddities/{name}"
    image = make_case_image(name)
    fake = upstreams.plain
    fake.add(repo, "1", image)
    path = api_path(repo, step, image)
    fake.add_fault(f"/v2/{path}", fault)

    try:
        status, body, whole, seconds = pull(
            f"{upstreams.server.url}/v2/{fake.host_port}/{path}"
        )
    finally:
        fake.clear_faults()

    assert status == 200 and whole
    root = upstreams.cache_root
    if step == "tag":
        assert body == image.bytes
        assert f"{fake.host_port}/{repo}:1" in cached_urls(root)
    else:
        layer = image.layers[0]
        assert body == layer.data
        wait_until((root / "blobs" / layer.hex).exists, 10, "blob cached")
    assert_cache_sound(root)

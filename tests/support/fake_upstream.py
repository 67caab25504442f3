"""An in-process fake registry for the faults a real upstream cannot make.

It runs a threaded `http.server` in a background thread (the pytest process is
not gevent-patched), serves the manifests and blobs a test adds, counts every
request, and misbehaves on purpose where a test asks it to. Nothing in it
waits on a clock to synchronise: stalls and gates block on events the test
sets, bounded by a timeout so a failing test cannot hang the run.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from support.images import OCI_INDEX, Blob, Image, ImageIndex, sha256_digest

HOLD_TIMEOUT = 30.0
MANIFEST_PATH = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)$")
BLOB_PATH = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>[^/]+)$")
TAGS_PATH = re.compile(r"^/v2/(?P<name>.+)/tags/list$")
REFERRERS_PATH = re.compile(r"^/v2/(?P<name>.+)/referrers/(?P<digest>[^/]+)$")


@dataclass(kw_only=True)
class Fault:
    """Misbehaviour for requests to one path; `times=None` means every one."""

    times: int | None = None
    method: str | None = None  # None: GET and HEAD alike


@dataclass(kw_only=True)
class Status(Fault):
    """Answer with this status (5xx, 429, …) instead of the content."""

    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b'{"errors":[{"code":"UNAVAILABLE","message":"fault"}]}'


@dataclass(kw_only=True)
class DropAfter(Fault):
    """Promise the full Content-Length, send `n_bytes`, then close."""

    n_bytes: int = 0


@dataclass(kw_only=True)
class Disconnect(Fault):
    """Close the connection without sending any response."""


@dataclass(kw_only=True)
class WrongBytes(Fault):
    """Serve other bytes of the same length under the real digest."""


@dataclass(kw_only=True)
class Stall(Fault):
    """Block until `release` is set (or `timeout`), then serve or drop.

    `arrived` is set when a request reaches the stall; with `after_bytes`,
    the headers and that many body bytes go out first.
    """

    release: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Event = field(default_factory=threading.Event)
    timeout: float = HOLD_TIMEOUT
    after_bytes: int | None = None
    then_drop: bool = False


@dataclass(kw_only=True)
class Trickle(Fault):
    """Send the body in `chunk_size` pieces, pausing `interval` s between."""

    chunk_size: int = 1024
    interval: float = 0.05


@dataclass(kw_only=True)
class WrongContentType(Fault):
    """Answer with this Content-Type instead of the real one."""

    content_type: str = "text/plain"


@dataclass(kw_only=True)
class InvalidJson(Fault):
    """Serve a manifest body that is not JSON, with its own digest."""

    body: bytes = b'{"schemaVersion": 2, "config": '


class Gate:
    """Hold matching requests until `release()`, so they overlap for certain."""

    def __init__(self, match: Callable[[str], bool], timeout: float):
        self.match = match
        self.timeout = timeout
        self.arrived = 0
        self._released = threading.Event()
        self._changed = threading.Condition()

    def hold(self) -> None:
        """Count this request as arrived and block until the gate opens."""
        with self._changed:
            self.arrived += 1
            self._changed.notify_all()
        self._released.wait(self.timeout)

    def wait_arrived(self, count: int = 1, timeout: float = 10.0) -> None:
        """Block until `count` requests are held; raise TimeoutError if not."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.arrived >= count, timeout):
                raise TimeoutError(f"{self.arrived} of {count} requests at the gate")

    def release(self) -> None:
        """Let every held and future request through."""
        self._released.set()


@dataclass
class RecordedRequest:
    """One request the fake received; `status` is set once it is answered."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    status: int | None = None


@dataclass
class Reply:
    """The response a route produced, before any fault changes it."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


def error_reply(status: int, code: str, message: str) -> Reply:
    """Return an OCI error response."""
    body = json.dumps({"errors": [{"code": code, "message": message}]})
    return Reply(status, body.encode())


class FakeUpstream:
    """A fake registry on `address` and an ephemeral port; see the module doc.

    `auth` is None, "basic" or "bearer". With "bearer", the token endpoint
    demands `credentials` as basic auth when they are given and hands out
    tokens anonymously otherwise; with "basic" they are required on every
    request.
    """

    def __init__(
        self,
        address: str = "127.0.0.1",
        auth: str | None = None,
        credentials: tuple[str, str] | None = None,
        token_ttl: int = 300,
    ):
        assert auth in (None, "basic", "bearer"), auth
        self.auth = auth
        self.credentials = credentials
        self.token_ttl = token_ttl
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.blobs: dict[tuple[str, str], Blob] = {}
        self.records: list[RecordedRequest] = []
        self.faults: dict[str, list[Fault]] = {}
        self.gates: list[Gate] = []
        self.tokens: dict[str, tuple[str, float]] = {}
        self.redirect_target: FakeUpstream | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._connections: set[socket.socket] = set()
        self._server = _Server((address, 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"fake-upstream-{self.port}",
            daemon=True,
        )
        self._thread.start()

    # Addressing.

    @property
    def address(self) -> str:
        """Return the IP address the fake listens on."""
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """Return the port the fake listens on."""
        port: int = self._server.server_address[1]
        return port

    @property
    def host_port(self) -> str:
        """Return `address:port`, as image references and `?ns=` name it."""
        return f"{self.address}:{self.port}"

    namespace = host_port

    @property
    def url(self) -> str:
        """Return the base URL, without a trailing slash."""
        return f"http://{self.host_port}"

    def registry_config(self, **extra: Any) -> dict[str, Any]:
        """Return the `registries` entry our server needs to reach this fake."""
        entry: dict[str, Any] = {"name": self.host_port, "scheme": "http"}
        if self.credentials:
            user, password = self.credentials
            entry["auth"] = {"user": user, "password": password}
        return {**entry, **extra}

    # Content.

    def add_blob(self, repo: str, blob: Blob) -> None:
        """Serve a blob in a repository."""
        with self._lock:
            self.blobs[(repo, blob.digest)] = blob

    def add_manifest(
        self, repo: str, reference: str, data: bytes, media_type: str
    ) -> str:
        """Serve manifest bytes by digest and, if given, by tag; return the digest."""
        digest = sha256_digest(data)
        with self._lock:
            self.manifests[(repo, digest)] = (data, media_type)
            if reference != digest:
                self.manifests[(repo, reference)] = (data, media_type)
        return digest

    def add_image(self, repo: str, reference: str, image: Image) -> None:
        """Serve an image's blobs and its manifest under `reference`."""
        for blob in image.blobs:
            self.add_blob(repo, blob)
        self.add_manifest(repo, reference, image.manifest_bytes, image.media_type)

    def add_index(self, repo: str, reference: str, index: ImageIndex) -> None:
        """Serve an index under `reference` and each of its images by digest."""
        for image in index.images:
            self.add_image(repo, image.manifest_digest, image)
        self.add_manifest(repo, reference, index.bytes, index.media_type)

    def add(self, repo: str, reference: str, item: Image | ImageIndex) -> None:
        """Serve an image or an index."""
        if isinstance(item, ImageIndex):
            self.add_index(repo, reference, item)
        else:
            self.add_image(repo, reference, item)

    def remove_manifest(self, repo: str, reference: str) -> None:
        """Stop serving a tag or digest."""
        with self._lock:
            self.manifests.pop((repo, reference), None)

    # Behaviour.

    def add_fault(self, path: str, fault: Fault) -> Fault:
        """Misbehave on requests for `path` (no query string) as `fault` says."""
        with self._lock:
            self.faults.setdefault(path, []).append(fault)
        return fault

    def clear_faults(self) -> None:
        """Behave again, and let any stalled request go."""
        with self._lock:
            faults = [fault for group in self.faults.values() for fault in group]
            self.faults.clear()
        for fault in faults:
            if isinstance(fault, Stall):
                fault.release.set()

    def gate(
        self, match: str | Callable[[str], bool] | None = None, timeout: float = 30.0
    ) -> Gate:
        """Hold requests for `match` (a path, a predicate, or None for every
        manifest and blob) until the returned gate is released."""
        if match is None:
            predicate: Callable[[str], bool] = is_content_path
        elif isinstance(match, str):
            predicate = match.__eq__
        else:
            predicate = match
        gate = Gate(predicate, timeout)
        with self._lock:
            self.gates.append(gate)
        return gate

    def redirect_blobs_to(self, target: FakeUpstream) -> None:
        """Answer blob GETs with a 307 to the same path on `target`."""
        self.redirect_target = target

    def revoke_tokens(self) -> None:
        """Forget every issued token, so clients must fetch new ones."""
        with self._lock:
            self.tokens.clear()

    # Observation.

    def requests(
        self, path: str | None = None, method: str | None = None
    ) -> list[RecordedRequest]:
        """Return the requests received so far, optionally for one path/method."""
        with self._lock:
            return [
                record
                for record in self.records
                if (path is None or record.path == path)
                and (method is None or record.method == method)
            ]

    def count(self, path: str, method: str = "GET", status: int | None = None) -> int:
        """Return how many `method` requests for `path` arrived (with `status`)."""
        return sum(
            1
            for record in self.requests(path, method)
            if status is None or record.status == status
        )

    def hits(self) -> dict[tuple[str, str], int]:
        """Return the number of requests per (method, path)."""
        counts: dict[tuple[str, str], int] = {}
        for record in self.requests():
            key = (record.method, record.path)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def wait_for_count(
        self, path: str, count: int, method: str = "GET", timeout: float = 10.0
    ) -> None:
        """Block until `count` requests for `path` arrived; TimeoutError if not."""

        def has_count() -> bool:
            return (
                sum(1 for r in self.records if r.path == path and r.method == method)
                >= count
            )

        with self._changed:
            if not self._changed.wait_for(has_count, timeout):
                raise TimeoutError(f"fewer than {count} {method} {path}")

    def authorization_headers(self) -> list[str]:
        """Return every Authorization header received, in order."""
        return [
            record.headers["authorization"]
            for record in self.requests()
            if "authorization" in record.headers
        ]

    @staticmethod
    def manifest_path(repo: str, reference: str) -> str:
        """Return the API path of a manifest."""
        return f"/v2/{repo}/manifests/{reference}"

    @staticmethod
    def blob_path(repo: str, digest: str) -> str:
        """Return the API path of a blob."""
        return f"/v2/{repo}/blobs/{digest}"

    # Lifecycle.

    def close(self) -> None:
        """Stop serving, release held requests and close open connections."""
        with self._lock:
            gates = list(self.gates)
            connections = list(self._connections)
        for gate in gates:
            gate.release()
        self.clear_faults()
        self._server.shutdown()
        self._server.server_close()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5.0)

    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Request handling, called from the handler threads.

    def record(
        self, method: str, target: str, headers: dict[str, str]
    ) -> RecordedRequest:
        """Store and return a record of an arriving request."""
        parts = urlsplit(target)
        record = RecordedRequest(method, parts.path, parts.query, headers)
        with self._changed:
            self.records.append(record)
            self._changed.notify_all()
        return record

    def take_fault(self, path: str, method: str, status: int) -> Fault | None:
        """Return the fault for this request, using up one of its `times`.

        An auth challenge is never bent, so a fault hits the authorised
        request; on other errors only a `Status` fault applies.
        """
        if status == 401:
            return None
        with self._lock:
            for fault in self.faults.get(path, []):
                if fault.method not in (None, method):
                    continue
                if status >= 400 and not isinstance(fault, Status):
                    continue
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults[path].remove(fault)
                return fault
        return None

    def hold_at_gates(self, path: str) -> None:
        """Block on every gate that matches the path."""
        with self._lock:
            gates = [gate for gate in self.gates if gate.match(path)]
        for gate in gates:
            gate.hold()

    def challenge(self, record: RecordedRequest, name: str | None) -> Reply | None:
        """Return a 401 when the request lacks valid credentials, else None."""
        header = record.headers.get("authorization", "")
        if self.auth == "basic":
            if header == basic_header(self.credentials):
                return None
            reply = error_reply(401, "UNAUTHORIZED", "basic credentials required")
            reply.headers["WWW-Authenticate"] = 'Basic realm="fake"'
            return reply
        if self.auth == "bearer":
            if self.is_token_valid(header.removeprefix("Bearer "), name):
                return None
            scope = f',scope="repository:{name}:pull"' if name else ""
            reply = error_reply(401, "UNAUTHORIZED", "bearer token required")
            reply.headers["WWW-Authenticate"] = (
                f'Bearer realm="{self.url}/token",service="fake"{scope}'
            )
            return reply
        return None

    def is_token_valid(self, token: str, name: str | None) -> bool:
        """Tell whether a token was issued, is unexpired and covers `name`."""
        with self._lock:
            scope, expires = self.tokens.get(token, ("", 0.0))
        if time.monotonic() >= expires:
            return False
        return name is None or scope.startswith(f"repository:{name}:")

    def issue_token(self, record: RecordedRequest) -> Reply:
        """Answer the token endpoint: check credentials, hand out a token."""
        if self.credentials:
            if record.headers.get("authorization") != basic_header(self.credentials):
                return error_reply(401, "UNAUTHORIZED", "bad token credentials")
        scope = parse_qs(record.query).get("scope", [""])[0]
        with self._lock:
            token = f"token-{len(self.tokens) + 1}-{time.monotonic_ns()}"
            self.tokens[token] = (scope, time.monotonic() + self.token_ttl)
        body = {"token": token, "access_token": token, "expires_in": self.token_ttl}
        return Reply(200, json.dumps(body).encode())

    def route(self, record: RecordedRequest) -> Reply:
        """Return the normal answer to a request."""
        path = record.path
        if path == "/token":
            return self.issue_token(record)
        if path not in ("/v2", "/v2/") and not path.startswith("/v2/"):
            return error_reply(404, "NOT_FOUND", path)
        name = content_name(path)
        denied = self.challenge(record, name)
        if denied:
            return denied
        if record.method not in ("GET", "HEAD"):
            return error_reply(405, "UNSUPPORTED", "the fake is pull-only")
        if path in ("/v2", "/v2/"):
            return Reply(200, b"{}")
        return self.route_content(record)

    def route_content(self, record: RecordedRequest) -> Reply:
        """Answer for manifests, blobs, tags and referrers."""
        path = record.path
        if match := MANIFEST_PATH.match(path):
            return self.manifest_reply(match["name"], match["reference"])
        if match := BLOB_PATH.match(path):
            return self.blob_reply(record, match["name"], match["digest"])
        if match := TAGS_PATH.match(path):
            return self.tags_reply(match["name"], record.query)
        if match := REFERRERS_PATH.match(path):
            return self.referrers_reply(match["name"], match["digest"], record.query)
        return error_reply(404, "NOT_FOUND", path)

    def manifest_reply(self, name: str, reference: str) -> Reply:
        """Return a manifest with its media type and digest."""
        with self._lock:
            found = self.manifests.get((name, reference))
        if found is None:
            return error_reply(404, "MANIFEST_UNKNOWN", f"{name}:{reference}")
        data, media_type = found
        headers = {"Docker-Content-Digest": sha256_digest(data)}
        return Reply(200, data, headers, media_type)

    def blob_reply(self, record: RecordedRequest, name: str, digest: str) -> Reply:
        """Return a blob, a redirect to the blob host, or a 206 for a Range."""
        with self._lock:
            blob = self.blobs.get((name, digest))
        if blob is None:
            return error_reply(404, "BLOB_UNKNOWN", digest)
        target = self.redirect_target
        if target is not None and record.method == "GET":
            target.add_blob(name, blob)
            location = f"{target.url}{record.path}?signature=fake"
            return Reply(307, b"", {"Location": location}, "text/plain")
        headers = {"Docker-Content-Digest": blob.digest}
        reply = Reply(200, blob.data, headers, "application/octet-stream")
        return apply_range(reply, record.headers.get("range"))

    def tags_reply(self, name: str, query: str) -> Reply:
        """Return the tag list of a repository, paged by `n` and `last`."""
        with self._lock:
            tags = sorted(
                reference
                for repo, reference in self.manifests
                if repo == name and not reference.startswith("sha256:")
            )
        if not tags:
            return error_reply(404, "NAME_UNKNOWN", name)
        params = parse_qs(query)
        last = params.get("last", [""])[0]
        tags = [tag for tag in tags if tag > last]
        headers = {}
        if "n" in params:
            count = int(params["n"][0])
            if len(tags) > count:
                tags = tags[:count]
                link = f"/v2/{name}/tags/list?n={count}&last={tags[-1]}"
                headers["Link"] = f'<{link}>; rel="next"'
        body = json.dumps({"name": name, "tags": tags}).encode()
        return Reply(200, body, headers)

    def referrers_reply(self, name: str, digest: str, query: str) -> Reply:
        """Return an OCI index of the manifests whose subject is `digest`."""
        wanted_type = parse_qs(query).get("artifactType", [None])[0]
        with self._lock:
            stored = [
                (data, media_type)
                for (repo, reference), (data, media_type) in self.manifests.items()
                if repo == name and reference.startswith("sha256:")
            ]
        entries = []
        for data, media_type in stored:
            entry = referrer_entry(data, media_type, digest)
            if entry and wanted_type in (None, entry.get("artifactType")):
                entries.append(entry)
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        return Reply(200, json.dumps(body).encode(), {}, OCI_INDEX)


def is_content_path(path: str) -> bool:
    """Tell whether a path names a manifest or a blob."""
    return bool(MANIFEST_PATH.match(path) or BLOB_PATH.match(path))


def content_name(path: str) -> str | None:
    """Return the repository name a /v2/ path is about, if any."""
    for pattern in (MANIFEST_PATH, BLOB_PATH, TAGS_PATH, REFERRERS_PATH):
        if match := pattern.match(path):
            return match["name"]
    return None


def basic_header(credentials: tuple[str, str] | None) -> str | None:
    """Return the Authorization header value for basic credentials."""
    if credentials is None:
        return None
    encoded = base64.b64encode(":".join(credentials).encode()).decode()
    return f"Basic {encoded}"


def apply_range(reply: Reply, header: str | None) -> Reply:
    """Cut a 200 reply down to a `bytes=a-b` range, as a 206 (or 416)."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header or "")
    if not match or reply.status != 200:
        return reply
    size = len(reply.body)
    first, last = match.groups()
    if not first:
        start, end = max(size - int(last or 0), 0), size - 1
    else:
        start, end = int(first), min(int(last) if last else size - 1, size - 1)
    if start >= size or start > end:
        headers = {**reply.headers, "Content-Range": f"bytes */{size}"}
        return Reply(416, b"", headers)
    headers = {**reply.headers, "Content-Range": f"bytes {start}-{end}/{size}"}
    return Reply(206, reply.body[start : end + 1], headers, reply.content_type)


def referrer_entry(data: bytes, media_type: str, subject: str) -> dict[str, Any] | None:
    """Return the referrers descriptor of a manifest whose subject is `subject`."""
    try:
        manifest = json.loads(data)
    except ValueError:
        return None
    if not isinstance(manifest, dict):
        return None
    if (manifest.get("subject") or {}).get("digest") != subject:
        return None
    entry: dict[str, Any] = {
        "mediaType": media_type,
        "digest": sha256_digest(data),
        "size": len(data),
    }
    artifact_type = manifest.get("artifactType") or manifest["config"]["mediaType"]
    entry["artifactType"] = artifact_type
    if manifest.get("annotations"):
        entry["annotations"] = manifest["annotations"]
    return entry


class _Server(ThreadingHTTPServer):
    """The HTTP server; daemon threads so a stuck handler never blocks exit."""

    daemon_threads = True
    block_on_close = False
    fake: FakeUpstream


class _Handler(BaseHTTPRequestHandler):
    """Turn each request into a `Reply`, then let the fault (if any) bend it."""

    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 60

    def setup(self) -> None:
        super().setup()
        with self.server.fake._lock:
            self.server.fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.fake._lock:
            self.server.fake._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output quiet."""

    def handle_request(self) -> None:
        """Record, hold at gates, route, then answer through the fault."""
        fake = self.server.fake
        headers = {key.lower(): value for key, value in self.headers.items()}
        record = fake.record(self.command, self.path, headers)
        self.discard_body()

        fake.hold_at_gates(record.path)
        reply = fake.route(record)
        fault = fake.take_fault(record.path, self.command, reply.status)
        if fault is None:
            self.answer(record, reply)
        else:
            self.answer_with_fault(record, reply, fault)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = handle_request

    def discard_body(self) -> None:
        """Read and drop a request body so the connection stays usable."""
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    def answer_with_fault(
        self, record: RecordedRequest, reply: Reply, fault: Fault
    ) -> None:
        """Send `reply` bent by `fault`."""
        if isinstance(fault, Status):
            reply = Reply(fault.status, fault.body, dict(fault.headers))
        elif isinstance(fault, WrongBytes):
            reply.body = bytes(byte ^ 0xFF for byte in reply.body)
        elif isinstance(fault, WrongContentType):
            reply.content_type = fault.content_type
        elif isinstance(fault, InvalidJson):
            reply.body = fault.body
            reply.headers["Docker-Content-Digest"] = sha256_digest(fault.body)
        elif isinstance(fault, Disconnect):
            record.status = 0
            self.drop()
            return
        elif isinstance(fault, DropAfter):
            self.answer(record, reply, limit=fault.n_bytes)
            self.drop()
            return
        elif isinstance(fault, Stall):
            self.stall(record, reply, fault)
            return
        elif isinstance(fault, Trickle):
            self.answer(record, reply, trickle=fault)
            return
        self.answer(record, reply)

    def stall(self, record: RecordedRequest, reply: Reply, fault: Stall) -> None:
        """Hold the answer (or the rest of it) until the stall is released."""
        if fault.after_bytes is not None:
            self.answer(record, reply, limit=fault.after_bytes)
        fault.arrived.set()
        fault.release.wait(fault.timeout)
        if fault.then_drop:
            self.drop()
        elif fault.after_bytes is not None and self.command != "HEAD":
            self.write_body(reply.body[fault.after_bytes :], None)
        elif fault.after_bytes is None:
            self.answer(record, reply)

    def answer(
        self,
        record: RecordedRequest,
        reply: Reply,
        limit: int | None = None,
        trickle: Trickle | None = None,
    ) -> None:
        """Send status, headers and (up to `limit` bytes of) the body."""
        record.status = reply.status
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        body = reply.body if limit is None else reply.body[:limit]
        self.write_body(body, trickle)

    def write_body(self, body: bytes, trickle: Trickle | None) -> None:
        """Write the body, in slow pieces when trickling."""
        if trickle is None:
            self.wfile.write(body)
            return
        for offset in range(0, len(body), trickle.chunk_size):
            self.wfile.write(body[offset : offset + trickle.chunk_size])
            self.wfile.flush()
            time.sleep(trickle.interval)

    def drop(self) -> None:
        """Close the connection at once, mid-response if need be."""
        self.close_connection = True
        self.wfile.flush()
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

"""The registry API routes: /v2/, manifests and blobs (SPEC §3)."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import bottle

from ociregistry.cache import CachedBlob, PullThroughCache
from ociregistry.downloads import CHUNK, Download, StreamAborted
from ociregistry.errors import (
    BadRequest,
    NameInvalid,
    NameUnknown,
    RangeInvalid,
    RegistryError,
    Unsupported,
    UpstreamTimeout,
)
from ociregistry.manifest import Manifest
from ociregistry.metrics import Metrics
from ociregistry.reference import (
    Repository,
    UpstreamPolicy,
    check_digest,
    check_reference,
)

log = logging.getLogger(__name__)

JSON = "application/json"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)\Z")
Handler = Callable[..., Any]


@dataclass(frozen=True)
class ApiPath:
    """What a /v2/ path asks for: kind (manifests, blobs, ...), name, argument."""

    kind: str
    name: str = ""
    argument: str = ""


def parse_api_path(path: str) -> ApiPath:
    """Split the part of a path after /v2/ into kind, repository and argument."""
    if path == "_catalog":
        return ApiPath("catalog")
    segments = path.split("/")
    if "." in segments or ".." in segments:
        return ApiPath("dot-segments")
    if "uploads" in segments[-3:] and "blobs" in segments[-4:]:
        return ApiPath("uploads")
    if len(segments) >= 3 and segments[-2:] == ["tags", "list"]:
        return ApiPath("tags", "/".join(segments[:-2]))
    if len(segments) >= 3 and segments[-2] in ("manifests", "blobs", "referrers"):
        return ApiPath(segments[-2], "/".join(segments[:-2]), segments[-1])
    return ApiPath("unknown")


def error_response(error: RegistryError) -> bottle.HTTPResponse:
    """Render a domain error as an OCI error response."""
    response = bottle.HTTPResponse(body=error.body(), status=error.status)
    response.set_header("Content-Type", JSON)
    if error.status == 401:
        response.set_header("WWW-Authenticate", 'Bearer realm="ociregistry"')
    return response


def oci_errors_plugin(metrics: Metrics) -> Callable[[Handler], Handler]:
    """Return a Bottle plugin: domain errors become OCI bodies, others a 500."""

    def apply(callback: Handler) -> Handler:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return call_handler(callback, *args, **kwargs)
            except bottle.HTTPResponse:
                raise
            except RegistryError as error:
                metrics.api_error(error.status)
                log_failure(error)
                return error_response(error)
            except Exception:
                metrics.api_error(500)
                log.exception(
                    "request failed: %s %s", bottle.request.method, bottle.request.path
                )
                return error_response(RegistryError("internal server error"))

        return wrapper

    return apply


def call_handler(callback: Handler, *args: Any, **kwargs: Any) -> Any:
    """Call a route handler; input that is not UTF-8 is the client's error."""
    try:
        return callback(*args, **kwargs)
    except UnicodeDecodeError:
        # Bottle decodes a request header as UTF-8 only when it is read.
        raise BadRequest("request header is not valid UTF-8") from None


def log_failure(error: RegistryError) -> None:
    """Log a failed request: server-side failures as errors, the rest as info."""
    if error.status >= 500:
        log.error(
            "request failed: %s %s: %s",
            bottle.request.method,
            bottle.request.path,
            error.message,
        )
    else:
        log.info(
            "request refused: %s %s: %s",
            bottle.request.method,
            bottle.request.path,
            error.message,
        )


class RegistryApi:
    """Answer the read side of the OCI distribution API from the cache."""

    def __init__(
        self, cache: PullThroughCache, policy: UpstreamPolicy, metrics: Metrics
    ) -> None:
        self.cache = cache
        self.policy = policy
        self.metrics = metrics
        self.extra: dict[str, Callable[[ApiPath], Any]] = {}

    def install(self, app: bottle.Bottle) -> None:
        """Add the /v2 routes to an app."""
        app.route("/v2/", ["GET", "HEAD"], self.version_check)
        app.route("/v2", ["GET", "HEAD"], self.version_check)
        app.route("/v2/auth", ["GET", "HEAD"], self.dummy_token)
        app.route("/v2/<path:path>", ["GET", "HEAD"], self.read)
        app.route(
            "/v2/<path:path>", ["POST", "PUT", "PATCH", "DELETE"], self.refuse_write
        )

    def version_check(self) -> bottle.HTTPResponse:
        """Answer the API version check."""
        self.metrics.endpoint_hit("v2")
        return bottle.HTTPResponse(b"{}", 200, {"Content-Type": JSON})

    def dummy_token(self) -> bottle.HTTPResponse:
        """Give clients that insist on a token one; it is never checked."""
        body = json.dumps({"token": "ociregistry", "access_token": "ociregistry"})
        return bottle.HTTPResponse(body, 200, {"Content-Type": JSON})

    def refuse_write(self, path: str) -> None:
        """Refuse pushes, deletes and uploads."""
        raise Unsupported("this registry is pull-only")

    def read(self, path: str) -> Any:
        """Dispatch a GET or HEAD under /v2/ by what the path asks for."""
        target = parse_api_path(path)
        if target.kind == "manifests":
            return self.get_manifest(target)
        if target.kind == "blobs":
            return self.get_blob(target)
        if target.kind == "uploads":
            raise Unsupported("this registry is pull-only")
        if target.kind == "dot-segments":
            raise NameInvalid("path segments . and .. are not allowed")
        if target.kind in self.extra:
            return self.extra[target.kind](target)
        raise NameUnknown(f"unknown API path: /v2/{path[:200]}")

    def repository(self, name: str) -> Repository:
        """Resolve the repository and upstream a request names."""
        request = bottle.request
        header = request.headers.get("X-Registry", "")
        namespace = request.query.get("ns", "")
        if namespace and not header:
            bottle.response.set_header("OCI-Namespace", namespace)
        return self.policy.resolve(name, header, namespace)

    def get_manifest(self, target: ApiPath) -> bottle.HTTPResponse:
        """Answer GET/HEAD of a manifest by tag or digest."""
        self.metrics.endpoint_hit("manifests")
        self.metrics.manifest_pull()
        repo = self.repository(target.name)
        reference = check_reference(target.argument)
        manifest = self.cache.manifest(repo, reference)
        return manifest_response(manifest)

    def get_blob(self, target: ApiPath) -> bottle.HTTPResponse:
        """Answer GET/HEAD of a blob, with Range support."""
        self.metrics.endpoint_hit("blobs")
        self.metrics.blob_pull()
        repo = self.repository(target.name)
        hex_digest = check_digest(target.argument)
        blob = self.cache.blob(repo, hex_digest)
        try:
            return blob_response(blob, hex_digest, self.cache.settings.pull_timeout)
        except BaseException:
            if isinstance(blob, CachedBlob):
                os.close(blob.fd)
            raise


def manifest_response(manifest: Manifest) -> bottle.HTTPResponse:
    """Build the response for a manifest: its exact bytes and media type."""
    response = bottle.HTTPResponse(manifest.data, 200)
    response.set_header("Content-Type", manifest.media_type)
    response.set_header("Docker-Content-Digest", manifest.digest)
    response.set_header("Content-Length", str(len(manifest.data)))
    _copy_namespace_header(response)
    return response


def blob_response(
    blob: CachedBlob | Download, hex_digest: str, timeout: float
) -> bottle.HTTPResponse:
    """Build the response for a blob, whole or a byte range of it."""
    size = blob.size
    start, end = 0, size
    status = 200
    header = bottle.request.headers.get("Range", "")
    if header and size >= 0:
        try:
            start, end = parse_range(header, size)
        except RangeInvalid as error:
            refusal = error_response(error)
            refusal.set_header("Content-Range", f"bytes */{size}")
            raise refusal from None
        status = 206
    is_head = bottle.request.method == "HEAD"
    if isinstance(blob, CachedBlob):
        body: Any = b"" if is_head else FileBody(blob.fd, start, end)
        if is_head:
            os.close(blob.fd)
    else:
        body = b"" if is_head else download_body(blob, start, end, timeout)
    response = bottle.HTTPResponse(body, status)
    response.set_header("Content-Type", "application/octet-stream")
    response.set_header("Docker-Content-Digest", f"sha256:{hex_digest}")
    response.set_header("Accept-Ranges", "bytes")
    if size >= 0:
        response.set_header("Content-Length", str(end - start))
    if status == 206:
        response.set_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
    _copy_namespace_header(response)
    return response


def download_body(
    download: Download, start: int, end: int, timeout: float
) -> Iterator[bytes]:
    """Yield a download's bytes; fail with an OCI error if none were sent yet.

    Bottle pulls the first chunk before it sends the status line, and turns
    an HTTPResponse raised then into the response: so a download that fails
    before its first byte still gets a proper 502 or 504.
    """
    chunks = download.read(start, end, timeout)
    try:
        first = next(chunks)
    except StopIteration:
        return
    except StreamAborted as aborted:
        error = download.error or UpstreamTimeout(
            download.repo.upstream, str(aborted.strerror)
        )
        raise error_response(error) from None
    yield first
    yield from chunks


def _copy_namespace_header(response: bottle.HTTPResponse) -> None:
    namespace = bottle.response.get_header("OCI-Namespace")
    if namespace:
        response.set_header("OCI-Namespace", namespace)


def parse_range(header: str, size: int) -> tuple[int, int]:
    """Return [start, end) for a single `bytes=` range; raise RangeInvalid."""
    match = _RANGE.match(header.strip())
    if match is None or match.groups() == ("", ""):
        raise RangeInvalid(f"unsupported range: {header[:100]!r}")
    first, last = match.groups()
    if first == "":
        start, end = max(size - int(last), 0), size
    else:
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    if start >= size or start >= end:
        error = RangeInvalid(f"range {header[:100]!r} is outside 0-{size}")
        raise error
    return start, end


class FileBody:
    """A response body of a file's bytes [start, end); closes the file."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        self.fd = fd
        self.start = start
        self.end = end

    def __iter__(self) -> Iterator[bytes]:
        position = self.start
        while position < self.end:
            chunk = os.pread(self.fd, min(CHUNK, self.end - position), position)
            if not chunk:
                break
            position += len(chunk)
            yield chunk

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

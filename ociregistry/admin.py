"""The administration endpoints under /cmd (SPEC §5): list, prune, stop.

Answers are plain text, one item per line, columns separated by spaces;
a bad parameter is a 400 whose body says which and why.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from functools import wraps
from typing import Any

import bottle
import gevent

from ociregistry.access import AdminAccess
from ociregistry.configfile import parse_duration
from ociregistry.errors import BadRequest, RegistryError
from ociregistry.listing import manifest_rows
from ociregistry.manifest import Manifest
from ociregistry.prune import (
    NO_LIMIT,
    Pruner,
    Selection,
    age_selection,
    blob_digests,
    matches_patterns,
    referenced_blobs,
)

log = logging.getLogger(__name__)

TEXT = "text/plain; charset=utf-8"
DEFAULT_COUNT = 50
PRUNE_TYPES = ("accessed", "created", "pattern")
Handler = Callable[..., bottle.HTTPResponse]


def text_response(lines: Iterable[str], status: int = 200) -> bottle.HTTPResponse:
    """Return lines as a plain-text body, each ended by a newline."""
    body = "".join(line + "\n" for line in lines)
    return bottle.HTTPResponse(body, status, {"Content-Type": TEXT})


def plain_errors(handler: Handler) -> Handler:
    """Answer a handler's domain errors as plain text, not OCI JSON."""

    @wraps(handler)
    def wrapper(*args: Any, **kwargs: Any) -> bottle.HTTPResponse:
        try:
            return handler(*args, **kwargs)
        except RegistryError as error:
            log.info(
                "admin request refused: %s %s: %s",
                bottle.request.method,
                bottle.request.path,
                error.message,
            )
            response = text_response([error.message], error.status)
            if error.status == 401:
                response.set_header("WWW-Authenticate", 'Bearer realm="ociregistry"')
            return response

    return wrapper


class AdminApi:
    """The /cmd endpoints over one cache root's pruner."""

    def __init__(
        self,
        pruner: Pruner,
        request_stop: Callable[[], None],
        access: AdminAccess | None = None,
    ) -> None:
        self.pruner = pruner
        self.store = pruner.store
        self.request_stop = request_stop
        self.access = access

    def install(self, app: bottle.Bottle) -> None:
        """Add the /cmd routes to an app."""
        routes: list[tuple[str, list[str], Handler]] = [
            ("/cmd/prune", ["DELETE"], self.prune),
            ("/cmd/image/list", ["GET"], self.image_list),
            ("/cmd/manifest/list", ["GET"], self.manifest_list),
            ("/cmd/blob/list", ["GET"], self.blob_list),
            ("/cmd/stop", ["GET", "POST", "PUT"], self.stop),
        ]
        for path, methods, handler in routes:
            app.route(path, methods, plain_errors(self._guarded(handler)))

    def _guarded(self, handler: Handler) -> Handler:
        @wraps(handler)
        def guarded() -> bottle.HTTPResponse:
            self.authorize(bottle.request)
            return handler()

        return guarded

    def authorize(self, request: bottle.BaseRequest) -> None:
        """Raise Denied or Unauthorized when the caller may not use /cmd."""
        if self.access is not None:
            self.access.check(request.environ)

    def prune(self) -> bottle.HTTPResponse:
        """DELETE /cmd/prune?type=&dur=&expr=&count=&dryRun=: prune now."""
        query = bottle.request.query
        selection = prune_selection(
            query.get("type", ""),
            query.get("dur", ""),
            query.get("expr", ""),
            parse_count(query.get("count")),
        )
        dry_run = parse_bool("dryRun", query.get("dryRun"))
        result = self.pruner.prune(selection, dry_run)
        log.info("prune requested: %s", result.summary())
        return text_response(result.lines())

    def image_list(self) -> bottle.HTTPResponse:
        """GET /cmd/image/list?pattern=&digest=&count=: images and their blobs."""
        query = bottle.request.query
        patterns = parse_patterns(query.get("pattern", ""))
        digest = query.get("digest", "")
        images = [
            m
            for m in self.store.manifests()
            if not m.is_index
            and (not patterns or matches_patterns(m, patterns))
            and (not digest or any(digest in d for d in blob_digests(m)))
        ]
        images.sort(key=lambda m: m.image_urls[0])
        return text_response(image_lines(limit(images, query.get("count"))))

    def manifest_list(self) -> bottle.HTTPResponse:
        """GET /cmd/manifest/list?pattern=&count=: the cached manifests."""
        query = bottle.request.query
        patterns = parse_patterns(query.get("pattern", ""))
        rows = manifest_rows(self.store.manifests(), patterns)
        return text_response(limit(rows, query.get("count")))

    def blob_list(self) -> bottle.HTTPResponse:
        """GET /cmd/blob/list?substr=&count=: blobs, sizes and reference counts."""
        query = bottle.request.query
        substring = query.get("substr", "").removeprefix("sha256:")
        references = referenced_blobs(self.store.manifests())
        names = sorted(n for n in self.store.blob_names() if substring in n)
        lines = [
            f"sha256:{name} {self._blob_size(name)} {references.get(name, 0)}"
            for name in limit(names, query.get("count"))
        ]
        return text_response(lines)

    def _blob_size(self, hex_digest: str) -> int:
        try:
            return os.stat(self.store.blob_path(hex_digest)).st_size
        except FileNotFoundError:
            return 0

    def stop(self) -> bottle.HTTPResponse:
        """GET /cmd/stop: stop the server gracefully, after this answer."""
        log.info("stop requested through /cmd/stop")
        gevent.spawn_later(0.05, self.request_stop)
        return text_response(["stopping"])


def image_lines(images: Iterable[Manifest]) -> list[str]:
    """Return a line per image URL, each followed by `- <digest>` per blob."""
    lines = []
    for image in images:
        try:
            blobs = [d.digest for d in image.blobs()]
        except RegistryError:
            blobs = []
        for url in image.image_urls:
            lines.append(f"{url} {image.digest} {image.created} {image.pulled}")
            lines.extend(f"- {digest}" for digest in blobs)
    return lines


def prune_selection(kind: str, duration: str, expression: str, count: int) -> Selection:
    """Return the selection of a /cmd/prune request; raise BadRequest."""
    if kind not in PRUNE_TYPES:
        raise BadRequest(
            f"type: expected one of {', '.join(PRUNE_TYPES)}, got {kind!r}"
        )
    if kind == "pattern":
        patterns = parse_patterns(expression)
        if not patterns:
            raise BadRequest("expr: required with type=pattern (e.g. expr=calico)")
        return Selection(patterns=tuple(patterns), count=count)
    seconds = parse_age(duration)
    return age_selection(kind, seconds, count)


def parse_age(duration: str) -> float:
    """Read `dur` (30d, 12h, 90m); raise BadRequest unless positive."""
    if not duration:
        raise BadRequest("dur: required with type=accessed or created (e.g. 30d)")
    try:
        seconds = parse_duration(duration)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise BadRequest(
            f"dur: expected a duration such as 30d or 12h, got {duration!r}"
        )
    return seconds


def parse_count(value: str | None) -> int:
    """Read `count`: default 50, -1 for no limit; raise BadRequest."""
    if value is None or value == "":
        return DEFAULT_COUNT
    if not re.fullmatch(r"-1|\d+", value):
        raise BadRequest(f"count: expected a number, or -1 for no limit, got {value!r}")
    return int(value)


def limit(items: list[Any], value: str | None) -> list[Any]:
    """Return the first `count` items (all with -1)."""
    count = parse_count(value)
    return items if count == NO_LIMIT else items[:count]


def parse_bool(name: str, value: str | None) -> bool:
    """Read a true/false parameter (default false); raise BadRequest."""
    if value is None or value == "":
        return False
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise BadRequest(f"{name}: expected true or false, got {value!r}")


def parse_patterns(value: str) -> list[str]:
    """Split comma-separated regular expressions; raise BadRequest if one is bad."""
    patterns = [part.strip() for part in value.split(",") if part.strip()]
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise BadRequest(f"bad regular expression {pattern!r}: {error}") from None
    return patterns

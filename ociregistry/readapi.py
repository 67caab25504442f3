"""The rest of the read API: tags/list, referrers and _catalog (SPEC §8).

Tag lists and referrers come from the upstream when it answers, and are
built from the cache root when it does not (or in --air-gapped mode). The
catalog lists what is cached. Lists page with `n` and `last` as the
distribution spec says: lexical order, the items after `last`, at most `n`
of them, and a `Link: <…>; rel="next"` header when more follow.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

import bottle
import gevent
import urllib3
from gevent.pool import Pool

from ociregistry.cache import PullThroughCache
from ociregistry.errors import (
    BadRequest,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    UpstreamError,
    UpstreamTimeout,
)
from ociregistry.manifest import OCI_INDEX, Manifest, parse_json
from ociregistry.reference import Repository, check_digest
from ociregistry.routes import JSON, ApiPath, RegistryApi
from ociregistry.upstream import Upstream

log = logging.getLogger(__name__)

TAG_LIST_TTL = 30.0  # seconds an upstream's tag list is reused
MAX_TAG_LISTS = 1000  # tag lists held in memory
MAX_PAGES = 100  # upstream pages followed for one list
MAX_REFERRERS_CACHED = 100  # referring manifests pulled per request
REFERRER_PULLS = 4  # referring manifests pulled at once
FILTERS_APPLIED = "OCI-Filters-Applied"
# Answers of an upstream without the referrers API (the spec says 404).
NO_REFERRERS_API = frozenset({400, 404, 405, 406, 501})
_NEXT_LINK = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')
_COUNT = re.compile(r"[0-9]{1,9}\Z")


def parse_paging(query: Mapping[str, str]) -> tuple[int | None, str]:
    """Return the `n` (None: no limit) and `last` query parameters."""
    count = query.get("n", "")
    if count and not _COUNT.match(count):
        raise BadRequest(f"n must be a non-negative integer, got {count[:20]!r}")
    return (int(count) if count else None), query.get("last", "")


def page_of(items: list[str], count: int | None, last: str) -> tuple[list[str], bool]:
    """Return the sorted items after `last`, at most `count`, and if more follow."""
    after = items[bisect.bisect_right(items, last) :] if last else items
    if count is None:
        return after, False
    return after[:count], 0 < count < len(after)


def next_link(path: str, count: int, last: str, extra: Mapping[str, str]) -> str:
    """Return the Link header value that points at the following page."""
    query = urlencode({**extra, "n": count, "last": last})
    return f'<{path}?{query}>; rel="next"'


def respond_json(document: object, media_type: str = JSON) -> bytes:
    """Set the content type of the current response and return the body."""
    bottle.response.content_type = media_type
    return json.dumps(document).encode()


def repository_of(image_url: str) -> str:
    """Return the repository URL of an image URL (host/name)."""
    if "@" in image_url:
        return image_url.split("@", 1)[0]
    head, colon, tag = image_url.rpartition(":")
    return head if colon and "/" not in tag else image_url


def referrer_descriptor(manifest: Manifest) -> dict[str, Any]:
    """Return the descriptor a referrers list gives for a cached manifest."""
    parsed = manifest.parsed()
    entry: dict[str, Any] = {
        "mediaType": manifest.media_type,
        "digest": manifest.digest,
        "size": len(manifest.data),
    }
    config = parsed.get("config")
    artifact_type = parsed.get("artifactType")
    if not artifact_type and isinstance(config, dict):
        artifact_type = config.get("mediaType")
    if isinstance(artifact_type, str) and artifact_type:
        entry["artifactType"] = artifact_type
    annotations = parsed.get("annotations")
    if isinstance(annotations, dict) and annotations:
        entry["annotations"] = annotations
    return entry


class ReadApi:
    """Answer tags/list, referrers and _catalog; plugs into `RegistryApi.extra`."""

    def __init__(self, api: RegistryApi, cache: PullThroughCache) -> None:
        self.api = api
        self.cache = cache
        self.settings = cache.settings
        self.store = cache.store
        self.client = cache.client
        self._tag_lists: dict[str, tuple[float, list[str]]] = {}
        self._subjects: dict[str, str] = {}  # manifest digest -> subject digest

    def install(self) -> None:
        """Plug the handlers into the registry API's dispatch."""
        self.api.extra["tags"] = self.get_tags
        self.api.extra["referrers"] = self.get_referrers
        self.api.extra["catalog"] = self.get_catalog

    # -- handlers --------------------------------------------------------------

    def get_tags(self, target: ApiPath) -> bytes:
        """Answer GET /v2/<name>/tags/list, paged."""
        self.cache.metrics.endpoint_hit("tags")
        count, last = parse_paging(bottle.request.query)
        repo = self.api.repository(target.name)

        tags, has_more = page_of(self.tags_of(repo), count, last)

        if has_more and count is not None:
            path = f"/v2/{target.name}/tags/list"
            link = next_link(path, count, tags[-1], self._routing_query())
            bottle.response.set_header("Link", link)
        return respond_json({"name": target.name, "tags": tags})

    def get_referrers(self, target: ApiPath) -> bytes:
        """Answer GET /v2/<name>/referrers/<digest>, filtered by artifactType."""
        self.cache.metrics.endpoint_hit("referrers")
        check_digest(target.argument)
        repo = self.api.repository(target.name)
        # A `+` typed unencoded (as in `…sbom+json`) arrives as a space, and
        # media types never hold spaces.
        wanted = bottle.request.query.get("artifactType", "").replace(" ", "+")

        entries = self.referrers_of(repo, target.argument)

        if wanted:
            entries = [e for e in entries if e.get("artifactType") == wanted]
            bottle.response.set_header(FILTERS_APPLIED, "artifactType")
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        return respond_json(index, OCI_INDEX)

    def get_catalog(self, target: ApiPath) -> bytes:
        """Answer GET /v2/_catalog: the cached repositories, paged."""
        self.cache.metrics.endpoint_hit("catalog")
        count, last = parse_paging(bottle.request.query)

        names, has_more = page_of(self.cached_repositories(), count, last)

        if has_more and count is not None:
            link = next_link("/v2/_catalog", count, names[-1], {})
            bottle.response.set_header("Link", link)
        return respond_json({"repositories": names})

    def _routing_query(self) -> dict[str, str]:
        """Return the `ns` parameter a following page must carry too."""
        namespace = bottle.request.query.get("ns", "")
        return {"ns": namespace} if namespace else {}

    # -- tags ------------------------------------------------------------------

    def tags_of(self, repo: Repository) -> list[str]:
        """Return a repository's tags: the upstream's, else the cached ones."""
        if self.settings.air_gapped:
            return self._cached_tags_or_unknown(repo)
        try:
            return self.upstream_tags(repo)
        except NameUnknown:
            return self._cached_tags_or_unknown(repo)
        except UpstreamError as error:
            tags = self.cached_tags(repo)
            if not tags:
                raise
            log.warning('serving cached tags: "%s": %s', repo.url, error.message)
            return tags

    def cached_tags(self, repo: Repository) -> list[str]:
        """Return the sorted tags of a repository that are in the cache."""
        prefix = repo.url + ":"
        tags = {
            url[len(prefix) :]
            for manifest in self.store.manifests()
            for url in manifest.image_urls
            if url.startswith(prefix) and "/" not in url[len(prefix) :]
        }
        return sorted(tags)

    def _cached_tags_or_unknown(self, repo: Repository) -> list[str]:
        tags = self.cached_tags(repo)
        if not tags:
            raise NameUnknown(f"repository {repo.url} is not known")
        return tags

    def upstream_tags(self, repo: Repository) -> list[str]:
        """Return the upstream's sorted tag list, reused for TAG_LIST_TTL."""
        now = time.monotonic()
        remembered = self._tag_lists.get(repo.url)
        if remembered is not None and remembered[0] > now:
            return remembered[1]

        tags = sorted(set(self._fetch_tags(repo)))

        if len(self._tag_lists) >= MAX_TAG_LISTS:
            self._tag_lists = {
                url: item for url, item in self._tag_lists.items() if item[0] > now
            }
        self._tag_lists[repo.url] = (now + TAG_LIST_TTL, tags)
        return tags

    def _fetch_tags(self, repo: Repository) -> list[str]:
        upstream = self.client.upstream(repo.upstream)
        path = f"/v2/{repo.name}/tags/list"
        tags: list[str] = []
        for _ in range(MAX_PAGES):
            log.info('fetching tag list from upstream: "%s"', repo.url)
            status, document, link = fetch_json(upstream, path, repo)
            if status == 404:
                raise NameUnknown(f"repository {repo.url} not found upstream")
            if status != 200:
                raise UpstreamError(upstream.name, f"answered {status} for {path}")
            listed = document.get("tags")
            tags.extend(t for t in listed or [] if isinstance(t, str))
            if not link:
                return tags
            path = link
        log.warning('tag list cut at %d pages: "%s"', MAX_PAGES, repo.url)
        return tags

    # -- referrers -------------------------------------------------------------

    def referrers_of(self, repo: Repository, digest: str) -> list[dict[str, Any]]:
        """Return the descriptors of the manifests whose subject is `digest`."""
        if self.settings.air_gapped:
            return self.cached_referrers(repo, digest)
        try:
            entries = self.upstream_referrers(repo, digest)
        except UpstreamError as error:
            log.warning(
                'serving cached referrers: "%s": %s',
                repo.image_url(digest),
                error.message,
            )
            return self.cached_referrers(repo, digest)
        self._cache_manifests(repo, [str(entry["digest"]) for entry in entries])
        return entries

    def upstream_referrers(self, repo: Repository, digest: str) -> list[dict[str, Any]]:
        """Ask the upstream's referrers API, else its referrers tag schema."""
        upstream = self.client.upstream(repo.upstream)
        path = f"/v2/{repo.name}/referrers/{digest}"
        log.info('fetching referrers from upstream: "%s"', repo.image_url(digest))
        status, document, link = fetch_json(upstream, path, repo, accept=OCI_INDEX)
        if status == 200 and isinstance(document.get("manifests"), list):
            return descriptors(document["manifests"]) + self._more_referrers(
                upstream, link, repo
            )
        if status not in NO_REFERRERS_API:
            raise UpstreamError(upstream.name, f"answered {status} for {path}")

        # The fallback of the distribution spec: an index tagged sha256-<hex>.
        tag = digest.replace(":", "-", 1)
        try:
            data, _ = self.client.fetch_manifest(repo, tag)
            return descriptors(parse_json(data).get("manifests"))
        except ManifestUnknown:
            return []
        except ManifestInvalid as error:
            raise UpstreamError(upstream.name, f"tag {tag}: {error.message}") from None

    def _more_referrers(
        self, upstream: Upstream, link: str, repo: Repository
    ) -> list[dict[str, Any]]:
        """Follow the pages of an upstream referrers answer, a bounded number."""
        entries: list[dict[str, Any]] = []
        for _ in range(MAX_PAGES):
            if not link:
                return entries
            status, document, link = fetch_json(upstream, link, repo, OCI_INDEX)
            if status != 200:
                raise UpstreamError(upstream.name, f"answered {status} for a page")
            entries.extend(descriptors(document.get("manifests")))
        log.warning('referrers cut at %d pages: "%s"', MAX_PAGES, repo.url)
        return entries

    def cached_referrers(self, repo: Repository, digest: str) -> list[dict[str, Any]]:
        """Return descriptors of the cached manifests in `repo` that refer to it."""
        found: dict[str, dict[str, Any]] = {}
        for manifest in self.store.manifests():
            if manifest.digest in found or self._subject_of(manifest) != digest:
                continue
            if any(repository_of(url) == repo.url for url in manifest.image_urls):
                found[manifest.digest] = referrer_descriptor(manifest)
        return [found[key] for key in sorted(found)]

    def _subject_of(self, manifest: Manifest) -> str:
        subject = self._subjects.get(manifest.digest)
        if subject is None:
            try:
                descriptor = manifest.subject()
            except ManifestInvalid:
                descriptor = None
            subject = descriptor.digest if descriptor else ""
            self._subjects[manifest.digest] = subject
        return subject

    def _cache_manifests(self, repo: Repository, digests: Iterable[str]) -> None:
        """Pull referring manifests (and so their blobs), waiting a bounded time."""
        pool = Pool(REFERRER_PULLS)
        for digest in list(digests)[:MAX_REFERRERS_CACHED]:
            if self.store.find_manifest(repo.image_url(digest)) is None:
                pool.spawn(self._cache_manifest, repo, digest)
        pool.join(timeout=self.settings.pull_timeout)

    def _cache_manifest(self, repo: Repository, digest: str) -> None:
        try:
            check_digest(digest)
            self.cache.manifest(repo, digest)
        except RegistryError as error:
            log.warning(
                "could not cache referrer: %r: %s",
                repo.image_url(digest),
                error.message,
            )

    # -- catalog ---------------------------------------------------------------

    def cached_repositories(self) -> list[str]:
        """Return the sorted URLs (host/name) of every cached repository."""
        return sorted(
            {
                repository_of(url)
                for manifest in self.store.manifests()
                for url in manifest.image_urls
            }
        )


def descriptors(entries: object) -> list[dict[str, Any]]:
    """Keep the well-formed descriptors of an index's `manifests`."""
    if not isinstance(entries, list):
        return []
    return [
        entry
        for entry in entries
        if isinstance(entry, dict) and isinstance(entry.get("digest"), str)
    ]


def fetch_json(
    upstream: Upstream, path: str, repo: Repository, accept: str = JSON
) -> tuple[int, dict[str, Any], str]:
    """GET a JSON document; return its status, the document and the next page.

    The document is {} unless the status is 200. Transport failures, auth
    refusals and 429s raise UpstreamError.
    """
    scope = f"repository:{repo.name}:pull"
    with upstream.slot(), gevent.Timeout(upstream.timeout, False):
        response = upstream.request("GET", path, scope, accept=accept)
        status = response.status
        if status in (401, 403, 429) or status >= 500:
            raise UpstreamError(upstream.name, f"answered {status} for {path}")
        if status != 200:
            return status, {}, ""
        try:
            return status, parse_json(response.data), next_page(response)
        except ManifestInvalid:
            raise UpstreamError(upstream.name, f"bad JSON from {path}") from None
    raise UpstreamTimeout(upstream.name, f"no answer within {upstream.timeout:g}s")


def next_page(response: urllib3.BaseHTTPResponse) -> str:
    """Return the path (and query) of a paged response's next page, if any."""
    match = _NEXT_LINK.search(response.headers.get("Link", ""))
    if match is None:
        return ""
    parts = urlsplit(match.group(1))
    return f"{parts.path}?{parts.query}" if parts.query else parts.path

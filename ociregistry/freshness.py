"""Tag freshness: when a cached tag is checked again with its upstream (§8)."""

from __future__ import annotations

import datetime
import logging
import time

import gevent
from gevent.event import AsyncResult

from ociregistry.config import Settings
from ociregistry.errors import ManifestUnknown, UpstreamError
from ociregistry.manifest import TIME_FORMAT, Manifest
from ociregistry.reference import Repository
from ociregistry.upstream import UpstreamClient

log = logging.getLogger(__name__)


class TagFreshness:
    """Decide whether a cached tag may be served, asking its upstream when due.

    Each upstream has a tag TTL (`registries[].tagTtl`, else the top-level
    `tagTtl`; 0 means never, as the original). A tag validated longer ago than
    the TTL is checked with a HEAD: the same digest validates it again, a new
    one makes the caller pull the manifest. When the upstream fails, rate
    limits or no longer has the tag, the cached copy is served with a warning
    and the next check is due one TTL later. Concurrent requests for one tag
    share one HEAD; a request waits for it at most the pull timeout.
    """

    def __init__(self, settings: Settings, client: UpstreamClient) -> None:
        self.settings = settings
        self.client = client
        # image URL -> time.monotonic() of its last validation in this process
        self.validated: dict[str, float] = {}
        self._checks: dict[str, AsyncResult] = {}

    def ttl(self, upstream: str) -> float:
        """Return the tag TTL of an upstream in seconds (0: never re-check)."""
        entry_ttl = self.settings.registry(upstream).tag_ttl
        return self.settings.tag_ttl if entry_ttl is None else entry_ttl

    def is_fresh(self, repo: Repository, tag: str, cached: Manifest) -> bool:
        """Tell whether a cached tag may be served; re-validate it when due.

        False means the tag moved upstream and the caller must pull it.
        """
        ttl = self.ttl(repo.upstream)
        if ttl <= 0 or self.age(repo.image_url(tag), cached) < ttl:
            return True
        return self._shared_check(repo, tag, cached)

    def age(self, image_url: str, cached: Manifest) -> float:
        """Return the seconds since a tag was last known to be current."""
        validated = self.validated.get(image_url)
        if validated is not None:
            return time.monotonic() - validated

        # Not validated by this process yet (say, after a restart): the
        # record's creation is when the tag was last known current.
        try:
            created = datetime.datetime.strptime(cached.created, TIME_FORMAT)
        except ValueError:
            return float("inf")
        return time.time() - created.timestamp()

    def mark_validated(self, image_url: str) -> None:
        """Record that a tag's cached digest is the upstream's, as of now."""
        self.validated[image_url] = time.monotonic()

    def _shared_check(self, repo: Repository, tag: str, cached: Manifest) -> bool:
        url = repo.image_url(tag)
        check = self._checks.get(url)
        if check is not None:
            try:
                return bool(check.get(timeout=self.settings.pull_timeout))
            except gevent.Timeout:
                return True
        check = self._checks[url] = AsyncResult()
        try:
            is_fresh = self._check(repo, tag, cached)
        except BaseException as error:
            check.set_exception(error)
            raise
        finally:
            self._checks.pop(url, None)
        check.set(is_fresh)
        return is_fresh

    def _check(self, repo: Repository, tag: str, cached: Manifest) -> bool:
        url = repo.image_url(tag)
        try:
            digest, _ = self.client.head_manifest(repo, tag)
        except ManifestUnknown:
            self.mark_validated(url)
            log.warning('serving stale manifest from cache: "%s": gone upstream', url)
            return True
        except UpstreamError as error:
            self.mark_validated(url)
            log.warning(
                'serving stale manifest from cache: "%s": %s', url, error.message
            )
            return True
        if digest == cached.digest:
            self.mark_validated(url)
            log.debug('tag still current upstream: "%s"', url)
            return True
        log.info('tag moved upstream: "%s": %s -> %s', url, cached.digest, digest)
        return False

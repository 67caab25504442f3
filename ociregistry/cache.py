"""The pull-through cache: answer from the cache root, else fill it from upstream."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import gevent
from gevent.event import AsyncResult

from ociregistry.config import Settings
from ociregistry.downloads import Download, Downloads
from ociregistry.errors import (
    BlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    RegistryError,
    UpstreamError,
    UpstreamTimeout,
)
from ociregistry.freshness import TagFreshness
from ociregistry.manifest import Manifest, media_type_of, pick_platform, sha256_digest
from ociregistry.metrics import Metrics
from ociregistry.negative import NegativeCache
from ociregistry.reference import Repository, check_digest, is_digest
from ociregistry.store import FileLock, Store
from ociregistry.upstream import UpstreamClient

log = logging.getLogger(__name__)

T = TypeVar("T")
CLAIM_POLL = 0.05  # seconds between looks at another process's pull


@dataclass
class CachedBlob:
    """A blob that is on disk: an open file and its size."""

    fd: int
    size: int


class PullThroughCache:
    """Serve manifests and blobs, pulling each from its upstream at most once."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        client: UpstreamClient,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.metrics = metrics
        self.downloads = Downloads(store, client, settings.pull_timeout, metrics)
        self._flights: dict[str, AsyncResult] = {}
        self.freshness = TagFreshness(settings, client)
        self.negative = NegativeCache(settings.negative_ttl)

    # -- manifests -----------------------------------------------------------

    def manifest(self, repo: Repository, reference: str) -> Manifest:
        """Return a manifest from the cache, or pull it; raise if neither works."""
        url = repo.image_url(reference)
        cached = self.store.find_manifest(url)
        if cached is not None and (
            self.settings.air_gapped or self._is_fresh(repo, reference, cached)
        ):
            log.info('serving manifest from cache: "%s"', url)
            self.store.touch_manifest(cached, url)
            self.metrics.cached_pull(repo.upstream)
            return cached
        if self.settings.air_gapped:
            raise ManifestUnknown(f"{url} is not cached and the server is air-gapped")
        self.negative.check(url)
        try:
            return self._single_flight(
                url, lambda: self._pull_manifest(repo, reference, cached)
            )
        except ManifestUnknown:
            self.negative.remember(url, reference)
            raise
        except UpstreamError as error:
            if cached is None:
                raise
            log.warning(
                'serving stale manifest from cache: "%s": %s', url, error.message
            )
            return cached

    def _is_fresh(self, repo: Repository, reference: str, cached: Manifest) -> bool:
        """Tell whether a cached tag may be served without asking the upstream."""
        if is_digest(reference):
            return True
        if reference == "latest" and self.settings.always_pull_latest:
            return False
        return self.freshness.is_fresh(repo, reference, cached)

    def _pull_manifest(
        self, repo: Repository, reference: str, cached: Manifest | None
    ) -> Manifest:
        url = repo.image_url(reference)
        lock = self.store.lock(f"manifest:{url}")
        try:
            self._claim(lock, repo.upstream)
            latest = self.store.find_manifest(url)
            if latest is not None and latest is not cached:
                return latest  # another process pulled it while we waited
            return self._fetch_manifest(repo, reference, cached)
        finally:
            lock.release()

    def _fetch_manifest(
        self, repo: Repository, reference: str, cached: Manifest | None
    ) -> Manifest:
        url = repo.image_url(reference)
        log.info('pulling manifest from upstream: "%s"', url)
        self.metrics.upstream_pull(repo.upstream)
        data, content_type = self.client.fetch_manifest(repo, reference)
        digest = sha256_digest(data)
        if is_digest(reference) and digest != reference:
            raise UpstreamError(
                repo.upstream, f"manifest bytes do not match {reference}"
            )
        try:
            media_type = media_type_of(data, content_type)
        except ManifestInvalid as error:
            raise UpstreamError(repo.upstream, error.message) from None
        if cached is not None and cached.digest == digest:
            self.store.touch_manifest(cached, url)
            self.freshness.mark_validated(url)
            return cached
        manifest = Manifest(digest, media_type, data, [url])
        record = self.store.put_manifest(manifest, url)
        self.freshness.mark_validated(url)
        self._prefetch(repo, record)
        return record

    def _prefetch(self, repo: Repository, manifest: Manifest) -> None:
        """Start pulling what a client will ask for next."""
        if manifest.is_index:
            child = pick_platform(
                manifest.children(), self.settings.os, self.settings.arch
            )
            if child is not None:
                self.downloads.pool.spawn(self._prefetch_manifest, repo, child.digest)
            return
        for blob in manifest.blobs():
            try:
                hex_digest = check_digest(blob.digest)
            except RegistryError:
                continue
            self.downloads.prefetch(hex_digest, repo)

    def _prefetch_manifest(self, repo: Repository, digest: str) -> None:
        try:
            self.manifest(repo, digest)
        except RegistryError as error:
            log.warning(
                "prefetch failed: %r: %s", repo.image_url(digest), error.message
            )

    def _single_flight(self, key: str, pull: Callable[[], T]) -> T:
        """Run a pull once for all concurrent askers of the same key."""
        flight = self._flights.get(key)
        if flight is not None:
            try:
                result: T = flight.get(timeout=self.settings.pull_timeout)
                return result
            except gevent.Timeout:
                raise UpstreamTimeout(
                    key.split("/")[0], "waited too long for a pull"
                ) from None
        flight = self._flights[key] = AsyncResult()
        try:
            result = pull()
        except BaseException as error:
            flight.set_exception(error)
            raise
        finally:
            self._flights.pop(key, None)
        flight.set(result)
        return result

    def _claim(self, lock: FileLock, upstream: str) -> None:
        deadline = time.monotonic() + self.settings.pull_timeout
        while not lock.try_acquire():
            if time.monotonic() > deadline:
                raise UpstreamTimeout(upstream, "another process's pull took too long")
            gevent.sleep(CLAIM_POLL)

    # -- blobs ---------------------------------------------------------------

    def blob(self, repo: Repository, hex_digest: str) -> CachedBlob | Download:
        """Return a cached blob, or the download that is bringing it."""
        opened = self.store.open_blob(hex_digest)
        if opened is not None:
            self.metrics.cached_pull(repo.upstream)
            return CachedBlob(*opened)
        if self.settings.air_gapped:
            raise BlobUnknown(f"blob sha256:{hex_digest} is not cached (air-gapped)")
        download = self.downloads.get(hex_digest, repo)
        download.wait_started(self.settings.pull_timeout)
        if download.is_cached and not download.temp_path:
            opened = self.store.open_blob(hex_digest)
            if opened is not None:
                return CachedBlob(*opened)
        return download

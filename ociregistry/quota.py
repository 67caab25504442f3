"""The size quota of the cache root: `pruneConfig.maxBytes` (SPEC §8).

When the cache root grows past the quota, images are evicted least recently
pulled first, until it fits again. An image is a manifest record (an index
takes along its cached image manifests); its blobs go only when no remaining
manifest references them, through the same removal as every prune.

Nothing in use is evicted: an image pulled within the pull timeout may still
be on its way to a client, so it stays; blobs this process is writing or
serving stay (the pruner knows them); and a client that already opened a
blob reads it whole even when it is unlinked.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable

import gevent

from ociregistry.manifest import TIME_FORMAT, Manifest
from ociregistry.periodic import PeriodicTask
from ociregistry.prune import Pruner, PruneResult, expand_indexes
from ociregistry.store import BLOBS, IMAGES, LATEST, TEMP, Store

log = logging.getLogger(__name__)

CHECK_INTERVAL = 2.0  # seconds between looks at the cache root's size
MEGABYTE = 1_000_000
_MEASURED = (BLOBS, IMAGES, LATEST, TEMP)


def folder_bytes(path: str) -> int:
    """Return the bytes the regular files directly in a folder take."""
    total = 0
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
        return 0
    return total


def stamp_age(stamp: str, now: datetime.datetime) -> float:
    """Return the seconds since a record's local time stamp (inf: unreadable)."""
    try:
        moment = datetime.datetime.strptime(stamp, TIME_FORMAT)
    except ValueError:
        return float("inf")
    return (now - moment).total_seconds()


def eviction_order(records: list[Manifest]) -> list[Manifest]:
    """Return records least recently pulled first (then oldest, then by URL)."""
    return sorted(records, key=lambda r: (r.pulled, r.created, r.image_urls[0]))


class Quota:
    """Keep the cache root under `max_bytes` by evicting images.

    `in_use_for` is how long after its last pull an image counts as in use.
    The size is measured on a thread of the hub's pool, and only when the
    cache root's folders changed since the last measure.
    """

    def __init__(
        self,
        pruner: Pruner,
        store: Store,
        max_bytes: int,
        in_use_for: float,
        interval: float = CHECK_INTERVAL,
    ) -> None:
        self.pruner = pruner
        self.store = store
        self.max_bytes = max_bytes
        self.in_use_for = in_use_for
        self.interval = interval
        self.evictions = 0
        self._usage = 0
        self._measured_at: tuple[int, ...] = ()
        self._task = PeriodicTask("cache quota check", interval, self.enforce)
        self._warned_full = False

    # -- schedule --------------------------------------------------------------

    def start(self) -> None:
        """Watch the cache root in a greenlet, when a quota is set."""
        if self.max_bytes <= 0:
            return
        log.info(
            "cache quota: %.2f MB, checked every %gs",
            self.max_bytes / MEGABYTE,
            self.interval,
        )
        self._task.start()

    def stop(self) -> None:
        """Stop watching; an eviction under way finishes first."""
        self._task.stop()

    # -- measuring and evicting ------------------------------------------------

    def usage(self) -> int:
        """Return the bytes of the cache root, measured again if it changed."""
        folders = [os.path.join(self.store.root, name) for name in _MEASURED]
        state = tuple(_mtime_ns(folder) for folder in folders)
        if state != self._measured_at:
            offload = gevent.get_hub().threadpool.apply
            self._usage = sum(offload(folder_bytes, (f,)) for f in folders)
            self._measured_at = state
        return self._usage

    def enforce(self) -> PruneResult | None:
        """Evict images until the cache root fits; return what went, if any."""
        usage = self.usage()
        if usage <= self.max_bytes:
            self._warned_full = False
            return None
        lock = self.store.lock("quota")
        if not lock.try_acquire():
            return None  # another process on this cache root is evicting
        try:
            return self._evict(usage)
        finally:
            lock.release()

    def _evict(self, usage: int) -> PruneResult:
        started = time.monotonic()
        records = self.store.manifests()
        result = PruneResult()
        is_idle = self._idle_check()
        for record in eviction_order(records):
            if usage <= self.max_bytes:
                break
            group = [
                m
                for m in expand_indexes([record], records)
                if not any(m is gone for gone in result.manifests)
            ]
            if not group or not all(is_idle(m) for m in group):
                continue
            removed = self.pruner.remove(group)
            usage -= removed.blob_bytes + sum(len(m.to_record()) for m in group)
            result.manifests.extend(removed.manifests)
            result.blobs.update(removed.blobs)
            result.kept_in_use.extend(removed.kept_in_use)
        result.seconds = time.monotonic() - started
        self._report(result, usage)
        return result

    def _idle_check(self) -> Callable[[Manifest], bool]:
        now = datetime.datetime.now()
        return lambda record: stamp_age(record.pulled, now) > self.in_use_for

    def _report(self, result: PruneResult, usage: int) -> None:
        if result.manifests:
            self.evictions += len(result.manifests)
            urls = ", ".join(m.image_urls[0] for m in result.manifests[:5])
            log.info(
                "cache quota: evicted %d manifests and %d blobs (%.2f MB) in "
                '%.2fs: "%s"',
                len(result.manifests),
                len(result.blobs),
                result.blob_bytes / MEGABYTE,
                result.seconds,
                urls,
            )
        if usage > self.max_bytes and not self._warned_full:
            self._warned_full = True
            log.warning(
                "cache root over quota: %.2f MB of %.2f MB, the rest is in use",
                usage / MEGABYTE,
                self.max_bytes / MEGABYTE,
            )


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return -1

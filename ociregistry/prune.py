"""Pruning the cache: select manifests, remove them and the blobs left unused.

One implementation serves the `prune` command, `DELETE /cmd/prune` and the
background pruner, so the three always agree on what a prune removes:

- a manifest record goes when the selection picks it (pattern, age, count);
  an index takes along the image manifests it lists that are cached in the
  same repository;
- a blob goes when no remaining manifest references it, unless this process
  is writing or serving it, or it is an orphan (referenced by no manifest
  at all) younger than the pruner's orphan age.

Removal is an unlink: a client that already opened a blob keeps reading the
whole file, so a prune never truncates a body in flight.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from ociregistry.config import Settings
from ociregistry.errors import ConfigError, RegistryError
from ociregistry.listing import MEGABYTE, ReadOnlyCache, split_image_url
from ociregistry.logs import setup_logging
from ociregistry.manifest import TIME_FORMAT, Manifest
from ociregistry.reference import check_digest
from ociregistry.rootlock import exclusive_root
from ociregistry.store import Store, with_suppressed_unlink

log = logging.getLogger(__name__)

NO_LIMIT = -1


class CacheRecords(Protocol):
    """What a prune needs of a cache root: a Store, or a read-only view."""

    def manifests(self) -> list[Manifest]:
        """Return every manifest record."""

    def blob_names(self) -> Iterable[str]:
        """Return the hex digest of every cached blob."""

    def blob_path(self, hex_digest: str) -> str:
        """Return the path a blob is cached at."""

    def remove_manifest(self, manifest: Manifest) -> None:
        """Delete a manifest record."""


@dataclass(frozen=True)
class Selection:
    """Which manifests a prune picks; every given criterion must hold.

    `count` bounds how many manifests are picked (oldest first, by the date
    the selection looks at); the image manifests of a picked index come on
    top of that.
    """

    patterns: tuple[str, ...] = ()
    created_before: datetime.datetime | None = None
    pulled_before: datetime.datetime | None = None
    count: int = NO_LIMIT

    def has_criteria(self) -> bool:
        """Tell whether the selection names anything (empty picks nothing)."""
        return bool(self.patterns) or self.is_by_date()

    def is_by_date(self) -> bool:
        """Tell whether the selection looks at a date."""
        return self.created_before is not None or self.pulled_before is not None

    def matches(self, manifest: Manifest) -> bool:
        """Tell whether a manifest record meets every criterion."""
        if not self.has_criteria():
            return False
        if self.patterns and not matches_patterns(manifest, self.patterns):
            return False
        created, pulled = self.created_before, self.pulled_before
        if created is not None and not _is_before(manifest.created, created):
            return False
        return pulled is None or _is_before(manifest.pulled, pulled)

    def sort_key(self, manifest: Manifest) -> tuple[str, str]:
        """Order candidates oldest first, else by image URL."""
        stamp = manifest.pulled if self.pulled_before else manifest.created
        return (stamp if self.is_by_date() else "", manifest.image_urls[0])


def matches_patterns(manifest: Manifest, patterns: Iterable[str]) -> bool:
    """Tell whether any image URL of a record matches any regular expression."""
    return any(
        re.search(pattern, url) for pattern in patterns for url in manifest.image_urls
    )


def _is_before(stamp: str, moment: datetime.datetime) -> bool:
    """Compare a record's local time stamp; an unreadable stamp never is."""
    try:
        return datetime.datetime.strptime(stamp, TIME_FORMAT) < moment
    except ValueError:
        return False


def age_selection(kind: str, seconds: float, count: int = NO_LIMIT) -> Selection:
    """Select records not pulled (`accessed`) or created for `seconds`."""
    moment = datetime.datetime.now() - datetime.timedelta(seconds=seconds)
    if kind == "accessed":
        return Selection(pulled_before=moment, count=count)
    if kind == "created":
        return Selection(created_before=moment, count=count)
    raise ValueError(f'unknown prune type "{kind}"')


def blob_digests(manifest: Manifest) -> set[str]:
    """Return the hex digests of the blobs an image manifest references."""
    if manifest.is_index:
        return set()
    try:
        descriptors = manifest.blobs()
    except RegistryError:
        return set()
    found = set()
    for descriptor in descriptors:
        try:
            found.add(check_digest(descriptor.digest))
        except RegistryError:
            continue
    return found


def referenced_blobs(manifests: Iterable[Manifest]) -> dict[str, int]:
    """Count, for each blob, the manifest records that reference it."""
    counts: dict[str, int] = {}
    for manifest in manifests:
        for hex_digest in blob_digests(manifest):
            counts[hex_digest] = counts.get(hex_digest, 0) + 1
    return counts


def select_manifests(records: list[Manifest], selection: Selection) -> list[Manifest]:
    """Return the records a selection picks, in the order it picks them."""
    picked = sorted(
        (record for record in records if selection.matches(record)),
        key=selection.sort_key,
    )
    return picked if selection.count < 0 else picked[: selection.count]


def expand_indexes(picked: list[Manifest], records: list[Manifest]) -> list[Manifest]:
    """Add the cached image manifests, in the same repository, of each index."""
    chosen = list(picked)
    keys = {record_key(record) for record in picked}
    by_hex: dict[str, list[Manifest]] = {}
    for record in records:
        by_hex.setdefault(record.hex, []).append(record)
    for index in [record for record in picked if record.is_index]:
        images = {split_image_url(url)[0] for url in index.image_urls}
        for child in _children(index):
            for record in by_hex.get(child, []):
                if _is_in(record, images) and record_key(record) not in keys:
                    chosen.append(record)
                    keys.add(record_key(record))
    return chosen


def _children(index: Manifest) -> list[str]:
    try:
        return [d.digest.partition(":")[2] for d in index.children()]
    except RegistryError:
        return []


def _is_in(record: Manifest, images: set[str]) -> bool:
    return any(split_image_url(url)[0] in images for url in record.image_urls)


def record_key(record: Manifest) -> tuple[str, tuple[str, ...]]:
    """Identify a record across reads of the cache root: digest and URLs."""
    return record.digest, tuple(record.image_urls)


@dataclass
class PruneResult:
    """What a prune removed, or would remove in a dry run."""

    manifests: list[Manifest] = field(default_factory=list)
    blobs: dict[str, int] = field(default_factory=dict)  # hex -> size
    kept_in_use: list[str] = field(default_factory=list)
    is_dry_run: bool = False
    seconds: float = 0.0

    @property
    def blob_bytes(self) -> int:
        """Return the bytes the removed blobs took."""
        return sum(self.blobs.values())

    def lines(self) -> list[str]:
        """Return one line per removed manifest URL and blob, then a summary."""
        lines = [
            f"manifest {url} {manifest.digest}"
            for manifest in self.manifests
            for url in manifest.image_urls
        ]
        lines += [f"blob sha256:{hex} {size}" for hex, size in self.blobs.items()]
        return [*lines, self.summary()]

    def summary(self) -> str:
        """Return a one-line account of the prune."""
        verb = "dry run: would remove" if self.is_dry_run else "removed"
        text = (
            f"{verb} {len(self.manifests)} manifests and {len(self.blobs)} blobs "
            f"({self.blob_bytes / MEGABYTE:.2f} MB) in {self.seconds:.2f}s"
        )
        if self.kept_in_use:
            text += f"; kept {len(self.kept_in_use)} blobs in use"
        return text


class Pruner:
    """Select and remove manifests and unused blobs of one cache root.

    `is_in_use(hex)` tells which blobs this process is writing or serving;
    those are never removed. Orphan blobs (no manifest references them) are
    removed only once older than `orphan_age` seconds, as a pull or a load
    in progress may be about to reference them.

    A prune does not yield to other greenlets between its last look at the
    manifest records and its last unlink, so a pull in this process cannot
    reference a blob in between. Another process on the same cache root may:
    a manifest it writes at that moment can lose a blob it shares with a
    pruned one, which the engine fetches again when a client asks for it.
    """

    def __init__(
        self,
        store: CacheRecords,
        is_in_use: Callable[[str], bool] = lambda hex_digest: False,
        orphan_age: float = 0.0,
    ) -> None:
        self.store = store
        self.is_in_use = is_in_use
        self.orphan_age = orphan_age

    def prune(self, selection: Selection, dry_run: bool = False) -> PruneResult:
        """Remove (or, in a dry run, report) what a selection picks."""
        started = time.monotonic()
        chosen = select_manifests(self.store.manifests(), selection)
        result = self.remove(chosen, dry_run)
        result.seconds = time.monotonic() - started
        return result

    def remove(self, manifests: list[Manifest], dry_run: bool = False) -> PruneResult:
        """Remove records (an index with its cached images), then unused blobs."""
        records = self.store.manifests()
        manifests = expand_indexes(manifests, records)
        result = PruneResult(manifests=manifests, is_dry_run=dry_run)
        candidates = self._blob_candidates(manifests, records)
        if dry_run:
            chosen = {record_key(manifest) for manifest in manifests}
            remaining = [r for r in records if record_key(r) not in chosen]
        else:
            for manifest in manifests:
                self.store.remove_manifest(manifest)
            remaining = self.store.manifests()
        referenced = referenced_blobs(remaining)
        for hex_digest in sorted(candidates):
            if hex_digest in referenced:
                continue
            if self.is_in_use(hex_digest):
                result.kept_in_use.append(hex_digest)
                continue
            result.blobs[hex_digest] = candidates[hex_digest]
            if not dry_run:
                with_suppressed_unlink(self.store.blob_path(hex_digest))
        return result

    def _blob_candidates(
        self, manifests: list[Manifest], records: list[Manifest]
    ) -> dict[str, int]:
        """Return the cached blobs a removal may free, with their sizes."""
        freed = referenced_blobs(manifests)
        everything = referenced_blobs(records)
        cutoff = time.time() - self.orphan_age
        candidates = {}
        for hex_digest in self.store.blob_names():
            is_orphan = hex_digest not in everything
            if hex_digest not in freed and not is_orphan:
                continue
            try:
                stat = os.stat(self.store.blob_path(hex_digest))
            except FileNotFoundError:
                continue
            if hex_digest in freed or stat.st_mtime <= cutoff:
                candidates[hex_digest] = stat.st_size
        return candidates


def run_prune(
    settings: Settings,
    patterns: list[str],
    date: datetime.datetime | None,
    dry_run: bool,
) -> int:
    """Remove matching manifests and unreferenced blobs; return the exit status."""
    setup_logging(settings.log_level, settings.log_file)
    selection = Selection(patterns=tuple(patterns), created_before=date)
    if not selection.has_criteria():
        raise ConfigError("prune needs --pattern or --date (see prune --help)")
    root = os.path.abspath(settings.image_path)
    if not os.path.isdir(root):
        raise ConfigError(f"cache root {root} does not exist")

    # A dry run only reads: it takes no lock, creates nothing, and may run
    # beside a server.
    if dry_run:
        result = Pruner(ReadOnlyCache(root)).prune(selection, dry_run=True)
    else:
        with exclusive_root(root):
            result = Pruner(Store(root)).prune(selection)
    sys.stdout.write("".join(line + "\n" for line in result.lines()))
    log.info("prune: %s", result.summary())
    return 0

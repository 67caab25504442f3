"""Listing the cached manifests: the `list` command and `/cmd/manifest/list`.

Listing only reads: it opens no lock, creates no directory and leaves the
temporary files alone, so it is safe while a server runs on the cache root.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator

from ociregistry.config import Settings
from ociregistry.errors import ConfigError, ManifestInvalid
from ociregistry.logs import setup_logging
from ociregistry.manifest import Manifest
from ociregistry.store import BLOBS, IMAGES, LATEST

log = logging.getLogger(__name__)

HEADER = "IMAGE TAG_OR_DIGEST TYPE CREATED PULLED SIZE_MB"
SHORT_DIGEST = 12
MEGABYTE = 1_000_000


class ReadOnlyCache:
    """A cache root as it is on disk, read without creating or changing a file."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def manifests(self) -> list[Manifest]:
        """Return every manifest record."""
        return read_manifests(self.root)

    def blob_names(self) -> list[str]:
        """Return the hex digest of every cached blob."""
        try:
            return os.listdir(os.path.join(self.root, BLOBS))
        except FileNotFoundError:
            return []

    def blob_path(self, hex_digest: str) -> str:
        """Return the path a blob is cached at."""
        return os.path.join(self.root, BLOBS, hex_digest)

    def remove_manifest(self, manifest: Manifest) -> None:
        """Refuse: this view never changes the cache root."""
        raise PermissionError(f"read-only cache root: {self.root}")


def split_image_url(image_url: str) -> tuple[str, str]:
    """Split `host/repo:tag` or `host/repo@sha256:…` into image and reference."""
    if "@" in image_url:
        image, _, reference = image_url.partition("@")
        return image, reference
    slash = image_url.rfind("/")
    colon = image_url.rfind(":")
    if colon > slash:
        return image_url[:colon], image_url[colon + 1 :]
    return image_url, ""


def read_manifests(root: str) -> list[Manifest]:
    """Read every manifest record under a cache root, without changing it."""
    manifests = []
    for folder in (IMAGES, LATEST):
        for path in _record_paths(os.path.join(root, folder)):
            manifest = _read_record(path)
            if manifest is not None:
                manifests.append(manifest)
    return manifests


def _record_paths(directory: str) -> Iterator[str]:
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_file():
                    yield entry.path
    except FileNotFoundError:
        return


def _read_record(path: str) -> Manifest | None:
    try:
        with open(path, "rb") as file:
            return Manifest.from_record(file.read())
    except FileNotFoundError:
        return None  # pruned while we listed
    except ManifestInvalid as error:
        log.warning("skipping unreadable manifest record: %r: %s", path, error)
        return None


def manifest_rows(
    manifests: Iterable[Manifest], patterns: Iterable[str] = (), short: bool = False
) -> list[str]:
    """Return the sorted lines of a listing: one per record and image URL."""
    compiled = [re.compile(pattern) for pattern in patterns]
    rows = []
    for manifest in manifests:
        for url in manifest.image_urls:
            if compiled and not any(p.search(url) for p in compiled):
                continue
            rows.append(_row(manifest, url, short))
    return sorted(rows)


def _row(manifest: Manifest, url: str, short: bool) -> str:
    image, reference = split_image_url(url)
    if short and reference.startswith("sha256:"):
        reference = reference[7:][:SHORT_DIGEST]
    kind = "list" if manifest.is_index else "image"
    size = "n/a" if manifest.is_index else _megabytes(manifest)
    created, pulled = manifest.created or "-", manifest.pulled or "-"
    return f"{image} {reference or '-'} {kind} {created} {pulled} {size}"


def _megabytes(manifest: Manifest) -> str:
    try:
        return f"{manifest.size_of_layers() / MEGABYTE:.2f}"
    except ManifestInvalid:
        return "n/a"


def run_list(
    settings: Settings, header: bool, patterns: list[str], short_digest: bool
) -> int:
    """Print one line per cached manifest; return the exit status."""
    setup_logging(settings.log_level, settings.log_file)
    root = os.path.abspath(settings.image_path)
    if not os.path.isdir(root):
        raise ConfigError(f"cache root {root} does not exist")

    rows = manifest_rows(read_manifests(root), patterns, short_digest)
    lines = [HEADER, *rows] if header else rows
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0

"""Loading images into the cache: the `load` command and `--preload-images`.

A SPEC names files: one, a glob, or a comma-separated mix. Each file is
recognised by its content. An image list is pulled through the same cache
and upstream client as the server uses, several images at a time; an image
tarball is read by `tarball.Archive` and its verified blobs moved into the
cache, manifests last. What is cached already is skipped, and a failed
image leaves no manifest behind.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import time

import gevent
from gevent.pool import Pool

from ociregistry.cache import PullThroughCache
from ociregistry.config import Settings, with_host_platform
from ociregistry.downloads import Download
from ociregistry.errors import (
    ConfigError,
    ManifestUnknown,
    RegistryError,
    UpstreamTimeout,
)
from ociregistry.logs import LEVELS, setup_logging
from ociregistry.manifest import Manifest, pick_platform
from ociregistry.metrics import Metrics
from ociregistry.progress import Progress, Summary, Task
from ociregistry.reference import (
    DOCKER_HUB,
    Repository,
    check_digest,
    check_name,
    check_reference,
    is_digest,
    looks_like_host,
    normalize_upstream,
)
from ociregistry.rootlock import exclusive_root
from ociregistry.store import BLOBS, Store, fsync_dir
from ociregistry.tarball import (
    Archive,
    ArchiveImage,
    ArchiveInvalid,
    ArchiveManifest,
    archive_images,
    is_tarball,
)
from ociregistry.upstream import UpstreamClient

log = logging.getLogger(__name__)

IMAGES_AT_ONCE = 4
DOWNLOAD_POLL = 0.1  # seconds between looks at running blob downloads
GLOB_MARKS = "*?["

Target = tuple[Repository, str]  # a repository and a tag or digest in it


def run_load(settings: Settings) -> int:
    """Load the images `settings.image_file` names; return the exit status."""
    setup_logging(settings.log_level, settings.log_file)
    settings = with_host_platform(settings)
    paths = expand_spec(settings.image_file)
    try:
        store = Store(settings.image_path)
    except OSError as error:
        place = settings.image_path
        raise ConfigError(f"cannot load into {place}: {error.strerror}") from None

    with exclusive_root(store.root):
        client = UpstreamClient(settings)
        cache = PullThroughCache(settings, store, client, Metrics())
        progress = Progress(sys.stderr if is_live(settings) else None)
        try:
            summary = Loader(settings, store, cache, progress).load(paths)
        finally:
            progress.close()
            client.close()
    log.info("load finished: %s", summary.describe())
    print(summary.describe())
    return 1 if summary.failed else 0


def preload_images(
    settings: Settings, store: Store, cache: PullThroughCache
) -> Summary:
    """Load `--preload-images` into a server's cache before it serves."""
    paths = expand_spec(settings.preload_images)
    loader = Loader(with_host_platform(settings), store, cache, Progress())
    summary = loader.load(paths)
    log.info("preload finished: %s", summary.describe())
    return summary


def is_live(settings: Settings) -> bool:
    """Tell whether to draw live progress: a terminal not shared with logs."""
    is_quiet = settings.log_file or LEVELS[settings.log_level] > logging.INFO
    return bool(is_quiet) and sys.stderr.isatty()


def expand_spec(spec: str) -> list[str]:
    """Return the files a SPEC names; raise ConfigError for a missing one."""
    paths: list[str] = []
    for part in (part.strip() for part in spec.split(",")):
        if not part:
            continue
        if any(mark in part for mark in GLOB_MARKS):
            matches = sorted(p for p in glob.glob(part) if os.path.isfile(p))
            if not matches:
                raise ConfigError(f'no image files match "{part}"')
            paths += matches
        elif os.path.isfile(part):
            paths.append(part)
        else:
            raise ConfigError(f'image file not found: "{part}"')
    if not paths:
        raise ConfigError("no image files given")
    return list(dict.fromkeys(paths))


def parse_image_reference(text: str) -> Target:
    """Split `host/name:tag` or `name@sha256:…` into repository and reference.

    A name without a registry host is Docker Hub's (`alpine` is
    `docker.io/library/alpine`); one without tag or digest means `latest`.
    """
    name, _, digest = text.strip().partition("@")
    tag = ""
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    first, _, rest = name.partition("/")
    upstream = DOCKER_HUB
    if rest and looks_like_host(first):
        upstream, name = normalize_upstream(first), rest
    name = check_name(name)
    if upstream == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    reference = check_reference(digest or tag or "latest")
    if digest:
        check_digest(digest)
    return Repository(upstream, name), reference


def names_reference(text: str) -> bool:
    """Tell whether an image reference has a tag or a digest of its own."""
    return "@" in text or ":" in text.rsplit("/", 1)[-1]


class Loader:
    """Load image lists and image tarballs into one cache root."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        cache: PullThroughCache,
        progress: Progress,
    ) -> None:
        self.settings = settings
        self.store = store
        self.cache = cache
        self.progress = progress

    def load(self, paths: list[str]) -> Summary:
        """Load every file, each as what its content says it is."""
        for path in paths:
            try:
                is_archive = is_tarball(path)
            except OSError as error:
                self.progress.failed(path, str(error.strerror))
                continue
            if is_archive:
                self.load_tarball(path)
            else:
                self.load_list(path)
        return self.progress.summary

    # -- image lists -------------------------------------------------------------

    def load_list(self, path: str) -> None:
        """Pull every image a list names, a few at a time."""
        try:
            references = read_image_list(path)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            self.progress.failed(path, f"not an image list or tarball: {reason}")
            return
        pool = Pool(IMAGES_AT_ONCE)
        for reference in references:
            pool.spawn(self.load_reference, reference)
        pool.join()

    def load_reference(self, text: str) -> None:
        """Pull one image for the platform; report it."""
        try:
            repo, reference = parse_image_reference(text)
        except RegistryError as error:
            self.progress.failed(text, error.message)
            return
        url = repo.image_url(reference)
        task = self.progress.track(url)
        try:
            written = self._pull(repo, reference, task)
        except RegistryError as error:
            self.progress.failed(url, error.message)
            return
        except Exception as error:  # crash barrier: the other images go on
            log.exception('image load crashed: "%s"', url)
            self.progress.failed(url, str(error))
            return
        finally:
            self.progress.untrack(task)
        if written:
            self.progress.loaded(url, written, task.seconds)
        else:
            self.progress.cached(url)

    def _pull(self, repo: Repository, reference: str, task: Task) -> int:
        """Cache a manifest, its platform's image and blobs; return bytes new."""
        created: list[tuple[Manifest, str]] = []
        try:
            manifest = self._manifest(repo, reference, created)
            if manifest.is_index:
                os_name, arch = self.settings.os, self.settings.arch
                child = pick_platform(manifest.children(), os_name, arch)
                if child is None:
                    url = repo.image_url(reference)
                    raise ManifestUnknown(f"{url} has no image for {os_name}/{arch}")
                manifest = self._manifest(repo, child.digest, created)
            written = self._fetch_blobs(repo, manifest, task)
        except BaseException:
            self._forget(created)
            raise
        return written + sum(len(record.data) for record, _ in created)

    def _manifest(
        self, repo: Repository, reference: str, created: list[tuple[Manifest, str]]
    ) -> Manifest:
        url = repo.image_url(reference)
        cached = self.store.find_manifest(url)
        if cached is not None:
            return cached
        manifest = self.cache.manifest(repo, reference)
        created.append((manifest, url))
        return manifest

    def _forget(self, created: list[tuple[Manifest, str]]) -> None:
        """Remove the manifests a failed image load cached, so none is partial."""
        for manifest, url in reversed(created):
            if manifest.image_urls == [url]:
                self.store.remove_manifest(manifest)
                log.debug('removed manifest of a failed load: "%s"', url)

    def _fetch_blobs(self, repo: Repository, manifest: Manifest, task: Task) -> int:
        sizes = {check_digest(blob.digest): blob.size for blob in manifest.blobs()}
        missing = [
            hex_digest for hex_digest in sizes if not self.store.has_blob(hex_digest)
        ]
        task.total = sum(max(sizes[hex_digest], 0) for hex_digest in missing)
        downloads = [
            self.cache.downloads.get(hex_digest, repo) for hex_digest in missing
        ]
        self._wait(downloads, task, repo)
        return sum(download.written for download in downloads)

    def _wait(self, downloads: list[Download], task: Task, repo: Repository) -> None:
        """Wait until the downloads end; raise the first error, or on a stall."""
        timeout = self.settings.pull_timeout
        deadline = time.monotonic() + timeout
        while not all(download.is_done for download in downloads):
            done = sum(download.written for download in downloads)
            if done != task.done:
                task.done, deadline = done, time.monotonic() + timeout
            elif time.monotonic() > deadline:
                raise UpstreamTimeout(repo.upstream, "blob downloads stalled")
            gevent.sleep(DOWNLOAD_POLL)
        task.done = sum(download.written for download in downloads)
        for download in downloads:
            if download.error is not None:
                raise download.error

    # -- tarballs ----------------------------------------------------------------

    def load_tarball(self, path: str) -> None:
        """Read an image tarball, then cache each of its images."""
        archive = Archive(self.store, path)
        task = self.progress.track(f"reading {path}", os.path.getsize(path))
        try:
            try:
                archive.read(task.advance)
                images = archive_images(archive)
            except RegistryError as error:
                self.progress.failed(path, error.message)
                return
            except OSError as error:
                self.progress.failed(path, str(error.strerror or error))
                return
            finally:
                self.progress.untrack(task)
            for image in images:
                self._commit(archive, image, len(images) == 1, task.seconds)
        finally:
            archive.discard()

    def _commit(
        self, archive: Archive, image: ArchiveImage, is_single: bool, seconds: float
    ) -> None:
        label = image.label(archive.path)
        try:
            if image.problem:
                raise ArchiveInvalid(image.problem)
            targets = self._targets(archive.path, image, is_single)
            label = ", ".join(repo.image_url(reference) for repo, reference in targets)
            written = commit_image(self.store, archive, image, targets)
        except (RegistryError, OSError) as error:
            reason = error.message if isinstance(error, RegistryError) else str(error)
            where = os.path.basename(archive.path)
            self.progress.failed(label, f"{where}: {reason}")
            return
        if written:
            self.progress.loaded(label, written, seconds)
        else:
            self.progress.cached(label)

    def _targets(self, path: str, image: ArchiveImage, is_single: bool) -> list[Target]:
        """Return what to cache an archive's image as, from its names or REF."""
        targets: list[Target] = []
        for name in image.names:
            try:
                targets.append(parse_image_reference(name))
            except RegistryError as error:
                log.warning('unusable image name in "%s": %r: %s', path, name, error)
        for _, reference in targets:
            if is_digest(reference) and reference != image.top.digest:
                raise ArchiveInvalid(f"the image is named {reference}, not its digest")
        if targets:
            return list(dict.fromkeys(targets))
        return [self._resolved_target(image, is_single)]

    def _resolved_target(self, image: ArchiveImage, is_single: bool) -> Target:
        resolve_ref = self.settings.resolve_ref
        if not resolve_ref:
            raise ArchiveInvalid("the image has no usable name: give --resolve-ref")
        if not is_single:
            raise ArchiveInvalid(
                "the image has no usable name, and --resolve-ref names only "
                "the image of a single-image tarball"
            )
        repo, reference = parse_image_reference(resolve_ref)
        if image.tag and not names_reference(resolve_ref):
            reference = check_reference(image.tag)
        return repo, reference


def read_image_list(path: str) -> list[str]:
    """Return the references of an image list: no blanks, no `#` comments."""
    with open(path, "rb") as file:
        data = file.read()
    if b"\0" in data:
        raise ValueError("it holds binary data")
    references = []
    for line in data.decode("utf-8-sig").splitlines():
        reference = line.split("#", 1)[0].strip()
        if reference:
            references.append(reference)
    return references


def commit_image(
    store: Store, archive: Archive, image: ArchiveImage, targets: list[Target]
) -> int:
    """Move an image's blobs into the cache, then write its manifests.

    An index's images are cached by digest in each target repository, before
    the index itself. Return the bytes written (0: all was cached already).
    """
    written = sum(
        archive.take_blob(hex_digest)
        for manifest in image.manifests
        for hex_digest in manifest.blobs
    )
    if written:
        fsync_dir(os.path.join(store.root, BLOBS))

    repositories = list(dict.fromkeys(repo for repo, _ in targets))
    for child in image.manifests[:-1]:
        for repo in repositories:
            written += put_manifest(store, child, repo.image_url(child.digest))
    for repo, reference in targets:
        written += put_manifest(store, image.top, repo.image_url(reference))
    return written


def put_manifest(store: Store, manifest: ArchiveManifest, image_url: str) -> int:
    """Cache a manifest as an image URL unless it is; return bytes written."""
    cached = store.find_manifest(image_url)
    if cached is not None and cached.digest == manifest.digest:
        return 0
    record = Manifest(manifest.digest, manifest.media_type, manifest.data, [image_url])
    store.put_manifest(record, image_url)
    log.debug('cached manifest from an archive: "%s"', image_url)
    return len(manifest.data)

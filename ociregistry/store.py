"""The cache root on disk: blobs, manifest records, temporary files, locks.

Layout, as the Go server's: `blobs/<hex>`, `img/<hex>` for manifests and
`lts/<hex>` for manifests pulled by the tag `latest`. Our own working
directories, `.tmp/` and `.locks/`, sit beside them on the same filesystem so
that a finished file is moved into place by one atomic rename.

The disk is the truth; the manifest index in memory is a view of it that is
refreshed when the directories change, so that several processes (and hosts,
over a shared volume) can fill one cache root.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gevent
from gevent.lock import RLock

from ociregistry.errors import CacheFull, DigestInvalid, ManifestInvalid
from ociregistry.manifest import Manifest, now_stamp

log = logging.getLogger(__name__)

BLOBS, IMAGES, LATEST, TEMP, LOCKS = "blobs", "img", "lts", ".tmp", ".locks"
TOUCH_INTERVAL = 60.0  # seconds between writes of a record's pulled time
STALE_TEMP_AGE = 24 * 3600.0  # temp files of other hosts older than this go
_counter = itertools.count()


def _offload(function: Callable[..., object], *args: object) -> object:
    """Run a blocking call (fsync) on the hub's thread pool."""
    return gevent.get_hub().threadpool.apply(function, args)


def fsync_file(fd: int) -> None:
    """Flush a file to stable storage without stopping other greenlets."""
    _offload(os.fsync, fd)


def fsync_dir(path: str) -> None:
    """Flush a directory entry change (a rename) to stable storage."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync_file(fd)
    finally:
        os.close(fd)


def raise_for_disk(error: OSError, what: str) -> None:
    """Turn an out-of-space error into CacheFull; re-raise anything else."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        raise CacheFull(f"no space left in the cache root for {what}") from None
    raise error


class FileLock:
    """An exclusive lock file shared by every process on the cache root.

    The lock is an flock on `.locks/<name>`; the kernel drops it when its
    holder dies, so a crashed process never leaves a lock that blocks others.
    The holder unlinks the file before releasing it, and a taker checks that
    the file it locked is still the one at the path.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; never blocks."""
        for _ in range(3):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                is_current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                is_current = False
            if is_current:
                self.fd = fd
                return True
            os.close(fd)
        return False

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = -1


class BlobWriter:
    """Write one blob to a temporary file; commit it only if it verifies."""

    def __init__(self, store: Store, hex_digest: str) -> None:
        self.store = store
        self.hex = hex_digest
        self.temp_path = store.temp_path(hex_digest)
        self.written = 0
        self._hash = hashlib.sha256()
        try:
            self.fd = os.open(
                self.temp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644
            )
        except OSError as error:
            raise_for_disk(error, "a blob")

    def write(self, chunk: bytes | memoryview) -> None:
        """Append bytes; raise CacheFull when the disk is full."""
        view = memoryview(chunk)
        self._hash.update(view)
        while view:
            try:
                count = os.write(self.fd, view)
            except OSError as error:
                self.abort()
                raise_for_disk(error, f"blob sha256:{self.hex}")
            view = view[count:]
            self.written += count

    def commit(self, expected_size: int = -1) -> str:
        """Verify size and digest, flush, and move into place; return the path."""
        try:
            if expected_size >= 0 and self.written != expected_size:
                raise DigestInvalid(
                    f"blob sha256:{self.hex}: got {self.written} bytes, "
                    f"expected {expected_size}"
                )
            if self._hash.hexdigest() != self.hex:
                raise DigestInvalid(f"blob sha256:{self.hex}: digest mismatch")
            fsync_file(self.fd)
            final = self.store.blob_path(self.hex)
            os.rename(self.temp_path, final)
            # The rename is durable only once its directory is flushed too.
            fsync_dir(os.path.dirname(final))
        except BaseException:
            self.abort()
            raise
        os.close(self.fd)
        self.fd = -1
        return final

    def abort(self) -> None:
        """Throw the temporary file away (idempotent)."""
        if self.fd >= 0:
            # Readers of the download may keep the file open; emptying it
            # gives its space back now rather than when the last one closes.
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass


@dataclass
class _DirState:
    mtime_ns: int = -1


class Store:
    """The cache root: blob files and an in-memory index of manifest records."""

    def __init__(self, root: str, touch_interval: float = TOUCH_INTERVAL):
        self.root = os.path.abspath(root)
        self.touch_interval = touch_interval
        self._by_url: dict[str, Manifest] = {}
        self._by_path: dict[str, Manifest] = {}
        self._dir_states = {IMAGES: _DirState(), LATEST: _DirState()}
        self._touched: dict[str, float] = {}
        self._lock = RLock()
        self._host = socket.gethostname().replace(".", "-")
        for name in (BLOBS, IMAGES, LATEST, TEMP, LOCKS):
            os.makedirs(os.path.join(self.root, name), exist_ok=True)

    # -- paths -------------------------------------------------------------

    def blob_path(self, hex_digest: str) -> str:
        """Return the path a blob is (or would be) cached at."""
        return os.path.join(self.root, BLOBS, hex_digest)

    def temp_path(self, name: str) -> str:
        """Return a fresh temporary file path on the cache root's filesystem."""
        unique = f"{name}.{self._host}.{os.getpid()}.{next(_counter)}"
        return os.path.join(self.root, TEMP, unique)

    def lock(self, key: str) -> FileLock:
        """Return the cross-process lock for a piece of work."""
        name = hashlib.sha256(key.encode()).hexdigest()[:40]
        return FileLock(os.path.join(self.root, LOCKS, name))

    # -- blobs -------------------------------------------------------------

    def has_blob(self, hex_digest: str) -> bool:
        """Tell whether a blob is cached."""
        return os.path.exists(self.blob_path(hex_digest))

    def open_blob(self, hex_digest: str) -> tuple[int, int] | None:
        """Open a cached blob; return (fd, size), or None when absent."""
        try:
            fd = os.open(self.blob_path(hex_digest), os.O_RDONLY)
        except FileNotFoundError:
            return None
        return fd, os.fstat(fd).st_size

    def new_blob_writer(self, hex_digest: str) -> BlobWriter:
        """Start writing a blob to a temporary file."""
        return BlobWriter(self, hex_digest)

    def blob_names(self) -> Iterator[str]:
        """Yield the hex digest of every cached blob."""
        with os.scandir(os.path.join(self.root, BLOBS)) as entries:
            for entry in entries:
                yield entry.name

    # -- manifests -----------------------------------------------------------

    def find_manifest(self, image_url: str) -> Manifest | None:
        """Return the cached manifest of an image URL, refreshing on a miss."""
        manifest = self._by_url.get(image_url)
        if manifest is None and self.refresh():
            manifest = self._by_url.get(image_url)
        return manifest

    def manifests(self) -> list[Manifest]:
        """Return every cached manifest record (one per file)."""
        self.refresh()
        return list(self._by_path.values())

    def manifest_path(self, manifest: Manifest, image_url: str) -> str:
        """Return the record path of a manifest pulled as an image URL."""
        folder = LATEST if image_url.endswith(":latest") else IMAGES
        return os.path.join(self.root, folder, manifest.hex)

    def put_manifest(self, manifest: Manifest, image_url: str) -> Manifest:
        """Cache a verified manifest as an image URL; return the stored record."""
        path = self.manifest_path(manifest, image_url)
        with self._lock:
            record = self._by_path.get(path) or self._read_record(path)
            if record is None:
                record = manifest
                record.image_urls = [image_url]
            elif image_url not in record.image_urls:
                record.image_urls.append(image_url)
            else:
                record.pulled = now_stamp()
            previous = self._by_url.get(image_url)
            self._write_record(path, record)
            self._index(path, record)
            if previous is not None and previous is not record:
                self._detach(previous, image_url)
        return record

    def touch_manifest(self, manifest: Manifest, image_url: str) -> None:
        """Record a pull; written to disk at most once per touch interval."""
        manifest.pulled = now_stamp()
        path = self.manifest_path(manifest, image_url)
        now = time.monotonic()
        if now - self._touched.get(path, 0.0) < self.touch_interval:
            return
        self._touched[path] = now
        gevent.spawn(self._rewrite_quietly, path, manifest)

    def remove_manifest(self, manifest: Manifest) -> None:
        """Delete a manifest record (every file holding its digest)."""
        with self._lock:
            for path, record in list(self._by_path.items()):
                if record is manifest:
                    self._unlink(path)

    def load_index(self) -> int:
        """Index every manifest record on disk; return how many."""
        self.refresh(force=True)
        return len(self._by_path)

    def refresh(self, force: bool = False) -> bool:
        """Re-read the manifest folders if they changed; tell if they had."""
        changed = False
        for folder, state in self._dir_states.items():
            directory = os.path.join(self.root, folder)
            mtime = os.stat(directory).st_mtime_ns
            if mtime == state.mtime_ns and not force:
                continue
            state.mtime_ns = mtime
            self._rescan(directory)
            changed = True
        return changed

    # -- internals -----------------------------------------------------------

    def _rescan(self, directory: str) -> None:
        with self._lock:
            names = set(os.listdir(directory))
            for path in [p for p in self._by_path if os.path.dirname(p) == directory]:
                if os.path.basename(path) not in names:
                    self._forget(path)
            for name in names:
                path = os.path.join(directory, name)
                if path not in self._by_path:
                    record = self._read_record(path)
                    if record is not None:
                        self._index(path, record)

    def _read_record(self, path: str) -> Manifest | None:
        try:
            with open(path, "rb") as file:
                raw = file.read()
        except FileNotFoundError:
            return None
        try:
            return Manifest.from_record(raw)
        except ManifestInvalid as error:
            log.warning("skipping unreadable manifest record: %r: %s", path, error)
            return None

    def _write_record(self, path: str, record: Manifest) -> None:
        temp = self.temp_path(os.path.basename(path))
        try:
            fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            try:
                write_all(fd, record.to_record())
                fsync_file(fd)
            finally:
                os.close(fd)
            os.rename(temp, path)
            fsync_dir(os.path.dirname(path))
        except OSError as error:
            with_suppressed_unlink(temp)
            raise_for_disk(error, f"manifest {record.digest}")

    def _rewrite_quietly(self, path: str, record: Manifest) -> None:
        with self._lock:
            if self._by_path.get(path) is not record:
                return
            try:
                self._write_record(path, record)
            except (OSError, CacheFull) as error:
                log.warning("could not record pull time: %r: %s", path, error)

    def _index(self, path: str, record: Manifest) -> None:
        self._by_path[path] = record
        for url in record.image_urls:
            self._by_url[url] = record

    def _forget(self, path: str) -> None:
        record = self._by_path.pop(path, None)
        if record is None:
            return
        for url in record.image_urls:
            if self._by_url.get(url) is record:
                del self._by_url[url]

    def _unlink(self, path: str) -> None:
        self._forget(path)
        with_suppressed_unlink(path)

    def _detach(self, record: Manifest, image_url: str) -> None:
        """Drop an image URL from a record that no longer holds that tag."""
        if image_url in record.image_urls:
            record.image_urls.remove(image_url)
        path = next((p for p, r in self._by_path.items() if r is record), None)
        if path is None:
            return
        if record.image_urls:
            self._write_record(path, record)
        else:
            self._unlink(path)

    def clean_temp(self) -> int:
        """Remove temporary files left by dead processes; return how many."""
        removed = 0
        directory = os.path.join(self.root, TEMP)
        for name in os.listdir(directory):
            if self._is_orphan(name, os.path.join(directory, name)):
                with_suppressed_unlink(os.path.join(directory, name))
                removed += 1
        return removed

    def _is_orphan(self, name: str, path: str) -> bool:
        parts = name.rsplit(".", 3)
        if len(parts) != 4 or parts[1] != self._host:
            try:
                return time.time() - os.stat(path).st_mtime > STALE_TEMP_AGE
            except FileNotFoundError:
                return False
        pid = int(parts[2]) if parts[2].isdigit() else -1
        return pid != os.getpid() and not _is_alive(pid)


def _is_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_all(fd: int, data: bytes) -> None:
    """Write every byte: on a nearly full disk os.write takes only a part."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def with_suppressed_unlink(path: str) -> None:
    """Remove a file if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

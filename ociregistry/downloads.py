"""Blob downloads: one per blob, written to the cache, read by many clients.

A download runs in its own greenlet, independent of the client that asked
for it: it streams the upstream body into a temporary file while it hashes
it, and moves the file into place only once the digest checks out. Clients
(any number, joining at any time) read the temporary file as it grows, so the
first bytes reach them before the layer is on disk, and a client that goes
away does not stop the download. Across processes, the work is claimed with a
lock file; a process that finds the lock taken waits for the blob to appear.
"""

from __future__ import annotations

import errno
import logging
import os
import time
import weakref
from collections.abc import Iterator

import gevent
import urllib3
from gevent.event import Event
from gevent.pool import Pool
from urllib3.exceptions import HTTPError, ProtocolError, ReadTimeoutError

from ociregistry.errors import (
    BlobUnknown,
    DigestInvalid,
    RegistryError,
    UpstreamError,
    UpstreamTimeout,
)
from ociregistry.metrics import Metrics
from ociregistry.reference import Repository
from ociregistry.store import BlobWriter, FileLock, Store
from ociregistry.upstream import UpstreamClient, finish

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
CLAIM_POLL = 0.05  # seconds between looks at another process's download


class StreamAborted(ConnectionResetError):
    """Raised mid-body to make the WSGI server drop the client connection.

    Once headers and part of a body have been sent, the only honest way to
    report a failure is to close the connection short of Content-Length.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(errno.ECONNRESET, reason)


class Download:
    """One blob on its way from an upstream into the cache."""

    def __init__(self, hex_digest: str, repo: Repository, store: Store) -> None:
        self.hex = hex_digest
        self.repo = repo
        self.store = store
        self.size = -1
        self.written = 0
        self.temp_path = ""
        self.is_done = False
        self.is_cached = False
        self.error: RegistryError | None = None
        self.started = Event()
        self.fd = -1
        self._readers = 0
        self._changed = Event()

    def attach(self, fd: int) -> None:
        """Serve readers from this open file until the download is over.

        Readers share the descriptor (pread keeps no position), so they go on
        reading the same bytes after the file is renamed into place, and even
        after a prune unlinks it. It is closed once the download has ended
        and no reader is left, so a failed download frees its disk space.
        """
        self.fd = fd

    def finish(self) -> None:
        """Mark the download ended and wake its readers."""
        self.is_done = True
        self.started.set()
        self.notify()
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self.is_done and self._readers == 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def notify(self) -> None:
        """Wake every reader waiting for more bytes or the end."""
        changed, self._changed = self._changed, Event()
        changed.set()

    def wait_started(self, timeout: float) -> None:
        """Wait until the size is known or the download ended; raise its error."""
        if not self.started.wait(timeout):
            raise UpstreamTimeout(self.repo.upstream, "no blob data in time")
        if self.error is not None:
            raise self.error

    def read(self, start: int, end: int, timeout: float) -> Iterator[bytes]:
        """Yield bytes [start, end) (end -1: to the end) as they arrive.

        The blob's last byte is held back until its digest has been checked,
        so a client never receives a complete body of wrong bytes.
        """
        if self.fd < 0 and self.error is None and self.is_done:
            yield from self._read_cached(start, end)
            return
        if self.fd < 0:
            raise self.error or BlobUnknown(f"blob sha256:{self.hex} vanished")
        self._readers += 1
        try:
            position = start
            while end < 0 or position < end:
                changed = self._changed
                if self.error is not None:
                    raise StreamAborted(self.error.message)
                sendable = self._sendable()
                available = sendable if end < 0 else min(sendable, end)
                if available > position:
                    for chunk in _pread_range(self.fd, position, available):
                        position += len(chunk)
                        yield chunk
                    continue
                if self.is_done:
                    break
                if not changed.wait(timeout):
                    raise StreamAborted("blob download stalled")
        finally:
            self._readers -= 1
            self._close_if_idle()

    def _read_cached(self, start: int, end: int) -> Iterator[bytes]:
        """Read a blob this download finished, from its place in the cache."""
        opened = self.store.open_blob(self.hex)
        if opened is None:
            raise BlobUnknown(f"blob sha256:{self.hex} vanished")
        fd, size = opened
        try:
            yield from _pread_range(fd, start, size if end < 0 else end)
        finally:
            os.close(fd)

    def _sendable(self) -> int:
        """Return how many bytes may go to clients now."""
        if self.is_done:
            return self.written
        return max(self.written - 1, 0)


def _pread_range(fd: int, start: int, end: int) -> Iterator[bytes]:
    position = start
    while position < end:
        chunk = os.pread(fd, min(CHUNK, end - position), position)
        if not chunk:
            return
        position += len(chunk)
        yield chunk


class Downloads:
    """Start blob downloads, at most one per blob in this process."""

    def __init__(
        self,
        store: Store,
        client: UpstreamClient,
        pull_timeout: float,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.pull_timeout = pull_timeout
        self.metrics = metrics or Metrics()
        self.active: dict[str, Download] = {}
        self.pool = Pool()
        # Downloads that finished but still have readers: a weak reference
        # lives exactly as long as some client is served from one.
        self._served: weakref.WeakValueDictionary[str, Download] = (
            weakref.WeakValueDictionary()
        )

    def get(self, hex_digest: str, repo: Repository) -> Download:
        """Return the running download of a blob, or start one."""
        download = self.active.get(hex_digest)
        if download is None:
            download = Download(hex_digest, repo, self.store)
            self.active[hex_digest] = self._served[hex_digest] = download
            self.pool.spawn(self._run, download)
        return download

    def prefetch(self, hex_digest: str, repo: Repository) -> None:
        """Fetch a blob in the background if it is not cached yet."""
        if hex_digest not in self.active and not self.store.has_blob(hex_digest):
            self.get(hex_digest, repo)

    def is_in_use(self, hex_digest: str) -> bool:
        """Tell whether this process is writing a blob or serving it from one."""
        return hex_digest in self.active or hex_digest in self._served

    def _run(self, download: Download) -> None:
        lock = self.store.lock(f"blob:{download.hex}")
        try:
            if self._claim(lock, download):
                self._fetch(download)
        except RegistryError as error:
            download.error = error
            log.error("blob download failed: %r: %s", download.hex[:12], error.message)
        except Exception as error:  # crash barrier: a reader must never hang
            download.error = UpstreamError(download.repo.upstream, str(error))
            log.exception("blob download crashed: %r", download.hex[:12])
        finally:
            lock.release()
            self.active.pop(download.hex, None)
            download.finish()

    def _claim(self, lock: FileLock, download: Download) -> bool:
        """Take the blob's lock; return False when another process cached it."""
        deadline = time.monotonic() + self.pull_timeout
        last_seen = (-1, -1)
        while not lock.try_acquire():
            if self._finish_if_cached(download):
                return False
            seen = self._progress_elsewhere(download.hex)
            if seen != last_seen:
                last_seen, deadline = seen, time.monotonic() + self.pull_timeout
            if time.monotonic() > deadline:
                raise UpstreamTimeout(
                    download.repo.upstream, "another process's download stalled"
                )
            gevent.sleep(CLAIM_POLL)
        return not self._finish_if_cached(download)

    def _finish_if_cached(self, download: Download) -> bool:
        opened = self.store.open_blob(download.hex)
        if opened is None:
            return False
        fd, size = opened
        os.close(fd)
        download.size = download.written = size
        download.is_cached = True
        return True

    def _progress_elsewhere(self, hex_digest: str) -> tuple[int, int]:
        """Sum the temp files of other processes' downloads of this blob."""
        temp = os.path.join(self.store.root, ".tmp")
        sizes = [
            entry.stat().st_size
            for entry in os.scandir(temp)
            if entry.name.startswith(hex_digest)
        ]
        return len(sizes), sum(sizes)

    def _fetch(self, download: Download) -> None:
        self.metrics.upstream_pull(download.repo.upstream)
        upstream = self.client.upstream(download.repo.upstream)
        log.info(
            'pulling blob from upstream: "%s@sha256:%s"',
            download.repo.url,
            download.hex,
        )
        with upstream.slot():
            response = self.client.open_blob(download.repo, f"sha256:{download.hex}")
            try:
                length = response.headers.get("Content-Length", "")
                download.size = int(length) if length.isdigit() else -1
                writer = self.store.new_blob_writer(download.hex)
                download.temp_path = writer.temp_path
                download.attach(os.open(writer.temp_path, os.O_RDONLY))
                download.started.set()
                try:
                    self._copy(response, writer, download)
                    writer.commit(download.size)
                except DigestInvalid as error:
                    writer.abort()
                    raise UpstreamError(download.repo.upstream, error.message) from None
                except BaseException:
                    writer.abort()
                    raise
            finally:
                finish(response)
        download.is_cached = True
        log.debug("cached blob: %r (%d bytes)", download.hex[:12], download.written)

    def _copy(
        self,
        response: urllib3.BaseHTTPResponse,
        writer: BlobWriter,
        download: Download,
    ) -> None:
        upstream = download.repo.upstream
        try:
            # read1 hands over whatever has arrived (up to CHUNK), so a slow
            # upstream's bytes reach clients as they come.
            while chunk := response.read1(CHUNK):
                writer.write(chunk)
                download.written = writer.written
                download.notify()
                # A fast upstream never makes the socket block, so without a
                # yield this loop would keep every client waiting until the
                # whole blob is on disk.
                gevent.sleep(0)
        except ReadTimeoutError:
            raise UpstreamTimeout(upstream, "blob download timed out") from None
        except (ProtocolError, HTTPError, OSError) as error:
            raise UpstreamError(upstream, f"blob download broke off: {error}") from None

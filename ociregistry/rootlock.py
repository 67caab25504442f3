"""The serving lock of a cache root: servers share it, `prune` and `load` own it.

A running server (each worker process of one) holds a shared flock on
`<root>/.locks/serving` for its lifetime. The commands that change the cache
behind a server's back take the same lock exclusively, without waiting, and
refuse to run when a server holds it. The kernel drops the lock when its
holder dies, so a crashed server never blocks a later prune.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from ociregistry.errors import ConfigError
from ociregistry.store import LOCKS

SERVING = "serving"


class RootLock:
    """The serving lock file of one cache root."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.path = os.path.join(self.root, LOCKS, SERVING)
        self.fd = -1

    def hold_shared(self) -> None:
        """Hold the lock as a server; raise ConfigError while a command owns it."""
        if not self._try(fcntl.LOCK_SH):
            raise ConfigError(
                f"cache root {self.root} is in use by a prune or load command"
            )

    def hold_exclusive(self) -> None:
        """Own the lock for a command; raise ConfigError while a server runs."""
        if not self._try(fcntl.LOCK_EX):
            raise ConfigError(f"cache root {self.root} is in use by a running server")

    def release(self) -> None:
        """Let the lock go (idempotent); the file stays for other holders."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _try(self, mode: int) -> bool:
        """Take the lock in `mode` without waiting; tell whether it was free."""
        self.release()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True


@contextlib.contextmanager
def exclusive_root(root: str) -> Iterator[RootLock]:
    """Own a cache root for the time of a command; raise if a server runs."""
    lock = RootLock(root)
    lock.hold_exclusive()
    try:
        yield lock
    finally:
        lock.release()

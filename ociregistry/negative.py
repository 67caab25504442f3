"""The negative cache: tags an upstream said it does not have, for a while."""

from __future__ import annotations

import logging
from time import monotonic

from ociregistry.errors import ManifestUnknown
from ociregistry.reference import is_digest

log = logging.getLogger(__name__)

MAX_ENTRIES = 10_000


class NegativeCache:
    """Remember upstream 404s for tags, so repeated asks stay with us.

    A client that asks again and again for a missing tag (a typo in a
    deployment, a crash-looping pod) reaches the upstream once per `ttl`
    seconds at most. Memory is bounded: past `max_entries`, expired entries go
    first, then the oldest. A `ttl` of 0 turns the cache off.
    """

    def __init__(self, ttl: float, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._expiry: dict[str, float] = {}  # image URL -> monotonic()

    def check(self, image_url: str) -> None:
        """Raise ManifestUnknown when the upstream lately had no such tag."""
        expiry = self._expiry.get(image_url)
        if expiry is None:
            return
        remaining = expiry - monotonic()
        if remaining <= 0:
            self._expiry.pop(image_url, None)
            return
        log.info('answering from negative cache: "%s"', image_url)
        raise ManifestUnknown(
            f"{image_url} not found upstream (known missing for {remaining:.0f}s more)"
        )

    def remember(self, image_url: str, reference: str) -> None:
        """Record that the upstream answered 404 for a tag (digests are not)."""
        if self.ttl <= 0 or is_digest(reference):
            return
        if image_url not in self._expiry and len(self._expiry) >= self.max_entries:
            self._make_room()
        self._expiry[image_url] = monotonic() + self.ttl
        log.info('remembering missing tag for %gs: "%s"', self.ttl, image_url)

    def forget(self, image_url: str) -> None:
        """Drop what is remembered about a tag (it was cached after all)."""
        self._expiry.pop(image_url, None)

    def __len__(self) -> int:
        return len(self._expiry)

    def _make_room(self) -> None:
        now = monotonic()
        for url in [url for url, expiry in self._expiry.items() if expiry <= now]:
            del self._expiry[url]
        excess = len(self._expiry) - self.max_entries + 1
        for url in list(self._expiry)[: max(excess, 0)]:
            del self._expiry[url]

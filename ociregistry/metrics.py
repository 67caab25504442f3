"""Counters of what the server does; free when metrics are switched off."""

from __future__ import annotations


class Metrics:
    """Record events; this base class records nothing (metrics off)."""

    def cached_pull(self, namespace: str) -> None:
        """Count a manifest or blob served from the cache."""

    def upstream_pull(self, namespace: str) -> None:
        """Count a manifest or blob pulled from an upstream."""

    def manifest_pull(self) -> None:
        """Count a manifest request."""

    def blob_pull(self) -> None:
        """Count a blob request."""

    def endpoint_hit(self, endpoint: str) -> None:
        """Count a request to an API endpoint (manifests, blobs, ...)."""

    def api_error(self, status: int) -> None:
        """Count a request answered with an error."""

    def request_seconds(self, endpoint: str, seconds: float) -> None:
        """Observe a request's latency."""

"""Counters of what the server does; free when metrics are switched off.

`Metrics` is the interface the rest of the server calls; its methods do
nothing, so a server without `--metrics` pays one no-op call per event.
`PrometheusMetrics` records them with prometheus-client under the names the
Go server exposes (`ociregistry_cached_pulls_by_ns_total`, …), so its
dashboards keep working, plus request latency and in-flight downloads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric, UnknownMetricFamily
from prometheus_client.registry import Collector

from ociregistry.store import BLOBS, Store

NAMESPACE = "ociregistry"
DISK_REFRESH = 2.0  # seconds the on-disk figures are reused between scrapes
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


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

    def watch(self, store: Store, in_flight: Callable[[], int]) -> None:
        """Report the cache root's size and the running upstream downloads."""


class PrometheusMetrics(Metrics):
    """Record events in a prometheus-client registry of this server's own."""

    def __init__(self) -> None:
        # The Go server exposes no `_created` series; neither do we.
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self._cached_pulls = _counter(
            self.registry, "cached_pulls_by_ns", "Pulls served from the cache", ["ns"]
        )
        self._manifest_pulls = _counter(
            self.registry, "manifest_pulls", "Manifest requests"
        )
        self._blob_pulls = _counter(self.registry, "blob_pulls", "Blob requests")
        self._endpoint_hits = _counter(
            self.registry,
            "v2_api_endpoint_hits",
            "Requests to the registry API, by endpoint",
            ["endpoint"],
        )
        self._api_errors = _counter(
            self.registry, "api_errors", "Requests answered with an error", ["status"]
        )
        self._latency = Histogram(
            "request_duration_seconds",
            "Time from request to the last byte of the answer, by endpoint",
            ["endpoint"],
            namespace=NAMESPACE,
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.upstream_pulls = UpstreamPulls()
        self.registry.register(self.upstream_pulls)

    def cached_pull(self, namespace: str) -> None:
        """Count a manifest or blob served from the cache."""
        self._cached_pulls.labels(namespace).inc()

    def upstream_pull(self, namespace: str) -> None:
        """Count a manifest or blob pulled from an upstream."""
        self.upstream_pulls.count(namespace)

    def manifest_pull(self) -> None:
        """Count a manifest request."""
        self._manifest_pulls.inc()

    def blob_pull(self) -> None:
        """Count a blob request."""
        self._blob_pulls.inc()

    def endpoint_hit(self, endpoint: str) -> None:
        """Count a request to an API endpoint (manifests, blobs, ...)."""
        self._endpoint_hits.labels(endpoint).inc()

    def api_error(self, status: int) -> None:
        """Count a request answered with an error."""
        self._api_errors.labels(str(status)).inc()

    def request_seconds(self, endpoint: str, seconds: float) -> None:
        """Observe a request's latency."""
        self._latency.labels(endpoint).observe(seconds)

    def watch(self, store: Store, in_flight: Callable[[], int]) -> None:
        """Report the cache root's size and the running upstream downloads."""
        self.registry.register(CacheCollector(store, in_flight))

    def exposition(self) -> bytes:
        """Return every metric in the Prometheus text format."""
        return prometheus_client.generate_latest(self.registry)

    def wsgi_app(self) -> WsgiApp:
        """Return the WSGI app that answers `GET /metrics`."""
        return MetricsApp(self)


def _counter(
    registry: CollectorRegistry,
    name: str,
    documentation: str,
    labels: Sequence[str] = (),
) -> Counter:
    """Make a counter exposed as `ociregistry_<name>_total`."""
    return Counter(name, documentation, labels, namespace=NAMESPACE, registry=registry)


class UpstreamPulls(Collector):
    """Count upstream pulls by namespace as `ociregistry_upstream_pulls_by_ns`.

    The Go server's name has no `_total`, which prometheus-client adds to
    every counter; so the counts are kept here and exposed untyped.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def count(self, namespace: str) -> None:
        """Count one pull from an upstream."""
        self.counts[namespace] = self.counts.get(namespace, 0) + 1

    def collect(self) -> Iterator[Metric]:
        """Yield the counts."""
        family = UnknownMetricFamily(
            f"{NAMESPACE}_upstream_pulls_by_ns",
            "Pulls from upstreams, by namespace",
            labels=["ns"],
        )
        for namespace, count in sorted(self.counts.items()):
            family.add_metric([namespace], count)
        yield family


class CacheCollector(Collector):
    """Measure the cache root when scraped, at most once per DISK_REFRESH."""

    def __init__(
        self, store: Store, in_flight: Callable[[], int], interval: float = DISK_REFRESH
    ) -> None:
        self.store = store
        self.in_flight = in_flight
        self.interval = interval
        self._measured = float("-inf")
        self._figures: dict[str, tuple[str, float]] = {}

    def collect(self) -> Iterator[Metric]:
        """Yield the on-disk figures and the running downloads."""
        for name, (documentation, value) in self.figures().items():
            yield GaugeMetricFamily(f"{NAMESPACE}_{name}", documentation, value=value)
        yield GaugeMetricFamily(
            f"{NAMESPACE}_upstream_pulls_in_flight",
            "Blob downloads from upstreams in progress",
            value=self.in_flight(),
        )

    def figures(self) -> dict[str, tuple[str, float]]:
        """Return name → (help, value) of the cache root, measured recently."""
        now = time.monotonic()
        if now - self._measured >= self.interval:
            self._figures = self.measure()
            self._measured = now
        return self._figures

    def measure(self) -> dict[str, tuple[str, float]]:
        """Count and size the blobs and manifests in the cache root."""
        blob_count, blob_bytes = _sizes(os.path.join(self.store.root, BLOBS))
        manifests = self.store.manifests()
        manifest_bytes = sum(len(manifest.data) for manifest in manifests)
        return {
            "blob_bytes_on_disk_total": ("Bytes of cached blobs", blob_bytes),
            "manifest_bytes_on_disk_total": (
                "Bytes of cached manifests",
                manifest_bytes,
            ),
            "cached_manifest_count": ("Cached manifests", len(manifests)),
            "cached_blob_count": ("Cached blobs", blob_count),
        }


def _sizes(directory: str) -> tuple[int, int]:
    """Return the number of files in a directory and their total size."""
    count = total = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                continue  # pruned while we looked
            count += 1
    return count, total


class MetricsApp:
    """The WSGI app of the metrics port: `GET /metrics`, else 404."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self.metrics = metrics

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: try /metrics\n"]
        body = self.metrics.exposition()
        headers = [
            ("Content-Type", prometheus_client.CONTENT_TYPE_LATEST),
            ("Content-Length", str(len(body))),
        ]
        start_response("200 OK", headers)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

"""The registry service: cache store, upstream client and routes, wired."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import bottle

from ociregistry.access import AdminAccess
from ociregistry.admin import AdminApi
from ociregistry.cache import PullThroughCache
from ociregistry.config import Settings, with_host_platform
from ociregistry.errors import RegistryError
from ociregistry.helloworld import hello_world_settings, remove_cache_root
from ociregistry.loader import preload_images
from ociregistry.metrics import Metrics, PrometheusMetrics
from ociregistry.pruner import BackgroundPruner, serving_pruner
from ociregistry.quota import Quota
from ociregistry.readapi import ReadApi
from ociregistry.reference import UpstreamPolicy, normalize_upstream
from ociregistry.rootlock import RootLock
from ociregistry.routes import JSON, RegistryApi, oci_errors_plugin
from ociregistry.store import Store
from ociregistry.upstream import UpstreamClient
from ociregistry.wsgi import AccessLog

log = logging.getLogger(__name__)


class Registry:
    """Own everything `serve` runs: the WSGI app and its background work."""

    def __init__(
        self,
        settings: Settings,
        request_stop: Callable[[], None],
        metrics: Metrics | None = None,
    ) -> None:
        self.hello_world_root = ""
        if settings.hello_world:
            settings, self.hello_world_root = hello_world_settings(settings)
        settings = with_host_platform(settings)
        self.settings = settings
        self.request_stop = request_stop
        if metrics is None:
            metrics = PrometheusMetrics() if settings.metrics else Metrics()
        self.metrics = metrics
        self.store = Store(settings.image_path)
        self.client = UpstreamClient(settings)
        self.cache = PullThroughCache(settings, self.store, self.client, self.metrics)
        self.policy = UpstreamPolicy(
            default_ns=normalize_upstream(settings.default_ns)
            if settings.default_ns
            else "",
            allowed=tuple(settings.allowed_upstreams),
        )
        self.api = RegistryApi(self.cache, self.policy, self.metrics)
        ReadApi(self.api, self.cache).install()
        self.app = build_app(self.api, self.metrics)
        self.pruner = serving_pruner(self.store, self.cache.downloads)
        access = AdminAccess(settings.admin_api)
        AdminApi(self.pruner, request_stop, access).install(self.app)
        self.background_pruner = BackgroundPruner(self.pruner, settings.prune)
        self.quota = Quota(
            self.pruner, self.store, settings.prune.max_bytes, settings.pull_timeout
        )
        self.root_lock = RootLock(self.store.root)
        self.metrics.watch(self.store, lambda: len(self.cache.downloads.active))
        self.wsgi = AccessLog(self.app, self.metrics)
        self.is_ready = False

    def start(self) -> None:
        """Clean up after dead processes and index the cache."""
        self.root_lock.hold_shared()
        started = time.monotonic()
        removed = self.store.clean_temp()
        count = self.store.load_index()
        log.info(
            "indexed cache: %d manifests in %.2fs (%d stale temporary files removed)",
            count,
            time.monotonic() - started,
            removed,
        )
        if self.settings.preload_images:
            preload_images(self.settings, self.store, self.cache)
        self.background_pruner.start()
        self.quota.start()
        self.is_ready = True

    def close(self) -> None:
        """Stop background tasks and release upstream connections."""
        self.is_ready = False
        self.background_pruner.stop()
        self.quota.stop()
        self.cache.downloads.pool.kill(block=False)
        self.client.close()
        self.root_lock.release()
        if self.hello_world_root:
            remove_cache_root(self.hello_world_root)


def build_app(api: RegistryApi, metrics: Metrics) -> bottle.Bottle:
    """Make the Bottle app: routes, OCI error rendering, JSON 404/405."""
    app = bottle.Bottle()
    app.install(oci_errors_plugin(metrics))
    api.install(app)
    app.default_error_handler = _plain_error
    return app


def _plain_error(error: bottle.HTTPError) -> str:
    bottle.response.set_header("Content-Type", JSON)
    code = {404: "NAME_UNKNOWN", 405: "UNSUPPORTED"}.get(error.status_code, "UNKNOWN")
    return RegistryError.body_for(code, str(error.body or error.status_line))

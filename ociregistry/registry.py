"""The registry service: cache store, upstream client and routes, wired."""

from __future__ import annotations

from collections.abc import Callable

import bottle

from ociregistry.config import Settings


class Registry:
    """Own everything `serve` runs: the WSGI app and its background work."""

    def __init__(self, settings: Settings, request_stop: Callable[[], None]):
        self.settings = settings
        self.request_stop = request_stop
        self.wsgi = bottle.Bottle()
        self.wsgi.route("/v2/", ["GET", "HEAD"], lambda: "{}")

    def start(self) -> None:
        """Index the cache and start background tasks."""

    def close(self) -> None:
        """Stop background tasks and release upstream connections."""

"""Background pruning on the `pruneConfig` schedule, and the serving pruner."""

from __future__ import annotations

import logging

import gevent
from gevent.event import Event

from ociregistry.config import PruneSettings
from ociregistry.downloads import Downloads
from ociregistry.prune import Pruner, PruneResult, age_selection
from ociregistry.store import Store

log = logging.getLogger(__name__)

# A blob no manifest references may belong to a pull or load that has not
# written its manifest yet; a serving prune leaves such blobs this long.
ORPHAN_AGE = 600.0  # seconds


def serving_pruner(store: Store, downloads: Downloads) -> Pruner:
    """Return the pruner of a serving process, which spares blobs in use."""
    return Pruner(store, downloads.is_in_use, ORPHAN_AGE)


class BackgroundPruner:
    """Prune on a schedule in a greenlet of its own, until stopped."""

    def __init__(self, pruner: Pruner, settings: PruneSettings) -> None:
        self.pruner = pruner
        self.settings = settings
        self.runs = 0
        self._stopped = Event()
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        """Start the schedule when pruneConfig enables it."""
        if not self.settings.enabled or self._greenlet is not None:
            return
        log.info(
            "background pruning every %.0fs: type=%s duration=%.0fs count=%d "
            "dry_run=%s",
            self.settings.frequency,
            self.settings.type,
            self.settings.duration,
            self.settings.count,
            self.settings.dry_run,
        )
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop the schedule; a prune under way finishes first."""
        self._stopped.set()
        if self._greenlet is not None:
            self._greenlet.join(timeout=10.0)
            self._greenlet.kill(block=False)
            self._greenlet = None

    def _run(self) -> None:
        while not self._stopped.wait(self.settings.frequency):
            try:
                self.prune_once()
            except Exception:  # the schedule must survive one bad run
                log.exception("background prune failed")

    def prune_once(self) -> PruneResult:
        """Prune what the settings say is due now, and log what went."""
        selection = age_selection(
            self.settings.type, self.settings.duration, self.settings.count
        )
        result = self.pruner.prune(selection, self.settings.dry_run)
        self.runs += 1
        for line in result.lines()[:-1]:
            is_detail = line.startswith("blob ") and not result.is_dry_run
            level = logging.DEBUG if is_detail else logging.INFO
            log.log(level, "background prune: %s", line)
        log.info("background prune: %s", result.summary())
        return result

"""Background pruning on the `pruneConfig` schedule, and the serving pruner."""

from __future__ import annotations

import logging

from ociregistry.config import PruneSettings
from ociregistry.downloads import Downloads
from ociregistry.periodic import PeriodicTask
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
        self._task = PeriodicTask(
            "background prune", settings.frequency, self.prune_once
        )

    def start(self) -> None:
        """Start the schedule when pruneConfig enables it."""
        if not self.settings.enabled:
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
        self._task.start()

    def stop(self) -> None:
        """Stop the schedule; a prune under way finishes first."""
        self._task.stop()

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

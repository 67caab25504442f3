"""Background work repeated on a schedule, in a greenlet of its own."""

from __future__ import annotations

import logging
from collections.abc import Callable

import gevent
from gevent.event import Event

log = logging.getLogger(__name__)

STOP_WAIT = 10.0  # seconds a run under way may take to finish at stop


class PeriodicTask:
    """Call a function every `interval` seconds until stopped.

    A run that raises is logged and the schedule goes on; `stop` lets a run
    under way finish (bounded by STOP_WAIT) before it returns.
    """

    def __init__(self, name: str, interval: float, run: Callable[[], object]):
        self.name = name
        self.interval = interval
        self.run = run
        self._stopped = Event()
        self._greenlet: gevent.Greenlet | None = None

    @property
    def is_running(self) -> bool:
        """Tell whether the schedule is started."""
        return self._greenlet is not None

    def start(self) -> None:
        """Start the schedule (idempotent)."""
        if self._greenlet is None:
            self._stopped.clear()
            self._greenlet = gevent.spawn(self._loop)

    def stop(self) -> None:
        """Stop the schedule (idempotent)."""
        self._stopped.set()
        if self._greenlet is not None:
            self._greenlet.join(timeout=STOP_WAIT)
            self._greenlet.kill(block=False)
            self._greenlet = None

    def _loop(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self.run()
            except Exception:  # the schedule must survive one bad run
                log.exception("%s failed", self.name)

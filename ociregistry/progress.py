"""Report a load as it runs: live lines on a terminal, log lines, a summary."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from typing import IO

import gevent
from gevent.event import Event

log = logging.getLogger(__name__)

REDRAW_INTERVAL = 0.2  # seconds between redraws of the live lines
MAX_LIVE_LINES = 8
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_ERASE_LINES = "\x1b[{}F\x1b[J"  # up n lines to their start, clear below


def format_size(count: float) -> str:
    """Return a byte count for people: `512 B`, `1.5 MiB`."""
    unit = 0
    while abs(count) >= 1024 and unit < len(_UNITS) - 1:
        count /= 1024
        unit += 1
    return f"{count:.0f} B" if unit == 0 else f"{count:.1f} {_UNITS[unit]}"


class Task:
    """One piece of work shown as a live line: bytes so far, of a total."""

    def __init__(self, label: str, total: int = -1) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.started = time.monotonic()

    @property
    def seconds(self) -> float:
        """Return how long the task has been running."""
        return time.monotonic() - self.started

    def advance(self, count: int) -> None:
        """Count bytes done."""
        self.done += count

    def line(self) -> str:
        """Return the live line: label, bytes (of total) and rate."""
        amount = format_size(self.done)
        if self.total >= 0:
            amount += f" / {format_size(self.total)}"
        rate = format_size(self.done / max(self.seconds, 0.001))
        return f"{self.label}  {amount}  {rate}/s"


@dataclass
class Summary:
    """What a load did: images loaded, already cached, failed; bytes written."""

    loaded: int = 0
    cached: int = 0
    failed: list[str] = field(default_factory=list)
    written: int = 0
    started: float = field(default_factory=time.monotonic)

    def describe(self) -> str:
        """Return the one-line summary printed at the end of a load."""
        seconds = time.monotonic() - self.started
        if not self.loaded and not self.failed:
            return (
                f"nothing to load: {_images(self.cached)} already cached, "
                f"nothing fetched or written ({seconds:.1f}s)"
            )
        return (
            f"loaded {_images(self.loaded)} ({format_size(self.written)} written) "
            f"in {seconds:.1f}s; {self.cached} already cached, "
            f"{len(self.failed)} failed"
        )


def _images(count: int) -> str:
    return f"{count} image" if count == 1 else f"{count} images"


class Progress:
    """Report images as they load, and count them for the summary.

    With a terminal `stream`, a greenlet redraws one line per running task
    until `close`; without one, only log lines are written.
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream
        self.summary = Summary()
        self._tasks: list[Task] = []
        self._drawn = 0
        self._closed = Event()
        self._ticker = gevent.spawn(self._tick) if stream is not None else None

    def track(self, label: str, total: int = -1) -> Task:
        """Start a live line."""
        task = Task(label, total)
        self._tasks.append(task)
        return task

    def untrack(self, task: Task) -> None:
        """End a live line."""
        if task in self._tasks:
            self._tasks.remove(task)

    def loaded(self, label: str, size: int, seconds: float) -> None:
        """Count an image written to the cache."""
        self.summary.loaded += 1
        self.summary.written += size
        log.info('loaded image: "%s" (%s in %.1fs)', label, format_size(size), seconds)
        self._print(f"loaded {label} ({format_size(size)} in {seconds:.1f}s)")

    def cached(self, label: str) -> None:
        """Count an image that was in the cache already."""
        self.summary.cached += 1
        log.info('image already cached: "%s"', label)
        self._print(f"already cached {label}")

    def failed(self, label: str, reason: str) -> None:
        """Count an image that could not be loaded, and say why."""
        self.summary.failed.append(label)
        self._erase()
        log.error('image load failed: "%s": %s', label, reason)

    def close(self) -> None:
        """Stop redrawing and clear the live lines."""
        self._closed.set()
        if self._ticker is not None:
            self._ticker.join()
        self._erase()

    # -- the terminal ------------------------------------------------------------

    def _tick(self) -> None:
        while not self._closed.wait(REDRAW_INTERVAL):
            self._draw()

    def _draw(self) -> None:
        width = shutil.get_terminal_size().columns - 1
        lines = [task.line()[:width] for task in self._tasks[:MAX_LIVE_LINES]]
        if len(self._tasks) > MAX_LIVE_LINES:
            lines.append(f"… and {len(self._tasks) - MAX_LIVE_LINES} more")
        self._erase()
        self._write("".join(f"{line}\n" for line in lines))
        self._drawn = len(lines)

    def _print(self, text: str) -> None:
        if self.stream is not None:
            self._erase()
            self._write(f"{text}\n")

    def _erase(self) -> None:
        if self._drawn:
            self._write(_ERASE_LINES.format(self._drawn))
            self._drawn = 0

    def _write(self, text: str) -> None:
        if self.stream is not None and text:
            self.stream.write(text)
            self.stream.flush()

"""Unit tests of scheduled background work."""

from __future__ import annotations

from gevent.event import Event

from ociregistry.periodic import PeriodicTask


def test_task_runs_repeatedly_survives_a_failure_and_stops():
    calls = []
    third = Event()

    def run():
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("one bad run")
        if len(calls) == 3:
            third.set()

    task = PeriodicTask("test task", 0.01, run)
    task.start()
    assert task.is_running
    assert third.wait(5)
    task.stop()

    assert len(calls) >= 3
    assert not task.is_running

"""Full garbage collections are run by base workers when idle, not by allocation counts."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator

import pytest

from mint.control import collector
from mint.control.worker import BaseWorker
from mint.models.base import ResidentBase


@pytest.fixture
def deferred(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Deferral on for one test; yields the generations of the collections that ran."""
    thresholds = gc.get_threshold()
    monkeypatch.setitem(collector._state, "deferred", False)
    monkeypatch.setitem(collector._state, "last", 0.0)
    generations: list[int] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            generations.append(info["generation"])

    gc.callbacks.append(note)
    collector.defer_full_collections()
    yield generations
    gc.callbacks.remove(note)
    gc.set_threshold(*thresholds)


def test_deferral_keeps_the_young_generations_automatic(deferred: list[int]) -> None:
    young, middle, full = gc.get_threshold()
    assert (young, middle) == (700, 10) and full == 1 << 30


def test_collections_are_due_by_idleness_and_by_a_ceiling(deferred: list[int]) -> None:
    collector._state["last"] = 100.0
    assert not collector.collect_if_due(idle=True, now=100.5)
    assert collector.collect_if_due(idle=True, now=101.0)
    assert not collector.collect_if_due(idle=False, now=150.0)  # busy: only past the ceiling
    assert collector.collect_if_due(idle=False, now=161.0)
    assert deferred.count(2) == 2


def test_nothing_is_collected_without_deferral(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(collector._state, "deferred", False)
    assert not collector.collect_if_due(idle=True, now=1e9)


def test_an_idle_worker_runs_the_full_collection(
    tiny_base: ResidentBase, deferred: list[int]
) -> None:
    worker = BaseWorker(tiny_base)
    try:
        deadline = time.monotonic() + 10
        while 2 not in deferred and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        worker.stop()
    assert 2 in deferred

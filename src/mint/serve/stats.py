"""What an engine counts about its adapter tiers and its output, as plain numbers.

The serve layer only counts; `mint.api.metrics` turns these numbers into Prometheus metrics
at scrape time, so the engine never depends on the HTTP layer.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the cold-load latency histogram buckets; +Inf is implied.
COLD_LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Tiers a request can find its adapter in: a slot, the host cache, or only the catalog.
TIERS = ("slot", "host_cache", "catalog")
#: How far back `tokens_per_second` looks.
RATE_WINDOW_S = 10.0


@dataclass
class ServeStats:
    """Counters of one engine; every method is safe to call from any thread."""

    cold_loads: int = 0
    cold_load_seconds_sum: float = 0.0
    #: Cumulative-free bucket counts, one per `COLD_LOAD_BUCKETS` bound plus one for +Inf.
    cold_load_buckets: list[int] = field(default_factory=lambda: [0] * (len(COLD_LOAD_BUCKETS) + 1))
    shared_load_hits: int = 0
    tier_hits: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    sampled_tokens: int = 0
    _recent: deque[tuple[float, int]] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record_cold_load(self, seconds: float, tier: str) -> None:
        """A finished load whose revision came from `tier` ("host_cache" or "catalog")."""
        with self._lock:
            self.cold_loads += 1
            self.cold_load_seconds_sum += seconds
            self.cold_load_buckets[bisect.bisect_left(COLD_LOAD_BUCKETS, seconds)] += 1
            self.tier_hits[tier] += 1

    def record_slot_hit(self) -> None:
        with self._lock:
            self.tier_hits["slot"] += 1

    def record_shared_hit(self) -> None:
        with self._lock:
            self.shared_load_hits += 1

    def record_refusal(self, reason: str) -> None:
        with self._lock:
            self.refusals[reason] += 1

    def record_tokens(self, count: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self.sampled_tokens += count
            self._recent.append((now, count))
            self._trim_locked(now)

    def _trim_locked(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self, now: float | None = None) -> float:
        """Tokens sampled per second over the last `RATE_WINDOW_S` seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim_locked(now)
            return sum(count for _, count in self._recent) / RATE_WINDOW_S

    def snapshot(self) -> dict[str, object]:
        """A consistent copy of every counter, for metrics and benchmarks."""
        with self._lock:
            return {
                "cold_loads": self.cold_loads,
                "cold_load_seconds_sum": self.cold_load_seconds_sum,
                "cold_load_buckets": list(self.cold_load_buckets),
                "shared_load_hits": self.shared_load_hits,
                "tier_hits": dict(self.tier_hits),
                "refusals": dict(self.refusals),
                "sampled_tokens": self.sampled_tokens,
            }

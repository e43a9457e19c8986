"""Per-client ordering by `seq_id` and deduplication of retried requests.

The Tinker SDK numbers each training client's requests 1, 2, 3, ... and sends the chunks of one
forward_backward in parallel, the first chunk last, so arrival order means nothing. A gate
releases jobs strictly in seq_id order; a replay of a (client, seq_id) already seen returns the
first future, so the work is applied once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mint.control.futures import JobFuture

log = logging.getLogger(__name__)


@dataclass
class _Parked:
    release: Callable[[], None]
    parked_at: float = field(default_factory=time.monotonic)


class SeqGate:
    """Releases each client's jobs in seq_id order; seq_id 0 means "unordered"."""

    def __init__(self, gap_timeout_s: float = 120.0) -> None:
        self._next: dict[str, int] = {}
        self._parked: dict[str, dict[int, _Parked]] = {}
        self._seen: dict[tuple[str, int], JobFuture] = {}
        self._lock = threading.Lock()
        self._gap_timeout_s = gap_timeout_s

    def start_client(self, client_id: str, first_seq_id: int = 1) -> None:
        with self._lock:
            self._next.setdefault(client_id, first_seq_id)

    def replay_of(self, client_id: str, seq_id: int) -> JobFuture | None:
        with self._lock:
            return self._seen.get((client_id, seq_id)) if seq_id else None

    def submit(
        self, client_id: str, seq_id: int, future: JobFuture, release: Callable[[], None]
    ) -> JobFuture:
        """Release `release` when its turn comes; return the future that answers this request.

        A replayed (client, seq_id) returns the first future and releases nothing.
        """
        ready: list[Callable[[], None]] = []
        with self._lock:
            if seq_id:
                first = self._seen.get((client_id, seq_id))
                if first is not None:
                    return first
                self._seen[(client_id, seq_id)] = future
            expected = self._next.setdefault(client_id, seq_id or 1)
            if not seq_id or seq_id < expected:
                ready.append(release)
            else:
                self._parked.setdefault(client_id, {})[seq_id] = _Parked(release)
                ready.extend(self._drain_locked(client_id))
        for job in ready:
            job()
        return future

    def is_awaited(self, client_id: str, seq_id: int) -> bool:
        """Whether a job already parked for this client waits for `seq_id` to run first."""
        with self._lock:
            parked = self._parked.get(client_id)
            return bool(seq_id and parked and seq_id < max(parked))

    def advance_to(self, client_id: str, next_seq_id: int) -> None:
        """Move a client's expected seq_id forward (e.g. after a load consumed ids)."""
        with self._lock:
            self._next[client_id] = max(self._next.get(client_id, 1), next_seq_id)
            ready = self._drain_locked(client_id)
        for job in ready:
            job()

    def release_stalled(self) -> None:
        """Skip gaps older than the timeout: a request that never arrived must not block all."""
        ready: list[Callable[[], None]] = []
        now = time.monotonic()
        with self._lock:
            for client_id, parked in self._parked.items():
                if not parked:
                    continue
                lowest = min(parked)
                if now - parked[lowest].parked_at > self._gap_timeout_s:
                    log.warning(
                        "client=%s seq_id %d..%d never arrived; running seq_id %d",
                        client_id,
                        self._next[client_id],
                        lowest - 1,
                        lowest,
                    )
                    self._next[client_id] = lowest
                    ready.extend(self._drain_locked(client_id))
        for job in ready:
            job()

    def _drain_locked(self, client_id: str) -> list[Callable[[], None]]:
        parked = self._parked.get(client_id, {})
        ready = []
        while self._next[client_id] in parked:
            ready.append(parked.pop(self._next[client_id]).release)
            self._next[client_id] += 1
        return ready

    def forget_client(self, client_id: str) -> None:
        with self._lock:
            self._next.pop(client_id, None)
            self._parked.pop(client_id, None)
            for key in [k for k in self._seen if k[0] == client_id]:
                del self._seen[key]

"""The cold loader: moves revisions catalog -> host cache -> slot on its own thread.

A sample request whose revision sits in no slot asks the loader for it and gets a future of
the slot index; the request then waits in the worker's queue while warm requests keep
decoding. Concurrent misses for one revision share one load (one catalog read, one
admission). The number of revisions loading or waiting to load is bounded: past the bound a
new cold request is refused with a retryable `Busy` instead of waiting without end.

When a load completes, every request that waited on it already holds a reference on the
slot, so no other load can evict the slot before those requests run.

Cold work shares the process (its GIL) and the machine's cores with the decode loop.
Reading, hashing and copying drop the GIL but still take a core; validating a header the
engine has not seen before, and placing a revision tensor by tensor, are Python work that
interleaves with a decode step and stretches it. So while a batch decodes, a `LoadPacer`
holds the loader's work to a share of the time (`cold_load_share_percent`); with nothing
decoding, loads run back to back.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mint.catalog.records import RevisionRecord
from mint.errors import Busy, InvalidAdapter, MintError, UserError
from mint.models.base import ResidentBase
from mint.serve.stats import ServeStats
from mint.serve.tiers import (
    HostCache,
    HostEntry,
    LayoutCache,
    RevisionFiles,
    SlotBank,
    decode_revision,
    load_check,
    revision_label,
)

log = logging.getLogger(__name__)

#: Reads (and hashes) a revision's adapter_model.safetensors and adapter_config.json.
RevisionReader = Callable[[RevisionRecord], RevisionFiles]
#: How often a load waiting for an idle slot checks whether the loader is stopping.
SLOT_WAIT_POLL_S = 0.25


def read_revision_files(revision: RevisionRecord) -> RevisionFiles:
    """The two PEFT files of a revision from its blob folder, hashed as they are read with
    the revision's load check (`load_check`)."""
    folder = Path(revision.blob_path)
    try:
        return RevisionFiles.read(folder, load_check(revision))
    except FileNotFoundError as error:
        raise InvalidAdapter(
            [f"{Path(str(error.filename)).name} is missing in {folder}; re-export the revision"],
            subject=f"revision {revision_label(revision)}",
        ) from None


class LoadPacer:
    """Keeps the cold loader's work to a share of one core while a batch decodes.

    The loader wraps each read-decode-admit and each placement in `turn()`. While rows
    decode, a turn that used `c` seconds of the loader thread's CPU is followed by a rest of
    `c * (1 - share) / share`, so the loader uses at most `share` of one core over any
    stretch of time and a decode step of length T meets about `share * T` of cold work at
    most. CPU time, not wall time, is what competes with decoding: a read waiting on the
    disk, or the loader waiting for the GIL, costs the decode loop nothing and earns no
    rest. With nothing decoding, turns run back to back. The decode loop reports whether
    rows decode through `decoding`.
    """

    def __init__(self, share: float) -> None:
        if not 0 < share <= 1:
            raise UserError(
                f"cold-load share is {share}; it must be in (0, 1]; give the loader a "
                "positive share of the time, at most all of it"
            )
        self.share = share
        self._decoding = False
        self._rest_until = 0.0
        self._cond = threading.Condition()

    def decoding(self, active: bool) -> None:
        with self._cond:
            self._decoding = active
            self._cond.notify_all()

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        with self._cond:
            while self._decoding and (rest := self._rest_until - time.monotonic()) > 0:
                self._cond.wait(timeout=rest)
        started = time.thread_time()
        try:
            yield
        finally:
            took = time.thread_time() - started
            with self._cond:
                self._rest_until = time.monotonic() + took * (1 - self.share) / self.share


@dataclass
class _Load:
    revision: RevisionRecord
    queued_at: float
    waiters: int = 1
    future: concurrent.futures.Future[int] = field(default_factory=concurrent.futures.Future)


class ColdLoader:
    """Schedules and runs cold loads for one base's slot bank."""

    def __init__(
        self,
        base: ResidentBase,
        host_cache: HostCache,
        bank: SlotBank,
        stats: ServeStats,
        max_cold_loads: int,
        read: RevisionReader = read_revision_files,
        pacer: LoadPacer | None = None,
    ) -> None:
        self.base = base
        self.host_cache = host_cache
        self.bank = bank
        self.stats = stats
        self.max_cold_loads = max_cold_loads
        self._read = read
        self.pacer = pacer or LoadPacer(share=1.0)
        self.layouts = LayoutCache()
        self._loads: dict[str, _Load] = {}
        self._queue: deque[_Load] = deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._mean_load_s = 0.05
        self._thread = threading.Thread(
            target=self._loop, name=f"cold-loader-{base.base_id}", daemon=True
        )
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Revisions loading or waiting to load."""
        with self._lock:
            return len(self._loads)

    def request(self, revision: RevisionRecord) -> concurrent.futures.Future[int]:
        """A future of the slot holding `revision`, with one reference taken for the caller.

        Raises `Busy` when the revision is cold and the cold-load queue is full.
        """
        with self._lock:
            index = self.bank.acquire(revision.sha256)
            if index is not None:
                self.stats.record_slot_hit()
                done: concurrent.futures.Future[int] = concurrent.futures.Future()
                done.set_result(index)
                return done
            load = self._loads.get(revision.sha256)
            if load is not None:
                load.waiters += 1
                self.stats.record_shared_hit()
                return load.future
            if len(self._loads) >= self.max_cold_loads:
                self.stats.record_refusal("cold_queue_full")
                retry = max(1.0, len(self._loads) * self._mean_load_s)
                raise Busy(
                    f"{len(self._loads)} revisions are loading on {self.base.base_id} (limit "
                    f"{self.max_cold_loads}); revision {revision_label(revision)} is cold; "
                    f"retry in {retry:.0f}s",
                    retry_after_s=retry,
                )
            load = _Load(revision, time.monotonic())
            self._loads[revision.sha256] = load
            self._queue.append(load)
            self._lock.notify()
            return load.future

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._queue:
                    self._lock.wait()
                if self._stopping:
                    return
                load = self._queue.popleft()
            self._run(load)

    def _run(self, load: _Load) -> None:
        """1. Find the revision in the host cache, else, in a pacer turn, read it from the
           catalog (hashing as it reads), decode and admit it.
        2. Reserve a slot (waiting while every slot is in use); in a pacer turn, copy the
           tensors in.
        3. Open the slot with one reference per waiter, then resolve their future."""
        revision = load.revision
        started = time.monotonic()
        try:
            entry, tier = self._host_entry(revision)
            index = self._reserve(revision)
            if index is None:
                raise MintError(
                    f"the engine of {self.base.base_id} stopped before revision "
                    f"{revision_label(revision)} was placed; retry on a running server"
                )
            try:
                with self.pacer.turn():
                    self.bank.fill(index, entry)
            except BaseException:
                self.bank.abandon(index)
                raise
        except Exception as error:
            self._fail(load, error)
            return
        with self._lock:
            self.bank.mark_ready(index, refs=load.waiters)
            del self._loads[revision.sha256]
        seconds = time.monotonic() - started
        self._mean_load_s = 0.8 * self._mean_load_s + 0.2 * seconds
        self.stats.record_cold_load(seconds, tier)
        log.info(
            "cold load revision=%s slot=%d from=%s waiters=%d seconds=%.3f",
            revision_label(revision),
            index,
            tier,
            load.waiters,
            seconds,
        )
        load.future.set_result(index)

    def _host_entry(self, revision: RevisionRecord) -> tuple[HostEntry, str]:
        entry = self.host_cache.get(revision.sha256)
        if entry is not None:
            return entry, "host_cache"
        with self.pacer.turn():
            files = self._read(revision)
            entry = decode_revision(self.base, revision, files, self.bank.max_rank, self.layouts)
            self.host_cache.admit(entry)
        return entry, "catalog"

    def _reserve(self, revision: RevisionRecord) -> int | None:
        label = revision_label(revision)
        while True:
            index = self.bank.reserve(revision.sha256, label, timeout_s=SLOT_WAIT_POLL_S)
            if index is not None:
                return index
            with self._lock:
                if self._stopping:
                    return None

    def _fail(self, load: _Load, error: Exception) -> None:
        with self._lock:
            self._loads.pop(load.revision.sha256, None)
        reason = error.code if isinstance(error, MintError) else "load_failed"
        self.stats.record_refusal(reason)
        if isinstance(error, MintError):
            log.warning("cold load of %s refused: %s", revision_label(load.revision), error)
        else:
            log.exception("cold load of %s failed", revision_label(load.revision))
        load.future.set_exception(error)

"""Futures: the handle a client polls for a job's result.

A future is completed by the base worker thread and awaited by the API's event loop, so it
wraps a `concurrent.futures.Future`; `wait` long-polls without blocking the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import secrets
import threading
import time
from dataclasses import dataclass, field

from mint.errors import JobQuotaExceeded, MintError, NotFound, RequestLost


@dataclass(frozen=True)
class JsonResult:
    body: dict[str, object]


@dataclass(frozen=True)
class ProtoResult:
    body: bytes


Result = JsonResult | ProtoResult


@dataclass
class JobFuture:
    request_id: str
    tenant: str
    kind: str
    created_at: float = field(default_factory=time.time)
    inner: concurrent.futures.Future[Result] = field(default_factory=concurrent.futures.Future)

    def set_result(self, result: Result) -> None:
        if not self.inner.done():
            self.inner.set_result(result)

    def set_error(self, error: BaseException) -> None:
        if not self.inner.done():
            self.inner.set_exception(error)

    @property
    def done(self) -> bool:
        return self.inner.done()

    async def wait(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for completion; True when done."""
        if self.inner.done():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self.inner)), timeout_s)
        except TimeoutError:
            return False
        except BaseException:  # the job failed: that still means "done"
            return True
        return True

    def outcome(self) -> Result | MintError | BaseException:
        error = self.inner.exception()
        return error if error is not None else self.inner.result()


class FutureTable:
    """All futures by request id, scoped by tenant (another tenant's id reads as missing).

    It also counts each tenant's unfinished futures, which is what a tenant's job quota
    bounds.
    """

    def __init__(self, keep_done_s: float = 3600.0) -> None:
        self._futures: dict[str, JobFuture] = {}
        self._unfinished: dict[str, int] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._keep_done_s = keep_done_s
        # Request ids carry the server's boot id, so a poll for a request made before a
        # restart can be told apart from a made-up id and answered "lost", not "not found".
        self.boot_id = secrets.token_hex(4)

    def create(self, tenant: str, kind: str, quota: int | None = None) -> JobFuture:
        """A new future for `tenant`; with a `quota`, refuse when that many are unfinished.

        The refusal (`JobQuotaExceeded`, a retryable 429) happens before anything is queued,
        so the client's retry of the same request loses and doubles nothing.
        """
        with self._lock:
            self._expire_locked()
            unfinished = self._unfinished.get(tenant, 0)
            if quota is not None and unfinished >= quota:
                raise JobQuotaExceeded(
                    f"tenant {tenant!r} has {unfinished} unfinished jobs, its quota is {quota}; "
                    "retry after some finish (nothing was queued), or raise the quota with "
                    "`mint tenant quota NAME --max-concurrent-jobs N`",
                    retry_after_s=1.0,
                )
            request_id = f"req-{self.boot_id}-{next(self._counter)}"
            future = JobFuture(request_id=request_id, tenant=tenant, kind=kind)
            self._futures[request_id] = future
            self._unfinished[tenant] = unfinished + 1
        future.inner.add_done_callback(lambda _: self._finished(tenant))
        return future

    def unfinished(self, tenant: str) -> int:
        with self._lock:
            return self._unfinished.get(tenant, 0)

    def discard(self, future: JobFuture, error: BaseException) -> None:
        """Forget a future whose job was never queued (so it stops counting as unfinished)."""
        with self._lock:
            self._futures.pop(future.request_id, None)
        future.set_error(error)

    def _finished(self, tenant: str) -> None:
        with self._lock:
            self._unfinished[tenant] = self._unfinished.get(tenant, 1) - 1

    def get(self, tenant: str, request_id: str) -> JobFuture:
        with self._lock:
            future = self._futures.get(request_id)
        if future is None and self._from_earlier_boot(request_id):
            raise RequestLost(
                f"request {request_id!r} was made before the server restarted and its result "
                f"is lost; submit it again (saved checkpoints and revisions are intact)"
            )
        if future is None or future.tenant != tenant:
            raise NotFound(
                f"no future {request_id!r}; request ids come from the answer of the submitting "
                f"call and are kept for {self._keep_done_s:.0f}s after completion"
            )
        return future

    def _from_earlier_boot(self, request_id: str) -> bool:
        parts = request_id.split("-")
        return len(parts) == 3 and parts[0] == "req" and parts[1] != self.boot_id

    def _expire_locked(self) -> None:
        horizon = time.time() - self._keep_done_s
        stale = [rid for rid, f in self._futures.items() if f.done and f.created_at < horizon]
        for rid in stale:
            del self._futures[rid]

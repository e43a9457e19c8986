"""The base worker: the one thread that runs jobs on a resident base.

Trainer and engine share the base's single copy of the weights, so every forward pass on it
happens on this thread. Two queues feed it: training jobs run one at a time in arrival order
(the seq gate already ordered each client's jobs), and all waiting sample jobs run together as
one multi-adapter batch. The loop alternates between the two so neither starves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from mint.control.futures import JobFuture, Result
from mint.errors import Busy, MintError
from mint.models.base import ResidentBase
from mint.serve.engine import Engine
from mint.serve.types import SampleRequest, SampleResult
from mint.train.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class TrainJob:
    future: JobFuture
    run: Callable[[Trainer], Result]


@dataclass
class SampleJob:
    future: JobFuture
    request: SampleRequest
    finish: Callable[[SampleResult], Result]


class BaseWorker:
    def __init__(
        self,
        base: ResidentBase,
        max_live_policies: int = 8,
        max_batch_rows: int = 64,
        max_queued_samples: int = 4096,
    ) -> None:
        self.base = base
        self.trainer = Trainer(base, max_live_policies=max_live_policies)
        self.engine = Engine(base, max_batch_rows=max_batch_rows)
        self._train_jobs: deque[TrainJob] = deque()
        self._sample_jobs: deque[SampleJob] = deque()
        self._max_queued_samples = max_queued_samples
        self._max_batch_rows = max_batch_rows
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._loop, name=f"worker-{base.base_id}", daemon=True
        )
        self._thread.start()

    def submit_train(self, job: TrainJob) -> None:
        with self._wake:
            self._train_jobs.append(job)
            self._wake.notify()

    def submit_sample(self, job: SampleJob) -> None:
        with self._wake:
            if len(self._sample_jobs) >= self._max_queued_samples:
                raise Busy(
                    f"{len(self._sample_jobs)} sample requests are queued for "
                    f"{self.base.base_id} (limit {self._max_queued_samples}); retry shortly",
                    retry_after_s=1.0,
                )
            self._sample_jobs.append(job)
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        prefer_sampling = True
        while True:
            with self._wake:
                while not self._stopping and not self._train_jobs and not self._sample_jobs:
                    self._wake.wait()
                if self._stopping:
                    return
                run_samples = bool(self._sample_jobs) and (prefer_sampling or not self._train_jobs)
                if run_samples:
                    batch = self._take_sample_batch_locked()
                    train_job = None
                else:
                    batch = []
                    train_job = self._train_jobs.popleft()
            prefer_sampling = not run_samples
            if train_job is not None:
                self._run_train(train_job)
            else:
                self._run_samples(batch)

    def _take_sample_batch_locked(self) -> list[SampleJob]:
        batch: list[SampleJob] = []
        rows = 0
        while self._sample_jobs:
            job = self._sample_jobs[0]
            if batch and rows + job.request.num_samples > self._max_batch_rows:
                break
            batch.append(self._sample_jobs.popleft())
            rows += job.request.num_samples
        return batch

    def _run_train(self, job: TrainJob) -> None:
        started = time.monotonic()
        try:
            job.future.set_result(job.run(self.trainer))
        except MintError as error:
            job.future.set_error(error)
        except Exception as error:  # a job's failure must not take the worker down
            log.exception("job %s (%s) failed", job.future.request_id, job.future.kind)
            job.future.set_error(error)
        log.debug(
            "job=%s kind=%s took %.3fs",
            job.future.request_id,
            job.future.kind,
            time.monotonic() - started,
        )

    def _run_samples(self, batch: list[SampleJob]) -> None:
        try:
            results = self.engine.generate([job.request for job in batch])
        except MintError as error:
            # One bad request must not fail its batch-mates: retry them one by one.
            if len(batch) == 1:
                batch[0].future.set_error(error)
                return
            for job in batch:
                self._run_samples([job])
            return
        except Exception as error:
            log.exception("sample batch of %d failed", len(batch))
            for job in batch:
                job.future.set_error(error)
            return
        for job, result in zip(batch, results, strict=True):
            try:
                job.future.set_result(job.finish(result))
            except Exception as error:
                job.future.set_error(error)

"""The base worker: the one thread that runs jobs on a resident base.

Trainer and engine share the base's single copy of the weights, so every forward pass on it
happens on this thread. Training jobs run in arrival order (the seq gate already ordered each
client's jobs); small forward_backward jobs of different policies that wait at the same time
share one multi-LoRA pass (see `_take_train_locked`). Sample jobs join one running batch
between decode steps and leave it when their last sample stops (continuous batching). A sample
job whose revision is in no slot waits in the queue while the cold loader fetches it on its own
thread; warm jobs keep decoding meanwhile, and the loader's own Python work is paced to a share
of the time. The loop gives a waiting training job the base after every
`decode_steps_per_turn` decode steps, so neither side starves.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mint.catalog.records import RevisionRecord
from mint.control.collector import collect_if_due
from mint.control.futures import JobFuture, Result
from mint.errors import Busy, Cancelled, MintError
from mint.models.base import ResidentBase
from mint.serve.config import EngineConfig
from mint.serve.engine import DecodeBatch, Engine, Tick
from mint.serve.loader import ColdLoader, LoadPacer, RevisionReader, read_revision_files
from mint.serve.stats import ServeStats
from mint.serve.tiers import HostCache, SlotBank
from mint.serve.types import SampleRequest, SampleResult
from mint.train.passes import TrainJob as PolicyJob
from mint.train.trainer import Trainer
from mint.train.types import ForwardBackwardResult, TrainDatum

log = logging.getLogger(__name__)

#: Receives (sample index, token, logprob) on the worker thread as each token is sampled.
TokenSink = Callable[[int, int, float], None]


#: Total tokens up to which waiting forward_backward jobs of different policies share a pass.
#: Below a few hundred tokens a CPU pass is bound by reading the base weights, which a shared
#: pass reads once for all policies. `mint bench trainer` on SmolLM2 (2-core CPU, one thread)
#: measured 4 policies x 16 / 32 / 64 tokens at 1.98x / 1.52x / 1.06x the throughput of
#: separate passes and 4 x 256 tokens at 0.76x, so bigger jobs run one after another.
SHARED_PASS_TOKENS = 256


@dataclass
class ForwardBackwardCall:
    """A forward_backward job's arguments, so the worker can run it in a shared pass."""

    policy_id: str
    data: list[TrainDatum]
    loss_fn: str
    loss_fn_config: Mapping[str, float] | None
    forward_only: bool
    #: Turns the trainer's result into the job's answer.
    finish: Callable[[ForwardBackwardResult], Result]

    @property
    def tokens(self) -> int:
        return sum(len(datum.input_tokens) for datum in self.data)

    def run(self, trainer: Trainer) -> Result:
        result = trainer.forward_backward(
            self.policy_id, self.data, self.loss_fn, self.loss_fn_config, self.forward_only
        )
        return self.finish(result)


@dataclass
class TrainJob:
    future: JobFuture
    run: Callable[[Trainer], Result]
    #: The policy the job reads or changes; None means it may touch any policy, so no later
    #: job moves ahead of it.
    policy_id: str | None = None
    #: Set for forward_backward jobs, which may share a pass with other policies' jobs.
    forward_backward: ForwardBackwardCall | None = None

    @classmethod
    def of_forward_backward(cls, future: JobFuture, call: ForwardBackwardCall) -> TrainJob:
        return cls(future, call.run, call.policy_id, call)


@dataclass
class SampleJob:
    future: JobFuture
    request: SampleRequest
    finish: Callable[[SampleResult], Result]
    #: The revision to sample with; None samples the plain base.
    revision: RevisionRecord | None = None
    on_token: TokenSink | None = None
    #: Resolves to the slot holding the revision (a reference is held for this job).
    slot: concurrent.futures.Future[int] | None = None
    slot_index: int | None = None

    def ready(self) -> bool:
        return self.slot is None or self.slot.done()


def _cancelled() -> Cancelled:
    return Cancelled("the sample request was cancelled by its caller")


class BaseWorker:
    def __init__(
        self,
        base: ResidentBase,
        config: EngineConfig | None = None,
        max_live_policies: int = 8,
        read: RevisionReader = read_revision_files,
        shared_pass_tokens: int = SHARED_PASS_TOKENS,
        train_pass_tokens: int = 512,
    ) -> None:
        self.base = base
        #: 0 runs every training job alone.
        self.shared_pass_tokens = shared_pass_tokens
        self.config = config = config or EngineConfig()
        self.trainer = Trainer(
            base, max_live_policies=max_live_policies, pass_token_budget=train_pass_tokens
        )
        self.engine = Engine(base, config.max_batch_rows, config.prefill_chunk_tokens)
        self.stats = ServeStats()
        self.host_cache = HostCache(config.host_cache_bytes)
        self.bank = SlotBank(base, config.num_slots, config.max_slot_rank)
        self.loader = ColdLoader(
            base, self.host_cache, self.bank, self.stats, config.max_cold_loads, read,
            LoadPacer(config.cold_load_share_percent / 100),
        )  # fmt: skip
        self._batch: DecodeBatch = self.engine.batch()
        self._in_batch: dict[int, SampleJob] = {}
        self._train_jobs: deque[TrainJob] = deque()
        self._sample_jobs: deque[SampleJob] = deque()
        #: Futures of jobs to take out of the batch at the next step (see `cancel`).
        self._cancels: list[JobFuture] = []
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
        """Queue `job`; a cold revision starts loading now. Raises `Busy` when full."""
        limit = self.config.max_queued_samples
        with self._wake:
            queued = len(self._sample_jobs)
        if queued >= limit:
            self.stats.record_refusal("sample_queue_full")
            raise Busy(
                f"{queued} sample requests are queued for {self.base.base_id} "
                f"(limit {limit}); retry shortly",
                retry_after_s=1.0,
            )
        if job.revision is not None:
            job.slot = self.loader.request(job.revision)
            job.slot.add_done_callback(lambda _: self._poke())
        with self._wake:
            self._sample_jobs.append(job)
            self._wake.notify()

    def cancel(self, future: JobFuture) -> None:
        """Stop the sample job of `future` (its caller went away): a queued job ends now, a
        job in the batch leaves it at the worker's next step; its slot reference is given
        back either way and its future fails with `Cancelled`. A finished job is left as
        it is."""
        with self._wake:
            queued = next((job for job in self._sample_jobs if job.future is future), None)
            if queued is not None:
                self._sample_jobs.remove(queued)
            else:
                self._cancels.append(future)
                self._wake.notify()
        if queued is not None:
            self._end(queued, error=_cancelled())

    def _release_loaded(self, slot: concurrent.futures.Future[int]) -> None:
        if not slot.cancelled() and slot.exception() is None:
            self.bank.release(slot.result())

    def _apply_cancels(self) -> None:
        """On the worker thread, between steps: cancelled jobs in the batch leave it."""
        with self._wake:
            cancels, self._cancels = self._cancels, []
        for future in cancels:
            found = [rid for rid, job in self._in_batch.items() if job.future is future]
            for request_id in found:  # none when the job finished meanwhile
                self._batch.cancel(request_id)
                job = self._in_batch.pop(request_id)
                self._end(job, error=_cancelled())

    def queued_samples(self) -> int:
        with self._wake:
            return len(self._sample_jobs)

    def running_rows(self) -> int:
        return self._batch.rows

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)
        self.loader.stop()

    def _poke(self) -> None:
        with self._wake:
            self._wake.notify()

    def _has_work_locked(self) -> bool:
        ready = any(job.ready() for job in self._sample_jobs)
        return bool(self._train_jobs) or ready or self._batch.load > 0

    def _loop(self) -> None:
        steps_in_turn = 0
        while True:
            with self._wake:
                idle = not self._stopping and not self._has_work_locked()
            if idle:
                collect_if_due(idle=True)
            with self._wake:
                while not self._stopping and not self._has_work_locked():
                    self._wake.wait()
                if self._stopping:
                    return
                sampling = self._batch.load > 0 or any(j.ready() for j in self._sample_jobs)
                turn_over = steps_in_turn >= self.config.decode_steps_per_turn
                train_jobs = []
                if self._train_jobs and (not sampling or turn_over):
                    train_jobs = self._take_train_locked()
                joining = [] if train_jobs else self._take_ready_locked()
            if len(train_jobs) == 1:
                self._run_train(train_jobs[0])
            elif train_jobs:
                self._run_shared(train_jobs)
            if train_jobs:
                steps_in_turn = 0
                collect_if_due(idle=False)
                continue
            self._join(joining)
            self._apply_cancels()
            self.loader.pacer.decoding(True)
            self._tick()
            self.loader.pacer.decoding(self._batch.load > 0)
            steps_in_turn += 1
            collect_if_due(idle=False)

    def _take_ready_locked(self) -> list[SampleJob]:
        """Ready jobs, in arrival order, while the batch has room; cold ones stay queued."""
        room = self.config.max_batch_rows - self._batch.load
        taken: list[SampleJob] = []
        kept: deque[SampleJob] = deque()
        for job in self._sample_jobs:
            if room > 0 and job.ready():
                taken.append(job)
                room -= job.request.num_samples
            else:
                kept.append(job)
        self._sample_jobs = kept
        return taken

    def _take_train_locked(self) -> list[TrainJob]:
        """The first waiting training job, plus later forward_backward jobs that can share
        its pass: other policies', same `forward_only`, within `shared_pass_tokens` in all
        and `max_live_policies` policies. A job never moves ahead of an earlier job of its
        own policy, nor of a job that may touch any policy, so each policy's order holds."""
        first = self._train_jobs.popleft()
        call = first.forward_backward
        if call is None or call.tokens > self.shared_pass_tokens:
            return [first]
        taken, tokens = [first], call.tokens
        policies = {call.policy_id}
        blocked: set[str] = set()
        kept: deque[TrainJob] = deque()
        while self._train_jobs:
            job = self._train_jobs.popleft()
            other = job.forward_backward
            if (
                other is not None
                and other.forward_only == call.forward_only
                and other.policy_id not in policies | blocked
                and tokens + other.tokens <= self.shared_pass_tokens
                and len(taken) < self.trainer.max_live_policies
            ):
                taken.append(job)
                policies.add(other.policy_id)
                tokens += other.tokens
                continue
            kept.append(job)
            if job.policy_id is None:
                break
            blocked.add(job.policy_id)
        kept.extend(self._train_jobs)
        self._train_jobs = kept
        return taken

    def _run_shared(self, jobs: list[TrainJob]) -> None:
        """Several policies' forward_backward jobs as one multi-LoRA call."""
        started = time.monotonic()
        calls = [job.forward_backward for job in jobs]
        assert all(call is not None for call in calls)
        try:
            results = self.trainer.forward_backward_many(
                [PolicyJob(c.policy_id, c.data, c.loss_fn, c.loss_fn_config) for c in calls],  # type: ignore[union-attr]
                forward_only=calls[0].forward_only,  # type: ignore[union-attr]
            )
        except MintError:
            # Refused before any work (one job's bad data, a dropped policy): run each job
            # alone so every future gets its own answer.
            for job in jobs:
                self._run_train(job)
            return
        except Exception as error:
            log.exception("shared pass of %d jobs failed", len(jobs))
            for job in jobs:
                job.future.set_error(error)
            return
        for job, call, result in zip(jobs, calls, results, strict=True):
            try:
                job.future.set_result(call.finish(result))  # type: ignore[union-attr]
            except Exception as error:
                job.future.set_error(error)
        log.debug(
            "%d forward_backward jobs shared a pass, %.3fs", len(jobs), time.monotonic() - started
        )

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

    def _join(self, jobs: list[SampleJob]) -> None:
        """Bind each job to its slot's tensors and queue it into the running batch."""
        for job in jobs:
            try:
                if job.slot is not None:
                    job.slot_index = job.slot.result()
                    job.request.adapter = self.bank.adapter(job.slot_index)
                request_id = self._batch.admit(job.request)
            except MintError as error:
                self._end(job, error=error)
                continue
            except Exception as error:
                log.exception("sample job %s could not join", job.future.request_id)
                self._end(job, error=error)
                continue
            self._in_batch[request_id] = job

    def _tick(self) -> None:
        try:
            tick = self._batch.step()
        except Exception as error:
            # An unexpected failure inside a step leaves the batch state unknown: fail its
            # jobs and start a fresh batch, so later requests are served normally.
            log.exception("decode step with %d rows failed", self._batch.rows)
            for job in self._in_batch.values():
                self._end(job, error=error)
            self._in_batch.clear()
            self._batch = self.engine.batch()
            return
        self._deliver(tick)

    def _deliver(self, tick: Tick) -> None:
        self.stats.record_tokens(len(tick.sampled))
        for request_id, sample, token, logprob in tick.sampled:
            sink = self._in_batch[request_id].on_token
            if sink is not None:
                try:
                    sink(sample, token, logprob)
                except Exception:
                    log.exception("token sink of request %d failed", request_id)
        for request_id, error in tick.failed:
            self._end(self._in_batch.pop(request_id), error=error)
        for request_id, result in tick.finished:
            job = self._in_batch.pop(request_id)
            try:
                self._end(job, result=job.finish(result))
            except Exception as error:
                self._end(job, error=error)

    def _end(
        self, job: SampleJob, result: Result | None = None, error: BaseException | None = None
    ) -> None:
        """Complete `job` and give back its slot reference, exactly once."""
        if job.slot_index is not None:
            self.bank.release(job.slot_index)
            job.slot_index = None
        elif job.slot is not None:
            # A load still running holds a reference for this job once it lands: give it
            # back then (a job ended while its revision loads would otherwise pin the slot).
            job.slot.add_done_callback(self._release_loaded)
        job.slot = None
        if error is not None:
            job.future.set_error(error)
        elif result is not None:
            job.future.set_result(result)

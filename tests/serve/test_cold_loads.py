"""Cold loads are scheduled work: shared, bounded, off the decode loop, never mid-batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from tests.serve.conftest import Revisions

from mint.catalog.records import RevisionRecord
from mint.control.futures import JobFuture, JsonResult, Result
from mint.control.worker import BaseWorker, SampleJob
from mint.errors import Busy, InvalidAdapter
from mint.models.base import ResidentBase
from mint.serve import AdapterRef, Engine, SampleRequest, SampleResult, SamplingParams
from mint.serve.config import EngineConfig
from mint.serve.loader import read_revision_files
from mint.serve.tiers import HostEntry, RevisionFiles

WAIT_S = 60


@dataclass
class Reader:
    """Counts catalog reads and can hold them at a gate until the test opens it."""

    gate: threading.Event = field(default_factory=threading.Event)
    reads: list[str] = field(default_factory=list)
    damaged: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.gate.set()

    def __call__(self, revision: RevisionRecord) -> RevisionFiles:
        self.reads.append(revision.sha256)
        assert self.gate.wait(WAIT_S)
        files = read_revision_files(revision)
        if revision.sha256 in self.damaged:
            return RevisionFiles.of(files.weights[: len(files.weights) // 2], files.config)
        return files


@pytest.fixture
def reader() -> Reader:
    return Reader()


WorkerFactory = Callable[..., BaseWorker]


@pytest.fixture
def make_worker(tiny_base: ResidentBase, reader: Reader) -> Iterator[WorkerFactory]:
    made: list[BaseWorker] = []

    def make(**config: int) -> BaseWorker:
        worker = BaseWorker(tiny_base, EngineConfig(**config), read=reader)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.stop()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_tokens=[])


class Job:
    """A sample job whose result the test can read back."""

    def __init__(
        self,
        revision: RevisionRecord | None,
        prompt: list[int],
        tokens: int,
        hold: threading.Event | None = None,
    ) -> None:
        self.result: SampleResult | None = None
        self.started = threading.Event()
        self.hold = hold
        self.job = SampleJob(
            JobFuture(request_id="t", tenant="acme", kind="sample"),
            SampleRequest(prompt, greedy(tokens)),
            self._finish,
            revision,
            on_token=self._on_token,
        )

    def _on_token(self, sample: int, token: int, logprob: float) -> None:
        self.started.set()
        if self.hold is not None:  # holds the worker thread mid-batch, between steps
            assert self.hold.wait(WAIT_S)

    def _finish(self, result: SampleResult) -> Result:
        self.result = result
        return JsonResult({})

    def wait(self) -> SampleResult:
        self.job.future.inner.result(timeout=WAIT_S)
        assert self.result is not None
        return self.result


def alone(base: ResidentBase, entry: HostEntry | None, prompt: list[int], tokens: int) -> list:
    adapter = None if entry is None else AdapterRef("ref", entry.tensors, entry.scale)
    result = Engine(base).generate([SampleRequest(prompt, greedy(tokens), adapter=adapter)])
    return result[0].sequences[0].tokens


def test_sixteen_concurrent_first_requests_share_one_load(
    make_worker: WorkerFactory, revisions: Revisions, reader: Reader, tiny_base: ResidentBase
) -> None:
    worker = make_worker(num_slots=2)
    revision = revisions.export("pol-a", seed=3)
    admissions: list[str] = []
    admit = worker.host_cache.admit
    worker.host_cache.admit = lambda entry: admissions.append(entry.sha256) or admit(entry)
    reader.gate.clear()
    jobs = [Job(revision, [10 + i, 20, 30], 6) for i in range(16)]
    start = threading.Barrier(16)

    def submit(job: Job) -> None:
        start.wait()
        worker.submit_sample(job.job)

    threads = [threading.Thread(target=submit, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert worker.loader.queue_depth == 1
    reader.gate.set()
    results = [job.wait() for job in jobs]
    assert reader.reads == [revision.sha256]
    assert admissions == [revision.sha256]
    stats = worker.stats.snapshot()
    assert (stats["cold_loads"], stats["shared_load_hits"]) == (1, 15)
    assert worker.bank.snapshot() == [("pol-a@1", "ready", 0, False), None]
    entry = worker.host_cache.get(revision.sha256)
    for i, result in enumerate(results):
        assert result.sequences[0].tokens == alone(tiny_base, entry, [10 + i, 20, 30], 6)


def test_a_full_cold_queue_answers_busy_while_warm_requests_decode(
    make_worker: WorkerFactory, revisions: Revisions, reader: Reader
) -> None:
    worker = make_worker(num_slots=2, max_cold_loads=1)
    warm, cold, colder = (revisions.export(f"pol-{n}", seed=n) for n in range(3))
    first = Job(warm, [1, 2], 2)
    worker.submit_sample(first.job)
    first.wait()
    reader.gate.clear()
    blocked = Job(cold, [3, 4], 4)
    worker.submit_sample(blocked.job)
    with pytest.raises(Busy) as caught:
        worker.submit_sample(Job(colder, [5], 2).job)
    assert caught.value.retry_after_s >= 1
    assert caught.value.message.startswith(
        "1 revisions are loading on mint-test/tiny-llama (limit 1); revision pol-2@1 is cold"
    )
    # The slot-resident revision and the plain base keep decoding while the load is held.
    warm_again, plain = Job(warm, [7, 8, 9], 5), Job(None, [7, 8], 5)
    worker.submit_sample(warm_again.job)
    worker.submit_sample(plain.job)
    assert len(warm_again.wait().sequences[0].tokens) == 5
    assert len(plain.wait().sequences[0].tokens) == 5
    assert not blocked.job.future.done
    reader.gate.set()
    assert len(blocked.wait().sequences[0].tokens) == 4
    stats = worker.stats.snapshot()
    assert stats["refusals"] == {"cold_queue_full": 1}
    assert stats["tier_hits"] == {"catalog": 2, "slot": 1}


def test_a_bad_revision_is_refused_and_the_engine_keeps_serving(
    make_worker: WorkerFactory, revisions: Revisions, reader: Reader
) -> None:
    worker = make_worker(num_slots=2)
    bad, good = revisions.export("pol-bad", seed=1), revisions.export("pol-good", seed=2)
    reader.damaged.add(bad.sha256)
    refused, served = Job(bad, [1, 2], 3), Job(good, [1, 2], 3)
    worker.submit_sample(refused.job)
    worker.submit_sample(served.job)
    assert len(served.wait().sequences[0].tokens) == 3
    with pytest.raises(InvalidAdapter) as caught:
        refused.job.future.inner.result(timeout=WAIT_S)
    assert caught.value.message.startswith("revision pol-bad@1 rejected (2 problem(s)): ")
    assert worker.bank.snapshot() == [("pol-good@1", "ready", 0, False), None]
    assert worker.stats.snapshot()["refusals"] == {"invalid_adapter": 1}


def test_a_slot_in_use_is_never_reused_mid_batch(
    make_worker: WorkerFactory, revisions: Revisions, tiny_base: ResidentBase
) -> None:
    worker = make_worker(num_slots=1)
    first, second = revisions.export("pol-x", seed=5), revisions.export("pol-y", seed=6)
    hold = threading.Event()
    running = Job(first, [40, 41, 42], 60, hold=hold)
    worker.submit_sample(running.job)
    assert running.started.wait(WAIT_S)
    waiting = Job(second, [40, 41, 42], 8)
    worker.submit_sample(waiting.job)
    # pol-y reaches the host cache, then waits for the only slot instead of overwriting it.
    deadline = time.monotonic() + WAIT_S
    while worker.host_cache.get(second.sha256) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)
    assert worker.bank.snapshot() == [("pol-x@1", "ready", 1, False)]
    assert worker.loader.queue_depth == 1 and not running.job.future.done
    hold.set()
    x_tokens = running.wait().sequences[0].tokens
    y_tokens = waiting.wait().sequences[0].tokens
    x_entry = worker.host_cache.get(first.sha256)
    y_entry = worker.host_cache.get(second.sha256)
    assert x_tokens == alone(tiny_base, x_entry, [40, 41, 42], 60)
    assert y_tokens == alone(tiny_base, y_entry, [40, 41, 42], 8)
    assert x_tokens[:8] != y_tokens  # the two adapters really decode differently
    assert worker.bank.snapshot() == [("pol-y@1", "ready", 0, False)]

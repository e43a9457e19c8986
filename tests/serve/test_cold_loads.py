"""Cold loads are scheduled work: shared, bounded, off the decode loop, never mid-batch."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from tests.serve.conftest import Revisions

from mint.catalog.records import RevisionRecord
from mint.control.futures import JobFuture, JsonResult, Result
from mint.control.worker import BaseWorker, SampleJob
from mint.errors import Busy, Cancelled, InvalidAdapter, NonFiniteLogits, UserError
from mint.models.base import ResidentBase
from mint.models.lora import LoraSignature, init_adapter
from mint.serve import AdapterRef, Engine, SampleRequest, SampleResult, SamplingParams
from mint.serve.config import EngineConfig
from mint.serve.loader import LoadPacer, read_revision_files
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


def foreign(revision: RevisionRecord) -> RevisionRecord:
    return dataclasses.replace(revision, base_id="acme/Other-1B", base_fingerprint="0" * 64)


def with_unknown_module(revisions: Revisions, policy: str) -> RevisionRecord:
    good = revisions.export(f"{policy}-src", seed=11, rank=2)
    tensors = revisions.catalog.read_revision_tensors(good)
    tensors["model.layers.9.mlp.up_proj"] = tensors["model.layers.1.mlp.up_proj"]
    return revisions.export_tensors(policy, tensors, rank=2)


#: Each bad revision (made from the fixtures) and the problems admission names.
BAD_REVISIONS: dict[str, tuple[Callable[[Revisions, Reader], RevisionRecord], str]] = {
    "truncated": (
        lambda revisions, reader: _damaged(revisions, reader),
        "the files do not match the revision's sha256 {sha}...; the stored copy is damaged or "
        "truncated; re-export the revision; adapter_model.safetensors is unreadable (the "
        "tensors cover 16384 bytes but 6456 follow the header; the file is truncated or has "
        "trailing bytes); re-export the revision",
    ),
    "wrong base": (
        lambda revisions, _: foreign(revisions.export("pol-bad", seed=12, rank=2)),
        "the base given is mint-test/tiny-llama ({fingerprint}) but revision pol-bad@1 is on "
        "acme/Other-1B (000000000000); sample it on an engine of its own base, or retrain it "
        "on this one",
    ),
    "rank above the slot limit": (
        lambda revisions, _: revisions.export("pol-bad", seed=13, rank=8),
        "rank 8 is above the slot bank's max rank 4; export at rank <= 4 or start the engine "
        "with max_slot_rank >= 8",
    ),
    "module the base lacks": (
        lambda revisions, _: with_unknown_module(revisions, "pol-bad"),
        "module model.layers.9.mlp.up_proj is not an adaptable layer of mint-test/tiny-llama",
    ),
}


def _damaged(revisions: Revisions, reader: Reader) -> RevisionRecord:
    revision = revisions.export("pol-bad", seed=14, rank=2)
    reader.damaged.add(revision.sha256)
    return revision


@pytest.mark.parametrize("kind", sorted(BAD_REVISIONS))
def test_each_bad_revision_is_refused_while_requests_in_flight_complete(
    kind: str,
    make_worker: WorkerFactory,
    revisions: Revisions,
    reader: Reader,
    tiny_base: ResidentBase,
) -> None:
    make, problem = BAD_REVISIONS[kind]
    worker = make_worker(num_slots=2, max_slot_rank=4)
    good = revisions.export("pol-good", seed=2, rank=4)
    bad = make(revisions, reader)
    hold = threading.Event()
    running = Job(good, [5, 6, 7], 20, hold=hold)
    worker.submit_sample(running.job)
    assert running.started.wait(WAIT_S)  # the good request is mid-batch
    refused = Job(bad, [5, 6], 4)
    worker.submit_sample(refused.job)
    # The load is refused while the good request is still mid-batch...
    assert refused.job.slot is not None
    refusal = refused.job.slot.exception(timeout=WAIT_S)
    assert not running.job.future.done
    hold.set()
    # ...and the refusal reaches the caller between decode steps, the good request runs on.
    with pytest.raises(InvalidAdapter) as caught:
        refused.job.future.inner.result(timeout=WAIT_S)
    assert caught.value is refusal
    label = f"{bad.policy_id}@{bad.number}"
    expected = problem.format(sha=bad.sha256[:12], fingerprint=tiny_base.fingerprint[:12])
    assert caught.value.code == "invalid_adapter"
    count = 2 if kind == "truncated" else 1
    assert caught.value.message == f"revision {label} rejected ({count} problem(s)): {expected}"
    tokens = running.wait().sequences[0].tokens
    assert tokens == alone(tiny_base, worker.host_cache.get(good.sha256), [5, 6, 7], 20)
    assert worker.bank.snapshot() == [("pol-good@1", "ready", 0, False), None]
    assert worker.stats.snapshot()["refusals"] == {"invalid_adapter": 1}


def spin(cpu_seconds: float) -> float:
    """Burn about `cpu_seconds` of this thread's CPU; return what was burnt."""
    started = time.thread_time()
    while time.thread_time() - started < cpu_seconds:
        pass
    return time.thread_time() - started


def test_the_pacer_rests_the_loader_in_proportion_to_its_cpu_while_rows_decode() -> None:
    pacer = LoadPacer(share=0.25)
    with pacer.turn():  # nothing decodes: no rest afterwards counts
        spin(0.02)
    started = time.monotonic()
    with pacer.turn():
        assert time.monotonic() - started < 0.01
    pacer.decoding(True)
    with pacer.turn():
        burnt = spin(0.03)
    ended = time.monotonic()
    with pacer.turn():
        # A quarter share: 0.03 s of work earns at least 0.09 s of rest.
        assert time.monotonic() - ended >= burnt * 3


def test_the_pacer_lets_the_loader_run_once_decoding_stops() -> None:
    pacer = LoadPacer(share=0.01)
    pacer.decoding(True)
    with pacer.turn():
        spin(0.05)  # earns about 5 s of rest
    entered = threading.Event()

    def next_turn() -> None:
        with pacer.turn():
            entered.set()

    thread = threading.Thread(target=next_turn)
    thread.start()
    assert not entered.wait(0.2)
    pacer.decoding(False)
    assert entered.wait(2)
    thread.join()


def test_the_pacer_share_must_be_a_fraction_of_the_time() -> None:
    with pytest.raises(UserError) as caught:
        LoadPacer(share=0)
    assert caught.value.message == (
        "cold-load share is 0; it must be in (0, 1]; give the loader a positive share of the "
        "time, at most all of it"
    )
    with pytest.raises(UserError) as caught:
        EngineConfig(cold_load_share_percent=101)
    assert caught.value.message == (
        "engine configuration refused: cold_load_share_percent is 101; it is a share of the "
        "time; use at most 100"
    )


def test_cancelled_jobs_leave_the_batch_and_give_back_their_slots(
    make_worker: WorkerFactory, revisions: Revisions, reader: Reader
) -> None:
    worker = make_worker(num_slots=2, max_slot_rank=4)
    warm, cold = revisions.export("pol-warm", 1), revisions.export("pol-cold", 2)
    first = Job(warm, [1, 2], 1)
    worker.submit_sample(first.job)
    first.wait()  # warm is placed now
    hold = threading.Event()
    decoding = Job(warm, [3, 4], 400, hold=hold)
    worker.submit_sample(decoding.job)
    assert decoding.started.wait(WAIT_S)  # the worker is held inside the batch's first step
    reader.gate.clear()  # the cold revision's read waits: its job stays queued
    queued = Job(cold, [5], 3)
    worker.submit_sample(queued.job)
    worker.cancel(queued.job.future)
    with pytest.raises(Cancelled, match="cancelled by its caller"):
        queued.job.future.inner.result(timeout=WAIT_S)
    worker.cancel(decoding.job.future)
    hold.set()
    with pytest.raises(Cancelled):
        decoding.job.future.inner.result(timeout=WAIT_S)
    reader.gate.set()
    after = Job(cold, [6], 2)
    worker.submit_sample(after.job)
    assert len(after.wait().sequences[0].tokens) == 2  # the engine serves on
    deadline = time.monotonic() + WAIT_S
    while worker.running_rows() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.running_rows() == 0
    # No slot keeps a reference for a cancelled job: both are free to evict.
    assert sorted(worker.bank.snapshot()) == [
        ("pol-cold@1", "ready", 0, False),
        ("pol-warm@1", "ready", 0, False),
    ]


def test_a_revision_that_overflows_fails_its_job_and_the_batch_runs_on(
    make_worker: WorkerFactory, revisions: Revisions, tiny_base: ResidentBase
) -> None:
    worker = make_worker(num_slots=2, max_slot_rank=4)
    fine = revisions.export("pol-fine", 1)
    tensors = init_adapter(tiny_base.layers, LoraSignature(4, 8.0), seed=3)
    for _, b in tensors.values():
        b.fill_(1e30)  # finite weights whose delta overflows float32
    huge = revisions.export_tensors("pol-huge", tensors, rank=4)
    jobs = [Job(fine, [1, 2], 5), Job(huge, [1, 2], 5), Job(fine, [3, 4], 5)]
    for job in jobs:
        worker.submit_sample(job.job)
    with pytest.raises(NonFiniteLogits, match="hold NaN or infinite values"):
        jobs[1].job.future.inner.result(timeout=WAIT_S)
    entry = worker.host_cache.get(fine.sha256)
    assert jobs[0].wait().sequences[0].tokens == alone(tiny_base, entry, [1, 2], 5)
    assert jobs[2].wait().sequences[0].tokens == alone(tiny_base, entry, [3, 4], 5)

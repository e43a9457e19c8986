"""The base worker runs waiting forward_backward jobs of different policies as one pass.

Each job's answer reaches its own future, equals the answer of running the jobs one after
another (logprobs and losses within 1e-5; in these runs they came out bit-identical), and no
job ever overtakes an earlier job of its own policy.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from train_helpers import SIGNATURE, WARM_UP, make_data

from mint.control.futures import JobFuture, JsonResult, Result
from mint.control.worker import BaseWorker, ForwardBackwardCall, TrainJob
from mint.errors import UserError
from mint.models.base import ResidentBase
from mint.serve.config import EngineConfig
from mint.train import TrainDatum, Trainer
from mint.train.types import ForwardBackwardResult

pytestmark = pytest.mark.usefixtures("one_thread")

WAIT_S = 60
POLICIES = ("a", "b", "c")


class Recorder:
    """Keeps each job's raw trainer result and the order in which jobs ran."""

    def __init__(self) -> None:
        self.results: dict[str, ForwardBackwardResult] = {}
        self.order: list[str] = []

    def call(self, name: str, policy_id: str, data: list[TrainDatum]) -> ForwardBackwardCall:
        def finish(result: ForwardBackwardResult) -> Result:
            self.results[name] = result
            self.order.append(name)
            return JsonResult({"name": name})

        return ForwardBackwardCall(policy_id, data, "cross_entropy", None, False, finish)

    def step(self, name: str, policy_id: str) -> TrainJob:
        def run(trainer: Trainer) -> Result:
            self.order.append(name)
            return JsonResult(trainer.optim_step(policy_id, WARM_UP))

        return TrainJob(_future(name), run, policy_id)


def _future(name: str) -> JobFuture:
    return JobFuture(request_id=name, tenant="t", kind="test")


@pytest.fixture
def worker(tiny_base: ResidentBase) -> Iterator[BaseWorker]:
    worker = BaseWorker(tiny_base, EngineConfig(), max_live_policies=4)
    yield worker
    worker.stop()


def _create(trainer: Trainer) -> None:
    for seed, policy_id in enumerate(POLICIES):
        trainer.create_policy(policy_id, SIGNATURE, seed=seed)
        trainer.forward_backward(policy_id, make_data(70 + seed, [5, 3]), "cross_entropy")
        trainer.optim_step(policy_id, WARM_UP)


def _held(worker: BaseWorker) -> threading.Event:
    """Occupy the worker until the returned event is set, so later jobs wait together."""
    gate, started = threading.Event(), threading.Event()

    def hold(trainer: Trainer) -> Result:
        started.set()
        assert gate.wait(WAIT_S)
        return JsonResult({})

    worker.submit_train(TrainJob(_future("hold"), hold))
    assert started.wait(WAIT_S)
    return gate


def _spy(worker: BaseWorker) -> list[list[str]]:
    """Record the policy ids of every forward_backward_many call (forward_backward too)."""
    calls: list[list[str]] = []
    original = worker.trainer.forward_backward_many

    def many(jobs, forward_only=False):  # type: ignore[no-untyped-def]
        calls.append([job[0] for job in jobs])
        return original(jobs, forward_only)

    worker.trainer.forward_backward_many = many  # type: ignore[method-assign]
    return calls


def _wait(futures: list[JobFuture]) -> None:
    for future in futures:
        future.inner.exception(timeout=WAIT_S)


def test_waiting_jobs_share_a_pass_and_equal_running_alone(
    worker: BaseWorker, tiny_base: ResidentBase
) -> None:
    _create(worker.trainer)
    reference = Trainer(tiny_base, max_live_policies=4)
    _create(reference)
    data = {
        "a1": ("a", make_data(80, [6, 4])),
        "b1": ("b", make_data(81, [7])),
        "a2": ("a", make_data(82, [3, 5])),
        "c1": ("c", make_data(83, [2, 6, 4])),
    }
    recorder = Recorder()
    shared = _spy(worker)
    gate = _held(worker)
    jobs = [
        TrainJob.of_forward_backward(_future("a1"), recorder.call("a1", *data["a1"])),
        TrainJob.of_forward_backward(_future("b1"), recorder.call("b1", *data["b1"])),
        recorder.step("a-step", "a"),
        TrainJob.of_forward_backward(_future("a2"), recorder.call("a2", *data["a2"])),
        TrainJob.of_forward_backward(_future("c1"), recorder.call("c1", *data["c1"])),
    ]
    for job in jobs:
        worker.submit_train(job)
    gate.set()
    _wait([job.future for job in jobs])
    assert all(job.future.inner.exception() is None for job in jobs)

    # a1, b1 and c1 shared one pass; a2 waited for a's optim_step, which waited for a1.
    assert shared == [["a", "b", "c"], ["a"]]
    assert recorder.order == ["a1", "b1", "c1", "a-step", "a2"]
    for name in ("a1", "b1", "c1", "a-step", "a2"):
        if name == "a-step":
            reference.optim_step("a", WARM_UP)
            continue
        policy_id, datums = data[name]
        alone = reference.forward_backward(policy_id, datums, "cross_entropy")
        got = recorder.results[name]
        assert got.metrics == pytest.approx(alone.metrics, rel=1e-6)
        for out, ref in zip(got.outputs, alone.outputs, strict=True):
            np.testing.assert_allclose(out["logprobs"], ref["logprobs"], rtol=0, atol=1e-5)
            np.testing.assert_allclose(
                out["elementwise_loss"], ref["elementwise_loss"], rtol=0, atol=1e-5
            )
    for policy_id in POLICIES:
        ours, theirs = worker.trainer.gradients(policy_id), reference.gradients(policy_id)
        for path, (a, b) in theirs.items():
            torch.testing.assert_close(ours[path][0], a, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours[path][1], b, rtol=1e-5, atol=1e-6)


def test_a_bad_job_in_a_shared_pass_fails_alone(worker: BaseWorker) -> None:
    _create(worker.trainer)
    recorder = Recorder()
    shared = _spy(worker)
    bad = make_data(90, [4])
    bad[0].loss_inputs["target_tokens"] = np.array([1, 2, 3, 999_999], dtype=np.int64)
    gate = _held(worker)
    good = TrainJob.of_forward_backward(_future("a"), recorder.call("a", "a", make_data(91, [4])))
    wrong = TrainJob.of_forward_backward(_future("b"), recorder.call("b", "b", bad))
    for job in (good, wrong):
        worker.submit_train(job)
    gate.set()
    _wait([good.future, wrong.future])
    # Tried together, refused before any work, then each alone (a single job is a call of
    # one too).
    assert shared == [["a", "b"], ["a"], ["b"]]
    assert good.future.inner.exception() is None
    error = wrong.future.inner.exception()
    assert isinstance(error, UserError)
    assert str(error) == (
        "1 problem(s) in the job's data: datum 0: target_tokens holds ids outside [0, 259)"
    )
    assert recorder.order == ["a"]


def test_big_jobs_and_barriers_run_alone(worker: BaseWorker) -> None:
    _create(worker.trainer)
    recorder = Recorder()
    shared = _spy(worker)
    gate = _held(worker)
    limit = worker.shared_pass_tokens
    big = recorder.call("big", "a", make_data(92, [limit // 2, limit // 2 + 1]))
    small = recorder.call("small", "b", make_data(93, [4]))
    after_barrier = recorder.call("late", "c", make_data(94, [4]))
    barrier_ran = threading.Event()

    def barrier(trainer: Trainer) -> Result:
        barrier_ran.set()
        return JsonResult({})

    jobs = [
        TrainJob.of_forward_backward(_future("big"), big),
        TrainJob.of_forward_backward(_future("small"), small),
        TrainJob(_future("barrier"), barrier),  # no policy id: may touch any policy
        TrainJob.of_forward_backward(_future("late"), after_barrier),
    ]
    for job in jobs:
        worker.submit_train(job)
    gate.set()
    _wait([job.future for job in jobs])
    assert barrier_ran.is_set()
    # "big" exceeds the shared-pass budget; "late" may not pass the barrier.
    assert shared == [["a"], ["b"], ["c"]]
    assert recorder.order == ["big", "small", "late"]

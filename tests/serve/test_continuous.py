"""Continuous batching: requests join and leave between decode steps without changing any
request's tokens or logprobs."""

from __future__ import annotations

import random

import pytest
import torch
from tests.serve.conftest import random_adapter
from tests.serve.test_engine import assert_same_result, greedy, random_request

from mint.errors import NonFiniteLogits
from mint.models.base import ResidentBase
from mint.models.lora import ATTENTION_TARGETS, LoraSignature
from mint.serve import AdapterRef, Engine, SampleRequest, SampleResult


@pytest.mark.parametrize("chunk", [512, 3], ids=["whole-prefill", "prefill-in-chunks"])
def test_requests_joining_at_random_steps_match_running_alone(
    base: ResidentBase, engine: Engine, atol: float, chunk: int
) -> None:
    signatures = [LoraSignature(rank=r, alpha=2 * r) for r in (1, 2, 4, 8)] + [
        LoraSignature(rank=3, alpha=3, target_modules=ATTENTION_TARGETS)
    ]
    many = [
        random_adapter(base, f"rev-{i}", 100 + i, signatures[i % len(signatures)])
        for i in range(10)
    ]
    rng = random.Random(7)
    batch = Engine(base, max_batch_rows=6, prefill_chunk_tokens=chunk).batch()
    requests: dict[int, SampleRequest] = {}
    results: dict[int, SampleResult] = {}
    streamed: dict[tuple[int, int], list[int]] = {}
    pending = [random_request(rng, many) for _ in range(24)]
    steps = 0
    while pending or batch.load:
        # Between steps, zero to three new requests join whatever is running.
        for _ in range(min(rng.randint(0, 3), len(pending))):
            request = pending.pop()
            requests[batch.admit(request)] = request
        tick = batch.step()
        steps += 1
        assert batch.rows <= 6
        for request_id, sample, token, _ in tick.sampled:
            streamed.setdefault((request_id, sample), []).append(token)
        results.update(tick.finished)
    assert len(results) == 24 and steps > 24
    for request_id, request in requests.items():
        result = results[request_id]
        assert_same_result(result, engine.generate([request])[0], atol)
        for sample, sequence in enumerate(result.sequences):
            assert streamed[(request_id, sample)] == sequence.tokens
    assert base.binding.adapters == []


def test_a_request_joining_a_long_running_one_changes_neither(
    engine: Engine, adapters: list[AdapterRef], atol: float
) -> None:
    long = SampleRequest(list(range(50, 90)), greedy(30), adapter=adapters[0])
    late = SampleRequest([3, 1, 4], greedy(5), num_samples=2, adapter=adapters[1])
    batch = engine.batch()
    first = batch.admit(long)
    done: dict[int, SampleResult] = {}
    for _ in range(12):
        done.update(batch.step().finished)
    assert batch.rows == 1 and not done
    second = batch.admit(late)
    while batch.load:
        done.update(batch.step().finished)
    assert_same_result(done[first], engine.generate([long])[0], atol)
    assert_same_result(done[second], engine.generate([late])[0], atol)


def test_a_long_prompt_joins_in_chunks_while_running_rows_keep_sampling(
    base: ResidentBase, engine: Engine, adapters: list[AdapterRef], atol: float
) -> None:
    chunked = Engine(base, prefill_chunk_tokens=8)
    running = SampleRequest([5, 6, 7], greedy(40), adapter=adapters[0])
    long = SampleRequest(list(range(20, 60)), greedy(4), adapter=adapters[1],
                         prompt_logprobs=True)  # fmt: skip
    batch = chunked.batch()
    first = batch.admit(running)
    batch.step()
    second = batch.admit(long)
    done: dict[int, SampleResult] = {}
    sampled_by_step = []
    while batch.load:
        tick = batch.step()
        sampled_by_step.append({request for request, *_ in tick.sampled})
        done.update(tick.finished)
    # 40 prompt tokens, 8 per step: the running row samples alone for the first four steps,
    # the long request's first token comes in the fifth, and no step went without a token.
    assert sampled_by_step[:5] == [{first}] * 4 + [{first, second}]
    assert_same_result(done[first], engine.generate([running])[0], atol)
    assert_same_result(done[second], engine.generate([long])[0], atol)
    whole, in_chunks = engine.generate([long])[0].prompt_logprobs, done[second].prompt_logprobs
    assert whole is not None and in_chunks is not None and whole[0] is None is in_chunks[0]
    assert max(abs(a - b) for a, b in zip(whole[1:], in_chunks[1:], strict=True)) <= atol


def test_a_prefill_chunk_below_one_token_is_refused(base: ResidentBase) -> None:
    with pytest.raises(ValueError, match="prefill_chunk_tokens is 0; it must be at least 1"):
        Engine(base, prefill_chunk_tokens=0)


def test_a_bad_request_is_refused_at_admission_and_the_batch_runs_on(
    engine: Engine, adapters: list[AdapterRef]
) -> None:
    batch = engine.batch()
    good = batch.admit(SampleRequest([1, 2], greedy(3), adapter=adapters[2]))
    batch.step()
    try:
        batch.admit(SampleRequest([], greedy(3)))
    except ValueError as error:
        assert "the prompt is empty" in str(error)
    else:
        raise AssertionError("an empty prompt was admitted")
    finished: dict[int, SampleResult] = {}
    while batch.load:
        finished.update(batch.step().finished)
    assert list(finished) == [good] and len(finished[good].sequences[0].tokens) == 3


def test_cancelled_requests_leave_wherever_they_are_and_the_rest_run_on(
    base: ResidentBase, engine: Engine, adapters: list[AdapterRef], atol: float
) -> None:
    chunked = Engine(base, max_batch_rows=3, prefill_chunk_tokens=24)
    kept = SampleRequest([5, 6, 7], greedy(12), adapter=adapters[0])
    decoding = SampleRequest([9, 8], greedy(12), num_samples=2, adapter=adapters[1])
    prefilling = SampleRequest(list(range(30, 70)), greedy(5), num_samples=2,
                               adapter=adapters[2])  # fmt: skip
    queued = SampleRequest([1, 2, 3], greedy(5))  # no place left: it waits
    batch = chunked.batch()
    kept_id, decoding_id = batch.admit(kept), batch.admit(decoding)
    batch.step()
    assert batch.rows == 3
    done: dict[int, SampleResult] = {}
    done.update(batch.step().finished)
    assert batch.cancel(decoding_id)  # both its rows leave before the next token
    tick = batch.step()
    assert {request for request, *_ in tick.sampled} == {kept_id} and batch.rows == 1
    prefilling_id, queued_id = batch.admit(prefilling), batch.admit(queued)
    batch.step()  # the first 12 of the 40 prompt tokens of both prefilling rows
    assert (batch.rows, batch.load) == (1, 4)
    assert batch.cancel(queued_id) and batch.cancel(prefilling_id)
    assert batch.load == 1
    while batch.load:
        tick = batch.step()
        assert {request for request, *_ in tick.sampled} == {kept_id}
        done.update(tick.finished)
    assert list(done) == [kept_id]
    assert_same_result(done[kept_id], engine.generate([kept])[0], atol)
    assert not batch.cancel(kept_id) and not batch.cancel(decoding_id)


def test_an_adapter_that_overflows_fails_only_its_own_request(
    base: ResidentBase, engine: Engine, adapters: list[AdapterRef], atol: float
) -> None:
    huge = random_adapter(base, "rev-huge", 5, LoraSignature(rank=2, alpha=4))
    for _, b in huge.tensors.values():
        b.mul_(1e300 if base.dtype == torch.float64 else 1e30)  # finite, but logits overflow
    fine = SampleRequest([5, 6, 7], greedy(6), adapter=adapters[0])
    broken = SampleRequest([5, 6, 7], greedy(6), num_samples=2, adapter=huge)
    batch = engine.batch()
    fine_id, broken_id = batch.admit(fine), batch.admit(broken)
    failures: list[tuple[int, Exception]] = []
    done: dict[int, SampleResult] = {}
    while batch.load:
        tick = batch.step()
        failures += tick.failed
        assert broken_id not in {request for request, *_ in tick.sampled}
        done.update(tick.finished)
    assert [request for request, _ in failures] == [broken_id]
    error = failures[0][1]
    assert isinstance(error, NonFiniteLogits) and error.code == "non_finite_logits"
    assert "hold NaN or infinite values after 0 sampled tokens (adapter rev-huge" in str(error)
    assert list(done) == [fine_id]
    assert_same_result(done[fine_id], engine.generate([fine])[0], atol)
    with pytest.raises(NonFiniteLogits):
        engine.generate([broken])

"""Batching correctness: a row's result never depends on what else shares its batch."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from mint.models.base import ResidentBase
from mint.serve import AdapterRef, Engine, SampleRequest, SampleResult, SamplingParams

#: The `forward_logits` fixture: (tokens, adapter) -> float32 logits of a full forward pass.
ForwardLogits = Callable[[list[int], AdapterRef | None], torch.Tensor]


def f64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_tokens=[])


def assert_same_result(got: SampleResult, want: SampleResult, atol: float) -> None:
    assert len(got.sequences) == len(want.sequences)
    for mine, alone in zip(got.sequences, want.sequences, strict=True):
        assert mine.tokens == alone.tokens
        assert mine.stop_reason == alone.stop_reason
        torch.testing.assert_close(f64(mine.logprobs), f64(alone.logprobs), rtol=0, atol=atol)


def test_adapters_change_the_samples(engine: Engine, adapters: list[AdapterRef]) -> None:
    prompt = [72, 101, 108, 108, 111]
    choices = [None, *adapters]
    results = engine.generate([SampleRequest(prompt, greedy(12), adapter=a) for a in choices])
    outputs = [tuple(result.sequences[0].tokens) for result in results]
    assert len(set(outputs)) == len(choices)


def test_greedy_is_the_same_alone_and_in_a_mixed_batch(
    engine: Engine, adapters: list[AdapterRef], atol: float
) -> None:
    target = SampleRequest([40, 50, 60, 70, 80, 90], greedy(16), adapter=adapters[0])
    alone = engine.generate([target])[0]
    others = [
        SampleRequest([1, 2, 3], greedy(4), adapter=adapters[1]),
        SampleRequest(list(range(100, 140)), greedy(20), adapter=None),
        SampleRequest([7] * 11, greedy(9), num_samples=2, adapter=adapters[2]),
        SampleRequest([9, 8], greedy(16), adapter=adapters[0]),
    ]
    mixed = engine.generate([others[0], others[1], target, others[2], others[3]])
    assert_same_result(mixed[2], alone, atol)
    assert len(alone.sequences[0].tokens) == 16
    assert [len(s.tokens) for s in mixed[3].sequences] == [9, 9]


def test_greedy_logprobs_match_a_full_forward_pass(
    engine: Engine, adapters: list[AdapterRef], forward_logits: ForwardLogits, atol: float
) -> None:
    prompts = [[11, 22, 33], list(range(60, 85)), [200]]
    requests = [
        SampleRequest(prompt, greedy(14), adapter=adapter)
        for prompt, adapter in zip(prompts, [adapters[0], None, adapters[2]], strict=True)
    ]
    for request, result in zip(requests, engine.generate(requests), strict=True):
        tokens = result.sequences[0].tokens
        logits = forward_logits(request.prompt + tokens, request.adapter)
        steps = logits[len(request.prompt) - 1 : -1]
        assert tokens == steps.argmax(-1).tolist()
        want = torch.log_softmax(steps, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        torch.testing.assert_close(f64(result.sequences[0].logprobs), want, rtol=0, atol=atol)


def test_prompt_logprobs_match_a_full_forward_pass(
    engine: Engine, adapters: list[AdapterRef], forward_logits: ForwardLogits, atol: float
) -> None:
    prompt = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]
    target = SampleRequest(prompt, greedy(2), adapter=adapters[1], prompt_logprobs=True)
    logits = forward_logits(prompt, adapters[1])
    want = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    plain = SampleRequest([5, 6], greedy(3), adapter=adapters[0])
    longer = SampleRequest(list(range(30, 60)), greedy(3), prompt_logprobs=True)
    for results, index in (
        (engine.generate([target]), 0),
        (engine.generate([plain, target, longer]), 1),
    ):
        got = results[index].prompt_logprobs
        assert got is not None and got[0] is None and len(got) == len(prompt)
        torch.testing.assert_close(f64(got[1:]), want, rtol=0, atol=atol)
    assert results[0].prompt_logprobs is None
    assert results[2].prompt_logprobs is not None and len(results[2].prompt_logprobs) == 30


def random_request(rng: random.Random, adapters: list[AdapterRef]) -> SampleRequest:
    prompt = [rng.randrange(0, 259) for _ in range(rng.randint(1, 30))]
    if rng.random() < 0.5:
        params = greedy(rng.randint(1, 12))
    else:
        params = SamplingParams(
            max_tokens=rng.randint(1, 12),
            temperature=1.0,
            top_p=0.95,
            seed=rng.randrange(2**32),
            stop_tokens=[],
        )
    adapter = rng.choice([None, *adapters])
    return SampleRequest(prompt, params, num_samples=rng.randint(1, 3), adapter=adapter)


def test_random_mixes_never_borrow_another_adapter(
    engine: Engine, adapters: list[AdapterRef], atol: float
) -> None:
    rng = random.Random(0)
    for _ in range(6):
        requests = [random_request(rng, adapters) for _ in range(5)]
        mixed = engine.generate(requests)
        for request, result in zip(requests, mixed, strict=True):
            assert_same_result(result, engine.generate([request])[0], atol)


def test_more_rows_than_a_batch_run_in_several_batches(
    base: ResidentBase, engine: Engine, adapters: list[AdapterRef], atol: float
) -> None:
    small = Engine(base, max_batch_rows=3)
    requests = [
        SampleRequest([3 * i + 1, 3 * i + 2], greedy(5 + i), num_samples=2, adapter=adapters[i % 3])
        for i in range(5)
    ]
    for split, whole in zip(small.generate(requests), engine.generate(requests), strict=True):
        assert_same_result(split, whole, atol)
    assert base.binding.adapters == []


def test_one_adapter_for_the_whole_batch_matches_per_row_binding(
    engine: Engine, adapters: list[AdapterRef], atol: float
) -> None:
    # Every row on one adapter takes the unindexed binding path; it must agree with the
    # indexed path taken when a plain row shares the batch.
    shared = [
        SampleRequest([i + 10, i + 20, i + 30], greedy(8), adapter=adapters[2]) for i in range(3)
    ]
    together = engine.generate(shared)
    with_plain = engine.generate([*shared, SampleRequest([4, 4], greedy(8))])
    for got, want in zip(with_plain[:3], together, strict=True):
        assert_same_result(got, want, atol)


def test_no_requests_and_one_token_prompts(engine: Engine) -> None:
    assert engine.generate([]) == []
    result = engine.generate([SampleRequest([9], greedy(2), prompt_logprobs=True)])[0]
    assert result.prompt_logprobs == [None]
    assert result.sequences[0].tokens == [9, 9]

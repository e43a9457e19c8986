"""Sampling: seeds, and logprobs that are those of the distribution actually sampled from."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from mint.serve import AdapterRef, Engine, SampleRequest, SamplingParams
from mint.serve.sampling import RowParams, processed_logprobs, row_seed

ForwardLogits = Callable[[list[int], AdapterRef | None], torch.Tensor]
PROMPT = [72, 101, 108, 108, 111, 44, 32]


def reference_distribution(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Probabilities of the processed distribution, rebuilt one token at a time in float64."""
    scaled = logits.double() / temperature
    vocab = scaled.shape[0]
    allowed = set(range(vocab))
    if 0 < top_k < vocab:
        by_logit = sorted(range(vocab), key=lambda t: (-scaled[t].item(), t))
        allowed = set(by_logit[:top_k])
    weights = torch.zeros(vocab, dtype=torch.float64)
    for token in allowed:
        weights[token] = torch.exp(scaled[token] - scaled.max())
    probs = weights / weights.sum()
    if top_p < 1:
        nucleus, mass = set(), 0.0
        for token in sorted(allowed, key=lambda t: (-probs[t].item(), t)):
            nucleus.add(token)
            mass += probs[token].item()
            if mass >= top_p:
                break
        kept = [probs[t].item() if t in nucleus else 0.0 for t in range(vocab)]
        probs = torch.tensor(kept, dtype=torch.float64)
        probs = probs / probs.sum()
    return probs


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(0.7, 20, 1.0), (0.7, -1, 0.8), (0.7, 12, 0.9), (1.3, 0, 1.0), (2.0, 5, 0.5)],
)
def test_logprobs_are_those_of_the_processed_distribution(
    engine: Engine,
    adapters: list[AdapterRef],
    forward_logits: ForwardLogits,
    atol: float,
    temperature: float,
    top_k: int,
    top_p: float,
) -> None:
    params = SamplingParams(
        max_tokens=24, temperature=temperature, top_k=top_k, top_p=top_p, seed=7, stop_tokens=[]
    )
    request = SampleRequest(PROMPT, params, num_samples=2, adapter=adapters[0])
    uncertain_steps = 0
    for sequence in engine.generate([request])[0].sequences:
        logits = forward_logits(PROMPT + sequence.tokens, adapters[0])
        for step, (token, logprob) in enumerate(
            zip(sequence.tokens, sequence.logprobs, strict=True)
        ):
            probs = reference_distribution(
                logits[len(PROMPT) - 1 + step], *(temperature, top_k, top_p)
            )
            assert probs[token] > 0
            assert abs(probs.sum().item() - 1) < 1e-12
            assert abs(logprob - probs[token].log().item()) <= atol
            support = int((probs > 0).sum())
            assert support <= (top_k if top_k > 0 else support)
            uncertain_steps += probs.max().item() < 0.99
    # The check means something only if many steps really had a choice to make.
    assert uncertain_steps >= 10


def test_processed_distribution_matches_the_reference_row_by_row() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=generator, dtype=torch.float64) * 4
    settings = [(0.0, -1, 1.0), (0.7, 20, 1.0), (0.7, -1, 0.8), (1.5, 30, 0.6), (1.0, 400, 1.0)]
    params = RowParams(
        temperature=torch.tensor([s[0] for s in settings], dtype=torch.float64),
        top_k=torch.tensor([s[1] if 0 < s[1] < 300 else 300 for s in settings]),
        top_p=torch.tensor([s[2] for s in settings], dtype=torch.float64),
    )
    got = processed_logprobs(logits, params)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(got[0], torch.log_softmax(logits[0], -1))
    for row, (temperature, top_k, top_p) in enumerate(settings[1:], start=1):
        want = reference_distribution(logits[row], temperature, top_k, top_p)
        torch.testing.assert_close(got[row].exp(), want, rtol=0, atol=1e-12)
        assert torch.equal(torch.isfinite(got[row]), want > 0)
    assert int(torch.isfinite(got[1]).sum()) == 20


def test_top_k_ties_keep_the_lower_token_ids() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0]])
    params = RowParams(torch.tensor([1.0]), torch.tensor([2]), torch.tensor([1.0]))
    kept = torch.isfinite(processed_logprobs(logits, params))[0].tolist()
    assert kept == [False, True, False, True, False]


def test_nucleus_keeps_the_smallest_run_reaching_top_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    for top_p, kept in ((0.45, 1), (0.55, 2), (0.79, 2), (0.81, 3), (0.96, 4), (1.0, 4)):
        params = RowParams(
            torch.tensor([1.0], dtype=torch.float64),
            torch.tensor([4]),
            torch.tensor([top_p], dtype=torch.float64),
        )
        got = processed_logprobs(probs.log(), params)[0]
        assert int(torch.isfinite(got).sum()) == kept, top_p
        want = probs[0, :kept] / probs[0, :kept].sum()
        torch.testing.assert_close(got[:kept].exp(), want)


def sampled(engine: Engine, request: SampleRequest) -> list[list[int]]:
    return [sequence.tokens for sequence in engine.generate([request])[0].sequences]


def seeded(seed: int | None) -> SamplingParams:
    # At temperature 2 with adapter rev-a, 200 unseeded samples of 32 tokens were all
    # distinct and the likeliest had logprob -17.6, so a chance repeat is about 1e-8.
    return SamplingParams(max_tokens=32, temperature=2.0, seed=seed, stop_tokens=[])


def test_a_fixed_seed_gives_the_same_samples(engine: Engine, adapters: list[AdapterRef]) -> None:
    request = SampleRequest(PROMPT, seeded(1234), num_samples=3, adapter=adapters[0])
    first = sampled(engine, request)
    assert sampled(engine, request) == first
    crowd = [SampleRequest([3, 4, 5], seeded(99), num_samples=2, adapter=adapters[1]), request]
    assert [s.tokens for s in engine.generate(crowd)[1].sequences] == first
    # Samples of one request use different streams, and so differ.
    assert len({tuple(tokens) for tokens in first}) == 3


def test_different_seeds_differ(engine: Engine, adapters: list[AdapterRef]) -> None:
    outputs = {
        tuple(sampled(engine, SampleRequest(PROMPT, seeded(seed), adapter=adapters[0]))[0])
        for seed in (0, 1, 2, -(2**63), 2**64 - 1)
    }
    assert len(outputs) == 5
    # No seed: a fresh random stream each call.
    unseeded = SampleRequest(PROMPT, seeded(None), num_samples=2, adapter=adapters[0])
    runs = [tuple(tokens) for _ in range(2) for tokens in sampled(engine, unseeded)]
    assert len(set(runs)) == 4


def test_row_seed_is_a_stable_64_bit_value() -> None:
    assert row_seed(0, 0) == row_seed(0, 0)
    assert row_seed(0, 0) != row_seed(0, 1) != row_seed(1, 0)
    assert all(0 <= row_seed(seed, 3) < 2**64 for seed in (-(2**63), 0, 2**64 - 1))


def test_bf16_logits_are_sampled_in_float32() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    params = RowParams(torch.tensor([1.0]), torch.tensor([3]), torch.tensor([1.0]))
    got = processed_logprobs(logits, params)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.log_softmax(logits.float(), -1))


def test_a_tiny_temperature_stays_finite_and_acts_greedy() -> None:
    logits = torch.tensor([[10.0, 30.0, 29.0, -5.0]])
    params = RowParams(torch.tensor([1e-40]), torch.tensor([4]), torch.tensor([1.0]))
    got = processed_logprobs(logits, params)[0]
    assert got.tolist() == [float("-inf"), 0.0, float("-inf"), float("-inf")]

"""Stopping: stop tokens, stop strings, never stopping, max_tokens and the context limit."""

from __future__ import annotations

import pytest

from mint.models.base import ResidentBase
from mint.serve import AdapterRef, Engine, SampledSequence, SampleRequest, SamplingParams


def encode(base: ResidentBase, text: str) -> list[int]:
    return list(base.tokenizer.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]


def only(engine: Engine, request: SampleRequest) -> SampledSequence:
    return engine.generate([request])[0].sequences[0]


def greedy(max_tokens: int, **stops: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **stops)  # type: ignore[arg-type]


def test_the_plain_base_repeats_its_last_token(base: ResidentBase, engine: Engine) -> None:
    # The stop tests below lean on this property of the seeded tiny base.
    tokens = only(engine, SampleRequest(encode(base, "ab"), greedy(6, stop_tokens=[]))).tokens
    assert base.tokenizer.decode(tokens) == "bbbbbb"  # type: ignore[attr-defined]


def test_eos_stops_by_default_and_is_included(base: ResidentBase, engine: Engine) -> None:
    eos = base.eos_token_ids
    assert eos == [258]
    sequence = only(engine, SampleRequest(encode(base, "ab") + eos, greedy(8)))
    assert (sequence.tokens, sequence.stop_reason) == (eos, "stop")
    assert len(sequence.logprobs) == 1


def test_an_empty_stop_token_list_never_stops(base: ResidentBase, engine: Engine) -> None:
    sequence = only(engine, SampleRequest(encode(base, "ab") + [258], greedy(8, stop_tokens=[])))
    assert (sequence.tokens, sequence.stop_reason) == ([258] * 8, "length")


def test_a_custom_stop_token_ends_the_row_at_its_first_occurrence(
    engine: Engine, adapters: list[AdapterRef]
) -> None:
    prompt = [94, 95, 96]
    free = only(engine, SampleRequest(prompt, greedy(20, stop_tokens=[]), adapter=adapters[0]))
    stop = free.tokens[6]
    end = free.tokens.index(stop) + 1
    stopped = only(
        engine, SampleRequest(prompt, greedy(20, stop_tokens=[stop, 258]), adapter=adapters[0])
    )
    assert (stopped.tokens, stopped.stop_reason) == (free.tokens[:end], "stop")
    assert stopped.logprobs == pytest.approx(free.logprobs[:end], abs=1e-4)


@pytest.mark.parametrize(
    ("stop_strings", "count", "reason"),
    [(["bbb"], 3, "stop"), (["xyz", "bb"], 2, "stop"), (["b"], 1, "stop"), (["ab"], 7, "length")],
)
def test_stop_strings_are_found_in_the_generated_text(
    base: ResidentBase, engine: Engine, stop_strings: list[str], count: int, reason: str
) -> None:
    # "ab" spans prompt and output; only generated text counts, so it never matches.
    params = greedy(7, stop_strings=stop_strings, stop_tokens=[])
    sequence = only(engine, SampleRequest(encode(base, "ab"), params))
    assert (sequence.tokens, sequence.stop_reason) == (encode(base, "b" * count), reason)


def test_a_stop_string_spanning_sampled_tokens(
    base: ResidentBase, engine: Engine, adapters: list[AdapterRef]
) -> None:
    prompt = encode(base, "Hello, world")
    free = only(engine, SampleRequest(prompt, greedy(24, stop_tokens=[]), adapter=adapters[2]))
    pieces = [base.tokenizer.decode([token]) for token in free.tokens]  # type: ignore[attr-defined]
    # The first change between two printable ASCII tokens after the first few tokens.
    end = next(
        i + 1
        for i in range(4, len(pieces))
        if pieces[i - 1] != pieces[i]
        and all(p.isascii() and p.isprintable() and len(p) == 1 for p in pieces[i - 1 : i + 1])
    )
    stop = pieces[end - 2] + pieces[end - 1]
    assert stop not in "".join(pieces[: end - 1])
    assert pieces[end - 1] * 2 not in "".join(pieces[:end])
    # The later of two stop strings ("xx" after "xy") must not win.
    params = greedy(24, stop_strings=[pieces[end - 1] * 2, stop], stop_tokens=[])
    sequence = only(engine, SampleRequest(prompt, params, adapter=adapters[2]))
    assert (sequence.tokens, sequence.stop_reason) == (free.tokens[:end], "stop")


def test_max_tokens_ends_with_length(engine: Engine, adapters: list[AdapterRef]) -> None:
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=3, stop_tokens=[])
    sequences = engine.generate(
        [SampleRequest([1, 2], params, num_samples=3, adapter=adapters[2])]
    )[0].sequences
    assert [(len(s.tokens), len(s.logprobs), s.stop_reason) for s in sequences] == [
        (5, 5, "length")
    ] * 3


@pytest.mark.parametrize(("prompt_length", "count"), [(509, 3), (510, 2), (511, 1)])
def test_max_tokens_is_clipped_to_the_context(
    base: ResidentBase, engine: Engine, prompt_length: int, count: int
) -> None:
    assert base.max_context_length == 512
    prompt = [(7 * i) % 256 for i in range(prompt_length)]
    sequence = only(engine, SampleRequest(prompt, greedy(50, stop_tokens=[])))
    assert (len(sequence.tokens), sequence.stop_reason) == (count, "length")

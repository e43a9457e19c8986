"""Bad requests are refused before any forward pass, with messages that name the fix."""

from __future__ import annotations

import re

import pytest
import torch

from mint.errors import InvalidAdapter, UserError
from mint.models.base import ResidentBase
from mint.models.lora import LoraSignature, init_adapter
from mint.serve import AdapterRef, Engine, SampleRequest, SamplingParams
from mint.serve.checks import FINITE_ADAPTERS


@pytest.fixture(scope="module")
def f32_engine(tiny_base: ResidentBase) -> Engine:
    return Engine(tiny_base)


def refused(engine: Engine, request: SampleRequest) -> str:
    with pytest.raises(UserError) as caught:
        engine.generate([SampleRequest([1, 2], SamplingParams(max_tokens=2)), request])
    assert caught.value.code == "invalid_request"
    return caught.value.message


def with_params(**fields: object) -> SampleRequest:
    return SampleRequest([1, 2, 3], SamplingParams(**fields))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            SampleRequest([], SamplingParams()),
            "request 1: the prompt is empty; a prompt needs at least one token; "
            "send a non-empty prompt",
        ),
        (
            SampleRequest([1, 259, -1, 5], SamplingParams()),
            "request 1: prompt token ids 259 at position 1, -1 at position 2 are outside the "
            "vocabulary of mint-test/tiny-llama (ids 0 to 258); tokenize with that base's "
            "tokenizer",
        ),
        (
            with_params(max_tokens=0),
            "request 1: max_tokens is 0; it must be at least 1; ask for 1 or more tokens",
        ),
        (
            with_params(temperature=-0.5),
            "request 1: temperature is -0.5; it must be 0 (greedy) or a finite positive "
            "number; use a temperature >= 0 such as 1",
        ),
        (
            with_params(temperature=float("inf")),
            "request 1: temperature is inf; it must be 0 (greedy) or a finite positive "
            "number; use a temperature >= 0 such as 1",
        ),
        (
            with_params(top_p=0.0),
            "request 1: top_p is 0.0; it must be in (0, 1]; use 1 to turn nucleus sampling off",
        ),
        (
            with_params(top_p=1.5),
            "request 1: top_p is 1.5; it must be in (0, 1]; use 1 to turn nucleus sampling off",
        ),
        (
            with_params(top_k=-2),
            "request 1: top_k is -2; it must be -1 or 0 (off) or a positive count; "
            "use -1 to turn top-k off",
        ),
        (
            with_params(seed=2**64),
            f"request 1: seed {2**64} is not a 64-bit integer; use an int from {-(2**63)} to "
            f"{2**64 - 1} or no seed",
        ),
        (
            with_params(stop_strings=["ok", ""]),
            "request 1: stop_strings holds an empty string, which would stop every sample at "
            "once; drop the empty stop string",
        ),
        (
            with_params(stop_tokens=[3, 300]),
            "request 1: stop token ids 300 at position 1 are outside the vocabulary of "
            "mint-test/tiny-llama (ids 0 to 258); use ids the base can sample",
        ),
        (
            SampleRequest([1], SamplingParams(), num_samples=0),
            "request 1: num_samples is 0; it must be from 1 to 4096; ask for 1 to 4096 "
            "samples per request (send several requests for more)",
        ),
        (
            SampleRequest([1], SamplingParams(), num_samples=10**9),
            f"request 1: num_samples is {10**9}; it must be from 1 to 4096; ask for 1 to 4096 "
            "samples per request (send several requests for more)",
        ),
        (
            SampleRequest([1] * 512, SamplingParams()),
            "request 1: the prompt has 512 tokens but mint-test/tiny-llama has a context of "
            "512 tokens, which must also hold at least one sampled token; shorten the prompt "
            "to at most 511 tokens",
        ),
    ],
)
def test_bad_requests_are_user_errors(
    f32_engine: Engine, request_: SampleRequest, message: str
) -> None:
    assert refused(f32_engine, request_) == message


def test_every_problem_is_reported_at_once(f32_engine: Engine) -> None:
    bad = SampleRequest([999], SamplingParams(max_tokens=0, temperature=-1), num_samples=0)
    message = refused(f32_engine, bad)
    assert message.count("request 1: ") == 4
    for part in (
        "prompt token ids 999",
        "max_tokens is 0",
        "temperature is -1",
        "num_samples is 0",
    ):
        assert part in message


def test_many_bad_tokens_are_counted_not_listed(f32_engine: Engine) -> None:
    message = refused(f32_engine, SampleRequest([300] * 8, SamplingParams()))
    assert re.search(r"300 at position 4 and 3 more are outside", message)


def test_nan_parameters_are_refused(f32_engine: Engine) -> None:
    message = refused(f32_engine, with_params(temperature=float("nan"), top_p=float("nan")))
    assert "temperature is nan" in message and "top_p is nan" in message


def test_an_adapter_that_does_not_fit_the_base_is_refused(
    tiny_base: ResidentBase, f32_engine: Engine
) -> None:
    tensors = init_adapter(tiny_base.layers, LoraSignature(rank=2, alpha=2), seed=0)
    path = "model.layers.0.self_attn.q_proj"
    a, b = tensors[path]
    tensors[path] = (a[:, :10].contiguous(), b)
    tensors["model.layers.9.mlp.up_proj"] = (a, b)
    tensors["model.layers.1.mlp.up_proj"] = (
        tensors["model.layers.1.mlp.up_proj"][0].double(),
        tensors["model.layers.1.mlp.up_proj"][1],
    )
    request = SampleRequest([1, 2], SamplingParams(), adapter=AdapterRef("rev-bad", tensors, 1.0))
    with pytest.raises(InvalidAdapter) as caught:
        f32_engine.generate([request])
    assert caught.value.problems == [
        "module model.layers.0.self_attn.q_proj has A (2, 10) and B (64, 2); expected "
        "A [rank, 64] and B [64, rank]",
        "module model.layers.1.mlp.up_proj A is torch.float64 on cpu; the base runs "
        "torch.float32 on cpu; place the adapter there first",
        "module model.layers.9.mlp.up_proj is not an adaptable layer of mint-test/tiny-llama",
    ]
    assert caught.value.message.startswith("adapter rev-bad rejected (3 problem(s)): ")


def test_a_refused_call_leaves_the_engine_serving(f32_engine: Engine) -> None:
    with pytest.raises(UserError):
        f32_engine.generate([SampleRequest([], SamplingParams())])
    params = SamplingParams(max_tokens=3, temperature=0.0, stop_tokens=[])
    good = f32_engine.generate([SampleRequest([1, 2], params)])
    assert good[0].sequences[0].tokens == [2, 2, 2]


def test_max_batch_rows_must_be_positive(tiny_base: ResidentBase) -> None:
    with pytest.raises(UserError, match="max_batch_rows is 0; it must be at least 1"):
        Engine(tiny_base, max_batch_rows=0)


def test_an_adapter_with_nan_or_infinite_values_is_refused_before_any_pass(
    tiny_base: ResidentBase, f32_engine: Engine
) -> None:
    tensors = init_adapter(tiny_base.layers, LoraSignature(rank=2, alpha=2), seed=0)
    healthy = AdapterRef("rev-finite", dict(tensors), 1.0)
    q0, v1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
    tensors[q0] = (tensors[q0][0].clone().fill_(float("nan")), tensors[q0][1])
    tensors[v1] = (tensors[v1][0], torch.full_like(tensors[v1][1], float("inf")))
    params = SamplingParams(max_tokens=2, temperature=1.0, seed=3)
    damaged = SampleRequest([1, 2], params, adapter=AdapterRef("rev-nan", tensors, 1.0))
    with pytest.raises(InvalidAdapter) as caught:
        f32_engine.generate([SampleRequest([1, 2], params, adapter=healthy), damaged])
    assert caught.value.problems == [
        f"tensors {q0} A, {v1} B hold NaN or infinite values; the revision is damaged (or "
        "its training diverged); sample another revision, or train from a finite state and "
        "export again"
    ]
    assert "rev-finite" in FINITE_ADAPTERS and "rev-nan" not in FINITE_ADAPTERS
    [alone] = f32_engine.generate([SampleRequest([1, 2], params, adapter=healthy)])
    assert len(alone.sequences[0].tokens) == 2

"""The official tinker SDK, unmodified, against a live mint server on the tiny base."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tests.api.conftest import API_KEY, TINY, LiveServer
from tinker import types


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


@pytest.fixture(scope="module")
def service_client(live_server: LiveServer) -> tinker.ServiceClient:
    client = tinker.ServiceClient(base_url=live_server.url, api_key=API_KEY)
    yield client
    client.close("success").result()


def test_capabilities_list_the_bases(live_server: LiveServer) -> None:
    rest = tinker.RestClient(base_url=live_server.url, api_key=API_KEY)
    capabilities = rest.get_server_capabilities().result()
    names = [m.model_name for m in capabilities.supported_models]
    assert names == ["HuggingFaceTB/SmolLM2-135M-Instruct", TINY]


def test_training_flow_end_to_end(
    service_client: tinker.ServiceClient, live_server: LiveServer
) -> None:
    training = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=3).result()
    info = training.get_info()
    assert info.model_data.model_name == TINY and info.lora_rank == 4
    tokenizer = training.get_tokenizer()
    tokens = tokenizer.encode("the cat sat on the mat", add_special_tokens=False)
    batch = [_datum(tokens), _datum(tokens[:6])]

    first = training.forward_backward(batch, "cross_entropy").result()
    assert [len(o["logprobs"].tolist()) for o in first.loss_fn_outputs] == [len(tokens) - 1, 5]
    expected_loss = -sum(float(np.sum(o["logprobs"].to_numpy())) for o in first.loss_fn_outputs)
    assert first.metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-5)
    step = training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert step.metrics["grad_norm:mean"] > 0

    after = training.forward_backward(batch, "cross_entropy").result()
    assert after.metrics["loss:sum"] < first.metrics["loss:sum"]

    state_path = training.save_state("ckpt-1").result().path
    assert state_path == f"tinker://{training.model_id}/weights/ckpt-1"
    with pytest.warns(FutureWarning):  # deprecated in the SDK, still part of the API
        training.load_state(state_path).result()
    sampler_path = training.save_weights_for_sampler("s1").result().path
    assert sampler_path == f"tinker://{training.model_id}/sampler_weights/s1"

    sampler = service_client.create_sampling_client(model_path=sampler_path).result()
    params = types.SamplingParams(max_tokens=5, temperature=0.7, seed=11, top_k=20, top_p=0.9)
    prompt = types.ModelInput.from_ints(tokens[:4])
    result = sampler.sample(prompt, num_samples=2, sampling_params=params).result()
    assert len(result.sequences) == 2
    for sequence in result.sequences:
        assert 1 <= len(sequence.tokens) <= 5
        assert len(sequence.logprobs) == len(sequence.tokens)
        assert all(lp <= 0 for lp in sequence.logprobs)
    again = sampler.sample(prompt, num_samples=2, sampling_params=params).result()
    assert [s.tokens for s in again.sequences] == [s.tokens for s in result.sequences]

    rest = tinker.RestClient(base_url=live_server.url, api_key=API_KEY)
    listed = rest.list_checkpoints(training.model_id).result()
    ids = sorted(c.checkpoint_id for c in listed.checkpoints)
    assert ids == ["sampler_weights/s1", "weights/ckpt-1"]
    restored = service_client.create_training_client_from_state_with_optimizer(state_path).result()
    resumed = restored.forward_backward(batch, "cross_entropy").result()
    assert resumed.metrics["loss:sum"] == pytest.approx(after.metrics["loss:sum"], rel=1e-5)


def test_compute_logprobs_match_training_forward(service_client: tinker.ServiceClient) -> None:
    training = service_client.create_lora_training_client(base_model=TINY, rank=2, seed=5).result()
    tokens = list(range(40, 52))
    training.forward_backward([_datum(tokens)], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    forward = training.forward([_datum(tokens)], "cross_entropy").result()
    trained = forward.loss_fn_outputs[0]["logprobs"].tolist()
    sampler = training.save_weights_and_get_sampling_client().result()
    prompt_logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    assert prompt_logprobs[0] is None
    np.testing.assert_allclose(prompt_logprobs[1:], trained, rtol=0, atol=1e-5)

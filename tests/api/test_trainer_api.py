"""Trainer depth through the unmodified tinker SDK: custom losses, ppo, resuming from state."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
import torch
from safetensors.torch import load
from tests.api.conftest import API_KEY, TINY, LiveServer
from tinker import types

TENANT = "alpha"  # the tenant behind API_KEY in the live server
TOKENS = [list(range(30, 42)), list(range(60, 67))]
ADAM = types.AdamParams(learning_rate=2e-2)


def _datum(tokens: list[int], **extra: list[float]) -> types.Datum:
    inputs: dict[str, list[int] | list[float]] = {"target_tokens": tokens[1:], **extra}
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def _batch() -> list[types.Datum]:
    return [_datum(tokens, weights=[1.0] * (len(tokens) - 1)) for tokens in TOKENS]


def _logprobs(result: types.ForwardBackwardOutput) -> list[np.ndarray]:
    return [out["logprobs"].to_numpy() for out in result.loss_fn_outputs]


@pytest.fixture(scope="module")
def service_client(live_server: LiveServer) -> tinker.ServiceClient:
    client = tinker.ServiceClient(base_url=live_server.url, api_key=API_KEY)
    yield client
    client.close("success").result()


def _state_bytes(live_server: LiveServer, path: str) -> bytes:
    """A training state's bytes, read back from the catalog's blob store."""
    policy_id, _, name = path.removeprefix("tinker://").partition("/weights/")
    return live_server.service.catalog.read_training_state(TENANT, policy_id, name)


def test_forward_backward_custom_end_to_end(
    service_client: tinker.ServiceClient, live_server: LiveServer
) -> None:
    """A custom loss 0.5 * sum(lp^2) reaches the server as weights -lp; a second policy
    trained with those weights by hand ends with the same bytes."""
    custom = service_client.create_lora_training_client(base_model=TINY, rank=2, seed=8).result()
    manual = service_client.create_lora_training_client(base_model=TINY, rank=2, seed=8).result()

    def half_square(
        data: list[types.Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = sum(0.5 * (lp**2).sum() for lp in logprobs)
        assert isinstance(loss, torch.Tensor)
        return loss, {"custom_metric:mean": 1.5}

    result = custom.forward_backward_custom(_batch(), half_square).result()
    custom.optim_step(ADAM).result()
    forward = manual.forward(_batch(), "cross_entropy").result()
    lps = _logprobs(forward)
    expected_loss = sum(0.5 * float(np.sum(lp.astype(np.float64) ** 2)) for lp in lps)
    assert result.metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-5)
    assert result.metrics["custom_metric:mean"] == 1.5
    # The surrogate cross_entropy with weights -lp has loss sum(lp^2).
    assert result.metrics["surrogate_loss:sum"] == pytest.approx(2 * expected_loss, rel=1e-5)
    weighted = [
        _datum(tokens, weights=[-float(x) for x in lp])
        for tokens, lp in zip(TOKENS, lps, strict=True)
    ]
    manual.forward_backward(weighted, "cross_entropy").result()
    manual.optim_step(ADAM).result()
    a = custom.save_state("after-custom").result().path
    b = manual.save_state("after-manual").result().path
    assert _state_bytes(live_server, a) == _state_bytes(live_server, b)


def test_ppo_and_icepop_through_the_sdk(service_client: tinker.ServiceClient) -> None:
    training = service_client.create_lora_training_client(base_model=TINY, rank=2, seed=4).result()
    policy = _logprobs(training.forward(_batch(), "cross_entropy").result())
    rng = np.random.default_rng(0)
    sampler = [lp + rng.uniform(-0.5, 0.5, len(lp)).astype(np.float32) for lp in policy]
    advantages = [rng.normal(0, 1, len(lp)).astype(np.float32) for lp in policy]
    data = [
        _datum(tokens, logprobs=old.tolist(), advantages=adv.tolist())
        for tokens, old, adv in zip(TOKENS, sampler, advantages, strict=True)
    ]
    config = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    result = training.forward_backward(data, "ppo", config).result()
    total = 0.0
    for out, old, adv in zip(result.loss_fn_outputs, sampler, advantages, strict=True):
        lp = out["logprobs"].to_numpy().astype(np.float64)
        ratio = np.exp(lp - old)
        expected = -np.minimum(ratio * adv, np.clip(ratio, 0.9, 1.1) * adv)
        np.testing.assert_allclose(out["elementwise_loss"].to_numpy(), expected, rtol=1e-4)
        total += float(expected.sum())
    assert result.metrics["loss:sum"] == pytest.approx(total, rel=1e-4)
    band = {**config, "icepop_low": 0.8, "icepop_high": 1.25}
    masked = training.forward(data, "ppo", band).result()
    ratios = np.concatenate([np.exp(lp - old) for lp, old in zip(policy, sampler, strict=True)])
    outside = float(np.mean((ratios < 0.8) | (ratios > 1.25)))
    assert 0 < outside < 1
    assert masked.metrics["icepop_masked_fraction:mean"] == pytest.approx(outside)


def _trained(client: tinker.TrainingClient, steps: int) -> None:
    for _ in range(steps):
        client.forward_backward(_batch(), "cross_entropy").result()
        client.optim_step(ADAM).result()


def test_resume_with_optimizer_is_exact_and_without_starts_adam_fresh(
    service_client: tinker.ServiceClient, live_server: LiveServer
) -> None:
    first = service_client.create_lora_training_client(base_model=TINY, rank=2, seed=6).result()
    _trained(first, 2)
    midway = first.save_state("midway").result().path
    _trained(first, 1)
    straight = _state_bytes(live_server, first.save_state("straight").result().path)

    resumed = service_client.create_training_client_from_state_with_optimizer(midway).result()
    _trained(resumed, 1)
    again = _state_bytes(live_server, resumed.save_state("resumed").result().path)
    assert again == straight

    fresh = service_client.create_training_client_from_state(midway).result()
    loaded = load(_state_bytes(live_server, fresh.save_state("loaded").result().path))
    saved = load(_state_bytes(live_server, midway))
    moments = [name for name in loaded if name.startswith("adam.")]
    assert moments and all(not loaded[name].any() for name in moments)
    assert all(saved[name].any() for name in moments)
    for name in loaded:
        if name.startswith("lora."):
            assert torch.equal(loaded[name], saved[name])
    _trained(fresh, 1)
    assert _state_bytes(live_server, fresh.save_state("fresh").result().path) != straight

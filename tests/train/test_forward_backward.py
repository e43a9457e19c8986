"""forward_backward: loss values, outputs, metrics, padding, accumulation and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import make_data, reference_logprobs

from mint.errors import UnsupportedLoss, UserError
from mint.models.base import ResidentBase
from mint.train import TrainDatum, Trainer
from mint.train.types import check_metric_key


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    grads = {}
    for path, (a, b) in trainer.gradients("p").items():
        grads[f"{path}.A"], grads[f"{path}.B"] = a, b
    return grads


def test_cross_entropy_matches_an_unpadded_reference(tiny_base: ResidentBase, warm: Trainer):
    data = make_data(1, [7, 3, 5])
    result = warm.forward_backward("p", data, "cross_entropy")
    expected_total = 0.0
    for datum, out in zip(data, result.outputs, strict=True):
        reference = reference_logprobs(tiny_base, warm, "p", datum).numpy()
        weights = datum.loss_inputs["weights"]
        assert out["logprobs"].dtype == np.float32 and out["logprobs"].shape == weights.shape
        assert out["elementwise_loss"].dtype == np.float32
        np.testing.assert_allclose(out["logprobs"], reference, rtol=0, atol=1e-5)
        np.testing.assert_allclose(out["elementwise_loss"], -weights * reference, atol=1e-5)
        expected_total += float(np.sum(-weights.astype(np.float64) * reference))
    assert result.metrics["loss:sum"] == pytest.approx(expected_total, abs=1e-4)
    assert result.metrics["num_tokens:sum"] == 15.0
    assert sorted(result.metrics) == ["loss:sum", "num_tokens:sum"]
    for key in result.metrics:
        check_metric_key(key)


def test_missing_weights_mean_all_ones(warm: Trainer) -> None:
    bare = make_data(2, [4, 6], weights=False)
    ones = [
        TrainDatum(d.input_tokens, {**d.loss_inputs, "weights": np.ones(len(d.input_tokens))})
        for d in bare
    ]
    implicit = warm.forward_backward("p", bare, "cross_entropy", forward_only=True)
    explicit = warm.forward_backward("p", ones, "cross_entropy", forward_only=True)
    assert implicit.metrics == explicit.metrics
    for a, b in zip(implicit.outputs, explicit.outputs, strict=True):
        assert np.array_equal(a["elementwise_loss"], -a["logprobs"])
        assert np.array_equal(a["elementwise_loss"], b["elementwise_loss"])


def test_importance_sampling_values(tiny_base: ResidentBase, warm: Trainer) -> None:
    data = make_data(3, [5, 8], weights=False, sampler=True)
    for datum in data:  # sampler logprobs near the policy's, as from a real rollout
        policy = reference_logprobs(tiny_base, warm, "p", datum).numpy()
        datum.loss_inputs["logprobs"] = policy + np.linspace(-0.5, 0.5, len(policy))
    result = warm.forward_backward("p", data, "importance_sampling")
    total = 0.0
    for datum, out in zip(data, result.outputs, strict=True):
        inputs = datum.loss_inputs
        ratio = np.exp(out["logprobs"].astype(np.float64) - inputs["logprobs"])
        expected = -ratio * inputs["advantages"]
        np.testing.assert_allclose(out["elementwise_loss"], expected, rtol=1e-5, atol=1e-6)
        total += float(expected.sum())
    assert result.metrics["loss:sum"] == pytest.approx(total, rel=1e-5)


def test_padding_changes_no_result(warm: Trainer, tiny_base: ResidentBase) -> None:
    data = make_data(4, [9, 2, 5])
    together = warm.forward_backward("p", data, "cross_entropy")
    batched_grads = _grads(warm)
    singles = Trainer(tiny_base)
    singles.load_state("p", warm.save_state("p"), with_optimizer=True)
    for datum, out in zip(data, together.outputs, strict=True):
        alone = singles.forward_backward("p", [datum], "cross_entropy").outputs[0]
        np.testing.assert_allclose(out["logprobs"], alone["logprobs"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(out["elementwise_loss"], alone["elementwise_loss"], atol=1e-5)
    for name, grad in _grads(singles).items():
        torch.testing.assert_close(batched_grads[name], grad, rtol=1e-5, atol=1e-6)


def test_gradients_accumulate_over_calls(warm: Trainer, tiny_base: ResidentBase) -> None:
    first, second = make_data(5, [4, 6]), make_data(6, [3])
    warm_copy = Trainer(tiny_base)
    warm_copy.load_state("p", warm.save_state("p"), with_optimizer=True)
    warm.forward_backward("p", first, "cross_entropy")
    warm.forward_backward("p", second, "cross_entropy")
    warm_copy.forward_backward("p", first + second, "cross_entropy")
    expected = _grads(warm_copy)
    assert any(grad.abs().max() > 0 for grad in expected.values())
    for name, grad in _grads(warm).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6)


def test_forward_only_touches_no_gradient(warm: Trainer) -> None:
    before = warm.save_state("p")
    data = make_data(7, [5, 3])
    forward = warm.forward_backward("p", data, "cross_entropy", forward_only=True)
    assert all(not grad.any() for grad in _grads(warm).values())
    assert warm.save_state("p") == before
    full = warm.forward_backward("p", data, "cross_entropy")
    assert forward.metrics == full.metrics
    assert any(grad.any() for grad in _grads(warm).values())


def test_unknown_loss_names_the_supported_ones(warm: Trainer) -> None:
    with pytest.raises(UnsupportedLoss) as caught:
        warm.forward_backward("p", make_data(8, [3]), "stable_reinforce")
    assert caught.value.code == "unsupported_loss"
    assert str(caught.value) == (
        "loss function 'stable_reinforce' is not supported by this trainer; "
        "use one of: cispo, cross_entropy, dro, gspo, importance_sampling, ppo"
    )


def test_unknown_loss_config_key_is_refused(warm: Trainer) -> None:
    with pytest.raises(UserError) as caught:
        warm.forward_backward("p", make_data(8, [3]), "cross_entropy", {"clip": 0.2})
    assert str(caught.value) == (
        "loss_fn_config keys ['clip'] are not accepted by loss 'cross_entropy' "
        "(accepted keys: none); remove them"
    )


def test_every_bad_datum_is_listed_in_one_error(warm: Trainer) -> None:
    good = make_data(9, [4], weights=False, sampler=True)[0]
    no_advantages = TrainDatum(
        good.input_tokens,
        {
            "target_tokens": good.loss_inputs["target_tokens"],
            "logprobs": good.loss_inputs["logprobs"],
            "weights": np.ones(4, dtype=np.float32),
        },
    )
    bad_targets = TrainDatum(
        good.input_tokens, {**good.loss_inputs, "target_tokens": np.array([1, 2, 300, 4])}
    )
    short = TrainDatum(good.input_tokens, {**good.loss_inputs, "advantages": np.zeros(3)})
    empty = TrainDatum(np.zeros(0, dtype=np.int64), {})
    data = [good, no_advantages, bad_targets, short, empty]
    with pytest.raises(UserError) as caught:
        warm.forward_backward("p", data, "importance_sampling")
    assert str(caught.value) == (
        "5 problem(s) in the job's data: "
        "datum 1: loss input 'advantages' is missing; "
        "datum 1: loss input 'weights' is not read by this loss "
        "(it reads ['advantages', 'logprobs', 'target_tokens']); remove it; "
        "datum 2: target_tokens holds ids outside [0, 259); "
        "datum 3: advantages must have shape (4,), got (3,); "
        "datum 4: input_tokens has 0 tokens; allowed 1 to 512"
    )
    assert warm.base.binding.adapters == []


def test_a_problem_shared_by_many_datums_is_worded_once(warm: Trainer) -> None:
    good = make_data(9, [4], weights=False, sampler=True)[0]
    extra = TrainDatum(
        good.input_tokens, {**good.loss_inputs, "weights": np.ones(4, dtype=np.float32)}
    )
    bad_targets = TrainDatum(
        good.input_tokens, {**good.loss_inputs, "target_tokens": np.array([1, 2, 300, 4])}
    )
    data = [extra, extra, extra, good, extra, bad_targets, extra, extra]
    with pytest.raises(UserError) as caught:
        warm.forward_backward("p", data, "importance_sampling")
    assert str(caught.value) == (
        "7 problem(s) in the job's data: "
        "datums 0-2, 4, 6-7: loss input 'weights' is not read by this loss "
        "(it reads ['advantages', 'logprobs', 'target_tokens']); remove it; "
        "datum 5: target_tokens holds ids outside [0, 259)"
    )


def test_no_data_is_refused(warm: Trainer) -> None:
    with pytest.raises(UserError, match="needs at least one datum; got none"):
        warm.forward_backward("p", [], "cross_entropy")

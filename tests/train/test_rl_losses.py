"""Every loss through the trainer on the tiny base: values, gradients, forward-only, IcePop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from loss_reference import REFERENCES, icepop_keep, masked_datum
from train_helpers import make_data

from mint.models.base import ResidentBase
from mint.train import LOSSES, TrainDatum, Trainer
from mint.train.losses import resolve_config

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "ppo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "cispo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "gspo": {"clip_low_threshold": 0.97, "clip_high_threshold": 1.03},
    "dro": {"beta": 0.5},
}


def _rollout_data(trainer: Trainer, loss: str) -> list[TrainDatum]:
    """Datums whose sampler logprobs sit near the policy's, as after a real rollout."""
    data = make_data(31, [6, 3, 8], weights=False, sampler=True)
    current = trainer.forward_backward("p", data, "importance_sampling", forward_only=True)
    for datum, out in zip(data, current.outputs, strict=True):
        offsets = np.linspace(-0.4, 0.4, len(out["logprobs"]), dtype=np.float32)
        datum.loss_inputs["logprobs"] = out["logprobs"] + offsets
        datum.loss_inputs["advantages"][0] = 0.0  # a prompt-like position
        if loss == "cross_entropy":
            datum.loss_inputs["weights"] = datum.loss_inputs.pop("advantages")
            del datum.loss_inputs["logprobs"]
        elif loss == "gspo":
            datum.loss_inputs["sequence_ratio_mask"] = (np.arange(len(offsets)) != 1).astype(
                np.float32
            )
    return data


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {
        f"{path}.{part}": tensor
        for path, pair in trainer.gradients("p").items()
        for part, tensor in zip("AB", pair, strict=True)
    }


def _copy(trainer: Trainer, base: ResidentBase) -> Trainer:
    twin = Trainer(base)
    twin.load_state("p", trainer.save_state("p"), with_optimizer=True)
    return twin


def _as_lists(datum: TrainDatum, loss: str) -> dict[str, list[float]]:
    names = LOSSES[loss].float_inputs
    return {k: [float(x) for x in v] for k, v in datum.loss_inputs.items() if k in names}


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_trainer_losses_match_the_reference(
    loss: str, warm: Trainer, tiny_base: ResidentBase
) -> None:
    """Values from the returned logprobs; gradients via the chain rule: a cross_entropy job
    weighted by -dL/dlp (the reference's) must give the same parameter gradients."""
    data = _rollout_data(warm, loss)
    config = resolve_config(loss, LOSSES[loss], CONFIGS.get(loss))
    twin = _copy(warm, tiny_base)
    result = warm.forward_backward("p", data, loss, CONFIGS.get(loss))
    surrogate, total = [], 0.0
    for datum, out in zip(data, result.outputs, strict=True):
        lp = [float(x) for x in out["logprobs"]]
        values, grads = REFERENCES[loss](lp, _as_lists(datum, loss), config)
        np.testing.assert_allclose(out["elementwise_loss"], values, rtol=1e-4, atol=1e-6)
        total += sum(values)
        weights = -np.asarray(grads, dtype=np.float32)
        targets = datum.loss_inputs["target_tokens"]
        surrogate.append(
            TrainDatum(datum.input_tokens, {"target_tokens": targets, "weights": weights})
        )
    assert result.metrics["loss:sum"] == pytest.approx(total, rel=1e-5, abs=1e-6)
    assert result.metrics["num_tokens:sum"] == 17.0
    twin.forward_backward("p", surrogate, "cross_entropy")
    expected = _grads(twin)
    assert any(grad.abs().max() > 0 for grad in expected.values())
    for name, grad in _grads(warm).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_forward_only_works_for_every_loss(loss: str, warm: Trainer) -> None:
    data = _rollout_data(warm, loss)
    before = warm.save_state("p")
    forward = warm.forward_backward("p", data, loss, forward_only=True)
    assert all(not grad.any() for grad in _grads(warm).values())
    assert warm.save_state("p") == before
    full = warm.forward_backward("p", data, loss)
    assert forward.metrics == full.metrics
    for a, b in zip(forward.outputs, full.outputs, strict=True):
        assert np.array_equal(a["logprobs"], b["logprobs"])
        assert np.array_equal(a["elementwise_loss"], b["elementwise_loss"])


@pytest.mark.parametrize("loss", ["ppo", "gspo", "dro"])
def test_icepop_over_micro_batches(loss: str, tiny_base: ResidentBase, warm: Trainer) -> None:
    """A job split into passes masks the same tokens and reports one fraction for the job."""
    data = _rollout_data(warm, loss)
    band = {"icepop_low": 0.85, "icepop_high": 1.2}
    config = resolve_config(loss, LOSSES[loss], {**CONFIGS[loss], **band})
    split = _copy(warm, tiny_base)
    split.pass_token_budget = 8  # one datum per pass
    result = split.forward_backward("p", data, loss, {**CONFIGS[loss], **band})
    counted = masked = 0
    for datum, out in zip(data, result.outputs, strict=True):
        lp = [float(x) for x in out["logprobs"]]
        inputs = _as_lists(datum, loss)
        keep = icepop_keep(lp, inputs, band["icepop_low"], band["icepop_high"])
        kept = masked_datum({"lp": lp, **inputs}, keep)
        values = iter(REFERENCES[loss](kept.pop("lp"), kept, config)[0])
        expected = [next(values) if k else 0.0 for k in keep]
        np.testing.assert_allclose(out["elementwise_loss"], expected, rtol=1e-4, atol=1e-6)
        counted += sum(1 for a in inputs["advantages"] if a != 0)
        masked += keep.count(False)
    assert 0 < masked < counted
    assert result.metrics["icepop_masked_fraction:mean"] == masked / counted
    whole = warm.forward_backward("p", data, loss, {**CONFIGS[loss], **band}, forward_only=True)
    assert whole.metrics["icepop_masked_fraction:mean"] == masked / counted

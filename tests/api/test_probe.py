"""The conformance probe against a live server: every public SDK method gets a verdict."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tests.api.conftest import API_KEY, TINY, LiveServer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import tinker_probe  # noqa: E402


def test_probe_reports_every_public_method(
    live_server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SamplingClient.get_tokenizer looks the base up on the Hugging Face hub; offline it must
    # fail at once instead of retrying an unreachable network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = tinker_probe.probe(live_server.url, API_KEY, TINY)
    methods = [o.method for o in report.outcomes]
    assert methods and sorted(methods) == sorted(tinker_probe.public_methods())
    assert len(methods) == len(set(methods))
    unsupported = [o for o in report.outcomes if not o.supported]
    assert all(o.reason for o in unsupported)
    # The core flow the server implements must always be among the supported methods.
    core = {
        "ServiceClient.create_lora_training_client",
        "TrainingClient.forward_backward",
        "TrainingClient.optim_step",
        "TrainingClient.save_state",
        "TrainingClient.save_weights_for_sampler",
        "SamplingClient.sample",
        "SamplingClient.compute_logprobs",
        "RestClient.list_checkpoints",
        "ServiceClient.create_training_client_from_state_with_optimizer",
    }
    supported = {o.method for o in report.outcomes if o.supported}
    assert core <= supported, core - supported
    # Everything else mint refuses or cannot reach, each for the reason in the report.
    refused = {o.method.removesuffix("_async") for o in unsupported}
    assert refused == {
        "RestClient.get_external_weights_urls",
        "RestClient.publish_checkpoint_from_tinker_path",
        "RestClient.unpublish_checkpoint_from_tinker_path",
        "RestClient.whoami",
        "SamplingClient.get_tokenizer",
        "TrainingClient.save_weights_external",
    }, refused
    assert len(supported) >= 0.9 * len(methods)
    (tmp_path / "report.md").write_text(report.markdown())

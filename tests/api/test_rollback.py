"""Rollback moves an alias back; sampling through the alias then serves the older revision."""

from __future__ import annotations

import tinker
from tests.api.conftest import API_KEY, TINY, LiveServer
from tinker import types
from typer.testing import CliRunner

from mint.cli import app

TARGET = [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71]


def _greedy(client: tinker.ServiceClient, path: str) -> list[int]:
    sampler = client.create_sampling_client(model_path=path).result()
    params = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    prompt = types.ModelInput.from_ints(TARGET[:4])
    return list(sampler.sample(prompt, 1, params).result().sequences[0].tokens)


def test_rollback_serves_the_older_revision_again(live_server: LiveServer) -> None:
    client = tinker.ServiceClient(base_url=live_server.url, api_key=API_KEY)
    training = client.create_lora_training_client(base_model=TINY, rank=4, seed=1).result()
    training.save_weights_for_sampler("before").result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(TARGET[:-1]),
        loss_fn_inputs={"target_tokens": TARGET[1:]},
    )
    for _ in range(15):
        training.forward_backward([datum], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=3e-2)).result()
    training.save_weights_for_sampler("after").result()

    run = training.model_id
    latest = f"tinker://{run}/sampler_weights/latest"
    before = _greedy(client, f"tinker://{run}/sampler_weights/before")
    after = _greedy(client, f"tinker://{run}/sampler_weights/after")
    assert before != after  # training changed the greedy continuation
    assert _greedy(client, latest) == after

    runner = CliRunner()
    env = {"MINT_HOME": str(live_server.home)}
    shown = runner.invoke(app, ["policy", "show", run, "--tenant", "alpha"], env=env)
    assert shown.exit_code == 0, shown.output
    assert "before" in shown.output and "after" in shown.output
    rolled = runner.invoke(
        app, ["policy", "rollback", run, "--to", "1", "--tenant", "alpha"], env=env
    )
    assert rolled.exit_code == 0, rolled.output
    assert _greedy(client, latest) == before
    forward = runner.invoke(
        app, ["policy", "rollback", run, "--to", "2", "--tenant", "alpha"], env=env
    )
    assert forward.exit_code == 0, forward.output
    assert _greedy(client, latest) == after

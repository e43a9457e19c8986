"""Training one policy changes no byte of another policy's training state or revisions."""

from __future__ import annotations

import hashlib
from pathlib import Path

import tinker
from tests.api.conftest import API_KEY, TINY, LiveServer
from tinker import types


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )


def _train(training: tinker.TrainingClient, tokens: list[int], steps: int) -> None:
    for _ in range(steps):
        training.forward_backward([_datum(tokens)], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()


def _folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_training_b_leaves_a_untouched(live_server: LiveServer) -> None:
    client = tinker.ServiceClient(base_url=live_server.url, api_key=API_KEY)
    policy_a = client.create_lora_training_client(base_model=TINY, rank=4, seed=1).result()
    policy_b = client.create_lora_training_client(base_model=TINY, rank=4, seed=1).result()
    _train(policy_a, list(range(70, 90)), 2)
    policy_a.save_weights_for_sampler("a-1").result()
    policy_a.save_state("a-state").result()

    catalog = live_server.service.catalog
    revision = catalog.resolve("alpha", policy_a.model_id, "a-1")
    files_before = _folder_digest(Path(revision.blob_path))
    state_before = catalog.read_training_state("alpha", policy_a.model_id, "a-state")
    trainer = live_server.service.worker(TINY).trainer
    live_before = trainer.save_state(policy_a.model_id)

    _train(policy_b, list(range(100, 130)), 3)
    policy_b.save_weights_for_sampler("b-1").result()
    policy_b.save_state("b-state").result()

    assert _folder_digest(Path(catalog.resolve("alpha", policy_a.model_id).blob_path)) == (
        files_before
    )
    assert catalog.read_training_state("alpha", policy_a.model_id, "a-state") == state_before
    assert trainer.save_state(policy_a.model_id) == live_before
    assert trainer.save_state(policy_b.model_id) != live_before

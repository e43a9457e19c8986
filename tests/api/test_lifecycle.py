"""Session reaping and requests that outlived a server restart."""

from __future__ import annotations

import time

import httpx
import tinker
from tests.api.conftest import API_KEY, TINY, LiveServer
from tinker import types


def test_idle_session_is_reaped_and_its_memory_freed(live_server: LiveServer) -> None:
    client = tinker.ServiceClient(base_url=live_server.url, api_key=API_KEY)
    training = client.create_lora_training_client(base_model=TINY, rank=2).result()
    tokens = list(range(10, 20))
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )
    training.forward_backward([datum], "cross_entropy").result()
    training.save_state("kept").result()
    service = live_server.service
    trainer = service.worker(TINY).trainer
    assert trainer.has_policy(training.model_id)

    session_id = training.model_id.split(":train:")[0]
    later = time.time() + service.settings.session_timeout_s + 1
    assert session_id in service.reap_idle_sessions(now=later)
    deadline = time.monotonic() + 10
    while trainer.has_policy(training.model_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not trainer.has_policy(training.model_id)
    gone = httpx.post(
        f"{live_server.url}/api/v1/get_info",
        json={"model_id": training.model_id},
        headers={"X-API-Key": API_KEY},
    )
    assert gone.status_code == 404
    # What was saved survives the session.
    listed = tinker.RestClient(base_url=live_server.url, api_key=API_KEY)
    ids = [c.checkpoint_id for c in listed.list_checkpoints(training.model_id).result().checkpoints]
    assert ids == ["weights/kept"]


def test_future_from_before_a_restart_answers_lost(live_server: LiveServer) -> None:
    earlier = "req-0000beef-12"
    answer = httpx.post(
        f"{live_server.url}/api/v1/retrieve_future",
        json={"request_id": earlier},
        headers={"X-API-Key": API_KEY},
    )
    assert answer.status_code == 410
    assert answer.json()["code"] == "request_lost"
    assert "restarted" in answer.json()["error"]
    made_up = f"req-{live_server.service.futures.boot_id}-424242"
    missing = httpx.post(
        f"{live_server.url}/api/v1/retrieve_future",
        json={"request_id": made_up},
        headers={"X-API-Key": API_KEY},
    )
    assert missing.status_code == 404

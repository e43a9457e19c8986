"""Two tenants, 1,000 randomized cross-tenant requests: nothing of one leaks to the other.

Tenant alpha owns a session, a policy with a training state and a revision, a sampler and a
finished future. Tenant beta aims every kind of request at them; each must answer exactly as
if they did not exist (404 `not_found`), listings must not show them, and alpha's resources
must be intact afterwards.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import tinker
from tests.api.conftest import API_KEY, OTHER_KEY, TINY, LiveServer
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

REQUESTS = 1000


@dataclass
class Owned:
    session_id: str
    model_id: str
    state_path: str
    sampler_path: str
    sampler_id: str
    request_id: str


@pytest.fixture(scope="module")
def owned(live_server: LiveServer) -> Owned:
    client = tinker.ServiceClient(base_url=live_server.url, api_key=API_KEY)
    training = client.create_lora_training_client(base_model=TINY, rank=2, seed=2).result()
    tokens = list(range(40, 50))
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )
    training.forward_backward([datum], "cross_entropy").result()
    state_path = training.save_state("iso-state").result().path
    sampler_path = training.save_weights_for_sampler("iso-rev").result().path
    session_id = training.model_id.split(":train:")[0]
    headers = {"X-API-Key": API_KEY}
    made = httpx.post(
        f"{live_server.url}/api/v1/create_sampling_session",
        json={"session_id": session_id, "sampling_session_seq_id": 77, "model_path": sampler_path},
        headers=headers,
    ).json()
    sample = httpx.post(
        f"{live_server.url}/api/v1/asample",
        json={
            "sampling_session_id": made["sampling_session_id"],
            "seq_id": 0,
            "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens[:3]}]},
            "sampling_params": {"max_tokens": 2},
        },
        headers=headers,
    ).json()
    return Owned(
        session_id,
        training.model_id,
        state_path,
        sampler_path,
        made["sampling_session_id"],
        sample["request_id"],
    )


def _fwdbwd(model_id: str) -> bytes:
    message = pb.ForwardBackwardRequest(model_id=model_id, seq_id=999, loss_fn="cross_entropy")
    datum = message.data.add()
    datum.model_input.add().encoded_text.tokens = np.arange(3, dtype=np.int32).tobytes()
    datum.loss_fn_inputs["target_tokens"].CopyFrom(
        pb.Tensor(dense=np.arange(1, 4, dtype=np.int64).tobytes(), dtype=pb.DTYPE_INT64)
    )
    return message.SerializeToString()


def _attacks(o: Owned) -> list[tuple[str, str, dict]]:
    run = o.model_id
    return [
        ("POST", "get_info", {"json": {"model_id": run}}),
        ("POST", "forward_backward", {"content": _fwdbwd(run)}),
        (
            "POST",
            "optim_step",
            {"json": {"model_id": run, "seq_id": 999, "adam_params": {"learning_rate": 1.0}}},
        ),
        ("POST", "save_weights", {"json": {"model_id": run, "path": "stolen", "seq_id": 998}}),
        (
            "POST",
            "save_weights_for_sampler",
            {"json": {"model_id": run, "path": "x", "seq_id": 997}},
        ),
        (
            "POST",
            "load_weights",
            {"json": {"model_id": run, "path": o.state_path, "seq_id": 996, "optimizer": True}},
        ),
        (
            "POST",
            "create_sampling_session",
            {"json": {"session_id": o.session_id, "model_path": o.sampler_path}},
        ),
        (
            "POST",
            "create_model",
            {
                "json": {
                    "session_id": o.session_id,
                    "model_seq_id": 50,
                    "base_model": TINY,
                    "lora_config": {"rank": 2},
                }
            },
        ),
        ("GET", f"samplers/{o.sampler_id}", {}),
        (
            "POST",
            "asample",
            {
                "json": {
                    "sampling_session_id": o.sampler_id,
                    "num_samples": 1,
                    "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                }
            },
        ),
        ("POST", "retrieve_future", {"json": {"request_id": o.request_id}}),
        ("POST", "session_heartbeat", {"json": {"session_id": o.session_id}}),
        ("POST", f"sessions/{o.session_id}/finish", {"json": {"reason": {"type": "success"}}}),
        ("GET", f"training_runs/{run}", {}),
        ("GET", f"training_runs/{run}/checkpoints", {}),
        ("DELETE", f"training_runs/{run}/checkpoints/sampler_weights/iso-rev", {}),
        ("DELETE", f"training_runs/{run}/checkpoints/weights/iso-state", {}),
        (
            "PUT",
            f"training_runs/{run}/checkpoints/weights/iso-state/ttl",
            {"json": {"ttl_seconds": 3600}},
        ),
    ]


def test_cross_tenant_requests_find_nothing(live_server: LiveServer, owned: Owned) -> None:
    rng = random.Random(1234)
    attacks = _attacks(owned)
    # The same requests aimed at ids that never existed: the answers must read the same.
    ghost = Owned(
        "sess-000000000000",
        "sess-000000000000:train:0",
        "tinker://sess-000000000000:train:0/weights/iso-state",
        "tinker://sess-000000000000:train:0/sampler_weights/iso-rev",
        "sess-000000000000:sample:77",
        f"req-{live_server.service.futures.boot_id}-99999999",
    )
    ghosts = _attacks(ghost)
    renames = [(getattr(ghost, f), getattr(owned, f)) for f in vars(owned)]
    outsider = {"X-API-Key": OTHER_KEY}
    seen: dict[str, int] = {}
    with httpx.Client(base_url=f"{live_server.url}/api/v1", timeout=30) as http:
        for _ in range(REQUESTS):
            index = rng.randrange(len(attacks))
            method, path, extra = attacks[index]
            answer = http.request(method, path, headers=outsider, **extra)
            assert answer.status_code == 404, (method, path, answer.status_code, answer.text)
            assert answer.json()["code"] == "not_found"
            g_method, g_path, g_extra = ghosts[index]
            missing = http.request(g_method, g_path, headers=outsider, **g_extra).text
            for fake, real in renames:
                missing = missing.replace(fake, real)
            assert answer.text == missing, (path, answer.text, missing)
            seen[path] = seen.get(path, 0) + 1
            if rng.random() < 0.05:  # listings never show the other tenant's records
                runs = http.get("training_runs", headers=outsider).json()["training_runs"]
                assert owned.model_id not in {r["training_run_id"] for r in runs}
                listed = http.get("checkpoints", headers=outsider).json()["checkpoints"]
                assert not [c for c in listed if owned.model_id in c["tinker_path"]]
    assert len(seen) == len(attacks)  # every kind of request was tried

    owner = tinker.RestClient(base_url=live_server.url, api_key=API_KEY)
    ids = {c.checkpoint_id for c in owner.list_checkpoints(owned.model_id).result().checkpoints}
    assert {"weights/iso-state", "sampler_weights/iso-rev"} <= ids
    assert "weights/stolen" not in ids
    result = httpx.post(
        f"{live_server.url}/api/v1/retrieve_future",
        json={"request_id": owned.request_id},
        headers={"X-API-Key": API_KEY},
    )
    assert result.headers["content-type"] == "application/x-protobuf"

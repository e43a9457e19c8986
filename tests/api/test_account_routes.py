"""Projects, session search, traces, audit trail, usage, copies and archives through the SDK,
and the JSON form of forward_backward giving the same result as the protobuf form."""

from __future__ import annotations

import io
import json
import tarfile
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pytest
import tinker
from tests.api.conftest import API_KEY, OTHER_KEY, TINY, LiveServer
from tinker import types

from mint.api.json_codec import decode_forward_backward_json
from mint.errors import MalformedRequest

TOKENS = [5, 6, 7, 8, 9, 10, 11]


def _datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:]},
    )


@pytest.fixture(scope="module")
def run(live_server: LiveServer) -> tuple[tinker.ServiceClient, tinker.TrainingClient]:
    service = tinker.ServiceClient(base_url=live_server.url, api_key=API_KEY, project_id="p1")
    training = service.create_lora_training_client(TINY, rank=2).result()
    training.forward_backward([_datum()], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    training.save_state("acct-state").result()
    training.save_weights_for_sampler("acct-sampler").result()
    return service, training


def _rest(live_server: LiveServer, key: str = API_KEY) -> tinker.RestClient:
    return tinker.RestClient(base_url=live_server.url, api_key=key)


def test_session_project_search_and_trace(live_server: LiveServer, run: tuple) -> None:
    _, training = run
    session_id = training.model_id.split(":train:")[0]
    rest = _rest(live_server)
    found = rest.search_sessions(types.SessionSearchRequest(project_ids=["p1"])).result()
    assert session_id in [s.session_id for s in found.sessions]
    rest.assign_session_project(session_id, "p2").result()
    assert (
        not rest.search_sessions(types.SessionSearchRequest(project_ids=["p1"])).result().sessions
    )
    summary = rest.search_sessions(types.SessionSearchRequest(session_id=session_id)).result()
    assert [(s.session_id, s.project_id, s.checkpoints_count) for s in summary.sessions] == [
        (session_id, "p2", 2)
    ]
    url = rest.export_session_trace(session_id).result()
    trace = httpx.get(url).json()  # a signed link: no API key needed
    kinds = [e["name"] for e in trace["traceEvents"]]
    assert kinds == ["create_model", "forward_backward", "optim_step", "save_weights",
                     "save_weights_for_sampler"]  # fmt: skip
    assert trace["traceEvents"][1]["args"]["train_tokens"] == len(TOKENS) - 1
    assert httpx.get(url[:-3] + "AAA").status_code == 404  # a tampered link
    # Another tenant cannot see the session at all.
    with pytest.raises(tinker.NotFoundError):
        _rest(live_server, OTHER_KEY).export_session_trace(session_id).result()


def test_audit_trail_and_usage(live_server: LiveServer, run: tuple) -> None:
    _, training = run
    rest = _rest(live_server)
    events = [e.event for e in rest.get_audit_log().result().entries]
    assert {"session_create", "training_run_create", "checkpoint_create"} <= set(events)
    other = [e.event for e in _rest(live_server, OTHER_KEY).get_audit_log().result().entries]
    assert "training_run_create" not in other
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    usage = rest.get_billing_usage(hour - timedelta(hours=1), hour + timedelta(hours=1)).result()
    session_id = training.model_id.split(":train:")[0]
    mine = [e.event_info for e in usage.data if e.session_id == session_id]
    assert [i.token_count for i in mine if i.type == "training"] == [len(TOKENS) - 1]
    assert [i.count for i in mine if i.type == "checkpoint"] == [2]
    storage = rest.get_current_checkpoint_storage_usage().result()
    assert sum(item.checkpoint_count for item in storage.data) >= 2


def test_copy_weights_and_archive(live_server: LiveServer, run: tuple) -> None:
    service, training = run
    rest = _rest(live_server)
    state = f"tinker://{training.model_id}/weights/acct-state"
    copied = rest.copy_weights(state, "archive").result()
    assert copied.endswith("/weights/acct-state") and copied != state
    # The copy is a real training state: a client created from it has the same weights.
    original = training.forward([_datum()], "cross_entropy").result()
    resumed = service.create_training_client_from_state(copied).result()
    again = resumed.forward([_datum()], "cross_entropy").result()
    np.testing.assert_allclose(
        again.loss_fn_outputs[0]["logprobs"].tolist(),
        original.loss_fn_outputs[0]["logprobs"].tolist(),
        atol=1e-5,
    )
    sampler = f"tinker://{training.model_id}/sampler_weights/acct-sampler"
    reply = httpx.get(
        f"{live_server.url}/api/v1/training_runs/{training.model_id}/checkpoints/"
        "sampler_weights/acct-sampler/archive",
        headers={"X-API-Key": API_KEY},
    )
    archive = httpx.get(reply.json()["url"])
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        names = tar.getnames()
    assert "acct-sampler/adapter_model.safetensors" in names
    assert "acct-sampler/adapter_config.json" in names
    refused = httpx.post(
        f"{live_server.url}/api/v1/training_runs/{training.model_id}/checkpoints/"
        "sampler_weights/acct-sampler/publish",
        headers={"X-API-Key": API_KEY},
    )
    assert refused.status_code == 400 and refused.json()["code"] == "unsupported"
    assert sampler  # the path the refusal concerns


def test_json_forward_backward_matches_protobuf(live_server: LiveServer, run: tuple) -> None:
    _, training = run
    by_proto = training.forward([_datum()], "cross_entropy").result()
    body = {
        "model_id": training.model_id,
        "seq_id": 0,
        "forward_input": {
            "data": [
                {
                    "model_input": {"chunks": [{"type": "encoded_text", "tokens": TOKENS[:-1]}]},
                    "loss_fn_inputs": {
                        "target_tokens": {
                            "data": TOKENS[1:],
                            "dtype": "int64",
                            "shape": [len(TOKENS) - 1],
                        }
                    },
                }
            ],  # fmt: skip
            "loss_fn": "cross_entropy",
        },
    }
    headers = {"X-API-Key": API_KEY}
    submitted = httpx.post(f"{live_server.url}/api/v1/forward", json=body, headers=headers)
    assert submitted.status_code == 200, submitted.text
    poll = {"request_id": submitted.json()["request_id"]}
    result = httpx.post(f"{live_server.url}/api/v1/retrieve_future", json=poll, headers=headers,
                        timeout=30)  # fmt: skip
    from tinker.proto import tinker_public_pb2 as pb

    message = pb.ForwardBackwardOutput.FromString(result.content)
    logprobs = np.frombuffer(message.loss_fn_outputs[0].fields["logprobs"].data, np.float32)
    np.testing.assert_allclose(logprobs, by_proto.loss_fn_outputs[0]["logprobs"].tolist(),
                               atol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{", "does not match the Tinker API"),
        (json.dumps({"model_id": "m"}).encode(), "neither forward_backward_input"),
        (
            json.dumps({"model_id": "m", "forward_backward_input": {"data": [{
                "model_input": {"chunks": [{"tokens": [2**70]}]}}]}}).encode(),
            "unusable value",
        ),
        (
            json.dumps({"model_id": "m", "forward_backward_input": {"data": [{
                "model_input": {"chunks": [{"tokens": [1]}]},
                "loss_fn_inputs": {"w": {"data": [1.0, 2.0], "shape": [3]}}}]}}).encode(),
            "2 values do not fit shape [3]",
        ),
        (
            json.dumps({"model_id": "m", "forward_backward_input": {"data": [{
                "model_input": {"chunks": [{"tokens": [1]}]},
                "loss_fn_inputs": {"w": {"data": [1.0], "shape": [2, 2],
                                         "sparse_crow_indices": [0, 1, 9],
                                         "sparse_col_indices": [0]}}}]}}).encode(),
            "not a valid sparse CSR tensor",
        ),
    ],
)  # fmt: skip
def test_bad_json_forward_backward_bodies_are_refused(body: bytes, problem: str) -> None:
    with pytest.raises(MalformedRequest, match=problem.replace("[", r"\[").replace("]", r"\]")):
        decode_forward_backward_json(body)


def test_json_sparse_tensor_is_densified() -> None:
    body = {
        "model_id": "m",
        "seq_id": 4,
        "forward_backward_input": {
            "data": [
                {
                    "model_input": {"chunks": [{"tokens": [1, 2]}]},
                    "loss_fn_inputs": {
                        "w": {
                            "data": [0.5, 2.0],
                            "dtype": "float32",
                            "shape": [2, 3],
                            "sparse_crow_indices": [0, 1, 2],
                            "sparse_col_indices": [2, 0],
                        }
                    },
                }
            ],  # fmt: skip
            "loss_fn": "ppo",
            "loss_fn_config": {"clip_low_threshold": 0.8},
        },
    }
    call = decode_forward_backward_json(json.dumps(body).encode())
    assert (call.model_id, call.seq_id, call.loss_fn, call.forward_only) == ("m", 4, "ppo", False)
    assert call.loss_fn_config == {"clip_low_threshold": 0.8}
    np.testing.assert_array_equal(call.data[0].input_tokens, [1, 2])
    np.testing.assert_array_equal(call.data[0].loss_inputs["w"], [[0, 0, 0.5], [2.0, 0, 0]])

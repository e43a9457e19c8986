"""Refusals carry a status, an error code and a message; retries are applied once."""

from __future__ import annotations

import httpx
import pytest
import tinker
from tests.api.conftest import API_KEY, OTHER_KEY, TINY, LiveServer, forward_backward_body

HEADERS = {"X-API-Key": API_KEY}


def _post(server: LiveServer, path: str, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{server.url}/api/v1/{path}", timeout=30, **kwargs)  # type: ignore[arg-type]


def _session(server: LiveServer, key: str = API_KEY) -> str:
    answer = _post(
        server, "create_session", json={"tags": [], "user_metadata": {}}, headers={"X-API-Key": key}
    )
    assert answer.status_code == 200
    return str(answer.json()["session_id"])


def _result(server: LiveServer, request_id: str, key: str = API_KEY) -> httpx.Response:
    for _ in range(20):
        answer = _post(
            server, "retrieve_future", json={"request_id": request_id}, headers={"X-API-Key": key}
        )
        pending = answer.headers["content-type"].startswith("application/json") and (
            answer.json().get("type") == "try_again"
        )
        if pending:
            continue
        return answer
    raise AssertionError(f"{request_id} never finished")


def _create_model(server: LiveServer, session: str, seq: int, seed: int = 0) -> str:
    body = {
        "session_id": session,
        "model_seq_id": seq,
        "base_model": TINY,
        "lora_config": {"rank": 2, "seed": seed},
    }
    answer = _post(server, "create_model", json=body, headers=HEADERS)
    assert answer.status_code == 200, answer.text
    done = _result(server, answer.json()["request_id"]).json()
    return str(done["model_id"])


def test_missing_api_key_is_401_and_server_keeps_serving(live_server: LiveServer) -> None:
    answer = _post(live_server, "create_session", json={"tags": [], "user_metadata": {}})
    assert answer.status_code == 401
    assert answer.json()["code"] == "unauthenticated"
    assert "X-API-Key" in answer.json()["error"]
    wrong = _post(live_server, "create_session", json={}, headers={"X-API-Key": "tml-nope"})
    assert wrong.status_code == 401 and "unknown API key" in wrong.json()["error"]
    assert _session(live_server)


def test_unknown_base_is_404_naming_known_bases(live_server: LiveServer) -> None:
    session = _session(live_server)
    body = {
        "session_id": session,
        "model_seq_id": 0,
        "base_model": "acme/NoSuchModel-7B",
        "lora_config": {"rank": 4},
    }
    answer = _post(live_server, "create_model", json=body, headers=HEADERS)
    assert answer.status_code == 404
    assert answer.json()["code"] == "unknown_base"
    assert "acme/NoSuchModel-7B" in answer.json()["error"] and TINY in answer.json()["error"]
    client = tinker.ServiceClient(base_url=live_server.url, api_key=API_KEY)
    with pytest.raises(tinker.NotFoundError, match="unknown base"):
        client.create_lora_training_client(base_model="acme/NoSuchModel-7B", rank=4).result()
    assert _create_model(live_server, session, 1)


def test_malformed_protobuf_is_400_and_server_keeps_serving(live_server: LiveServer) -> None:
    headers = {**HEADERS, "Content-Type": "application/x-protobuf"}
    answer = _post(live_server, "forward_backward", content=b"\xff\x00garbage", headers=headers)
    assert answer.status_code == 400
    assert answer.json()["code"] == "malformed_request"
    assert "ForwardBackwardRequest" in answer.json()["error"]
    session = _session(live_server)
    model_id = _create_model(live_server, session, 0)
    ok = _post(
        live_server, "forward_backward", content=forward_backward_body(model_id, 1), headers=headers
    )
    assert ok.status_code == 200
    assert _result(live_server, ok.json()["request_id"]).headers["content-type"] == (
        "application/x-protobuf"
    )


def test_retried_forward_backward_is_applied_once(live_server: LiveServer) -> None:
    headers = {**HEADERS, "Content-Type": "application/x-protobuf"}
    session = _session(live_server)
    once, twice = _create_model(live_server, session, 0), _create_model(live_server, session, 1)
    norms = {}
    for model_id, sends in ((once, 1), (twice, 2)):
        ids = {
            _post(
                live_server,
                "forward_backward",
                content=forward_backward_body(model_id, 1),
                headers=headers,
            ).json()["request_id"]
            for _ in range(sends)
        }
        assert len(ids) == 1  # the replay answers with the first request's future
        _result(live_server, ids.pop())
        step = _post(
            live_server,
            "optim_step",
            headers=HEADERS,
            json={"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.1}},
        )
        norms[model_id] = _result(live_server, step.json()["request_id"]).json()["metrics"]
    assert norms[once]["grad_norm:mean"] == norms[twice]["grad_norm:mean"]


def test_other_tenant_sees_nothing(live_server: LiveServer) -> None:
    session = _session(live_server)
    model_id = _create_model(live_server, session, 0)
    other = {"X-API-Key": OTHER_KEY}
    info = _post(live_server, "get_info", json={"model_id": model_id}, headers=other)
    assert info.status_code == 404 and info.json()["code"] == "not_found"
    runs = httpx.get(f"{live_server.url}/api/v1/training_runs/{model_id}", headers=other)
    assert runs.status_code == 404


def test_out_of_order_chunks_run_in_seq_order(live_server: LiveServer) -> None:
    client = tinker.ServiceClient(base_url=live_server.url, api_key=API_KEY)
    training = client.create_lora_training_client(base_model=TINY, rank=2).result()
    headers = {**HEADERS, "Content-Type": "application/x-protobuf"}
    # seq 2 (an optim_step) arrives before seq 1 (its forward_backward): it must wait.
    step = _post(
        live_server,
        "optim_step",
        headers=HEADERS,
        json={"model_id": training.model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.1}},
    )
    fb = _post(
        live_server,
        "forward_backward",
        content=forward_backward_body(training.model_id, 1),
        headers=headers,
    )
    _result(live_server, fb.json()["request_id"])
    metrics = _result(live_server, step.json()["request_id"]).json()["metrics"]
    assert metrics["grad_norm:mean"] > 0  # the step saw the gradient of seq 1

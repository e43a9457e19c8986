"""Scoped API keys (403 `missing_scope`) and per-tenant job quotas (429 `job_quota_exceeded`)."""

from __future__ import annotations

import time

import httpx
import pytest
import tinker
from tests.api.conftest import API_KEY, TINY, LiveServer, forward_backward_body
from tinker import types

from mint.api.app import create_app
from mint.api.auth import REQUIRED_SCOPE
from mint.control.futures import JsonResult
from mint.control.worker import BaseWorker, TrainJob
from mint.errors import JobQuotaExceeded

SAMPLE_ONLY = "tml-scope-sample-only"
TRAIN_ONLY = "tml-scope-train-only"
QUOTA_KEY = "tml-quota-tenant"
PROTO = {"Content-Type": "application/x-protobuf"}


@pytest.fixture(scope="module")
def scoped(live_server: LiveServer) -> LiveServer:
    catalog = live_server.service.catalog
    for tenant, key, scopes in (
        ("gamma", SAMPLE_ONLY, ["sample"]),
        ("epsilon", TRAIN_ONLY, ["train"]),
        ("delta", QUOTA_KEY, None),
    ):
        catalog.ensure_tenant(tenant)
        catalog.add_api_key(tenant, key, scopes)
    return live_server


def _call(server: LiveServer, method: str, path: str, key: str, **kw: object) -> httpx.Response:
    headers = {"X-API-Key": key, **kw.pop("headers", {})}  # type: ignore[dict-item]
    return httpx.request(method, f"{server.url}{path}", headers=headers, timeout=30, **kw)  # type: ignore[arg-type]


def _session(server: LiveServer, key: str) -> str:
    answer = _call(server, "POST", "/api/v1/create_session", key, json={"tags": []})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["session_id"])


def _poll(server: LiveServer, request_id: str, key: str) -> httpx.Response:
    for _ in range(40):
        answer = _call(
            server, "POST", "/api/v1/retrieve_future", key, json={"request_id": request_id}
        )
        is_json = answer.headers["content-type"].startswith("application/json")
        if not (is_json and answer.json().get("type") == "try_again"):
            assert answer.status_code == 200, answer.text
            return answer
    raise AssertionError(f"{request_id} never finished")


def _result(server: LiveServer, request_id: str, key: str) -> dict:
    return dict(_poll(server, request_id, key).json())


def _create_model_body(session: str, seq: int = 0) -> dict:
    return {
        "session_id": session,
        "model_seq_id": seq,
        "base_model": TINY,
        "lora_config": {"rank": 2},
    }


def _assert_refused(answer: httpx.Response, status: int, code: str) -> dict:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["code"] == code
    return body


def test_every_scoped_route_exists(live_server: LiveServer) -> None:
    routes = {
        (method, route.path)
        for route in create_app(live_server.service).routes
        for method in getattr(route, "methods", ())
    }
    assert set(REQUIRED_SCOPE) <= routes


def test_sample_only_key_is_refused_training_with_missing_scope(scoped: LiveServer) -> None:
    session = _session(scoped, SAMPLE_ONLY)  # sessions need no scope
    body = _assert_refused(
        _call(
            scoped, "POST", "/api/v1/create_model", SAMPLE_ONLY, json=_create_model_body(session)
        ),
        403,
        "missing_scope",
    )
    assert "lacks scope 'train'" in body["error"] and "--scope train" in body["error"]
    fb = _call(
        scoped,
        "POST",
        "/api/v1/forward_backward",
        SAMPLE_ONLY,
        content=forward_backward_body("x", 1),
        headers=PROTO,
    )
    _assert_refused(fb, 403, "missing_scope")
    step = {"model_id": "x", "seq_id": 2, "adam_params": {"learning_rate": 0.1}}
    _assert_refused(
        _call(scoped, "POST", "/api/v1/optim_step", SAMPLE_ONLY, json=step), 403, "missing_scope"
    )
    delete = _call(scoped, "DELETE", "/api/v1/training_runs/r/checkpoints/weights/n", SAMPLE_ONLY)
    _assert_refused(delete, 403, "missing_scope")
    # Copying a checkpoint makes a new training run, so it is a training call too.
    copy = _call(
        scoped,
        "POST",
        "/api/v1/copy_weights",
        SAMPLE_ONLY,
        json={"source_path": "tinker://r/weights/n"},
    )
    _assert_refused(copy, 403, "missing_scope")

    made = _call(
        scoped,
        "POST",
        "/api/v1/create_sampling_session",
        SAMPLE_ONLY,
        json={"session_id": session, "sampling_session_seq_id": 0, "base_model": TINY},
    )
    assert made.status_code == 200, made.text
    sample = _call(
        scoped,
        "POST",
        "/api/v1/asample",
        SAMPLE_ONLY,
        json={
            "sampling_session_id": made.json()["sampling_session_id"],
            "seq_id": 1,
            "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [40, 41, 42]}]},
            "sampling_params": {"max_tokens": 2, "temperature": 0.0},
        },
    )
    assert sample.status_code == 200, sample.text
    assert _poll(scoped, sample.json()["request_id"], SAMPLE_ONLY).content  # the sample


def test_train_only_key_cannot_sample(scoped: LiveServer) -> None:
    session = _session(scoped, TRAIN_ONLY)
    made = _call(
        scoped,
        "POST",
        "/api/v1/create_sampling_session",
        TRAIN_ONLY,
        json={"session_id": session, "sampling_session_seq_id": 0, "base_model": TINY},
    )
    assert "lacks scope 'sample'" in _assert_refused(made, 403, "missing_scope")["error"]
    chat = _call(
        scoped,
        "POST",
        "/v1/chat/completions",
        TRAIN_ONLY,
        json={"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    )
    # The OpenAI routes refuse in OpenAI's error shape, so the openai client sees the code.
    assert chat.status_code == 403, chat.text
    error = chat.json()["error"]
    assert (error["code"], error["type"]) == ("missing_scope", "invalid_request_error")
    assert "lacks scope 'sample'" in error["message"]
    created = _call(
        scoped, "POST", "/api/v1/create_model", TRAIN_ONLY, json=_create_model_body(session)
    )
    assert created.status_code == 200, created.text


def test_scoped_key_reads_other_tenants_things_as_not_found(scoped: LiveServer) -> None:
    client = tinker.ServiceClient(base_url=scoped.url, api_key=API_KEY)
    training = client.create_lora_training_client(base_model=TINY, rank=2).result()
    fb = training.forward_backward(
        [
            types.Datum(
                model_input=types.ModelInput.from_ints([1, 2, 3]),
                loss_fn_inputs={"target_tokens": [2, 3, 4]},
            )
        ],
        "cross_entropy",
    )
    request_id = fb.request_id if hasattr(fb, "request_id") else None
    fb.result()
    for path, made_up in (
        (
            f"/api/v1/training_runs/{training.model_id}",
            "/api/v1/training_runs/sess-000000000000:train:0",
        ),
        (
            f"/api/v1/training_runs/{training.model_id}/checkpoints",
            "/api/v1/training_runs/nope/checkpoints",
        ),
    ):
        theirs = _call(scoped, "GET", path, SAMPLE_ONLY)
        missing = _call(scoped, "GET", made_up, SAMPLE_ONLY)
        assert (theirs.status_code, theirs.json()["code"]) == (404, "not_found")
        assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
    if request_id:
        poll = _call(
            scoped, "POST", "/api/v1/retrieve_future", SAMPLE_ONLY, json={"request_id": request_id}
        )
        assert (poll.status_code, poll.json()["code"]) == (404, "not_found")
    # A refused scope reads the same for another tenant's model as for one that does not
    # exist: the check runs before any lookup.
    theirs = _call(
        scoped,
        "POST",
        "/api/v1/forward_backward",
        SAMPLE_ONLY,
        content=forward_backward_body(training.model_id, 9),
        headers=PROTO,
    )
    nobody = _call(
        scoped,
        "POST",
        "/api/v1/forward_backward",
        SAMPLE_ONLY,
        content=forward_backward_body("sess-000000000000:train:0", 9),
        headers=PROTO,
    )
    assert theirs.status_code == nobody.status_code == 403
    assert theirs.json()["error"] == nobody.json()["error"]


def test_over_quota_is_a_retryable_429_and_nothing_is_lost(scoped: LiveServer) -> None:
    service = scoped.service
    service.catalog.set_job_quota("delta", 1)
    try:
        session = _session(scoped, QUOTA_KEY)
        held = service.futures.create("delta", "held")  # one unfinished job fills the quota
        body = _create_model_body(session)
        refused = _call(scoped, "POST", "/api/v1/create_model", QUOTA_KEY, json=body)
        error = _assert_refused(refused, 429, "job_quota_exceeded")
        assert refused.headers["Retry-After"] == "1"
        assert refused.headers["x-should-retry"] == "true"
        assert "quota is 1" in error["error"] and "nothing was queued" in error["error"]
        runs = _call(scoped, "GET", "/api/v1/training_runs", QUOTA_KEY).json()
        assert runs["training_runs"] == []  # the refused request left nothing behind

        held.set_result(JsonResult({}))
        retried = _call(scoped, "POST", "/api/v1/create_model", QUOTA_KEY, json=body)
        assert retried.status_code == 200, retried.text
        model_id = _result(scoped, retried.json()["request_id"], QUOTA_KEY)["model_id"]
        runs = _call(scoped, "GET", "/api/v1/training_runs", QUOTA_KEY).json()
        assert [run["training_run_id"] for run in runs["training_runs"]] == [model_id]
        assert service.futures.unfinished("delta") == 0
    finally:
        service.catalog.set_job_quota("delta", None)


def test_quota_never_refuses_the_request_a_parked_job_waits_for(scoped: LiveServer) -> None:
    service = scoped.service
    session = _session(scoped, QUOTA_KEY)
    created = _call(
        scoped, "POST", "/api/v1/create_model", QUOTA_KEY, json=_create_model_body(session)
    )
    model_id = _result(scoped, created.json()["request_id"], QUOTA_KEY)["model_id"]
    service.catalog.set_job_quota("delta", 1)
    try:
        # seq 2 arrives first and parks (one unfinished job: the quota is full); seq 1, which
        # it waits for, must still be admitted or both would wait for the gap timeout.
        step = {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.1}}
        parked = _call(scoped, "POST", "/api/v1/optim_step", QUOTA_KEY, json=step)
        assert parked.status_code == 200, parked.text
        assert service.futures.unfinished("delta") == 1
        first = _call(
            scoped,
            "POST",
            "/api/v1/forward_backward",
            QUOTA_KEY,
            content=forward_backward_body(model_id, 1),
            headers=PROTO,
        )
        assert first.status_code == 200, first.text
        _poll(scoped, first.json()["request_id"], QUOTA_KEY)
        metrics = _result(scoped, parked.json()["request_id"], QUOTA_KEY)["metrics"]
        assert metrics["grad_norm:mean"] > 0
    finally:
        service.catalog.set_job_quota("delta", None)


def test_sdk_run_completes_under_a_quota_of_one(
    scoped: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK pipelines forward_backward and optim_step; 429s are retried, none is lost."""
    service = scoped.service
    refusals = []
    create = service.futures.create

    def counting_create(tenant: str, kind: str, quota: int | None = None) -> object:
        try:
            return create(tenant, kind, quota)
        except JobQuotaExceeded:
            refusals.append(kind)
            raise

    monkeypatch.setattr(service.futures, "create", counting_create)
    # Each training job takes a moment, so the SDK's pipelined requests always meet an
    # unfinished one and the quota has something to refuse (on a fast machine the tiny
    # base's jobs could otherwise finish before the next request arrives).
    run_train = BaseWorker._run_train

    def slow_run_train(worker: BaseWorker, job: TrainJob) -> None:
        time.sleep(0.2)
        run_train(worker, job)

    monkeypatch.setattr(BaseWorker, "_run_train", slow_run_train)
    client = tinker.ServiceClient(base_url=scoped.url, api_key=QUOTA_KEY)
    training = client.create_lora_training_client(base_model=TINY, rank=2).result()
    service.catalog.set_job_quota("delta", 1)
    try:
        datum = types.Datum(
            model_input=types.ModelInput.from_ints([5, 6, 7, 8]),
            loss_fn_inputs={"target_tokens": [6, 7, 8, 9]},
        )
        futures = []
        for _ in range(2):
            futures.append(training.forward_backward([datum], "cross_entropy"))
            futures.append(training.optim_step(types.AdamParams(learning_rate=0.01)))
        results = [future.result() for future in futures]
        assert len(results) == 4
        assert refusals  # the quota did refuse some of the pipelined requests
        assert results[3].metrics["grad_norm:mean"] > 0
        assert service.futures.unfinished("delta") == 0
    finally:
        service.catalog.set_job_quota("delta", None)

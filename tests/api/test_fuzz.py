"""Fuzzing: generated requests against every JSON route of the OpenAPI schema, and malformed
protobuf, JSON and zstd bodies against forward_backward, answer without a server error.

Hypothesis runs derandomized, so CI sends the same requests on every run.
"""

from __future__ import annotations

import itertools
import json
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from tests.api.conftest import API_KEY, TINY
from tinker.proto import tinker_public_pb2 as pb

from mint.api.app import create_app
from mint.config import Settings
from mint.control.service import Service

EXAMPLES_PER_ROUTE = 20
PROTO_EXAMPLES = 300
FUZZ = settings(
    max_examples=EXAMPLES_PER_ROUTE,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory, bases_dir: Path) -> Iterator[FastAPI]:
    home = tmp_path_factory.mktemp("fuzz-home")
    (home / "bases").symlink_to(bases_dir, target_is_directory=True)
    service = Service(Settings(home=home, device="cpu", dtype="float32", long_poll_s=0.2))
    service.catalog.ensure_tenant("alpha")
    service.catalog.add_api_key("alpha", API_KEY)
    service.worker(TINY)
    yield create_app(service)
    service.close()


@pytest.fixture(scope="module")
def client(fuzz_app: FastAPI) -> TestClient:
    return TestClient(fuzz_app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def model_id(client: TestClient) -> str:
    """A live training run, so that fuzzed bodies reach past the model lookup."""
    headers = {"X-API-Key": API_KEY}
    session = client.post("/api/v1/create_session", json={}, headers=headers).json()
    body = {"session_id": session["session_id"], "model_seq_id": 0, "base_model": TINY}
    body["lora_config"] = {"rank": 2}
    created = client.post("/api/v1/create_model", json=body, headers=headers).json()
    client.post("/api/v1/retrieve_future", json={"request_id": created["request_id"]},
                headers=headers)  # fmt: skip
    return str(created["model_id"])


def test_generated_requests_to_every_json_route_answer_without_a_server_error(
    fuzz_app: FastAPI, model_id: str
) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    sent: Counter[str] = Counter()
    errors: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    for operation, mode in itertools.product(operations, modes):
        send = _sender(operation, mode, sent, errors)
        try:
            send()
        except Unsatisfiable:  # a route with no parameters has no invalid form to send
            assert mode is schemathesis.GenerationMode.NEGATIVE
    assert not errors, "\n".join(errors[:10])
    print(f"fuzz: {sum(sent.values())} generated requests over {len(sent)} routes")
    assert sum(sent.values()) >= 1000, sent
    assert len(sent) >= 40  # every route of the schema was exercised


def _sender(
    operation: Any, mode: schemathesis.GenerationMode, sent: Counter[str], errors: list[str]
) -> Callable[[], None]:
    """A Hypothesis test that sends `operation`'s generated cases and notes any 5xx."""
    label = operation.label

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode), keyed=st.integers(0, 9))
    def send(case: schemathesis.Case, keyed: int) -> None:
        # Most requests carry a valid key so they reach the route, some a made-up one.
        # (Hypothesis favours small draws, so the made-up key gets a middle value.)
        key = "tml-not-a-key" if keyed == 7 else API_KEY
        generated = case.headers or {}
        case.headers = {k: v for k, v in generated.items() if k.lower() != "x-api-key"}
        case.headers["X-API-Key"] = key
        response = case.call()
        sent[label] += 1
        if response.status_code >= 500:
            errors.append(f"{label} -> {response.status_code}: {response.text}")

    return send  # type: ignore[no-any-return]


def _datum_message(draw: st.DrawFn) -> pb.Datum:
    datum = pb.Datum()
    for _ in range(draw(st.integers(0, 2))):
        chunk = datum.model_input.add()
        tokens = draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=6))
        chunk.encoded_text.tokens = np.asarray(tokens, dtype=np.int32).tobytes()
    for name in draw(st.lists(st.sampled_from(["target_tokens", "weights", "advantages", "x"]),
                              max_size=3, unique=True)):  # fmt: skip
        tensor = datum.loss_fn_inputs[name]
        tensor.dtype = draw(st.sampled_from(list(pb.DType.values()) + [99]))
        tensor.shape.extend(draw(st.lists(st.integers(0, 5), max_size=3)))
        if draw(st.booleans()):
            tensor.dense = draw(st.binary(max_size=48))
        else:
            tensor.sparse_csr.values = draw(st.binary(max_size=32))
            tensor.sparse_csr.crow_indices = np.asarray(
                draw(st.lists(st.integers(-3, 8), max_size=5)), dtype=np.int64
            ).tobytes()
            tensor.sparse_csr.col_indices = np.asarray(
                draw(st.lists(st.integers(-3, 8), max_size=5)), dtype=np.int64
            ).tobytes()
    return datum


@st.composite
def malformed_proto(draw: st.DrawFn, model_id: str) -> tuple[bytes, dict[str, str]]:
    """Structurally valid messages with wrong contents, mangled bytes, or random bytes."""
    message = pb.ForwardBackwardRequest(
        model_id=draw(st.sampled_from([model_id, "", "sess-x:train:0"])),
        seq_id=draw(st.integers(-(2**31), 2**31 - 1)),
        loss_fn=draw(st.sampled_from(["cross_entropy", "ppo", "nope", ""])),
        forward_only=draw(st.booleans()),
    )
    for _ in range(draw(st.integers(0, 3))):
        message.data.append(_datum_message(draw))
    body = message.SerializeToString()
    mangle = draw(st.sampled_from(["none", "truncate", "flip", "random", "zstd-garbage"]))
    headers = {"Content-Type": "application/x-protobuf", "X-API-Key": API_KEY}
    if mangle == "truncate" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif mangle == "flip" and body:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1 :]
    elif mangle == "random":
        body = draw(st.binary(max_size=200))
    elif mangle == "zstd-garbage":
        headers["Content-Encoding"] = "zstd"
        body = draw(st.sampled_from([body, zlib.compress(body), b"\x28\xb5\x2f\xfd" + body]))
    return body, headers


@st.composite
def malformed_json(draw: st.DrawFn, model_id: str) -> bytes:
    values = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=8,
    )
    tensor = st.fixed_dictionaries(
        {"data": st.lists(values, max_size=4)},
        optional={
            "dtype": st.sampled_from(["int64", "float32", "bf16"]) | values,
            "shape": st.lists(st.integers(-2, 5), max_size=3) | values,
            "sparse_crow_indices": st.lists(st.integers(-2, 6), max_size=4),
            "sparse_col_indices": st.lists(st.integers(-2, 6), max_size=4),
        },
    )
    datum = st.fixed_dictionaries(
        {
            "model_input": st.fixed_dictionaries(
                {
                    "chunks": st.lists(
                        st.fixed_dictionaries(
                            {"tokens": st.lists(st.integers(-(2**65), 2**65), max_size=5) | values},
                            optional={"type": st.sampled_from(["encoded_text", "image"]) | values},
                        ),
                        max_size=2,
                    )
                }  # fmt: skip
            ),
            "loss_fn_inputs": st.dictionaries(st.sampled_from(["target_tokens", "w"]), tensor),
        }
    )
    document = {
        "model_id": draw(st.sampled_from([model_id, "missing"]) | values),
        "seq_id": draw(st.integers(-5, 2**70) | values),
        draw(st.sampled_from(["forward_backward_input", "forward_input", "other"])): {
            "data": draw(st.lists(datum, max_size=2) | values),
            "loss_fn": draw(st.sampled_from(["cross_entropy", "x"]) | values),
        },
    }
    text = json.dumps(draw(st.sampled_from([document, draw(values)])))
    return text.encode() if draw(st.booleans()) else text.encode()[: draw(st.integers(0, 40))]


def test_malformed_forward_backward_bodies_answer_without_a_server_error(
    client: TestClient, model_id: str
) -> None:
    sent: Counter[str] = Counter()
    errors: list[str] = []

    def check(kind: str, response: object) -> None:
        status = response.status_code  # type: ignore[attr-defined]
        sent[kind] += 1
        if status >= 500:
            errors.append(f"{kind} -> {status}: {response.text}")  # type: ignore[attr-defined]

    routes = st.sampled_from(["forward_backward", "forward"])

    @settings(FUZZ, max_examples=PROTO_EXAMPLES)
    @given(request=malformed_proto(model_id), route=routes)
    def send_proto(request: tuple[bytes, dict[str, str]], route: str) -> None:
        body, headers = request
        check("proto", client.post(f"/api/v1/{route}", content=body, headers=headers))

    @settings(FUZZ, max_examples=PROTO_EXAMPLES)
    @given(body=malformed_json(model_id), route=routes)
    def send_json(body: bytes, route: str) -> None:
        headers = {"Content-Type": "application/json", "X-API-Key": API_KEY}
        check("json", client.post(f"/api/v1/{route}", content=body, headers=headers))

    send_proto()
    send_json()
    assert not errors, "\n".join(errors[:10])
    print(f"fuzz: {sent['proto']} protobuf and {sent['json']} JSON forward_backward bodies")
    assert sent["proto"] >= PROTO_EXAMPLES and sent["json"] >= PROTO_EXAMPLES, sent

"""Kill the server (SIGKILL) mid-run three times and restart it on the same data directory.

Each round trains a little, saves, trains one unsaved step, leaves requests pending and is
killed. After every restart: each committed checkpoint is listed and usable, polls for the
earlier boot's requests fail clearly (410 `request_lost`), an SDK future that was in flight
raises instead of hanging or succeeding, and `create_training_client_from_state_with_optimizer`
resumes exactly at the last save (weights and Adam moments: the replayed unsaved step gives
the same logprobs to 1e-5).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from tests.api.conftest import API_KEY, TINY
from tinker import types

from mint.models.base import ResidentBase

ROUNDS = 3
ADAM = types.AdamParams(learning_rate=5e-3)
TOKENS = [5, 9, 14, 20, 27, 35, 44, 54]


def _datum(shift: int) -> types.Datum:
    tokens = [t + shift for t in TOKENS]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start(home: Path, port: int, **extra_env: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, MINT_HOME=str(home), MINT_API_KEYS=f"alpha={API_KEY}")
    env.update(MINT_DEVICE="cpu", MINT_DTYPE="float32", MINT_THREADS="1", **extra_env)
    server = subprocess.Popen(
        [sys.executable, "-m", "mint", "serve", "--port", str(port), "--preload", TINY],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise RuntimeError(f"mint serve exited with {server.returncode}")
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("mint serve did not answer within 120 s")


def _logprobs(training: tinker.TrainingClient) -> np.ndarray:
    out = training.forward([_datum(0)], "cross_entropy").result()
    return np.asarray(out.loss_fn_outputs[0]["logprobs"].tolist())


def _step(training: tinker.TrainingClient, shift: int) -> None:
    training.forward_backward([_datum(shift)], "cross_entropy").result()
    training.optim_step(ADAM).result()


def _pending_request(url: str, model_id: str) -> str:
    """A forward_backward held at the seq gate (its seq_id is far ahead): pending for sure."""
    body = {
        "model_id": model_id,
        "seq_id": 10_000,
        "forward_backward_input": {
            "data": [_json_datum()],
            "loss_fn": "cross_entropy",
        },
    }
    answer = httpx.post(f"{url}/api/v1/forward_backward", json=body,
                        headers={"X-API-Key": API_KEY})  # fmt: skip
    assert answer.status_code == 200, answer.text
    return str(answer.json()["request_id"])


def _big_batch() -> list[types.Datum]:
    tokens = [(7 * i) % 200 + 3 for i in range(500)]
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )
    return [datum] * 256


def _json_datum() -> dict[str, object]:
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": TOKENS[:-1]}]},
        "loss_fn_inputs": {"target_tokens": {"data": TOKENS[1:], "dtype": "int64"}},
    }


@pytest.mark.timeout(900)
def test_three_sigkills_lose_only_unsaved_steps(
    tmp_path: Path, bases_dir: Path, tiny_base: ResidentBase
) -> None:
    os.environ["TINKER_TELEMETRY"] = "0"
    home = tmp_path / "home"
    home.mkdir()
    (home / "bases").symlink_to(bases_dir, target_is_directory=True)  # the built test base
    committed: dict[str, set[str]] = {}  # run -> checkpoint ids saved and acknowledged
    last_state = ""
    after_unsaved_step: np.ndarray | None = None
    pending_ids: list[str] = []
    inflight: object = None
    port = _free_port()  # the same address every time, as clients know only that
    url = f"http://127.0.0.1:{port}"
    for round_index in range(ROUNDS + 1):
        server = _start(home, port)
        try:
            service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
            rest = service.create_rest_client()
            if round_index:
                _check_after_restart(url, rest, committed, pending_ids, inflight)
                training = service.create_training_client_from_state_with_optimizer(
                    last_state
                ).result()
                # The unsaved step of the killed round, replayed from the saved state, lands
                # exactly where it did before the kill.
                _step(training, shift=round_index - 1)
                np.testing.assert_allclose(_logprobs(training), after_unsaved_step, atol=1e-5)
            else:
                training = service.create_lora_training_client(TINY, rank=2).result()
            if round_index == ROUNDS:
                break
            run = training.model_id
            for step in range(2):
                _step(training, shift=10 + step)
                name = f"r{round_index}-s{step}"
                last_state = training.save_state(name).result().path
                training.save_weights_for_sampler(name).result()
                committed.setdefault(run, set()).update({f"weights/{name}",
                                                         f"sampler_weights/{name}"})  # fmt: skip
            _step(training, shift=round_index)  # the unsaved step
            after_unsaved_step = _logprobs(training)
            pending_ids = [_pending_request(url, run)]
            # A batch big enough to keep the worker busy for seconds: in flight at the kill.
            inflight = training.forward_backward(_big_batch(), "cross_entropy")
            time.sleep(0.5)
        finally:
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=30)


def _check_after_restart(
    url: str,
    rest: object,
    committed: dict[str, set[str]],
    pending_ids: list[str],
    inflight: object,
) -> None:
    # 1. Every committed checkpoint (training states and revisions) is listed and usable.
    for run, expected in committed.items():
        listed = rest.list_checkpoints(run).result().checkpoints  # type: ignore[attr-defined]
        assert {c.checkpoint_id for c in listed} == expected
        for checkpoint in listed:
            info = httpx.post(f"{url}/api/v1/weights_info", json={"tinker_path":
                              checkpoint.tinker_path}, headers={"X-API-Key": API_KEY})  # fmt: skip
            assert info.status_code == 200, info.text
    # 2. Requests of the earlier boot answer a clear failure.
    for request_id in pending_ids:
        answer = httpx.post(f"{url}/api/v1/retrieve_future", json={"request_id": request_id},
                            headers={"X-API-Key": API_KEY})  # fmt: skip
        assert answer.status_code == 410
        assert answer.json()["code"] == "request_lost"
    # 3. The SDK future that was in flight raises; it neither hangs nor succeeds.
    started = time.monotonic()
    with pytest.raises(Exception) as raised:  # noqa: B017 - whatever the SDK raises
        inflight.result(timeout=120)  # type: ignore[attr-defined]
    assert not isinstance(raised.value, FutureTimeout | TimeoutError)
    # The SDK reads the 410 as "this promise is gone" (measured: 6-27 s after the restart).
    assert "Promise expired/broken" in str(raised.value)
    assert time.monotonic() - started < 120


def test_sigterm_stops_the_server_within_its_grace_while_streams_decode(
    tmp_path: Path, bases_dir: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "bases").symlink_to(bases_dir, target_is_directory=True)
    port = _free_port()
    server = _start(home, port, MINT_SHUTDOWN_GRACE_S="1")
    body = {"model": TINY, "prompt": "abc", "max_tokens": 500, "n": 64, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    ended: list[bool] = []  # per stream: whether it reached [DONE]

    def stream() -> None:
        try:
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body,
                              headers=headers, timeout=60) as response:  # fmt: skip
                ended.append(any(line == "data: [DONE]" for line in response.iter_lines()))
        except httpx.HTTPError:
            ended.append(False)

    # Four streams of 64 rows x 500 tokens: far more work than the grace allows.
    clients = [threading.Thread(target=stream) for _ in range(4)]
    try:
        for client in clients:
            client.start()
        time.sleep(1.0)
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        stopped_in = time.monotonic() - started
    finally:
        if server.poll() is None:
            server.kill()
        for client in clients:
            client.join(timeout=60)
    assert stopped_in < 8, f"the server took {stopped_in:.1f} s to stop"
    assert len(ended) == 4 and not all(ended)  # streams were cut, not waited for

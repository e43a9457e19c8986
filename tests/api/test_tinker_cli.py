"""The `tinker` CLI, unmodified, against a live mint server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import UTC, datetime

import pytest
import tinker
from tests.api.conftest import API_KEY, TINY, LiveServer
from tinker import types


def _cli(server: LiveServer, *args: str) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("tinker")
    if executable is None:
        pytest.skip("the tinker console script is not on PATH")
    env = dict(os.environ, TINKER_BASE_URL=server.url, TINKER_API_KEY=API_KEY, TINKER_TELEMETRY="0")
    return subprocess.run(
        [executable, "--format", "json", *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
        check=False,
    )


def test_cli_lists_inspects_expires_and_deletes(live_server: LiveServer) -> None:
    client = tinker.ServiceClient(base_url=live_server.url, api_key=API_KEY)
    training = client.create_lora_training_client(base_model=TINY, rank=2).result()
    training.forward_backward(
        [
            types.Datum(
                model_input=types.ModelInput.from_ints([1, 2, 3]),
                loss_fn_inputs={"target_tokens": [2, 3, 4]},
            )
        ],
        "cross_entropy",
    ).result()
    state = training.save_state("cli-state").result().path
    sampler = training.save_weights_for_sampler("cli-rev").result().path
    run = training.model_id

    models = _cli(live_server, "model", "list")
    assert models.returncode == 0, models.stderr
    assert TINY in models.stdout

    runs = _cli(live_server, "run", "list", "--limit", "0")
    assert runs.returncode == 0, runs.stderr
    assert run in runs.stdout
    info = _cli(live_server, "run", "info", run)
    assert info.returncode == 0 and run in info.stdout

    listed = _cli(live_server, "checkpoint", "list", "--run-id", run)
    assert listed.returncode == 0, listed.stderr
    assert state in listed.stdout and sampler in listed.stdout
    assert _cli(live_server, "checkpoint", "list").returncode == 0

    shown = _cli(live_server, "checkpoint", "info", state)
    assert shown.returncode == 0, shown.stderr
    assert "cli-state" in shown.stdout

    ttl = _cli(live_server, "checkpoint", "set-ttl", state, "--ttl", "7200")
    assert ttl.returncode == 0, ttl.stdout + ttl.stderr
    records, _ = live_server.service.catalog.list_checkpoints("alpha", run)
    expires = {r.name: r.expires_at for r in records}["cli-state"]
    assert expires is not None
    remaining = (expires - datetime.now(UTC)).total_seconds()
    assert 7100 < remaining <= 7200

    deleted = _cli(live_server, "checkpoint", "delete", state, "--yes")
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    after = _cli(live_server, "checkpoint", "list", "--run-id", run)
    assert state not in after.stdout and sampler in after.stdout
    json.loads(after.stdout)  # the JSON format stays machine-readable

"""The conformance probe under tinker 0.22.7 (JSON era), in its own virtual environment.

The probe runs in `.venv-tinker022` (made by `scripts/setup-tinker022.sh`, or named by
`MINT_TINKER022_PYTHON`), imports only that SDK and talks HTTP to the live server; with the
server's default `client/config` this SDK sends forward_backward and forward as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from tests.api.conftest import API_KEY, TINY, LiveServer

ROOT = Path(__file__).resolve().parents[2]
PYTHON = Path(os.environ.get("MINT_TINKER022_PYTHON", ROOT / ".venv-tinker022/bin/python"))

# Unsupported in this lane, each for a stated reason (see docs/compat-tinker-0.22.md).
EXPECTED_UNSUPPORTED = {
    "RestClient.publish_checkpoint_from_tinker_path",
    "RestClient.publish_checkpoint_from_tinker_path_async",
    "RestClient.unpublish_checkpoint_from_tinker_path",
    "RestClient.unpublish_checkpoint_from_tinker_path_async",
    "SamplingClient.get_tokenizer",
    "TrainingClient.forward_backward_custom",
    "TrainingClient.forward_backward_custom_async",
}


@pytest.mark.skipif(not PYTHON.exists(), reason="no tinker 0.22 venv: scripts/setup-tinker022.sh")
def test_probe_under_tinker_0_22(live_server: LiveServer, tmp_path: Path) -> None:
    outcomes_file = tmp_path / "outcomes.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TINKER_TELEMETRY="0", PYTHONPATH="")
    finished = subprocess.run(
        [str(PYTHON), str(ROOT / "tools/tinker_probe.py"), "--base-url", live_server.url,
         "--api-key", API_KEY, "--base-model", TINY, "--json", str(outcomes_file)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "tinker 0.22.7:" in finished.stdout
    outcomes = json.loads(outcomes_file.read_text())
    unsupported = {o["method"]: o["reason"] for o in outcomes if not o["supported"]}
    assert set(unsupported) == EXPECTED_UNSUPPORTED, unsupported
    assert (
        "visible only to its own tenant"
        in unsupported["RestClient.publish_checkpoint_from_tinker_path"]
    )
    assert len(outcomes) == 82
    assert len(outcomes) - len(unsupported) >= 0.9 * len(outcomes)

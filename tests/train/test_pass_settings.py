"""The training pass size is configuration: read from the environment, checked, and what
the worker's trainer cuts jobs by."""

from __future__ import annotations

import pytest

from mint.config import Settings
from mint.control.worker import BaseWorker
from mint.models.base import ResidentBase


def test_pass_tokens_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINT_TRAIN_PASS_TOKENS", raising=False)
    assert Settings().train_pass_tokens == 512
    monkeypatch.setenv("MINT_TRAIN_PASS_TOKENS", "4096")
    assert Settings().train_pass_tokens == 4096


def test_a_pass_size_below_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINT_TRAIN_PASS_TOKENS", "0")
    with pytest.raises(ValueError, match="MINT_TRAIN_PASS_TOKENS is 0; it must be at least 1"):
        Settings()


def test_the_worker_trainer_uses_the_configured_pass_size(tiny_base: ResidentBase) -> None:
    worker = BaseWorker(tiny_base, train_pass_tokens=96)
    try:
        assert worker.trainer.pass_token_budget == 96
    finally:
        worker.stop()

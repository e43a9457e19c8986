"""Shared fixtures: a tiny seeded base, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mint.models.base import ResidentBase, load_base

torch.set_num_threads(2)
# Tests never reach a model hub: anything that tries fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def bases_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bases")


@pytest.fixture(scope="session")
def tiny_base(bases_dir: Path) -> ResidentBase:
    """The Llama-style test base (2 layers, hidden 64, byte tokenizer), fp32 on CPU."""
    return load_base("tiny-llama", bases_dir, device="cpu", dtype="float32")

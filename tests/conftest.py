"""Shared fixtures: a tiny seeded base, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mint.models.base import ResidentBase, load_base

#: Every test runs with this many torch threads; float32 sums are ordered by the thread
#: count, so results compared to 1e-5 must not depend on which test ran before.
TEST_THREADS = 2
torch.set_num_threads(TEST_THREADS)
# Tests never reach a model hub: anything that tries fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _same_torch_threads() -> None:
    """Undo a thread count set by code under test (the bench commands set their own)."""
    torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def bases_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bases")


@pytest.fixture(scope="session")
def tiny_base(bases_dir: Path) -> ResidentBase:
    """The Llama-style test base (2 layers, hidden 64, byte tokenizer), fp32 on CPU."""
    return load_base("tiny-llama", bases_dir, device="cpu", dtype="float32")

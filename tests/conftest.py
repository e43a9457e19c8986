"""Shared fixtures: a tiny seeded base, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mint.models.base import ResidentBase, load_base

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def bases_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bases")


@pytest.fixture(scope="session")
def tiny_base(bases_dir: Path) -> ResidentBase:
    """The Llama-style test base (2 layers, hidden 64, byte tokenizer), fp32 on CPU."""
    return load_base("tiny-llama", bases_dir, device="cpu", dtype="float32")

"""Fixtures for trainer tests."""

from __future__ import annotations

import pytest
from train_helpers import warmed_trainer

from mint.models.base import ResidentBase
from mint.train import Trainer


@pytest.fixture
def warm(tiny_base: ResidentBase) -> Trainer:
    """A trainer with policy "p" after one optimizer step (A and B non-zero)."""
    return warmed_trainer(tiny_base)

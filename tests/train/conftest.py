"""Fixtures for trainer tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from train_helpers import warmed_trainer

from mint.models.base import ResidentBase
from mint.train import Trainer


@pytest.fixture
def warm(tiny_base: ResidentBase) -> Trainer:
    """A trainer with policy "p" after one optimizer step (A and B non-zero)."""
    return warmed_trainer(tiny_base)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The tiny base's tensors are too small for threads; on a busy machine a second thread
    only adds wake-up waits (an optim_step measured 1 ms on one thread, 180 ms on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

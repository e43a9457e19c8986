"""Catalog fixtures: a fresh SQLite file and blob folder per test, one tenant, one base."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mint.catalog import Catalog
from mint.models.lora import AdapterTensors, LoraSignature

BASE_ID = "mint-test/tiny-llama"
FINGERPRINT = "ab" * 32
SIGNATURE = LoraSignature(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"))
MODULES = {  # module path -> (in_features, out_features)
    "model.layers.0.self_attn.q_proj": (8, 8),
    "model.layers.0.self_attn.v_proj": (8, 4),
}


def make_tensors(seed: int, signature: LoraSignature = SIGNATURE) -> AdapterTensors:
    """Small seeded adapter tensors shaped like `MODULES` at the signature's rank."""
    generator = torch.Generator().manual_seed(seed)
    return {
        path: (
            torch.randn(signature.rank, fan_in, generator=generator),
            torch.randn(fan_out, signature.rank, generator=generator),
        )
        for path, (fan_in, fan_out) in MODULES.items()
    }


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    store = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}", tmp_path / "blobs")
    store.ensure_tenant("acme")
    store.ensure_tenant("globex")
    store.record_base(BASE_ID, FINGERPRINT)
    store.create_policy("acme", "pol", BASE_ID, FINGERPRINT, SIGNATURE, {"team": "rl"})
    yield store
    store.close()

"""Fixtures for the engine tests: the tiny base in two precisions, random adapters that
matter, and full-forward references.

Engine correctness is checked twice. In float64 the arithmetic noise is far below 1e-5, so
the 1e-5 bound tests the batching logic itself (padding, positions, cache, row binding). In
float32 the tiny base's logits reach about 100 (tied embeddings drawn from N(0, 1)), where one
float32 step is about 8e-6; different kernel shapes (a batch versus a lone row, a cached step
versus a full pass) measurably move logprobs by up to about 3e-5, so float32 gets 1e-4.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from mint.catalog.records import RevisionRecord
from mint.catalog.store import Catalog
from mint.models.base import ResidentBase, load_base
from mint.models.lora import (
    ATTENTION_TARGETS,
    MLP_TARGETS,
    AdapterTensors,
    BoundAdapter,
    LoraSignature,
    bound,
    init_adapter,
)
from mint.serve import AdapterRef, Engine

TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4}

#: (tokens, adapter) -> logits [len(tokens), vocab] of one plain full forward pass.
ForwardLogits = Callable[[list[int], AdapterRef | None], torch.Tensor]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run engine tests on one intra-op thread, restoring the setting afterwards.

    On the shared 2-core test machine, while another process holds a core, two threads made
    each tiny-tensor op (index_add, log_softmax) wait about 30 ms at its thread barrier, which
    turned a 4 s suite into 5 minutes. The tiny base gains nothing from a second thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_base_f64(bases_dir: Path) -> ResidentBase:
    """A separate copy of the tiny base, converted to float64 (the shared one stays float32)."""
    base = load_base("tiny-llama", bases_dir, device="cpu", dtype="float32")
    base.model.to(torch.float64)
    return dataclasses.replace(base, dtype=torch.float64)


@pytest.fixture(scope="module", params=["float64", "float32"])
def base(
    request: pytest.FixtureRequest, tiny_base: ResidentBase, tiny_base_f64: ResidentBase
) -> ResidentBase:
    return tiny_base_f64 if request.param == "float64" else tiny_base


@pytest.fixture(scope="module")
def atol(base: ResidentBase) -> float:
    return TOLERANCE[base.dtype]


def random_adapter(base: ResidentBase, key: str, seed: int, signature: LoraSignature) -> AdapterRef:
    """An adapter with Kaiming A and random normal B, so its delta changes the samples."""
    tensors = init_adapter(base.layers, signature, seed=seed, device=base.device, dtype=base.dtype)
    generator = torch.Generator().manual_seed(seed + 1000)
    for _, b in tensors.values():
        b.copy_(torch.randn(b.shape, generator=generator))
    return AdapterRef(key=key, tensors=tensors, scale=signature.scale)


@pytest.fixture(scope="module")
def adapters(base: ResidentBase) -> list[AdapterRef]:
    attention_only = LoraSignature(rank=8, alpha=8, target_modules=ATTENTION_TARGETS)
    return [
        random_adapter(base, "rev-a", 1, LoraSignature(rank=4, alpha=8)),
        random_adapter(base, "rev-b", 2, LoraSignature(rank=2, alpha=4)),
        random_adapter(base, "rev-c", 3, attention_only),
    ]


@pytest.fixture(scope="module")
def engine(base: ResidentBase) -> Engine:
    return Engine(base)


@pytest.fixture(scope="module")
def forward_logits(base: ResidentBase) -> ForwardLogits:
    def run(tokens: list[int], adapter: AdapterRef | None) -> torch.Tensor:
        bindings = [] if adapter is None else [BoundAdapter(adapter.tensors, adapter.scale)]
        ids = torch.tensor([tokens], device=base.device)
        with torch.inference_mode(), bound(base.binding, bindings):
            return base.model(input_ids=ids).logits[0].double()

    return run


class Revisions:
    """Exports seeded random revisions of tiny-base policies into a real catalog."""

    def __init__(self, catalog: Catalog, base: ResidentBase) -> None:
        self.catalog = catalog
        self.base = base
        self._policies: set[str] = set()

    def export(
        self, policy: str, seed: int, rank: int = 4, targets: tuple[str, ...] | None = None
    ) -> RevisionRecord:
        signature = LoraSignature(rank, 2.0 * rank, targets or ATTENTION_TARGETS + MLP_TARGETS)
        if policy not in self._policies:
            self.catalog.create_policy(
                "acme", policy, self.base.base_id, self.base.fingerprint, signature
            )
            self._policies.add(policy)
        tensors = random_adapter(self.base, policy, seed, signature).tensors
        return self.catalog.export_revision("acme", policy, None, tensors, step=seed)

    def export_tensors(self, policy: str, tensors: AdapterTensors, rank: int) -> RevisionRecord:
        signature = LoraSignature(rank, 2.0 * rank)
        self.catalog.create_policy(
            "acme", policy, self.base.base_id, self.base.fingerprint, signature
        )
        return self.catalog.export_revision("acme", policy, None, tensors, step=0)


@pytest.fixture
def revisions(tmp_path: Path, tiny_base: ResidentBase) -> Iterator[Revisions]:
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}", tmp_path / "blobs")
    catalog.ensure_tenant("acme")
    catalog.record_base(tiny_base.base_id, tiny_base.fingerprint)
    yield Revisions(catalog, tiny_base)
    catalog.close()

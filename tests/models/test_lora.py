from __future__ import annotations

import pytest
import torch

from mint.errors import UserError
from mint.models.base import ResidentBase
from mint.models.lora import BoundAdapter, LoraSignature, bound, init_adapter


def test_fresh_adapter_changes_nothing(tiny_base: ResidentBase) -> None:
    signature = LoraSignature(rank=4, alpha=8)
    tensors = init_adapter(tiny_base.layers, signature, seed=0)
    assert len(tensors) == 2 * 7  # two layers, seven linear layers each
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = tiny_base.model(ids).logits
    with bound(tiny_base.binding, [BoundAdapter(tensors, signature.scale)]):
        adapted = tiny_base.model(ids).logits
    assert torch.equal(plain, adapted)


def test_row_groups_apply_only_to_their_rows(tiny_base: ResidentBase) -> None:
    signature = LoraSignature(rank=2, alpha=4)
    tensors = init_adapter(tiny_base.layers, signature, seed=1)
    generator = torch.Generator().manual_seed(0)
    for _, b in tensors.values():
        b.copy_(torch.randn(b.shape, generator=generator))
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = tiny_base.model(ids).logits
    with bound(tiny_base.binding, [BoundAdapter(tensors, signature.scale)]):
        alone = tiny_base.model(ids).logits
    rows = torch.tensor([1])
    with bound(tiny_base.binding, [BoundAdapter(tensors, signature.scale, rows)]):
        mixed = tiny_base.model(torch.cat([ids, ids])).logits
    assert not torch.allclose(plain, alone)
    torch.testing.assert_close(mixed[0], plain[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], alone[0], rtol=0, atol=1e-5)
    assert tiny_base.binding.adapters == []


def test_signature_bounds_are_user_errors() -> None:
    with pytest.raises(UserError, match="rank 0 is out of range"):
        LoraSignature(rank=0, alpha=1)

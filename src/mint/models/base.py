"""A resident base: weights loaded once, frozen, patched for LoRA, shared by trainer and engine."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mint.models.lora import AdapterBinding, LoraLinear, LoraSignature, module_shapes
from mint.models.provision import ensure_base, read_base_record

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


@dataclass
class ResidentBase:
    """One loaded base. Only its worker thread runs forward passes on it."""

    base_id: str
    fingerprint: str
    folder: Path
    model: nn.Module
    tokenizer: object
    binding: AdapterBinding
    layers: dict[str, LoraLinear]
    device: torch.device
    dtype: torch.dtype
    max_context_length: int

    @property
    def eos_token_ids(self) -> list[int]:
        ids: Any = self.model.config.eos_token_id  # type: ignore[union-attr]
        if ids is None:
            return []
        return list(ids) if isinstance(ids, (list, tuple)) else [int(ids)]

    @property
    def vocab_size(self) -> int:
        size: Any = self.model.config.vocab_size  # type: ignore[union-attr]
        return int(size)

    def shapes(
        self, signature: LoraSignature
    ) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
        return module_shapes(self.layers, signature)


def load_base(
    name: str, bases_dir: Path, device: str = "cpu", dtype: str = "float32"
) -> ResidentBase:
    """Provision (if needed) and load base `name` onto `device`, frozen and LoRA-patched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mint.models.lora import patch_linear_layers
    from mint.models.registry import find_base

    spec = find_base(name)
    folder = ensure_base(name, bases_dir)
    record = read_base_record(folder)
    started = time.monotonic()
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype))
    model.to(device)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    binding = AdapterBinding()
    layers = patch_linear_layers(model, binding)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    log.info(
        "base %s resident on %s/%s in %.1fs (%d adaptable layers)",
        spec.public_id,
        device,
        dtype,
        time.monotonic() - started,
        len(layers),
    )
    return ResidentBase(
        base_id=spec.public_id,
        fingerprint=record["fingerprint"],
        folder=folder,
        model=model,
        tokenizer=tokenizer,
        binding=binding,
        layers=layers,
        device=torch.device(device),
        dtype=torch_dtype(dtype),
        max_context_length=spec.max_context_length,
    )

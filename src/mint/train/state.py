"""A policy's training state, how it moves between device and host, and its saved form.

Training state is the LoRA A/B tensors (float32 master copies), the Adam moments of each and
the step counter. Accumulated gradients travel with the state between device and host but are
never saved. The saved form is one safetensors file:

    lora.<module path>.A / .B                    the adapter weights
    adam.<module path>.A.exp_avg / .exp_avg_sq   the Adam moments (same for .B)

with string metadata: format, format_version, rank, alpha, target_modules (JSON), step,
base_id and base_fingerprint.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from mint.errors import InvalidAdapter
from mint.models.lora import AdapterTensors, LoraSignature

log = logging.getLogger(__name__)

FORMAT = "mint.training_state"
FORMAT_VERSION = "1"
MOMENTS = ("exp_avg", "exp_avg_sq")
HOST = torch.device("cpu")


def weight_names(paths: Iterable[str]) -> list[str]:
    """Stable tensor names `<path>.A`, `<path>.B` in sorted module order."""
    return [f"{path}.{part}" for path in sorted(paths) for part in ("A", "B")]


@dataclass
class PolicyState:
    """One policy's training state; every tensor sits on `device` (the base's or host)."""

    signature: LoraSignature
    #: `<path>.A` / `<path>.B` -> float32 leaf tensor that accumulates `.grad`.
    weights: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: int
    device: torch.device

    @classmethod
    def fresh(cls, signature: LoraSignature, tensors: AdapterTensors, step: int = 0) -> PolicyState:
        weights: dict[str, torch.Tensor] = {}
        for path in sorted(tensors):
            a, b = tensors[path]
            weights[f"{path}.A"] = a.detach().float().clone().requires_grad_(True)
            weights[f"{path}.B"] = b.detach().float().clone().requires_grad_(True)
        device = next(iter(weights.values())).device
        return cls(signature, weights, zero_moments(weights), zero_moments(weights), step, device)

    def adapter(self, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module path -> (A, B) in the base's dtype; the cast stays inside autograd."""
        return {
            name[:-2]: (self.weights[name].to(dtype), self.weights[name[:-2] + ".B"].to(dtype))
            for name in self.weights
            if name.endswith(".A")
        }

    def grads(self) -> list[torch.Tensor]:
        """Accumulated gradients in `weights` order; zeros where nothing accumulated yet."""
        return [torch.zeros_like(w) if w.grad is None else w.grad for w in self.weights.values()]

    def nbytes(self) -> int:
        """Bytes of every tensor the state holds: weights, pending gradients, moments."""
        tensors = [*self.weights.values(), *self.exp_avg.values(), *self.exp_avg_sq.values()]
        tensors += [w.grad for w in self.weights.values() if w.grad is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def zero_grad(self) -> None:
        for weight in self.weights.values():
            weight.grad = None

    def move_to(self, device: torch.device) -> None:
        """Copy every tensor (weights, gradients, moments) to `device`; bits are unchanged.

        Known shortcoming: the copies are blocking and host memory is pageable; pinned host
        buffers with non-blocking copies on a side stream would overlap a swap with compute.
        """
        moved: dict[str, torch.Tensor] = {}
        for name, weight in self.weights.items():
            copy = weight.detach().to(device, copy=True).requires_grad_(True)
            if weight.grad is not None:
                copy.grad = weight.grad.to(device, copy=True)
            moved[name] = copy
        self.weights = moved
        self.exp_avg = {n: t.to(device, copy=True) for n, t in self.exp_avg.items()}
        self.exp_avg_sq = {n: t.to(device, copy=True) for n, t in self.exp_avg_sq.items()}
        self.device = device


def zero_moments(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(weight.detach()) for name, weight in weights.items()}


def encode(state: PolicyState, base_id: str, base_fingerprint: str) -> bytes:
    """The safetensors bytes of `state`; the same state always gives the same bytes."""
    tensors: dict[str, torch.Tensor] = {}
    for name, weight in state.weights.items():
        tensors[f"lora.{name}"] = weight.detach().to(HOST).contiguous()
        for moment, table in zip(MOMENTS, (state.exp_avg, state.exp_avg_sq), strict=True):
            tensors[f"adam.{name}.{moment}"] = table[name].to(HOST).contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rank": str(state.signature.rank),
        "alpha": repr(float(state.signature.alpha)),
        "target_modules": json.dumps(list(state.signature.target_modules)),
        "step": str(state.step),
        "base_id": base_id,
        "base_fingerprint": base_fingerprint,
    }
    return canonical_header(save(tensors, metadata=metadata))


def canonical_header(payload: bytes) -> bytes:
    """Rewrite a safetensors header with its metadata keys sorted.

    safetensors keeps metadata in a Rust HashMap, so `save` writes the keys in a random order
    on every call (measured with safetensors 0.8); sorting them makes equal states give equal
    bytes. Tensor entries keep their order, so the data section is reused as is.
    """
    (length,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8 : 8 + length])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__", {}).items()))}
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":")).encode()
    # The format pads the header with spaces so the data section starts 8-byte aligned.
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + payload[8 + length :]


@dataclass
class SavedState:
    """A decoded training-state payload, not yet checked against any base."""

    metadata: dict[str, str]
    signature: LoraSignature
    step: int
    tensors: dict[str, torch.Tensor]


def decode(payload: bytes) -> SavedState:
    """Parse training-state bytes; every unreadable part is listed in one `InvalidAdapter`."""
    try:
        tensors = load(payload)
        (length,) = struct.unpack("<Q", payload[:8])
        metadata = json.loads(payload[8 : 8 + length]).get("__metadata__") or {}
    except (SafetensorError, ValueError, struct.error) as error:
        raise InvalidAdapter(
            [f"payload is not a safetensors file ({error}); pass bytes from save_state"],
            subject="training state",
        ) from None
    problems = []
    if metadata.get("format") != FORMAT:
        problems.append(f"format is {metadata.get('format')!r}, expected {FORMAT!r}")
    if metadata.get("format_version") != FORMAT_VERSION:
        problems.append(
            f"format_version is {metadata.get('format_version')!r}; this trainer reads "
            f"version {FORMAT_VERSION}"
        )
    try:
        signature = LoraSignature(
            rank=int(metadata["rank"]),
            alpha=float(metadata["alpha"]),
            target_modules=tuple(json.loads(metadata["target_modules"])),
        )
        step = int(metadata["step"])
    except (KeyError, ValueError, TypeError) as error:
        problems.append(f"metadata rank/alpha/target_modules/step unreadable ({error})")
    if problems:
        raise InvalidAdapter(problems, subject="training state")
    return SavedState(metadata, signature, step, tensors)


def tensor_problems(
    saved: SavedState,
    shapes: Mapping[str, tuple[tuple[int, int], tuple[int, int]]],
    with_optimizer: bool,
) -> list[str]:
    """Every way the saved tensors differ from what `shapes` (the base's) expects."""
    expected: dict[str, tuple[int, int]] = {}
    for path, (a_shape, b_shape) in shapes.items():
        for part, shape in (("A", a_shape), ("B", b_shape)):
            expected[f"lora.{path}.{part}"] = shape
            if with_optimizer:
                for moment in MOMENTS:
                    expected[f"adam.{path}.{part}.{moment}"] = shape
    present = {n for n in saved.tensors if with_optimizer or not n.startswith("adam.")}
    problems = [f"tensor {name!r} is missing" for name in sorted(set(expected) - present)]
    problems += [f"tensor {name!r} is unexpected" for name in sorted(present - set(expected))]
    for name in sorted(set(expected) & present):
        tensor = saved.tensors[name]
        if tuple(tensor.shape) != expected[name] or tensor.dtype != torch.float32:
            problems.append(
                f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"expected torch.float32 {expected[name]}"
            )
    return problems


def restore(saved: SavedState, with_optimizer: bool) -> PolicyState:
    """Training state on host from a checked payload; moments are zero without the optimizer."""
    paths = sorted({name[len("lora.") : -2] for name in saved.tensors if name.startswith("lora.")})
    weights = {
        name: saved.tensors[f"lora.{name}"].clone().requires_grad_(True)
        for name in weight_names(paths)
    }
    if with_optimizer:
        exp_avg = {n: saved.tensors[f"adam.{n}.exp_avg"].clone() for n in weights}
        exp_avg_sq = {n: saved.tensors[f"adam.{n}.exp_avg_sq"].clone() for n in weights}
    else:
        exp_avg, exp_avg_sq = zero_moments(weights), zero_moments(weights)
    return PolicyState(saved.signature, weights, exp_avg, exp_avg_sq, saved.step, HOST)

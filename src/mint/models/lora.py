"""The LoRA mechanism shared by the trainer and the engine.

The resident base is patched once: every targeted `nn.Linear` becomes a `LoraLinear` that
keeps the frozen base layer and asks the base's `AdapterBinding` which adapters apply to the
current forward pass. Nothing is ever merged into the base weights, so one copy of the base
serves any number of policies: the trainer binds one policy's tensors (with gradients), the
engine binds several revisions at once, one per group of batch rows.

Tensor layout follows PEFT: `A` is `[rank, in_features]`, `B` is `[out_features, rank]`, and
the delta is `scale * x @ A.T @ B.T` with `scale = alpha / rank`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from mint.errors import UserError

#: Linear layers adapted per architecture family, split so Tinker's `train_attn` and
#: `train_mlp` switches map onto them. The unembedding is not adapted (see `targets_for`).
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
MAX_RANK = 128


@dataclass(frozen=True)
class LoraSignature:
    """A policy's fixed LoRA shape: rank, alpha and the short names of adapted modules."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...] = ATTENTION_TARGETS + MLP_TARGETS

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= MAX_RANK:
            raise UserError(
                f"LoRA rank {self.rank} is out of range; use a rank from 1 to {MAX_RANK}"
            )
        if self.alpha <= 0:
            raise UserError(f"LoRA alpha must be positive, got {self.alpha}")
        if not self.target_modules:
            raise UserError("a LoRA signature needs at least one target module")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def targets_for(train_attn: bool = True, train_mlp: bool = True) -> tuple[str, ...]:
    """Target modules for Tinker's lora_config switches.

    Known shortcoming: `train_unembed` is accepted but the unembedding (tied to the input
    embedding on SmolLM2) is never adapted, so exports stay loadable by PEFT and vLLM as
    plain linear-layer adapters.
    """
    targets = (ATTENTION_TARGETS if train_attn else ()) + (MLP_TARGETS if train_mlp else ())
    if not targets:
        raise UserError("lora_config disables both attention and MLP; enable at least one")
    return targets


#: An adapter's tensors: module path (e.g. `model.layers.0.self_attn.q_proj`) -> (A, B).
AdapterTensors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class BoundAdapter:
    """One adapter applied to some rows of the batch (all rows when `rows` is None).

    `rows` is an index tensor, or a `slice` of consecutive rows: when every bound adapter
    has a slice and the slices tile the batch in order (the trainer's segments), each
    adapter reads its rows as a view and no rows are gathered or scattered.
    """

    tensors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float
    rows: torch.Tensor | slice | None = None


@dataclass
class AdapterBinding:
    """Which adapters the next forward passes of a base apply. Owned by the base's worker."""

    adapters: list[BoundAdapter] = field(default_factory=list)

    def apply(self, path: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if isinstance(self.adapters[0].rows, slice):
            return self._apply_segments(path, x, y)
        for bound in self.adapters:
            pair = bound.tensors.get(path)
            if pair is None:
                continue
            a, b = pair
            rows = bound.rows
            if rows is None:
                y = y + bound.scale * ((x @ a.t()) @ b.t())
            elif isinstance(rows, slice):
                raise ValueError("row-slice adapters cannot be bound with index-row adapters")
            else:
                delta = bound.scale * ((x.index_select(0, rows) @ a.t()) @ b.t())
                y = y.index_add(0, rows, delta.to(y.dtype))
        return y

    def _apply_segments(self, path: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adapters bound to consecutive row slices that tile the batch in order.

        The rows are cut with one `split` and the deltas joined with one `cat`: indexing each
        slice separately would make backward zero-fill and add a full-size gradient per
        slice and module (measured as a sixth of a 4-policy pass on the CPU).
        """
        sizes = []
        start = 0
        for bound in self.adapters:
            rows = bound.rows
            if not isinstance(rows, slice) or rows.start != start or rows.step not in (None, 1):
                raise ValueError(
                    "row-slice adapters must tile the batch in order; got "
                    f"{[adapter.rows for adapter in self.adapters]}"
                )
            sizes.append(rows.stop - start)
            start = rows.stop
        if start != y.shape[0]:
            raise ValueError(f"row slices cover {start} of {y.shape[0]} rows")
        if all(bound.tensors.get(path) is None for bound in self.adapters):
            return y
        deltas = []
        for bound, rows_x in zip(self.adapters, x.split(sizes), strict=True):
            pair = bound.tensors.get(path)
            if pair is None:
                deltas.append(y.new_zeros((len(rows_x), *y.shape[1:])))
                continue
            a, b = pair
            deltas.append(bound.scale * ((rows_x @ a.t()) @ b.t()))
        return y + torch.cat(deltas).to(y.dtype)


class LoraLinear(nn.Module):
    """A frozen base linear layer plus whatever adapters the binding holds for `path`."""

    def __init__(self, base: nn.Linear, path: str, binding: AdapterBinding) -> None:
        super().__init__()
        self.base = base
        self.path = path
        # Stored outside the module tree so the binding is not treated as a submodule.
        self.__dict__["binding"] = binding

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        binding: AdapterBinding = self.__dict__["binding"]
        if not binding.adapters:
            return y
        return binding.apply(self.path, x, y)


def patch_linear_layers(model: nn.Module, binding: AdapterBinding) -> dict[str, LoraLinear]:
    """Wrap every adaptable linear layer of `model`; return them by module path."""
    adaptable = set(ATTENTION_TARGETS + MLP_TARGETS)
    wrapped: dict[str, LoraLinear] = {}
    for path, module in list(model.named_modules()):
        short = path.rsplit(".", 1)[-1]
        if short not in adaptable or not isinstance(module, nn.Linear):
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = LoraLinear(module, path, binding)
        setattr(parent, attr, layer)
        wrapped[path] = layer
    return wrapped


def module_shapes(
    layers: Mapping[str, LoraLinear], signature: LoraSignature
) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """Expected (A shape, B shape) for every module the signature adapts."""
    shapes = {}
    for path, layer in layers.items():
        if path.rsplit(".", 1)[-1] in signature.target_modules:
            shapes[path] = (
                (signature.rank, layer.in_features),
                (layer.out_features, signature.rank),
            )
    return shapes


def init_adapter(
    layers: Mapping[str, LoraLinear],
    signature: LoraSignature,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AdapterTensors:
    """Fresh adapter tensors: A Kaiming-uniform (as PEFT does), B zero, so the delta is 0."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tensors: AdapterTensors = {}
    for path, (a_shape, b_shape) in sorted(module_shapes(layers, signature).items()):
        bound = 1.0 / math.sqrt(a_shape[1])  # kaiming_uniform_ with a=sqrt(5)
        a = (torch.rand(a_shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        b = torch.zeros(b_shape, dtype=torch.float32)
        tensors[path] = (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
    return tensors


@contextmanager
def bound(binding: AdapterBinding, adapters: list[BoundAdapter]) -> Iterator[None]:
    """Apply `adapters` for the duration of the block, restoring the previous binding."""
    previous = binding.adapters
    binding.adapters = adapters
    try:
        yield
    finally:
        binding.adapters = previous

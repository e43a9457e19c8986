"""The LoRA mechanism shared by the trainer and the engine.

The resident base is patched once: every targeted `nn.Linear` becomes a `LoraLinear` that
keeps the frozen base layer and asks the base's `AdapterBinding` which adapters apply to the
current forward pass. Nothing is ever merged into the base weights, so one copy of the base
serves any number of policies: the trainer binds one policy's tensors (with gradients), the
engine binds several revisions at once, one per group of batch rows.

The engine's slot bank keeps its adapters in `SlotStack`s instead: one stack per rank class
holds every slot's tensors side by side, and a `SlotRows` plan serves all rows of a forward
pass from the stacks with one segmented matmul per stack and module, however many distinct
adapters the rows use.

Tensor layout follows PEFT: `A` is `[rank, in_features]`, `B` is `[out_features, rank]`, and
the delta is `scale * x @ A.T @ B.T` with `scale = alpha / rank`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
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
    #: The engine's rows served from slot stacks (see `SlotRows`); None outside sampling.
    slot_rows: SlotRows | None = None

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
        if binding.slot_rows is not None:
            y = binding.slot_rows.apply(self.path, x, y)
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
def bound(
    binding: AdapterBinding, adapters: list[BoundAdapter], slot_rows: SlotRows | None = None
) -> Iterator[None]:
    """Apply `adapters` (and `slot_rows`) for the duration of the block, restoring the
    previous binding."""
    previous = binding.adapters, binding.slot_rows
    binding.adapters, binding.slot_rows = adapters, slot_rows
    try:
        yield
    finally:
        binding.adapters, binding.slot_rows = previous


# ------------------------------------------------------------------ serving from slot stacks

#: Stack offsets are kept at multiples of this many elements, so every view starts on a
#: 16-byte boundary, as grouped matmul kernels require.
_ALIGN = 16


def rank_class(rank: int, max_rank: int) -> int:
    """The stack a revision of `rank` is placed in: the next power of two, at most
    `max_rank`. A rank-8 revision then computes at rank 8, not at the bank's largest rank."""
    return min(1 << (rank - 1).bit_length(), max_rank)


def _aligned(count: int) -> int:
    return -(-count // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class FlatLayout:
    """Where each module's A (`[rank, in]`) and B (`[out, rank]`) lie in one flat buffer.

    `modules` holds (path, A start, B start, in_features, out_features) in path order, the
    starts counted in elements; `size` is the buffer's length in elements. A slot of a
    `SlotStack` and a host-cached revision each describe their buffer this way, so a
    revision whose layout equals its stack's is placed with one copy of its whole buffer.
    """

    rank: int
    modules: tuple[tuple[str, int, int, int, int], ...]
    size: int

    @classmethod
    def packed(cls, shapes: Mapping[str, tuple[int, int]], rank: int) -> FlatLayout:
        """The layout mint exports in (safetensors orders tensors by key: each module's A,
        then its B, modules in path order), each tensor's start rounded up to a multiple of
        `_ALIGN` elements. When every tensor's size is a multiple of `_ALIGN` already, as
        it is for the usual model widths, nothing is padded and a full-rank revision of
        every module lies in its file exactly as in a slot."""
        modules, cursor = [], 0
        for path in sorted(shapes):
            in_features, out_features = shapes[path]
            a_at = cursor
            b_at = a_at + _aligned(rank * in_features)
            cursor = b_at + _aligned(out_features * rank)
            modules.append((path, a_at, b_at, in_features, out_features))
        return cls(rank, tuple(modules), cursor)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(module[0] for module in self.modules)

    def views(self, flat: torch.Tensor) -> AdapterTensors:
        """Every module's (A, B) as views into `flat`, a 1-D buffer of `size` elements."""
        rank = self.rank
        return {
            path: (
                flat[a_at : a_at + rank * in_features].view(rank, in_features),
                flat[b_at : b_at + out_features * rank].view(out_features, rank),
            )
            for path, a_at, b_at, in_features, out_features in self.modules
        }


class SlotStack:
    """Every slot's adapter of one rank class, side by side in one device buffer.

    `flat[slot]` holds one slot contiguously, as `layout` says: each module's A
    (`[rank, in]`) then its B (`[out, rank]`), modules in path order, the order a mint
    export's safetensors data lies in. `a[path]` (`[slots, rank, in]`) and `b[path]`
    (`[slots, out, rank]`) are views across slots, so a forward pass reads the rows'
    adapters where they lie, without gathering them. A revision of a smaller rank fills the
    first rows of A and columns of B and leaves the rest zero; a module it does not adapt
    stays zero too, so it adds exactly nothing.

    B keeps the host cache's `[out, rank]` layout so that placing a revision is a plain copy.
    Stored transposed, the B half of a one-row-per-slot decode step ran about 5x faster on
    CPU, but the transposing copy made a placement about 3.5x a plain copy of its bytes.
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        num_slots: int,
        rank: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.rank = rank
        self.layout = FlatLayout.packed(shapes, rank)
        self.paths = self.layout.paths
        self.flat = torch.zeros(num_slots, self.layout.size, device=device, dtype=dtype)
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        for path, a_at, b_at, in_features, out_features in self.layout.modules:
            a = self.flat[:, a_at : a_at + rank * in_features]
            b = self.flat[:, b_at : b_at + out_features * rank]
            self.a[path] = a.view(num_slots, rank, in_features)
            self.b[path] = b.view(num_slots, out_features, rank)
        #: Per slot, the views a full-rank revision adapting every module fills, in path
        #: order; built once so a placement costs no per-tensor Python work.
        self._whole: dict[int, list[torch.Tensor]] = {}
        #: Modules whose views meet grouped matmul's layout rule (every stride a multiple of
        #: 16 bytes); the rest are served one slot at a time when rows share slots.
        size = self.flat.element_size()
        self.segmentable = {
            path: all(n * size % 16 == 0 for n in (rank, *shapes[path])) for path in self.paths
        }

    def write_flat(self, slot: int, data: torch.Tensor) -> None:
        """Copy a revision laid out as `layout` (a 1-D buffer of `layout.size` elements) into
        `slot` in one copy. The caller owns the slot: no forward pass may read it meanwhile."""
        if data.shape != (self.layout.size,):
            raise ValueError(
                f"a slot of this stack holds {self.layout.size} elements; got a buffer of "
                f"shape {tuple(data.shape)}"
            )
        self.flat[slot].copy_(data, non_blocking=True)

    def write(
        self, slot: int, rank: int, tensors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Copy a revision's (A, B) pairs into `slot`. The caller owns the slot: no forward
        pass may read it meanwhile."""
        if rank == self.rank and len(tensors) == len(self.paths):
            targets = self._whole.get(slot)
            if targets is None:
                targets = [t for p in self.paths for t in (self.a[p][slot], self.b[p][slot])]
                self._whole[slot] = targets
            sources = [t for p in self.paths for t in tensors[p]]
        else:
            self.flat[slot].zero_()  # whatever the slot's previous revision left behind
            targets, sources = [], []
            for path, (a, b) in tensors.items():
                targets += [self.a[path][slot, :rank], self.b[path][slot, :, :rank]]
                sources += [a, b]
        _copy_all(targets, sources)


def _copy_all(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """`target.copy_(source)` for every pair, in one call where torch can."""
    try:
        torch._foreach_copy_(targets, sources, non_blocking=True)
    except RuntimeError:  # a torch build whose foreach copy refuses these devices
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source, non_blocking=True)


@dataclass(frozen=True)
class SlotPlacement:
    """Where a placed revision lives: its stack, its slot, and the modules it adapts."""

    stack: SlotStack
    slot: int
    modules: frozenset[str]


@functools.cache
def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `F.grouped_mm` takes this device and dtype with the stacks' layout (it has
    no float64 kernel, for one); without it, rows are served one slot at a time."""
    flat = torch.zeros(2, 64, device=device, dtype=dtype)
    weights = flat[:, :32].view(2, 4, 8)
    rows = torch.ones(3, 8, device=device, dtype=dtype)
    offsets = torch.tensor([1, 3], dtype=torch.int32, device=device)
    try:
        F.grouped_mm(rows, weights.transpose(1, 2), offs=offsets)
    except (RuntimeError, NotImplementedError, ValueError, TypeError):
        return False
    return True


@dataclass
class _Run:
    """Consecutive token rows (`first`, `count`, in flattened rows) served by one slot."""

    slot: int
    first: int
    count: int
    scale: float


@dataclass
class _StackRows:
    """Batch rows `start:stop` of one forward pass, all served from one stack."""

    stack: SlotStack
    start: int
    stop: int
    runs: list[_Run]
    modules: frozenset[str]
    #: Segmented-kernel inputs: cumulative token-row ends per slot of the stack, and each
    #: token row's scale as a column.
    offsets: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    #: Slot-major inputs, when each used slot serves one row: the used slots (None when
    #: they are the whole stack, in order) and each stack slot's scale.
    used: torch.Tensor | None = None
    slot_scales: torch.Tensor | None = None

    def delta(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """`scale * x @ A.T @ B.T` for module `path` and every token row of `x`
        ([tokens, in]), each row with its own slot's A, B and scale."""
        a, b = self.stack.a[path], self.stack.b[path]
        if len(self.runs) == 1:
            run = self.runs[0]
            return ((x @ a[run.slot].t()) * run.scale) @ b[run.slot].t()
        if self.slot_scales is not None:
            return self._slot_major(x, a, b, self.slot_scales)
        if self.offsets is not None and self.scales is not None and self.stack.segmentable[path]:
            hidden = F.grouped_mm(x, a.transpose(1, 2), offs=self.offsets)
            return F.grouped_mm(hidden * self.scales, b.transpose(1, 2), offs=self.offsets)
        out = x.new_empty(x.shape[0], b.shape[1])
        for run in self.runs:
            part = x[run.first : run.first + run.count]
            hidden = (part @ a[run.slot].t()) * run.scale
            out[run.first : run.first + run.count] = hidden @ b[run.slot].t()
        return out

    def _slot_major(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slot_scales: torch.Tensor
    ) -> torch.Tensor:
        """One batched matmul over the whole stack, batch index = slot, reading every
        slot's weights where they lie; slots no row uses get zero inputs."""
        slots, tokens = a.shape[0], self.runs[0].count
        inputs = x.view(len(self.runs), tokens, x.shape[-1])
        if self.used is not None:
            padded = inputs.new_zeros(slots, tokens, x.shape[-1])
            inputs = padded.index_copy_(0, self.used, inputs)
        hidden = torch.bmm(inputs, a.transpose(1, 2)) * slot_scales
        out = torch.bmm(hidden, b.transpose(1, 2))
        if self.used is not None:
            out = out.index_select(0, self.used)
        return out.view(x.shape[0], -1)


class SlotRows:
    """Which rows of one forward pass each slot serves, built once per pass.

    `rows[i]` is the (placement, scale) of batch row i, or None for a row served otherwise
    (the plain base, or an adapter bound through `AdapterBinding.adapters`). The rows of
    one stack must be contiguous and in slot order, which the engine keeps its batch in:
    then every stack costs two segmented matmuls per module however many slots its rows
    use, and reads each slot's weights in place.
    """

    def __init__(
        self,
        rows: Sequence[tuple[SlotPlacement, float] | None],
        tokens_per_row: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.groups: list[_StackRows] = []
        for index, row in enumerate(rows):
            if row is None:
                continue
            placement, scale = row
            group = self.groups[-1] if self.groups else None
            if group is None or group.stack is not placement.stack or group.stop != index:
                if any(g.stack is placement.stack for g in self.groups):
                    raise ValueError("the rows of one slot stack must be contiguous")
                group = _StackRows(placement.stack, index, index, [], frozenset())
                self.groups.append(group)
            first = (index - group.start) * tokens_per_row
            last = group.runs[-1] if group.runs else None
            if last is not None and last.slot == placement.slot:
                last.count += tokens_per_row
            elif last is not None and last.slot > placement.slot:
                raise ValueError("the rows of one slot stack must be in slot order")
            else:
                group.runs.append(_Run(placement.slot, first, tokens_per_row, scale))
            group.stop = index + 1
            group.modules = group.modules | placement.modules
        kernel = _grouped_mm_runs(device, dtype)
        for group in self.groups:
            if len(group.runs) < 2:
                continue
            slots = group.stack.flat.shape[0]
            one_each = all(run.count == tokens_per_row for run in group.runs)
            # Padding to the whole stack wastes at most half the work when half the slots
            # are in use; past that, or with several rows per slot, segments are cheaper.
            if one_each and 2 * len(group.runs) >= slots:
                self._prepare_slot_major(group, device, dtype)
            elif kernel:
                self._prepare_kernel(group, device, dtype)

    @staticmethod
    def _prepare_slot_major(group: _StackRows, device: torch.device, dtype: torch.dtype) -> None:
        slots = group.stack.flat.shape[0]
        scales = [0.0] * slots
        for run in group.runs:
            scales[run.slot] = run.scale
        group.slot_scales = torch.tensor(scales, dtype=dtype, device=device).view(-1, 1, 1)
        used = [run.slot for run in group.runs]
        if used != list(range(slots)):
            group.used = torch.tensor(used, dtype=torch.long, device=device)

    @staticmethod
    def _prepare_kernel(group: _StackRows, device: torch.device, dtype: torch.dtype) -> None:
        ends = [0] * group.stack.flat.shape[0]
        for run in group.runs:
            ends[run.slot] = run.count
        for slot in range(1, len(ends)):
            ends[slot] += ends[slot - 1]
        group.offsets = torch.tensor(ends, dtype=torch.int32, device=device)
        scales = [run.scale for run in group.runs for _ in range(run.count)]
        group.scales = torch.tensor(scales, dtype=dtype, device=device).unsqueeze(-1)

    def apply(self, path: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Add every served row's delta for module `path` to `y` (in place) and return it."""
        for group in self.groups:
            if path not in group.modules:
                continue
            rows = x[group.start : group.stop]
            flat = rows.reshape(-1, rows.shape[-1])
            delta = group.delta(path, flat)
            y[group.start : group.stop] += delta.view(*rows.shape[:-1], -1).to(y.dtype)
        return y

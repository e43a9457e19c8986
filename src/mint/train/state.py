"""A policy's training state, how it moves between device and host, and its saved form.

Training state is the LoRA A/B tensors (float32 master copies), the Adam moments of each and
the step counter. In memory each kind (weights, each moment, a pending gradient) is one flat
buffer, so moving a policy between device and host is a few large copies into pooled buffers.
Accumulated gradients travel with the state but are never saved. The saved form is one
safetensors file:

    lora.<module path>.A / .B                    the adapter weights
    adam.<module path>.A.exp_avg / .exp_avg_sq   the Adam moments (same for .B)

with string metadata: format, format_version, rank, alpha, target_modules (JSON), step,
base_id and base_fingerprint.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class Layout:
    """Where each named tensor lives inside a policy's flat buffers (sorted name order)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Name -> view into `flat` (inside autograd when `flat` requires grad)."""
        pieces = flat.split(self.sizes)
        return {
            name: piece.view(shape)
            for name, shape, piece in zip(self.names, self.shapes, pieces, strict=True)
        }


class BufferPool:
    """Spare flat buffers by (size, device), so a swap copies into memory that exists.

    Allocating a fresh 40 MB buffer costs more than copying into it (first-touch page
    faults on the host, cudaHostAlloc for pinned memory), so the buffers a swap frees are
    kept for the next swap. At most `spares` buffers per key are kept.
    """

    def __init__(self, spares: int = 4) -> None:
        self.spares = spares
        self._free: dict[tuple[int, torch.device], list[torch.Tensor]] = {}
        # Copies still reading or writing a pooled buffer, by its data pointer.
        self._busy: dict[int, Any] = {}

    def take(self, numel: int, device: torch.device, pin: bool) -> torch.Tensor:
        free = self._free.get((numel, device))
        if free:
            buffer = free.pop()
            pending = self._busy.pop(buffer.data_ptr(), None)
            if pending is not None:
                pending.synchronize()
            return buffer
        return torch.empty(numel, dtype=torch.float32, device=device, pin_memory=pin)

    def give(self, buffer: torch.Tensor, pending: Any = None) -> None:
        """Keep `buffer` for reuse; `pending` (a CUDA event) marks a copy still using it."""
        free = self._free.setdefault((buffer.numel(), buffer.device), [])
        if len(free) >= self.spares:
            return
        free.append(buffer)
        if pending is not None:
            self._busy[buffer.data_ptr()] = pending

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for free in self._free.values() for b in free)


class Mover:
    """Copies flat buffers between the base's device and host memory.

    On CUDA the host side is pinned and copies run non-blocking on a side stream: the compute
    stream waits for a swap-in only where it first reads the state, and a swap-out overlaps
    whatever the compute stream does next. On the CPU the copies are plain memcpys.
    """

    def __init__(self, device: torch.device, pool: BufferPool) -> None:
        self.device = device
        self.pool = pool
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def copy(self, source: torch.Tensor, target_device: torch.device) -> tuple[torch.Tensor, Any]:
        """A copy of `source` on `target_device` and the event that marks it done (or None).

        `source` goes back to the pool once the copy no longer reads it.
        """
        pin = self.cuda and target_device.type == "cpu"
        target = self.pool.take(source.numel(), target_device, pin)
        if self.stream is None:
            target.copy_(source)
            self.pool.give(source)
            return target, None
        # The side stream starts after everything queued so far on the compute stream.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            target.copy_(source, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        for tensor in (source, target):
            if tensor.is_cuda:
                tensor.record_stream(self.stream)
        self.pool.give(source, done)
        return target, done


@dataclass
class PolicyState:
    """One policy's training state in flat float32 buffers on `device` (the base's or host).

    `flat["weights"]` is the autograd leaf: a pass reads named views of it (`adapter`), so
    gradients accumulate into one flat `.grad`. The moments are flat buffers of the same
    layout. A swap is one copy per buffer, whatever the number of adapted modules.
    """

    signature: LoraSignature
    layout: Layout
    flat: dict[str, torch.Tensor]
    step: int
    device: torch.device
    #: Set while a non-blocking copy into this state's buffers may still be running.
    arriving: Any = None

    @classmethod
    def fresh(cls, signature: LoraSignature, tensors: AdapterTensors, step: int = 0) -> PolicyState:
        named: dict[str, torch.Tensor] = {}
        for path in sorted(tensors):
            a, b = tensors[path]
            named[f"{path}.A"], named[f"{path}.B"] = a, b
        return cls.from_named(signature, named, None, step)

    @classmethod
    def from_named(
        cls,
        signature: LoraSignature,
        weights: Mapping[str, torch.Tensor],
        moments: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]] | None,
        step: int,
    ) -> PolicyState:
        """Flat host state from named tensors; zero moments when `moments` is None."""
        names = tuple(sorted(weights, key=_weight_order))
        layout = Layout(names, tuple(tuple(weights[name].shape) for name in names))

        def flatten(table: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return torch.cat([table[name].detach().float().reshape(-1) for name in names])

        flat = {"weights": flatten(weights).to(HOST).requires_grad_(True)}
        for kind, table in zip(MOMENTS, moments or (None, None), strict=True):
            flat[kind] = torch.zeros(layout.numel) if table is None else flatten(table).to(HOST)
        return cls(signature, layout, flat, step, HOST)

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """Name -> detached view of the float32 weights."""
        self.wait()
        return self.layout.views(self.flat["weights"].detach())

    @property
    def exp_avg(self) -> dict[str, torch.Tensor]:
        self.wait()
        return self.layout.views(self.flat["exp_avg"])

    @property
    def exp_avg_sq(self) -> dict[str, torch.Tensor]:
        self.wait()
        return self.layout.views(self.flat["exp_avg_sq"])

    def adapter(self, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module path -> (A, B) in the base's dtype; the cast and views stay in autograd."""
        self.wait()
        views = self.layout.views(self.flat["weights"].to(dtype))
        return {
            name[:-2]: (views[name], views[name[:-2] + ".B"])
            for name in self.layout.names
            if name.endswith(".A")
        }

    def flat_grad(self) -> torch.Tensor:
        """The accumulated gradient of all weights, flat; zeros where nothing accumulated."""
        self.wait()
        grad = self.flat["weights"].grad
        return torch.zeros_like(self.flat["weights"]) if grad is None else grad

    def grads(self) -> list[torch.Tensor]:
        """Accumulated gradients in `layout.names` order; zeros where nothing accumulated."""
        return list(self.layout.views(self.flat_grad()).values())

    def nbytes(self) -> int:
        """Bytes of every buffer the state holds: weights, moments, a pending gradient."""
        buffers = [*self.flat.values()]
        if self.flat["weights"].grad is not None:
            buffers.append(self.flat["weights"].grad)
        return sum(buffer.numel() * buffer.element_size() for buffer in buffers)

    def zero_grad(self, pool: BufferPool | None = None) -> None:
        weights = self.flat["weights"]
        if pool is not None and weights.grad is not None:
            pool.give(weights.grad)
        weights.grad = None

    def wait(self) -> None:
        """Block until a non-blocking copy into this state has landed (CUDA only)."""
        if self.arriving is None:
            return
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).wait_event(self.arriving)
        else:
            self.arriving.synchronize()
        self.arriving = None

    def move_to(self, device: torch.device, mover: Mover | None = None) -> None:
        """Copy every buffer (weights, gradient, moments) to `device`; bits are unchanged.

        With a `mover` the old buffers go back to its pool and, on CUDA, the copies run
        non-blocking (`wait` joins them); without one the copies are plain and blocking.
        Pooled buffers are reused by other policies, so a view of this state taken before a
        move must not be read after it (the trainer takes views only within one job).
        """
        self.wait()
        weights = self.flat["weights"]
        sources = {kind: buffer.detach() for kind, buffer in self.flat.items()}
        if weights.grad is not None:
            sources["grad"] = weights.grad
        moved: dict[str, torch.Tensor] = {}
        done = None
        for kind, source in sources.items():
            if mover is None:
                moved[kind] = source.to(device, copy=True)
            else:
                moved[kind], done = mover.copy(source, device)
        grad = moved.pop("grad", None)
        self.flat = moved
        self.flat["weights"].requires_grad_(True)
        self.flat["weights"].grad = grad
        self.device = device
        self.arriving = done


def _weight_order(name: str) -> tuple[str, str]:
    path, _, part = name.rpartition(".")
    return path, part


def encode(state: PolicyState, base_id: str, base_fingerprint: str) -> bytes:
    """The safetensors bytes of `state`; the same state always gives the same bytes."""
    tensors: dict[str, torch.Tensor] = {}
    tables = (state.exp_avg, state.exp_avg_sq)
    for name, weight in state.weights.items():
        tensors[f"lora.{name}"] = weight.to(HOST).contiguous()
        for moment, table in zip(MOMENTS, tables, strict=True):
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
    names = weight_names(paths)
    weights = {name: saved.tensors[f"lora.{name}"] for name in names}
    moments = None
    if with_optimizer:
        moments = (
            {n: saved.tensors[f"adam.{n}.exp_avg"] for n in names},
            {n: saved.tensors[f"adam.{n}.exp_avg_sq"] for n in names},
        )
    return PolicyState.from_named(saved.signature, weights, moments, saved.step)

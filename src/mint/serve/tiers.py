"""The engine's two inner adapter tiers: the host cache and the slot bank.

A revision travels catalog -> host cache -> slot. It is *admitted* to the host cache once:
its files are checked against its sha256 (hashed while they are read, in one pass), decoded
without copying (tensors are views into the bytes read), and validated against the resident
base (fingerprint, rank, targets, shapes); every problem is reported in one `InvalidAdapter`.
A host-cached revision is *placed* in a slot by copying its tensors into that slot's position
of a preallocated device stack (one per rank class); a batch reads the slot where it lies,
which is why a slot in use by a running batch must never be overwritten (reference counts
guard it).

State is plain data: the host cache is an ordered map (least recently used first) with a
byte budget, the slot table a list indexed by slot with None for a free slot.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mint.catalog.peft_io import CONFIG_FILE, WEIGHTS_FILE, split_tensors
from mint.catalog.records import RevisionRecord
from mint.catalog.validate import base_mismatch
from mint.errors import InvalidAdapter, MintError, UserError
from mint.models.base import ResidentBase
from mint.models.lora import AdapterTensors, SlotPlacement, SlotStack, rank_class
from mint.serve.types import AdapterRef

log = logging.getLogger(__name__)

#: Bytes read per call when a revision's files are read and hashed in one pass; small
#: enough that sha256 reads each chunk from the CPU cache the read just filled.
READ_CHUNK = 1 << 20
#: safetensors dtype names (the format's header spelling) mint can serve LoRA tensors in.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def revision_label(revision: RevisionRecord) -> str:
    return f"{revision.policy_id}@{revision.number}"


@dataclass(frozen=True)
class RevisionFiles:
    """A revision's two PEFT files as read, with the sha256 of exactly these bytes.

    Build it with `read` (one pass: each chunk is hashed as it arrives) or `of` (hashes
    bytes already in memory), never by hand, so `sha256` always describes `weights` and
    `config`.
    """

    weights: bytearray
    config: bytes
    sha256: str

    @classmethod
    def of(cls, weights: bytes | bytearray, config: bytes) -> RevisionFiles:
        digest = hashlib.sha256(weights)
        digest.update(config)
        return cls(bytearray(weights), bytes(config), digest.hexdigest())

    @classmethod
    def read(cls, folder: Path) -> RevisionFiles:
        """Read and hash the files in `folder`; raises FileNotFoundError for a missing one."""
        digest = hashlib.sha256()
        with open(folder / WEIGHTS_FILE, "rb", buffering=0) as file:
            weights = bytearray(_file_size(file))
            view = memoryview(weights)
            done = 0
            while done < len(weights):
                got = file.readinto(view[done : done + READ_CHUNK])
                if not got:  # the file shrank while it was read: keep what is there
                    break
                # hashlib drops the GIL for large updates, so decoding threads keep running.
                digest.update(view[done : done + got])
                done += got
            view.release()
        del weights[done:]
        config = (folder / CONFIG_FILE).read_bytes()
        digest.update(config)
        return cls(weights, config, digest.hexdigest())


def _file_size(file: Any) -> int:
    return os.fstat(file.fileno()).st_size


@dataclass(frozen=True)
class HostEntry:
    """One admitted revision in host memory, already in the base's dtype."""

    sha256: str
    label: str
    rank: int
    scale: float
    tensors: AdapterTensors
    nbytes: int


# ------------------------------------------------------------------------------ admission


def _config_problems(config_bytes: bytes, revision: RevisionRecord) -> list[str]:
    try:
        config = json.loads(config_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return [f"{CONFIG_FILE} is not JSON ({error}); re-export the revision"]
    if not isinstance(config, dict):
        return [f"{CONFIG_FILE} is not a JSON object; re-export the revision"]
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; only 'LORA' is served")
    if config.get("r") != revision.rank:
        problems.append(
            f"{CONFIG_FILE} says r={config.get('r')!r} but the revision record says rank "
            f"{revision.rank}; the two must agree"
        )
    targets = config.get("target_modules")
    if not isinstance(targets, list) or sorted(targets) != sorted(revision.target_modules):
        problems.append(
            f"{CONFIG_FILE} targets {targets!r} but the revision record targets "
            f"{sorted(revision.target_modules)}; the two must agree"
        )
    return problems


def _record_problems(
    base: ResidentBase, revision: RevisionRecord, max_rank: int, files: RevisionFiles
) -> list[str]:
    problems = []
    if files.sha256 != revision.sha256:
        problems.append(
            f"the files do not match the revision's sha256 {revision.sha256[:12]}...; the "
            "stored copy is damaged or truncated; re-export the revision"
        )
    problems += base_mismatch(
        base,
        revision.base_id,
        revision.base_fingerprint,
        owner=f"revision {revision_label(revision)}",
        remedy="sample it on an engine of its own base, or retrain it on this one",
    )
    if revision.rank > max_rank:
        problems.append(
            f"rank {revision.rank} is above the slot bank's max rank {max_rank}; export at "
            f"rank <= {max_rank} or start the engine with max_slot_rank >= {revision.rank}"
        )
    return problems + _config_problems(files.config, revision)


def _module_problems(
    base: ResidentBase, revision: RevisionRecord, tensors: AdapterTensors
) -> list[str]:
    problems = []
    for path, (a, b) in sorted(tensors.items()):
        layer = base.layers.get(path)
        if layer is None:
            problems.append(f"module {path} is not an adaptable layer of {base.base_id}")
            continue
        if path.rsplit(".", 1)[-1] not in revision.target_modules:
            problems.append(
                f"module {path} is not among the revision's targets "
                f"{sorted(revision.target_modules)}"
            )
        want_a = (revision.rank, layer.in_features)
        want_b = (layer.out_features, revision.rank)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(
                f"module {path} has A {tuple(a.shape)} and B {tuple(b.shape)}; the base "
                f"needs A {list(want_a)} and B {list(want_b)}"
            )
    if not tensors:
        problems.append("it holds no module tensors")
    return problems


def _header(data: bytearray) -> tuple[dict[str, Any], int]:
    """The safetensors header of `data` and the offset its tensor bytes start at.

    Raises ValueError naming what is wrong with the framing."""
    if len(data) < 8:
        raise ValueError(f"it is {len(data)} bytes, shorter than the 8-byte header length")
    size = int.from_bytes(data[:8], "little")
    if 8 + size > len(data):
        raise ValueError(f"its {size}-byte header runs past the end of the {len(data)} bytes")
    try:
        header = json.loads(bytes(data[8 : 8 + size]))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + size


def _tensor_span(key: str, info: Any) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, begin, end) of one header entry; ValueError when it is malformed."""
    if not isinstance(info, dict):
        raise ValueError(f"entry {key!r} is not an object")
    dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if dtype is None:
        raise ValueError(
            f"tensor {key!r} has dtype {info.get('dtype')!r}; LoRA tensors must be one of "
            f"{sorted(SAFETENSORS_DTYPES)}"
        )
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f"tensor {key!r} has shape {shape!r}, not a list of sizes")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and o >= 0 for o in offsets)
    ):
        raise ValueError(f"tensor {key!r} has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(
            f"tensor {key!r} spans {end - begin} bytes but shape {shape} of {info['dtype']} "
            f"needs {math.prod(shape) * dtype.itemsize}"
        )
    return dtype, shape, begin, end


def view_safetensors(data: bytearray) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file as views into `data` (no copy), checked from the header.

    The checks are the format's own: a header that fits, known dtypes, byte spans that match
    each shape and tile the data exactly (no gap, no overlap, nothing past the end). Raises
    ValueError naming the first violation.
    """
    header, start = _header(data)
    spans = sorted(
        ((*_tensor_span(key, info), key) for key, info in header.items()),
        key=lambda span: (span[2], span[3], span[4]),
    )
    expected = 0
    for _, _, begin, end, key in spans:
        if begin != expected:
            raise ValueError(f"tensor {key!r} starts at byte {begin}, expected {expected}")
        expected = end
    if start + expected != len(data):
        raise ValueError(
            f"the tensors cover {expected} bytes but {len(data) - start} follow the header; "
            "the file is truncated or has trailing bytes"
        )
    tensors: dict[str, torch.Tensor] = {}
    whole: dict[torch.dtype, torch.Tensor] = {}  # the buffer read as each dtype, once
    for dtype, shape, begin, _, key in spans:
        offset, size = start + begin, dtype.itemsize
        if math.prod(shape) == 0:
            tensors[key] = torch.empty(shape, dtype=dtype)
        elif offset % size:  # the format does not promise alignment: copy this one
            raw = data[offset : offset + math.prod(shape) * size]
            tensors[key] = torch.frombuffer(raw, dtype=dtype).view(shape)
        else:
            if dtype not in whole:
                whole[dtype] = torch.frombuffer(data, dtype=dtype, count=len(data) // size)
            strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
            tensors[key] = whole[dtype].as_strided(shape, strides, offset // size)
    return tensors


def _host_tensor(tensor: torch.Tensor, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """`tensor` in `dtype`, copied only when the dtype differs or pinned memory is wanted."""
    if not pin:
        return tensor if tensor.dtype == dtype else tensor.to(dtype)
    # Pinned host memory makes the slot copy asynchronous; convert straight into it.
    pinned = torch.empty(tensor.shape, dtype=dtype, pin_memory=True)
    return pinned.copy_(tensor)


def decode_revision(
    base: ResidentBase, revision: RevisionRecord, files: RevisionFiles, max_rank: int
) -> HostEntry:
    """Decode and validate a revision's two PEFT files against `base`, once.

    The tensors stay views into `files.weights` when they already have the base's dtype (on
    a CPU engine), so admission copies nothing. Raises one `InvalidAdapter` listing every
    problem found.
    """
    problems = _record_problems(base, revision, max_rank, files)
    tensors: AdapterTensors = {}
    try:
        flat = view_safetensors(files.weights)
        tensors = split_tensors(flat, revision.rank, Path(revision.blob_path))
    except ValueError as error:
        problems.append(f"{WEIGHTS_FILE} is unreadable ({error}); re-export the revision")
    except InvalidAdapter as error:
        problems.extend(error.problems)
    else:
        problems.extend(_module_problems(base, revision, tensors))
    if problems:
        raise InvalidAdapter(problems, subject=f"revision {revision_label(revision)}")
    pin = base.device.type == "cuda"
    host: AdapterTensors = {
        path: (_host_tensor(a, base.dtype, pin), _host_tensor(b, base.dtype, pin))
        for path, (a, b) in tensors.items()
    }
    return HostEntry(
        sha256=revision.sha256,
        label=revision_label(revision),
        rank=revision.rank,
        scale=revision.alpha / revision.rank,
        tensors=host,
        nbytes=sum(a.nbytes + b.nbytes for a, b in host.values()),
    )


# ----------------------------------------------------------------------------- host cache


class HostCache:
    """Admitted revisions in host memory, keyed by sha256, least recently used first.

    Thread-safe: the cold loader admits, the API thread and the loader look entries up.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 1:
            raise UserError(
                f"host cache budget is {budget_bytes} bytes; it must be at least 1; "
                "give the host cache a positive byte budget"
            )
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, HostEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, sha256: str) -> HostEntry | None:
        """The entry for `sha256` (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(sha256)
            if entry is not None:
                self._entries.move_to_end(sha256)
            return entry

    def admit(self, entry: HostEntry) -> list[str]:
        """Keep `entry`, evicting least recently used entries to fit; return evicted sha256s."""
        if entry.nbytes > self.budget_bytes:
            raise InvalidAdapter(
                [
                    f"it needs {entry.nbytes} bytes of host memory but the host cache budget "
                    f"is {self.budget_bytes} bytes; raise host_cache_bytes above "
                    f"{entry.nbytes}"
                ],
                subject=f"revision {entry.label}",
            )
        evicted: list[str] = []
        with self._lock:
            old = self._entries.pop(entry.sha256, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._entries and self._bytes + entry.nbytes > self.budget_bytes:
                sha, gone = self._entries.popitem(last=False)
                self._bytes -= gone.nbytes
                evicted.append(sha)
            self._entries[entry.sha256] = entry
            self._bytes += entry.nbytes
        for sha in evicted:
            log.debug("host cache evicted revision=%s", sha[:12])
        log.debug("host cache admitted revision=%s bytes=%d", entry.label, entry.nbytes)
        return evicted

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def table(self) -> list[tuple[str, int]]:
        """(sha256, bytes) of every entry, least recently used first."""
        with self._lock:
            return [(sha, entry.nbytes) for sha, entry in self._entries.items()]


# ------------------------------------------------------------------------------- slot bank


class SlotState(enum.Enum):
    #: Reserved for a revision whose tensors are being copied in; not usable yet.
    PLACING = "placing"
    #: Holds the revision's tensors; batches may use it.
    READY = "ready"


@dataclass
class Slot:
    """What one slot holds. `refs` counts the sample jobs that use it."""

    sha256: str
    label: str
    state: SlotState
    rank: int = 0
    scale: float = 1.0
    refs: int = 0
    pinned: bool = False
    last_used: int = 0


class SlotBank:
    """A fixed number of device-resident LoRA positions over one base.

    Slots are grouped by rank class (`rank_class`: powers of two up to `max_rank`): each
    class has one `SlotStack`, allocated on its first placement, with a position for every
    slot, and a slot's revision lives in the stack of its class. So a batch's rank-8 rows
    compute at rank 8 beside rank-32 rows, and a placement is one batched copy into the
    stack. Eviction takes the least recently used slot that no job references and that is
    not pinned.

    Known shortcoming: every class allocated holds a position for every slot, so a bank
    whose revisions span all classes up to `max_rank` uses up to twice the memory of one
    padded to `max_rank`; stacks sized per class would lift it.
    """

    def __init__(self, base: ResidentBase, num_slots: int, max_rank: int) -> None:
        if num_slots < 1 or max_rank < 1:
            raise UserError(
                f"a slot bank of {num_slots} slots at max rank {max_rank} cannot hold an "
                "adapter; use at least 1 slot and a max rank of at least 1"
            )
        self.base = base
        self.max_rank = max_rank
        self.table: list[Slot | None] = [None] * num_slots
        self._stacks: dict[int, SlotStack] = {}
        self._placements: list[SlotPlacement | None] = [None] * num_slots
        self._clock = 0
        self._cond = threading.Condition()

    @property
    def num_slots(self) -> int:
        return len(self.table)

    def snapshot(self) -> list[tuple[str, str, int, bool] | None]:
        """The slot table as plain tuples: (label, state, refs, pinned) or None when free."""
        with self._cond:
            return [
                None if s is None else (s.label, s.state.value, s.refs, s.pinned)
                for s in self.table
            ]

    def residents(self) -> list[str]:
        """sha256 of every revision in a slot, in slot order."""
        with self._cond:
            return [slot.sha256 for slot in self.table if slot is not None]

    def find(self, sha256: str) -> int | None:
        with self._cond:
            return self._find_locked(sha256)

    def _find_locked(self, sha256: str) -> int | None:
        for index, slot in enumerate(self.table):
            if slot is not None and slot.sha256 == sha256:
                return index
        return None

    def _tick_locked(self) -> int:
        self._clock += 1
        return self._clock

    def acquire(self, sha256: str) -> int | None:
        """Take a reference on the READY slot holding `sha256`; None when it is in no slot."""
        with self._cond:
            index = self._find_locked(sha256)
            if index is None:
                return None
            slot = self.table[index]
            assert slot is not None
            if slot.state is not SlotState.READY:
                return None
            slot.refs += 1
            slot.last_used = self._tick_locked()
            return index

    def release(self, index: int) -> None:
        with self._cond:
            slot = self.table[index]
            if slot is None or slot.refs < 1:
                raise MintError(
                    f"slot {index} released without a reference (it holds {slot}); every "
                    "release must follow one acquire"
                )
            slot.refs -= 1
            self._cond.notify_all()

    def _victim_locked(self) -> int | None:
        free = [i for i, slot in enumerate(self.table) if slot is None]
        if free:
            return free[0]
        idle = [
            (slot.last_used, i)
            for i, slot in enumerate(self.table)
            if slot is not None
            and slot.refs == 0
            and not slot.pinned
            and slot.state is SlotState.READY
        ]
        return min(idle)[1] if idle else None

    def reserve(self, sha256: str, label: str, timeout_s: float | None = None) -> int | None:
        """Reserve a slot for `sha256` (free, else least recently used idle), waiting up to
        `timeout_s` for one to become idle; None when the wait ran out."""
        with self._cond:
            index = self._victim_locked()
            if index is None and not self._cond.wait_for(
                lambda: self._victim_locked() is not None, timeout=timeout_s
            ):
                return None
            index = self._victim_locked()
            assert index is not None
            evicted = self.table[index]
            if evicted is not None:
                log.debug("slot evicted revision=%s slot=%d", evicted.label, index)
            self.table[index] = Slot(sha256, label, SlotState.PLACING)
            return index

    def fill(self, index: int, entry: HostEntry) -> None:
        """Copy `entry`'s tensors into slot `index`, which the caller has reserved."""
        with self._cond:
            slot = self.table[index]
            if slot is None or slot.state is not SlotState.PLACING or slot.sha256 != entry.sha256:
                raise MintError(
                    f"slot {index} holds {slot}, not a reservation for {entry.label}; reserve "
                    "the slot before filling it"
                )
        if entry.rank > self.max_rank:
            raise InvalidAdapter(
                [f"rank {entry.rank} is above the slot bank's max rank {self.max_rank}"],
                subject=f"revision {entry.label}",
            )
        stack = self._stack(rank_class(entry.rank, self.max_rank))
        # The reservation (state PLACING) makes this slot ours alone: no batch reads it.
        stack.write(index, entry.rank, entry.tensors)
        if self.base.device.type == "cuda":
            torch.cuda.synchronize(self.base.device)
        self._placements[index] = SlotPlacement(stack, index, frozenset(entry.tensors))
        with self._cond:
            slot.rank, slot.scale = entry.rank, entry.scale

    def _stack(self, rank: int) -> SlotStack:
        stack = self._stacks.get(rank)
        if stack is None:
            shapes = {
                path: (layer.in_features, layer.out_features)
                for path, layer in self.base.layers.items()
            }
            stack = SlotStack(shapes, self.num_slots, rank, self.base.device, self.base.dtype)
            self._stacks[rank] = stack
            log.debug("slot stack allocated rank=%d bytes=%d", rank, stack.flat.nbytes)
        return stack

    def mark_ready(self, index: int, refs: int) -> None:
        """Open a filled slot for use, with `refs` references already taken for its waiters."""
        with self._cond:
            slot = self.table[index]
            if slot is None or slot.state is not SlotState.PLACING:
                raise MintError(f"slot {index} holds {slot}; only a PLACING slot becomes ready")
            slot.state = SlotState.READY
            slot.refs = refs
            slot.last_used = self._tick_locked()
            log.debug("slot placed revision=%s slot=%d refs=%d", slot.label, index, refs)
            self._cond.notify_all()

    def abandon(self, index: int) -> None:
        """Give back a reservation whose placement failed."""
        with self._cond:
            slot = self.table[index]
            if slot is not None and slot.state is SlotState.PLACING:
                self.table[index] = None
            self._cond.notify_all()

    def set_pinned(self, sha256: str, pinned: bool) -> int:
        """Pin (never evict) or unpin the slot holding `sha256`; return its index."""
        with self._cond:
            index = self._find_locked(sha256)
            if index is None:
                raise UserError(
                    f"revision {sha256[:12]} is in no slot; place it (sample it once) before "
                    "pinning it"
                )
            slot = self.table[index]
            assert slot is not None
            others = [s for i, s in enumerate(self.table) if i != index]
            if pinned and all(s is not None and s.pinned for s in others):
                raise UserError(
                    f"pinning {slot.label} would pin all {self.num_slots} slots and leave no "
                    "slot for other revisions; unpin one first"
                )
            slot.pinned = pinned
            self._cond.notify_all()
            return index

    def adapter(self, index: int) -> AdapterRef:
        """Slot `index`'s revision for the engine: its placement, and views of its tensors
        in the engine's (A, B) layout."""
        with self._cond:
            slot = self.table[index]
            if slot is None or slot.state is not SlotState.READY:
                raise MintError(f"slot {index} holds {slot}; only a READY slot can be read")
            rank, scale, key = slot.rank, slot.scale, slot.sha256
        placement = self._placements[index]
        assert placement is not None
        stack = placement.stack
        tensors: AdapterTensors = {
            path: (stack.a[path][index, :rank], stack.b[path][index, :, :rank])
            for path in sorted(placement.modules)
        }
        return AdapterRef(key=key, tensors=tensors, scale=scale, placement=placement)

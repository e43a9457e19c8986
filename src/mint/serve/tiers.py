"""The engine's two inner adapter tiers: the host cache and the slot bank.

A revision travels catalog -> host cache -> slot. It is *admitted* to the host cache once:
its files are checked against a digest recorded with the revision (hashed while they are
read, in one pass), decoded without copying (the host entry keeps the safetensors data
region as it was read, one flat buffer), and validated against the resident base
(fingerprint, rank, targets, shapes); every problem is reported in one `InvalidAdapter`.
A host-cached revision is *placed* in a slot by copying its tensors into that slot's position
of a preallocated device stack (one per rank class): one copy of the whole buffer when the
entry is laid out as the stack is (a full-rank revision of every module, as mint exports
it), one copy per tensor otherwise. A batch reads the slot where it lies, which is why a
slot in use by a running batch must never be overwritten (reference counts guard it).

The admission check is xxh3_128 when the revision records one, sha256 for revisions exported
before it was recorded. Over a 9.8 MB adapter sha256 took 5.3 ms and xxh3_128 0.14 ms, so
with sha256 the check, not the read (0.3 ms from a hot page cache), was admission's cost.
A non-cryptographic check is enough at admission: the files come from mint's own
content-addressed blob store, which no client writes into, and what admission must catch
is damage and truncation (a flipped bit, a short copy), which a 128-bit checksum catches.
Guarding against crafted bytes is the sha256 content address's job: it is computed where
bytes enter the catalog (export, and import, which re-encodes what it validated), recorded
beside the xxh3_128, and verified whenever the catalog itself reads a revision back.

Decoding is cheap on a second admission of the same layout: revisions of one signature have
byte-identical safetensors headers, so the engine keeps the validated layout of each header
it has seen (`LayoutCache`, keyed by the header's exact bytes and the signature it was
checked against). A known header costs one lookup; the data bytes are hashed and their
length checked on every admission.

State is plain data: the host cache is an ordered map (least recently used first) with a
byte budget, the slot table a list indexed by slot with None for a free slot.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy
import torch

from mint.catalog.peft_io import CONFIG_FILE, DIGESTS, WEIGHTS_FILE, files_digest, split_tensors
from mint.catalog.records import RevisionRecord
from mint.catalog.validate import base_mismatch
from mint.errors import InvalidAdapter, MintError, UserError
from mint.models.base import ResidentBase
from mint.models.lora import AdapterTensors, FlatLayout, SlotPlacement, SlotStack, rank_class
from mint.serve.types import AdapterRef

log = logging.getLogger(__name__)

#: Bytes read per call when a revision's files are read and hashed in one pass. Measured on
#: a 9.8 MB adapter with a hot page cache: 1 MiB and larger chunks read and hash in the
#: same time, 256 KiB chunks about 10% slower (more calls), 128 KiB about 25% slower.
READ_CHUNK = 1 << 20
#: Header layouts an engine keeps (`LayoutCache`); one per signature it serves is enough.
LAYOUT_CACHE_ENTRIES = 32
#: safetensors dtype names (the format's header spelling) mint can serve LoRA tensors in.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


#: The checks admission can run over a revision's files, by the name of the
#: `RevisionRecord` field holding the expected hex digest.
LOAD_CHECKS = DIGESTS
#: Bytes a revision's files are read into: a writable buffer of exactly the bytes read.
Buffer = bytes | bytearray | memoryview


def revision_label(revision: RevisionRecord) -> str:
    return f"{revision.policy_id}@{revision.number}"


def load_check(revision: RevisionRecord) -> str:
    """The check admission runs over `revision`'s files: xxh3_128 when the revision records
    it, else (a revision exported before it was recorded) sha256."""
    return "xxh3_128" if revision.xxh3_128 is not None else "sha256"


def _recorded_digest(revision: RevisionRecord, check: str) -> str | None:
    return revision.xxh3_128 if check == "xxh3_128" else revision.sha256


@dataclass(frozen=True)
class RevisionFiles:
    """A revision's two PEFT files as read, with the `check` digest of exactly these bytes
    (weights, then config).

    Build it with `read` (one pass: each chunk is hashed as it arrives) or `of` (hashes
    bytes already in memory), never by hand, so `digest` always describes `weights` and
    `config`.
    """

    weights: memoryview
    config: bytes
    check: str
    digest: str

    @classmethod
    def of(cls, weights: Buffer, config: bytes, check: str = "sha256") -> RevisionFiles:
        digest = files_digest(check, weights, config)
        return cls(memoryview(bytearray(weights)), bytes(config), check, digest)

    @classmethod
    def read(cls, folder: Path, check: str = "sha256") -> RevisionFiles:
        """Read and hash the files in `folder`; raises FileNotFoundError for a missing one."""
        digest = LOAD_CHECKS[check]()
        with open(folder / WEIGHTS_FILE, "rb", buffering=0) as file:
            # numpy.empty, unlike bytearray, leaves the buffer unfilled: the read fills it.
            view = numpy.empty(_file_size(file), dtype=numpy.uint8).data
            done = 0
            while done < len(view):
                got = file.readinto(view[done : done + READ_CHUNK])
                if not got:  # the file shrank while it was read: keep what is there
                    break
                # hashlib and xxhash drop the GIL for large updates: decoding keeps running.
                digest.update(view[done : done + got])
                done += got
        config = (folder / CONFIG_FILE).read_bytes()
        digest.update(config)
        return cls(view[:done], config, check, digest.hexdigest())


def _file_size(file: Any) -> int:
    return os.fstat(file.fileno()).st_size


@dataclass(frozen=True)
class HostEntry:
    """One admitted revision in host memory, already in the base's dtype.

    `data` holds every tensor as `layout` says. On a CPU engine of the file's dtype it is
    the safetensors data region exactly as read, not a copy. Per-tensor views (`tensors`)
    are built on first use only: placing a revision laid out as its stack needs none.
    """

    sha256: str
    label: str
    rank: int
    scale: float
    data: torch.Tensor
    layout: FlatLayout
    nbytes: int

    @cached_property
    def modules(self) -> frozenset[str]:
        return frozenset(self.layout.paths)

    @cached_property
    def tensors(self) -> AdapterTensors:
        return self.layout.views(self.data)


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


def _digest_problems(revision: RevisionRecord, files: RevisionFiles) -> list[str]:
    recorded = _recorded_digest(revision, files.check)
    if recorded is None:
        return [
            f"the files were checked with {files.check} but the revision records no "
            f"{files.check} digest; check them with {load_check(revision)}"
        ]
    if files.digest != recorded:
        return [
            f"the files do not match the revision's {files.check} {recorded[:12]}...; the "
            "stored copy is damaged or truncated; re-export the revision"
        ]
    return []


def _record_problems(
    base: ResidentBase, revision: RevisionRecord, max_rank: int, files: RevisionFiles
) -> list[str]:
    problems = _digest_problems(revision, files)
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


def _header_end(data: Buffer) -> int:
    """The offset the tensor bytes of `data` start at; ValueError when the header's length
    field does not fit."""
    if len(data) < 8:
        raise ValueError(f"it is {len(data)} bytes, shorter than the 8-byte header length")
    size = int.from_bytes(data[:8], "little")
    if 8 + size > len(data):
        raise ValueError(f"its {size}-byte header runs past the end of the {len(data)} bytes")
    return 8 + size


def _header(data: Buffer) -> tuple[dict[str, Any], int]:
    """The safetensors header of `data` and the offset its tensor bytes start at.

    Raises ValueError naming what is wrong with the framing."""
    start = _header_end(data)
    try:
        header = json.loads(bytes(data[8:start]))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    header.pop("__metadata__", None)
    return header, start


@dataclass(frozen=True)
class _Span:
    """One tensor of a safetensors file: its key, dtype, shape and byte span in the data
    region (which starts after the header)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _tensor_span(key: str, info: Any) -> _Span:
    """One header entry, checked; ValueError when it is malformed."""
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
    return _Span(key, dtype, tuple(shape), begin, end)


def _spans(data: Buffer) -> tuple[list[_Span], int]:
    """The tensors a safetensors header declares, in data order, and where their bytes
    start; checks that they tile the data region with no gap and no overlap, not yet that
    the data region is that long."""
    header, start = _header(data)
    spans = sorted(
        (_tensor_span(key, info) for key, info in header.items()),
        key=lambda span: (span.begin, span.end, span.key),
    )
    expected = 0
    for span in spans:
        if span.begin != expected:
            raise ValueError(
                f"tensor {span.key!r} starts at byte {span.begin}, expected {expected}"
            )
        expected = span.end
    return spans, start


def _length_problem(data: Buffer, start: int, covered: int) -> str | None:
    if start + covered == len(data):
        return None
    return (
        f"the tensors cover {covered} bytes but {len(data) - start} follow the header; "
        "the file is truncated or has trailing bytes"
    )


def _span_view(data: Buffer, start: int, span: _Span) -> torch.Tensor:
    """The tensor of `span` as a view into `data`, or a copy where the format's lack of an
    alignment promise leaves it misaligned for its dtype."""
    offset, size, count = start + span.begin, span.dtype.itemsize, math.prod(span.shape)
    if count == 0:
        return torch.empty(span.shape, dtype=span.dtype)
    if offset % size:
        raw = bytearray(data[offset : offset + count * size])
        return torch.frombuffer(raw, dtype=span.dtype).view(span.shape)
    return torch.frombuffer(data, dtype=span.dtype, count=count, offset=offset).view(span.shape)


def view_safetensors(data: Buffer) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file as views into `data` (no copy), checked from the header.

    The checks are the format's own: a header that fits, known dtypes, byte spans that match
    each shape and tile the data exactly (no gap, no overlap, nothing past the end). Raises
    ValueError naming the first violation.
    """
    spans, start = _spans(data)
    problem = _length_problem(data, start, spans[-1].end if spans else 0)
    if problem is not None:
        raise ValueError(problem)
    return {span.key: _span_view(data, start, span) for span in spans}


@dataclass(frozen=True)
class HeaderLayout:
    """A safetensors header validated against one base, rank and target set.

    `flat` says where each module's tensors lie in a host entry's buffer. When every tensor
    has one dtype (`in_place`), that buffer is the file's data region itself, read as one
    array; otherwise the tensors are copied into one buffer in data order.
    """

    start: int
    data_bytes: int
    spans: tuple[_Span, ...]
    in_place: torch.dtype | None
    flat: FlatLayout


def _layout_of(spans: list[_Span], start: int, pairs: dict[str, tuple[str, str]]) -> HeaderLayout:
    """The host layout of validated `spans`; `pairs` maps module path -> (A key, B key)."""
    dtypes = {span.dtype for span in spans}
    one = dtypes.pop() if len(dtypes) == 1 else None
    in_place = one if one is not None and start % one.itemsize == 0 else None
    elements: dict[str, int] = {}
    cursor = 0
    for span in spans:
        elements[span.key] = span.begin // span.dtype.itemsize if in_place is not None else cursor
        cursor += math.prod(span.shape)
    by_key = {span.key: span for span in spans}
    modules = []
    rank = 0
    for path in sorted(pairs):
        a, b = (by_key[key] for key in pairs[path])
        rank, in_features = a.shape
        modules.append((path, elements[a.key], elements[b.key], in_features, b.shape[0]))
    flat = FlatLayout(rank, tuple(modules), cursor)
    return HeaderLayout(start, spans[-1].end, tuple(spans), in_place, flat)


def _validated_layout(
    base: ResidentBase, revision: RevisionRecord, data: Buffer
) -> tuple[HeaderLayout | None, list[str]]:
    """Parse and validate the header of `data` against `base` and the revision's rank and
    targets: the format's framing, PEFT's key names and pairs, and every module's shapes.
    Returns the layout, or None and the problems found."""
    try:
        spans, start = _spans(data)
    except ValueError as error:
        return None, [f"{WEIGHTS_FILE} is unreadable ({error}); re-export the revision"]
    # Shape-only tensors: the checks below read names and shapes, never values.
    meta = {span.key: torch.empty(span.shape, dtype=span.dtype, device="meta") for span in spans}
    try:
        tensors = split_tensors(meta, revision.rank, Path(revision.blob_path))
    except InvalidAdapter as error:
        return None, list(error.problems)
    problems = _module_problems(base, revision, tensors)
    if problems:
        return None, problems
    keys = {id(tensor): key for key, tensor in meta.items()}
    pairs = {path: (keys[id(a)], keys[id(b)]) for path, (a, b) in tensors.items()}
    return _layout_of(spans, start, pairs), []


class LayoutCache:
    """Validated header layouts an engine has seen, least recently used first.

    Keyed by the header's exact bytes (its length field included) and what it was
    validated against: the base, the rank and the targets. Revisions of one signature have
    byte-identical headers, so each is parsed and checked once; a header differing in any
    byte, or met with another rank or target set, is parsed and checked afresh. Only
    headers without problems are kept. Thread-safe.
    """

    def __init__(self, capacity: int = LAYOUT_CACHE_ENTRIES) -> None:
        self.capacity = capacity
        self._layouts: OrderedDict[tuple[Any, ...], HeaderLayout] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._layouts)

    def layout(
        self, base: ResidentBase, revision: RevisionRecord, data: Buffer
    ) -> tuple[HeaderLayout | None, list[str]]:
        """`_validated_layout` of `data`, from the cache when its header is known."""
        try:
            start = _header_end(data)
        except ValueError:
            return _validated_layout(base, revision, data)
        key = (
            bytes(data[:start]),
            revision.rank,
            tuple(sorted(revision.target_modules)),
            base.base_id,
            base.fingerprint,
        )
        with self._lock:
            known = self._layouts.get(key)
            if known is not None:
                self._layouts.move_to_end(key)
                return known, []
        layout, problems = _validated_layout(base, revision, data)
        if layout is not None:
            with self._lock:
                self._layouts[key] = layout
                while len(self._layouts) > self.capacity:
                    self._layouts.popitem(last=False)
        return layout, problems


def _host_data(layout: HeaderLayout, data: Buffer, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """The host entry buffer of a file with a validated `layout`, in `dtype`: the data
    region as read when its dtype is `dtype` and no pinned memory is wanted, else one
    converting copy."""
    if layout.in_place is not None:
        count = layout.data_bytes // layout.in_place.itemsize
        region = torch.frombuffer(data, dtype=layout.in_place, count=count, offset=layout.start)
    else:
        parts = [_span_view(data, layout.start, span).reshape(-1) for span in layout.spans]
        region = torch.cat([part.to(dtype) for part in parts])
    if not pin:
        return region if region.dtype == dtype else region.to(dtype)
    # Pinned host memory makes the slot copy asynchronous; convert straight into it.
    pinned = torch.empty(region.shape, dtype=dtype, pin_memory=True)
    return pinned.copy_(region)


def decode_revision(
    base: ResidentBase,
    revision: RevisionRecord,
    files: RevisionFiles,
    max_rank: int,
    layouts: LayoutCache | None = None,
) -> HostEntry:
    """Decode and validate a revision's two PEFT files against `base`.

    The entry's buffer is the bytes read when they already have the base's dtype (on a CPU
    engine), so admission copies nothing. `layouts` (the engine's) spares re-validating a
    header seen before; the digest, the config and the file's length are checked every
    time. Raises one `InvalidAdapter` listing every problem found.
    """
    problems = _record_problems(base, revision, max_rank, files)
    layouts = layouts if layouts is not None else LayoutCache()  # an empty cache is falsy
    layout, header_problems = layouts.layout(base, revision, files.weights)
    problems += header_problems
    if layout is not None:
        length = _length_problem(files.weights, layout.start, layout.data_bytes)
        if length is not None:
            problems.append(f"{WEIGHTS_FILE} is unreadable ({length}); re-export the revision")
    if problems:
        raise InvalidAdapter(problems, subject=f"revision {revision_label(revision)}")
    assert layout is not None
    data = _host_data(layout, files.weights, base.dtype, pin=base.device.type == "cuda")
    return HostEntry(
        sha256=revision.sha256,
        label=revision_label(revision),
        rank=revision.rank,
        scale=revision.alpha / revision.rank,
        data=data,
        layout=layout.flat,
        nbytes=data.nbytes,
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
    compute at rank 8 beside rank-32 rows, and a placement is one copy into the stack (one
    batched copy of every tensor for a revision not laid out as the stack). Eviction takes
    the least recently used slot that no job references and that is not pinned.

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
        """Copy `entry`'s tensors into slot `index`, which the caller has reserved: its
        whole buffer in one copy when it is laid out as the slot's stack, else per tensor."""
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
        if entry.layout == stack.layout:
            stack.write_flat(index, entry.data)  # laid out as the slot is: one copy
        else:
            stack.write(index, entry.rank, entry.tensors)
        if self.base.device.type == "cuda":
            torch.cuda.synchronize(self.base.device)
        self._placements[index] = SlotPlacement(stack, index, entry.modules)
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

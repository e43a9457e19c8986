"""How an engine is sized: batch rows, slots, host cache budget and cold-load queue.

Every bound is stated once here, with its help text beside the field; `from_env` reads the
same fields from `MINT_*` variables.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

from mint.errors import UserError
from mint.models.lora import MAX_RANK

log = logging.getLogger(__name__)

MIB = 1 << 20


@dataclass(frozen=True)
class EngineConfig:
    #: Rows (samples) decoding together at most.
    max_batch_rows: int = field(default=64, metadata={"env": "MINT_MAX_BATCH_ROWS", "min": 1})
    #: Padded prompt tokens fed per step to rows joining the batch; a longer prefill is
    #: spread over several steps so the rows already decoding keep sampling meanwhile.
    prefill_chunk_tokens: int = field(
        default=512, metadata={"env": "MINT_PREFILL_CHUNK_TOKENS", "min": 1}
    )
    #: Device-resident adapter positions; a batch can use at most this many adapters.
    num_slots: int = field(default=8, metadata={"env": "MINT_SLOTS", "min": 1})
    #: Highest LoRA rank a slot holds; slots are stacked per rank class (powers of two up
    #: to this), so a smaller revision computes at its own class, not at this rank.
    max_slot_rank: int = field(default=32, metadata={"env": "MINT_MAX_SLOT_RANK", "min": 1})
    #: Host memory for decoded revisions, in bytes.
    host_cache_bytes: int = field(
        default=2048 * MIB, metadata={"env": "MINT_HOST_CACHE_BYTES", "min": 1}
    )
    #: Revisions loading or waiting to load at most; past it a cold request gets `Busy`.
    max_cold_loads: int = field(default=32, metadata={"env": "MINT_MAX_COLD_LOADS", "min": 1})
    #: Percent of wall time the cold loader may spend decoding and placing revisions while a
    #: batch decodes; that Python work shares the GIL with the decode loop, so pacing it
    #: keeps warm per-token latency flat during a burst of cold requests.
    cold_load_share_percent: int = field(
        default=5, metadata={"env": "MINT_COLD_LOAD_SHARE_PERCENT", "min": 1}
    )
    #: Sample requests queued at most (beyond the running batch).
    max_queued_samples: int = field(
        default=4096, metadata={"env": "MINT_MAX_QUEUED_SAMPLES", "min": 1}
    )
    #: Decode steps the worker runs before it lets a waiting training job have the base.
    decode_steps_per_turn: int = field(
        default=32, metadata={"env": "MINT_DECODE_STEPS_PER_TURN", "min": 1}
    )

    def __post_init__(self) -> None:
        problems = [
            f"{f.name} is {getattr(self, f.name)!r}; it must be an integer >= {f.metadata['min']}"
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), bool)
            or not isinstance(getattr(self, f.name), int)
            or getattr(self, f.name) < f.metadata["min"]
        ]
        if self.max_slot_rank > MAX_RANK:
            problems.append(
                f"max_slot_rank is {self.max_slot_rank}; policies have rank <= {MAX_RANK}, so "
                f"a larger slot only wastes memory; use at most {MAX_RANK}"
            )
        if self.cold_load_share_percent > 100:
            problems.append(
                f"cold_load_share_percent is {self.cold_load_share_percent}; it is a share of "
                "the time; use at most 100"
            )
        if problems:
            raise UserError("engine configuration refused: " + "; ".join(problems))

    @classmethod
    def from_env(cls) -> EngineConfig:
        """Defaults, overridden by any `MINT_*` variable named in the field metadata."""
        values: dict[str, int] = {}
        for f in dataclasses.fields(cls):
            raw = os.environ.get(f.metadata["env"])
            if raw is None:
                continue
            try:
                values[f.name] = int(raw)
            except ValueError:
                raise UserError(
                    f"{f.metadata['env']} is {raw!r}; it must be an integer; set it to a "
                    f"whole number >= {f.metadata['min']}"
                ) from None
        return cls(**values)

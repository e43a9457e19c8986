"""Plain, frozen records the catalog hands to its callers.

Callers never see ORM rows: a record is a snapshot taken inside one transaction, safe to keep
after the session is gone and to pass between threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

#: The two kinds of Tinker checkpoint the catalog keeps: a saved training state
#: (`weights`) and an exported revision (`sampler_weights`).
CheckpointKind = Literal["training", "sampler"]
CHECKPOINT_KINDS: tuple[str, ...] = ("training", "sampler")


@dataclass(frozen=True)
class KeyGrant:
    """What an active API key allows: its tenant, its scopes and the tenant's job quota."""

    tenant: str
    #: None grants every scope (keys issued without a scope list).
    scopes: frozenset[str] | None
    max_concurrent_jobs: int | None

    def allows(self, scope: str) -> bool:
        return self.scopes is None or scope in self.scopes


@dataclass(frozen=True)
class TenantSummary:
    name: str
    max_concurrent_jobs: int | None
    #: The scopes of each active key, as stored (None: every scope).
    key_scopes: list[str | None]


@dataclass(frozen=True)
class PolicyRecord:
    """A policy: one tenant's line of training over one base with a fixed LoRA signature."""

    tenant: str
    policy_id: str
    base_id: str
    base_fingerprint: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    user_metadata: dict[str, str]
    created_at: datetime
    last_request_at: datetime


@dataclass(frozen=True)
class CheckpointRecord:
    """The Tinker view of a saved training state or an exported revision."""

    tenant: str
    policy_id: str
    kind: CheckpointKind
    name: str
    size_bytes: int
    sha256: str
    created_at: datetime
    expires_at: datetime | None
    user_metadata: dict[str, str]
    #: The revision number for a `sampler` checkpoint; None for a training state.
    revision_number: int | None
    step: int


@dataclass(frozen=True)
class RevisionRecord:
    """An immutable exported adapter in PEFT layout, with its lineage."""

    tenant: str
    policy_id: str
    number: int
    name: str
    sha256: str
    size_bytes: int
    base_id: str
    base_fingerprint: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    parent_number: int | None
    step: int
    created_at: datetime
    #: The folder holding adapter_config.json, adapter_model.safetensors, mint_revision.json.
    blob_path: str
    #: mint_revision.json fields a newer mint wrote, kept and written back on export.
    manifest_extra: dict[str, Any] = field(default_factory=dict)
    #: The load check (`peft_io.load_digest`), which the engine verifies instead of the
    #: slower sha256 when it reads the files; None for a revision exported before mint
    #: recorded it.
    xxh3_128: str | None = None

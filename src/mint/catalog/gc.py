"""The catalog's garbage collector: expired checkpoints, unreferenced blobs, crash leftovers.

1. In one transaction, expired training states are deleted and expired revisions that no
   alias points at are tombstoned (an alias keeps its revision alive past its TTL).
2. Blobs under `revisions/` and `states/` that no live record names are deleted.
3. Staging folders under `tmp/` (a crashed export's half-written files) are deleted.

Steps 2 and 3 only take entries older than the grace period: an export publishes its folder
(a rename, or an upload to an object store) just before its record commits, and a write
that finds its blob present refreshes its modification time, so anything young may be
named by a record any moment.
Known shortcoming: an export that stalls for longer than the grace period between publishing
its blob and committing its record can lose the blob; keep the grace well above the slowest
commit (the default is an hour).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import delete, select, union

from mint.catalog.schema import AliasRow, PolicyRow, RevisionRow, TrainingStateRow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from mint.catalog.blobs import BlobStore

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 3600.0
BLOB_PREFIXES = ("revisions", "states")


@dataclass(frozen=True)
class GcReport:
    """What one collection removed (and what it found damaged but left alone)."""

    #: "policy/name" of each expired training state deleted.
    expired_states: list[str] = field(default_factory=list)
    #: "policy/number" of each expired revision tombstoned.
    expired_revisions: list[str] = field(default_factory=list)
    #: "policy/number" of expired revisions kept because an alias points at them.
    kept_by_alias: list[str] = field(default_factory=list)
    deleted_blobs: list[str] = field(default_factory=list)
    staging_removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    #: Blob keys that live records name but the blob store lacks: damage to restore.
    missing_blobs: list[str] = field(default_factory=list)


def expire_checkpoints(session: Session, now: datetime) -> tuple[list[str], list[str], list[str]]:
    """Step 1, inside the caller's write transaction."""
    states = session.execute(
        select(TrainingStateRow.id, PolicyRow.policy_id, TrainingStateRow.name)
        .join(PolicyRow, TrainingStateRow.policy_pk == PolicyRow.id)
        .where(TrainingStateRow.expires_at <= now)
    ).all()
    if states:
        session.execute(
            delete(TrainingStateRow).where(TrainingStateRow.id.in_([s[0] for s in states]))
        )
    held = select(AliasRow.number).where(AliasRow.policy_pk == RevisionRow.policy_pk)
    expired = session.execute(
        select(RevisionRow, PolicyRow.policy_id, RevisionRow.number.in_(held.scalar_subquery()))
        .join(PolicyRow, RevisionRow.policy_pk == PolicyRow.id)
        .where(RevisionRow.expires_at <= now, RevisionRow.deleted_at.is_(None))
    ).all()
    tombstoned, kept = [], []
    for row, policy_id, is_held in expired:
        if is_held:
            kept.append(f"{policy_id}/{row.number}")
            continue
        row.name, row.deleted_at, row.expires_at = None, now, None
        tombstoned.append(f"{policy_id}/{row.number}")
    return [f"{policy}/{name}" for _, policy, name in states], tombstoned, kept


def referenced_keys(session: Session) -> set[str]:
    live_revisions = select(RevisionRow.blob_key).where(RevisionRow.deleted_at.is_(None))
    return set(session.scalars(union(select(TrainingStateRow.blob_key), live_revisions)))


def sweep_blobs(
    blobs: BlobStore, referenced: set[str], now: datetime, grace_s: float
) -> tuple[list[str], list[str], int, list[str]]:
    """Steps 2 and 3: (deleted blobs, removed staging entries, bytes freed, missing keys)."""
    cutoff = now.timestamp() - grace_s
    deleted, staging, freed = [], [], 0
    present = set()
    for prefix in BLOB_PREFIXES:
        for entry in blobs.listing(prefix):
            present.add(entry.key)
            if entry.key in referenced or entry.modified > cutoff:
                continue
            blobs.remove(entry.key)
            deleted.append(entry.key)
            freed += entry.size_bytes
    for entry in blobs.listing("tmp"):
        if entry.modified <= cutoff:
            blobs.remove(entry.key)
            staging.append(entry.key)
            freed += entry.size_bytes
    return deleted, staging, freed, sorted(referenced - present)

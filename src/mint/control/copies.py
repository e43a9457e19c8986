"""Copying a checkpoint into a new training run of the same tenant (Tinker's copy_weights).

The copy is a new policy with the source's base and LoRA signature that holds one checkpoint
of the source's kind under the source's name. Bytes are shared: training states and adapter
files are content-addressed in the blob store, so the copy writes no new blob. The new run
has no live training client; `create_training_client_from_state` on a copied training state
makes one.
"""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path

from mint.catalog.records import CheckpointRecord
from mint.catalog.store import Catalog
from mint.control.paths import CheckpointPath, parse_checkpoint_path
from mint.models.base import ResidentBase
from mint.models.lora import LoraSignature


def copy_policy_id(session_id: str | None, model_seq_id: int | None) -> str:
    """The model id of the copy: the client's slot in its session, or a fresh run."""
    if session_id is not None and model_seq_id is not None:
        return f"{session_id}:train:{model_seq_id}"
    return f"copy-{secrets.token_hex(6)}:train:0"


def copy_checkpoint(
    catalog: Catalog,
    tenant: str,
    source_path: str,
    new_policy_id: str,
    base: ResidentBase,
    ttl_seconds: int | None,
    project_id: str | None,
) -> CheckpointPath:
    """Copy `source_path` into policy `new_policy_id` (created here); answer the copy's path."""
    source = parse_checkpoint_path(source_path)
    policy = catalog.get_policy(tenant, source.policy_id)
    metadata = {"copied_from": source_path}
    if project_id:
        metadata["project_id"] = project_id
    signature = LoraSignature(policy.rank, policy.alpha, tuple(policy.target_modules))
    if source.kind == "training":
        payload = catalog.read_training_state(tenant, source.policy_id, source.name)
        step = _step_of(catalog, tenant, source)
        catalog.create_policy(
            tenant, new_policy_id, policy.base_id, policy.base_fingerprint, signature, metadata
        )
        catalog.save_training_state(
            tenant, new_policy_id, source.name, payload, step, ttl_seconds=ttl_seconds
        )
    else:
        revision = catalog.resolve(tenant, source.policy_id, source.name)
        with tempfile.TemporaryDirectory(prefix="mint-copy-") as scratch:
            folder = Path(scratch) / "adapter"
            catalog.export_folder(tenant, source.policy_id, source.name, folder)
            catalog.create_policy(
                tenant, new_policy_id, policy.base_id, policy.base_fingerprint, signature, metadata
            )
            catalog.import_revision(
                tenant, new_policy_id, folder, base, name=source.name, step=revision.step,
                ttl_seconds=ttl_seconds,
            )  # fmt: skip
    return CheckpointPath(new_policy_id, source.kind, source.name)


def _step_of(catalog: Catalog, tenant: str, source: CheckpointPath) -> int:
    records: list[CheckpointRecord]
    records, _ = catalog.list_checkpoints(tenant, source.policy_id, 10_000, 0)
    for record in records:
        if record.kind == source.kind and record.name == source.name:
            return record.step
    return 0

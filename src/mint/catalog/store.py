"""The catalog: durable policy records in SQL plus their bytes in the blob store.

Each public method is one transaction. Records are committed only after the bytes they name
are complete on disk, so anything a caller can look up is whole. Every lookup is scoped by
tenant, and another tenant's policy answers exactly like a missing one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Integer, String, cast, func, insert, literal, null, select, union_all
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.selectable import CompoundSelect

from mint.catalog import gc, lookup, paging, rules
from mint.catalog.blobs import BlobStore, fsync_folder, sha256_hex, write_durable
from mint.catalog.engine import WRITE_OPTION, lookup_engine, make_engine
from mint.catalog.migrate import upgrade_to_head
from mint.catalog.peft_io import (
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    RevisionManifest,
    adapter_digest,
    decode_peft,
    folder_digests,
    write_peft_folder,
)
from mint.catalog.records import (
    CHECKPOINT_KINDS,
    CheckpointRecord,
    KeyGrant,
    PolicyRecord,
    RevisionRecord,
    TenantSummary,
)
from mint.catalog.schema import (
    AliasRow,
    ApiKeyRow,
    BaseRow,
    PolicyRow,
    RevisionRow,
    TenantRow,
    TrainingStateRow,
    utc_now,
)
from mint.catalog.validate import AdaptableBase, validate_adapter
from mint.errors import (
    AliasInUse,
    Conflict,
    MintError,
    NotFound,
    UnknownBase,
    UserError,
)
from mint.models.lora import AdapterTensors, LoraSignature

log = logging.getLogger(__name__)

LATEST = "latest"
#: Revision numbers are max+1 under a unique constraint; a concurrent writer that took the
#: same number makes the insert fail, and the export retries with a fresh number.
EXPORT_ATTEMPTS = 5


class Catalog:
    """Tenants, API keys, bases, policies, training states, revisions and aliases."""

    def __init__(self, url: str, blobs: Path | BlobStore) -> None:
        """`url` is the database; `blobs` a local folder or a configured blob store."""
        self.engine = make_engine(url)
        upgrade_to_head(self.engine)
        self._reads = sessionmaker(bind=self.engine, expire_on_commit=False)
        self._writes = sessionmaker(
            bind=self.engine.execution_options(**{WRITE_OPTION: True}), expire_on_commit=False
        )
        self._lookups = lookup_engine(self.engine)
        self.blobs = blobs if isinstance(blobs, BlobStore) else BlobStore(blobs)

    def close(self) -> None:
        self._lookups.dispose()
        self.engine.dispose()

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        with self._reads.begin() as session:
            yield session

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        with self._writes.begin() as session:
            yield session

    # -- tenants and API keys ------------------------------------------------------------

    def ensure_tenant(self, name: str) -> None:
        rules.check_identifier(name, "tenant name")
        try:
            with self._writing() as session:
                if _find_tenant(session, name) is None:
                    session.add(TenantRow(name=name, created_at=utc_now()))
                    log.info("tenant %s created", name)
        except IntegrityError:
            pass  # a concurrent ensure_tenant created it: the outcome asked for

    def add_api_key(self, tenant: str, key: str, scopes: Sequence[str] | None = None) -> None:
        """Issue `key` to `tenant`, granting `scopes` (None: every scope), stored hashed."""
        rules.check_api_key(key)
        digest = _key_digest(key)
        granted = None if scopes is None else " ".join(sorted(set(scopes)))
        with self._writing() as session:
            owner = _tenant_row(session, tenant)
            existing = session.get(ApiKeyRow, digest)
            if existing is None:
                session.add(
                    ApiKeyRow(
                        key_sha256=digest, tenant_id=owner.id, created_at=utc_now(), scopes=granted
                    )
                )
                log.info("API key %s added for tenant %s", rules.key_hint(key), tenant)
                return
            if existing.tenant_id != owner.id or existing.revoked_at is not None:
                raise Conflict(
                    f"API key {rules.key_hint(key)} is already issued or was revoked; "
                    "issue a freshly generated key instead"
                )

    def revoke_api_key(self, key: str) -> None:
        with self._writing() as session:
            row = session.get(ApiKeyRow, _key_digest(key))
            if row is None:
                raise NotFound(
                    f"API key {rules.key_hint(key)} is not known; check the key you meant to revoke"
                )
            if row.revoked_at is None:
                row.revoked_at = utc_now()
                log.info("API key %s revoked", rules.key_hint(key))

    def tenant_for_key(self, key: str) -> str | None:
        """The tenant owning active key `key`, or None for an unknown or revoked key."""
        grant = self.key_grant(key)
        return None if grant is None else grant.tenant

    def key_grant(self, key: str) -> KeyGrant | None:
        """Who active key `key` speaks for and what it may do; None if unknown or revoked."""
        with self._reading() as session:
            row = session.execute(
                select(TenantRow.name, ApiKeyRow.scopes, TenantRow.max_concurrent_jobs)
                .join(ApiKeyRow, ApiKeyRow.tenant_id == TenantRow.id)
                .where(ApiKeyRow.key_sha256 == _key_digest(key), ApiKeyRow.revoked_at.is_(None))
            ).first()
        if row is None:
            return None
        scopes = None if row.scopes is None else frozenset(row.scopes.split())
        return KeyGrant(row.name, scopes, row.max_concurrent_jobs)

    def set_job_quota(self, tenant: str, max_concurrent_jobs: int | None) -> None:
        """Limit `tenant` to that many unfinished jobs at once (None: no limit)."""
        if max_concurrent_jobs is not None and max_concurrent_jobs < 1:
            raise UserError(
                f"max_concurrent_jobs {max_concurrent_jobs} must be at least 1; "
                "lift the limit instead to allow any number"
            )
        with self._writing() as session:
            _tenant_row(session, tenant).max_concurrent_jobs = max_concurrent_jobs
        log.info("tenant %s job quota set to %s", tenant, max_concurrent_jobs or "no limit")

    def job_quota(self, tenant: str) -> int | None:
        with self._reading() as session:
            return session.scalar(
                select(TenantRow.max_concurrent_jobs).where(TenantRow.name == tenant)
            )

    def list_tenants(self) -> list[TenantSummary]:
        """Every tenant with its quota and the scopes of each of its active keys."""
        with self._reading() as session:
            tenants = session.scalars(select(TenantRow).order_by(TenantRow.name)).all()
            keys = session.execute(
                select(ApiKeyRow.tenant_id, ApiKeyRow.scopes).where(ApiKeyRow.revoked_at.is_(None))
            ).all()
        scopes_by_tenant: dict[int, list[str | None]] = {}
        for tenant_id, scopes in keys:
            scopes_by_tenant.setdefault(tenant_id, []).append(scopes)
        return [
            TenantSummary(t.name, t.max_concurrent_jobs, scopes_by_tenant.get(t.id, []))
            for t in tenants
        ]

    # -- bases ---------------------------------------------------------------------------

    def record_base(self, base_id: str, fingerprint: str) -> None:
        """Remember that base `base_id` was loaded with `fingerprint` (idempotent)."""
        if not base_id or not fingerprint:
            raise UserError(f"base {base_id!r} needs a non-empty id and fingerprint")
        try:
            with self._writing() as session:
                if session.get(BaseRow, (base_id, fingerprint)) is None:
                    session.add(
                        BaseRow(base_id=base_id, fingerprint=fingerprint, recorded_at=utc_now())
                    )
                    log.info("base %s recorded with fingerprint %s", base_id, fingerprint[:12])
        except IntegrityError:
            pass  # recorded concurrently

    # -- policies ------------------------------------------------------------------------

    def create_policy(
        self,
        tenant: str,
        policy_id: str,
        base_id: str,
        base_fingerprint: str,
        signature: LoraSignature,
        user_metadata: dict[str, str] | None = None,
    ) -> PolicyRecord:
        rules.check_identifier(policy_id, "policy id")
        metadata = rules.check_metadata(user_metadata)
        try:
            with self._writing() as session:
                owner = _tenant_row(session, tenant)
                _require_base(session, base_id, base_fingerprint)
                if _find_policy(session, tenant, policy_id) is not None:
                    raise _policy_exists(policy_id)
                now = utc_now()
                row = PolicyRow(
                    tenant_id=owner.id,
                    policy_id=policy_id,
                    base_id=base_id,
                    base_fingerprint=base_fingerprint,
                    rank=signature.rank,
                    alpha=float(signature.alpha),
                    target_modules=sorted(signature.target_modules),
                    user_metadata=metadata,
                    created_at=now,
                    last_request_at=now,
                )
                session.add(row)
                session.flush()
                record = _policy_record(row, tenant)
        except IntegrityError:
            raise _policy_exists(policy_id) from None
        log.info(
            "policy %s created for tenant %s on %s (rank %d)",
            policy_id, tenant, base_id, signature.rank,
        )  # fmt: skip
        return record

    def get_policy(self, tenant: str, policy_id: str) -> PolicyRecord:
        with self._reading() as session:
            return _policy_record(_policy_row(session, tenant, policy_id), tenant)

    def list_policies(
        self, tenant: str, limit: int = 20, offset: int = 0
    ) -> tuple[list[PolicyRecord], int]:
        """One page of the tenant's policies, oldest first, and the total count."""
        rules.check_page(limit, offset)
        owned = select(PolicyRow).join(TenantRow).where(TenantRow.name == tenant)
        with self._reading() as session:
            total = session.scalar(select(func.count()).select_from(owned.subquery())) or 0
            rows = session.scalars(
                owned.order_by(PolicyRow.created_at, PolicyRow.id).limit(limit).offset(offset)
            )
            return [_policy_record(row, tenant) for row in rows], total

    def policy_page(
        self, tenant: str, page_size: int = 100, page_token: str | None = None
    ) -> tuple[list[PolicyRecord], str | None]:
        """One page of the tenant's policies in creation order, and the next page's token."""
        paging.check_page_size(page_size)
        after = paging.decode_token(page_token, "policies")
        query = select(PolicyRow).join(TenantRow).where(TenantRow.name == tenant)
        if after is not None:
            query = query.where(PolicyRow.id > after)
        with self._reading() as session:
            rows = list(session.scalars(query.order_by(PolicyRow.id).limit(page_size + 1)))
            records = [_policy_record(row, tenant) for row in rows[:page_size]]
            more = len(rows) > page_size
            return records, paging.encode_token(
                "policies", rows[page_size - 1].id
            ) if more else None

    def touch_policy(self, tenant: str, policy_id: str) -> None:
        with self._writing() as session:
            _policy_row(session, tenant, policy_id).last_request_at = utc_now()

    # -- training states -----------------------------------------------------------------

    def save_training_state(
        self,
        tenant: str,
        policy_id: str,
        name: str,
        payload: bytes,
        step: int,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, str] | None = None,
        overwrite: bool = False,
    ) -> CheckpointRecord:
        """Store `payload` under `states/<sha256>`, then commit the record naming it."""
        rules.check_checkpoint_name(name, "training")
        rules.check_step(step)
        rules.check_ttl(ttl_seconds)
        metadata = rules.check_metadata(user_metadata)
        self.get_policy(tenant, policy_id)  # refuse before writing bytes for nobody
        key, digest = self.blobs.put_bytes("states", bytes(payload))
        try:
            with self._writing() as session:
                policy = _policy_row(session, tenant, policy_id)
                row = _find_state(session, policy.id, name)
                if row is not None and not overwrite:
                    raise _checkpoint_exists("training", name, policy_id)
                if row is None:
                    row = TrainingStateRow(policy_pk=policy.id, name=name)
                    session.add(row)
                now = utc_now()
                row.sha256, row.size_bytes, row.blob_key = digest, len(payload), key
                row.step, row.created_at, row.user_metadata = step, now, metadata
                row.expires_at = _expiry(now, ttl_seconds)
                session.flush()
                record = _state_checkpoint(row, tenant, policy_id)
        except IntegrityError:
            raise _checkpoint_exists("training", name, policy_id) from None
        log.info("training state %s of policy %s saved (step %d)", name, policy_id, step)
        return record

    def read_training_state(self, tenant: str, policy_id: str, name: str) -> bytes:
        with self._reading() as session:
            policy = _policy_row(session, tenant, policy_id)
            row = _find_state(session, policy.id, name)
            if row is None:
                raise _checkpoint_missing("training", name, policy_id)
            key, digest = row.blob_key, row.sha256
        payload = self.blobs.read_bytes(key)
        if sha256_hex(payload) != digest:
            raise MintError(
                f"training state {name!r} of policy {policy_id!r}: blob {key} does not match "
                f"its recorded sha256 {digest}; the blob store is damaged, restore it"
            )
        return payload

    # -- revisions -----------------------------------------------------------------------

    def export_revision(
        self,
        tenant: str,
        policy_id: str,
        name: str | None,
        tensors: AdapterTensors,
        step: int,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> RevisionRecord:
        """Export `tensors` as the policy's next revision and move alias `latest` to it.

        1. Write the PEFT files into a staging folder in the blob store, each fsynced.
        2. Hash them (sha256 over adapter_model.safetensors, then adapter_config.json).
        3. In one transaction: allocate number = max+1, take `latest` as the parent, write
           mint_revision.json, rename the folder to `revisions/<sha256>`, insert the
           revision and move `latest`; commit. Only now is the revision addressable.
        """
        if name is not None:
            rules.check_checkpoint_name(name, "sampler")
        rules.check_step(step)
        rules.check_ttl(ttl_seconds)
        metadata = rules.check_metadata(user_metadata)
        policy = self.get_policy(tenant, policy_id)
        signature = LoraSignature(policy.rank, policy.alpha, policy.target_modules)
        staged = self.blobs.stage_folder()
        try:
            write_peft_folder(staged, tensors, signature, policy.base_id)
            record = self._register_staged(
                tenant, policy_id, name, staged, step, ttl_seconds, metadata, {}
            )
        finally:
            self.blobs.discard(staged)
        log.info(
            "revision %d (%s) of policy %s exported: sha256 %s, %d bytes, parent %s",
            record.number, record.name, policy_id, record.sha256[:12], record.size_bytes,
            record.parent_number,
        )  # fmt: skip
        return record

    def import_revision(
        self,
        tenant: str,
        policy_id: str,
        folder: Path,
        base: AdaptableBase,
        name: str | None = None,
        step: int = 0,
        max_rank: int | None = None,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> RevisionRecord:
        """Import an outside PEFT adapter folder as the policy's next revision.

        The folder is validated against the policy's signature and `base` (the policy's
        resident base, which supplies module shapes and the vocabulary), reporting every
        problem in one `InvalidAdapter`. Weights are re-encoded in mint's layout (float32,
        sorted keys), config fields mint does not know are kept, and so are unknown
        mint_revision.json fields. Then it is committed exactly like an export.
        """
        if name is not None:
            rules.check_checkpoint_name(name, "sampler")
        rules.check_step(step)
        rules.check_ttl(ttl_seconds)
        metadata = rules.check_metadata(user_metadata)
        policy = self.get_policy(tenant, policy_id)
        adapter = validate_adapter(Path(folder), base, policy, max_rank)
        signature = LoraSignature(policy.rank, policy.alpha, policy.target_modules)
        staged = self.blobs.stage_folder()
        try:
            write_peft_folder(staged, adapter.tensors, signature, policy.base_id,
                              adapter.config_extra)  # fmt: skip
            record = self._register_staged(
                tenant, policy_id, name, staged, step, ttl_seconds, metadata,
                adapter.manifest_extra,
            )  # fmt: skip
        finally:
            self.blobs.discard(staged)
        log.info(
            "revision %d (%s) of policy %s imported from %s: sha256 %s",
            record.number, record.name, policy_id, folder, record.sha256[:12],
        )  # fmt: skip
        return record

    def _register_staged(
        self,
        tenant: str,
        policy_id: str,
        name: str | None,
        staged: Path,
        step: int,
        ttl_seconds: int | None,
        metadata: dict[str, str],
        manifest_extra: dict[str, Any],
    ) -> RevisionRecord:
        """Hash a staged PEFT folder (its sha256 content address and its xxh3_128 load
        check) and commit it as the next revision, retrying numbers."""
        digest, check, size = folder_digests(staged)
        for attempt in range(1, EXPORT_ATTEMPTS + 1):
            try:
                return self._commit_revision(
                    tenant, policy_id, name, staged, (digest, check), size, step,
                    ttl_seconds, metadata, manifest_extra,
                )  # fmt: skip
            except IntegrityError:
                if attempt == EXPORT_ATTEMPTS:
                    raise
                log.debug("policy=%s revision number taken; retry %d", policy_id, attempt)
        raise AssertionError("unreachable: the last attempt re-raises")

    def register_copies(
        self, tenant: str, policy_id: str, source_number: int, steps: Sequence[int]
    ) -> list[int]:
        """Bulk path: add one revision per step, all with revision `source_number`'s bytes.

        No bytes are written (the blob exists and is content-addressed); the new revisions
        form a chain after `latest`, which ends on the last one. One transaction for all of
        them, so a catalog can be filled with many revisions at database speed.
        """
        for step in steps:
            rules.check_step(step)
        with self._writing() as session:
            policy = _policy_row(session, tenant, policy_id, lock=True)
            source = _revision_row(session, policy, source_number)
            highest = session.scalar(
                select(func.max(RevisionRow.number)).where(RevisionRow.policy_pk == policy.id)
            )
            latest = session.get(AliasRow, (policy.id, LATEST))
            parent, first, now = latest.number if latest else None, (highest or 0) + 1, utc_now()
            rows = []
            for offset, step in enumerate(steps):
                number = first + offset
                rows.append(_copy_fields(source, number, parent, step, now))
                parent = number
            if rows:
                session.execute(insert(RevisionRow), rows)
                _point_alias(session, policy.id, LATEST, rows[-1]["number"], now)
        log.info("policy %s: %d revisions registered from revision %d", policy_id, len(rows),
                 source_number)  # fmt: skip
        return [row["number"] for row in rows]

    def export_folder(
        self, tenant: str, policy_id: str, ref: str | None, destination: Path
    ) -> RevisionRecord:
        """Copy revision `ref` (see `resolve`) to the new folder `destination`.

        The adapter files are checked against the revision's sha256 first; the manifest is
        written from the catalog record (the authority on lineage), not copied from the
        shared blob folder. The copy is staged beside `destination` and renamed into place.
        """
        revision = self.resolve(tenant, policy_id, ref)
        destination = Path(destination)
        if destination.exists():
            raise Conflict(
                f"export destination {destination} exists already; name a folder that does "
                "not exist yet"
            )
        weights, config = _read_adapter_files(Path(revision.blob_path))
        if adapter_digest(weights, config) != revision.sha256:
            raise _damaged(revision, Path(revision.blob_path))
        staged = destination.parent / f".{destination.name}.{uuid.uuid4().hex}.tmp"
        staged.mkdir(parents=True)
        try:
            for file_name, data in (
                (WEIGHTS_FILE, weights),
                (CONFIG_FILE, config),
                (MANIFEST_FILE, _manifest_of(revision).to_bytes()),
            ):
                write_durable(self.blobs.fs, staged / file_name, data)
            fsync_folder(staged)
            os.rename(staged, destination)
        finally:
            if staged.exists():
                shutil.rmtree(staged)
        fsync_folder(destination.parent)
        log.info("revision %d of policy %s copied to %s", revision.number, policy_id, destination)
        return revision

    def _commit_revision(
        self,
        tenant: str,
        policy_id: str,
        name: str | None,
        staged: Path,
        digests: tuple[str, str],
        size: int,
        step: int,
        ttl_seconds: int | None,
        metadata: dict[str, str],
        manifest_extra: dict[str, Any],
    ) -> RevisionRecord:
        """`digests` are the folder's (sha256, xxh3_128)."""
        digest, check = digests
        with self._writing() as session:
            policy = _policy_row(session, tenant, policy_id, lock=True)
            if name is not None and _find_revision_by_name(session, policy.id, name):
                raise _checkpoint_exists("sampler", name, policy_id)
            highest = session.scalar(
                select(func.max(RevisionRow.number)).where(RevisionRow.policy_pk == policy.id)
            )
            number = (highest or 0) + 1
            latest = session.get(AliasRow, (policy.id, LATEST))
            now = utc_now()
            row = RevisionRow(
                policy_pk=policy.id,
                number=number,
                name=name if name is not None else f"rev-{number}",
                sha256=digest,
                size_bytes=size,
                blob_key=f"revisions/{digest}",
                base_id=policy.base_id,
                base_fingerprint=policy.base_fingerprint,
                rank=policy.rank,
                alpha=policy.alpha,
                target_modules=list(policy.target_modules),
                parent_number=latest.number if latest is not None else None,
                step=step,
                created_at=now,
                expires_at=_expiry(now, ttl_seconds),
                user_metadata=metadata,
                manifest_extra=manifest_extra or None,
                xxh3_128=check,
            )
            self._publish(staged, row, policy_id)
            session.add(row)
            session.flush()
            _point_alias(session, policy.id, LATEST, number, now)
            return _revision_record(row, tenant, policy_id, self.blobs)

    def _publish(self, staged: Path, row: RevisionRow, policy_id: str) -> None:
        """Complete the staged folder with its manifest and rename it to its final key.

        Known shortcoming: the folder is shared by every revision with the same bytes, and
        its mint_revision.json describes the export that wrote it first; the catalog record,
        not the manifest, is authoritative for lineage.
        """
        if not staged.exists():
            if not self.blobs.exists(row.blob_key):
                raise MintError(f"revision blob {row.blob_key} vanished while exporting")
            return  # published by an earlier attempt of this export
        manifest = RevisionManifest(
            base_id=row.base_id,
            base_fingerprint=row.base_fingerprint,
            policy_id=policy_id,
            number=row.number,
            parent_number=row.parent_number,
            step=row.step,
            created_at=row.created_at,
            sha256=row.sha256,
            size_bytes=row.size_bytes,
            extra=dict(row.manifest_extra or {}),
        )
        write_durable(self.blobs.fs, staged / MANIFEST_FILE, manifest.to_bytes())
        fsync_folder(staged)
        self.blobs.publish_folder(staged, row.blob_key)

    def read_revision_tensors(self, revision: RevisionRecord) -> AdapterTensors:
        """The revision's tensors in host memory, after checking its bytes against its sha256."""
        folder = self._fetch(revision)
        weights, config = _read_adapter_files(folder)
        if adapter_digest(weights, config) != revision.sha256:
            raise _damaged(revision, folder)
        tensors, _ = decode_peft(weights, config, folder)
        return tensors

    def get_revision(self, tenant: str, policy_id: str, number: int) -> RevisionRecord:
        with self._reading() as session:
            policy = _policy_row(session, tenant, policy_id)
            row = _revision_row(session, policy, number)
            record = _revision_record(row, tenant, policy_id, self.blobs)
        self._fetch(record)
        return record

    def resolve(self, tenant: str, policy_id: str, ref: str | None = None) -> RevisionRecord:
        """The revision `ref` names on a policy.

        None means alias `latest`; then `ref` is tried as an alias name, as a revision number
        ("3" or "@3") and as a sampler checkpoint name ("000010", a zero-padded step, is a
        name). Names cannot be plain numbers and aliases start with a letter, so only an
        alias can shadow a checkpoint name.
        """
        ref = LATEST if ref is None else ref
        found = self._lookup(tenant, policy_id, ref)
        if found is not None:
            record = _revision_record(found, tenant, policy_id, self.blobs)
        else:
            # Nothing found (or a malformed ref): the ORM path raises the error saying why.
            with self._reading() as session:
                policy = _policy_row(session, tenant, policy_id)
                row = _resolve_row(session, policy, ref)
                record = _revision_record(row, tenant, policy_id, self.blobs)
        self._fetch(record)
        return record

    def _fetch(self, revision: RevisionRecord) -> Path:
        """Make sure `revision.blob_path` holds its files (an object store fetches them once;
        a local folder holds them already)."""
        return self.blobs.local_folder(f"revisions/{revision.sha256}", revision.sha256)

    def _lookup(self, tenant: str, policy_id: str, ref: str) -> Row[Any] | None:
        """`resolve`'s one-query fast path (see `lookup`); None when it finds nothing."""
        number = _ref_number(ref)
        if number is None and ref.startswith("@"):
            return None  # malformed; the slow path explains
        for attempt in (1, 2):
            try:
                with self._lookups.connect() as connection:
                    if number is not None:
                        return lookup.revision_by_number(connection, tenant, policy_id, number)
                    return lookup.revision_by_alias_or_name(connection, tenant, policy_id, ref)
            except DBAPIError as error:
                # A connection the server dropped: the pool is discarded, try a fresh one.
                if attempt == 2 or not error.connection_invalidated:
                    raise
                log.warning("catalog connection lost (%s); retrying on a new one", error.orig)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def list_revisions(
        self, tenant: str, policy_id: str, limit: int = 100, offset: int = 0
    ) -> tuple[list[RevisionRecord], int]:
        rules.check_page(limit, offset)
        with self._reading() as session:
            policy = _policy_row(session, tenant, policy_id)
            live = select(RevisionRow).where(
                RevisionRow.policy_pk == policy.id, RevisionRow.deleted_at.is_(None)
            )
            total = session.scalar(select(func.count()).select_from(live.subquery())) or 0
            rows = session.scalars(live.order_by(RevisionRow.number).limit(limit).offset(offset))
            return [_revision_record(row, tenant, policy_id, self.blobs) for row in rows], total

    def revision_page(
        self, tenant: str, policy_id: str, page_size: int = 100, page_token: str | None = None
    ) -> tuple[list[RevisionRecord], str | None]:
        """One page of a policy's live revisions by number, and the next page's token."""
        paging.check_page_size(page_size)
        after = paging.decode_token(page_token, "revisions")
        with self._reading() as session:
            policy = _policy_row(session, tenant, policy_id)
            query = select(RevisionRow).where(
                RevisionRow.policy_pk == policy.id, RevisionRow.deleted_at.is_(None)
            )
            if after is not None:
                query = query.where(RevisionRow.number > after)
            rows = list(session.scalars(query.order_by(RevisionRow.number).limit(page_size + 1)))
            records = [_revision_record(r, tenant, policy_id, self.blobs) for r in rows]
        if len(records) <= page_size:
            return records, None
        return records[:page_size], paging.encode_token("revisions", records[page_size - 1].number)

    # -- aliases -------------------------------------------------------------------------

    def set_alias(self, tenant: str, policy_id: str, alias: str, number: int) -> None:
        rules.check_alias_name(alias)
        with self._writing() as session:
            policy = _policy_row(session, tenant, policy_id)
            _revision_row(session, policy, number)
            previous = _point_alias(session, policy.id, alias, number, utc_now())
        log.info("alias %s of policy %s: %s -> %d", alias, policy_id, previous, number)

    def delete_alias(self, tenant: str, policy_id: str, alias: str) -> None:
        if alias == LATEST:
            raise UserError(
                f"alias {LATEST!r} is kept by export and cannot be deleted; "
                "move it with rollback instead"
            )
        with self._writing() as session:
            policy = _policy_row(session, tenant, policy_id)
            row = session.get(AliasRow, (policy.id, alias))
            if row is None:
                raise NotFound(
                    f"alias {alias!r} not found on policy {policy_id!r}; existing aliases: "
                    f"{sorted(_alias_map(session, policy.id))}"
                )
            session.delete(row)
        log.info("alias %s of policy %s deleted", alias, policy_id)

    def aliases(self, tenant: str, policy_id: str) -> dict[str, int]:
        with self._reading() as session:
            return _alias_map(session, _policy_row(session, tenant, policy_id).id)

    def rollback(self, tenant: str, policy_id: str, to_number: int, alias: str = LATEST) -> None:
        """Move `alias` back to revision `to_number`; revisions themselves never change."""
        rules.check_alias_name(alias)
        with self._writing() as session:
            policy = _policy_row(session, tenant, policy_id)
            _revision_row(session, policy, to_number)
            previous = _point_alias(session, policy.id, alias, to_number, utc_now())
        log.info("policy %s rolled back: alias %s %s -> %d", policy_id, alias, previous, to_number)

    # -- the Tinker checkpoint view ------------------------------------------------------

    def list_checkpoints(
        self, tenant: str, policy_id: str | None = None, limit: int = 100, offset: int = 0
    ) -> tuple[list[CheckpointRecord], int]:
        """Training states and revisions together, oldest first (newest last)."""
        rules.check_page(limit, offset)
        with self._reading() as session:
            if policy_id is not None:
                _policy_row(session, tenant, policy_id)
            combined = _checkpoint_union(tenant, policy_id).subquery()
            total = session.scalar(select(func.count()).select_from(combined)) or 0
            rows = session.execute(
                select(combined)
                .order_by(combined.c.created_at, combined.c.kind, combined.c.row_id)
                .limit(limit)
                .offset(offset)
            )
            return [_union_checkpoint(row, tenant) for row in rows], total

    def last_checkpoints(
        self, tenant: str, policy_ids: Sequence[str]
    ) -> dict[str, dict[str, CheckpointRecord]]:
        """For each policy named, its newest checkpoint of each kind (by creation time), in
        one query for all of them; a policy without checkpoints maps to {}."""
        last: dict[str, dict[str, CheckpointRecord]] = {policy: {} for policy in policy_ids}
        if not policy_ids:
            return last
        combined = _checkpoint_union(tenant, None).subquery()
        newest_first = (
            func.row_number()
            .over(
                partition_by=(combined.c.policy_id, combined.c.kind),
                order_by=(combined.c.created_at.desc(), combined.c.row_id.desc()),
            )
            .label("newness")
        )
        ranked = (
            select(combined, newest_first)
            .where(combined.c.policy_id.in_(list(policy_ids)))
            .subquery()
        )
        with self._reading() as session:
            for row in session.execute(select(ranked).where(ranked.c.newness == 1)):
                last[row.policy_id][row.kind] = _union_checkpoint(row, tenant)
        return last

    def delete_checkpoint(self, tenant: str, policy_id: str, kind: str, name: str) -> None:
        """Forget a checkpoint's record; its bytes stay until the garbage collector runs,
        since identical bytes may back other records."""
        _check_kind(kind)
        with self._writing() as session:
            policy = _policy_row(session, tenant, policy_id)
            if kind == "training":
                state = _find_state(session, policy.id, name)
                if state is None:
                    raise _checkpoint_missing(kind, name, policy_id)
                session.delete(state)
            else:
                _tombstone_revision(session, policy, name)
        log.info("%s checkpoint %s of policy %s deleted", kind, name, policy_id)

    def set_checkpoint_ttl(
        self, tenant: str, policy_id: str, kind: str, name: str, ttl_seconds: int | None
    ) -> None:
        """Expire the checkpoint `ttl_seconds` from now (as Tinker's set-ttl), None = never."""
        _check_kind(kind)
        rules.check_ttl(ttl_seconds)
        with self._writing() as session:
            policy = _policy_row(session, tenant, policy_id)
            if kind == "training":
                row: TrainingStateRow | RevisionRow | None = _find_state(session, policy.id, name)
            else:
                row = _find_revision_by_name(session, policy.id, name)
            if row is None:
                raise _checkpoint_missing(kind, name, policy_id)
            row.expires_at = _expiry(utc_now(), ttl_seconds)

    # -- garbage collection --------------------------------------------------------------

    def collect_garbage(
        self, now: datetime | None = None, grace_s: float = gc.DEFAULT_GRACE_S
    ) -> gc.GcReport:
        """Delete expired checkpoints, unreferenced blobs and crash leftovers (see `gc`).

        `now` defaults to the current time; blobs and staging entries younger than
        `grace_s` seconds at `now` are left alone.
        """
        moment = utc_now() if now is None else now
        with self._writing() as session:
            states, revisions, kept = gc.expire_checkpoints(session, moment)
        with self._reading() as session:
            referenced = gc.referenced_keys(session)
        deleted, staging, freed, missing = gc.sweep_blobs(self.blobs, referenced, moment, grace_s)
        report = gc.GcReport(states, revisions, kept, deleted, staging, freed, missing)
        log.info(
            "garbage collected: %d expired states, %d expired revisions (%d kept by aliases), "
            "%d blobs, %d staging entries, %d bytes freed",
            len(states), len(revisions), len(kept), len(deleted), len(staging), freed,
        )  # fmt: skip
        if missing:
            log.warning("records name %d missing blobs: %s", len(missing), missing[:5])
        return report


# -- lookups (inside a session) ----------------------------------------------------------


def _key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _find_tenant(session: Session, name: str) -> TenantRow | None:
    return session.scalar(select(TenantRow).where(TenantRow.name == name))


def _tenant_row(session: Session, name: str) -> TenantRow:
    row = _find_tenant(session, name)
    if row is None:
        raise NotFound(f"tenant {name!r} is not known; create it with ensure_tenant first")
    return row


def _require_base(session: Session, base_id: str, fingerprint: str) -> None:
    if session.get(BaseRow, (base_id, fingerprint)) is not None:
        return
    known = session.scalars(select(BaseRow.fingerprint).where(BaseRow.base_id == base_id))
    seen = [value[:12] for value in known]
    raise UnknownBase(
        f"base {base_id!r} with fingerprint {fingerprint[:12]}... is not recorded "
        f"(recorded fingerprints for it: {seen}); load the base, which records it, "
        "or call record_base"
    )


def _find_policy(
    session: Session, tenant: str, policy_id: str, lock: bool = False
) -> PolicyRow | None:
    query = (
        select(PolicyRow)
        .join(TenantRow, PolicyRow.tenant_id == TenantRow.id)
        .where(TenantRow.name == tenant, PolicyRow.policy_id == policy_id)
    )
    if lock:
        # Serialises exports of one policy on PostgreSQL; SQLite already holds the write lock.
        query = query.with_for_update(of=PolicyRow)
    return session.scalar(query)


def _policy_row(session: Session, tenant: str, policy_id: str, lock: bool = False) -> PolicyRow:
    row = _find_policy(session, tenant, policy_id, lock)
    if row is None:
        # The same answer whether the policy is missing or another tenant's.
        raise NotFound(f"policy {policy_id!r} not found; list your policies with list_policies")
    return row


def _find_state(session: Session, policy_pk: int, name: str) -> TrainingStateRow | None:
    return session.scalar(
        select(TrainingStateRow).where(
            TrainingStateRow.policy_pk == policy_pk, TrainingStateRow.name == name
        )
    )


def _find_revision_by_name(session: Session, policy_pk: int, name: str) -> RevisionRow | None:
    return session.scalar(
        select(RevisionRow).where(
            RevisionRow.policy_pk == policy_pk,
            RevisionRow.name == name,
            RevisionRow.deleted_at.is_(None),
        )
    )


def _find_revision(session: Session, policy_pk: int, number: int) -> RevisionRow | None:
    return session.scalar(
        select(RevisionRow).where(
            RevisionRow.policy_pk == policy_pk,
            RevisionRow.number == number,
            RevisionRow.deleted_at.is_(None),
        )
    )


def _revision_row(session: Session, policy: PolicyRow, number: int) -> RevisionRow:
    row = _find_revision(session, policy.id, number)
    if row is None:
        raise NotFound(
            f"revision {number} of policy {policy.policy_id!r} not found; "
            f"{_number_range(session, policy.id)}; list them with list_revisions"
        )
    return row


def _number_range(session: Session, policy_pk: int) -> str:
    low, high, count = session.execute(
        select(func.min(RevisionRow.number), func.max(RevisionRow.number), func.count()).where(
            RevisionRow.policy_pk == policy_pk, RevisionRow.deleted_at.is_(None)
        )
    ).one()
    if not count:
        return "the policy has no revisions yet"
    return f"existing revisions are numbered {low}..{high} ({count} revision(s))"


def _alias_map(session: Session, policy_pk: int) -> dict[str, int]:
    rows = session.execute(
        select(AliasRow.name, AliasRow.number)
        .where(AliasRow.policy_pk == policy_pk)
        .order_by(AliasRow.name)
    )
    return {name: number for name, number in rows}


def _resolve_row(session: Session, policy: PolicyRow, ref: str) -> RevisionRow:
    alias = session.get(AliasRow, (policy.id, ref))
    if alias is not None:
        return _revision_row(session, policy, alias.number)
    if ref.startswith("@"):
        if not ref[1:].isdigit():
            raise UserError(f"revision reference {ref!r} is not '@' and a number; use e.g. '@3'")
        return _revision_row(session, policy, int(ref[1:]))
    if ref.isdigit() and str(int(ref)) == ref:  # "000010" is a zero-padded step name
        return _revision_row(session, policy, int(ref))
    named = _find_revision_by_name(session, policy.id, ref)
    if named is not None:
        return named
    raise NotFound(
        f"revision {ref!r} not found on policy {policy.policy_id!r}: it is no alias "
        f"(aliases: {sorted(_alias_map(session, policy.id))}), no revision number and no "
        f"checkpoint name ({_number_range(session, policy.id)}); list them with list_revisions"
    )


def _ref_number(ref: str) -> int | None:
    """The revision number `ref` spells ("3" or "@3"), else None. Aliases start with a
    letter, so a number is never an alias; "000010" is a zero-padded step name."""
    if ref.startswith("@") and ref[1:].isdigit():
        return int(ref[1:])
    if ref.isdigit() and str(int(ref)) == ref:
        return int(ref)
    return None


def _point_alias(
    session: Session, policy_pk: int, alias: str, number: int, now: datetime
) -> int | None:
    """Point `alias` at `number`; return the number it pointed at before (None if new)."""
    row = session.get(AliasRow, (policy_pk, alias))
    if row is None:
        session.add(AliasRow(policy_pk=policy_pk, name=alias, number=number, updated_at=now))
        return None
    previous = row.number
    row.number, row.updated_at = number, now
    return previous


def _tombstone_revision(session: Session, policy: PolicyRow, name: str) -> None:
    row = _find_revision_by_name(session, policy.id, name)
    if row is None:
        raise _checkpoint_missing("sampler", name, policy.policy_id)
    holders = [alias for alias, number in _alias_map(session, policy.id).items()
               if number == row.number]  # fmt: skip
    if holders:
        raise AliasInUse(
            f"revision {row.number} ({name!r}) of policy {policy.policy_id!r} is what alias(es) "
            f"{', '.join(repr(alias) for alias in holders)} point at; move them with rollback "
            "or set_alias (or delete_alias) before deleting it"
        )
    # The row stays so its number is never reused; the name is freed for a new export.
    row.name, row.deleted_at, row.expires_at = None, utc_now(), None


def _checkpoint_union(tenant: str, policy_id: str | None) -> CompoundSelect[Any]:
    """One SELECT over training states and live revisions with the checkpoint columns."""
    states = (
        select(
            literal("training", String).label("kind"),
            PolicyRow.policy_id.label("policy_id"),
            TrainingStateRow.name.label("name"),
            TrainingStateRow.size_bytes.label("size_bytes"),
            TrainingStateRow.sha256.label("sha256"),
            TrainingStateRow.created_at.label("created_at"),
            TrainingStateRow.expires_at.label("expires_at"),
            TrainingStateRow.user_metadata.label("user_metadata"),
            cast(null(), Integer).label("revision_number"),
            TrainingStateRow.step.label("step"),
            TrainingStateRow.id.label("row_id"),
        )
        .join(PolicyRow, TrainingStateRow.policy_pk == PolicyRow.id)
        .join(TenantRow, PolicyRow.tenant_id == TenantRow.id)
        .where(TenantRow.name == tenant)
    )
    revisions = (
        select(
            literal("sampler", String),
            PolicyRow.policy_id,
            RevisionRow.name,
            RevisionRow.size_bytes,
            RevisionRow.sha256,
            RevisionRow.created_at,
            RevisionRow.expires_at,
            RevisionRow.user_metadata,
            RevisionRow.number,
            RevisionRow.step,
            RevisionRow.id,
        )
        .join(PolicyRow, RevisionRow.policy_pk == PolicyRow.id)
        .join(TenantRow, PolicyRow.tenant_id == TenantRow.id)
        .where(TenantRow.name == tenant, RevisionRow.deleted_at.is_(None))
    )
    if policy_id is not None:
        states = states.where(PolicyRow.policy_id == policy_id)
        revisions = revisions.where(PolicyRow.policy_id == policy_id)
    return union_all(states, revisions)


def _read_adapter_files(folder: Path) -> tuple[bytes, bytes]:
    try:
        return (folder / WEIGHTS_FILE).read_bytes(), (folder / CONFIG_FILE).read_bytes()
    except FileNotFoundError as error:
        raise MintError(f"revision files missing in {folder}: {error.filename}") from None


# -- records and errors ------------------------------------------------------------------


def _expiry(start: datetime, ttl_seconds: int | None) -> datetime | None:
    return None if ttl_seconds is None else start + timedelta(seconds=ttl_seconds)


def _check_kind(kind: str) -> None:
    if kind not in CHECKPOINT_KINDS:
        raise UserError(f"checkpoint kind {kind!r} is unknown; use one of {list(CHECKPOINT_KINDS)}")


def _copy_fields(
    source: RevisionRow, number: int, parent: int | None, step: int, now: datetime
) -> dict[str, Any]:
    """Column values for a new revision sharing `source`'s bytes and signature."""
    return {
        "policy_pk": source.policy_pk,
        "number": number,
        "name": f"rev-{number}",
        "sha256": source.sha256,
        "size_bytes": source.size_bytes,
        "blob_key": source.blob_key,
        "base_id": source.base_id,
        "base_fingerprint": source.base_fingerprint,
        "rank": source.rank,
        "alpha": source.alpha,
        "target_modules": list(source.target_modules),
        "parent_number": parent,
        "step": step,
        "created_at": now,
        "expires_at": None,
        "user_metadata": {},
        "manifest_extra": source.manifest_extra,
        "xxh3_128": source.xxh3_128,
    }


def _damaged(revision: RevisionRecord, folder: Path) -> MintError:
    return MintError(
        f"revision {revision.number} of policy {revision.policy_id!r}: files in {folder} do "
        f"not match sha256 {revision.sha256}; the blob store is damaged, restore it"
    )


def _manifest_of(revision: RevisionRecord) -> RevisionManifest:
    return RevisionManifest(
        base_id=revision.base_id,
        base_fingerprint=revision.base_fingerprint,
        policy_id=revision.policy_id,
        number=revision.number,
        parent_number=revision.parent_number,
        step=revision.step,
        created_at=revision.created_at,
        sha256=revision.sha256,
        size_bytes=revision.size_bytes,
        extra=dict(revision.manifest_extra),
    )


def _policy_exists(policy_id: str) -> Conflict:
    return Conflict(f"policy {policy_id!r} exists already; choose another policy id")


def _checkpoint_exists(kind: str, name: str, policy_id: str) -> Conflict:
    fix = "pass overwrite=True to replace it" if kind == "training" else "choose another name"
    return Conflict(
        f"{kind} checkpoint {name!r} exists already on policy {policy_id!r}; names are "
        f"unique per policy and kind, so {fix}"
    )


def _checkpoint_missing(kind: str, name: str, policy_id: str) -> NotFound:
    return NotFound(
        f"{kind} checkpoint {name!r} not found on policy {policy_id!r}; list existing "
        "checkpoints with list_checkpoints"
    )


def _policy_record(row: PolicyRow, tenant: str) -> PolicyRecord:
    return PolicyRecord(
        tenant=tenant,
        policy_id=row.policy_id,
        base_id=row.base_id,
        base_fingerprint=row.base_fingerprint,
        rank=row.rank,
        alpha=row.alpha,
        target_modules=tuple(row.target_modules),
        user_metadata=dict(row.user_metadata),
        created_at=row.created_at,
        last_request_at=row.last_request_at,
    )


def _revision_record(
    row: RevisionRow | Row[Any], tenant: str, policy_id: str, blobs: BlobStore
) -> RevisionRecord:
    """A record from an ORM row or from the resolve lookup's row (same column names)."""
    assert row.name is not None, "tombstoned revisions are never turned into records"
    return RevisionRecord(
        tenant=tenant,
        policy_id=policy_id,
        number=row.number,
        name=row.name,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        base_id=row.base_id,
        base_fingerprint=row.base_fingerprint,
        rank=row.rank,
        alpha=row.alpha,
        target_modules=tuple(row.target_modules),
        parent_number=row.parent_number,
        step=row.step,
        created_at=row.created_at,
        blob_path=str(blobs.path(row.blob_key)),
        manifest_extra=dict(row.manifest_extra or {}),
        xxh3_128=row.xxh3_128,
    )


def _state_checkpoint(row: TrainingStateRow, tenant: str, policy_id: str) -> CheckpointRecord:
    return CheckpointRecord(
        tenant=tenant,
        policy_id=policy_id,
        kind="training",
        name=row.name,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        created_at=row.created_at,
        expires_at=row.expires_at,
        user_metadata=dict(row.user_metadata),
        revision_number=None,
        step=row.step,
    )


def _union_checkpoint(row: Row[Any], tenant: str) -> CheckpointRecord:
    return CheckpointRecord(
        tenant=tenant,
        policy_id=row.policy_id,
        kind=row.kind,
        name=row.name,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        created_at=row.created_at,
        expires_at=row.expires_at,
        user_metadata=dict(row.user_metadata),
        revision_number=row.revision_number,
        step=row.step,
    )

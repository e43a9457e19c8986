"""The catalog's SQL tables (SQLAlchemy 2 ORM), kept portable between SQLite and PostgreSQL.

The database schema comes from the Alembic migrations in `migrations/versions/`, never from
`create_all`: a change here needs a new migration beside it, and a test checks that the
migrated schema equals this metadata.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime stored as naive UTC, since SQLite keeps no zone."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"catalog times must be timezone-aware, got naive {value!r}")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


def utc_now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class TenantRow(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: Most unfinished jobs the tenant may have at once; NULL means no limit.
    max_concurrent_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ApiKeyRow(Base):
    """An API key, kept only as the sha256 hex of the clear key."""

    __tablename__ = "api_keys"

    key_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: Space-separated scopes the key grants; NULL grants every scope.
    scopes: Mapped[str | None] = mapped_column(String(256), nullable=True)


class BaseRow(Base):
    """A base id and one fingerprint it was seen with (a re-provisioned base adds a row)."""

    __tablename__ = "bases"

    base_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(128), primary_key=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PolicyRow(Base):
    __tablename__ = "policies"
    __table_args__ = (
        # Unique per tenant, not globally: a global constraint would let one tenant learn,
        # through a Conflict, that another tenant uses a policy id.
        UniqueConstraint("tenant_id", "policy_id"),
        ForeignKeyConstraint(
            ["base_id", "base_fingerprint"], ["bases.base_id", "bases.fingerprint"]
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    policy_id: Mapped[str] = mapped_column(String(128))
    base_id: Mapped[str] = mapped_column(String(256))
    base_fingerprint: Mapped[str] = mapped_column(String(128))
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    user_metadata: Mapped[dict[str, str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_request_at: Mapped[datetime] = mapped_column(UTCDateTime())


class TrainingStateRow(Base):
    __tablename__ = "training_states"
    __table_args__ = (UniqueConstraint("policy_pk", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    policy_pk: Mapped[int] = mapped_column(ForeignKey("policies.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(256))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    blob_key: Mapped[str] = mapped_column(String(512))
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True, index=True)
    user_metadata: Mapped[dict[str, str]] = mapped_column(JSON)


class RevisionRow(Base):
    """A revision. A deleted revision stays as a tombstone (name NULL, `deleted_at` set) so
    its number is never handed out again and lineage through it stays readable."""

    __tablename__ = "revisions"
    __table_args__ = (
        UniqueConstraint("policy_pk", "number"),
        # NULL names (tombstones) never collide, in SQLite and PostgreSQL alike.
        UniqueConstraint("policy_pk", "name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    policy_pk: Mapped[int] = mapped_column(ForeignKey("policies.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    name: Mapped[str | None] = mapped_column(String(256), nullable=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    blob_key: Mapped[str] = mapped_column(String(512))
    base_id: Mapped[str] = mapped_column(String(256))
    base_fingerprint: Mapped[str] = mapped_column(String(128))
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    parent_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True, index=True)
    user_metadata: Mapped[dict[str, str]] = mapped_column(JSON)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: mint_revision.json fields this version does not know (migration 0002).
    manifest_extra: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: The load check over the adapter files (migration 0004); NULL for older revisions.
    xxh3_128: Mapped[str | None] = mapped_column(String(32), nullable=True)


class AliasRow(Base):
    __tablename__ = "aliases"
    __table_args__ = (
        ForeignKeyConstraint(["policy_pk", "number"], ["revisions.policy_pk", "revisions.number"]),
    )

    policy_pk: Mapped[int] = mapped_column(
        ForeignKey("policies.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    number: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

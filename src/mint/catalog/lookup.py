"""The hot read path: resolving (tenant, policy, alias or number) to a revision in one query.

Serving resolves a revision for every request that names an adapter, so this path avoids
everything a plain ORM session would spend: the statements are Core, built once at import
(SQLAlchemy caches their compiled form, and psycopg prepares them on the server after a few
uses), they join tenant, policy, alias and revision in one round trip, and they run outside
an explicit transaction (a single SELECT is atomic by itself, so BEGIN and COMMIT would only
add two more round trips on PostgreSQL). Nothing is cached in this process: an alias that
another process moves is seen by the very next lookup.

A lookup that finds nothing returns None; the caller then takes the slower path that says
precisely what is missing.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, literal, select, union_all
from sqlalchemy.engine import Row

from mint.catalog.schema import AliasRow, PolicyRow, RevisionRow, TenantRow

#: The revision columns a RevisionRecord is built from.
REVISION_COLUMNS = (
    RevisionRow.number,
    RevisionRow.name,
    RevisionRow.sha256,
    RevisionRow.size_bytes,
    RevisionRow.blob_key,
    RevisionRow.base_id,
    RevisionRow.base_fingerprint,
    RevisionRow.rank,
    RevisionRow.alpha,
    RevisionRow.target_modules,
    RevisionRow.parent_number,
    RevisionRow.step,
    RevisionRow.created_at,
    RevisionRow.manifest_extra,
    RevisionRow.xxh3_128,
)


def _owned_policy() -> Any:
    """The join from a tenant's name and a policy id to the policy's revisions."""
    return (
        select(*REVISION_COLUMNS)
        .select_from(TenantRow)
        .join(PolicyRow, PolicyRow.tenant_id == TenantRow.id)
        .join(RevisionRow, RevisionRow.policy_pk == PolicyRow.id)
        .where(
            TenantRow.name == bindparam("tenant"),
            PolicyRow.policy_id == bindparam("policy_id"),
            RevisionRow.deleted_at.is_(None),
        )
    )


_BY_NUMBER = _owned_policy().where(RevisionRow.number == bindparam("number"))

# An alias shadows a checkpoint name of the same spelling, so the alias branch ranks first.
_via_alias = (
    _owned_policy()
    .add_columns(literal(0).label("rank_of_match"))
    .join(
        AliasRow,
        (AliasRow.policy_pk == PolicyRow.id)
        & (AliasRow.name == bindparam("ref"))
        & (AliasRow.number == RevisionRow.number),
    )
)
_via_name = (
    _owned_policy()
    .add_columns(literal(1).label("rank_of_match"))
    .where(RevisionRow.name == bindparam("ref"))
)
_BY_ALIAS_OR_NAME = union_all(_via_alias, _via_name).order_by("rank_of_match").limit(1)


def revision_by_number(
    connection: Connection, tenant: str, policy_id: str, number: int
) -> Row[Any] | None:
    return connection.execute(
        _BY_NUMBER, {"tenant": tenant, "policy_id": policy_id, "number": number}
    ).first()


def revision_by_alias_or_name(
    connection: Connection, tenant: str, policy_id: str, ref: str
) -> Row[Any] | None:
    return connection.execute(
        _BY_ALIAS_OR_NAME, {"tenant": tenant, "policy_id": policy_id, "ref": ref}
    ).first()

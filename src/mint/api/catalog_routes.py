"""mint's own catalog routes under `/api/mint/v1/`: policies, revisions, aliases, rollback.

Every route acts for the caller's tenant (from its API key); another tenant's policy answers
404 exactly like a missing one. Listings page with opaque `page_token`s: pass a page's
`next_page_token` to get the next page; it is null on the last page.
"""

# No `from __future__ import annotations`: FastAPI must see the `Tenant` dependency itself,
# which is a parameter of these functions and so cannot be resolved from a string.
import logging
from typing import Any

from fastapi import FastAPI, Query
from pydantic import BaseModel, ConfigDict, Field

from mint.catalog.paging import MAX_PAGE_SIZE
from mint.catalog.records import PolicyRecord, RevisionRecord
from mint.catalog.store import LATEST
from mint.control.service import Service

log = logging.getLogger(__name__)

PREFIX = "/api/mint/v1"
DEFAULT_PAGE_SIZE = 100


class AliasTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    number: int = Field(ge=1, description="Revision number the alias points at.")


class Rollback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: int = Field(ge=1, description="Revision number to move the alias back to.")
    alias: str = Field(default=LATEST, description="Alias to move.")


def policy_json(record: PolicyRecord, aliases: dict[str, int] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "policy_id": record.policy_id,
        "base_id": record.base_id,
        "base_fingerprint": record.base_fingerprint,
        "rank": record.rank,
        "alpha": record.alpha,
        "target_modules": list(record.target_modules),
        "user_metadata": record.user_metadata,
        "created_at": record.created_at.isoformat(),
        "last_request_at": record.last_request_at.isoformat(),
    }
    if aliases is not None:
        body["aliases"] = aliases
    return body


def revision_json(record: RevisionRecord) -> dict[str, Any]:
    # blob_path is left out: where the server keeps bytes is not the caller's business.
    return {
        "policy_id": record.policy_id,
        "number": record.number,
        "name": record.name,
        "sha256": record.sha256,
        "size_bytes": record.size_bytes,
        "base_id": record.base_id,
        "base_fingerprint": record.base_fingerprint,
        "rank": record.rank,
        "alpha": record.alpha,
        "target_modules": list(record.target_modules),
        "parent_number": record.parent_number,
        "step": record.step,
        "created_at": record.created_at.isoformat(),
    }


def add_catalog_routes(app: FastAPI, service: Service, Tenant: Any) -> None:
    add_policy_routes(app, service, Tenant)
    add_revision_routes(app, service, Tenant)
    add_alias_routes(app, service, Tenant)


PageSize = Query(DEFAULT_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE)


def add_policy_routes(app: FastAPI, service: Service, Tenant: Any) -> None:
    catalog = service.catalog

    @app.get(f"{PREFIX}/policies")
    def list_policies(
        tenant: Tenant, page_size: int = PageSize, page_token: str | None = None
    ) -> dict[str, Any]:
        records, token = catalog.policy_page(tenant, page_size, page_token)
        return {"policies": [policy_json(r) for r in records], "next_page_token": token}

    @app.get(f"{PREFIX}/policies/{{policy_id}}")
    def show_policy(policy_id: str, tenant: Tenant) -> dict[str, Any]:
        record = catalog.get_policy(tenant, policy_id)
        return policy_json(record, catalog.aliases(tenant, policy_id))


def add_revision_routes(app: FastAPI, service: Service, Tenant: Any) -> None:
    catalog = service.catalog

    @app.get(f"{PREFIX}/policies/{{policy_id}}/revisions")
    def list_revisions(
        policy_id: str, tenant: Tenant, page_size: int = PageSize, page_token: str | None = None
    ) -> dict[str, Any]:
        records, token = catalog.revision_page(tenant, policy_id, page_size, page_token)
        return {"revisions": [revision_json(r) for r in records], "next_page_token": token}

    @app.get(f"{PREFIX}/policies/{{policy_id}}/revisions/{{ref}}")
    def show_revision(policy_id: str, ref: str, tenant: Tenant) -> dict[str, Any]:
        """`ref` is an alias, a revision number or a checkpoint name, as in `resolve`."""
        return revision_json(catalog.resolve(tenant, policy_id, ref))

    @app.delete(f"{PREFIX}/policies/{{policy_id}}/revisions/{{ref}}")
    def delete_revision(policy_id: str, ref: str, tenant: Tenant) -> dict[str, Any]:
        revision = catalog.resolve(tenant, policy_id, ref)
        catalog.delete_checkpoint(tenant, policy_id, "sampler", revision.name)
        return {"deleted": revision.number}


def add_alias_routes(app: FastAPI, service: Service, Tenant: Any) -> None:
    catalog = service.catalog

    @app.put(f"{PREFIX}/policies/{{policy_id}}/aliases/{{alias}}")
    def set_alias(policy_id: str, alias: str, body: AliasTarget, tenant: Tenant) -> dict[str, Any]:
        catalog.set_alias(tenant, policy_id, alias, body.number)
        return {"aliases": catalog.aliases(tenant, policy_id)}

    @app.delete(f"{PREFIX}/policies/{{policy_id}}/aliases/{{alias}}")
    def delete_alias(policy_id: str, alias: str, tenant: Tenant) -> dict[str, Any]:
        catalog.delete_alias(tenant, policy_id, alias)
        return {"aliases": catalog.aliases(tenant, policy_id)}

    @app.post(f"{PREFIX}/policies/{{policy_id}}/rollback")
    def rollback(policy_id: str, body: Rollback, tenant: Tenant) -> dict[str, Any]:
        catalog.rollback(tenant, policy_id, body.to, alias=body.alias)
        return {"aliases": catalog.aliases(tenant, policy_id)}

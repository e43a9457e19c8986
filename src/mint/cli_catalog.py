"""`mint revision ...`, `mint alias ...` and `mint gc`: the catalog from the command line.

Every command opens the catalog named by `Settings()` (MINT_HOME, MINT_CATALOG_URL) and acts
for `--tenant` (default `default`), exactly as the API would for that tenant's key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from mint.catalog.gc import DEFAULT_GRACE_S
from mint.config import Settings

if TYPE_CHECKING:  # imported when a command runs: they pull in torch and the ORM
    from mint.catalog.records import RevisionRecord
    from mint.catalog.store import Catalog

log = logging.getLogger(__name__)

revision_app = typer.Typer(no_args_is_help=True, help="Revisions of a policy.")
alias_app = typer.Typer(no_args_is_help=True, help="Aliases of a policy.")
# Paths and digests stay on one line; ids like "s:train:0" are not emoji codes.
console = Console(soft_wrap=True, emoji=False)

TenantOption = Annotated[str, typer.Option(help="Tenant that owns the policy.")]
RefArgument = Annotated[
    str, typer.Argument(help="Alias, revision number or checkpoint name (default: latest).")
]


def open_catalog(settings: Settings | None = None) -> Catalog:
    from mint.catalog.store import Catalog

    settings = settings or Settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    return Catalog(settings.catalog_url, settings.blob_store())


def print_revisions(catalog: Catalog, tenant: str, policy: str) -> None:
    """A table of the policy's revisions with the aliases pointing at each."""
    revisions, _ = catalog.list_revisions(tenant, policy, limit=1000, offset=0)
    by_number: dict[int, list[str]] = {}
    for alias, number in catalog.aliases(tenant, policy).items():
        by_number.setdefault(number, []).append(alias)
    table = Table("revision", "name", "step", "parent", "sha256", "aliases")
    for rev in revisions:
        table.add_row(
            str(rev.number),
            rev.name,
            str(rev.step),
            "-" if rev.parent_number is None else str(rev.parent_number),
            rev.sha256[:12],
            ", ".join(sorted(by_number.get(rev.number, []))),
        )
    console.print(table)


@revision_app.command("list")
def revision_list(policy: str, tenant: TenantOption = "default") -> None:
    """Revisions of POLICY."""
    print_revisions(open_catalog(), tenant, policy)


@revision_app.command("show")
def revision_show(
    policy: str, ref: RefArgument = "latest", tenant: TenantOption = "default"
) -> None:
    """One revision of POLICY: identity, lineage, signature and where its files are."""
    catalog = open_catalog()
    revision = catalog.resolve(tenant, policy, ref)
    aliases = sorted(a for a, n in catalog.aliases(tenant, policy).items() if n == revision.number)
    console.print(describe(revision, aliases), highlight=False)


def describe(revision: RevisionRecord, aliases: list[str]) -> str:
    parent = "-" if revision.parent_number is None else str(revision.parent_number)
    return "\n".join(
        [
            f"revision {revision.number} ({revision.name}) of policy {revision.policy_id}",
            f"sha256 {revision.sha256}, {revision.size_bytes} bytes",
            f"base {revision.base_id} ({revision.base_fingerprint[:12]})",
            f"rank {revision.rank}, alpha {revision.alpha:g}, "
            f"targets {','.join(revision.target_modules)}",
            f"step {revision.step}, parent {parent}, created {revision.created_at.isoformat()}",
            f"aliases {', '.join(aliases) or '-'}",
            f"files {revision.blob_path}",
        ]
    )


@revision_app.command("export")
def revision_export(
    policy: str,
    destination: Annotated[Path, typer.Argument(help="New folder to write the PEFT files to.")],
    ref: Annotated[str, typer.Option(help="Alias, number or name to export.")] = "latest",
    tenant: TenantOption = "default",
) -> None:
    """Copy a revision's PEFT folder (checked against its sha256) to DESTINATION."""
    revision = open_catalog().export_folder(tenant, policy, ref, destination)
    console.print(f"revision {revision.number} of {policy} -> {destination}", highlight=False)


@revision_app.command("import")
def revision_import(
    folder: Annotated[Path, typer.Argument(help="PEFT adapter folder to import.")],
    policy: Annotated[str, typer.Option(help="Policy to add the revision to.")],
    name: Annotated[str | None, typer.Option(help="Checkpoint name for it.")] = None,
    step: Annotated[int, typer.Option(help="Training step to record.")] = 0,
    max_rank: Annotated[int | None, typer.Option(help="Refuse ranks above this.")] = None,
    tenant: TenantOption = "default",
) -> None:
    """Validate an outside PEFT adapter against POLICY's base and add it as a revision.

    The policy's base is loaded (from the bases folder) to check module shapes.
    """
    from mint.models.base import load_base

    settings = Settings()
    catalog = open_catalog(settings)
    record = catalog.get_policy(tenant, policy)
    base = load_base(record.base_id, settings.bases_dir, settings.device, settings.dtype)
    revision = catalog.import_revision(
        tenant, policy, folder, base, name=name, step=step, max_rank=max_rank
    )
    console.print(
        f"imported {folder} as revision {revision.number} ({revision.name}) of {policy}, "
        f"sha256 {revision.sha256[:12]}",
        highlight=False,
    )


@revision_app.command("delete")
def revision_delete(policy: str, ref: str, tenant: TenantOption = "default") -> None:
    """Delete revision REF (number or name) of POLICY; its number is never reused."""
    catalog = open_catalog()
    revision = catalog.resolve(tenant, policy, ref)
    catalog.delete_checkpoint(tenant, policy, "sampler", revision.name)
    console.print(f"revision {revision.number} ({revision.name}) of {policy} deleted")


@alias_app.command("set")
def alias_set(policy: str, alias: str, number: int, tenant: TenantOption = "default") -> None:
    """Point ALIAS of POLICY at revision NUMBER (created if new)."""
    open_catalog().set_alias(tenant, policy, alias, number)
    console.print(f"{policy}: {alias} -> revision {number}", highlight=False)


@alias_app.command("delete")
def alias_delete(policy: str, alias: str, tenant: TenantOption = "default") -> None:
    """Delete ALIAS of POLICY (`latest` stays; move it with rollback)."""
    open_catalog().delete_alias(tenant, policy, alias)
    console.print(f"{policy}: alias {alias} deleted", highlight=False)


def gc(
    grace_s: Annotated[
        float, typer.Option(help="Leave blobs and staging entries younger than this.")
    ] = DEFAULT_GRACE_S,
) -> None:
    """Delete expired checkpoints, unreferenced blobs and leftovers of crashed exports."""
    report = open_catalog().collect_garbage(grace_s=grace_s)
    console.print(
        f"expired: {len(report.expired_states)} training states, "
        f"{len(report.expired_revisions)} revisions ({len(report.kept_by_alias)} kept by "
        f"aliases); deleted {len(report.deleted_blobs)} blobs and "
        f"{len(report.staging_removed)} staging entries; {report.bytes_freed} bytes freed",
        highlight=False,
    )
    if report.missing_blobs:
        console.print(
            f"[red]records name {len(report.missing_blobs)} missing blobs[/red]: "
            f"{', '.join(report.missing_blobs)}; restore the blob store from a backup"
        )

"""The `mint` command line: serve, provision bases, manage tenants and the catalog, run recipes."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mint.cli_catalog import alias_app, gc, print_revisions, revision_app
from mint.config import Settings
from mint.errors import MintError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
models_app = typer.Typer(no_args_is_help=True, help="Base models.")
tenant_app = typer.Typer(no_args_is_help=True, help="Tenants and their API keys.")
policy_app = typer.Typer(no_args_is_help=True, help="Policies in the catalog.")
app.add_typer(models_app, name="models")
app.add_typer(tenant_app, name="tenant")
app.add_typer(policy_app, name="policy")
app.add_typer(revision_app, name="revision")
app.add_typer(alias_app, name="alias")
app.command("gc")(gc)
console = Console(emoji=False)  # ids like "s:train:0" are not emoji codes

TenantOption = Annotated[str, typer.Option(help="Tenant that owns the policy.")]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _catalog():  # type: ignore[no-untyped-def]
    from mint.catalog.store import Catalog

    settings = Settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    return Catalog(settings.catalog_url, settings.blob_store())


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    preload: Annotated[list[str] | None, typer.Option(help="Base to load at start.")] = None,
    verbose: bool = False,
) -> None:
    """Run the mint server (Tinker API under /api/v1) on the embedded default."""
    from mint.api.server import serve as run_server

    _setup_logging(verbose)
    run_server(Settings(preload_bases=list(preload or [])), host, port)


@models_app.command("pull")
def models_pull(
    name: str,
    hub_cache: Annotated[
        bool,
        typer.Option(
            help="Also write the tokenizer and config into the Hugging Face hub cache "
            "(HF_HUB_CACHE or HF_HOME/hub), so clients that look the tokenizer up by model "
            "id find it offline."
        ),
    ] = True,
) -> None:
    """Provision a base offline (e.g. smollm2-135m-instruct) and print its fingerprint."""
    from mint.models.hub_cache import publish_to_hub_cache
    from mint.models.provision import ensure_base, read_base_record

    _setup_logging()
    folder = ensure_base(name, Settings().bases_dir)
    record = read_base_record(folder)
    console.print(f"{record['public_id']} at {folder}\nfingerprint {record['fingerprint']}")
    if hub_cache:
        snapshot = publish_to_hub_cache(folder, record["public_id"], record["fingerprint"])
        console.print(f"tokenizer and config in the hub cache at {snapshot}", highlight=False)


@models_app.command("list")
def models_list() -> None:
    """Known bases and whether they are provisioned here."""
    from mint.models.provision import BASE_RECORD, base_dir
    from mint.models.registry import KNOWN_BASES

    table = Table("public id", "short name", "source", "provisioned")
    bases_dir = Settings().bases_dir
    for spec in KNOWN_BASES:
        ready = (base_dir(bases_dir, spec) / BASE_RECORD).exists()
        table.add_row(spec.public_id, spec.short_name, spec.source, "yes" if ready else "no")
    console.print(table)


@tenant_app.command("add")
def tenant_add(
    name: str,
    key: Annotated[
        str | None, typer.Option(help="API key to issue (tml-...); default: a new random one.")
    ] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option(help="Limit the key to this scope (repeatable): train, sample."),
    ] = None,
    max_concurrent_jobs: Annotated[
        int | None, typer.Option(help="Also set the tenant's quota of unfinished jobs.")
    ] = None,
) -> None:
    """Create tenant NAME (if new) and issue it an API key; only the key's hash is stored."""
    import secrets

    from mint.api.auth import check_scopes
    from mint.catalog.rules import API_KEY_PREFIX

    scopes = check_scopes(scope) if scope else None
    catalog = _catalog()
    catalog.ensure_tenant(name)
    issued = key or API_KEY_PREFIX + secrets.token_urlsafe(32)
    catalog.add_api_key(name, issued, scopes)
    if max_concurrent_jobs is not None:
        catalog.set_job_quota(name, max_concurrent_jobs)
    granted = ", ".join(scopes) if scopes else "all scopes"
    console.print(f"tenant {name}: key added ({granted})", highlight=False)
    if key is None:
        # Printed once: the catalog keeps only its sha256, so it cannot be shown again.
        console.print(f"API key (shown only now): {issued}", highlight=False, soft_wrap=True)


@tenant_app.command("quota")
def tenant_quota(
    name: str,
    max_concurrent_jobs: Annotated[
        int | None, typer.Option(help="Most unfinished jobs at once (at least 1).")
    ] = None,
    unlimited: Annotated[bool, typer.Option(help="Lift the limit.")] = False,
) -> None:
    """Set or lift tenant NAME's quota of unfinished jobs (over it: retryable 429)."""
    if (max_concurrent_jobs is None) == (not unlimited):
        raise typer.BadParameter("give either --max-concurrent-jobs N or --unlimited")
    _catalog().set_job_quota(name, None if unlimited else max_concurrent_jobs)
    shown = "no limit" if unlimited else f"{max_concurrent_jobs} unfinished jobs"
    console.print(f"tenant {name}: {shown}", highlight=False)


@tenant_app.command("list")
def tenant_list() -> None:
    """Tenants, their job quotas and the scopes of their active keys."""
    table = Table("tenant", "job quota", "active keys", "scopes per key")
    for tenant in _catalog().list_tenants():
        scopes = "; ".join(s or "all" for s in tenant.key_scopes) or "-"
        quota = "-" if tenant.max_concurrent_jobs is None else str(tenant.max_concurrent_jobs)
        table.add_row(tenant.name, quota, str(len(tenant.key_scopes)), scopes)
    console.print(table)


@tenant_app.command("revoke")
def tenant_revoke(key: str) -> None:
    """Revoke an API key."""
    _catalog().revoke_api_key(key)
    console.print("key revoked")


@policy_app.command("list")
def policy_list(tenant: TenantOption = "default") -> None:
    """Policies of a tenant with their latest revision."""
    catalog = _catalog()
    policies, total = catalog.list_policies(tenant, limit=1000, offset=0)
    table = Table("policy", "base", "rank", "aliases", title=f"{total} policies of {tenant}")
    for policy in policies:
        aliases = catalog.aliases(tenant, policy.policy_id)
        shown = ", ".join(f"{a}->{n}" for a, n in sorted(aliases.items()))
        table.add_row(policy.policy_id, policy.base_id, str(policy.rank), shown)
    console.print(table)


@policy_app.command("show")
def policy_show(policy: str, tenant: TenantOption = "default") -> None:
    """A policy's record, revisions and aliases."""
    catalog = _catalog()
    record = catalog.get_policy(tenant, policy)
    console.print(
        f"policy {record.policy_id} on {record.base_id} ({record.base_fingerprint[:12]}), "
        f"rank {record.rank}, alpha {record.alpha:g}, targets {','.join(record.target_modules)}"
    )
    print_revisions(catalog, tenant, policy)


@policy_app.command("rollback")
def policy_rollback(
    policy: str,
    to: Annotated[int, typer.Option("--to", help="Revision number to move the alias to.")],
    alias: Annotated[str, typer.Option(help="Alias to move.")] = "latest",
    tenant: TenantOption = "default",
) -> None:
    """Move POLICY's alias (default `latest`) back to revision --to."""
    catalog = _catalog()
    catalog.rollback(tenant, policy, to, alias=alias)
    console.print(f"{policy}: {alias} -> revision {to}")


BENCHMARKS = ("trainer", "catalog", "serve")


@app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(BENCHMARKS)}.")],
) -> None:
    """Run a benchmark (`mint bench NAME --help`); it prints its figures and writes JSON."""
    import importlib

    if name not in BENCHMARKS:
        raise typer.BadParameter(f"unknown benchmark {name!r}; choose from {BENCHMARKS}")
    _setup_logging()
    # A benchmark prints its own figures; the engine's and catalog's per-event INFO lines
    # (one per cold load, migration, policy) would bury them. Its progress lines stay.
    for noisy in ("mint.serve", "mint.control", "mint.catalog", "mint.train", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    module = importlib.import_module(f"mint.bench.{name}")
    raise typer.Exit(module.main(list(ctx.args)))


@app.command("rl", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def rl(ctx: typer.Context) -> None:
    """Run the GRPO arithmetic recipe (see `mint rl --help-recipe`)."""
    from mint.recipes.grpo import main as recipe_main

    raise typer.Exit(recipe_main(list(ctx.args)))


def main() -> None:
    try:
        app()
    except MintError as error:
        console.print(f"[red]error:[/red] {error.message}")
        sys.exit(2)


if __name__ == "__main__":
    main()

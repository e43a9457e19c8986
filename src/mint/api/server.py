"""Start the HTTP server: settings, tenants from configuration, service, uvicorn."""

from __future__ import annotations

import json
import logging
import os

from mint.catalog.store import Catalog
from mint.config import Settings
from mint.errors import UserError

log = logging.getLogger(__name__)


def configured_keys(settings: Settings) -> list[tuple[str, str]]:
    """(tenant, key) pairs from `tenants.json` in the data directory and `MINT_API_KEYS`.

    `tenants.json` looks like `{"tenants": {"alice": ["tml-..."]}}`; `MINT_API_KEYS` is
    `tenant=key,tenant=key`.
    """
    pairs: list[tuple[str, str]] = []
    if settings.tenants_file.exists():
        try:
            document = json.loads(settings.tenants_file.read_text())
            for tenant, keys in document.get("tenants", {}).items():
                pairs.extend((tenant, key) for key in keys)
        except (json.JSONDecodeError, AttributeError) as error:
            raise UserError(
                f"{settings.tenants_file} is not valid: {error}; expected "
                '{"tenants": {"NAME": ["tml-..."]}}'
            ) from None
    for item in filter(None, os.environ.get("MINT_API_KEYS", "").split(",")):
        tenant, sep, key = item.strip().partition("=")
        if not sep:
            raise UserError(f"MINT_API_KEYS entry {item!r} must look like tenant=tml-...")
        pairs.append((tenant, key))
    return pairs


def seed_tenants(catalog: Catalog, settings: Settings) -> None:
    for tenant, key in configured_keys(settings):
        catalog.ensure_tenant(tenant)
        catalog.add_api_key(tenant, key)


def serve(settings: Settings, host: str, port: int) -> None:
    import torch
    import uvicorn

    from mint.api.app import create_app
    from mint.control.service import Service

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    service = Service(settings)
    seed_tenants(service.catalog, settings)
    for name in settings.preload_bases:
        service.worker(name)
    app = create_app(service)
    log.info("mint serving on http://%s:%d (data in %s)", host, port, settings.home)
    try:
        # On SIGTERM, requests still open get this long to finish; then they are cancelled
        # (a stream's rows leave the batch) and the process exits. Without a bound a stream
        # whose client vanished kept the server alive until its last token.
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=75,
                    timeout_graceful_shutdown=settings.shutdown_grace_s)  # fmt: skip
    finally:
        service.close()

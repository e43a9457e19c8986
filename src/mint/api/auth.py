"""Who a request speaks for, and whether its API key may make it.

A key belongs to one tenant and grants scopes. Routes that change training state need
`train`, routes that sample need `sample`; reads, futures and sessions need only a valid key
(a tenant still sees only its own things, and anything else answers as not found). The
scope check runs before any lookup, so a refusal says nothing about what exists.
"""

from __future__ import annotations

from mint.catalog.records import KeyGrant
from mint.catalog.rules import key_hint
from mint.catalog.store import Catalog
from mint.errors import AuthenticationFailed, MissingScope, UserError

#: Every scope a key can grant, with what it allows.
SCOPES: dict[str, str] = {
    "train": "create, train, save, load and delete policies and checkpoints",
    "sample": "create sampling sessions and sample (Tinker and OpenAI-compatible routes)",
}

_TINKER = "/api/v1"
_CATALOG = "/api/mint/v1/policies/{policy_id}"
#: (method, route path) -> the scope it needs; routes not listed need only a valid key.
REQUIRED_SCOPE: dict[tuple[str, str], str] = {
    **{
        ("POST", f"{_TINKER}/{name}"): "train"
        for name in (
            "create_model",
            "forward",
            "forward_backward",
            "optim_step",
            "save_weights",
            "save_weights_for_sampler",
            "save_weights_external",
            "load_weights",
            "copy_weights",
        )
    },
    ("DELETE", f"{_TINKER}/training_runs/{{run_id}}/checkpoints/{{segment}}/{{name}}"): "train",
    ("PUT", f"{_TINKER}/training_runs/{{run_id}}/checkpoints/{{segment}}/{{name}}/ttl"): "train",
    ("DELETE", f"{_CATALOG}/revisions/{{ref}}"): "train",
    ("PUT", f"{_CATALOG}/aliases/{{alias}}"): "train",
    ("DELETE", f"{_CATALOG}/aliases/{{alias}}"): "train",
    ("POST", f"{_CATALOG}/rollback"): "train",
    ("POST", f"{_TINKER}/create_sampling_session"): "sample",
    ("POST", f"{_TINKER}/asample"): "sample",
    ("POST", "/v1/completions"): "sample",
    ("POST", "/v1/chat/completions"): "sample",
}


def check_scopes(scopes: list[str]) -> list[str]:
    """The scopes, validated; an unknown one is refused with the list of known ones."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise UserError(
            f"unknown scope(s) {', '.join(unknown)}; a key can grant "
            + ", ".join(f"{name} ({what})" for name, what in SCOPES.items())
        )
    return sorted(set(scopes))


def key_from_headers(x_api_key: str | None, authorization: str | None) -> str:
    # OpenAI clients send the key as `Authorization: Bearer tml-...`.
    if not x_api_key and authorization and authorization.lower().startswith("bearer "):
        x_api_key = authorization[len("bearer ") :].strip()
    if not x_api_key:
        raise AuthenticationFailed(
            "missing X-API-Key header (or Authorization: Bearer); set TINKER_API_KEY to a "
            "key made with `mint tenant add NAME`"
        )
    return x_api_key


def authorize(catalog: Catalog, key: str, method: str, route_path: str) -> KeyGrant:
    """The grant of `key` if it may call `method route_path`; else a 401 or 403 error."""
    grant = catalog.key_grant(key)
    if grant is None:
        raise AuthenticationFailed(
            "unknown API key; make one with `mint tenant add NAME` on the server and set "
            "TINKER_API_KEY to it"
        )
    needed = REQUIRED_SCOPE.get((method, route_path))
    if needed is not None and not grant.allows(needed):
        held = ", ".join(sorted(grant.scopes or ())) or "none"
        raise MissingScope(
            f"API key {key_hint(key)} lacks scope {needed!r}, which {method} {route_path} "
            f"needs (it has: {held}); use a key issued with `mint tenant add "
            f"{grant.tenant} --scope {needed}`"
        )
    return grant

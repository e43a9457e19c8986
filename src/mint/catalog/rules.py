"""What the catalog accepts as names, metadata, TTLs and pages: each rule stated once.

Every check raises `UserError` worded as value, rule, fix, so the API answers bad input the
same way whichever route it came through.
"""

from __future__ import annotations

import re

from mint.errors import UserError

MAX_NAME_LENGTH = 200
MAX_PAGE = 10_000
#: Unnamed exports are called `rev-<number>`; a user name of that form could collide later.
RESERVED_REVISION_NAME = re.compile(r"^rev-\d+$")
ALIAS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
API_KEY_PREFIX = "tml-"


def check_identifier(value: str, what: str) -> None:
    """Tenant names, policy ids and checkpoint names: 1..200 printable characters, no '/'."""
    if not isinstance(value, str) or not value:
        raise UserError(f"{what} {value!r} is empty; give a non-empty string")
    if len(value) > MAX_NAME_LENGTH:
        raise UserError(
            f"{what} {value[:40]!r}... has {len(value)} characters; use at most {MAX_NAME_LENGTH}"
        )
    if "/" in value or not value.isprintable() or value.strip() != value:
        raise UserError(
            f"{what} {value!r} contains '/', a control character or surrounding spaces; "
            "these would break checkpoint paths, so remove them"
        )


def check_checkpoint_name(name: str, kind: str) -> None:
    check_identifier(name, f"{kind} checkpoint name")
    if name.startswith("@"):
        raise UserError(
            f"checkpoint name {name!r} starts with '@', which marks revision numbers; drop the '@'"
        )
    if kind == "sampler" and name.isdigit() and str(int(name)) == name:
        # "3" always means revision number 3 in `Catalog.resolve`; zero-padded step names
        # such as "000010" (as Tinker recipes write them) stay names.
        raise UserError(
            f"checkpoint name {name!r} is a plain number, which refers to revision {name}; "
            "pick a name that is not a number (zero-padded steps like '000010' are fine)"
        )
    if kind == "sampler" and RESERVED_REVISION_NAME.match(name):
        raise UserError(
            f"checkpoint name {name!r} has the form rev-<number>, reserved for unnamed "
            "exports; pick another name or pass no name"
        )


def check_alias_name(alias: str) -> None:
    if not isinstance(alias, str) or not ALIAS_NAME.match(alias):
        raise UserError(
            f"alias {alias!r} is not a valid alias name; use a letter followed by up to 63 "
            "letters, digits, '_', '.' or '-'"
        )


def check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """A copy of `metadata` (None -> {}), refusing anything but string keys and values."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise UserError(f"user_metadata {metadata!r} is not a mapping; pass a dict[str, str]")
    bad = [key for key, value in metadata.items() if not (isinstance(key, str) and key)
           or not isinstance(value, str)]  # fmt: skip
    if bad:
        raise UserError(
            f"user_metadata entries {bad!r} are not non-empty string keys with string "
            "values; convert them to strings"
        )
    return dict(metadata)


def check_ttl(ttl_seconds: int | None) -> None:
    if ttl_seconds is None:
        return
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds < 1:
        raise UserError(
            f"ttl_seconds {ttl_seconds!r} is not a positive whole number of seconds; "
            "pass seconds >= 1, or None to keep the checkpoint forever"
        )


def check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"step {step!r} is not a non-negative integer; pass the optimizer step")


def check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise UserError(f"limit {limit} is out of range; use a limit from 1 to {MAX_PAGE}")
    if offset < 0:
        raise UserError(f"offset {offset} is negative; use an offset >= 0")


def check_api_key(key: str) -> None:
    if not isinstance(key, str) or not key.startswith(API_KEY_PREFIX) or key == API_KEY_PREFIX:
        shown = key_hint(key) if isinstance(key, str) else repr(key)
        raise UserError(
            f"API key {shown} does not start with {API_KEY_PREFIX!r} followed by a secret; "
            f"issue keys of the form {API_KEY_PREFIX}<random>"
        )


def key_hint(key: str) -> str:
    """A key shown in messages: enough to recognise it, never the secret itself."""
    return f"{key[:8]}..." if len(key) > 8 else "'<short key>'"

"""Opaque page tokens for catalog listings.

A token is URL-safe base64 of a small JSON object naming where the next page starts (a
keyset position, not an offset, so a page costs the same wherever it is and rows added
meanwhile never shift it). Callers must treat tokens as opaque; a damaged one is a
`UserError` that says to start again without a token.
"""

from __future__ import annotations

import base64
import binascii
import json

from mint.errors import UserError

MAX_PAGE_SIZE = 1000


def encode_token(kind: str, after: int) -> str:
    body = json.dumps({"k": kind, "a": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(body).decode().rstrip("=")


def decode_token(token: str | None, kind: str) -> int | None:
    """The keyset position in `token` (None for the first page)."""
    if token is None or token == "":
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if body["k"] != kind or not isinstance(body["a"], int):
            raise ValueError(body)
        return int(body["a"])
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise UserError(
            f"page_token {token[:40]!r} is not a {kind} page token from this listing; "
            "pass the next_page_token of the previous page, or none for the first page"
        ) from None


def check_page_size(page_size: int) -> None:
    if isinstance(page_size, bool) or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise UserError(
            f"page_size {page_size!r} is out of range; use a page size from 1 to {MAX_PAGE_SIZE}"
        )

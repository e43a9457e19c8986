"""`mint tenant ...`: keys shown once and stored hashed, scopes, quotas, revocation."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from typer.testing import CliRunner

from mint.catalog.store import Catalog
from mint.cli import app
from mint.errors import NotFound, UserError


def _run(home: Path, *args: str) -> str:
    result = CliRunner().invoke(app, ["tenant", *args], env={"MINT_HOME": str(home)})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def _catalog(home: Path) -> Catalog:
    return Catalog(f"sqlite:///{home / 'catalog.db'}", home / "blobs")


def test_generated_key_is_shown_once_and_only_its_hash_is_stored(tmp_path: Path) -> None:
    output = _run(tmp_path, "add", "alice", "--scope", "sample")
    key = re.search(r"API key \(shown only now\): (tml-\S+)", output)
    assert key is not None, output
    plain = key.group(1)
    grant = _catalog(tmp_path).key_grant(plain)
    assert grant is not None and grant.tenant == "alice"
    assert grant.scopes == frozenset({"sample"}) and not grant.allows("train")
    # The database with its write-ahead log: everything the catalog wrote to disk.
    database = b"".join(path.read_bytes() for path in tmp_path.glob("catalog.db*"))
    assert plain.encode() not in database
    assert hashlib.sha256(plain.encode()).hexdigest().encode() in database

    listed = _run(tmp_path, "list")
    assert "alice" in listed and "sample" in listed
    assert plain not in listed


def test_given_key_scopes_quota_and_revocation(tmp_path: Path) -> None:
    output = _run(tmp_path, "add", "bob", "--key", "tml-bob-1", "--max-concurrent-jobs", "3")
    assert "shown only now" not in output and "all scopes" in output
    catalog = _catalog(tmp_path)
    grant = catalog.key_grant("tml-bob-1")
    assert grant is not None
    assert (grant.scopes, grant.max_concurrent_jobs) == (None, 3)
    assert grant.allows("train") and grant.allows("sample")

    _run(tmp_path, "quota", "bob", "--unlimited")
    assert catalog.job_quota("bob") is None
    _run(tmp_path, "quota", "bob", "--max-concurrent-jobs", "2")
    assert catalog.job_quota("bob") == 2

    _run(tmp_path, "revoke", "tml-bob-1")
    assert catalog.key_grant("tml-bob-1") is None


def test_bad_scope_and_quota_are_refused_with_the_fix(tmp_path: Path) -> None:
    try:
        _run(tmp_path, "add", "carol", "--scope", "admin")
    except UserError as error:
        assert "unknown scope(s) admin" in error.message and "train (" in error.message
    else:
        raise AssertionError("scope 'admin' was accepted")
    _run(tmp_path, "add", "carol", "--key", "tml-carol")
    try:
        _run(tmp_path, "quota", "carol", "--max-concurrent-jobs", "0")
    except UserError as error:
        assert "must be at least 1" in error.message
    else:
        raise AssertionError("a quota of 0 was accepted")
    try:
        _run(tmp_path, "quota", "nobody", "--max-concurrent-jobs", "1")
    except NotFound as error:
        assert "tenant 'nobody' is not known" in error.message
    else:
        raise AssertionError("a quota for an unknown tenant was accepted")

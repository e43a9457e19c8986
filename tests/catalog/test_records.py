"""Tenants and keys, policies, training states, the checkpoint view, TTLs and tenancy."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from tests.catalog.conftest import BASE_ID, FINGERPRINT, SIGNATURE, make_tensors, sqlite_only

from mint.catalog import Catalog
from mint.errors import Conflict, NotFound, UnknownBase, UserError
from mint.models.lora import LoraSignature

KEY = "tml-" + "s3cr3t" * 6


def test_sqlite_runs_in_wal_with_foreign_keys(catalog: Catalog) -> None:
    sqlite_only(catalog)
    with catalog.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_api_keys_are_stored_hashed(catalog: Catalog, tmp_path: Path) -> None:
    catalog.add_api_key("acme", KEY)
    catalog.add_api_key("acme", KEY)  # idempotent for the same tenant
    assert catalog.tenant_for_key(KEY) == "acme"
    assert catalog.tenant_for_key("tml-unknown") is None
    with catalog.engine.connect() as connection:
        stored = [tuple(row) for row in connection.execute(text("SELECT * FROM api_keys"))]
    assert [row[0] for row in stored] == [hashlib.sha256(KEY.encode()).hexdigest()]
    assert KEY not in repr(stored)
    if catalog.engine.dialect.name == "sqlite":  # nor anywhere in its files
        files = b"".join(p.read_bytes() for p in tmp_path.glob("catalog.db*"))
        assert KEY.encode() not in files
    with pytest.raises(Conflict, match=r"API key tml-s3cr\.\.\. is already issued"):
        catalog.add_api_key("globex", KEY)
    catalog.revoke_api_key(KEY)
    assert catalog.tenant_for_key(KEY) is None
    with pytest.raises(NotFound, match=r"API key tml-unkn\.\.\. is not known"):
        catalog.revoke_api_key("tml-unknown")
    with pytest.raises(UserError) as caught:
        catalog.add_api_key("acme", "sk-abcdefgh")
    assert str(caught.value) == (
        "API key sk-abcde... does not start with 'tml-' followed by a secret; issue keys of "
        "the form tml-<random>"
    )
    with pytest.raises(NotFound, match="tenant 'nobody' is not known; create it with"):
        catalog.add_api_key("nobody", "tml-other")


def test_policy_record_and_listing(catalog: Catalog) -> None:
    policy = catalog.get_policy("acme", "pol")
    assert (policy.tenant, policy.base_id, policy.base_fingerprint) == (
        "acme",
        BASE_ID,
        FINGERPRINT,
    )
    assert (policy.rank, policy.alpha, policy.target_modules) == (2, 4.0, ("q_proj", "v_proj"))
    assert policy.user_metadata == {"team": "rl"}
    assert policy.created_at.tzinfo is not None
    for index in range(3):
        catalog.create_policy("acme", f"more-{index}", BASE_ID, FINGERPRINT, SIGNATURE)
    page, total = catalog.list_policies("acme", limit=2, offset=1)
    assert total == 4 and [p.policy_id for p in page] == ["more-0", "more-1"]
    with pytest.raises(Conflict, match="policy 'pol' exists already; choose another"):
        catalog.create_policy("acme", "pol", BASE_ID, FINGERPRINT, SIGNATURE)
    catalog.touch_policy("acme", "pol")
    assert catalog.get_policy("acme", "pol").last_request_at > policy.last_request_at
    with pytest.raises(UserError, match="limit 0 is out of range"):
        catalog.list_policies("acme", limit=0)


def test_policies_need_a_recorded_base(catalog: Catalog) -> None:
    with pytest.raises(UnknownBase) as caught:
        catalog.create_policy("acme", "p2", BASE_ID, "cd" * 32, LoraSignature(2, 4.0))
    assert str(caught.value) == (
        "base 'mint-test/tiny-llama' with fingerprint cdcdcdcdcdcd... is not recorded "
        "(recorded fingerprints for it: ['abababababab']); load the base, which records it, "
        "or call record_base"
    )


def test_training_state_round_trip(catalog: Catalog) -> None:
    payload = bytes(range(256)) * 10
    record = catalog.save_training_state("acme", "pol", "step-5", payload, step=5)
    assert (record.kind, record.name, record.step, record.revision_number) == (
        "training", "step-5", 5, None
    )  # fmt: skip
    assert (record.size_bytes, record.sha256) == (2560, hashlib.sha256(payload).hexdigest())
    assert (catalog.blobs.root / "states" / record.sha256).read_bytes() == payload
    assert catalog.read_training_state("acme", "pol", "step-5") == payload
    with pytest.raises(Conflict) as caught:
        catalog.save_training_state("acme", "pol", "step-5", b"other", step=6)
    assert str(caught.value) == (
        "training checkpoint 'step-5' exists already on policy 'pol'; names are unique per "
        "policy and kind, so pass overwrite=True to replace it"
    )
    replaced = catalog.save_training_state("acme", "pol", "step-5", b"other", 6, overwrite=True)
    assert replaced.step == 6
    assert catalog.read_training_state("acme", "pol", "step-5") == b"other"
    assert catalog.list_checkpoints("acme", "pol")[1] == 1
    with pytest.raises(NotFound, match="training checkpoint 'nope' not found on policy 'pol'"):
        catalog.read_training_state("acme", "pol", "nope")


def test_checkpoint_view_lists_both_kinds_newest_last(catalog: Catalog) -> None:
    catalog.save_training_state("acme", "pol", "s1", b"one", step=1)
    catalog.export_revision("acme", "pol", "s1", make_tensors(0), step=1)  # same name, other kind
    catalog.save_training_state("acme", "pol", "s2", b"two", step=2, user_metadata={"k": "v"})
    records, total = catalog.list_checkpoints("acme")
    assert total == 3
    assert [(r.kind, r.name, r.revision_number) for r in records] == [
        ("training", "s1", None),
        ("sampler", "s1", 1),
        ("training", "s2", None),
    ]
    assert records[2].user_metadata == {"k": "v"} and records[1].created_at.tzinfo is not None
    page, total = catalog.list_checkpoints("acme", "pol", limit=1, offset=2)
    assert total == 3 and [r.name for r in page] == ["s2"]
    catalog.delete_checkpoint("acme", "pol", "training", "s1")
    assert [r.kind for r in catalog.list_checkpoints("acme")[0]] == ["sampler", "training"]
    with pytest.raises(UserError, match="checkpoint kind 'weights' is unknown"):
        catalog.delete_checkpoint("acme", "pol", "weights", "s2")


def test_ttl_sets_expires_at(catalog: Catalog) -> None:
    state = catalog.save_training_state("acme", "pol", "s", b"x", step=0, ttl_seconds=3600)
    assert state.expires_at == state.created_at + timedelta(seconds=3600)
    revision = catalog.export_revision("acme", "pol", None, make_tensors(0), 0, ttl_seconds=60)
    listed = {r.kind: r for r in catalog.list_checkpoints("acme", "pol")[0]}
    assert listed["sampler"].expires_at == revision.created_at + timedelta(seconds=60)
    catalog.set_checkpoint_ttl("acme", "pol", "training", "s", None)
    catalog.set_checkpoint_ttl("acme", "pol", "sampler", revision.name, 7200)
    listed = {r.kind: r for r in catalog.list_checkpoints("acme", "pol")[0]}
    assert listed["training"].expires_at is None
    assert listed["sampler"].expires_at > revision.created_at + timedelta(seconds=7199)
    with pytest.raises(UserError, match="ttl_seconds 0 is not a positive whole number"):
        catalog.set_checkpoint_ttl("acme", "pol", "training", "s", 0)


def test_another_tenants_policy_is_not_found(catalog: Catalog) -> None:
    catalog.export_revision("acme", "pol", "final", make_tensors(0), step=0)
    catalog.save_training_state("acme", "pol", "s", b"x", step=0)
    with pytest.raises(NotFound) as missing:
        catalog.get_policy("acme", "no-such-policy")
    expected = str(missing.value).replace("no-such-policy", "pol")
    attempts = [
        lambda: catalog.get_policy("globex", "pol"),
        lambda: catalog.resolve("globex", "pol"),
        lambda: catalog.get_revision("globex", "pol", 1),
        lambda: catalog.list_revisions("globex", "pol"),
        lambda: catalog.aliases("globex", "pol"),
        lambda: catalog.read_training_state("globex", "pol", "s"),
        lambda: catalog.save_training_state("globex", "pol", "t", b"y", step=0),
        lambda: catalog.export_revision("globex", "pol", None, make_tensors(1), step=0),
        lambda: catalog.rollback("globex", "pol", 1),
        lambda: catalog.delete_checkpoint("globex", "pol", "sampler", "final"),
        lambda: catalog.set_checkpoint_ttl("globex", "pol", "training", "s", 60),
        lambda: catalog.list_checkpoints("globex", "pol"),
        lambda: catalog.touch_policy("globex", "pol"),
    ]
    for attempt in attempts:
        with pytest.raises(NotFound) as caught:
            attempt()
        assert str(caught.value) == expected
    assert catalog.list_policies("globex") == ([], 0)
    assert catalog.list_checkpoints("globex") == ([], 0)
    # The same policy id is free for the other tenant: ids are scoped, existence never leaks.
    catalog.create_policy("globex", "pol", BASE_ID, FINGERPRINT, SIGNATURE)
    assert catalog.list_revisions("globex", "pol") == ([], 0)
    assert len(catalog.list_checkpoints("acme")[0]) == 2


def test_bad_metadata_and_steps_are_refused(catalog: Catalog) -> None:
    with pytest.raises(UserError, match=r"user_metadata entries \['n'\] are not"):
        catalog.save_training_state("acme", "pol", "s", b"x", 0, user_metadata={"n": 1})
    with pytest.raises(UserError, match="step -1 is not a non-negative integer"):
        catalog.save_training_state("acme", "pol", "s", b"x", -1)
    assert catalog.list_checkpoints("acme") == ([], 0)


def test_records_survive_reopening(catalog: Catalog, catalog_url: str, tmp_path: Path) -> None:
    revision = catalog.export_revision("acme", "pol", None, make_tensors(0), step=2)
    catalog.close()
    reopened = Catalog(catalog_url, tmp_path / "blobs")
    try:
        assert reopened.resolve("acme", "pol") == revision
        tensors = reopened.read_revision_tensors(revision)
        assert sorted(tensors) == sorted(make_tensors(0))
    finally:
        reopened.close()


def test_newest_checkpoints_of_many_policies_in_one_query(catalog: Catalog) -> None:
    from sqlalchemy import event

    policies = ["pol", "p1", "p2", "p3", "empty"]
    for policy in policies[1:]:
        catalog.create_policy("acme", policy, BASE_ID, FINGERPRINT, SIGNATURE)
    for index, policy in enumerate(policies[:-1]):
        catalog.save_training_state("acme", policy, "s-old", b"old" + bytes([index]), 1)
        catalog.save_training_state("acme", policy, "s-new", b"new" + bytes([index]), 2)
        catalog.export_revision("acme", policy, "r-old", make_tensors(index), 1)
        catalog.export_revision("acme", policy, "r-new", make_tensors(index + 10), 2)
    catalog.create_policy("globex", "pol", BASE_ID, FINGERPRINT, SIGNATURE)
    catalog.save_training_state("globex", "pol", "theirs", b"globex", 9)
    statements: list[str] = []

    def count(*args: object) -> None:
        statements.append(str(args[2]))

    event.listen(catalog.engine, "before_cursor_execute", count)
    try:
        newest = catalog.last_checkpoints("acme", policies)
    finally:
        event.remove(catalog.engine, "before_cursor_execute", count)
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 1
    assert newest["empty"] == {}
    for policy in policies[:-1]:
        assert {kind: record.name for kind, record in newest[policy].items()} == {
            "training": "s-new",
            "sampler": "r-new",
        }
        assert newest[policy]["sampler"].revision_number == 2
        assert all(record.policy_id == policy for record in newest[policy].values())
    assert catalog.last_checkpoints("acme", []) == {}

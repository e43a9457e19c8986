"""The /api/mint/v1 catalog routes through FastAPI's TestClient on a Service over a tmp home."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from tests.catalog.conftest import BASE_ID, FINGERPRINT, SIGNATURE, make_tensors

from mint.api.app import create_app
from mint.config import Settings
from mint.control.service import Service

KEYS = {"acme": "tml-acme-key", "globex": "tml-globex-key"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    service = Service(Settings(home=tmp_path, device="cpu", dtype="float32"))
    catalog = service.catalog
    for tenant, key in KEYS.items():
        catalog.ensure_tenant(tenant)
        catalog.add_api_key(tenant, key)
    catalog.record_base(BASE_ID, FINGERPRINT)
    for policy in ("p1", "p2", "p3"):
        catalog.create_policy("acme", policy, BASE_ID, FINGERPRINT, SIGNATURE)
    for seed in range(5):
        catalog.export_revision("acme", "p1", f"step-{seed:03d}", make_tensors(seed), seed)
    catalog.create_policy("globex", "theirs", BASE_ID, FINGERPRINT, SIGNATURE)
    with TestClient(create_app(service), headers={"X-API-Key": KEYS["acme"]}) as test_client:
        yield test_client
    service.close()


def test_policies_page_with_opaque_tokens(client: TestClient) -> None:
    first = client.get("/api/mint/v1/policies", params={"page_size": 2}).json()
    assert [p["policy_id"] for p in first["policies"]] == ["p1", "p2"]
    second = client.get(
        "/api/mint/v1/policies", params={"page_size": 2, "page_token": first["next_page_token"]}
    ).json()
    assert [p["policy_id"] for p in second["policies"]] == ["p3"]
    assert second["next_page_token"] is None
    shown = client.get("/api/mint/v1/policies/p1").json()
    assert (shown["rank"], shown["aliases"], shown["target_modules"]) == (
        2, {"latest": 5}, ["q_proj", "v_proj"],
    )  # fmt: skip


def test_revisions_page_show_and_delete(client: TestClient) -> None:
    numbers, token = [], None
    while True:
        params = {"page_size": 2} | ({"page_token": token} if token else {})
        page = client.get("/api/mint/v1/policies/p1/revisions", params=params).json()
        numbers.append([r["number"] for r in page["revisions"]])
        token = page["next_page_token"]
        if token is None:
            break
    assert numbers == [[1, 2], [3, 4], [5]]
    shown = client.get("/api/mint/v1/policies/p1/revisions/latest").json()
    assert (shown["number"], shown["name"], shown["parent_number"]) == (5, "step-004", 4)
    assert "blob_path" not in shown
    assert client.get("/api/mint/v1/policies/p1/revisions/step-001").json()["number"] == 2
    assert client.delete("/api/mint/v1/policies/p1/revisions/2").json() == {"deleted": 2}
    refused = client.delete("/api/mint/v1/policies/p1/revisions/5")
    assert (refused.status_code, refused.json()["code"]) == (409, "alias_in_use")
    page = client.get("/api/mint/v1/policies/p1/revisions").json()
    assert [r["number"] for r in page["revisions"]] == [1, 3, 4, 5]


def test_aliases_and_rollback(client: TestClient) -> None:
    put = client.put("/api/mint/v1/policies/p1/aliases/prod", json={"number": 3})
    assert put.json() == {"aliases": {"latest": 5, "prod": 3}}
    back = client.post("/api/mint/v1/policies/p1/rollback", json={"to": 2})
    assert back.json() == {"aliases": {"latest": 2, "prod": 3}}
    assert client.get("/api/mint/v1/policies/p1/revisions/latest").json()["number"] == 2
    gone = client.delete("/api/mint/v1/policies/p1/aliases/prod")
    assert gone.json() == {"aliases": {"latest": 2}}
    missing = client.put("/api/mint/v1/policies/p1/aliases/prod", json={"number": 99})
    assert missing.status_code == 404
    assert "revision 99 of policy 'p1' not found" in missing.json()["error"]


def test_other_tenants_and_bad_input(client: TestClient) -> None:
    for method, path in (
        ("GET", "/api/mint/v1/policies/theirs"),
        ("GET", "/api/mint/v1/policies/theirs/revisions"),
        ("PUT", "/api/mint/v1/policies/theirs/aliases/prod"),
        ("POST", "/api/mint/v1/policies/theirs/rollback"),
    ):
        body = {"number": 1} if method == "PUT" else {"to": 1}
        answer = client.request(method, path, json=body if method != "GET" else None)
        assert (answer.status_code, answer.json()["code"]) == (404, "not_found"), path
    listed = client.get("/api/mint/v1/policies").json()["policies"]
    assert "theirs" not in [p["policy_id"] for p in listed]
    bad = client.get("/api/mint/v1/policies", params={"page_token": "garbage"})
    assert bad.status_code == 400
    assert bad.json()["error"].startswith("page_token 'garbage' is not a policies page token")
    token = client.get("/api/mint/v1/policies", params={"page_size": 1}).json()
    wrong = client.get(  # a policies token handed to the revisions listing
        "/api/mint/v1/policies/p1/revisions", params={"page_token": token["next_page_token"]}
    )
    assert wrong.status_code == 400
    unauthenticated = client.get("/api/mint/v1/policies", headers={"X-API-Key": "tml-nope"})
    assert unauthenticated.status_code == 401

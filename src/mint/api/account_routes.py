"""Tinker's account-level REST routes: projects, session search, traces, audit, usage, copies,
checkpoint archives, and the signed download links some of them answer with.

Download links carry a token signed with a key kept in the data directory (HMAC-SHA256 over
tenant, object and expiry), so a plain GET without an API key works until the link expires,
as the SDK's docs promise for trace exports and archives.
"""

import asyncio
import base64
import hashlib
import hmac
import io
import json
import os
import secrets
import tarfile
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import Field

from mint.api.wire import Lenient
from mint.catalog.records import CheckpointRecord, PolicyRecord
from mint.control.activity import session_of
from mint.control.copies import copy_checkpoint, copy_policy_id
from mint.control.paths import (
    KIND_BY_SEGMENT,
    SEGMENT_BY_KIND,
    CheckpointPath,
    parse_checkpoint_path,
)
from mint.control.service import Service
from mint.control.sessions import Session
from mint.errors import MalformedRequest, NotFound, Unsupported

LINK_LIFETIME_S = 3600
MAX_USAGE_WINDOW = timedelta(days=14)
DEFAULT_PROJECT = "default"
PAGE = 1000  # catalog listing page size


class ProjectBody(Lenient):
    project_id: str = Field(min_length=1, max_length=200)


class SearchBody(Lenient):
    session_id: str | None = None
    project_ids: list[str] | None = None
    user_metadata: dict[str, str] = Field(default_factory=dict)
    display_name: str | None = None
    statuses: list[dict[str, Any]] | None = None
    limit: int = Field(default=50, ge=1, le=200)
    cursor: dict[str, Any] | None = None


class CopyBody(Lenient):
    source_path: str
    session_id: str | None = None
    model_seq_id: int | None = Field(default=None, ge=0)
    destination_project_id: str | None = None
    ttl_seconds: int | None = None


class Links:
    """Signed, expiring download links for one tenant's objects."""

    def __init__(self, key_file: Path) -> None:
        if not key_file.exists():
            key_file.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(secrets.token_bytes(32))
        self._key = key_file.read_bytes()

    def sign(self, tenant: str, what: str, ref: str, expires: float) -> str:
        payload = json.dumps({"t": tenant, "w": what, "r": ref, "e": int(expires)}).encode()
        body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
        return f"{body}.{self._mac(body)}"

    def verify(self, token: str) -> tuple[str, str, str]:
        """(tenant, what, ref) of a valid, unexpired token; anything else reads as missing."""
        body, _, mac = token.partition(".")
        if not hmac.compare_digest(mac, self._mac(body)):
            raise NotFound("no such download; ask the API for a fresh link")
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        if claims["e"] < time.time():
            raise NotFound("this download link has expired; ask the API for a fresh link")
        return str(claims["t"]), str(claims["w"]), str(claims["r"])

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()


def _iso(moment: float | datetime) -> str:
    if isinstance(moment, float | int):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.isoformat()


def _status(session: Session) -> dict[str, Any]:
    if not session.finished:
        return {"type": "active"}
    if session.finish_reason == "reaped":
        return {"type": "cancelled", "detail": "no heartbeat; the server reaped the session"}
    return {"type": "client_finished", "reason": {"type": session.finish_reason or "success"}}


def _matches(session: Session, query: SearchBody) -> bool:
    named = query.session_id is None and query.display_name is None
    if query.session_id is not None and session.session_id == query.session_id:
        named = True
    if query.display_name is not None and session.display_name:
        words = query.display_name.lower().split()
        named = named or all(w in session.display_name.lower() for w in words)
    project = session.project_id or DEFAULT_PROJECT
    if query.project_ids is not None and project not in query.project_ids:
        return False
    if any(session.user_metadata.get(k) != v for k, v in query.user_metadata.items()):
        return False
    if query.statuses is not None:
        wanted = {str(s.get("type")) for s in query.statuses}
        if _status(session)["type"] not in wanted:
            return False
    return named


def all_checkpoints(
    service: Service, tenant: str, policy_id: str | None = None
) -> list[CheckpointRecord]:
    """Every checkpoint of the tenant (or of one policy), read in catalog-sized pages."""
    records: list[CheckpointRecord] = []
    while True:
        page, total = service.catalog.list_checkpoints(tenant, policy_id, PAGE, len(records))
        records.extend(page)
        if not page or len(records) >= total:
            return records


def all_policies(service: Service, tenant: str) -> list[PolicyRecord]:
    policies: list[PolicyRecord] = []
    while True:
        page, total = service.catalog.list_policies(tenant, PAGE, len(policies))
        policies.extend(page)
        if not page or len(policies) >= total:
            return policies


def _checkpoints_by_session(service: Service, tenant: str) -> dict[str, tuple[int, int]]:
    """Session id -> (checkpoint count, stored bytes) over the tenant's checkpoints."""
    totals: dict[str, tuple[int, int]] = {}
    for record in all_checkpoints(service, tenant):
        count, size = totals.get(session_of(record.policy_id), (0, 0))
        totals[session_of(record.policy_id)] = (count + 1, size + record.size_bytes)
    return totals


def _hour(moment: float) -> datetime:
    return datetime.fromtimestamp(moment, UTC).replace(minute=0, second=0, microsecond=0)


def _parse_moment(name: str, value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise MalformedRequest(f"{name}={value!r} is not an ISO 8601 date-time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _archive(service: Service, tenant: str, path: CheckpointPath) -> bytes:
    """A tar of the checkpoint: the PEFT adapter folder, or the training-state file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        if path.kind == "training":
            payload = service.catalog.read_training_state(tenant, path.policy_id, path.name)
            info = tarfile.TarInfo(f"{path.name}/training_state.bin")
            info.size, info.mtime = len(payload), int(time.time())
            tar.addfile(info, io.BytesIO(payload))
        else:
            with tempfile.TemporaryDirectory(prefix="mint-archive-") as scratch:
                folder = Path(scratch) / path.name
                service.catalog.export_folder(tenant, path.policy_id, path.name, folder)
                tar.add(folder, arcname=path.name)
    return buffer.getvalue()


def add_account_routes(app: FastAPI, service: Service, Tenant: Any) -> None:
    links = Links(service.settings.home / "download.key")
    _add_session_routes(app, service, Tenant, links)
    _add_usage_routes(app, service, Tenant)
    _add_checkpoint_routes(app, service, Tenant, links)

    @app.get("/api/mint/v1/downloads/{token}", response_model=None)
    async def download(token: str) -> Response:
        try:
            tenant, what, ref = links.verify(token)
        except (ValueError, KeyError, TypeError):  # a token that is not even well-formed
            raise NotFound("no such download; ask the API for a fresh link") from None
        if what == "trace":
            trace = service.activity.chrome_trace(tenant, ref)
            return Response(json.dumps(trace), media_type="application/json")
        run, segment, name = ref.split("/", 2)
        body = await asyncio.to_thread(
            _archive, service, tenant, CheckpointPath(run, KIND_BY_SEGMENT[segment], name)
        )
        return Response(body, media_type="application/x-tar")


def _add_session_routes(app: FastAPI, service: Service, Tenant: Any, links: Links) -> None:
    @app.put("/api/v1/sessions/{session_id}/project")
    async def assign_project(session_id: str, body: ProjectBody, tenant: Tenant) -> dict[str, Any]:
        service.sessions.get(tenant, session_id).project_id = body.project_id
        return {}

    @app.post("/api/v1/sessions/search")
    async def search(body: SearchBody, tenant: Tenant) -> dict[str, Any]:
        stored = _checkpoints_by_session(service, tenant)
        found = sorted(
            (s for s in service.sessions.owned_by(tenant) if _matches(s, body)),
            key=lambda s: (s.created_at, s.session_id),
            reverse=True,  # newest first
        )
        if body.cursor is not None:
            last = (
                _parse_moment("cursor", str(body.cursor.get("last_created_at"))).timestamp(),
                str(body.cursor.get("last_session_id")),
            )
            found = [s for s in found if (s.created_at, s.session_id) < last]
        page = found[: body.limit]
        summaries = [
            {
                "session_id": s.session_id,
                "created_at": _iso(s.created_at),
                "owner": s.tenant,
                "project_id": s.project_id or DEFAULT_PROJECT,
                "status": _status(s),
                "checkpoints_count": stored.get(s.session_id, (0, 0))[0],
                "checkpoint_storage_bytes": stored.get(s.session_id, (0, 0))[1],
                "display_name": s.display_name,
                "user_metadata": {k: str(v) for k, v in s.user_metadata.items()} or None,
            }
            for s in page
        ]
        more = len(found) > body.limit
        cursor = (
            {"last_created_at": _iso(page[-1].created_at), "last_session_id": page[-1].session_id}
            if more
            else None
        )
        return {"sessions": summaries, "next_cursor": cursor}

    @app.get("/api/v1/sessions/{session_id}/trace_export")
    async def trace_export(session_id: str, request: Request, tenant: Tenant) -> dict[str, Any]:
        service.sessions.get(tenant, session_id)
        token = links.sign(tenant, "trace", session_id, time.time() + LINK_LIFETIME_S)
        url = str(request.url_for("download", token=token))
        return {"status": "ready", "url": url}


def _add_usage_routes(app: FastAPI, service: Service, Tenant: Any) -> None:
    @app.get("/api/v1/audit")
    async def audit(
        tenant: Tenant, event_type: str = "all", day: str | None = None
    ) -> dict[str, Any]:
        entries = service.activity.audit_entries(tenant, day)
        if event_type == "checkpoints":
            entries = [e for e in entries if str(e["event"]).startswith("checkpoint_")]
        elif event_type != "all":
            entries = [e for e in entries if str(e["event"]).startswith(event_type.rstrip("s"))]
        return {"entries": [{k: v for k, v in e.items() if k != "tenant"} for e in entries]}

    @app.get("/api/v1/billing/usage/events")
    async def usage_events(tenant: Tenant, starting_on: str, ending_before: str) -> dict[str, Any]:
        start = _parse_moment("starting_on", starting_on)
        end = _parse_moment("ending_before", ending_before)
        if not start < end <= start + MAX_USAGE_WINDOW:
            raise MalformedRequest(
                "ending_before must be after starting_on and at most 14 days later"
            )
        return _usage(service, tenant, start, end)

    @app.get("/api/v1/billing/usage/checkpoints/current")
    async def storage_usage(tenant: Tenant) -> dict[str, Any]:
        groups: dict[str | None, list[int]] = {}
        records = all_checkpoints(service, tenant)
        projects = {s.session_id: s.project_id for s in service.sessions.owned_by(tenant)}
        for record in records:
            group = groups.setdefault(projects.get(session_of(record.policy_id)), [0, 0])
            group[0] += 1
            group[1] += record.size_bytes
        data = [
            {
                "project_id": project,
                "org_user_urn": tenant,
                "checkpoint_count": count,
                "size_bytes": size,
                "size_gigabytes": size / 1e9,
                "estimated_monthly_cost_usd": None,  # self-hosted: no rate card
            }
            for project, (count, size) in groups.items()
        ]
        return {"effective_rate_usd_per_gigabyte_month": None, "data": data}


def _usage(service: Service, tenant: str, start: datetime, end: datetime) -> dict[str, Any]:
    """Hourly token and checkpoint counts, measured by this server (no prices)."""
    buckets: dict[tuple[datetime, str, str, str], int] = {}

    def add(hour: datetime, session: str, base: str, kind: str, amount: int) -> None:
        if amount and start <= hour < end:
            key = (hour, session, base, kind)
            buckets[key] = buckets.get(key, 0) + amount

    for span in service.activity.spans(tenant):
        if not span.ok or span.finished_at is None:
            continue
        hour = _hour(span.finished_at)
        add(hour, span.session_id, span.base_model, "training", span.train_tokens)
        add(hour, span.session_id, span.base_model, "sampling_prefill", span.prompt_tokens)
        add(hour, span.session_id, span.base_model, "sampling_sample", span.sampled_tokens)
    records = all_checkpoints(service, tenant)
    bases = {p.policy_id: p.base_id for p in all_policies(service, tenant)}
    for record in records:
        moment = record.created_at.replace(tzinfo=record.created_at.tzinfo or UTC)
        add(
            _hour(moment.timestamp()), session_of(record.policy_id),
            bases.get(record.policy_id, ""), "checkpoint", 1,
        )  # fmt: skip
    data = []
    for (hour, session, base, kind), amount in sorted(buckets.items(), key=lambda i: i[0]):
        info: dict[str, Any] = {"type": kind}
        if kind == "checkpoint":
            info["count"] = amount
        else:
            info["token_count"] = amount
        if kind == "sampling_prefill":
            info["cached"] = False
        data.append(
            {
                "bucket_start": hour.isoformat(),
                "bucket_end": (hour + timedelta(hours=1)).isoformat(),
                "base_model": base or None,
                "user_id": tenant,
                "session_id": session,
                "event_info": info,
            }
        )
    return {"data": data, "sessions": {}}


def _add_checkpoint_routes(app: FastAPI, service: Service, Tenant: Any, links: Links) -> None:
    @app.post("/api/v1/copy_weights")
    async def copy_weights(body: CopyBody, tenant: Tenant) -> dict[str, Any]:
        if body.destination_project_id is None and (
            body.session_id is None or body.model_seq_id is None
        ):
            raise MalformedRequest(
                "copy_weights needs destination_project_id, or session_id and model_seq_id"
            )
        if body.session_id is not None:
            service.sessions.get(tenant, body.session_id)
        new_id = copy_policy_id(body.session_id, body.model_seq_id)
        source_policy = service.catalog.get_policy(
            tenant, parse_checkpoint_path(body.source_path).policy_id
        )
        base = (await asyncio.to_thread(service.worker, source_policy.base_id)).base
        copied = await asyncio.to_thread(
            copy_checkpoint, service.catalog, tenant, body.source_path, new_id, base,
            body.ttl_seconds, body.destination_project_id,
        )  # fmt: skip
        return {"tinker_path": str(copied)}

    @app.get("/api/v1/training_runs/{run_id}/checkpoints/{segment}/{name}/archive")
    async def archive_url(
        run_id: str, segment: str, name: str, request: Request, tenant: Tenant
    ) -> dict[str, Any]:
        if segment not in KIND_BY_SEGMENT:
            raise MalformedRequest(
                f"checkpoint segment {segment!r} is unknown; use weights or sampler_weights"
            )
        kind = KIND_BY_SEGMENT[segment]
        records = all_checkpoints(service, tenant, run_id)
        if not any(r.kind == kind and r.name == name for r in records):
            raise NotFound(f"no checkpoint {segment}/{name} in training run {run_id!r}")
        expires = time.time() + LINK_LIFETIME_S
        token = links.sign(
            tenant, "checkpoint", f"{run_id}/{SEGMENT_BY_KIND[kind]}/{name}", expires
        )
        return {"url": str(request.url_for("download", token=token)), "expires": _iso(expires)}

    for method in ("post", "delete"):

        @getattr(app, method)("/api/v1/training_runs/{run_id}/checkpoints/{segment}/{name}/publish")
        async def publish(run_id: str, segment: str, name: str, tenant: Tenant) -> dict[str, Any]:
            raise Unsupported(
                "publishing checkpoints is not supported: every mint checkpoint is visible "
                "only to its own tenant; to hand one over, download it with "
                "get_checkpoint_archive_url or `mint revision export`"
            )

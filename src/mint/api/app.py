"""The FastAPI application: Tinker's `/api/v1` routes over the control plane.

Submitting calls answer at once with a request id; `retrieve_future` long-polls the job.
Every route except health and capabilities needs an `X-API-Key` that maps to a tenant and
grants the route's scope (`mint.api.auth`).
"""

import asyncio
import logging
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from mint import __version__
from mint.api import wire
from mint.api.account_routes import add_account_routes
from mint.api.auth import authorize, key_from_headers
from mint.api.catalog_routes import add_catalog_routes
from mint.api.json_codec import decode_forward_backward_json
from mint.api.metrics import add_metrics_route
from mint.api.openai_routes import add_openai_routes, openai_error
from mint.api.proto import decode_forward_backward
from mint.catalog.records import CheckpointRecord, PolicyRecord
from mint.control.futures import JobFuture, JsonResult, ProtoResult, Result
from mint.control.paths import SEGMENT_BY_KIND, CheckpointPath, parse_checkpoint_path
from mint.control.service import Service
from mint.errors import (
    Busy,
    MalformedRequest,
    MintError,
    NotFound,
    Unsupported,
    UserError,
    http_status_for,
)
from mint.models.lora import ATTENTION_TARGETS, MLP_TARGETS
from mint.serve.types import SampleRequest, SamplingParams

log = logging.getLogger(__name__)

PROTO = "application/x-protobuf"
TINKER_PREFIX = "/api/v1/"
OPENAI_PREFIX = "/v1/"
DEFAULT_MAX_TOKENS = 128


def error_body(error: MintError) -> dict[str, Any]:
    return {"error": error.message, "code": error.code, "category": error.category}


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="mint", version=__version__)
    app.state.service = service

    @app.exception_handler(MintError)
    async def on_mint_error(request: Request, error: MintError) -> JSONResponse:
        if request.url.path.startswith(OPENAI_PREFIX):  # e.g. a missing key or scope
            return openai_error(error)
        headers = {"x-should-retry": "false"}
        if isinstance(error, Busy):  # back-pressure and job quotas: retry after a pause
            headers = {
                "x-should-retry": "true",
                "Retry-After": str(max(1, round(error.retry_after_s))),
            }
        status = http_status_for(error)
        if status == 409 and request.url.path.startswith(TINKER_PREFIX):
            # The tinker SDK retries every 409 for five minutes whatever the headers say, so
            # a conflict that retrying cannot fix (an alias still points at the revision)
            # answers 400 on the Tinker routes; the body keeps the precise error code.
            status = 400
        return JSONResponse(error_body(error), status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def on_bad_body(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors()
        )
        if request.url.path.startswith(OPENAI_PREFIX):
            return openai_error(
                MalformedRequest(
                    f"request body does not match the OpenAI API: {problems}; fix those "
                    "fields (see the API reference of this endpoint)"
                ),
                param=_first_field(error),
            )
        wrapped = MalformedRequest(f"request body does not match the Tinker API: {problems}")
        return JSONResponse(error_body(wrapped), 400, headers={"x-should-retry": "false"})

    def tenant_of(
        request: Request,
        x_api_key: Annotated[str | None, Header()] = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> str:
        key = key_from_headers(x_api_key, authorization)
        route = request.scope.get("route")
        path = getattr(route, "path", request.url.path)
        tenant = authorize(service.catalog, key, request.method, path).tenant
        request.state.tenant = tenant  # for the audit trail
        return tenant

    Tenant = Annotated[str, Depends(tenant_of)]
    add_audit_trail(app, service)
    add_bootstrap_routes(app, service, Tenant)
    add_training_routes(app, service, Tenant)
    add_sampling_routes(app, service, Tenant)
    add_future_routes(app, service, Tenant)
    add_rest_routes(app, service, Tenant)
    add_account_routes(app, service, Tenant)
    add_catalog_routes(app, service, Tenant)
    add_openai_routes(app, service, Tenant)
    add_metrics_route(app, service)
    return app


def _first_field(error: RequestValidationError) -> str | None:
    """The body field the first problem is about (OpenAI's `param`), if it names one."""
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        if item["type"] == "json_invalid":  # its location is a character offset
            return None
        if loc[:1] == ["body"] and len(loc) > 1:
            return ".".join(loc[1:])
    return None


def submitted(future: JobFuture, **extra: Any) -> dict[str, Any]:
    return {"request_id": future.request_id, **extra}


#: Audit event names (`<resource>_<action>`) of the state-changing Tinker calls.
AUDIT_EVENTS = {
    "create_session": "session_create",
    "create_model": "training_run_create",
    "load_weights": "checkpoint_read",
    "save_weights": "checkpoint_create",
    "save_weights_for_sampler": "checkpoint_create",
    "optim_step": "training_run_update",
    "create_sampling_session": "sampling_session_create",
    "copy_weights": "checkpoint_copy",
}


def _audit_event(method: str, path: str) -> str | None:
    name = path.removeprefix(TINKER_PREFIX)
    if name in AUDIT_EVENTS:
        return AUDIT_EVENTS[name]
    if "/checkpoints/" in name:
        if method == "DELETE" and not name.endswith("/publish"):
            return "checkpoint_delete"
        if name.endswith("/ttl"):
            return "checkpoint_ttl_set"
    if name.endswith("/project"):
        return "project_session_assign"
    if name.endswith("/finish"):
        return "session_finish"
    return None


def add_audit_trail(app: FastAPI, service: Service) -> None:
    """Append one audit entry per successful state-changing Tinker call of a known tenant."""
    app.add_middleware(AuditTrail, service=service)


class AuditTrail:
    """The audit trail as a plain ASGI middleware rather than `@app.middleware("http")`:
    that wrapper hands the routes a receive channel that never reports the client's
    disconnect, and the OpenAI routes rely on it to cancel the requests of a client that
    went away."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_noting_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, send_noting_status)
        event = _audit_event(scope["method"], scope["path"])
        tenant = scope.get("state", {}).get("tenant")  # set by the key check (request.state)
        if event and tenant and status < 400:
            details: dict[str, object] = {"method": scope["method"], "path": scope["path"]}
            await asyncio.to_thread(self.service.activity.audit, tenant, event, details)


def _track(
    service: Service, future: JobFuture, subject: str, base: str | None = None, **counts: Any
) -> None:
    if base is None:
        try:
            base = service.client(future.tenant, subject).base_id
        except NotFound:  # a refusal of a call for a run that does not exist
            base = ""
    service.activity.track(future, subject, base, **counts)


def _datum_tokens(data: list[Any]) -> int:
    return sum(len(d.input_tokens) for d in data)


def _sampled_tokens(result: Result) -> int:
    from tinker.proto import tinker_public_pb2 as pb

    if not isinstance(result, ProtoResult):
        return 0
    message = pb.SampleResponse()
    message.ParseFromString(result.body)
    return sum(len(s.tokens) // 4 for s in message.sequences)  # int32 tokens


def add_bootstrap_routes(app: FastAPI, service: Service, Tenant: Any) -> None:
    @app.get("/api/v1/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/v1/client/config")
    async def client_config() -> dict[str, Any]:
        # pyqwest stays on (the SDK default); fwd/bwd bodies may arrive zstd-compressed.
        return {"proto_compress_fwdbwd": False}

    @app.post("/api/v1/client/dynamic_config")
    async def dynamic_config() -> dict[str, Any]:
        return {"refresh_interval_sec": 300}

    @app.get("/api/v1/get_server_capabilities")
    async def capabilities() -> dict[str, Any]:
        models = [
            {
                "model_name": spec.public_id,
                "max_context_length": spec.max_context_length,
                "trainable": True,
                "sampleable": True,
            }
            for spec in service.supported_bases()
        ]
        return {"supported_models": models}

    @app.post("/api/v1/create_session")
    async def create_session(body: wire.CreateSession, tenant: Tenant) -> dict[str, Any]:
        session = service.create_session(tenant, body.tags, body.user_metadata)
        session.project_id, session.display_name = body.project_id, body.display_name
        return {"type": "create_session", "session_id": session.session_id}

    @app.post("/api/v1/session_heartbeat")
    async def heartbeat(body: wire.SessionRef, tenant: Tenant) -> dict[str, Any]:
        session = service.sessions.heartbeat(tenant, body.session_id)
        if session.finished:
            return JSONResponse({"error": "session finished"}, 410)  # type: ignore[return-value]
        return {"type": "session_heartbeat"}

    @app.post("/api/v1/sessions/{session_id}/finish")
    async def finish(
        session_id: str, tenant: Tenant, body: wire.FinishSession | None = None
    ) -> dict[str, Any]:
        reason = body.reason.get("type", "success") if body is not None else "success"
        service.finish_session(tenant, session_id, str(reason))
        return {}

    @app.post("/api/v1/telemetry")
    async def telemetry(tenant: Tenant) -> dict[str, str]:
        return {"status": "accepted"}


def add_training_routes(app: FastAPI, service: Service, Tenant: Any) -> None:
    @app.post("/api/v1/create_model")
    async def create_model(body: wire.CreateModel, tenant: Tenant) -> dict[str, Any]:
        future = await asyncio.to_thread(
            service.create_model,
            tenant,
            body.session_id,
            body.model_seq_id,
            body.base_model,
            body.lora_config,
            body.user_metadata,
        )
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        _track(service, future, model_id, body.base_model)
        return submitted(future, model_id=model_id)

    @app.post("/api/v1/get_info")
    async def get_info(body: wire.ModelRef, tenant: Tenant) -> dict[str, Any]:
        return await asyncio.to_thread(service.get_info, tenant, body.model_id)

    async def submit_forward_backward(
        request: Request, tenant: str, force_forward_only: bool
    ) -> dict[str, Any]:
        body = await request.body()
        if "json" in request.headers.get("content-type", ""):
            call = decode_forward_backward_json(body)  # JSON-era SDKs (0.22)
        else:
            call = decode_forward_backward(body, request.headers.get("content-encoding"))
        future = await asyncio.to_thread(
            service.forward_backward,
            tenant,
            call.model_id,
            call.seq_id,
            call.data,
            call.loss_fn,
            call.loss_fn_config,
            call.forward_only or force_forward_only,
        )
        _track(service, future, call.model_id, train_tokens=_datum_tokens(call.data))
        return submitted(future, model_id=call.model_id)

    @app.post("/api/v1/forward_backward")
    async def forward_backward(request: Request, tenant: Tenant) -> dict[str, Any]:
        return await submit_forward_backward(request, tenant, force_forward_only=False)

    @app.post("/api/v1/forward")
    async def forward(request: Request, tenant: Tenant) -> dict[str, Any]:
        return await submit_forward_backward(request, tenant, force_forward_only=True)

    @app.post("/api/v1/optim_step")
    async def optim_step(body: wire.OptimStep, tenant: Tenant) -> dict[str, Any]:
        if body.adam_params is None:
            refusal = UserError(
                "optim_step without adam_params: this server implements Adam only; pass AdamParams"
            )
            future = await asyncio.to_thread(
                service.refuse_in_order, tenant, body.model_id, body.seq_id, "optim_step", refusal
            )
            return submitted(future, model_id=body.model_id)
        future = await asyncio.to_thread(
            service.optim_step, tenant, body.model_id, body.seq_id, body.adam_params
        )
        _track(service, future, body.model_id)
        return submitted(future, model_id=body.model_id)

    @app.post("/api/v1/save_weights")
    async def save_weights(body: wire.SaveWeights, tenant: Tenant) -> dict[str, Any]:
        future = await asyncio.to_thread(
            service.save_state,
            tenant,
            body.model_id,
            body.seq_id,
            body.path,
            body.ttl_seconds,
            body.overwrite,
            body.user_metadata,
        )
        _track(service, future, body.model_id)
        return submitted(future, model_id=body.model_id)

    @app.post("/api/v1/save_weights_for_sampler")
    async def save_for_sampler(body: wire.SaveWeightsForSampler, tenant: Tenant) -> dict[str, Any]:
        future = await asyncio.to_thread(
            service.save_for_sampler,
            tenant,
            body.model_id,
            body.seq_id,
            body.path,
            body.sampling_session_seq_id,
            body.ttl_seconds,
            body.user_metadata,
        )
        _track(service, future, body.model_id)
        return submitted(future, model_id=body.model_id)

    @app.post("/api/v1/save_weights_external")
    async def save_weights_external(body: wire.SaveWeights, tenant: Tenant) -> dict[str, Any]:
        refusal = Unsupported(
            "save_weights_external is not supported: mint keeps no external-weights "
            "checkpoints; save_weights_for_sampler, then download the PEFT files with "
            "get_checkpoint_archive_url (or `mint revision export`)"
        )
        future = await asyncio.to_thread(
            service.refuse_in_order,
            tenant,
            body.model_id,
            body.seq_id,
            "save_weights_external",
            refusal,
        )
        return submitted(future, model_id=body.model_id)

    @app.post("/api/v1/load_weights")
    async def load_weights(body: wire.LoadWeights, tenant: Tenant) -> dict[str, Any]:
        future = await asyncio.to_thread(
            service.load_state,
            tenant,
            body.path,
            body.optimizer,
            body.model_id,
            body.seq_id,
            body.session_id,
            body.model_seq_id,
        )
        _track(service, future, body.model_id or f"{body.session_id}:train:{body.model_seq_id}")
        return submitted(future, model_id=body.model_id)


def _prompt_tokens(prompt: dict[str, Any]) -> list[int]:
    tokens: list[int] = []
    for index, chunk in enumerate(prompt.get("chunks", [])):
        kind = chunk.get("type", "encoded_text")
        if kind != "encoded_text":
            raise MalformedRequest(
                f"prompt chunk {index} is {kind!r}; this server takes encoded_text chunks only"
            )
        values = chunk.get("tokens", [])
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in values):
            raise MalformedRequest(f"prompt chunk {index} has non-integer tokens")
        tokens.extend(values)
    return tokens


def _sample_request(body: wire.Sample) -> SampleRequest:
    raw = body.sampling_params
    stop_strings: list[str] = []
    stop_tokens: list[int] | None = None
    if isinstance(raw.stop, str):
        stop_strings = [raw.stop]
    elif isinstance(raw.stop, list):
        stop_tokens = [s for s in raw.stop if isinstance(s, int)]
        stop_strings = [s for s in raw.stop if isinstance(s, str)]
        if stop_strings and not stop_tokens and raw.stop:
            stop_tokens = None  # strings only: EOS still ends the sample
    params = SamplingParams(
        max_tokens=raw.max_tokens if raw.max_tokens is not None else DEFAULT_MAX_TOKENS,
        temperature=raw.temperature,
        top_p=raw.top_p,
        top_k=raw.top_k,
        seed=raw.seed,
        stop_strings=stop_strings,
        stop_tokens=stop_tokens,
    )
    return SampleRequest(
        prompt=_prompt_tokens(body.prompt),
        params=params,
        num_samples=body.num_samples,
        prompt_logprobs=body.prompt_logprobs,
    )


def add_sampling_routes(app: FastAPI, service: Service, Tenant: Any) -> None:
    @app.post("/api/v1/create_sampling_session")
    async def create_sampling_session(
        body: wire.CreateSamplingSession, tenant: Tenant
    ) -> dict[str, Any]:
        sampler = await asyncio.to_thread(
            service.create_sampler,
            tenant,
            body.session_id,
            body.sampling_session_seq_id,
            body.model_path,
            body.base_model,
        )
        return {"type": "create_sampling_session", "sampling_session_id": sampler.sampler_id}

    @app.get("/api/v1/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str, tenant: Tenant) -> dict[str, Any]:
        sampler = service.sessions.sampler(tenant, sampler_id)
        return {
            "sampler_id": sampler.sampler_id,
            "base_model": sampler.base_id,
            "model_path": sampler.model_path,
        }

    @app.post("/api/v1/asample")
    async def asample(body: wire.Sample, tenant: Tenant) -> dict[str, Any]:
        if not body.sampling_session_id:
            raise MalformedRequest("asample needs sampling_session_id; create a sampling client")
        request = _sample_request(body)
        future, ids = await asyncio.to_thread(
            service.sample, tenant, body.sampling_session_id, body.seq_id, request
        )
        sampler = service.sessions.sampler(tenant, body.sampling_session_id)
        _track(
            service, future, sampler.sampler_id, sampler.base_id,
            prompt_tokens=len(request.prompt), count_sampled=_sampled_tokens,
        )  # fmt: skip
        return submitted(future, sample_sequence_ids=ids)


def add_future_routes(app: FastAPI, service: Service, Tenant: Any) -> None:
    @app.post("/api/v1/retrieve_future", response_model=None)
    async def retrieve_future(body: wire.RetrieveFuture, tenant: Tenant) -> Response:
        future = service.futures.get(tenant, body.request_id)
        if not await future.wait(service.settings.long_poll_s):
            return JSONResponse(
                {"type": "try_again", "request_id": future.request_id, "queue_state": "active"}
            )
        outcome = future.outcome()
        if isinstance(outcome, ProtoResult):
            return Response(outcome.body, media_type=PROTO)
        if isinstance(outcome, JsonResult):
            return JSONResponse(outcome.body)
        if isinstance(outcome, MintError):
            return JSONResponse({"error": outcome.message, "category": outcome.category})
        return JSONResponse({"error": f"internal error: {outcome}", "category": "server"})


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.isoformat()


def checkpoint_json(record: CheckpointRecord) -> dict[str, Any]:
    path = CheckpointPath(record.policy_id, record.kind, record.name)
    return {
        "checkpoint_id": f"{SEGMENT_BY_KIND[record.kind]}/{record.name}",
        "checkpoint_type": record.kind,
        "time": _iso(record.created_at),
        "tinker_path": str(path),
        "size_bytes": record.size_bytes,
        "public": False,
        "user_metadata": record.user_metadata or None,
        "expires_at": _iso(record.expires_at),
    }


def training_run_json(
    service: Service, policy: PolicyRecord, newest: dict[str, CheckpointRecord] | None = None
) -> dict[str, Any]:
    """`newest`: the policy's newest checkpoint per kind, when the caller fetched it already."""
    if newest is None:
        newest = service.catalog.last_checkpoints(policy.tenant, [policy.policy_id])[
            policy.policy_id
        ]
    last = {kind: checkpoint_json(newest[kind]) if kind in newest else None
            for kind in ("training", "sampler")}  # fmt: skip
    return {
        "training_run_id": policy.policy_id,
        "base_model": policy.base_id,
        "model_owner": policy.tenant,
        "is_lora": True,
        "corrupted": False,
        "lora_rank": policy.rank,
        "last_request_time": _iso(policy.last_request_at),
        "last_checkpoint": last["training"],
        "last_sampler_checkpoint": last["sampler"],
        "user_metadata": policy.user_metadata or None,
    }


def add_rest_routes(app: FastAPI, service: Service, Tenant: Any) -> None:
    @app.get("/api/v1/training_runs")
    async def training_runs(tenant: Tenant, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        policies, total = service.catalog.list_policies(tenant, limit, offset)
        newest = service.catalog.last_checkpoints(tenant, [p.policy_id for p in policies])
        runs = [training_run_json(service, p, newest[p.policy_id]) for p in policies]
        return {
            "training_runs": runs,
            "cursor": {"offset": offset, "limit": limit, "total_count": total},
        }

    @app.get("/api/v1/training_runs/{run_id}")
    async def training_run(run_id: str, tenant: Tenant) -> dict[str, Any]:
        return training_run_json(service, service.catalog.get_policy(tenant, run_id))

    @app.get("/api/v1/training_runs/{run_id}/checkpoints")
    async def run_checkpoints(run_id: str, tenant: Tenant) -> dict[str, Any]:
        service.catalog.get_policy(tenant, run_id)
        records, total = service.catalog.list_checkpoints(tenant, run_id, 10_000, 0)
        return {
            "checkpoints": [checkpoint_json(r) for r in records],
            "cursor": {"offset": 0, "limit": len(records), "total_count": total},
        }

    @app.get("/api/v1/checkpoints")
    async def checkpoints(tenant: Tenant, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        records, total = service.catalog.list_checkpoints(tenant, None, limit, offset)
        return {
            "checkpoints": [checkpoint_json(r) for r in records],
            "cursor": {"offset": offset, "limit": limit, "total_count": total},
        }

    @app.get("/api/v1/sessions")
    async def list_sessions(tenant: Tenant, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        sessions = service.sessions.owned_by(tenant)[offset : offset + limit]
        return {"sessions": [s.session_id for s in sessions]}

    @app.get("/api/v1/sessions/{session_id}")
    async def get_session(session_id: str, tenant: Tenant) -> dict[str, Any]:
        session = service.sessions.get(tenant, session_id)
        return {
            "training_run_ids": list(session.model_ids),
            "sampler_ids": list(session.sampler_ids),
            "user_metadata": session.user_metadata or None,
        }

    @app.post("/api/v1/weights_info")
    async def weights_info(body: wire.WeightsInfo, tenant: Tenant) -> dict[str, Any]:
        path = parse_checkpoint_path(body.tinker_path)
        policy = service.catalog.get_policy(tenant, path.policy_id)
        if path.kind == "sampler":
            service.catalog.resolve(tenant, path.policy_id, path.name)
        else:
            service.catalog.read_training_state(tenant, path.policy_id, path.name)
        return {
            "base_model": policy.base_id,
            "is_lora": True,
            "lora_rank": policy.rank,
            "train_attn": bool(set(policy.target_modules) & set(ATTENTION_TARGETS)),
            "train_mlp": bool(set(policy.target_modules) & set(MLP_TARGETS)),
            "train_unembed": False,
        }

    @app.delete("/api/v1/training_runs/{run_id}/checkpoints/{segment}/{name}")
    async def delete_checkpoint(
        run_id: str, segment: str, name: str, tenant: Tenant
    ) -> dict[str, Any]:
        path = CheckpointPath(run_id, _kind_of(segment), name)
        service.catalog.delete_checkpoint(tenant, path.policy_id, path.kind, path.name)
        return {}

    @app.put("/api/v1/training_runs/{run_id}/checkpoints/{segment}/{name}/ttl")
    async def checkpoint_ttl(
        run_id: str, segment: str, name: str, body: wire.CheckpointTtl, tenant: Tenant
    ) -> dict[str, Any]:
        service.catalog.set_checkpoint_ttl(
            tenant, run_id, _kind_of(segment), name, body.ttl_seconds
        )
        return {}


def _kind_of(segment: str) -> str:
    from mint.control.paths import KIND_BY_SEGMENT

    if segment not in KIND_BY_SEGMENT:
        raise MalformedRequest(
            f"checkpoint segment {segment!r} is unknown; use weights or sampler_weights"
        )
    return KIND_BY_SEGMENT[segment]

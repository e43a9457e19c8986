"""The control plane behind the API: one object that turns Tinker calls into jobs.

Every call is scoped by tenant. Jobs that touch a base go to that base's worker (the one
thread that runs its forward passes); training jobs of one client pass the seq gate first so
they run in `seq_id` order and a replayed seq_id is applied once.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mint.catalog.records import RevisionRecord
from mint.catalog.store import Catalog
from mint.config import Settings
from mint.control.activity import ActivityLog
from mint.control.collector import defer_full_collections
from mint.control.futures import FutureTable, JobFuture, JsonResult, Result
from mint.control.ordering import SeqGate
from mint.control.paths import CheckpointPath, parse_checkpoint_path
from mint.control.sessions import Sampler, Session, SessionTable
from mint.control.worker import BaseWorker, ForwardBackwardCall, SampleJob, TokenSink, TrainJob
from mint.errors import MalformedRequest, MintError, NotFound, UserError
from mint.models.base import load_base
from mint.models.lora import LoraSignature, targets_for
from mint.models.registry import BaseSpec, find_base
from mint.serve.config import EngineConfig
from mint.serve.types import SampleRequest, SampleResult
from mint.train.trainer import Trainer
from mint.train.types import AdamParams, ForwardBackwardResult, TrainDatum

log = logging.getLogger(__name__)


@dataclass
class TrainingClient:
    model_id: str
    tenant: str
    base_id: str


class Service:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog | None = None,
        engine_config: EngineConfig | None = None,
    ) -> None:
        self.settings = settings
        self.engine_config = engine_config or EngineConfig.from_env()
        settings.home.mkdir(parents=True, exist_ok=True)
        self.catalog = catalog or Catalog(settings.catalog_url, settings.blob_store())
        self.futures = FutureTable()
        self.gate = SeqGate(gap_timeout_s=settings.seq_gap_timeout_s)
        self.sessions = SessionTable()
        self.activity = ActivityLog(settings.home / "audit.jsonl")
        self._workers: dict[str, BaseWorker] = {}
        self._workers_lock = threading.Lock()
        self._clients: dict[str, TrainingClient] = {}
        self._sample_replays: dict[tuple[str, int], tuple[JobFuture, list[str]]] = {}
        self._control_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="control")
        # Creation futures by model id: a replayed create_model or create-via-load (same
        # session and model_seq_id) answers with the first future instead of a conflict.
        self._creations: dict[str, JobFuture] = {}
        self._creations_lock = threading.Lock()
        self._stopped = threading.Event()
        self.start_housekeeping(settings.housekeeping_interval_s)

    # ----------------------------------------------------------------- bases and workers
    def worker(self, base_name: str) -> BaseWorker:
        spec = find_base(base_name)
        with self._workers_lock:
            worker = self._workers.get(spec.public_id)
            if worker is None:
                base = load_base(
                    spec.public_id,
                    self.settings.bases_dir,
                    self.settings.device,
                    self.settings.dtype,
                )
                self.catalog.record_base(base.base_id, base.fingerprint)
                # The base's objects live as long as the process: keeping them out of the
                # cyclic collector's view stops full collections (measured at 0.3-0.9 s
                # here) from stalling decode steps.
                gc.freeze()
                # Full collections wait for a worker's idle moments (see collector).
                defer_full_collections()
                worker = BaseWorker(
                    base, self.engine_config, train_pass_tokens=self.settings.train_pass_tokens
                )
                self._workers[spec.public_id] = worker
            return worker

    def workers(self) -> dict[str, BaseWorker]:
        """The bases loaded so far and their workers, by public base id."""
        with self._workers_lock:
            return dict(self._workers)

    def supported_bases(self) -> list[BaseSpec]:
        from mint.models.registry import KNOWN_BASES

        return list(KNOWN_BASES)

    def start_housekeeping(self, interval_s: float = 15.0) -> None:
        """Reap idle sessions and release stalled seq gaps periodically, on a daemon thread."""

        def loop() -> None:
            while not self._stopped.wait(interval_s):
                try:
                    self.reap_idle_sessions()
                    self.gate.release_stalled()
                except Exception:  # housekeeping must never die; the next round retries
                    log.exception("housekeeping round failed")

        threading.Thread(target=loop, name="housekeeping", daemon=True).start()

    def refuse_in_order(
        self, tenant: str, model_id: str, seq_id: int, kind: str, error: MintError
    ) -> JobFuture:
        """Answer a training request that cannot run with a failed future in its seq_id turn.

        The SDK has already spent the seq_id; refusing before the gate would leave a gap that
        holds back every later request of the client.
        """

        def fail(_: Trainer) -> Result:
            raise error

        return self._ordered(tenant, model_id, seq_id, kind, fail)

    def close(self) -> None:
        self._stopped.set()
        for worker in list(self._workers.values()):
            worker.stop()
        self._control_pool.shutdown(wait=False, cancel_futures=True)

    # ----------------------------------------------------------------------- sessions
    def create_session(
        self, tenant: str, tags: list[str], user_metadata: dict[str, object]
    ) -> Session:
        session = self.sessions.create(tenant, tags, user_metadata)
        log.info("session %s created for tenant %s", session.session_id, tenant)
        return session

    def finish_session(self, tenant: str, session_id: str, reason: str = "success") -> None:
        session = self.sessions.get(tenant, session_id)
        session.finished, session.finish_reason = True, reason

    def reap_idle_sessions(self, now: float | None = None) -> list[str]:
        """Finish sessions without a heartbeat for `session_timeout_s` and free what they
        hold in memory: their policies' live training state and their samplers. Saved
        training states and revisions stay in the catalog."""
        reaped = []
        for session in self.sessions.idle(self.settings.session_timeout_s, now):
            session.finished, session.finish_reason = True, "reaped"
            for model_id in session.model_ids:
                client = self._clients.pop(model_id, None)
                self.gate.forget_client(model_id)
                if client is not None and client.base_id in self._workers:
                    done = self.futures.create(session.tenant, "drop_policy")
                    self._workers[client.base_id].submit_train(
                        TrainJob(done, functools.partial(_dropped, model_id=model_id), model_id)
                    )
            self.sessions.drop_samplers(session)
            reaped.append(session.session_id)
            log.info(
                "session %s reaped after %.0fs without a heartbeat",
                session.session_id,
                self.settings.session_timeout_s,
            )
        return reaped

    # ------------------------------------------------------------------- job plumbing
    def _quota(self, tenant: str) -> int | None:
        """The tenant's job quota, checked where a client's request becomes a job."""
        return self.catalog.job_quota(tenant)

    def _in_background(
        self, tenant: str, kind: str, work: Callable[[], Result], quota: int | None = None
    ) -> JobFuture:
        future = self.futures.create(tenant, kind, quota)

        def run() -> None:
            try:
                future.set_result(work())
            except MintError as error:
                future.set_error(error)
            except Exception as error:
                log.exception("%s job %s failed", kind, future.request_id)
                future.set_error(error)

        self._control_pool.submit(run)
        return future

    def client(self, tenant: str, model_id: str) -> TrainingClient:
        client = self._clients.get(model_id)
        if client is None or client.tenant != tenant:
            raise NotFound(
                f"no training run {model_id!r}; create one with create_lora_training_client"
            )
        return client

    def _ordered(
        self,
        tenant: str,
        model_id: str,
        seq_id: int,
        kind: str,
        run: Callable[[Trainer], Result] | ForwardBackwardCall,
    ) -> JobFuture:
        client = self.client(tenant, model_id)
        replay = self.gate.replay_of(model_id, seq_id)
        if replay is not None:
            return replay
        # A request that jobs already parked wait for is never refused: refusing it could
        # only hold up work the quota admitted before.
        quota = None if self.gate.is_awaited(model_id, seq_id) else self._quota(tenant)
        future = self.futures.create(tenant, kind, quota)
        worker = self.worker(client.base_id)
        if isinstance(run, ForwardBackwardCall):
            job = TrainJob.of_forward_backward(future, run)
        else:
            job = TrainJob(future, run, policy_id=model_id)
        answer = self.gate.submit(model_id, seq_id, future, lambda: worker.submit_train(job))
        if answer is not future:  # a concurrent replay won: this future has no job
            self.futures.discard(future, RuntimeError("superseded by a replay"))
        return answer

    # ------------------------------------------------------------------------ training
    def create_model(
        self,
        tenant: str,
        session_id: str,
        model_seq_id: int,
        base_model: str,
        lora_config: dict[str, object],
        user_metadata: dict[str, str] | None,
    ) -> JobFuture:
        session = self.sessions.get(tenant, session_id)
        spec = find_base(base_model)
        signature = _signature_from(lora_config, user_metadata or {})
        seed = int(lora_config.get("seed") or 0)  # type: ignore[call-overload]
        model_id = f"{session.session_id}:train:{model_seq_id}"

        def work() -> Result:
            worker = self.worker(spec.public_id)
            base = worker.base
            self.catalog.create_policy(
                tenant, model_id, base.base_id, base.fingerprint, signature, user_metadata
            )
            done = self.futures.create(tenant, "create_policy")
            worker.submit_train(
                TrainJob(done, lambda t: _created(t, model_id, signature, seed), model_id)
            )
            done.inner.result()
            self._register_client(session, model_id, base.base_id)
            log.info("policy %s created on %s (rank %d)", model_id, base.base_id, signature.rank)
            return JsonResult({"model_id": model_id, "type": "create_model"})

        return self._create_once(tenant, model_id, "create_model", work)

    def _create_once(
        self, tenant: str, model_id: str, kind: str, work: Callable[[], Result]
    ) -> JobFuture:
        with self._creations_lock:
            first = self._creations.get(model_id)
            if first is not None and first.tenant == tenant:
                return first
            future = self._in_background(tenant, kind, work, self._quota(tenant))
            self._creations[model_id] = future
            return future

    def _register_client(self, session: Session, model_id: str, base_id: str) -> None:
        self._clients[model_id] = TrainingClient(model_id, session.tenant, base_id)
        self.gate.start_client(model_id, 1)
        session.model_ids.append(model_id)

    def get_info(self, tenant: str, model_id: str) -> dict[str, object]:
        client = self.client(tenant, model_id)
        policy = self.catalog.get_policy(tenant, model_id)
        worker = self.worker(client.base_id)
        return {
            "type": "get_info",
            "model_id": model_id,
            "model_name": client.base_id,
            "is_lora": True,
            "lora_rank": policy.rank,
            "model_data": {
                "arch": str(getattr(worker.base.model.config, "model_type", "unknown")),
                "model_name": client.base_id,
                # A local folder: the SDK loads the tokenizer from it without any network.
                "tokenizer_id": str(worker.base.folder),
            },
        }

    def forward_backward(
        self,
        tenant: str,
        model_id: str,
        seq_id: int,
        data: list[TrainDatum],
        loss_fn: str,
        loss_fn_config: dict[str, float | str],
        forward_only: bool,
    ) -> JobFuture:
        from mint.api.proto import encode_forward_backward
        from mint.control.futures import ProtoResult

        numeric = {k: float(v) for k, v in loss_fn_config.items() if not isinstance(v, str)}

        def finish(result: ForwardBackwardResult) -> Result:
            return ProtoResult(encode_forward_backward(result))

        call = ForwardBackwardCall(model_id, data, loss_fn, numeric, forward_only, finish)
        kind = "forward" if forward_only else "forward_backward"
        return self._ordered(tenant, model_id, seq_id, kind, call)

    def optim_step(
        self, tenant: str, model_id: str, seq_id: int, adam: dict[str, float]
    ) -> JobFuture:
        params = AdamParams(**{k: float(v) for k, v in adam.items() if k in _ADAM_FIELDS})

        def run(trainer: Trainer) -> Result:
            metrics = trainer.optim_step(model_id, params)
            self.catalog.touch_policy(tenant, model_id)
            return JsonResult({"metrics": metrics, "type": "optim_step"})

        return self._ordered(tenant, model_id, seq_id, "optim_step", run)

    def save_state(
        self,
        tenant: str,
        model_id: str,
        seq_id: int,
        name: str | None,
        ttl_seconds: int | None,
        overwrite: bool,
        user_metadata: dict[str, str] | None,
    ) -> JobFuture:
        checkpoint_name = name or f"state-{seq_id}"

        def run(trainer: Trainer) -> Result:
            payload = trainer.save_state(model_id)
            self.catalog.save_training_state(
                tenant,
                model_id,
                checkpoint_name,
                payload,
                trainer.step(model_id),
                ttl_seconds=ttl_seconds,
                user_metadata=user_metadata,
                overwrite=overwrite,
            )
            path = CheckpointPath(model_id, "training", checkpoint_name)
            log.info("training state saved: %s", path)
            return JsonResult({"path": str(path), "type": "save_weights"})

        return self._ordered(tenant, model_id, seq_id, "save_weights", run)

    def save_for_sampler(
        self,
        tenant: str,
        model_id: str,
        seq_id: int,
        name: str | None,
        sampling_session_seq_id: int | None,
        ttl_seconds: int | None,
        user_metadata: dict[str, str] | None,
    ) -> JobFuture:
        client = self.client(tenant, model_id)
        session_id = model_id.split(":train:")[0]

        def run(trainer: Trainer) -> Result:
            tensors = trainer.adapter_tensors(model_id)
            revision = self.catalog.export_revision(
                tenant,
                model_id,
                name,
                tensors,
                trainer.step(model_id),
                ttl_seconds=ttl_seconds,
                user_metadata=user_metadata,
            )
            log.info("revision %s@%d exported (%s)", model_id, revision.number, revision.name)
            if name is not None:
                path = CheckpointPath(model_id, "sampler", revision.name)
                return JsonResult({"path": str(path), "type": "save_weights_for_sampler"})
            sampler_id = f"{session_id}:sample:{sampling_session_seq_id or 0}"
            sampler = Sampler(
                sampler_id,
                tenant,
                client.base_id,
                model_id,
                str(revision.number),
                str(CheckpointPath(model_id, "sampler", revision.name)),
            )
            self.sessions.add_sampler(sampler, self._session_or_none(tenant, session_id))
            return JsonResult(
                {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}
            )

        return self._ordered(tenant, model_id, seq_id, "save_weights_for_sampler", run)

    def _session_or_none(self, tenant: str, session_id: str) -> Session | None:
        try:
            return self.sessions.get(tenant, session_id)
        except NotFound:
            return None

    def load_state(
        self,
        tenant: str,
        path: str,
        with_optimizer: bool,
        model_id: str | None,
        seq_id: int,
        session_id: str | None,
        model_seq_id: int | None,
    ) -> JobFuture:
        try:
            source = parse_checkpoint_path(path)
            if source.kind != "training":
                raise MalformedRequest(
                    f"{path} is a sampler checkpoint; load_state takes a training state saved "
                    f"with save_state (tinker://<run>/weights/<name>)"
                )
            payload = self.catalog.read_training_state(tenant, source.policy_id, source.name)
        except MintError as error:
            if model_id is None:
                raise
            return self.refuse_in_order(tenant, model_id, seq_id, "load_weights", error)
        answer: dict[str, object] = {"path": path, "type": "load_weights"}
        if model_id is not None:

            def run(trainer: Trainer) -> Result:
                trainer.load_state(model_id, payload, with_optimizer)
                return JsonResult({**answer, "model_id": model_id})

            return self._ordered(tenant, model_id, seq_id, "load_weights", run)
        if session_id is None or model_seq_id is None:
            raise MalformedRequest(
                "load_weights needs either model_id or session_id and model_seq_id"
            )
        return self._create_from_state(
            tenant, session_id, model_seq_id, source, payload, with_optimizer, answer
        )

    def _create_from_state(
        self,
        tenant: str,
        session_id: str,
        model_seq_id: int,
        source: CheckpointPath,
        payload: bytes,
        with_optimizer: bool,
        answer: dict[str, object],
    ) -> JobFuture:
        session = self.sessions.get(tenant, session_id)
        source_policy = self.catalog.get_policy(tenant, source.policy_id)
        new_id = f"{session.session_id}:train:{model_seq_id}"
        signature = LoraSignature(
            source_policy.rank, source_policy.alpha, tuple(source_policy.target_modules)
        )

        def work() -> Result:
            worker = self.worker(source_policy.base_id)
            base = worker.base
            self.catalog.create_policy(
                tenant,
                new_id,
                base.base_id,
                base.fingerprint,
                signature,
                dict(source_policy.user_metadata),
            )
            done = self.futures.create(tenant, "load_policy")
            worker.submit_train(
                TrainJob(done, lambda t: _loaded(t, new_id, payload, with_optimizer), new_id)
            )
            done.inner.result()
            self._register_client(session, new_id, base.base_id)
            return JsonResult({**answer, "model_id": new_id})

        return self._create_once(tenant, new_id, "load_weights", work)

    # ------------------------------------------------------------------------ sampling
    def create_sampler(
        self,
        tenant: str,
        session_id: str,
        sampling_session_seq_id: int,
        model_path: str | None,
        base_model: str | None,
    ) -> Sampler:
        session = self.sessions.get(tenant, session_id)
        sampler_id = f"{session.session_id}:sample:{sampling_session_seq_id}"
        if model_path:
            target = parse_checkpoint_path(model_path)
            policy = self.catalog.get_policy(tenant, target.policy_id)
            if target.kind != "sampler":
                raise MalformedRequest(
                    f"{model_path} is a training state; sample from a sampler checkpoint "
                    f"(save_weights_for_sampler) instead"
                )
            self.catalog.resolve(tenant, policy.policy_id, target.name)  # fail now, not later
            sampler = Sampler(
                sampler_id, tenant, policy.base_id, policy.policy_id, target.name, model_path
            )
        elif base_model:
            sampler = Sampler(sampler_id, tenant, find_base(base_model).public_id)
        else:
            raise MalformedRequest("create_sampling_session needs model_path or base_model")
        self.sessions.add_sampler(sampler, session)
        return sampler

    def sample(
        self,
        tenant: str,
        sampler_id: str,
        seq_id: int | None,
        request: SampleRequest,
    ) -> tuple[JobFuture, list[str]]:
        from mint.api.proto import encode_sample
        from mint.control.futures import ProtoResult

        sampler = self.sessions.sampler(tenant, sampler_id)
        key = (sampler_id, seq_id) if seq_id is not None else None
        if key is not None and key in self._sample_replays:
            return self._sample_replays[key]
        revision = self._revision_for(sampler)

        def finish(result: SampleResult) -> Result:
            return ProtoResult(encode_sample(result))

        future = self.submit_sample(tenant, sampler.base_id, revision, request, finish)
        ids = [f"{future.request_id}:seq:{i}" for i in range(request.num_samples)]
        if key is not None:
            self._sample_replays[key] = (future, ids)
        return future, ids

    def submit_sample(
        self,
        tenant: str,
        base_id: str,
        revision: RevisionRecord | None,
        request: SampleRequest,
        finish: Callable[[SampleResult], Result],
        on_token: TokenSink | None = None,
    ) -> JobFuture:
        """Queue one sample request on its base's worker; a cold revision starts loading.

        Raises `Busy` (retryable) when the sample queue or the cold-load queue is full.
        """
        worker = self.worker(base_id)
        future = self.futures.create(tenant, "sample", self._quota(tenant))
        try:
            worker.submit_sample(SampleJob(future, request, finish, revision, on_token))
        except BaseException as error:
            self.futures.discard(future, error)
            raise
        return future

    def cancel_sample(self, base_id: str, future: JobFuture) -> None:
        """Stop a sample request submitted with `submit_sample` whose caller went away."""
        worker = self.workers().get(base_id)
        if worker is not None:
            worker.cancel(future)

    def _revision_for(self, sampler: Sampler) -> RevisionRecord | None:
        if sampler.policy_id is None:
            return None
        return self.catalog.resolve(sampler.tenant, sampler.policy_id, sampler.ref)

    def resolve_model(self, tenant: str, model: str) -> tuple[str, RevisionRecord | None]:
        """(base id, revision) for an OpenAI-style model name.

        A name is a base id, a policy id (its `latest` alias), `policy:alias` or
        `policy@revision` (a number or a checkpoint name). Policy ids contain ':' themselves,
        so the whole name is tried as a policy first and only then split at its last
        separator.
        """
        try:
            return find_base(model).public_id, None
        except NotFound:
            pass
        candidates: list[tuple[str, str | None]] = [(model, None)]
        for separator, prefix in (("@", "@"), (":", "")):
            policy_id, sep, ref = model.rpartition(separator)
            if sep and policy_id and ref:
                named = ref if prefix == "" or not ref.isdigit() else prefix + ref
                candidates.append((policy_id, named))
        for policy_id, reference in candidates:
            try:
                policy = self.catalog.get_policy(tenant, policy_id)
            except NotFound:
                continue
            return policy.base_id, self.catalog.resolve(tenant, policy_id, reference)
        raise NotFound(
            f"model {model!r} is no base, policy, policy:alias or policy@revision of yours; "
            "list the names you can use with GET /v1/models"
        )


_ADAM_FIELDS = {
    "learning_rate",
    "beta1",
    "beta2",
    "eps",
    "weight_decay",
    "grad_clip_norm",
}


DEFAULT_LORA_ALPHA = 32.0


def _signature_from(lora_config: dict[str, object], user_metadata: dict[str, str]) -> LoraSignature:
    """Rank from lora_config; alpha from lora_config or, since the SDK's LoraConfig has no
    alpha field, from user_metadata["lora_alpha"]; Tinker's fixed alpha 32 otherwise."""
    rank = lora_config.get("rank")
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise UserError(f"lora_config.rank must be an integer, got {rank!r}")
    raw_alpha = lora_config.get("alpha", user_metadata.get("lora_alpha", DEFAULT_LORA_ALPHA))
    try:
        alpha = float(raw_alpha)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(f"LoRA alpha must be a number, got {raw_alpha!r}") from None
    targets = targets_for(
        bool(lora_config.get("train_attn", True)), bool(lora_config.get("train_mlp", True))
    )
    return LoraSignature(rank=rank, alpha=float(alpha), target_modules=targets)


def _created(trainer: Trainer, model_id: str, signature: LoraSignature, seed: int) -> Result:
    trainer.create_policy(model_id, signature, seed)
    return JsonResult({})


def _dropped(trainer: Trainer, *, model_id: str) -> Result:
    if trainer.has_policy(model_id):
        trainer.drop_policy(model_id)
    return JsonResult({})


def _loaded(trainer: Trainer, model_id: str, payload: bytes, with_optimizer: bool) -> Result:
    trainer.load_state(model_id, payload, with_optimizer)
    return JsonResult({})

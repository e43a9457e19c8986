"""The trainer: one worker over one resident base, time-slicing many policies.

A job names a policy; the trainer swaps that policy's training state onto the base's device
(evicting the least recently used policy to host memory when `max_live_policies` are already
there), binds its LoRA tensors to the frozen base for the job, and leaves the state in place
for the next job. `forward_backward_many` runs several live policies' jobs in shared passes,
each adapter bound to its own rows (see `passes`). The base weights exist once and never
change. Only the base's worker thread calls a trainer, so nothing here locks.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mint.errors import Conflict, InvalidAdapter, NotFound, UserError
from mint.models.base import ResidentBase
from mint.models.lora import AdapterTensors, BoundAdapter, LoraSignature, bound, init_adapter
from mint.train import state as saved_form
from mint.train.batch import Batch, check_data, collate, stack
from mint.train.losses import compute as compute_loss
from mint.train.losses import loss_spec, resolve_config
from mint.train.optimizer import adamw_step_, clip_, global_grad_norm
from mint.train.passes import JobTally, ResolvedJob, TrainJob, plan_passes
from mint.train.state import HOST, BufferPool, Mover, PolicyState
from mint.train.types import AdamParams, ForwardBackwardResult, TrainDatum

log = logging.getLogger(__name__)


class Trainer:
    """Training state for many policies over one `ResidentBase`."""

    def __init__(
        self,
        base: ResidentBase,
        max_live_policies: int = 4,
        pass_token_budget: int = 512,
        unembed_chunk_tokens: int = 2048,
    ) -> None:
        if max_live_policies < 1:
            raise UserError(
                f"max_live_policies={max_live_policies} must be at least 1; "
                "it bounds how many policies' training state sits on the device"
            )
        if pass_token_budget < 1 or unembed_chunk_tokens < 1:
            raise UserError("pass_token_budget and unembed_chunk_tokens must be positive")
        self.base = base
        self.max_live_policies = max_live_policies
        #: Padded tokens per forward/backward pass; bigger jobs run as several passes.
        self.pass_token_budget = pass_token_budget
        #: Tokens per slice of the unembedding, recomputed in backward (see _target_logprobs).
        self.unembed_chunk_tokens = unembed_chunk_tokens
        self._policies: dict[str, PolicyState] = {}
        # Buffers freed by swaps are reused by the next ones (see BufferPool).
        self._pool = BufferPool(spares=4)
        self._mover = Mover(base.device, self._pool)
        # Policies whose state is on the base's device, least recently used first.
        self._live: OrderedDict[str, None] = OrderedDict()

    # -- policies -------------------------------------------------------------------------

    def create_policy(self, policy_id: str, signature: LoraSignature, seed: int = 0) -> None:
        """A new policy with a fresh adapter (B = 0, so it starts as the base itself)."""
        if policy_id in self._policies:
            raise Conflict(
                f"policy {policy_id!r} already exists on this trainer; "
                "pick another id or drop_policy it first"
            )
        self._check_targets(signature)
        tensors = init_adapter(self.base.layers, signature, seed, device=HOST)
        self._policies[policy_id] = PolicyState.fresh(signature, tensors)
        log.info(
            "policy %s created (rank=%d alpha=%g targets=%s seed=%d)",
            policy_id,
            signature.rank,
            signature.alpha,
            ",".join(signature.target_modules),
            seed,
        )

    def has_policy(self, policy_id: str) -> bool:
        return policy_id in self._policies

    def signature(self, policy_id: str) -> LoraSignature:
        return self._get(policy_id).signature

    def step(self, policy_id: str) -> int:
        """How many optimizer steps the policy has taken."""
        return self._get(policy_id).step

    def drop_policy(self, policy_id: str) -> None:
        self._get(policy_id)
        del self._policies[policy_id]
        self._live.pop(policy_id, None)
        log.info("policy %s dropped", policy_id)

    @property
    def live_policies(self) -> list[str]:
        """Policies whose training state is on the base's device, least recently used first."""
        return list(self._live)

    def swap_in(self, policy_id: str) -> None:
        """Place the policy's training state on the base's device now (evicting LRU ones)."""
        self._swap_in(policy_id)

    def swap_out(self, policy_id: str) -> None:
        """Move the policy's training state to host memory; bits are unchanged."""
        state = self._get(policy_id)
        if policy_id in self._live:
            del self._live[policy_id]
            state.move_to(HOST, self._mover)
            log.debug("policy=%s swapped out to host", policy_id)

    def device_bytes(self) -> int:
        """Bytes of training state on the base's device: the live policies' tensors."""
        return sum(self._policies[policy_id].nbytes() for policy_id in self._live)

    def spare_bytes(self) -> int:
        """Bytes of freed swap buffers kept for reuse (device and host)."""
        return self._pool.nbytes()

    def host_bytes(self) -> int:
        """Bytes of training state swapped out to host memory."""
        return sum(
            state.nbytes()
            for policy_id, state in self._policies.items()
            if policy_id not in self._live
        )

    # -- jobs -----------------------------------------------------------------------------

    def forward_backward(
        self,
        policy_id: str,
        data: list[TrainDatum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float] | None = None,
        forward_only: bool = False,
    ) -> ForwardBackwardResult:
        """Per-token logprobs and losses; unless `forward_only`, add the loss's gradients.

        The loss is the sum of elementwise losses over all tokens and datums; gradients add
        up over calls until the next `optim_step`.
        """
        job = TrainJob(policy_id, data, loss_fn, loss_fn_config)
        return self.forward_backward_many([job], forward_only)[0]

    def forward_backward_many(
        self,
        jobs: Sequence[TrainJob | tuple[str, list[TrainDatum], str, Mapping[str, float] | None]],
        forward_only: bool = False,
    ) -> list[ForwardBackwardResult]:
        """Several policies' jobs in shared passes: one result per job, in job order.

        Each pass runs the base once over the rows of all its jobs, every policy's adapter
        bound to its own rows, so results and gradients equal separate `forward_backward`
        calls while the base weights are read once. The policies must differ and all fit on
        the device at once (at most `max_live_policies`).
        """
        resolved = [
            self._resolve(index, TrainJob(*job), len(jobs)) for index, job in enumerate(jobs)
        ]
        self._check_jobs(resolved)
        states = [self._swap_in(job.policy_id) for job in resolved]
        tallies = [JobTally() for _ in resolved]
        for segments in plan_passes(resolved, self.pass_token_budget):
            self._run_pass(segments, resolved, states, tallies, forward_only)
        return [tally.result() for tally in tallies]

    def optim_step(self, policy_id: str, params: AdamParams) -> dict[str, float]:
        """One AdamW step on the accumulated gradients, which are then zeroed."""
        state = self._swap_in(policy_id)
        # One flat buffer per kind: the update is a handful of large elementwise ops.
        grad = state.flat_grad()
        # 1. The norm is reported before clipping, whether clipping is on or not.
        norm = global_grad_norm([grad])
        clip_([grad], params.grad_clip_norm, norm)
        # 2. The step counter counts from 1 inside the update (bias correction).
        state.step += 1
        adamw_step_(
            [state.flat["weights"].detach()],
            [grad],
            [state.flat["exp_avg"]],
            [state.flat["exp_avg_sq"]],
            state.step,
            params,
        )
        state.zero_grad(self._pool)
        log.debug("policy=%s optim_step step=%d grad_norm=%.4g", policy_id, state.step, norm)
        return {"grad_norm:mean": float(norm), "learning_rate:mean": params.learning_rate}

    # -- reading and writing training state -------------------------------------------------

    def adapter_tensors(self, policy_id: str) -> AdapterTensors:
        """Detached CPU float32 copies of the policy's A and B tensors, by module path."""
        adapter = self._get(policy_id).adapter(torch.float32)
        return {path: (_host_copy(a), _host_copy(b)) for path, (a, b) in adapter.items()}

    def gradients(self, policy_id: str) -> AdapterTensors:
        """Detached CPU copies of the gradients accumulated since the last optim_step."""
        state = self._get(policy_id)
        grads = dict(zip(state.layout.names, state.grads(), strict=True))
        return {
            name[:-2]: (_host_copy(grads[name]), _host_copy(grads[name[:-2] + ".B"]))
            for name in grads
            if name.endswith(".A")
        }

    def save_state(self, policy_id: str) -> bytes:
        """The policy's training state as safetensors bytes (gradients are not included)."""
        state = self._get(policy_id)
        return saved_form.encode(state, self.base.base_id, self.base.fingerprint)

    def load_state(self, policy_id: str, payload: bytes, with_optimizer: bool) -> None:
        """Replace (or create) a policy's training state from `save_state` bytes.

        Without the optimizer the weights and step are restored and the Adam moments start
        from zero. Pending gradients of the policy are discarded.
        """
        saved = saved_form.decode(payload)
        problems = self._base_problems(saved.metadata)
        existing = self._policies.get(policy_id)
        if existing is not None and existing.signature != saved.signature:
            problems.append(
                f"signature {saved.signature} differs from policy {policy_id!r}'s "
                f"{existing.signature}; load it into a new policy id"
            )
        missing_targets = self._missing_targets(saved.signature)
        if missing_targets:
            problems.append(f"target modules {missing_targets} do not exist on this base")
        else:
            shapes = self.base.shapes(saved.signature)
            problems += saved_form.tensor_problems(saved, shapes, with_optimizer)
        if problems:
            raise InvalidAdapter(problems, subject="training state")
        self._policies[policy_id] = saved_form.restore(saved, with_optimizer)
        self._live.pop(policy_id, None)
        log.info(
            "policy %s %s from saved state (step=%d, optimizer=%s)",
            policy_id,
            "replaced" if existing else "created",
            saved.step,
            with_optimizer,
        )

    # -- internals --------------------------------------------------------------------------

    def _resolve(self, index: int, job: TrainJob, count: int) -> ResolvedJob:
        """Check a job's loss, config and data; in a many-job call errors name the job."""
        base = self.base
        try:
            spec = loss_spec(job.loss_fn)
            config = resolve_config(job.loss_fn, spec, job.loss_fn_config)
            check_data(job.data, spec, base.vocab_size, base.max_context_length)
        except UserError as error:
            if count == 1:
                raise
            raise type(error)(f"job {index} (policy {job.policy_id!r}): {error.message}") from None
        return ResolvedJob(job.policy_id, list(job.data), spec, config)

    def _check_jobs(self, jobs: list[ResolvedJob]) -> None:
        ids = [job.policy_id for job in jobs]
        if not ids:
            raise UserError("forward_backward_many needs at least one job; got none")
        for policy_id in ids:
            self._get(policy_id)
        repeated = sorted({policy_id for policy_id in ids if ids.count(policy_id) > 1})
        if repeated:
            raise UserError(
                f"policies {repeated} appear in more than one job of one call; "
                "merge each policy's data into one job"
            )
        if len(ids) > self.max_live_policies:
            raise UserError(
                f"{len(ids)} policies in one call exceed max_live_policies="
                f"{self.max_live_policies}; split the call or raise the limit"
            )

    def _run_pass(
        self,
        segments: list[tuple[int, list[TrainDatum]]],
        jobs: list[ResolvedJob],
        states: list[PolicyState],
        tallies: list[JobTally],
        forward_only: bool,
    ) -> None:
        """One forward (and backward) over the segments' rows, each bound to its policy."""
        base = self.base
        parts = [
            collate(data, jobs[index].spec, base.vocab_size, base.max_context_length, base.device)
            for index, data in segments
        ]
        # 1. Row ranges of the segments in the stacked batch; one segment binds all rows.
        starts = np.cumsum([0] + [len(part.lengths) for part in parts]).tolist()
        adapters = []
        for (index, _), start, stop in zip(segments, starts, starts[1:], strict=False):
            state = states[index]
            segment = None if len(parts) == 1 else slice(start, stop)
            adapters.append(BoundAdapter(state.adapter(base.dtype), state.signature.scale, segment))
        with torch.set_grad_enabled(not forward_only):
            # 2. One pass of the base over all rows.
            logprobs = self._target_logprobs(adapters, stack(parts))
            # 3. Each segment's own loss on its rows; the sum backpropagates once.
            total = logprobs.new_zeros(())
            for (index, _), part, start in zip(segments, parts, starts, strict=False):
                rows = logprobs[start : start + len(part.lengths), : part.mask.shape[1]]
                job = jobs[index]
                outcome = compute_loss(job.spec, rows, part.inputs, part.mask, job.config)
                total = total + outcome.elementwise.sum()
                tallies[index].add(part, rows, outcome)
            if not forward_only:
                total.backward()

    def _get(self, policy_id: str) -> PolicyState:
        state = self._policies.get(policy_id)
        if state is None:
            raise NotFound(
                f"policy {policy_id!r} is not on this trainer; "
                "create it with create_policy or load_state first"
            )
        return state

    def _swap_in(self, policy_id: str) -> PolicyState:
        """Make the policy's state device-resident, evicting least recently used ones."""
        state = self._get(policy_id)
        if policy_id in self._live:
            self._live.move_to_end(policy_id)
            return state
        while len(self._live) >= self.max_live_policies:
            victim, _ = self._live.popitem(last=False)
            self._policies[victim].move_to(HOST, self._mover)
            log.debug("policy=%s swapped out to host", victim)
        state.move_to(self.base.device, self._mover)
        self._live[policy_id] = None
        log.debug("policy=%s swapped in to %s", policy_id, self.base.device)
        return state

    def _target_logprobs(self, adapters: list[BoundAdapter], batch: Batch) -> torch.Tensor:
        """Logprob of each target under the bound adapters, full softmax in float32: [B, T]."""
        model = self.base.model
        with bound(self.base.binding, adapters):
            hidden = model.get_decoder()(  # type: ignore[operator]
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).last_hidden_state
        # Only real tokens reach the unembedding; it runs in slices that are recomputed in
        # backward, so full-vocabulary logits never exist for the whole batch at once.
        unembed = model.get_output_embeddings()  # type: ignore[operator]
        real = hidden[batch.mask]
        targets = batch.targets[batch.mask]
        step = self.unembed_chunk_tokens
        recompute = torch.is_grad_enabled() and len(real) > step
        parts = [
            _slice_logprobs(unembed, real[i : i + step], targets[i : i + step])
            if not recompute
            else checkpoint(
                _slice_logprobs,
                unembed,
                real[i : i + step],
                targets[i : i + step],
                use_reentrant=False,
            )
            for i in range(0, len(real), step)
        ]
        logprobs = torch.zeros(batch.targets.shape, dtype=torch.float32, device=hidden.device)
        return logprobs.masked_scatter(batch.mask, torch.cat(parts))

    def _missing_targets(self, signature: LoraSignature) -> list[str]:
        present = {path.rsplit(".", 1)[-1] for path in self.base.layers}
        return sorted(set(signature.target_modules) - present)

    def _check_targets(self, signature: LoraSignature) -> None:
        missing = self._missing_targets(signature)
        if missing:
            present = sorted({path.rsplit(".", 1)[-1] for path in self.base.layers})
            raise UserError(
                f"target modules {missing} do not exist on base {self.base.base_id}; "
                f"choose from {present}"
            )

    def _base_problems(self, metadata: dict[str, str]) -> list[str]:
        problems = []
        for key, ours in (
            ("base_id", self.base.base_id),
            ("base_fingerprint", self.base.fingerprint),
        ):
            if metadata.get(key) != ours:
                problems.append(f"{key} is {metadata.get(key)!r}, this trainer's base has {ours!r}")
        return problems


def _slice_logprobs(
    unembed: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Logprob of each target in a slice of hidden states, full softmax in float32."""
    logits = unembed(hidden).float()
    return -F.cross_entropy(logits, targets, reduction="none")


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(HOST, dtype=torch.float32, copy=True)

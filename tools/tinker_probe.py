"""Conformance probe: call every public method of the installed `tinker` SDK's clients.

It discovers the public methods of `ServiceClient`, `TrainingClient`, `SamplingClient` and
`RestClient`, calls each against a live server with sensible arguments (an `*_async` method
is awaited with its sync twin's arguments), and writes a report: supported, or unsupported
with the error the server gave. It is a plain SDK client and imports nothing from mint.

    python tools/tinker_probe.py --base-url http://127.0.0.1:8000 --base-model B --out report.md
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import inspect
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import tinker
from tinker import types

CALL_TIMEOUT_S = 45.0
PROJECT = "probe-project"
CLASSES = ("ServiceClient", "TrainingClient", "SamplingClient", "RestClient")
# Destructive calls run last, in this order, on throwaway resources.
LAST = (
    "RestClient.delete_checkpoint",
    "RestClient.delete_checkpoint_from_tinker_path",
    "ServiceClient.close",
)


@dataclass
class Context:
    base_url: str
    api_key: str
    base_model: str
    service: Any = None
    training: Any = None
    sampler: Any = None
    rest: Any = None
    state_path: str = ""
    sampler_path: str = ""
    session_id: str = ""
    counter: int = 0

    def fresh_name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    def datum(self) -> types.Datum:
        tokens = [5, 6, 7, 8, 9, 10]
        return types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:]},
        )

    def prompt(self) -> types.ModelInput:
        return types.ModelInput.from_ints([5, 6, 7])

    def throwaway_sampler_path(self) -> str:
        """A revision no alias points at (a newer export moves `latest` past it)."""
        doomed = _resolve(self.training.save_weights_for_sampler(self.fresh_name("gone"))).path
        _resolve(self.training.save_weights_for_sampler(self.fresh_name("keep")))
        return str(doomed)


Call = tuple[tuple[Any, ...], dict[str, Any]]


def _custom_loss(data: list[Any], logprobs: list[Any]) -> tuple[Any, dict[str, float]]:
    total = sum(-lp.sum() for lp in logprobs)
    return total, {"custom:sum": float(total)}


def _per_datum_loss(logprobs: Any, weights: Any) -> tuple[Any, dict[str, Any]]:
    """The shape `create_custom_loss` traces: target logprobs first, then loss_fn_inputs."""
    loss = -(logprobs * weights).sum()
    return loss, {"custom/neg_ll:sum": loss}


def _sampler_id_of(ctx: Context) -> str:
    if hasattr(ctx.sampler, "get_sampler_handle"):
        return _sampler_id(ctx.sampler.get_sampler_handle())
    # Older SDKs have no handle; the session lists its samplers.
    return str(_resolve(ctx.rest.get_session(ctx.session_id)).sampler_ids[-1])


def _sampler_id(handle: str) -> str:
    """The sampling session id inside a sampler handle (base64 JSON, as the SDK writes it)."""
    padded = handle + "=" * (-len(handle) % 4)
    return str(json.loads(base64.urlsafe_b64decode(padded))["sampling_session_id"])


def _session_search() -> Any:
    return types.SessionSearchRequest()


RECIPES: dict[str, Callable[[Context], Call]] = {
    "ServiceClient.close": lambda c: (("success",), {}),
    "ServiceClient.copy_weights": lambda c: ((c.sampler_path,), {}),
    "ServiceClient.create_custom_loss": (
        lambda c: ((_per_datum_loss, {"logprobs": 1, "weights": 1}), {})
    ),
    "ServiceClient.create_lora_training_client": lambda c: ((c.base_model,), {"rank": 2}),
    "ServiceClient.create_rest_client": lambda c: ((), {}),
    "ServiceClient.create_sampling_client": lambda c: ((), {"model_path": c.sampler_path}),
    "ServiceClient.create_training_client_from_state": lambda c: ((c.state_path,), {}),
    "ServiceClient.create_training_client_from_state_with_optimizer": (
        lambda c: ((c.state_path,), {})
    ),
    "ServiceClient.get_console_url": lambda c: ((), {}),
    "ServiceClient.get_server_capabilities": lambda c: ((), {}),
    "ServiceClient.get_telemetry": lambda c: ((), {}),
    "TrainingClient.create_sampling_client": lambda c: ((c.sampler_path,), {}),
    "TrainingClient.forward": lambda c: (([c.datum()], "cross_entropy"), {}),
    "TrainingClient.forward_backward": lambda c: (([c.datum()], "cross_entropy"), {}),
    "TrainingClient.forward_backward_custom": lambda c: (([c.datum()], _custom_loss), {}),
    "TrainingClient.get_console_url": lambda c: ((), {}),
    "TrainingClient.get_info": lambda c: ((), {}),
    "TrainingClient.get_telemetry": lambda c: ((), {}),
    "TrainingClient.get_tokenizer": lambda c: ((), {}),
    "TrainingClient.load_state": lambda c: ((c.state_path,), {}),
    "TrainingClient.load_state_with_optimizer": lambda c: ((c.state_path,), {}),
    "TrainingClient.optim_step": lambda c: ((types.AdamParams(learning_rate=1e-4),), {}),
    "TrainingClient.save_state": lambda c: ((c.fresh_name("state"),), {}),
    "TrainingClient.save_weights_and_get_sampling_client": lambda c: ((), {}),
    "TrainingClient.save_weights_external": lambda c: ((c.fresh_name("external"),), {}),
    "TrainingClient.save_weights_for_sampler": lambda c: ((c.fresh_name("sampler"),), {}),
    "SamplingClient.compute_logprobs": lambda c: ((c.prompt(),), {}),
    "SamplingClient.create": lambda c: ((c.service.holder,), {"model_path": c.sampler_path}),
    "SamplingClient.from_sampler_handle": (
        lambda c: ((c.sampler.get_sampler_handle(),), {"api_key": c.api_key})
    ),
    "SamplingClient.get_base_model": lambda c: ((), {}),
    "SamplingClient.get_sampler_handle": lambda c: ((), {}),
    "SamplingClient.get_telemetry": lambda c: ((), {}),
    "SamplingClient.get_tokenizer": lambda c: ((), {}),
    "SamplingClient.on_queue_state_change": lambda c: (("active", None), {}),
    "SamplingClient.sample": (lambda c: ((c.prompt(), 1, types.SamplingParams(max_tokens=2)), {})),
    "RestClient.assign_session_project": lambda c: ((c.session_id, "probe-project"), {}),
    "RestClient.copy_weights": lambda c: ((c.sampler_path, PROJECT), {}),
    "RestClient.delete_checkpoint": (
        lambda c: (
            (
                c.training.model_id,
                "sampler_weights/" + c.throwaway_sampler_path().rsplit("/", 1)[-1],
            ),
            {},
        )
    ),
    "RestClient.delete_checkpoint_from_tinker_path": lambda c: ((c.throwaway_sampler_path(),), {}),
    "RestClient.export_session_trace": lambda c: ((c.session_id,), {}),
    "RestClient.get_audit_log": lambda c: ((), {}),
    "RestClient.get_billing_usage": (
        lambda c: ((datetime.now(UTC) - timedelta(days=1), datetime.now(UTC)), {})
    ),
    "RestClient.get_current_checkpoint_storage_usage": lambda c: ((), {}),
    "RestClient.get_external_weights_urls": lambda c: ((c.sampler_path,), {}),
    "RestClient.get_sampler": lambda c: ((_sampler_id_of(c),), {}),
    "RestClient.get_checkpoint_archive_url": (
        lambda c: ((c.training.model_id, "weights/" + c.state_path.rsplit("/", 1)[-1]), {})
    ),
    "RestClient.get_checkpoint_archive_url_from_tinker_path": lambda c: ((c.sampler_path,), {}),
    "RestClient.get_server_capabilities": lambda c: ((), {}),
    "RestClient.get_session": lambda c: ((c.session_id,), {}),
    "RestClient.get_telemetry": lambda c: ((), {}),
    "RestClient.get_training_run": lambda c: ((c.training.model_id,), {}),
    "RestClient.get_training_run_by_tinker_path": lambda c: ((c.sampler_path,), {}),
    "RestClient.get_weights_info_by_tinker_path": lambda c: ((c.state_path,), {}),
    "RestClient.list_checkpoints": lambda c: ((c.training.model_id,), {}),
    "RestClient.list_sessions": lambda c: ((), {}),
    "RestClient.list_training_runs": lambda c: ((), {}),
    "RestClient.list_user_checkpoints": lambda c: ((), {}),
    "RestClient.publish_checkpoint_from_tinker_path": lambda c: ((c.sampler_path,), {}),
    "RestClient.search_sessions": lambda c: ((_session_search(),), {}),
    "RestClient.set_checkpoint_ttl_from_tinker_path": lambda c: ((c.state_path, 7200), {}),
    "RestClient.unpublish_checkpoint_from_tinker_path": lambda c: ((c.sampler_path,), {}),
    "RestClient.whoami": lambda c: ((), {}),
}


@dataclass
class Outcome:
    method: str
    supported: bool
    reason: str = ""


@dataclass
class Report:
    sdk_version: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(o.supported for o in self.outcomes)

    def markdown(self) -> str:
        lines = [
            f"tinker {self.sdk_version}: {self.passed} of {len(self.outcomes)} public client "
            "methods supported",
            "",
            "| method | result | reason |",
            "|---|---|---|",
        ]
        for o in self.outcomes:
            reason = o.reason.replace("|", "/").replace("\n", " ")[:320]
            lines.append(f"| `{o.method}` | {'ok' if o.supported else 'unsupported'} | {reason} |")
        return "\n".join(lines) + "\n"


def client_class(class_name: str) -> Any:
    """An SDK client class; older SDKs (0.22) export RestClient only from their lib package."""
    found = getattr(tinker, class_name, None)
    if found is None:
        import importlib

        module = importlib.import_module("tinker.lib.public_interfaces.rest_client")
        found = getattr(module, class_name)
    return found


def public_methods() -> list[str]:
    names = []
    for class_name in CLASSES:
        cls = client_class(class_name)
        for name, member in inspect.getmembers(cls):
            if not name.startswith("_") and callable(member):
                names.append(f"{class_name}.{name}")
    order = {name: i for i, name in enumerate(LAST)}
    return sorted(names, key=lambda n: (order.get(n, -1), n))


# Calls that answer download links; each is supported only if its link downloads.
DOWNLOADS = (
    "RestClient.export_session_trace",
    "RestClient.get_checkpoint_archive_url",
    "RestClient.get_checkpoint_archive_url_from_tinker_path",
    "RestClient.get_external_weights_urls",
)


def _check_download(method: str, value: Any) -> None:
    if method.removesuffix("_async") not in DOWNLOADS:
        return
    links = getattr(value, "urls", None) or {"": getattr(value, "url", value)}
    for url in links.values():
        import httpx

        answer = httpx.get(str(url), timeout=60)
        if answer.status_code != 200 or not answer.content:
            raise RuntimeError(f"download link answered {answer.status_code}: {url}")


def _resolve(value: Any, owner: Any = None) -> Any:
    """Wait for whatever a call returned: a coroutine, an SDK future, or a plain value.

    A coroutine runs on a fresh event loop, or on `owner`'s own loop when given.
    """
    if owner is not None and inspect.iscoroutine(value):
        value = owner.holder.run_coroutine_threadsafe(value)
    if inspect.isawaitable(value) and not hasattr(value, "result"):

        async def wait() -> Any:
            return await value

        value = asyncio.run(wait())
    if hasattr(value, "result") and callable(value.result):
        value = value.result(timeout=120)
    return value


def setup(ctx: Context) -> None:
    # Older SDKs return clients directly where newer ones return futures; _resolve takes both.
    ctx.service = tinker.ServiceClient(base_url=ctx.base_url, api_key=ctx.api_key)
    ctx.rest = ctx.service.create_rest_client()
    ctx.training = _resolve(ctx.service.create_lora_training_client(ctx.base_model, rank=2))
    _resolve(ctx.training.forward_backward([ctx.datum()], "cross_entropy"))
    _resolve(ctx.training.optim_step(types.AdamParams(learning_rate=1e-4)))
    ctx.state_path = _resolve(ctx.training.save_state("probe-state")).path
    ctx.sampler_path = _resolve(ctx.training.save_weights_for_sampler("probe-sampler")).path
    ctx.sampler = _resolve(ctx.service.create_sampling_client(model_path=ctx.sampler_path))
    ctx.session_id = ctx.training.model_id.split(":train:")[0]


def target(ctx: Context, class_name: str) -> Any:
    return {
        "ServiceClient": ctx.service,
        "TrainingClient": ctx.training,
        "SamplingClient": ctx.sampler,
        "RestClient": ctx.rest,
    }[class_name]


def call(ctx: Context, method: str) -> Outcome:
    class_name, name = method.split(".")
    recipe = RECIPES.get(method) or RECIPES.get(method.removesuffix("_async"))
    if recipe is None:
        return Outcome(method, False, "the probe has no call recipe for this method")

    def attempt() -> None:
        args, kwargs = recipe(ctx)
        owner = (
            client_class(class_name)
            if name in ("create", "from_sampler_handle")
            else (target(ctx, class_name))
        )
        method_of = getattr(owner, name)
        try:
            result = _resolve(method_of(*args, **kwargs))
        except AssertionError as error:
            # Some 0.22 `*_async` coroutines only run on the client's own loop (their sync
            # twins schedule them there); run them as the SDK itself does.
            if "incorrect event loop" not in str(error):
                raise
            result = _resolve(method_of(*args, **kwargs), owner)
        _check_download(method, result)

    # A call the SDK keeps retrying must not stall the probe: it is reported as timed out.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    running = pool.submit(attempt)
    try:
        running.result(timeout=CALL_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        return Outcome(method, False, f"no answer within {CALL_TIMEOUT_S:.0f}s")
    except Exception as error:  # the report records every failure, whatever its kind
        return Outcome(method, False, f"{type(error).__name__}: {error}")
    finally:
        pool.shutdown(wait=False)  # a stuck call is abandoned, not joined
    return Outcome(method, True)


def probe(base_url: str, api_key: str, base_model: str) -> Report:
    import warnings

    # Where the SDK asks for a project (copy_weights), it reads TINKER_PROJECT_ID.
    earlier = os.environ.get("TINKER_PROJECT_ID")
    os.environ["TINKER_PROJECT_ID"] = earlier or PROJECT
    try:
        ctx = Context(base_url, api_key, base_model)
        setup(ctx)
        report = Report(sdk_version=tinker.__version__)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated methods are still public methods
            for method in public_methods():
                report.outcomes.append(call(ctx, method))
        return report
    finally:
        if earlier is None:
            del os.environ["TINKER_PROJECT_ID"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL", ""))
    parser.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY", ""))
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--out", default="", help="write the markdown report here")
    parser.add_argument("--json", default="", help="write the outcomes as JSON here")
    args = parser.parse_args(argv)
    report = probe(args.base_url, args.api_key, args.base_model)
    text = report.markdown()
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([o.__dict__ for o in report.outcomes], handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

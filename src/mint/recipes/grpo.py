"""`mint rl`: GRPO on arithmetic word problems, two policies at once on one resident base.

Everything goes through the public `tinker` SDK against a running server (started here as a
subprocess when no `--base-url` is given). Each step, for every policy:
  1. sample a group of replies per problem from the policy's latest revision;
  2. reward each reply, subtract the group mean (a group whose rewards are equal teaches
     nothing and is skipped);
  3. `forward_backward` with `importance_sampling` on the sampled tokens, then `optim_step`;
  4. export a revision (`save_weights_for_sampler`), which moves the policy's `latest` alias.
Both policies' jobs are submitted before any result is awaited, so the server batches their
sampling together and interleaves their training on the one copy of the base.
Finally base and each policy's `latest` are evaluated greedily on the held-out split.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mint.recipes.arithmetic import (
    Problem,
    held_out_problems,
    next_training_problem,
    reward,
    training_problems,
)

DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class Policy:
    name: str
    learning_rate: float
    training: Any
    sampler: Any = None
    run_id: str = ""
    history: list[dict[str, float]] = field(default_factory=list)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mint rl", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--base-url",
        default=os.environ.get("TINKER_BASE_URL", ""),
        help="mint server; empty starts one for this run",
    )
    parser.add_argument("--base-model", default=DEFAULT_BASE)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--problems", type=int, default=8, help="problems per step")
    parser.add_argument("--group", type=int, default=8, help="samples per problem")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--learning-rates", default="1e-3,3e-4", help="one policy per comma-separated learning rate"
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--eval-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="", help="default: runs/rl-<time>")
    return parser.parse_args(argv)


class LocalServer:
    """A `mint serve` subprocess on a free port, for runs without --base-url."""

    def __init__(self, api_key: str, preload: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = dict(os.environ, MINT_API_KEYS=f"default={api_key}")
        self.log_path = Path(os.environ.get("MINT_HOME", "~/.mint")).expanduser() / "rl-server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mint", "serve", "--port", str(self.port), "--preload", preload],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"mint serve exited early; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/api/v1/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"mint serve did not become ready; see {self.log_path}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def encode_prompt(tokenizer: Any, problem: Problem) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": problem.question}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def build_datum(prompt: list[int], sequence: Any, advantage: float) -> Any:
    """Input = prompt + reply minus the last token; targets shifted by one; the sampler's
    logprobs and the advantage sit on reply positions only."""
    from tinker import types

    reply = list(sequence.tokens)
    full = prompt + reply
    prompt_positions = len(prompt) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.asarray(full[1:], dtype=np.int64)),
            "logprobs": types.TensorData.from_numpy(
                np.asarray([0.0] * prompt_positions + list(sequence.logprobs), dtype=np.float32)
            ),
            "advantages": types.TensorData.from_numpy(
                np.asarray([0.0] * prompt_positions + [advantage] * len(reply), dtype=np.float32)
            ),
        },
    )


def rollouts(policies: list[Policy], prompts: list[list[int]], args: argparse.Namespace) -> list:
    from tinker import types

    params = types.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    futures = [
        [p.sampler.sample(types.ModelInput.from_ints(x), args.group, params) for x in prompts]
        for p in policies
    ]
    return [[f.result() for f in row] for row in futures]


def grpo_step(
    step: int, policies: list[Policy], tokenizer: Any, rng: Any, args: argparse.Namespace
) -> list[dict[str, float]]:
    from tinker import types

    problems = [next_training_problem(rng) for _ in range(args.problems)]
    prompts = [encode_prompt(tokenizer, problem) for problem in problems]
    started = time.monotonic()
    samples = rollouts(policies, prompts, args)
    sampled_s = time.monotonic() - started
    pending = []
    for policy, responses in zip(policies, samples, strict=True):
        data: list[Any] = []
        rewards: list[float] = []
        mixed = 0
        for prompt, problem, response in zip(prompts, problems, responses, strict=True):
            texts = [
                tokenizer.decode(s.tokens, skip_special_tokens=True) for s in response.sequences
            ]
            group = [reward(text, problem.answer) for text in texts]
            rewards.extend(group)
            mean = sum(group) / len(group)
            if all(r == mean for r in group):
                continue
            mixed += 1
            data.extend(
                build_datum(prompt, seq, r - mean)
                for seq, r in zip(response.sequences, group, strict=True)
            )
        fb = policy.training.forward_backward(data, "importance_sampling") if data else None
        opt = policy.training.optim_step(types.AdamParams(learning_rate=policy.learning_rate))
        pending.append((policy, fb, opt, sum(rewards) / len(rewards), mixed))
    rows = []
    for policy, fb, opt, mean_reward, mixed in pending:
        loss = fb.result().metrics.get("loss:sum", 0.0) if fb is not None else 0.0
        metrics = opt.result().metrics or {}
        path = policy.training.save_weights_for_sampler(f"step-{step + 1}").result().path
        policy.sampler = policy.training.create_sampling_client(path).result()
        row = {
            "step": step + 1,
            "policy": policy.name,
            "learning_rate": policy.learning_rate,
            "reward_mean": mean_reward,
            "groups_with_signal": mixed,
            "loss_sum": loss,
            "grad_norm": metrics.get("grad_norm:mean", float("nan")),
            "sample_seconds": sampled_s,
            "step_seconds": time.monotonic() - started,
        }
        policy.history.append(row)
        rows.append(row)
    return rows


def evaluate(
    samplers: dict[str, Any], tokenizer: Any, problems: list[Problem], max_tokens: int
) -> dict[str, float]:
    """Greedy held-out accuracy of each sampler; all requests go out before any result."""
    from tinker import types

    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    prompts = [types.ModelInput.from_ints(encode_prompt(tokenizer, p)) for p in problems]
    futures = {name: [s.sample(x, 1, params) for x in prompts] for name, s in samplers.items()}
    accuracy = {}
    for name, row in futures.items():
        replies = [
            tokenizer.decode(f.result().sequences[0].tokens, skip_special_tokens=True) for f in row
        ]
        hits = [reward(text, p.answer) for text, p in zip(replies, problems, strict=True)]
        accuracy[name] = sum(hits) / len(hits)
    return accuracy


def print_results(
    console: Any, accuracy: dict[str, float], policies: list[Policy], rest: Any
) -> None:
    from rich.table import Table

    table = Table("model", "held-out accuracy", "vs base", title="Greedy held-out accuracy")
    base = accuracy["base"]
    for name, value in accuracy.items():
        delta = "" if name == "base" else f"{(value - base) * 100:+.1f} pts"
        table.add_row(name, f"{value * 100:.1f}%", delta)
    console.print(table)
    catalog = Table(
        "policy", "checkpoint", "type", "MB", "time", title="Catalog (Tinker checkpoint listing)"
    )
    for policy in policies:
        listing = rest.list_checkpoints(policy.run_id).result()
        for checkpoint in listing.checkpoints:
            catalog.add_row(
                policy.name,
                checkpoint.checkpoint_id,
                checkpoint.checkpoint_type,
                f"{(checkpoint.size_bytes or 0) / 1e6:.1f}",
                checkpoint.time.strftime("%H:%M:%S"),
            )
    console.print(catalog)
    for policy in policies:
        console.print(f"{policy.name}: training run {policy.run_id}")


def run(args: argparse.Namespace, base_url: str, api_key: str, log_dir: Path) -> int:
    import tinker
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    console = Console(emoji=False)  # ids like "s:train:0" are not emoji codes
    started = time.monotonic()
    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    rates = [float(x) for x in args.learning_rates.split(",") if x.strip()]
    policies = []
    for index, rate in enumerate(rates):
        training = service.create_lora_training_client(
            base_model=args.base_model,
            rank=args.rank,
            seed=args.seed + index,
            user_metadata={"recipe": "grpo-arithmetic", "learning_rate": str(rate)},
        ).result()
        policy = Policy(f"policy-{chr(ord('A') + index)}", rate, training)
        policy.run_id = training.model_id
        path = training.save_weights_for_sampler("step-0").result().path
        policy.sampler = training.create_sampling_client(path).result()
        policies.append(policy)
    tokenizer = policies[0].training.get_tokenizer()
    rng = training_problems(args.seed)
    metrics_path = log_dir / "metrics.jsonl"
    with (
        open(metrics_path, "a") as metrics_file,
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress,
    ):
        task = progress.add_task("GRPO steps", total=args.steps)
        for step in range(args.steps):
            for row in grpo_step(step, policies, tokenizer, rng, args):
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                progress.console.print(
                    f"step {row['step']:>2} {row['policy']} reward {row['reward_mean']:.3f} "
                    f"signal {row['groups_with_signal']}/{args.problems} "
                    f"grad {row['grad_norm']:.3g} {row['step_seconds']:.0f}s"
                )
            progress.advance(task)
    samplers = {"base": service.create_sampling_client(base_model=args.base_model).result()}
    for policy in policies:
        latest = f"tinker://{policy.run_id}/sampler_weights/latest"
        samplers[f"{policy.name} (lr {policy.learning_rate:g}, latest)"] = (
            service.create_sampling_client(model_path=latest).result()
        )
    problems = held_out_problems(args.eval_size)
    console.print(f"evaluating {len(samplers)} models on {len(problems)} held-out problems")
    accuracy = evaluate(samplers, tokenizer, problems, args.max_tokens)
    print_results(
        console, accuracy, policies, tinker.RestClient(base_url=base_url, api_key=api_key)
    )
    best = max(value for name, value in accuracy.items() if name != "base")
    summary = {
        "base_accuracy": accuracy["base"],
        "accuracy": accuracy,
        "best_policy_gain_points": (best - accuracy["base"]) * 100,
        "seconds": time.monotonic() - started,
        "runs": {p.name: p.run_id for p in policies},
    }
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(
        f"base {accuracy['base'] * 100:.1f}% -> best policy {best * 100:.1f}% "
        f"({summary['best_policy_gain_points']:+.1f} points) in {summary['seconds']:.0f}s; "
        f"metrics in {metrics_path}"
    )
    service.close("success").result()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    # The SDK logs a warning each time a long poll answers "try again"; a training step
    # routinely outlasts one poll, so those lines are noise here.
    logging.getLogger("tinker").setLevel(logging.ERROR)
    log_dir = Path(args.log_dir or f"runs/rl-{time.strftime('%Y%m%d-%H%M%S')}")
    log_dir.mkdir(parents=True, exist_ok=True)
    api_key = os.environ.get("TINKER_API_KEY") or f"tml-{secrets.token_hex(16)}"
    server = None
    base_url = args.base_url
    if not base_url:
        print("starting a local mint server (the first run converts SmolLM2, about 20 s)")
        server = LocalServer(api_key, args.base_model)
        server.wait_ready()
        base_url = server.url
    try:
        return run(args, base_url, api_key, log_dir)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    raise SystemExit(main())

"""`mint bench trainer`: step time, swap cost, rotation memory and multi-LoRA throughput.

Measured on one resident base (SmolLM2-135M by default; `--quick` uses the tiny test base):

1. per rank: one resident policy's step (forward_backward + optim_step on `batch x seq`
   tokens), and swapping its training state (weights and both Adam moments) out and in;
2. trainer memory (device and host bytes from the trainer's own state, process RSS) with 1,
   10 and 100 policies in rotation at the first rank;
3. four policies' forward_backward jobs as one multi-LoRA pass against the same jobs one
   after another, at several job sizes (RL jobs are often a sequence or two per policy).

Ratios come from runs side by side in this process; timings on a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mint.config import Settings
from mint.models.base import ResidentBase, load_base
from mint.models.lora import LoraSignature
from mint.train import AdamParams, TrainDatum, Trainer
from mint.train.passes import TrainJob

log = logging.getLogger(__name__)

ADAM = AdamParams(learning_rate=1e-4)
ROTATION_COUNTS = (1, 10, 100)
MULTI_POLICIES = 4
#: Per-policy job sizes (rows, tokens per row) for the multi-LoRA comparison; the last one
#: splits the step's 8 x 128 batch four ways.
MULTI_SIZES = ((1, 16), (1, 32), (1, 64), (2, 128))
QUICK_MULTI_SIZES = ((1, 4), (1, 16))


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mint bench trainer", description=__doc__)
    parser.add_argument("--bases-dir", type=Path, default=None, help="default: Settings")
    parser.add_argument("--base", default=None, help="default: smollm2-135m-instruct")
    parser.add_argument("--ranks", default="8,32", help="comma-separated LoRA ranks")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument("--quick", action="store_true", help="tiny base, small sizes (smoke)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per figure")
    return parser.parse_args(argv)


def _data(rng: np.random.Generator, vocab: int, rows: int, length: int) -> list[TrainDatum]:
    return [
        TrainDatum(
            rng.integers(0, vocab, length, dtype=np.int64),
            {"target_tokens": rng.integers(0, vocab, length, dtype=np.int64)},
        )
        for _ in range(rows)
    ]


def _median_s(action: Callable[[], object], repeats: int) -> float:
    """Median wall time of `action` after one untimed warm-up run."""
    action()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; peak RSS elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _step_and_swap(
    base: ResidentBase, rank: int, shape: tuple[int, int], repeats: int
) -> dict[str, float]:
    trainer = Trainer(base, max_live_policies=1)
    trainer.create_policy("p", LoraSignature(rank=rank, alpha=2 * rank))
    data = _data(np.random.default_rng(rank), base.vocab_size, *shape)

    def step() -> None:
        trainer.forward_backward("p", data, "cross_entropy")
        trainer.optim_step("p", ADAM)

    step_s = _median_s(step, repeats)

    def swap() -> None:
        trainer.swap_out("p")
        trainer.swap_in("p")

    swap_s = _median_s(swap, max(repeats, 5))
    tokens = shape[0] * shape[1]
    return {
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "swap_out_in_s": swap_s,
        "swap_fraction_of_step": swap_s / step_s,
        "state_bytes": float(trainer.device_bytes()),
    }


def _rotation(base: ResidentBase, rank: int, length: int) -> dict[str, dict[str, float]]:
    """Memory after every policy took one step, max_live_policies=4."""
    figures = {}
    data = _data(np.random.default_rng(0), base.vocab_size, 1, length)
    for count in ROTATION_COUNTS:
        trainer = Trainer(base, max_live_policies=4)
        for index in range(count):
            policy_id = f"p{index}"
            trainer.create_policy(policy_id, LoraSignature(rank=rank, alpha=2 * rank), index)
            trainer.forward_backward(policy_id, data, "cross_entropy")
            trainer.optim_step(policy_id, ADAM)
        figures[str(count)] = {
            "device_bytes": float(trainer.device_bytes()),
            "host_bytes": float(trainer.host_bytes()),
            "rss_bytes": float(_rss_bytes()),
        }
        del trainer
    return figures


def _multi_lora(
    base: ResidentBase, rank: int, sizes: tuple[tuple[int, int], ...], repeats: int
) -> dict[str, Any]:
    """Per job size: four policies' jobs as one shared pass and as four calls."""
    trainer = Trainer(base, max_live_policies=MULTI_POLICIES)
    rng = np.random.default_rng(1)
    ids = [f"m{index}" for index in range(MULTI_POLICIES)]
    for index, policy_id in enumerate(ids):
        trainer.create_policy(policy_id, LoraSignature(rank=rank, alpha=2 * rank), index)
    figures: dict[str, Any] = {}
    for rows, length in sizes:
        jobs = [
            TrainJob(policy_id, _data(rng, base.vocab_size, rows, length), "cross_entropy")
            for policy_id in ids
        ]
        tokens = MULTI_POLICIES * rows * length

        def one_after_another(jobs: list[TrainJob] = jobs) -> None:
            for job in jobs:
                trainer.forward_backward(*job)

        def shared(jobs: list[TrainJob] = jobs) -> None:
            trainer.forward_backward_many(jobs)

        # Interleaved, so both see the same background load.
        sequential_s, shared_s = _paired_median_s(one_after_another, shared, repeats)
        figures[f"{rows}x{length}"] = {
            "rows_per_policy": float(rows),
            "tokens_per_row": float(length),
            "tokens": float(tokens),
            "sequential_s": sequential_s,
            "shared_s": shared_s,
            "sequential_tokens_per_s": tokens / sequential_s,
            "shared_tokens_per_s": tokens / shared_s,
            "speedup": sequential_s / shared_s,
        }
    return {"policies": float(MULTI_POLICIES), "sizes": figures}


def _paired_median_s(
    first: Callable[[], object], second: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median wall times of two actions run alternately, after one warm-up run of each."""
    first()
    second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for action, kept in ((first, times[0]), (second, times[1])):
            started = time.perf_counter()
            action()
            kept.append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])


def run(options: argparse.Namespace) -> dict[str, Any]:
    settings = Settings()
    bases_dir = options.bases_dir or settings.bases_dir
    name = options.base or ("tiny-llama" if options.quick else "smollm2-135m-instruct")
    shape = (4, 16) if options.quick else (8, 128)
    repeats = options.repeats or (1 if options.quick else 2)
    ranks = [int(rank) for rank in options.ranks.split(",") if rank.strip()]
    torch.set_num_threads(options.threads)
    base = load_base(name, bases_dir, device=settings.device, dtype=settings.dtype)
    figures: dict[str, Any] = {
        "base": base.base_id,
        "device": str(base.device),
        "dtype": str(base.dtype).removeprefix("torch."),
        "threads": options.threads,
        "batch": {"rows": shape[0], "tokens_per_row": shape[1]},
        "ranks": {},
    }
    for rank in ranks:
        log.info("bench trainer: rank %d step and swap", rank)
        figures["ranks"][str(rank)] = _step_and_swap(base, rank, shape, repeats)
    log.info("bench trainer: rotation memory")
    figures["rotation"] = {"rank": ranks[0], "policies": _rotation(base, ranks[0], 16)}
    log.info("bench trainer: multi-LoRA pass")
    sizes = QUICK_MULTI_SIZES if options.quick else MULTI_SIZES
    figures["multi_lora"] = {"rank": ranks[0], **_multi_lora(base, ranks[0], sizes, repeats)}
    return figures


def _print(figures: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    mib = 1024 * 1024
    console = Console(emoji=False)  # ids like "s:train:0" are not emoji codes
    batch = figures["batch"]
    title = (
        f"trainer on {figures['base']} ({figures['device']}/{figures['dtype']}, "
        f"{figures['threads']} threads, {batch['rows']} x {batch['tokens_per_row']} tokens)"
    )
    steps = Table(title=title)
    for column in ("rank", "step s", "tok/s", "swap out+in ms", "swap / step", "state MiB"):
        steps.add_column(column, justify="right")
    for rank, row in figures["ranks"].items():
        steps.add_row(
            rank,
            f"{row['step_s']:.3f}",
            f"{row['tokens_per_s']:.0f}",
            f"{row['swap_out_in_s'] * 1e3:.1f}",
            f"{row['swap_fraction_of_step']:.2%}",
            f"{row['state_bytes'] / mib:.1f}",
        )
    console.print(steps)
    memory = Table(title=f"rotation memory, rank {figures['rotation']['rank']}, 4 live")
    for column in ("policies", "device MiB", "host MiB", "process RSS MiB"):
        memory.add_column(column, justify="right")
    for count, row in figures["rotation"]["policies"].items():
        memory.add_row(
            count,
            f"{row['device_bytes'] / mib:.1f}",
            f"{row['host_bytes'] / mib:.1f}",
            f"{row['rss_bytes'] / mib:.0f}",
        )
    console.print(memory)
    multi = figures["multi_lora"]
    shared = Table(
        title=f"{multi['policies']:.0f} policies' forward_backward jobs, rank {multi['rank']}: "
        "one shared multi-LoRA pass vs one after another"
    )
    for column in ("job per policy", "one after another tok/s", "shared pass tok/s", "speedup"):
        shared.add_column(column, justify="right")
    for size, row in multi["sizes"].items():
        shared.add_row(
            f"{size} tokens",
            f"{row['sequential_tokens_per_s']:.0f}",
            f"{row['shared_tokens_per_s']:.0f}",
            f"x{row['speedup']:.2f}",
        )
    console.print(shared)


def main(argv: list[str] | None = None) -> int:
    options = _options(argv)
    figures = run(options)
    _print(figures)
    if options.out is not None:
        options.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # One line per created policy (111 of them) would bury the figures.
    logging.getLogger("mint.train").setLevel(logging.WARNING)
    raise SystemExit(main())

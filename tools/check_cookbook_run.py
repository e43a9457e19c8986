"""Check one tinker-cookbook recipe run and print a summary line; exit 1 if it failed.

A run passed when the recipe exited 0, its `metrics.jsonl` holds exactly the steps 0 and 1,
each with the recipe's key metrics present and finite, and `checkpoints.jsonl` records the
final checkpoint (its `tinker://` paths come from mint). Used by scripts/test-cookbook.sh:

    python tools/check_cookbook_run.py RECIPE LOG_PATH EXIT_STATUS SECONDS
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

STEPS = [0, 1]
RL_METRICS = ("env/all/reward/total", "optim/entropy", "optim/kl_sample_train_v1")
KEY_METRICS = {
    "math_rl": (*RL_METRICS, "env/all/correct"),
    "sl_basic": ("train_mean_nll", "num_tokens"),
    "shorter": (*RL_METRICS, "env/all/win_minus_loss"),
    "guess_number": (*RL_METRICS, "env/all/turns_per_episode"),
}
#: The metric shown per step in the summary line.
SHOWN = {"math_rl": "env/all/reward/total", "sl_basic": "train_mean_nll"}


def problems_of(recipe: str, log_path: Path, status: int) -> tuple[list[str], list[dict]]:
    problems = [] if status == 0 else [f"exit status {status}"]
    metrics_file = log_path / "metrics.jsonl"
    if not metrics_file.exists():
        return [*problems, f"{metrics_file} missing"], []
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    steps = [row.get("step") for row in rows]
    if steps != STEPS:
        problems.append(f"logged steps {steps}, expected {STEPS}")
    for row in rows:
        for name in KEY_METRICS[recipe]:
            value = row.get(name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                problems.append(f"step {row.get('step')}: {name} = {value!r}")
    checkpoints = log_path / "checkpoints.jsonl"
    records = checkpoints.read_text().splitlines() if checkpoints.exists() else []
    if not any(json.loads(line).get("name") == "final" for line in records):
        problems.append(f"no final checkpoint in {checkpoints}")
    return problems, rows


def main(argv: list[str]) -> int:
    recipe, log_path, status, seconds = argv[0], Path(argv[1]), int(argv[2]), argv[3]
    problems, rows = problems_of(recipe, log_path, status)
    shown = SHOWN.get(recipe, "env/all/reward/total")
    values = ", ".join(f"{row.get(shown, float('nan')):.4g}" for row in rows)
    verdict = "ok" if not problems else "FAILED: " + "; ".join(problems)
    print(f"{recipe:<13} {seconds:>4}s  {len(rows)} steps  {shown} [{values}]  {verdict}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

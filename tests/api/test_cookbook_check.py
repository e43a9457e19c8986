"""The cookbook lane's verdict: two finite steps and a final checkpoint pass; less fails."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import check_cookbook_run  # noqa: E402


def _write_run(folder: Path, rows: list[dict], final: bool = True) -> Path:
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    record = {"name": "final" if final else "000001", "state_path": "tinker://r/weights/final"}
    (folder / "checkpoints.jsonl").write_text(json.dumps(record) + "\n")
    return folder


def _sl_row(step: int, nll: float) -> dict:
    return {"step": step, "train_mean_nll": nll, "num_tokens": 100}


def test_two_finite_steps_with_a_final_checkpoint_pass(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "sl", [_sl_row(0, 1.5), _sl_row(1, 1.4)])
    assert check_cookbook_run.problems_of("sl_basic", run, 0)[0] == []
    assert check_cookbook_run.main(["sl_basic", str(run), "0", "12"]) == 0


def test_missing_steps_bad_values_exit_status_and_checkpoint_are_each_reported(
    tmp_path: Path,
) -> None:
    run = _write_run(tmp_path / "sl", [_sl_row(0, float("nan"))], final=False)
    problems, _ = check_cookbook_run.problems_of("sl_basic", run, 137)
    assert problems == [
        "exit status 137",
        "logged steps [0], expected [0, 1]",
        "step 0: train_mean_nll = nan",
        f"no final checkpoint in {run / 'checkpoints.jsonl'}",
    ]
    assert check_cookbook_run.main(["sl_basic", str(run), "137", "12"]) == 1
    nothing = tmp_path / "empty"
    nothing.mkdir()
    problems, _ = check_cookbook_run.problems_of("math_rl", nothing, 0)
    assert problems == [f"{nothing / 'metrics.jsonl'} missing"]

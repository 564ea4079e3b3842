"""experiments/run_demo.py without training: the seeds it records, and the verdict it writes
(top-1 on the test images and the command's wall time, both against issue 19's demo target)."""

import pytest

from experiments import run_demo


def _res(points, final_top1):
  pts = [{"wall_s": w, "top1": t, "eval_s": 1.0, "step": i + 1} for i, (w, t) in enumerate(points)]
  return {
    "final_eval": {"top1": final_top1, "top5": 0.998},
    "curve": {"points": pts, "eval_s_total": float(len(pts))},
  }


def test_the_target_needs_both_the_accuracy_and_the_time():
  assert run_demo.verdict(0.925, 900.0) == "met"
  assert run_demo.verdict(0.9249, 600.0) == "NOT met"
  assert run_demo.verdict(0.94, 901.0) == "NOT met"


def test_a_seeds_row_says_when_the_curve_first_reached_the_target():
  row = run_demo.seed_summary(1, _res([(300, 0.91), (540, 0.926), (720, 0.93)], 0.93), 750.0, "0.1")
  assert row == ["1", "0.9300", "0.9980", "12.5", "8.8", "0.1", "met"]
  row = run_demo.seed_summary(0, _res([(300, 0.91), (720, 0.92)], 0.92), 750.0, "0.1")
  assert row[4] == "not reached" and row[-1] == "NOT met"


def test_seeds_and_workdir_are_parsed_and_the_rest_passes_to_main():
  workdir, seeds, extra = run_demo.parse_args(["--seeds=2,5", "--workdir=/x", "--config.a=1"])
  assert (workdir, seeds, extra) == ("/x", [2, 5], ["--config.a=1"])
  assert run_demo.parse_args([])[1] == [0, 1]
  with pytest.raises(SystemExit, match="comma-separated"):
    run_demo.parse_args(["--seeds=a"])

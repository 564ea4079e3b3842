"""Runs the Fashion-MNIST progressive demo as the README's first command does, and records it.

  python -m experiments.run_demo [--seeds=0,1] [--workdir=workdirs/demo-record] [main.py flags]

One run per seed (default seeds 0 and 1, one after another: each needs the cores to itself), each
through the sweep runner (common.train: effnetv2_jax.sweep's trial command and runner) in
WORKDIR/seed<S>, its output echoed as it comes and kept in WORKDIR/seed<S>/sweep.log. Writes
experiments/results/demo.md: the command, the machine's load before each run, the target verdict
per seed, the stage plan, and per seed the summary from its results.json (per-stage sizes, steps,
wall and compile seconds, eval top-1) and every progress line the run printed, so the recorded
numbers are exactly what the runs saw; the first seed's curves.png is copied to
experiments/results/demo_curves.png.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time

from experiments import common

MODULE = "experiments.run_demo"
TARGET_TOP1 = 0.925  # issue 19, item 5: on the 10,000 test images
TARGET_MINUTES = 15.0  # wall time of the training command on this 2-core machine
CURVES_NAME = "demo_curves.png"
PRINTED = ("stage ", "done:", "resumed", "error:", "time to accuracy:")


def verdict(top1: float, wall_s: float) -> str:
  met = top1 >= TARGET_TOP1 and wall_s <= 60 * TARGET_MINUTES
  return "met" if met else "NOT met"


def seed_summary(seed: int, res: dict, wall_s: float, load: str) -> list[str]:
  """One row of the summary table: the final eval, the command's wall time, when the curve first
  reached the target (curve points are on the config's eval subset; the last is the final eval
  on all test images), the verdict."""
  from effnetv2_jax import curves

  fe = res["final_eval"]
  reach = curves.time_to(res, TARGET_TOP1)
  return [
    str(seed),
    f"{fe['top1']:.4f}",
    f"{fe['top5']:.4f}",
    f"{wall_s / 60:.1f}",
    "not reached" if reach is None else f"{reach / 60:.1f}",
    load,
    verdict(fe["top1"], wall_s),
  ]


def stage_rows(res: dict) -> list[str]:
  rows = [
    "| stage | size | randaug | mixup | dropout | steps | wall s | compile s | eval top-1 |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for s in res["stages"]:
    top1 = f"{s['eval_top1']:.4f}" if "eval_top1" in s else "-"
    rows.append(
      f"| {s['index']} | {s['image_size']} | {s['randaug_magnitude']:.3g} | "
      f"{s['mixup_alpha']:.3g} | {s['dropout_rate']:.3g} | {s['steps']} | "
      f"{s['wall_s']:.0f} | {s['compile_s']:.1f} | {top1} |"
    )
  return rows


def parse_args(argv):
  workdir = os.path.join(common.ROOT, "workdirs", "demo-record")
  seeds, extra = [0, 1], []
  for a in argv:
    if a.startswith("--workdir="):
      workdir = a.split("=", 1)[1]
    elif a.startswith("--seeds="):
      try:
        seeds = [int(s) for s in a.split("=", 1)[1].split(",") if s.strip()]
      except ValueError:
        sys.exit(f"error: {a!r}: expected --seeds=comma-separated integers, e.g. --seeds=0,1")
      if not seeds:
        sys.exit("error: --seeds= names no seed")
    else:
      extra.append(a)
  return workdir, seeds, extra


def main(argv):
  workdir, seeds, extra = parse_args(argv)
  shutil.rmtree(workdir, ignore_errors=True)
  runs = [
    common.Run(f"demo-seed{s}", "configs/demo.py", f"{workdir}/seed{s}", {"seed": s}, tuple(extra))
    for s in seeds
  ]
  # The plan as main.py prints it for the same flags (nothing trains in --mode=plan).
  plan = subprocess.run(
    runs[0].argv() + ["--mode=plan"], cwd=common.ROOT, capture_output=True, text=True, check=True
  ).stdout
  summary = [
    "| seed | top-1 | top-5 | wall min | curve first at target, min | load before | target |",
    "|---|---|---|---|---|---|---|",
  ]
  details = []
  for run in runs:
    load = common.load_average(1)
    t0 = time.time()
    results, codes = common.train([run], follow=True)
    wall = time.time() - t0
    res = results[run.name]
    if res is None:
      sys.exit(f"{run.name} failed with exit code {codes.get(run.name)}")
    summary.append("| " + " | ".join(seed_summary(run.overrides["seed"], res, wall, load)) + " |")
    with open(os.path.join(run.workdir, "sweep.log"), errors="replace") as f:
      lines = [l.rstrip() for l in f if l.startswith(PRINTED)]
    details += [
      f"## Seed {run.overrides['seed']}: per stage (from results.json)",
      "",
      *stage_rows(res),
      "",
      f"## Seed {run.overrides['seed']}: what the run printed",
      "",
      "```",
      *lines,
      "```",
      "",
    ]
  png = os.path.join(runs[0].workdir, "curves.png")
  curves_line = []
  if os.path.exists(png):
    shutil.copyfile(png, common.results_path(CURVES_NAME))
    curves_line = [
      f"Curves of seed {seeds[0]} (top-1 and train loss against wall time): `{CURVES_NAME}`.",
      "",
    ]

  cmd = common.command(MODULE, argv)
  text = "\n".join(
    [
      "# Fashion-MNIST progressive-learning demo (configs/demo.py)",
      "",
      (
        f"Command: `{cmd.strip()}` (each seed is what `bash scripts/demo.sh` runs after "
        "preparing the data, with `--config.seed=S`)"
      ),
      "",
      (
        f"Machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}; "
        f"recorded {common.timestamp()}"
      ),
      "",
      (
        f"Target: at least {TARGET_TOP1} top-1 on the 10,000 test images within "
        f"{TARGET_MINUTES:g} minutes (wall time of the training command, compiles and evals "
        "included)."
      ),
      "",
      *summary,
      "",
      *curves_line,
      "## Plan (printed before training)",
      "",
      plan.strip(),
      "",
      *details,
    ]
  )
  print(f"wrote {common.write_result('demo.md', text)}")


if __name__ == "__main__":
  main(sys.argv[1:])

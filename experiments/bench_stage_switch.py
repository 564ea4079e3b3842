r"""What a stage switch costs: the demo with compile-ahead off and on, in one run.

  python -m experiments.bench_stage_switch [--epochs 1] [--repeats 1] [--workdir DIR] [--no-record]

Trains configs/demo.py (4 progressive stages, 20 -> 28 px) once with `compile_ahead=False` (each
stage compiles its step at the switch) and once with `compile_ahead=True` (the next stage's step
and the eval step compile on a background thread while the current stage trains), alternating
when `--repeats` > 1, each run alone on the machine, through the sweep runner (experiments.common).
The persistent compilation cache is off in both, so every compile is a real one. Per run it
reports total wall time, each stage's compile seconds, the seconds the loop waited for them and
the stage's img/s (steps x batch over its wall time, compile wait and stage-end eval included),
then the ratios. On this 2-core CPU the background compile shares the cores with training, so
it slows the stage it overlaps: the total wall time says whether hiding the compile pays.

`--compare batch_rule` instead trains the demo with `progressive.batch_rule='constant'` and
`'pixels'` (compile-ahead on), for `--seeds` seeds each, and reports img/s per stage, each stage's
batch and top-1 after the same number of epochs (target: the rules within 0.3 points of top-1).
On this CPU the batch barely changes throughput; the rule is for accelerators.

`--epochs` shortens the demo (default 1 epoch: each stage then trains about 20 s, longer than a
stage's compile); the switch cost does not depend on the run's length once a stage outlasts it.
Appends to experiments/results/bench_stage_switch.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from experiments import common

MODULE = "experiments.bench_stage_switch"
RESULTS = "bench_stage_switch.md"
TITLE = "Stage switches: compile-ahead off vs on (same machine, same run)"


def _runs(args):
  runs = []
  for r in range(args.repeats):
    for ahead in (False, True):
      name = f"ahead-{'on' if ahead else 'off'}-{r}"
      overrides = {
        "compile_ahead": ahead,
        "num_epochs": args.epochs,
        "compilation_cache_dir": "",
        "checkpoint_every_steps": 100000,
      }
      runs.append(common.Run(name, "configs/demo.py", os.path.join(args.workdir, name), overrides))
  return runs


def _rule_runs(args):
  runs = []
  for seed in range(args.seeds):
    for rule in ("constant", "pixels"):
      name = f"{rule}-seed{seed}"
      overrides = {
        "progressive.batch_rule": rule,
        "seed": seed,
        "num_epochs": args.epochs,
        "checkpoint_every_steps": 100000,
      }
      runs.append(common.Run(name, "configs/demo.py", os.path.join(args.workdir, name), overrides))
  return runs


def _rule_report(args, runs, results):
  lines = [
    "| run | batch per stage | img/s per stage | total wall s | top-1 |",
    "|---|---|---|---|---|",
  ]
  for r in runs:
    res = results[r.name]
    stages = res["stages"]
    lines.append(
      f"| {r.name} | {'/'.join(str(s['batch_size']) for s in stages)} | "
      + "/".join(f"{s['steps'] * s['batch_size'] / max(s['wall_s'], 1e-9):.0f}" for s in stages)
      + f" | {res['total_wall_s']:.1f} | {res['final_eval']['top1']:.4f} |"
    )
  top1 = {
    rule: [results[r.name]["final_eval"]["top1"] for r in runs if r.name.startswith(rule)]
    for rule in ("constant", "pixels")
  }
  mean = {k: sum(v) / len(v) for k, v in top1.items()}
  gap = 100 * (mean["pixels"] - mean["constant"])
  lines += [
    "",
    f"- Mean top-1 over {args.seeds} seed(s): constant {mean['constant']:.4f}, pixels "
    f"{mean['pixels']:.4f}, {gap:+.2f} points (target: within 0.3): "
    f"**{'met' if abs(gap) <= 0.3 else 'missed'}**.",
  ]
  return lines


def _row(name, res, batch):
  stages = res["stages"]
  later_wait = sum(s["compile_wait_s"] for s in stages[1:])
  later_compile = sum(s["compile_s"] for s in stages[1:])
  ips = "/".join(f"{s['steps'] * batch / max(s['wall_s'], 1e-9):.0f}" for s in stages)
  waits = "/".join(f"{s['compile_wait_s']:.1f}" for s in stages)
  compiles = "/".join(f"{s['compile_s']:.1f}" for s in stages)
  return (
    f"| {name} | {res['total_wall_s']:.1f} | {compiles} | {waits} | {later_wait:.1f} | "
    f"{later_compile:.1f} | {ips} | {res['final_eval']['top1']:.4f} |"
  )


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--epochs", type=float, default=1.0)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--workdir", default=os.path.join(common.ROOT, "workdirs", "bench_stage_switch"))
  p.add_argument("--no-record", action="store_true")
  p.add_argument("--compare", choices=("compile_ahead", "batch_rule"), default="compile_ahead")
  p.add_argument("--seeds", type=int, default=2, help="with --compare batch_rule")
  args = p.parse_args(argv)
  if args.compare == "batch_rule":
    args.workdir += "_batch_rule"
  shutil.rmtree(args.workdir, ignore_errors=True)
  load = common.load_average(3)
  runs = _rule_runs(args) if args.compare == "batch_rule" else _runs(args)
  results, codes = common.train(runs)
  missing = [r.name for r in runs if results.get(r.name) is None]
  if missing:
    sys.exit(f"runs failed: {missing} (exit codes {codes}); see their sweep.log")
  if args.compare == "batch_rule":
    head = common.heading(
      f"Demo ({args.epochs:g} epoch(s)), batch_rule constant vs pixels",
      common.command(MODULE, argv),
      f"load average before {load}, after {common.load_average(3)}; compile-ahead on; runs "
      "one after another",
    )
    text = "\n".join([*head, "", *_rule_report(args, runs, results), ""])
    common.publish(text, RESULTS, TITLE, MODULE, record=not args.no_record)
    return
  from configs import demo

  batch = demo.get_config().batch_size
  lines = [
    "| run | total wall s | compile s per stage | compile wait s per stage | wait after stage 1 | "
    "compile after stage 1 | img/s per stage | top-1 |",
    "|---|---|---|---|---|---|---|---|",
  ]
  lines += [_row(r.name, results[r.name], batch) for r in runs]
  off = [results[r.name] for r in runs if not r.overrides["compile_ahead"]]
  on = [results[r.name] for r in runs if r.overrides["compile_ahead"]]
  mean = lambda xs: sum(xs) / len(xs)
  wall_off, wall_on = mean([r["total_wall_s"] for r in off]), mean([r["total_wall_s"] for r in on])
  wait_on = mean([sum(s["compile_wait_s"] for s in r["stages"][1:]) for r in on])
  wait_off = mean([sum(s["compile_wait_s"] for s in r["stages"][1:]) for r in off])
  summary = [
    "",
    f"- Summed compile wait after the first stage: {wait_off:.1f} s compiling at the switch, "
    f"{wait_on:.1f} s with compile-ahead (target: at most 3 s): "
    f"**{'met' if wait_on <= 3 else 'missed'}**.",
    f"- Total wall: {wall_off:.1f} s -> {wall_on:.1f} s, {wall_off - wall_on:+.1f} s saved, against "
    f"{wait_off:.1f} s of stages 2-4 compile at the switch (target: at least half, "
    f"{wait_off / 2:.1f} s): **{'met' if wall_off - wall_on >= wait_off / 2 else 'missed'}**.",
    "- Same top-1 in both modes is expected: the compiled programs are the same "
    "(tests/test_train.py checks the params bit for bit on a tiny config).",
  ]
  head = common.heading(
    f"Demo ({args.epochs:g} epoch(s)), compile-ahead off vs on",
    common.command(MODULE, argv),
    f"load average before {load}; persistent compilation cache off; runs alternate, each alone",
  )
  text = "\n".join([*head, "", *lines, *summary, ""])
  common.publish(text, RESULTS, TITLE, MODULE, record=not args.no_record)


if __name__ == "__main__":
  main(sys.argv[1:])

r"""Does plan mode's probe predict the run? Predicted against measured wall time, per stage and in
total, for a short Fashion-MNIST demo run on this machine.

  python -m experiments.plan_vs_run [--config configs/demo.py] [--steps 240] [--probe-steps 3]
      [--compile-ahead config|on|off] [--workdir DIR] [--no-record]

1. `python -m effnetv2_jax.main --config=CONFIG --mode=plan --plan_probe` (the same overrides as
   the run) writes DIR/probe/plan.json: per stage compile seconds, s/step and the predicted wall.
2. The run itself, through the sweep runner (experiments.common.train), in DIR/run, which writes
   results.json: per stage `wall_s` (its compile wait, steps, logging, checkpoints and stage-end
   eval) and `total_wall_s` (the run's clock, from the built state to the written results).
3. Predicted / measured for each stage, for the run's clock (`predicted_run_s` vs `total_wall_s`)
   and for the whole training command (`predicted_total_s`, which adds the state init, against the
   process's wall time, which also pays Python/TF/JAX start-up that the probe does not predict).
   The check: the run's clock within 30% of the prediction.

Both use the config's XLA settings with the persistent compilation cache off
(`compilation_cache_dir=''`), so the run compiles cold as the probe does. Per stage on a CPU with
compile-ahead on, the run compiles stage k+1 while stage k trains and records that time in
stage k, while the probe charges each compile to its own stage (effnetv2_jax/plan_probe.py): the
totals compare like for like, the stages then less so (`--compile-ahead off` compares both).
The demo's data must be prepared (`bash scripts/demo.sh` or effnetv2_jax.data.prepare).
Appends to experiments/results/plan_vs_run.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from experiments import common

MODULE = "experiments.plan_vs_run"
RESULTS = "plan_vs_run.md"
TOLERANCE = 0.30


def _ratio(predicted: float, measured: float) -> str:
  return f"{predicted / measured:.2f}" if measured > 0 else "?"


def _runs(args, base: str):
  overrides = {"num_train_steps": args.steps, "compilation_cache_dir": ""}
  if args.compile_ahead != "config":
    overrides["compile_ahead"] = args.compile_ahead == "on"
  probe_flags = ("--mode=plan", "--plan_probe", f"--plan_probe_steps={args.probe_steps}")
  probe = common.Run("probe", args.config, os.path.join(base, "probe"), overrides, probe_flags)
  run = common.Run("run", args.config, os.path.join(base, "run"), overrides)
  return probe, run


def _probe(probe: common.Run) -> tuple[dict, str, float]:
  env = dict(
    os.environ, PYTHONPATH=os.pathsep.join([common.ROOT, os.environ.get("PYTHONPATH", "")])
  )
  t0 = time.time()
  out = subprocess.run(
    probe.argv(), cwd=common.ROOT, env=env, capture_output=True, text=True, check=False
  )
  wall = time.time() - t0
  if out.returncode:
    sys.exit(f"the probe failed ({out.returncode}):\n{out.stderr[-3000:]}")
  print(out.stdout, flush=True)
  with open(os.path.join(probe.workdir, "plan.json")) as f:
    return json.load(f), out.stdout, wall


def compare(plan: dict, results: dict, process_wall_s: float) -> tuple[list[str], bool]:
  """The predicted-vs-measured table (markdown lines) and whether the run's clock is within
  TOLERANCE of the prediction."""
  rows = []
  for p, m in zip(plan["stages"], results["stages"]):
    rows.append(
      [
        p["index"],
        p["image_size"],
        p["steps"],
        f"{p['compile_s']:.1f} / {m['compile_s']:.1f}",
        f"{p['predicted_s']:.1f}",
        f"{m['wall_s']:.1f}",
        _ratio(p["predicted_s"], m["wall_s"]),
      ]
    )
  run_ratio = plan["predicted_run_s"] / results["total_wall_s"]
  rows.append(
    [
      "run's clock",
      "",
      results["step"],
      "",
      f"{plan['predicted_run_s']:.1f}",
      f"{results['total_wall_s']:.1f}",
      f"{run_ratio:.2f}",
    ]
  )
  rows.append(
    [
      "training command",
      "",
      "",
      "",
      f"{plan['predicted_total_s']:.1f}",
      f"{process_wall_s:.1f}",
      _ratio(plan["predicted_total_s"], process_wall_s),
    ]
  )
  header = [
    "stage",
    "size",
    "steps",
    "compile s probe / run",
    "predicted s",
    "measured s",
    "predicted / measured",
  ]
  return [common.markdown_table(header, rows)], abs(run_ratio - 1) <= TOLERANCE


def main():
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--config", default="configs/demo.py")
  ap.add_argument("--steps", type=int, default=240, help="num_train_steps of the run")
  ap.add_argument("--probe-steps", type=int, default=3)
  ap.add_argument("--compile-ahead", choices=("config", "on", "off"), default="config")
  ap.add_argument("--workdir", default=os.path.join(common.ROOT, "workdirs", "plan_vs_run"))
  ap.add_argument("--no-record", action="store_true")
  args = ap.parse_args()
  shutil.rmtree(args.workdir, ignore_errors=True)
  probe, run = _runs(args, args.workdir)
  load_before = common.load_average()
  plan, _, probe_wall = _probe(probe)
  t0 = time.time()
  results, codes = common.train([run], follow=True)
  process_wall = time.time() - t0
  load_after = common.load_average()
  res = results["run"]
  if res is None:
    sys.exit(f"the run failed with exit code {codes.get('run')}")
  table, within = compare(plan, res, process_wall)
  verdict = (
    f"run's clock predicted within {TOLERANCE:.0%}: **{'yes' if within else 'no'}** "
    f"(predicted {plan['predicted_run_s']:.1f}s, measured {res['total_wall_s']:.1f}s); "
    f"the probe itself took {probe_wall:.0f}s"
  )
  # The 1-minute load before the probe started is what others ran; after, it includes this run.
  busy = float(load_before.split()[0]) > 1.0 if load_before != "n/a" else False
  concurrent = (
    "1-minute load above 1 before the probe: other processes, or the tail of an earlier one"
    if busy
    else "otherwise idle"
  )
  lines = common.heading(
    f"{args.config}, {args.steps} steps: predicted vs measured wall time",
    common.command(MODULE),
    f"{os.cpu_count()} CPU cores, {plan['num_devices']} x {plan['device_kind']}, load average "
    f"(1/5/15 min) {load_before} before, {load_after} after: {concurrent}",
  )
  lines += ["", *table, "", verdict, ""]
  lines += [
    "Probe header: " + plan_header(plan),
    "",
    (
      "Measured stage s = results.json `wall_s` (compile wait, steps, input, logging, "
      "checkpoints, stage-end eval); the run's clock = `total_wall_s` (state built -> results "
      "written, the final eval included); the training command = the process, start-up and "
      "imports included."
    ),
  ]
  text = "\n".join(lines) + "\n"
  print(text)
  if not args.no_record:
    common.append_result(
      RESULTS, "Plan mode's probe: predicted vs measured wall time", MODULE, text
    )


def plan_header(plan: dict) -> str:
  from effnetv2_jax import plan_probe

  return plan_probe.format_probe(plan).splitlines()[0]


if __name__ == "__main__":
  main()

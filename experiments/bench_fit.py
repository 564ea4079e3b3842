r"""batch_rule='fit' on EfficientNetV2-S at small stage sizes: the batch each stage chose under a
small memory budget, and whether each stage's step ran within it.

  python -m experiments.bench_fit [--budget-mib 2048] [--sizes 64,96,128] [--steps 12]
                                  [--workdir DIR] [--no-record]

Trains the full EfficientNetV2-S (no width or depth cut) in len(--sizes) progressive stages
(preset 'paper', so the sizes are exactly min..max in equal steps) on Fashion-MNIST upsampled to
each stage's size (the demo's 'small' preprocessing; the offline data scripts/demo.sh prepares),
in-process on one CPU device, with `progressive.batch_rule='fit'`, `device_memory_bytes` =
--budget-mib, `batch_multiple` 8 and `max_batch_size` 256, B_ref 32 for `--steps` reference steps
(a few steps per stage), evaluating on 256 test images. At the start the trainer compiles each
stage's step at 8 and 256 images (never runs them), takes the largest multiple of 8 the line
through the two peaks allows, and compiles that batch once more to check it
(effnetv2_jax/batch_fit.py); then it trains the fitted table. Reported per stage: the chosen
batch, the peaks measured to choose it, the peak of the step that trained (XLA's buffer
assignment of the compiled program, memory_fit.peak_bytes) against the budget, steps and img/s;
and the time the fit took. The process' maximum RSS is given for context only: it holds
TensorFlow's input pipeline, the compiler and every device buffer of the one CPU device together,
so it is not the per-device peak the budget is about.

Appends to experiments/results/bench_stage_switch.md (issue 18 item 5, third row).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time

from experiments import common

MODULE = "experiments.bench_fit"
RESULTS = "bench_stage_switch.md"
MiB = 2.0**20


def fit_config(args):
  import ml_collections

  from configs import demo

  c = demo.get_config()
  c.model_name = "efficientnetv2-s"
  c.model_overrides = ml_collections.ConfigDict()  # the real S, not the demo's toy network
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_train_steps = args.steps
  c.train_split = "train[:4096]"
  c.eval_split = "test[:256]"
  c.shuffle_buffer = 1024
  c.warmup_epochs = 0.0
  c.log_every_steps = 1
  c.checkpoint_every_steps = 100000
  c.compilation_cache_dir = ""  # every compile a real one
  sizes = [int(s) for s in args.sizes.split(",")]
  p = c.progressive
  p.preset, p.num_stages = "paper", len(sizes)
  p.min_image_size, p.max_image_size = sizes[0], sizes[-1]
  p.batch_rule, p.batch_multiple, p.max_batch_size = "fit", 8, 256
  c.eval_image_size = sizes[-1]
  c.device_memory_bytes = int(args.budget_mib * MiB)
  return c


def main(argv):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--budget-mib", type=float, default=2048.0)
  ap.add_argument("--sizes", default="64,96,128")
  ap.add_argument("--steps", type=int, default=12, help="reference steps of 32 images")
  ap.add_argument("--workdir", default=os.path.join(common.ROOT, "workdirs", "bench_fit"))
  ap.add_argument("--no-record", action="store_true")
  args = ap.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  from effnetv2_jax import train

  shutil.rmtree(args.workdir, ignore_errors=True)
  config = fit_config(args)
  load_before = common.load_average(3)
  t0 = time.perf_counter()
  res = train.train_and_evaluate(config, args.workdir, devices=jax.devices()[:1])
  wall = time.perf_counter() - t0
  budget = res["batch_fit"]["budget_bytes"]
  rows, ok = [], True
  for s, measured in zip(res["stages"], res["batch_fit"]["measured"]):
    within = s["peak_bytes"] <= budget
    ok = ok and within
    probes = ", ".join(f"{b}: {p / MiB:.0f}" for b, p in measured.items())
    rows.append(
      f"| {s['index']} | {s['image_size']} | {s['batch_size']} | {probes} | "
      f"{s['peak_bytes'] / MiB:.0f} | {'yes' if within else '**no**'} | {s['steps']} | "
      f"{s['steps'] * s['batch_size'] / max(s['wall_s'], 1e-9):.1f} |"
    )
  fit_s = f"{res['batch_fit']['seconds']:.0f} s"
  rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  head = common.heading(
    f"EfficientNetV2-S at {args.sizes.replace(',', '/')} px, batch_rule fit under "
    f"{args.budget_mib:g} MiB",
    common.command(MODULE, argv),
    f"load average before {load_before}, after {common.load_average(3)} (other engineers' "
    "tests share the 2 cores, so the seconds are loose; the batches and peaks are not timing); "
    "one CPU device, float32, persistent compilation cache off",
  )
  lines = [
    *head,
    "",
    "| stage | size | fitted batch | peaks measured to fit it (batch: MiB) | peak of the step "
    "that trained, MiB | within budget | steps | img/s (stage wall, compile wait incl.) |",
    "|---|---|---|---|---|---|---|---|",
    *rows,
    "",
    f"- Budget {budget / MiB:.0f} MiB per device (config.device_memory_bytes); reference batch "
    f"32; multiples of 8, cap 256. Every stage within the budget: **{'met' if ok else 'missed'}**.",
    f"- Fitting took {fit_s} before the first step (two probe compiles and one check per stage); "
    f"whole run {wall:.0f} s, top-1 {res['final_eval']['top1']:.3f} on 256 images after "
    f"{res['step']} steps (not a quality number). Process max RSS {rss_mib:.0f} MiB (TF input "
    "pipeline, compiler and all buffers together: context, not the per-device peak).",
  ]
  text = "\n".join(lines) + "\n"
  print(text)
  if not args.no_record:
    common.append_result(
      RESULTS, "Stage switches: compile-ahead off vs on (same machine, same run)", MODULE, text
    )


if __name__ == "__main__":
  main(sys.argv[1:])

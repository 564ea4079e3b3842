r"""Peak memory per training image of the full train step at each progressive stage size, with and
without block rematerialisation (`model_overrides.remat=True`).

  python -m experiments.bench_memory [--model efficientnetv2-s] [--batch 8] [--sizes 171,214,257,300]

Nothing big is allocated: each train step (common.build_jax_step: train.make_stage_step +
sharding.jit_train_step, exactly the trainer's) is lowered and compiled for the shape, and XLA's
buffer assignment reports what the program needs (`compiled.memory_analysis()`): temp (activations
kept for the backward and scratch), arguments (state + batch), outputs (aliased to the donated
state). Per image = temp / batch; the state is a fixed cost independent of the batch. Writes
experiments/results/bench_memory.md. The numbers are XLA:CPU's buffer assignment; a GPU/TPU compile
lays buffers out differently but the activation volume (and remat's effect on it) carries over
roughly.

XLA:CPU's default concurrency-optimized scheduler keeps many buffers alive at once to run
independent ops in parallel: it about doubles the peak and hides what remat saves (B0 b16@192:
1378 -> 1370 MiB with remat under it, 661 -> 469 MiB without it). This script therefore compiles
with `--xla_cpu_enable_concurrency_optimized_scheduler=false` (the memory-minimizing schedule,
which the package now sets by default on CPU for speed too: effnetv2_jax/xla_defaults.py;
`--cpu-scheduler default` switches that off and keeps XLA's). GPU/TPU schedulers are memory-aware
already.

`--accum 1,2,4,8` measures gradient accumulation instead (config.grad_accum_steps): at each size,
the trainer's step (train.compile_stage_step, abstract inputs, nothing allocated) of the global
`--batch` trained as k micro-batches, its per-device peak (memory_fit.peak_bytes), and what
memory_fit.plan_stage's line (through the largest k and the smallest k > 1 of the list) predicts
for the others. Appends to experiments/results/bench_memory_accum.md.
"""

import argparse
import os

from experiments import common

MODULE = "experiments.bench_memory"
REMAT_RESULTS = (
  "bench_memory.md",
  "Peak train-step memory per image, with and without rematerialisation",
)
ACCUM_RESULTS = ("bench_memory_accum.md", "Train-step peak memory with gradient accumulation")
SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
MiB = 2.0**20


def main():
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--model", default="efficientnetv2-s")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--sizes", default="171,214,257,300", help="official S stage sizes")
  ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
  ap.add_argument(
    "--cpu-scheduler",
    choices=("memory", "default"),
    default="memory",
    help="memory: XLA:CPU without its concurrency-optimized scheduler (see above)",
  )
  ap.add_argument("--accum", default="", help="e.g. 1,2,4,8: peaks per grad_accum_steps instead")
  ap.add_argument("--no-record", action="store_true")
  args = ap.parse_args()
  if args.cpu_scheduler == "memory":  # before jax starts (build_jax_step imports it lazily)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + SCHEDULER_FLAG).strip()
  else:  # the package would add the flag on import (effnetv2_jax/xla_defaults.py)
    os.environ["EFFNETV2_JAX_XLA_DEFAULTS"] = "0"
  if args.accum:
    return accum_table(args)
  rows = []
  for size in [int(s) for s in args.sizes.split(",")]:
    row = {"size": size}
    for remat in (False, True):
      compiled, *_, times = common.build_jax_step(
        args.model, args.batch, size, args.dtype, {"remat": str(remat)}
      )
      m = compiled.memory_analysis()
      row[remat] = dict(
        temp=m.temp_size_in_bytes,
        args=m.argument_size_in_bytes,
        out=m.output_size_in_bytes,
        alias=m.alias_size_in_bytes,
        compile_s=times["compile_s"],
      )
      print(size, "remat" if remat else "plain", row[remat], flush=True)
    rows.append(row)
  argv = ["--model", args.model, "--batch", args.batch, "--sizes", args.sizes, "--dtype"]
  argv += [args.dtype, "--cpu-scheduler", args.cpu_scheduler]
  lines = common.heading(
    f"{args.model}, batch {args.batch}, {args.dtype}: train-step memory from XLA buffer assignment",
    common.command(MODULE, argv),
    f"jax CPU backend, {args.cpu_scheduler} scheduler. temp = activations + scratch of one step; "
    "state = arguments (params, RMSProp slots, EMA, BN stats, batch). Per image = temp / batch.",
  )
  lines += [
    "",
    "| image size | temp MiB | per image MiB | temp MiB, remat | per image MiB, remat | remat saves | "
    "state+batch MiB | compile s (plain / remat) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    a, b = r[False], r[True]
    lines.append(
      f"| {r['size']} | {a['temp'] / MiB:.0f} | {a['temp'] / MiB / args.batch:.1f} | "
      f"{b['temp'] / MiB:.0f} | {b['temp'] / MiB / args.batch:.1f} | "
      f"{1 - b['temp'] / a['temp']:.0%} | {a['args'] / MiB:.0f} | "
      f"{a['compile_s']:.0f} / {b['compile_s']:.0f} |"
    )
  common.publish("\n".join(lines) + "\n", *REMAT_RESULTS, MODULE, record=not args.no_record)


def accum_peaks(model, batch, size, dtype, ks):
  """{k: (peak bytes, compile s)} of the trainer's step at `size` with k micro-batches."""
  import time

  import jax

  from effnetv2_jax import memory_fit, optim, plan, sharding, train

  config = common.bench_config(model, batch, size, dtype)
  run = plan.resolve(config, num_train=common.STEPS_PER_EPOCH * batch, num_classes=1000)
  stage = run.stages[0]
  tx, lr_fn = optim.for_run(config, run)
  mesh = sharding.make_mesh()
  net = train.build_model(config, run.num_classes, stage.dropout_rate)
  spec = train.abstract_state(config, net, tx, size, mesh)
  rng = jax.device_put(jax.random.PRNGKey(1), sharding.replicated(mesh))
  out = {}
  for k in ks:
    config.grad_accum_steps = k
    t0 = time.perf_counter()
    step = train.compile_stage_step(config, run, stage, tx, lr_fn, mesh, spec, rng)
    out[k] = (memory_fit.peak_bytes(step.compiled), time.perf_counter() - t0)
    print(size, f"k={k}", out[k], flush=True)
  return out


def accum_table(args):
  from effnetv2_jax import memory_fit

  ks = sorted(int(k) for k in args.accum.split(","))
  lines = common.heading(
    f"{args.model}, global batch {args.batch}, {args.dtype}: train-step peak per device with k "
    "micro-batches (config.grad_accum_steps)",
    common.command(MODULE),
    f"jax CPU backend, {args.cpu_scheduler} scheduler, load {common.load_average()}. peak = "
    "arguments + outputs - aliased + temporaries (memory_fit.peak_bytes). predicted: the line "
    "through the largest k and the smallest k > 1 listed (memory_fit.plan_stage's two points).",
  )
  lines += [
    "",
    "| image size | k | micro-batch | peak MiB | predicted MiB | error | compile s |",
    "|---|---|---|---|---|---|---|",
  ]
  for size in [int(s) for s in args.sizes.split(",")]:
    peaks = accum_peaks(args.model, args.batch, size, args.dtype, ks)
    acc = [k for k in ks if k > 1]
    line = None
    if len(acc) >= 2:
      lo, hi = acc[-1], acc[0]
      line = memory_fit.PeakLine.through(
        (args.batch // lo, peaks[lo][0]), (args.batch // hi, peaks[hi][0])
      )
    for k in ks:
      peak, compile_s = peaks[k]
      pred = line.at(args.batch // k) if line else float("nan")
      err = f"{pred / peak - 1:+.1%}" if line else "n/a"
      lines.append(
        f"| {size} | {k} | {args.batch // k} | {peak / MiB:.0f} | {pred / MiB:.0f} | {err} | "
        f"{compile_s:.0f} |"
      )
  common.publish("\n".join(lines) + "\n", *ACCUM_RESULTS, MODULE, record=not args.no_record)


if __name__ == "__main__":
  main()

"""Plan mode's probe: compile each stage's train step, time a few steps on synthetic data, and
predict the wall time of every stage and of the whole run.

  python -m effnetv2_jax.main --config=configs/demo.py --mode=plan --plan_probe --workdir=DIR
  result, text = plan_probe.run_probe(config, workdir, steps=3)   # also writes DIR/plan.json

Measured (`measure`), on the mesh the trainer builds, with the trainer's own functions:
  - the state init: train.init_state (the fresh start; its jit compile included);
  - per stage, the program the loop runs (train.compile_stage_step at the stage's batch and size;
    with grad_accum_steps=0 the memory-fit compiles included, as the run pays them): its compile
    seconds, XLA's memory per device (memory_fit.peak_bytes: arguments + outputs - aliased
    (donated) + temporaries), the micro-batches it chose, and seconds per
    step: the median of `steps` steps, each waited for with block_until_ready, after `warmup`
    untimed ones, on one random batch of the stage's shape sharded as real batches are. The
    state is initialised once and carried from stage to stage, as in the run;
  - the eval step (Evaluator.compile_step): compile seconds and seconds per eval batch.
  Compiles are cold: the probe neither reads nor fills the persistent compilation cache, so a run
  whose config.compilation_cache_dir already holds these programs compiles faster than predicted.

Predicted (`predict`, plain arithmetic on those numbers; tests/test_plan_probe.py):
  stage k  = compile paid + steps x s/step [+ the CPU share of compiles running meanwhile]
             + its evals (+ the eval compile, at the first eval)
  total    = state init + the stages + the final eval
  Evals: the final eval; a stage-end eval per stage but the last with eval_every_stage; curve
  evals every eval_every_steps (exact count) and every eval_every_seconds (approximate: counted
  on the predicted clock before the stage's own evals), on eval_subset images when set. One eval
  pass = ceil(images / eval_batch_size) batches x s/batch.
  Compile paid: without config.compile_ahead, each stage's whole compile at its start and the
  eval step's at the first eval. With compile_ahead the compile thread is simulated: it starts
  the eval step and stage 1 when stage 0 starts training, stage k+1 when stage k starts, one at
  a time; a stage pays only what is left of its compile when it starts (and the first eval what
  is left of the eval step's). On a CPU the background compile also shares the cores with the
  stage it overlaps; the model: a compile keeps one of the host's N cores busy, so the stage
  that queued compiles of C seconds takes C / N longer (`compile_sharing_s`). On the 2-core
  development machine that is half of each compile; experiments/results/bench_stage_switch.md
  measured about three quarters there on an idle machine (compile-ahead saved 3.1 of 12.7 s), so
  this is optimistic by about a quarter of the compile time on small CPUs.

Not measured: the input pipeline (synthetic batches; a run whose tf.data cannot keep up, or that
fills a large shuffle buffer at each stage start, takes longer), checkpoint writes, metric
writing, process start-up and imports. `predicted_run_s` leaves the state init out: it is what
results.json's `total_wall_s` counts (the run's clock starts once the state is built).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable

from effnetv2_jax import paths
from effnetv2_jax import plan as plan_lib

MiB = 2.0**20
NOT_MEASURED = "input pipeline, checkpoint writes and process start-up are not measured"


def _reset_persistent_cache() -> None:
  try:
    from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top

    compilation_cache.reset_cache()
  except (ImportError, AttributeError):
    pass


@contextlib.contextmanager
def cold_compiles():
  """No persistent compilation cache inside (restored on exit): every compile is a real one, and
  none is left in the cache for the run to find."""
  import jax

  before = jax.config.jax_compilation_cache_dir
  if not before:
    yield
    return
  jax.config.update("jax_compilation_cache_dir", None)
  _reset_persistent_cache()
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
    _reset_persistent_cache()


def peak_bytes(compiled) -> int | None:
  """memory_fit.peak_bytes (per device, from XLA's buffer assignment); None where the backend
  reports no memory analysis."""
  from effnetv2_jax import memory_fit

  try:
    return memory_fit.peak_bytes(compiled)
  except (NotImplementedError, RuntimeError):
    return None


def synthetic_batch(
  mesh, batch_size: int, image_size: int, num_classes: int, *, seed=0, mask=False
):
  """Random images and labels of a real batch's shape and dtype, this process's rows of the
  global batch, sharded over 'data' as sharding.shard_batch shards the input pipeline's."""
  import jax
  import numpy as np

  from effnetv2_jax import sharding

  n = batch_size // jax.process_count()
  r = np.random.default_rng(seed)
  host = {
    "image": r.normal(size=(n, image_size, image_size, 3)).astype(np.float32),
    "label": r.integers(0, num_classes, size=n).astype(np.int32),
  }
  if mask:
    host["mask"] = np.ones((n,), np.float32)
  return sharding.shard_batch(host, mesh)


def _seconds_per_call(call: Callable[[], object], steps: int, warmup: int) -> float:
  """The median of `steps` timed calls (each waited for), after `warmup` untimed ones: one slow
  call (another process taking the cores, a first-touch allocation) does not set the rate."""
  import jax

  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def measure(
  config,
  run: plan_lib.RunPlan,
  *,
  steps: int = 3,
  warmup: int = 1,
  devices=None,
  log: Callable[[str], None] | None = None,
) -> dict:
  """Compile and time what the run will compile and run (module docstring); -> the numbers
  `predict` takes: backend, device kind and count, init_s, per stage compile_s, peak_bytes and
  step_s, and the eval step's compile_s, peak_bytes and step_s."""
  import jax

  from effnetv2_jax import optim, sharding, train
  from effnetv2_jax import state as state_lib
  from effnetv2_jax.evaluation import Evaluator

  log = log or (lambda _: None)
  mesh = sharding.make_mesh(devices)
  # As train._open_run builds them: the schedule follows the stage table's images.
  tx, lr_fn = optim.for_run(config, run)
  out = {
    "backend": jax.default_backend(),
    "host_cores": len(os.sched_getaffinity(0))
    if hasattr(os, "sched_getaffinity")
    else os.cpu_count(),
    "device_kind": mesh.devices.flat[0].device_kind,
    "num_devices": int(mesh.size),
    "steps": int(steps),
    "warmup": int(warmup),
    "stages": [],
  }
  with cold_compiles():
    t0 = time.perf_counter()
    first = run.stages[0]
    model = train.build_model(config, run.num_classes, first.dropout_rate)
    state = jax.block_until_ready(train.init_state(config, model, tx, first.image_size, mesh))
    out["init_s"] = time.perf_counter() - t0
    log(f"probe: state built in {out['init_s']:.1f}s")
    state_spec = train.spec_of(state)
    rng = jax.device_put(jax.random.PRNGKey(config.seed), sharding.replicated(mesh))
    for stage in run.stages:
      batch_size = stage.batch_size
      t0 = time.perf_counter()
      # With grad_accum_steps=0 this compiles the few candidates memory_fit tries, as the run does.
      stage_step = train.compile_stage_step(config, run, stage, tx, lr_fn, mesh, state_spec, rng)
      compile_s = time.perf_counter() - t0
      compiled = stage_step.compiled
      batch = synthetic_batch(mesh, batch_size, stage.image_size, run.num_classes, seed=stage.index)
      holder = [state]

      def step(compiled=compiled, batch=batch, holder=holder):
        holder[0], metrics = compiled(holder[0], batch, rng)  # the state is donated
        return holder[0], metrics

      step_s = _seconds_per_call(step, steps, warmup)
      state = holder[0]
      out["stages"].append(
        {
          "compile_s": compile_s,
          "peak_bytes": stage_step.peak_bytes,
          "grad_accum_steps": stage_step.grad_accum_steps,
          "step_s": step_s,
        }
      )
      log(
        f"probe: stage {stage.index + 1}/{len(run.stages)} ({stage.image_size}px, batch "
        f"{batch_size}) compiled in {compile_s:.1f}s, {step_s:.4g} s/step"
      )
    evaluator = Evaluator(config, run, mesh)
    t0 = time.perf_counter()
    compiled = evaluator.compile_step(state_spec)
    compile_s = time.perf_counter() - t0
    variables = state_lib.eval_variables(state)
    batch = synthetic_batch(
      mesh, config.eval_batch_size, config.eval_image_size, run.num_classes, mask=True
    )
    step_s = _seconds_per_call(lambda: compiled(variables, batch), steps, warmup)
    out["eval"] = {"compile_s": compile_s, "peak_bytes": peak_bytes(compiled), "step_s": step_s}
    log(f"probe: eval step compiled in {compile_s:.1f}s, {step_s:.4g} s/batch")
  return out


def _batches(images: int, batch_size: int) -> int:
  return -(-int(images) // int(batch_size))


def _stage_evals(config, stage, clock_start: float, clock_end: float, is_last: bool) -> dict:
  """How many evals the run does inside `stage` (see the module docstring)."""
  every_steps = int(config.get("eval_every_steps", 0) or 0)
  every_s = float(config.get("eval_every_seconds", 0.0) or 0.0)
  by_steps = stage.last_step // every_steps - stage.first_step // every_steps if every_steps else 0
  by_time = math.floor(clock_end / every_s) - math.floor(clock_start / every_s) if every_s else 0
  stage_end = int(bool(config.eval_every_stage) and not is_last)
  # Where in the stage the first of them comes (only the compile-ahead simulation needs it).
  if by_steps:
    first = (stage.first_step // every_steps + 1) * every_steps
    at = (first - stage.first_step) / max(stage.num_steps, 1)
  else:
    at = 1.0
  return {"curve": by_steps + by_time, "stage_end": stage_end, "first_at": at}


def predict(config, run: plan_lib.RunPlan, measured: dict, *, num_eval: int) -> dict:
  """The plan table (what plan.json holds) from `measure`'s numbers: per stage what it trains
  and the predicted seconds, the eval costs, and the totals. Pure arithmetic, no device."""
  stages_m, ev = measured["stages"], measured["eval"]
  overlap = bool(config.compile_ahead)
  # On a CPU a background compile takes about one of the cores from the step it overlaps.
  on_cpu = measured["backend"] == "cpu"
  share = 1.0 / max(int(measured.get("host_cores") or 1), 1) if on_cpu else 0.0
  subset = int(config.get("eval_subset", 0) or 0)
  full_batches = _batches(num_eval, config.eval_batch_size)
  curve_batches = _batches(min(subset, num_eval) if subset else num_eval, config.eval_batch_size)
  full_pass_s, curve_pass_s = full_batches * ev["step_s"], curve_batches * ev["step_s"]
  n = len(run.stages)
  clock = 0.0  # the run's clock: starts once the state is built
  thread_free, ready, eval_ready = 0.0, {}, 0.0  # the compile thread (compile-ahead only)
  eval_compile_due = True
  rows = []
  for k, (stage, m) in enumerate(zip(run.stages, stages_m)):
    start = clock
    paid = m["compile_s"] if not overlap or k == 0 else max(0.0, ready[k] - clock)
    clock += paid
    sharing_s = 0.0
    if overlap:  # what the loop queues once this stage's step is compiled
      t = max(thread_free, clock)
      queued = (ev["compile_s"] if k == 0 else 0.0) + (
        stages_m[k + 1]["compile_s"] if k + 1 < n else 0.0
      )
      if k == 0:
        eval_ready = t + ev["compile_s"]
      if k + 1 < n:
        ready[k + 1] = t + queued
      thread_free = t + queued
      sharing_s = queued * share
    batch = stage.batch_size
    train_s = stage.num_steps * m["step_s"]
    evals = _stage_evals(config, stage, start, clock + train_s, k == n - 1)
    eval_s = evals["curve"] * curve_pass_s + evals["stage_end"] * full_pass_s
    eval_compile_s = 0.0
    if eval_compile_due and evals["curve"] + evals["stage_end"]:
      eval_compile_due = False
      first_eval_at = clock + evals["first_at"] * train_s
      eval_compile_s = max(0.0, eval_ready - first_eval_at) if overlap else ev["compile_s"]
    predicted = paid + train_s + sharing_s + eval_s + eval_compile_s
    clock = start + predicted
    row = dataclasses.asdict(stage)
    row.update(
      steps=stage.num_steps,
      batch_size=batch,
      lr=run.stage_lr(stage),  # the stage's peak LR, as the plan table shows it
      grad_accum_steps=m.get("grad_accum_steps", 1),
      compile_s=m["compile_s"],
      peak_bytes=m["peak_bytes"],
      step_s=m["step_s"],
      images_per_s=batch / m["step_s"] if m["step_s"] > 0 else None,
      compile_paid_s=paid,
      train_s=train_s,
      compile_sharing_s=sharing_s,
      curve_evals=evals["curve"],
      stage_end_evals=evals["stage_end"],
      eval_s=eval_s,
      eval_compile_paid_s=eval_compile_s,
      start_s=start,
      predicted_s=predicted,
    )
    rows.append(row)
  final_compile_s = 0.0
  if eval_compile_due:
    final_compile_s = max(0.0, eval_ready - clock) if overlap else ev["compile_s"]
  final_eval_s = full_pass_s + final_compile_s
  run_s = sum(r["predicted_s"] for r in rows) + final_eval_s
  return {
    "model_name": config.model_name,
    "total_steps": run.total_steps,
    "backend": measured["backend"],
    "device_kind": measured["device_kind"],
    "num_devices": measured["num_devices"],
    "probe_steps": measured["steps"],
    "probe_warmup": measured["warmup"],
    "compile_ahead": bool(config.compile_ahead),
    "host_cores": measured.get("host_cores"),
    "compile_overlap_credited": overlap,
    "compile_core_share": share,
    "not_measured": NOT_MEASURED,
    "eval": {
      "image_size": int(config.eval_image_size),
      "batch_size": int(config.eval_batch_size),
      "examples": int(num_eval),
      "batches_per_pass": full_batches,
      "curve_batches_per_pass": curve_batches,
      "compile_s": ev["compile_s"],
      "peak_bytes": ev["peak_bytes"],
      "step_s": ev["step_s"],
      "images_per_s": config.eval_batch_size / ev["step_s"] if ev["step_s"] > 0 else None,
      "pass_s": full_pass_s,
      "curve_pass_s": curve_pass_s,
      "curve_evals_approximate": float(config.get("eval_every_seconds", 0.0) or 0.0) > 0,
    },
    "init_s": measured["init_s"],
    "stages": rows,
    "final_eval_s": final_eval_s,
    "final_eval_compile_paid_s": final_compile_s,
    "predicted_run_s": run_s,  # what results.json's total_wall_s counts
    "predicted_total_s": measured["init_s"] + run_s,
  }


def _mib(b) -> str:
  return "?" if b is None else f"{b / MiB:.1f}"


def _rate(x) -> str:
  return "?" if x is None else f"{x:.0f}"


def format_probe(result: dict) -> str:
  """The measured plan as markdown, from `predict`'s dict alone (so plan.json prints the same)."""
  from effnetv2_jax import reporting

  if result["compile_overlap_credited"] and result.get("compile_core_share"):
    ahead = (
      "compile-ahead on: a stage pays what is left of its compile, and on this CPU the stage "
      f"it overlaps pays {result['compile_core_share']:.2g} of it (one of {result['host_cores']} "
      "cores)"
    )
  elif result["compile_overlap_credited"]:
    ahead = "compile-ahead on: a stage pays only what is left of its compile"
  else:
    ahead = "compile-ahead off: each compile paid where it is needed"
  ev = result["eval"]
  lines = [
    (
      f"probe: {result['probe_steps']} timed steps per stage after {result['probe_warmup']} "
      f"warm-up on synthetic data, {result['num_devices']} x {result['device_kind']} "
      f"({result['backend']}); cold compiles; {result['not_measured']}; {ahead}"
    ),
    "",
    (
      "| stage | size | batch | steps | peak lr | peak MiB/device | compile s | s/step | "
      "img/s | evals | predicted s |"
    ),
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in result["stages"]:
    evals = r["curve_evals"] + r["stage_end_evals"]
    lines.append(
      f"| {r['index']} | {r['image_size']} | {r['batch_size']} | {r['steps']} | {r['lr']:.4g} | "
      f"{_mib(r['peak_bytes'])} | {r['compile_s']:.2f} | {r['step_s']:.4g} | "
      f"{_rate(r['images_per_s'])} | {evals} | {r['predicted_s']:.1f} |"
    )
  approx = " (curve evals by seconds: approximate)" if ev["curve_evals_approximate"] else ""
  lines += [
    (
      f"| eval | {ev['image_size']} | {ev['batch_size']} | {ev['batches_per_pass']}/pass | - | "
      f"{_mib(ev['peak_bytes'])} | {ev['compile_s']:.2f} | {ev['step_s']:.4g} | "
      f"{_rate(ev['images_per_s'])} | final | {result['final_eval_s']:.1f} |"
    ),
    "",
    (
      f"predicted: state init {result['init_s']:.1f}s + stages "
      f"{sum(r['predicted_s'] for r in result['stages']):.1f}s + final eval "
      f"{result['final_eval_s']:.1f}s = {result['predicted_total_s']:.1f}s "
      f"({reporting.format_duration(result['predicted_total_s'])}; "
      f"{result['predicted_run_s']:.1f}s after the state is built, what results.json's "
      f"total_wall_s counts){approx}"
    ),
  ]
  return "\n".join(lines)


def check_probe_steps(steps) -> None:
  from effnetv2_jax import config_validation

  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise config_validation.ConfigError(
      "--plan_probe_steps", f"must be an integer >= 1 (timed steps per stage), got {steps!r}"
    )


def run_probe(
  config, workdir: str, *, steps: int = 3, warmup: int = 1, devices=None, log=None
) -> tuple[dict, str]:
  """Validate, measure, predict; write WORKDIR/plan.json (process 0). -> (the dict, its table).
  Raises ConfigError before anything compiles or the workdir is touched."""
  import jax

  from effnetv2_jax import config_validation, reporting, sharding
  from effnetv2_jax.data import datasets

  check_probe_steps(steps)
  sharding.init_distributed()
  num_devices = len(devices) if devices else jax.device_count()
  config_validation.validate_config(config, num_devices=num_devices)
  run = plan_lib.resolve(config, num_devices=num_devices)  # as train.check_inputs resolves it
  num_eval = datasets.split_num_examples(config.dataset, run.eval_split, config.data_dir)
  paths.makedirs(workdir)  # before minutes of compiling: an unusable workdir fails now
  measured = measure(config, run, steps=steps, warmup=warmup, devices=devices, log=log)
  result = predict(config, run, measured, num_eval=num_eval)
  if jax.process_index() == 0:
    reporting.write_json_atomic(paths.join(workdir, paths.PLAN_NAME), result)
  return result, format_probe(result)

"""The training loop: validate, lock, restore-or-init, run the progressive stages, evaluate, report.

  train_and_evaluate(config, workdir) -> results dict (also DIR/results.json when training finishes)
  evaluate(config, workdir)           -> results dict (also DIR/results.json)

`train_and_evaluate` reads top to bottom: resolve the run once (`effnetv2_jax.plan`), open what
must be closed (workdir lock, preemption flag, metric writer, checkpointer) on one ExitStack,
restore or init, then for each remaining stage build, compile, train, evaluate and save, and
report. Three small objects carry what lives across steps: `RunContext` (frozen: the config, the
resolved run, mesh, optimizer, LR function, RNG, writer, checkpointer), `DivergenceGuard` (the
one-step-late non-finite flags) and `StageLog` (per-stage records and checkpoint metadata).

Per stage (effnetv2_jax.progressive): the input pipeline is rebuilt at the stage's image size and
RandAugment magnitude, the model with the stage's dropout, and the train step is compiled once,
ahead of time, so a shape change can never silently recompile inside the loop. The state (weights,
optimizer slots, EMA, BN statistics, step) and the global LR schedule carry over.

Determinism: one seed. The step key is fold_in(PRNGKey(seed) split, step) inside the step, and the
data for step t depends only on (seed, t, process), so a restarted run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from effnetv2_jax import checkpoint as ckpt_lib
from effnetv2_jax import config_validation
from effnetv2_jax import optim
from effnetv2_jax import paths
from effnetv2_jax import plan as plan_lib
from effnetv2_jax import progressive
from effnetv2_jax import reporting
from effnetv2_jax import sharding
from effnetv2_jax import state as state_lib
from effnetv2_jax import steps as steps_lib
from effnetv2_jax import workdir as workdir_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainingDivergedError(RuntimeError):
  """Too many consecutive non-finite steps; the last good checkpoint is left as it was."""


class ResultsWriteError(RuntimeError):
  """results.json could not be written (no space, permission); the final checkpoint is complete,
  so rerunning the same command only re-evaluates and writes it."""


def setup_compilation_cache(config) -> str | None:
  """Persistent XLA cache, so a resumed job (and the next stage of a rerun) skips compiling."""
  cache_dir = config.compilation_cache_dir
  if not cache_dir:
    return None
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
  if jax.config.jax_compilation_cache_dir != cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    try:  # JAX decides once per process whether a cache is in use; make it look again.
      from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top

      compilation_cache.reset_cache()
    except (ImportError, AttributeError):
      pass
  # Cache everything, even the small/fast CPU programs of tests and demos.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return cache_dir


# --- what a stage is built from --------------------------------------------------------------


def build_model(config, num_classes: int, dropout_rate: float):
  from effnetv2_jax import models, precision

  overrides = dict(config.model_overrides)
  overrides["dropout_rate"] = float(dropout_rate)
  return models.create_model(
    config.model_name,
    num_classes=num_classes,
    dtype=DTYPES[precision.resolve_dtype(config.dtype)],
    bn_group_size=int(config.bn_group_size),
    **overrides,
  )


def make_stage_step(config, run: plan_lib.RunPlan, stage: progressive.Stage, tx, lr_fn) -> Callable:
  """The (unjitted) train step of `stage`: its model (dropout) and mixing, the run's loss and EMA.

  The trainer jits it with `sharding.jit_train_step`; benchmarks build their step here too, so
  what they time is what trains.
  """
  return steps_lib.make_train_step(
    build_model(config, run.num_classes, stage.dropout_rate),
    tx,
    num_classes=run.num_classes,
    label_smoothing=config.label_smoothing,
    weight_decay=optim.loss_weight_decay(config),
    ema_decay=config.ema_decay,
    mixup_alpha=stage.mixup_alpha,
    cutmix_alpha=stage.cutmix_alpha,
    lr_fn=lr_fn,
    freeze_bn_stats=config.freeze_bn_stats,
    cutmix_label=config.cutmix_label,
  )


def _rngs(config):
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  return init_rng, train_rng


def abstract_state(config, model, tx, image_size: int, mesh):
  """The train state's structure, shapes and (replicated) shardings, without computing it."""
  init_rng, _ = _rngs(config)
  abstract = jax.eval_shape(
    lambda r: state_lib.create_train_state(r, model, tx, image_size, ema=config.ema_decay > 0),
    init_rng,
  )
  rep = sharding.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract)


def init_state(config, model, tx, image_size: int, mesh):
  """A fresh state from the config's seed, or `config.init_from`'s weights (fine-tuning), placed
  replicated on `mesh`."""
  init_rng, _ = _rngs(config)
  state = state_lib.create_train_state(init_rng, model, tx, image_size, ema=config.ema_decay > 0)
  if config.init_from:
    params, batch_stats, src_step = ckpt_lib.load_variables(config.init_from)
    logging.info("init_from %s (step %d)", config.init_from, src_step)
    new_params, _ = ckpt_lib.merge_pretrained(state.params, params)
    new_stats, _ = ckpt_lib.merge_pretrained(state.batch_stats, batch_stats)
    state = jax.jit(
      lambda p, b: state_lib.new_train_state(p, b, tx, ema=state.ema_params is not None)
    )(new_params, new_stats)
  return sharding.put_replicated(state, mesh)


# --- evaluation ------------------------------------------------------------------------------


def make_evaluator(config, run: plan_lib.RunPlan, mesh):
  """A function variables -> eval dict, compiled once and reused at every stage end."""
  model = build_model(config, run.num_classes, run.stages[-1].dropout_rate)  # train=False
  eval_step = sharding.jit_eval_step(
    steps_lib.make_eval_step(model, num_classes=run.num_classes), mesh
  )
  return lambda variables: run_eval(config, run, eval_step, variables, mesh)


def run_eval(config, run: plan_lib.RunPlan, eval_step, variables, mesh) -> dict:
  """Top-1/top-5 over the whole eval split at config.eval_image_size (masked padding excluded)."""
  from effnetv2_jax.data import input_pipeline

  totals = None
  for batch in input_pipeline.eval_iterator(
    dataset=config.dataset,
    data_dir=config.data_dir,
    split=run.eval_split,
    global_batch_size=config.eval_batch_size,
    image_size=config.eval_image_size,
    family=run.family,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    sums = eval_step(variables, sharding.shard_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise RuntimeError(f"evaluation split {run.eval_split!r} of {config.dataset} is empty")
  t = {k: float(v) for k, v in jax.device_get(totals).items()}
  n = max(t["count"], 1.0)
  return {
    "top1": t["top1_correct"] / n,
    "top5": t["top5_correct"] / n,
    "loss": t["loss_sum"] / n,
    "num_examples": int(round(t["count"])),
  }


# --- what carries state between steps ----------------------------------------------------------


class DivergenceGuard:
  """Counts consecutive non-finite steps and stops the run after `max_bad_steps` in a row.

  The train step itself drops a non-finite update; this object only decides when to give up. Each
  step's flag is read on the host one step late (after the next step has been dispatched), so the
  host never waits for the device between steps; `check()` drains what is pending (before a
  checkpoint, at a stage end).
  """

  def __init__(self, max_bad_steps: int, checkpoint_dir: str):
    self.max_bad_steps = max_bad_steps
    self.checkpoint_dir = checkpoint_dir
    self.bad_run = 0
    self._pending: list[tuple[int, jax.Array]] = []

  @property
  def diverging(self) -> bool:
    """The last step read was bad: the state is the last good one, but never checkpoint now."""
    return self.bad_run > 0

  def observe(self, step: int, bad_step: jax.Array) -> None:
    """Record `step`'s device flag, after reading the previous step's (its device work is done)."""
    self.check()
    self._pending.append((step, bad_step))

  def check(self) -> None:
    while self._pending:
      step, bad_step = self._pending.pop(0)
      if float(bad_step) == 0:
        self.bad_run = 0
        continue
      self.bad_run += 1
      logging.warning(
        "step %d: non-finite loss or gradient, update skipped (%d in a row)", step, self.bad_run
      )
      if self.bad_run >= self.max_bad_steps:
        raise TrainingDivergedError(
          f"training diverged: {self.bad_run} consecutive non-finite steps ending at step "
          f"{step} (max_bad_steps={self.max_bad_steps}); the last good checkpoint in "
          f"{self.checkpoint_dir} is kept. Lower the learning rate or enable grad_clip_norm."
        )


def _stage_record(stage: progressive.Stage, prev: dict | None) -> dict:
  rec = {
    "index": stage.index,
    "image_size": stage.image_size,
    "randaug_magnitude": stage.randaug_magnitude,
    "mixup_alpha": stage.mixup_alpha,
    "cutmix_alpha": stage.cutmix_alpha,
    "dropout_rate": stage.dropout_rate,
    "first_step": stage.first_step,
    "last_step": stage.last_step,
    "steps": stage.num_steps,
    "wall_s": 0.0,
    "compile_s": 0.0,
  }
  if prev:  # accumulated by earlier (interrupted) runs of this workdir
    rec.update({k: prev[k] for k in ("wall_s", "compile_s", "eval_top1", "eval_top5") if k in prev})
  return rec


class StageLog:
  """Per-stage records (sizes, steps, wall and compile seconds, evals) and the run's wall clock,
  carried across interruptions in each checkpoint's metadata."""

  def __init__(self, stages, header: dict, meta: dict | None = None):
    meta = meta or {}
    prev = {int(k): v for k, v in meta.get("stages", {}).items()}
    self.records = {s.index: _stage_record(s, prev.get(s.index)) for s in stages}
    self.header = dict(header)  # config hash, model name, class count
    self.prior_wall_s = float(meta.get("total_wall_s", 0.0))
    self.t0 = time.perf_counter()

  def add_time(self, stage_index: int, *, wall_s: float = 0.0, compile_s: float = 0.0) -> None:
    rec = self.records[stage_index]
    rec["wall_s"] += wall_s
    rec["compile_s"] += compile_s

  def set_eval(self, stage_index: int, ev: dict) -> None:
    self.records[stage_index].update(eval_top1=ev["top1"], eval_top5=ev["top5"])

  def total_wall_s(self) -> float:
    return self.prior_wall_s + time.perf_counter() - self.t0

  def stages(self) -> list[dict]:
    return [self.records[i] for i in sorted(self.records)]

  def checkpoint_meta(self, step: int, stage_index: int) -> dict:
    return dict(
      self.header,
      step=step,
      stage=stage_index,
      total_wall_s=self.total_wall_s(),
      stages={str(k): v for k, v in self.records.items()},
    )


@dataclasses.dataclass(frozen=True)
class RunContext:
  """Everything a stage needs that does not change while the run goes on."""

  config: Any
  run: plan_lib.RunPlan
  workdir: str
  mesh: Any
  tx: Any
  lr_fn: Callable
  rng: jax.Array  # the train key, replicated; each step folds in its own step number
  writer: Any
  ckpt: ckpt_lib.Checkpointer
  preemption: workdir_lib.PreemptionFlag
  stop_at_step: int | None


def _print(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)
  logging.info(msg)


# --- the loop ----------------------------------------------------------------------------------


def check_inputs(config) -> plan_lib.RunPlan:
  """Everything that can be rejected before the workdir is touched or anything compiles; returns
  the resolved run."""
  config_validation.validate_config(config)
  from effnetv2_jax.data import datasets

  datasets.check_prepared(config.dataset, config.data_dir)
  return plan_lib.resolve(config)


def train_and_evaluate(
  config,
  workdir: str,
  *,
  stop_at_step: int | None = None,
  preemption: workdir_lib.PreemptionFlag | None = None,
  devices=None,
) -> dict:
  """Train `config` in `workdir` (resuming from its latest checkpoint) and evaluate.

  Returns a dict with 'status': 'completed' (results.json written), 'preempted' (SIGTERM: the
  current step was checkpointed) or 'stopped' (`stop_at_step` reached, checkpointed; a test hook
  that simulates an interruption at an exact step). Raises TrainingDivergedError after
  config.max_bad_steps consecutive non-finite steps. `devices` restricts the mesh (default: all
  devices of all processes).
  """
  sharding.init_distributed()
  run = check_inputs(config)
  paths.makedirs(workdir)
  # Closed in reverse order whatever happens (divergence, an exception, Ctrl-C): in-flight
  # checkpoint writes finish (a finished one is progress kept), then the writer, the signal
  # handler and the lock.
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:
      stack.enter_context(workdir_lib.WorkdirLock(workdir))
    if preemption is None:
      preemption = stack.enter_context(workdir_lib.PreemptionFlag())
    ctx = _open_run(config, run, workdir, stack, devices, preemption, stop_at_step)
    state, step, log = _restore_or_init(ctx)
    guard = DivergenceGuard(config.max_bad_steps, ctx.ckpt.directory)
    evaluator = make_evaluator(config, run, ctx.mesh)
    eta = reporting.EtaClock()
    for stage in run.remaining_stages(step):
      state, step, status = _run_stage(ctx, stage, state, step, guard, log, eta)
      if status:
        return {"status": status, "step": step}
      _end_stage(ctx, stage, state, step, guard, log, evaluator)
    return _report(ctx, state, step, log, evaluator)


def _open_run(config, run, workdir, stack, devices, preemption, stop_at_step) -> RunContext:
  setup_compilation_cache(config)
  mesh = sharding.make_mesh(devices)
  _, train_rng = _rngs(config)
  writer = reporting.create_writer(workdir)
  stack.callback(writer.close)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  stack.callback(ckpt.close)
  return RunContext(
    config=config,
    run=run,
    workdir=workdir,
    mesh=mesh,
    tx=optim.make_optimizer(config, run.steps_per_epoch, run.total_steps),
    lr_fn=optim.lr_schedule(config, run.steps_per_epoch, run.total_steps),
    rng=jax.device_put(train_rng, sharding.replicated(mesh)),
    writer=writer,
    ckpt=ckpt,
    preemption=preemption,
    stop_at_step=stop_at_step,
  )


def _restore_or_init(ctx: RunContext):
  """-> (state, step, stage log): the latest checkpoint's, or a fresh (or init_from) start."""
  config, run = ctx.config, ctx.run
  cfg_hash = ckpt_lib.config_hash(config)
  header = {
    "config_hash": cfg_hash,
    "model_name": config.model_name,
    "num_classes": run.num_classes,
  }
  model = build_model(config, run.num_classes, run.stages[0].dropout_rate)
  target = abstract_state(config, model, ctx.tx, run.stages[0].image_size, ctx.mesh)
  restored = ctx.ckpt.restore_latest(target)  # an unreadable newest one falls back to an older
  if restored is None:
    state = init_state(config, model, ctx.tx, run.stages[0].image_size, ctx.mesh)
    return state, 0, StageLog(run.stages, header)
  latest, state, meta = restored
  if meta.get("config_hash") not in (None, cfg_hash):
    logging.warning(
      "resuming from a checkpoint written with a different config (hash %s != %s)",
      meta.get("config_hash"),
      cfg_hash,
    )
  step = int(jax.device_get(state.step))
  _print(
    f"resumed from {ctx.ckpt.directory}/{latest} at step {step} "
    f"(stage {run.stage_at(step).index + 1}/{len(run.stages)})"
  )
  return state, step, StageLog(run.stages, header, meta)


def _save(ctx: RunContext, guard: DivergenceGuard, log: StageLog, step: int, state, stage_index):
  guard.check()
  if guard.diverging:  # the guard kept the last good state, but never write while diverging
    return
  if ctx.ckpt.save(step, state, log.checkpoint_meta(step, stage_index)):
    logging.info("checkpoint at step %d", step)


def _compile_stage(ctx: RunContext, stage, state, step: int):
  """-> (compiled step, data iterator, first batch, compile seconds) for `stage` from `step` on."""
  from effnetv2_jax.data import augment, input_pipeline

  config = ctx.config
  train_step = make_stage_step(config, ctx.run, stage, ctx.tx, ctx.lr_fn)
  data = input_pipeline.train_iterator(
    dataset=config.dataset,
    data_dir=config.data_dir,
    split=ctx.run.train_split,
    global_batch_size=ctx.run.batch_size,
    image_size=stage.image_size,
    family=ctx.run.family,
    augment=augment.for_stage(config, stage),
    seed=config.seed,
    start_step=max(step, stage.first_step),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    shuffle_buffer=config.shuffle_buffer,
    cache=config.cache_dataset,
  )
  batch = sharding.shard_batch(next(data), ctx.mesh)
  t0 = time.perf_counter()
  jitted = sharding.jit_train_step(train_step, ctx.mesh, state)
  compiled = jitted.lower(state, batch, ctx.rng).compile()
  return compiled, data, batch, time.perf_counter() - t0


def _run_stage(ctx: RunContext, stage, state, step: int, guard, log: StageLog, eta):
  """Train `stage` from `step` to its end; -> (state, step, status), where status is None when
  the stage finished and 'preempted'/'stopped' when the run stopped inside it (checkpointed)."""
  num_stages = len(ctx.run.stages)
  stage_t0 = time.perf_counter()
  compiled, data, batch, compile_s = _compile_stage(ctx, stage, state, step)
  log.add_time(stage.index, compile_s=compile_s)
  eta.add_compile(compile_s)
  _print(
    f"stage {stage.index + 1}/{num_stages}: {stage.image_size}px, randaug "
    f"{stage.randaug_magnitude:g}, mixup {stage.mixup_alpha:g}, cutmix "
    f"{stage.cutmix_alpha:g}, dropout {stage.dropout_rate:g}, steps {step}-"
    f"{stage.last_step}; train step compiled in {compile_s:.1f}s"
  )
  ctx.writer.write_scalars(step, {"compile_s": compile_s})
  meter = reporting.IntervalMeter()
  while True:
    state, metrics = compiled(state, batch, ctx.rng)
    step += 1
    more = step < stage.last_step
    if more:  # the host prepares the next batch while the device runs this step
      batch = sharding.shard_batch(next(data), ctx.mesh)
    meter.add(metrics)
    guard.observe(step, metrics["bad_step"])
    ctx.ckpt.check_for_errors()  # a failed async checkpoint write stops the run at the next step
    if step % ctx.config.log_every_steps == 0 or not more:
      _log_progress(ctx, stage, step, meter, eta)
    status = _stop_requested(ctx, step)
    if status:
      log.add_time(stage.index, wall_s=time.perf_counter() - stage_t0)
      _save(ctx, guard, log, step, state, stage.index)
      ctx.ckpt.wait()
      _print(
        f"{status} at step {step}: checkpoint saved to {ctx.ckpt.directory}/{step}; "
        "rerun the same command to resume"
      )
      return state, step, status
    if not more:
      break
    if step % ctx.config.checkpoint_every_steps == 0:
      _save(ctx, guard, log, step, state, stage.index)
  guard.check()
  log.add_time(stage.index, wall_s=time.perf_counter() - stage_t0)
  return state, step, None


def _stop_requested(ctx: RunContext, step: int) -> str | None:
  multihost_notice = jax.process_count() > 1 and ctx.ckpt.reached_preemption(step)
  if ctx.preemption.requested or multihost_notice:
    return "preempted"
  if ctx.stop_at_step is not None and step >= ctx.stop_at_step:
    return "stopped"
  return None


def _log_progress(ctx: RunContext, stage, step: int, meter, eta) -> None:
  run, num_stages = ctx.run, len(ctx.run.stages)
  means, dt, n = meter.flush()
  eta.add_train(dt, n, stage.image_size)
  means["lr"] = means.pop("learning_rate", float("nan"))
  scalars = {f"train/{k}": v for k, v in means.items()}
  scalars["train/steps_per_sec"] = n / max(dt, 1e-9)
  ctx.writer.write_scalars(step, scalars)
  remaining = [(stage.last_step - step, stage.image_size)]
  remaining += [(s.num_steps, s.image_size) for s in run.stages[stage.index + 1 :]]
  _print(
    reporting.progress_line(
      stage_index=stage.index,
      num_stages=num_stages,
      step=step,
      total_steps=run.total_steps,
      metrics=means,
      images_per_sec=n * run.batch_size / max(dt, 1e-9),
      eta_s=eta.eta(remaining, num_stages - 1 - stage.index),
    )
  )


def _write_eval(ctx: RunContext, step: int, ev: dict) -> None:
  ctx.writer.write_scalars(
    step, {"eval/top1": ev["top1"], "eval/top5": ev["top5"], "eval/loss": ev["loss"]}
  )


def _end_stage(ctx: RunContext, stage, state, step: int, guard, log: StageLog, evaluator) -> None:
  """A stage-end evaluation (all but the last stage, when configured), then a checkpoint."""
  num_stages = len(ctx.run.stages)
  if ctx.config.eval_every_stage and stage.index < num_stages - 1:
    t0 = time.perf_counter()
    ev = evaluator(state_lib.eval_variables(state))
    log.set_eval(stage.index, ev)
    log.add_time(stage.index, wall_s=time.perf_counter() - t0)
    _write_eval(ctx, step, ev)
    _print(
      f"stage {stage.index + 1}/{num_stages} done at step {step}: eval top1 "
      f"{ev['top1']:.4f} top5 {ev['top5']:.4f} ({ev['num_examples']} images, "
      f"{ctx.config.eval_image_size}px, EMA)"
    )
  _save(ctx, guard, log, step, state, stage.index)


def _report(ctx: RunContext, state, step: int, log: StageLog, evaluator) -> dict:
  """The final evaluation, results.json and the closing line."""
  from effnetv2_jax.data import input_pipeline

  final = evaluator(state_lib.eval_variables(state))
  log.set_eval(len(ctx.run.stages) - 1, final)
  _write_eval(ctx, step, final)
  ctx.writer.flush()
  ctx.ckpt.wait()
  results = {
    "status": "completed",
    "step": step,
    "final_eval": final,
    "stages": log.stages(),
    "total_wall_s": log.total_wall_s(),
    "config": ctx.config.to_dict(),
    "params_checksum": reporting.params_checksum(state.params),
    "dtype": ctx.run.dtype,  # the compute dtype that ran ('auto' resolved)
    "decode_failures": input_pipeline.decode_failures(),
  }
  out = paths.join(ctx.workdir, paths.RESULTS_NAME)
  if jax.process_index() == 0:
    try:
      reporting.write_json_atomic(out, results)
    except OSError as e:
      raise ResultsWriteError(
        f"cannot write {out}: {ckpt_lib.first_line(e)}; training is complete and checkpointed "
        f"at step {step}: free space and rerun the same command to evaluate and write it again"
      ) from None
  _print(
    f"done: step {step}, eval top1 {final['top1']:.4f} top5 {final['top5']:.4f} on "
    f"{final['num_examples']} images; {reporting.format_duration(results['total_wall_s'])} "
    f"total; results in {out}"
  )
  return results


# --- evaluation only ---------------------------------------------------------------------------


def evaluate(config, workdir: str, *, devices=None) -> dict:
  """Evaluate `config.init_from` (or the workdir's latest checkpoint) with its EMA weights.

  Writes DIR/results.json, or DIR/eval_results.json when DIR is the checkpoint's own training
  workdir (its results.json belongs to the training run).
  """
  sharding.init_distributed()
  run = check_inputs(config)
  setup_compilation_cache(config)
  source = config.init_from or workdir
  params, batch_stats, src_step = ckpt_lib.load_variables(source)
  model = build_model(config, run.num_classes, run.stages[-1].dropout_rate)
  size = config.eval_image_size
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False)
  )
  expected = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
  ckpt_lib.check_compatible(
    source,
    ckpt_lib.flat_shapes({"params": params, "batch_stats": batch_stats}),
    ckpt_lib.flat_shapes(expected),
  )
  mesh = sharding.make_mesh(devices)
  variables = sharding.put_replicated({"params": params, "batch_stats": batch_stats}, mesh)
  t0 = time.perf_counter()
  final = make_evaluator(config, run, mesh)(variables)
  results = {
    "status": "evaluated",
    "source": paths.normalize(source),
    "step": src_step,
    "final_eval": final,
    "total_wall_s": time.perf_counter() - t0,
    "config": config.to_dict(),
    "params_checksum": reporting.params_checksum(params),
  }
  paths.makedirs(workdir)
  # Evaluating a training workdir must not clobber its training results.json.
  same = paths.normalize(workdir) == results["source"]
  out = paths.join(workdir, paths.EVAL_RESULTS_NAME if same else paths.RESULTS_NAME)
  results["results_file"] = out
  if jax.process_index() == 0:
    reporting.write_json_atomic(out, results)
  _print(
    f"eval of {results['source']} (step {src_step}): top1 {final['top1']:.4f} top5 "
    f"{final['top5']:.4f} on {final['num_examples']} images; written to {out}"
  )
  return results

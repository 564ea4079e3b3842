"""The training loop: validate, lock, restore-or-init, run the progressive stages, evaluate, report.

  train_and_evaluate(config, workdir) -> results dict (also DIR/results.json when training finishes)
  evaluate(config, workdir)           -> results dict (also DIR/results.json)

`train_and_evaluate` reads top to bottom: resolve the run once (`effnetv2_jax.plan`), open what
must be closed (workdir lock, preemption flag, metric writer, checkpointer) on one ExitStack,
restore or init, then for each remaining stage build, compile, train, evaluate and save, and
report. Three small objects carry what lives across steps: `RunContext` (frozen: the config, the
resolved run, mesh, optimizer, LR function, RNG, writer, checkpointer, background compiler,
evaluator), and in effnetv2_jax/run_log.py `DivergenceGuard` (the one-step-late non-finite flags)
and `StageLog` (per-stage records, the time-to-accuracy curves, checkpoint metadata). Evaluation
lives in effnetv2_jax/evaluation.py.

Per stage (effnetv2_jax.progressive): the input pipeline is rebuilt at the stage's image size and
RandAugment magnitude, the model with the stage's dropout, and the train step is compiled once,
ahead of time, so a shape change can never silently recompile inside the loop. The state (weights,
optimizer slots, EMA, BN statistics, step) and the global LR schedule carry over.

Determinism: one seed. The step key is fold_in(PRNGKey(seed) split, step) inside the step, and the
data for step t depends only on (seed, the positions of its examples, process), so a restarted run
continues bit for bit. A stage may have its own global batch (`Stage.batch_size`,
progressive.batch_rule): its input starts at the images the stages before it trained on
(`Stage.first_example`), its step is compiled for its batch, and the LR and EMA follow the images
seen (effnetv2_jax/optim.py, state.py); a resume checks the checkpoint's stage table. Under
progressive.batch_rule 'fit' the batches are measured from compiles when the run starts and kept
in the checkpoints, which a resume reads them from (effnetv2_jax/batch_fit.py, `_settle_batches`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from effnetv2_jax import batch_fit as batch_fit_lib
from effnetv2_jax import checkpoint as ckpt_lib
from effnetv2_jax import compile_ahead as compile_ahead_lib
from effnetv2_jax import config_validation
from effnetv2_jax import curves
from effnetv2_jax import memory_fit
from effnetv2_jax import optim
from effnetv2_jax import paths
from effnetv2_jax import plan as plan_lib
from effnetv2_jax import progressive
from effnetv2_jax import reporting
from effnetv2_jax import sharding
from effnetv2_jax import state as state_lib
from effnetv2_jax import steps as steps_lib
from effnetv2_jax import workdir as workdir_lib

# Re-exported: callers (main, sweep, tests) import the trainer's whole surface from here.
from effnetv2_jax.evaluation import EVAL_KEYS, Evaluator, run_eval  # noqa: F401
from effnetv2_jax.evaluation import eval_sizes_of, recalibrated_variables, recalibration_images
from effnetv2_jax.evaluation import batch_spec
from effnetv2_jax.run_log import DivergenceGuard, StageLog, TrainingDivergedError  # noqa: F401

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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


def make_stage_step(
  config,
  run: plan_lib.RunPlan,
  stage: progressive.Stage,
  tx,
  lr_fn,
  *,
  grad_accum_steps: int | None = None,
) -> Callable:
  """The (unjitted) train step of `stage`: its model (dropout) and mixing, the run's loss and EMA.

  The trainer jits it with `sharding.jit_train_step`; benchmarks build their step here too, so
  what they time is what trains. `grad_accum_steps`: micro-batches per step (default
  config.grad_accum_steps; its 0, 'chosen per stage', builds the plain step: the trainer passes
  the k it chose, see `compile_stage_step`).
  """
  k = config.grad_accum_steps if grad_accum_steps is None else grad_accum_steps
  return steps_lib.make_train_step(
    build_model(config, run.num_classes, stage.dropout_rate),
    tx,
    num_classes=run.num_classes,
    label_smoothing=config.label_smoothing,
    weight_decay=optim.loss_weight_decay(config),
    ema_decay=config.ema_decay,
    ema_decay_fn=state_lib.ema_decay_fn(
      config.ema_decay, run.stages, run.batch_size, config.get("ema_horizon", "images")
    ),
    mixup_alpha=stage.mixup_alpha,
    cutmix_alpha=stage.cutmix_alpha,
    lr_fn=lr_fn,
    freeze_bn_stats=config.freeze_bn_stats,
    cutmix_label=config.cutmix_label,
    grad_accum_steps=max(1, int(k)),
  )


@dataclasses.dataclass(frozen=True)
class StageStep:
  """A stage's compiled train step and how it trains its batch."""

  compiled: Any
  grad_accum_steps: int  # micro-batches per step (1: none)
  peak_bytes: int | None  # per device, from XLA's buffer assignment (None: backend reports none)
  budget_bytes: int | None = None  # the memory budget k was chosen for (config.grad_accum_steps=0)

  def record(self, batch_size: int) -> dict:
    """What the stage log keeps of it (results.json's per-stage records)."""
    rec = {
      "grad_accum_steps": self.grad_accum_steps,
      "micro_batch": batch_size // self.grad_accum_steps,
      "peak_bytes": self.peak_bytes,
    }
    if self.budget_bytes is not None:
      rec["memory_budget_bytes"] = self.budget_bytes
    return rec


def _peak_or_none(compiled) -> int | None:
  try:
    return memory_fit.peak_bytes(compiled)
  except Exception:  # pylint: disable=broad-except  (a backend without the analysis)
    return None


def compile_stage_step(
  config, run, stage, tx, lr_fn, mesh, state_spec, rng, batch_size: int | None = None
) -> StageStep:
  """Lower and compile `stage`'s train step for abstract inputs: the global batch of
  `batch_size` (default the stage's) at the stage's image size.

  config.grad_accum_steps = k >= 1 compiles that step. 0 chooses k for this stage: the fewest
  micro-batches whose step fits the per-device budget (memory_fit.budget_bytes), from the peaks
  of a few compiles of this very step (memory_fit.fit_stage; the chosen compile is the one
  returned), or memory_fit.DoesNotFitError naming the stage when one image per device is too much.
  """
  batch_size = batch_size or stage.batch_size
  batch = batch_spec(mesh, batch_size, stage.image_size)

  def compile_at(k: int):
    train_step = make_stage_step(config, run, stage, tx, lr_fn, grad_accum_steps=k)
    jitted = sharding.jit_train_step(train_step, mesh, state_spec)
    return jitted.lower(state_spec, batch, rng).compile()

  k = int(config.grad_accum_steps)
  if k >= 1:
    compiled = compile_at(k)
    return StageStep(compiled, k, _peak_or_none(compiled))
  fit = memory_fit.fit_stage(
    compile_at,
    memory_fit.budget_bytes(config, mesh.local_devices[0]),
    memory_fit.FitTarget(
      batch_size, mesh.size, stage.index, stage.image_size, int(config.bn_group_size)
    ),
  )
  logging.info(
    "stage %d: %d micro-batches of %d (peaks measured %s, budget %d bytes)",
    stage.index,
    fit.grad_accum_steps,
    fit.micro_batch,
    fit.measured,
    fit.budget_bytes,
  )
  return StageStep(fit.compiled, fit.grad_accum_steps, fit.peak_bytes, fit.budget_bytes)


def fit_measure(config, run: plan_lib.RunPlan, mesh) -> Callable[[progressive.Stage, int], int]:
  """measure(stage, batch) -> the per-device peak bytes of `stage`'s train step compiled (never
  run) for a global `batch` without accumulation: what batch_rule 'fit' measures
  (effnetv2_jax/batch_fit.py). The step is the trainer's own, built from `run`'s provisional table
  (its LR and EMA constants differ from the final table's; buffer sizes do not)."""
  tx, lr_fn = optim.for_run(config, run)
  model = build_model(config, run.num_classes, run.stages[0].dropout_rate)
  state_spec = abstract_state(config, model, tx, run.stages[0].image_size, mesh)
  rng = jax.device_put(_rngs(config)[1], sharding.replicated(mesh))
  one = config.copy_and_resolve_references()
  one.grad_accum_steps = 1  # validation requires it under 'fit'; measure the plain step anyway

  def measure(stage: progressive.Stage, batch: int) -> int:
    step = compile_stage_step(one, run, stage, tx, lr_fn, mesh, state_spec, rng, batch)
    if step.peak_bytes is None:
      raise RuntimeError(
        f"progressive.batch_rule 'fit' needs the compiled step's memory analysis, which the "
        f"{jax.default_backend()} backend does not report; use batch_rule 'pixels' or "
        "progressive.batch_sizes"
      )
    return step.peak_bytes

  return measure


def _settle_batches(config, run: plan_lib.RunPlan, mesh, ckpt):
  """-> (run, BatchFit | None): `run` with its final stage batches. Under batch_rule 'fit' they
  come from the newest checkpoint's record (a resume: nothing is measured again) or from
  measuring every stage's step (batch_fit.fit_batches); other rules are settled already."""
  if not run.batches_provisional:
    return run, None
  t0 = time.perf_counter()
  fit = batch_fit_lib.recorded(ckpt)
  source = "recorded in the checkpoint"
  if fit is None:
    multiple, max_batch = batch_fit_lib.limits(config, mesh.size)
    fit = batch_fit_lib.fit_batches(
      fit_measure(config, run, mesh),
      memory_fit.budget_bytes(config, mesh.local_devices[0]),
      run.stages,
      multiple=multiple,
      max_batch=max_batch,
      num_devices=mesh.size,
    )
    fit = dataclasses.replace(fit, seconds=time.perf_counter() - t0)
    source = f"measured in {fit.seconds:.1f}s"
  elif len(fit.batches) != len(run.stages) or any(b % mesh.size for b in fit.batches):
    raise ckpt_lib.CheckpointMismatchError(
      f"{ckpt.directory}: the checkpoint was trained at the 'fit' batches {fit.batches}, which "
      f"this run ({len(run.stages)} stages on {mesh.size} devices) cannot train: resume with "
      "the same config and devices, or train in a new workdir"
    )
  mib = lambda n: f"{n / 2**20:.1f}"
  peaks = "/".join(mib(fit.peak(i)) for i in range(len(fit.batches)))
  _print(
    f"batch_rule fit: stage batches {'/'.join(map(str, fit.batches))} at "
    f"{'/'.join(map(str, fit.image_sizes))}px, peaks {peaks} MiB per device within the budget "
    f"of {mib(fit.budget_bytes)} MiB ({source})"
  )
  return plan_lib.with_stage_batches(config, run, fit.batches), fit


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


def spec_of(tree):
  """The abstract arrays (shape, dtype, sharding) of placed arrays: what a step compiles for."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


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
  compiler: compile_ahead_lib.BackgroundCompiler  # the next stage's step compiles meanwhile
  evaluator: Evaluator
  batch_fit: batch_fit_lib.BatchFit | None = None  # batch_rule 'fit': how the batches were chosen


def _print(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)
  logging.info(msg)


# --- the loop ----------------------------------------------------------------------------------


def check_inputs(config, num_devices: int | None = None) -> plan_lib.RunPlan:
  """Everything that can be rejected before the workdir is touched or anything compiles; returns
  the resolved run. `num_devices`: the mesh's (default: every device of every process)."""
  num_devices = jax.device_count() if num_devices is None else int(num_devices)
  config_validation.validate_config(config, num_devices=num_devices)
  from effnetv2_jax.data import datasets

  datasets.check_prepared(config.dataset, config.data_dir)
  return plan_lib.resolve(config, num_devices=num_devices)


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
  run = check_inputs(config, None if devices is None else len(devices))
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
    run = ctx.run  # the final stage batches ('fit' measures them when the run starts)
    state, step, log = _restore_or_init(ctx)
    guard = DivergenceGuard(config.max_bad_steps, ctx.ckpt.directory)
    eta = reporting.EtaClock()
    for stage in run.remaining_stages(step):
      state, step, status = _run_stage(ctx, stage, state, step, guard, log, eta)
      if status:
        return {"status": status, "step": step}
      _end_stage(ctx, stage, state, step, guard, log)
    return _report(ctx, state, step, log)


def _open_run(config, run, workdir, stack, devices, preemption, stop_at_step) -> RunContext:
  setup_compilation_cache(config)
  mesh = sharding.make_mesh(devices)
  _, train_rng = _rngs(config)
  writer = reporting.create_writer(workdir)
  stack.callback(writer.close)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  stack.callback(ckpt.close)
  compiler = compile_ahead_lib.BackgroundCompiler(enabled=config.compile_ahead)
  stack.callback(compiler.close)  # first: nothing waits for a compile nobody will use
  run, fit = _settle_batches(config, run, mesh, ckpt)  # before anything reads the stage table
  tx, lr_fn = optim.for_run(config, run)
  return RunContext(
    config=config,
    run=run,
    workdir=workdir,
    mesh=mesh,
    tx=tx,
    lr_fn=lr_fn,
    rng=jax.device_put(train_rng, sharding.replicated(mesh)),
    writer=writer,
    ckpt=ckpt,
    preemption=preemption,
    stop_at_step=stop_at_step,
    compiler=compiler,
    evaluator=Evaluator(config, run, mesh),
    batch_fit=fit,
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
  if ctx.batch_fit is not None:  # every checkpoint carries it: a resume reads the batches there
    header[batch_fit_lib.META_KEY] = ctx.batch_fit.to_dict()
  model = build_model(config, run.num_classes, run.stages[0].dropout_rate)
  target = abstract_state(config, model, ctx.tx, run.stages[0].image_size, ctx.mesh)
  restored = ctx.ckpt.restore_latest(target)  # an unreadable newest one falls back to an older
  if restored is None:
    state = init_state(config, model, ctx.tx, run.stages[0].image_size, ctx.mesh)
    return state, 0, StageLog(run.stages, header, config)
  latest, state, meta = restored
  if meta.get("config_hash") not in (None, cfg_hash):
    logging.warning(
      "resuming from a checkpoint written with a different config (hash %s != %s)",
      meta.get("config_hash"),
      cfg_hash,
    )
  step = int(jax.device_get(state.step))
  _check_stage_table(ctx, meta, step)
  _print(
    f"resumed from {ctx.ckpt.directory}/{latest} at step {step} "
    f"(stage {run.stage_at(step).index + 1}/{len(run.stages)})"
  )
  return state, step, StageLog(run.stages, header, config, meta, step)


def _check_stage_table(ctx: RunContext, meta: dict, step: int) -> None:
  """CheckpointMismatchError unless the checkpoint's stage batches are this run's and the images
  trained before `step` are the same: the data position, LR and EMA of every step depend on them
  (and a 'pixels' table on the device count). Checkpoints without batches in their stage records
  (written before stages had their own batch) are not checked; other changes of the table (a
  longer run) only change the config hash, which warns."""
  recorded = [v for _, v in sorted((int(k), v) for k, v in (meta.get("stages") or {}).items())]
  if not recorded or not all("batch_size" in r and "first_example" in r for r in recorded):
    return
  why = ""
  for r, s in zip(recorded, ctx.run.stages):
    if r["batch_size"] != s.batch_size:
      why = f"stage {s.index} trained at batch {r['batch_size']}, this run resolves {s.batch_size}"
      break
  if not why:
    last = recorded[-1]
    here = next((r for r in recorded if r["first_step"] <= step < r["last_step"]), last)
    was = here["first_example"] + (step - here["first_step"]) * here["batch_size"]
    if was != ctx.run.examples_at(step):
      why = f"{was} images before step {step}, this run {ctx.run.examples_at(step)}"
  if why:
    raise ckpt_lib.CheckpointMismatchError(
      f"{ctx.ckpt.directory}: the checkpoint at step {step} was written with another stage "
      f"table ({why}): the batch rule, batch sizes or device count changed; resume with the "
      "same config and devices, or train in a new workdir"
    )


def _save(ctx: RunContext, guard: DivergenceGuard, log: StageLog, step: int, state, stage_index):
  guard.check()
  if guard.diverging:  # the guard kept the last good state, but never write while diverging
    return
  if ctx.ckpt.save(step, state, log.checkpoint_meta(step, stage_index)):
    logging.info("checkpoint at step %d", step)


def _stage_key(ctx: RunContext, stage) -> str:
  return f"stage {stage.index + 1}/{len(ctx.run.stages)} ({stage.image_size}px)"


def _compile_train_step(ctx: RunContext, stage, state_spec) -> StageStep:
  """`stage`'s compiled step (runs on the compile thread): `compile_stage_step`."""
  return compile_stage_step(
    ctx.config, ctx.run, stage, ctx.tx, ctx.lr_fn, ctx.mesh, state_spec, ctx.rng
  )


def _next_batch(ctx: RunContext, data) -> dict:
  """The next host batch; input_pipeline.Interrupted once a preemption is requested meanwhile."""
  return data.get(should_stop=lambda: ctx.preemption.requested)


def _start_stage(ctx: RunContext, stage, state, step: int):
  """-> (StageStep, data iterator, first batch, compile s, compile wait s) for `stage` from
  `step` on; then queues what the run needs next (the eval step, the next stage's step)."""
  from effnetv2_jax.data import augment, input_pipeline

  config = ctx.config
  # One producer thread keeps the batch order; the loop waits for it in short slices, so a
  # SIGTERM is honoured even while the input pipeline stalls (input_pipeline.Prefetcher).
  data = input_pipeline.Prefetcher(
    input_pipeline.train_iterator(
      dataset=config.dataset,
      data_dir=config.data_dir,
      split=ctx.run.train_split,
      global_batch_size=stage.batch_size,
      image_size=stage.image_size,
      family=ctx.run.family,
      augment=augment.for_stage(config, stage),
      seed=config.seed,
      # This process' share of the images trained before `step`: every stage's global batch
      # splits evenly over the processes, so positions run on across a batch change.
      start_example=stage.examples_at(max(step, stage.first_step)) // jax.process_count(),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      shuffle_buffer=config.shuffle_buffer,
      cache=config.cache_dataset,
      max_skipped_fraction=config.max_skipped_fraction,
    )
  )
  try:
    batch = sharding.shard_batch(_next_batch(ctx, data), ctx.mesh)
  except BaseException:
    data.close()
    raise
  expected = batch_spec(ctx.mesh, stage.batch_size, stage.image_size)
  got = {k: (v.shape, v.dtype) for k, v in batch.items()}
  if got != {k: (v.shape, v.dtype) for k, v in expected.items()}:
    raise RuntimeError(
      f"{_stage_key(ctx, stage)}: the input pipeline delivered {got}, not {expected}"
    )
  state_spec = spec_of(state)
  compile_fn = functools.partial(_compile_train_step, ctx, stage, state_spec)
  try:  # a step that fails to compile (or to fit in memory) ends the stage's input thread too
    compiled, compile_s, wait_s = ctx.compiler.get(_stage_key(ctx, stage), compile_fn)
  except BaseException:
    data.close()
    raise
  ctx.evaluator.compile_ahead(ctx.compiler, state_spec)  # once: later calls find it queued
  if stage.index + 1 < len(ctx.run.stages):
    nxt = ctx.run.stages[stage.index + 1]
    ctx.compiler.submit(
      _stage_key(ctx, nxt), functools.partial(_compile_train_step, ctx, nxt, state_spec)
    )
  return compiled, data, batch, compile_s, wait_s


def _run_stage(ctx: RunContext, stage, state, step: int, guard, log: StageLog, eta):
  """Train `stage` from `step` to its end; -> (state, step, status), where status is None when
  the stage finished and 'preempted'/'stopped' when the run stopped inside it (checkpointed)."""
  from effnetv2_jax.data import input_pipeline  # TensorFlow: only where data is read

  stage_t0 = time.perf_counter()
  log.records[stage.index].setdefault("start_wall_s", log.total_wall_s())  # for curves.png
  try:
    stage_step, data, batch, compile_s, wait_s = _start_stage(ctx, stage, state, step)
  except input_pipeline.Interrupted:  # SIGTERM while the first batch was being read
    return _stop(ctx, stage, state, step, guard, log, stage_t0, "preempted")
  compiled = stage_step.compiled
  log.records[stage.index].update(stage_step.record(stage.batch_size))
  if ctx.batch_fit is not None:
    log.records[stage.index]["memory_budget_bytes"] = ctx.batch_fit.budget_bytes
    # The fit measured this step on the provisional table (same buffers, other LR constants):
    # equal peaks so far (bench_stage_switch.md), but say so should they ever differ.
    if (stage_step.peak_bytes or 0) > ctx.batch_fit.budget_bytes:
      logging.warning(
        "%s: the trained step needs %d bytes per device, over the 'fit' budget %d",
        _stage_key(ctx, stage),
        stage_step.peak_bytes,
        ctx.batch_fit.budget_bytes,
      )
  _announce_stage(ctx, stage, step, log, eta, compile_s, wait_s, stage_step.grad_accum_steps)
  meter = reporting.IntervalMeter()
  with data:  # the stage's input thread ends with the stage
    while True:
      state, metrics = compiled(state, batch, ctx.rng)
      step += 1
      more = step < stage.last_step
      if more:  # the host prepares the next batch while the device runs this step
        try:
          batch = sharding.shard_batch(_next_batch(ctx, data), ctx.mesh)
        except input_pipeline.Interrupted:  # the input stalled and a preemption came meanwhile
          return _stop(ctx, stage, state, step, guard, log, stage_t0, "preempted")
      meter.add(metrics)
      guard.observe(step, metrics["bad_step"])
      ctx.ckpt.check_for_errors()  # a failed async checkpoint write stops the run at the next step
      if step % ctx.config.log_every_steps == 0 or not more:
        _log_progress(ctx, stage, step, meter, eta, log)
      if log.curve.due_everywhere(step, log.total_wall_s()):
        _curve_point(ctx, stage, step, state, log)
      status = _stop_requested(ctx, step)
      if status:
        return _stop(ctx, stage, state, step, guard, log, stage_t0, status)
      if not more:
        break
      if step % ctx.config.checkpoint_every_steps == 0:
        _save(ctx, guard, log, step, state, stage.index)
  guard.check()
  log.add_time(stage.index, wall_s=time.perf_counter() - stage_t0)
  return state, step, None


def _announce_stage(ctx: RunContext, stage, step: int, log: StageLog, eta, compile_s, wait_s, k=1):
  num_stages = len(ctx.run.stages)
  log.add_time(stage.index, compile_s=compile_s, compile_wait_s=wait_s)
  eta.add_compile(wait_s)
  ahead = f" (waited {wait_s:.1f}s)" if wait_s < 0.95 * compile_s else ""
  accum = f" ({k} micro-batches of {stage.batch_size // k})" if k > 1 else ""
  _print(
    f"stage {stage.index + 1}/{num_stages}: {stage.image_size}px, randaug "
    f"{stage.randaug_magnitude:g}, mixup {stage.mixup_alpha:g}, cutmix "
    f"{stage.cutmix_alpha:g}, dropout {stage.dropout_rate:g}, steps {step}-"
    f"{stage.last_step} at batch {stage.batch_size}{accum}; train step compiled in "
    f"{compile_s:.1f}s{ahead}"
  )
  ctx.writer.write_scalars(step, {"compile_s": compile_s, "compile_wait_s": wait_s})


def _stop(ctx: RunContext, stage, state, step: int, guard, log: StageLog, stage_t0, status):
  """Checkpoint the current step and end the run here ('preempted' or 'stopped')."""
  log.add_time(stage.index, wall_s=time.perf_counter() - stage_t0)
  _save(ctx, guard, log, step, state, stage.index)
  ctx.ckpt.wait()
  _print(
    f"{status} at step {step}: checkpoint saved to {ctx.ckpt.directory}/{step}; "
    "rerun the same command to resume"
  )
  return state, step, status


def _stop_requested(ctx: RunContext, step: int) -> str | None:
  multihost_notice = jax.process_count() > 1 and ctx.ckpt.reached_preemption(step)
  if ctx.preemption.requested or multihost_notice:
    return "preempted"
  if ctx.stop_at_step is not None and step >= ctx.stop_at_step:
    return "stopped"
  return None


def _curve_point(ctx: RunContext, stage, step: int, state, log: StageLog) -> None:
  """One time-to-accuracy point: EMA weights at the eval size (config.eval_subset images)."""
  point = log.curve.measure(
    ctx.evaluator,
    state_lib.eval_variables(state),
    wall_clock=log.total_wall_s,
    step=step,
    images_seen=ctx.run.examples_at(step),
    stage=stage.index,
    image_size=ctx.config.eval_image_size,
    max_examples=ctx.config.eval_subset or None,
  )
  ctx.writer.write_scalars(step, {f"curve/{k}": point[k] for k in ("top1", "wall_s", "eval_s")})


def _log_progress(ctx: RunContext, stage, step: int, meter, eta, log: StageLog) -> None:
  from effnetv2_jax.data import input_pipeline

  run, num_stages = ctx.run, len(ctx.run.stages)
  means, dt, n = meter.flush()
  if "loss" in means:
    log.train_curve.add(step, log.total_wall_s(), means["loss"])
  eta.add_train(dt, n * stage.batch_size, stage.image_size)  # work: images x pixels
  means["lr"] = means.pop("learning_rate", float("nan"))
  scalars = {f"train/{k}": v for k, v in means.items()}
  scalars["train/steps_per_sec"] = n / max(dt, 1e-9)
  skipped = input_pipeline.skipped_records()  # unreadable input records, per split
  scalars.update({f"data/skipped_{split}": float(k) for split, k in skipped.items()})
  ctx.writer.write_scalars(step, scalars)
  remaining = [(stage.last_example - stage.examples_at(step), stage.image_size)]
  remaining += [(s.num_examples, s.image_size) for s in run.stages[stage.index + 1 :]]
  line = reporting.progress_line(
    stage_index=stage.index,
    num_stages=num_stages,
    step=step,
    total_steps=run.total_steps,
    metrics=means,
    images_per_sec=n * stage.batch_size / max(dt, 1e-9),
    eta_s=eta.eta(remaining, num_stages - 1 - stage.index),
  )
  if any(skipped.values()):
    line += " skipped " + " ".join(f"{k} {split}" for split, k in skipped.items() if k)
  _print(line)


def _write_eval(ctx: RunContext, step: int, ev: dict) -> None:
  ctx.writer.write_scalars(
    step, {"eval/top1": ev["top1"], "eval/top5": ev["top5"], "eval/loss": ev["loss"]}
  )


def _end_stage(ctx: RunContext, stage, state, step: int, guard, log: StageLog) -> None:
  """A stage-end evaluation (all but the last stage, when configured), then a checkpoint."""
  num_stages = len(ctx.run.stages)
  if ctx.config.eval_every_stage and stage.index < num_stages - 1:
    t0 = time.perf_counter()
    ev = ctx.evaluator(state_lib.eval_variables(state))
    log.set_eval(stage.index, ev)
    log.add_time(stage.index, wall_s=time.perf_counter() - t0)
    _write_eval(ctx, step, ev)
    _print(
      f"stage {stage.index + 1}/{num_stages} done at step {step}: eval top1 "
      f"{ev['top1']:.4f} top5 {ev['top5']:.4f} ({ev['num_examples']} images, "
      f"{ctx.config.eval_image_size}px, EMA)"
    )
  _save(ctx, guard, log, step, state, stage.index)


def _report(ctx: RunContext, state, step: int, log: StageLog) -> dict:
  """The final evaluation, results.json and the closing line."""
  from effnetv2_jax.data import input_pipeline

  final_wall_s, t0 = log.total_wall_s(), time.perf_counter()
  final = ctx.evaluator(state_lib.eval_variables(state))
  if log.curve.enabled and (not log.curve.points or log.curve.points[-1]["step"] < step):
    last = ctx.run.stages[-1]
    log.curve.add(
      step,
      final_wall_s,
      ctx.run.examples_at(step),
      final["top1"],
      final["top5"],
      time.perf_counter() - t0,
      last.index,
      ctx.config.eval_image_size,
      final["num_examples"],
    )
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
    "skipped_records": input_pipeline.skipped_records(),  # unreadable records, per split
    "curve": log.curve.to_dict(),  # time to accuracy (effnetv2_jax/curves.py)
    "train_curve": log.train_curve.to_list(),
  }
  if ctx.batch_fit is not None:
    results[batch_fit_lib.META_KEY] = ctx.batch_fit.to_dict()
  out = paths.join(ctx.workdir, paths.RESULTS_NAME)
  if jax.process_index() == 0:
    try:
      reporting.write_json_atomic(out, results)
    except OSError as e:
      raise ResultsWriteError(
        f"cannot write {out}: {ckpt_lib.first_line(e)}; training is complete and checkpointed "
        f"at step {step}: free space and rerun the same command to evaluate and write it again"
      ) from None
  if jax.process_index() == 0:
    _write_curves_png(ctx.workdir, results)
  if log.curve.points:
    t = curves.time_to(results, final["top1"])
    t_net = curves.time_to(results, final["top1"], exclude_eval=True)
    _print(
      f"time to accuracy: {len(log.curve.points)} curve points; top1 {final['top1']:.4f} first "
      f"reached at {reporting.format_duration(t)} ({reporting.format_duration(t_net)} without "
      f"the curve evals' own {log.curve.eval_s_total:.0f}s)"
    )
  _print(
    f"done: step {step}, eval top1 {final['top1']:.4f} top5 {final['top5']:.4f} on "
    f"{final['num_examples']} images; {reporting.format_duration(results['total_wall_s'])} "
    f"total; results in {out}"
  )
  return results


def _write_curves_png(workdir: str, results: dict) -> None:
  """WORKDIR/curves.png: top-1 and train loss against wall time. A plot that fails costs a
  warning, never the finished run."""
  try:
    curves.plot_curves(results, paths.join(workdir, curves.CURVES_PNG))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("could not write %s: %s", curves.CURVES_PNG, e)


# --- evaluation only ---------------------------------------------------------------------------


def evaluate(config, workdir: str, *, eval_sizes=None, devices=None) -> dict:
  """Evaluate `config.init_from` (or the workdir's latest checkpoint) with its EMA weights, at
  each of `eval_sizes` (default: config.eval_image_size), after recomputing the BN statistics at
  that size when config.recalibrate_bn > 0.

  Writes DIR/results.json, or DIR/eval_results.json when DIR is the checkpoint's own training
  workdir (its results.json belongs to the training run). results['evals'] holds one entry per
  size (run_eval's keys plus image_size, recalibrate_bn = images recalibrated from, eval_s);
  results['final_eval'] is the entry at config.eval_image_size (the first size when that is not
  among them) with run_eval's keys only, as before.
  """
  sharding.init_distributed()
  run = check_inputs(config)
  sizes = eval_sizes_of(config, eval_sizes)
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
  evaluator = Evaluator(config, run, mesh)
  n_recal = recalibration_images(config, run) if config.get("recalibrate_bn", 0) else 0
  evals = []
  for s in sizes:
    t_size = time.perf_counter()
    v = recalibrated_variables(config, run, model, variables, s, mesh) if n_recal else variables
    ev = evaluator(v, image_size=s)
    evals.append(
      dict(ev, image_size=s, recalibrate_bn=n_recal, eval_s=time.perf_counter() - t_size)
    )
    if len(sizes) > 1 or n_recal:
      recal = f", BN recalibrated on {n_recal} train images" if n_recal else ""
      _print(
        f"eval at {s}px: top1 {ev['top1']:.4f} top5 {ev['top5']:.4f} "
        f"({ev['num_examples']} images{recal})"
      )
  chosen = next((e for e in evals if e["image_size"] == size), evals[0])
  final = {k: chosen[k] for k in EVAL_KEYS}
  results = {
    "status": "evaluated",
    "source": paths.normalize(source),
    "step": src_step,
    "final_eval": final,
    "evals": evals,
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
  if len(sizes) > 1:
    best = max(evals, key=lambda e: e["top1"])
    _print(f"best eval size: {best['image_size']}px, top1 {best['top1']:.4f}")
  _print(
    f"eval of {results['source']} (step {src_step}) at {chosen['image_size']}px: top1 "
    f"{final['top1']:.4f} top5 {final['top5']:.4f} on {final['num_examples']} images; "
    f"written to {out}"
  )
  return results

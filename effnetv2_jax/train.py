"""The training loop: validate, lock, restore-or-init, run the progressive stages, evaluate, report.

  train_and_evaluate(config, workdir) -> results dict (also DIR/results.json when training finishes)
  evaluate(config, workdir)           -> results dict (also DIR/results.json)

Per stage (effnetv2_jax.progressive): the input pipeline is rebuilt at the stage's image size and
RandAugment magnitude, the model with the stage's dropout, and the train step is compiled once,
ahead of time, so a shape change can never silently recompile inside the loop. The state (weights,
optimizer slots, EMA, BN statistics, step) and the global LR schedule carry over.

Determinism: one seed. The step key is fold_in(PRNGKey(seed) split, step) inside the step, and the
data for step t depends only on (seed, t, process), so a restarted run continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effnetv2_jax import checkpoint as ckpt_lib
from effnetv2_jax import config_validation
from effnetv2_jax import optim
from effnetv2_jax import paths
from effnetv2_jax import progressive
from effnetv2_jax import reporting
from effnetv2_jax import sharding
from effnetv2_jax import state as state_lib
from effnetv2_jax import steps as steps_lib
from effnetv2_jax import workdir as workdir_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
RESULTS_NAME = "results.json"
EVAL_RESULTS_NAME = "eval_results.json"  # --mode=eval on a training workdir


class TrainingDivergedError(RuntimeError):
  """Too many consecutive non-finite steps; the last good checkpoint is left as it was."""


@dataclasses.dataclass(frozen=True)
class RunFacts:
  """What the config resolves to once the dataset registry is consulted."""

  num_classes: int
  train_split: str
  eval_split: str
  num_train: int
  steps_per_epoch: float
  total_steps: int
  stages: tuple  # progressive.Stage, ...
  family: str


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


def resolve(config) -> RunFacts:
  from effnetv2_jax.data import datasets

  info = datasets.get_dataset_info(config.dataset, config.data_dir)
  train_split = config.train_split or info.train_split
  eval_split = config.eval_split or info.eval_split
  num_train = (
    datasets.split_size(info, train_split, config.data_dir)
    if config.train_split
    else info.num_train
  )
  table = progressive.stages(config, num_train)
  return RunFacts(
    num_classes=int(config.num_classes or info.num_classes),
    train_split=train_split,
    eval_split=eval_split,
    num_train=int(num_train),
    steps_per_epoch=num_train / config.batch_size,
    total_steps=table[-1].last_step,
    stages=tuple(table),
    family=config_validation.preprocess_family(config),
  )


def build_model(config, num_classes: int, dropout_rate: float):
  from effnetv2_jax import models

  overrides = (
    config.model_overrides.to_dict()
    if hasattr(config.model_overrides, "to_dict")
    else dict(config.model_overrides)
  )
  overrides["dropout_rate"] = float(dropout_rate)
  return models.create_model(
    config.model_name, num_classes=num_classes, dtype=DTYPES[config.dtype], **overrides
  )


def _rngs(config):
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  return init_rng, train_rng


def _abstract_state(config, model, tx, image_size, mesh):
  init_rng, _ = _rngs(config)
  abstract = jax.eval_shape(
    lambda r: state_lib.create_train_state(r, model, tx, image_size, ema=config.ema_decay > 0),
    init_rng,
  )
  rep = sharding.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract)


def _fresh_state(config, model, tx, image_size, mesh):
  init_rng, _ = _rngs(config)
  state = state_lib.create_train_state(init_rng, model, tx, image_size, ema=config.ema_decay > 0)
  if config.init_from:
    params, batch_stats, src_step = ckpt_lib.load_variables(config.init_from)
    logging.info("init_from %s (step %d)", config.init_from, src_step)
    new_params, _ = ckpt_lib.merge_pretrained(state.params, params)
    new_stats, _ = ckpt_lib.merge_pretrained(state.batch_stats, batch_stats)
    new_params = jax.tree.map(jnp.asarray, new_params)
    new_stats = jax.tree.map(jnp.asarray, new_stats)
    state = state.replace(params=new_params, batch_stats=new_stats, opt_state=tx.init(new_params))
    if state.ema_params is not None:
      state = state.replace(
        ema_params=jax.tree.map(jnp.copy, new_params),
        ema_batch_stats=jax.tree.map(jnp.copy, new_stats),
      )
  return sharding.put_replicated(state, mesh)


def make_evaluator(config, facts: RunFacts, mesh):
  """A function variables -> eval dict, compiled once and reused at every stage end."""
  model = build_model(config, facts.num_classes, facts.stages[-1].dropout_rate)  # train=False
  eval_step = sharding.jit_eval_step(
    steps_lib.make_eval_step(model, num_classes=facts.num_classes), mesh
  )
  return lambda variables: run_eval(config, facts, eval_step, variables, mesh)


def run_eval(config, facts: RunFacts, eval_step, variables, mesh) -> dict:
  """Top-1/top-5 over the whole eval split at config.eval_image_size (masked padding excluded)."""
  from effnetv2_jax.data import input_pipeline

  totals = None
  for batch in input_pipeline.eval_iterator(
    dataset=config.dataset,
    data_dir=config.data_dir,
    split=facts.eval_split,
    global_batch_size=config.eval_batch_size,
    image_size=config.eval_image_size,
    family=facts.family,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    sums = eval_step(variables, sharding.shard_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise RuntimeError(f"evaluation split {facts.eval_split!r} of {config.dataset} is empty")
  t = {k: float(v) for k, v in jax.device_get(totals).items()}
  n = max(t["count"], 1.0)
  return {
    "top1": t["top1_correct"] / n,
    "top5": t["top5_correct"] / n,
    "loss": t["loss_sum"] / n,
    "num_examples": int(round(t["count"])),
  }


def _decode_failures():
  try:
    from effnetv2_jax.data import input_pipeline
  except ImportError:
    return None
  for name in ("decode_failure_count", "decode_failures"):
    fn = getattr(input_pipeline, name, None)
    if callable(fn):
      return int(fn())
  return None


def _stage_record(stage, prev: dict | None) -> dict:
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


def _print(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)
  logging.info(msg)


def _check_inputs(config):
  """Everything that can be rejected before the workdir is touched or anything compiles."""
  config_validation.validate_config(config)
  from effnetv2_jax.data import datasets

  datasets.check_prepared(config.dataset, config.data_dir)


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
  _check_inputs(config)
  paths.makedirs(workdir)
  lock = workdir_lib.WorkdirLock(workdir)
  if jax.process_index() == 0:
    lock.acquire()
  own_flag = preemption is None
  flag = preemption or workdir_lib.PreemptionFlag()
  try:
    if own_flag:
      flag.__enter__()
    return _train(config, workdir, stop_at_step=stop_at_step, flag=flag, devices=devices)
  finally:
    if own_flag:
      flag.__exit__(None, None, None)
    lock.release()


def _train(config, workdir, *, stop_at_step, flag, devices) -> dict:
  run_t0 = time.perf_counter()
  setup_compilation_cache(config)
  facts = resolve(config)
  mesh = sharding.make_mesh(devices)
  tx = optim.make_optimizer(config, facts.steps_per_epoch, facts.total_steps)
  lr_fn = optim.lr_schedule(config, facts.steps_per_epoch, facts.total_steps)
  _, train_rng = _rngs(config)
  train_rng = jax.device_put(train_rng, sharding.replicated(mesh))
  writer = reporting.create_writer(workdir)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  try:
    return _train_loop(
      config,
      workdir,
      facts,
      mesh,
      tx,
      lr_fn,
      train_rng,
      writer,
      ckpt,
      stop_at_step=stop_at_step,
      flag=flag,
      run_t0=run_t0,
    )
  finally:
    # Whatever happens (divergence, an exception, Ctrl-C), in-flight checkpoint writes finish:
    # an interrupted async write would only leave a tmp dir, but a finished one is progress kept.
    ckpt.close()
    writer.close()


def _train_loop(
  config, workdir, facts, mesh, tx, lr_fn, train_rng, writer, ckpt, *, stop_at_step, flag, run_t0
) -> dict:
  from effnetv2_jax.data import augment
  from effnetv2_jax.data import input_pipeline

  cfg_hash = ckpt_lib.config_hash(config)

  # --- restore or init ------------------------------------------------------------------------
  first_model = build_model(config, facts.num_classes, facts.stages[0].dropout_rate)
  latest = ckpt.latest_step()
  records: dict[int, dict] = {}
  prior_wall = 0.0
  if latest is not None:
    abstract = _abstract_state(config, first_model, tx, facts.stages[0].image_size, mesh)
    state, meta = ckpt.restore(latest, abstract)
    if meta.get("config_hash") not in (None, cfg_hash):
      logging.warning(
        "resuming from a checkpoint written with a different config (hash %s != %s)",
        meta.get("config_hash"),
        cfg_hash,
      )
    records = {int(k): v for k, v in meta.get("stages", {}).items()}
    prior_wall = float(meta.get("total_wall_s", 0.0))
    _print(
      f"resumed from {ckpt.directory}/{latest} at step {latest} "
      f"(stage {progressive.stage_at(facts.stages, latest).index + 1}/{len(facts.stages)})"
    )
  else:
    state = _fresh_state(config, first_model, tx, facts.stages[0].image_size, mesh)
  step = int(jax.device_get(state.step))
  records = {s.index: _stage_record(s, records.get(s.index)) for s in facts.stages}

  def meta_for(step_now, stage_index):
    return {
      "step": step_now,
      "stage": stage_index,
      "config_hash": cfg_hash,
      "model_name": config.model_name,
      "num_classes": facts.num_classes,
      "total_wall_s": prior_wall + time.perf_counter() - run_t0,
      "stages": {str(k): v for k, v in records.items()},
    }

  # Each step's divergence flag is read on the host only after the next step has been dispatched,
  # so the host never waits for the device between steps; checkpoints and stage ends drain it.
  pending_bad = []  # [(step, device bool)] of at most the one previous step

  def check_bad():
    nonlocal bad_run
    while pending_bad:
      bad_step, flag = pending_bad.pop(0)
      if float(flag) > 0:
        bad_run += 1
        logging.warning(
          "step %d: non-finite loss or gradient, update skipped (%d in a row)", bad_step, bad_run
        )
        if bad_run >= config.max_bad_steps:
          raise TrainingDivergedError(
            f"training diverged: {bad_run} consecutive non-finite steps ending at step "
            f"{bad_step} (max_bad_steps={config.max_bad_steps}); the last good checkpoint in "
            f"{ckpt.directory} is kept. Lower the learning rate or enable grad_clip_norm."
          )
      else:
        bad_run = 0

  def save(stage_index):
    check_bad()
    if bad_run:  # the guard kept the last good state, but never write while diverging
      return
    if ckpt.save(step, state, meta_for(step, stage_index)):
      logging.info("checkpoint at step %d", step)

  evaluator = make_evaluator(config, facts, mesh)
  eta = reporting.EtaClock()
  num_stages = len(facts.stages)
  bad_run = 0
  status = "completed"
  for stage in facts.stages:
    if step >= stage.last_step:
      continue
    rec = records[stage.index]
    stage_t0 = time.perf_counter()
    model = build_model(config, facts.num_classes, stage.dropout_rate)
    train_step = steps_lib.make_train_step(
      model,
      tx,
      num_classes=facts.num_classes,
      label_smoothing=config.label_smoothing,
      weight_decay=optim.loss_weight_decay(config),
      ema_decay=config.ema_decay,
      mixup_alpha=stage.mixup_alpha,
      cutmix_alpha=stage.cutmix_alpha,
      lr_fn=lr_fn,
      freeze_bn_stats=config.freeze_bn_stats,
    )
    jitted = sharding.jit_train_step(train_step, mesh, state)
    data = input_pipeline.train_iterator(
      dataset=config.dataset,
      data_dir=config.data_dir,
      split=facts.train_split,
      global_batch_size=config.batch_size,
      image_size=stage.image_size,
      family=facts.family,
      augment=augment.for_stage(config, stage),
      seed=config.seed,
      start_step=max(step, stage.first_step),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      shuffle_buffer=config.shuffle_buffer,
      cache=config.cache_dataset,
    )
    batch = sharding.shard_batch(next(data), mesh)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch, train_rng).compile()
    compile_s = time.perf_counter() - t0
    rec["compile_s"] += compile_s
    eta.add_compile(compile_s)
    _print(
      f"stage {stage.index + 1}/{num_stages}: {stage.image_size}px, randaug "
      f"{stage.randaug_magnitude:g}, mixup {stage.mixup_alpha:g}, cutmix "
      f"{stage.cutmix_alpha:g}, dropout {stage.dropout_rate:g}, steps {step}-"
      f"{stage.last_step}; train step compiled in {compile_s:.1f}s"
    )
    writer.write_scalars(step, {"compile_s": compile_s})

    meter = reporting.IntervalMeter()
    while True:
      state, metrics = compiled(state, batch, train_rng)
      step += 1
      more = step < stage.last_step
      if more:  # the host prepares the next batch while the device runs this step
        batch = sharding.shard_batch(next(data), mesh)
      meter.add(metrics)
      check_bad()  # the previous step's flag: the device is already running this one
      pending_bad.append((step, metrics["bad_step"]))

      if step % config.log_every_steps == 0 or not more:
        means, dt, n = meter.flush()
        eta.add_train(dt, n, stage.image_size)
        means["lr"] = means.pop("learning_rate", float("nan"))
        scalars = {f"train/{k}": v for k, v in means.items()}
        scalars["train/steps_per_sec"] = n / max(dt, 1e-9)
        writer.write_scalars(step, scalars)
        _print(
          reporting.progress_line(
            stage_index=stage.index,
            num_stages=num_stages,
            step=step,
            total_steps=facts.total_steps,
            metrics=means,
            images_per_sec=n * config.batch_size / max(dt, 1e-9),
            eta_s=eta.eta(
              [(stage.last_step - step, stage.image_size)]
              + [(s.num_steps, s.image_size) for s in facts.stages[stage.index + 1 :]],
              num_stages - 1 - stage.index,
            ),
          )
        )

      preempted = flag.requested or (jax.process_count() > 1 and ckpt.reached_preemption(step))
      if preempted or (stop_at_step is not None and step >= stop_at_step):
        rec["wall_s"] += time.perf_counter() - stage_t0
        save(stage.index)
        ckpt.wait()
        status = "preempted" if preempted else "stopped"
        _print(
          f"{status} at step {step}: checkpoint saved to {ckpt.directory}/{step}; "
          "rerun the same command to resume"
        )
        return {"status": status, "step": step}
      if not more:
        break
      if step % config.checkpoint_every_steps == 0:
        save(stage.index)
    check_bad()
    del data

    rec["wall_s"] += time.perf_counter() - stage_t0
    last = stage.index == num_stages - 1
    if config.eval_every_stage and not last:
      t0 = time.perf_counter()
      ev = evaluator(state_lib.eval_variables(state))
      rec.update(eval_top1=ev["top1"], eval_top5=ev["top5"])
      rec["wall_s"] += time.perf_counter() - t0
      writer.write_scalars(
        step, {"eval/top1": ev["top1"], "eval/top5": ev["top5"], "eval/loss": ev["loss"]}
      )
      _print(
        f"stage {stage.index + 1}/{num_stages} done at step {step}: eval top1 "
        f"{ev['top1']:.4f} top5 {ev['top5']:.4f} ({ev['num_examples']} images, "
        f"{config.eval_image_size}px, EMA)"
      )
    save(stage.index)

  # --- final evaluation and report -----------------------------------------------------------
  final = evaluator(state_lib.eval_variables(state))
  records[num_stages - 1].update(eval_top1=final["top1"], eval_top5=final["top5"])
  writer.write_scalars(
    step, {"eval/top1": final["top1"], "eval/top5": final["top5"], "eval/loss": final["loss"]}
  )
  writer.flush()
  ckpt.wait()
  results = {
    "status": status,
    "step": step,
    "final_eval": final,
    "stages": [records[s.index] for s in facts.stages],
    "total_wall_s": prior_wall + time.perf_counter() - run_t0,
    "config": config.to_dict(),
    "params_checksum": reporting.params_checksum(state.params),
  }
  failures = _decode_failures()
  if failures is not None:
    results["decode_failures"] = failures
  if jax.process_index() == 0:
    reporting.write_json_atomic(paths.join(workdir, RESULTS_NAME), results)
  _print(
    f"done: step {step}, eval top1 {final['top1']:.4f} top5 {final['top5']:.4f} on "
    f"{final['num_examples']} images; {reporting.format_duration(results['total_wall_s'])} "
    f"total; results in {paths.join(workdir, RESULTS_NAME)}"
  )
  return results


def evaluate(config, workdir: str, *, devices=None) -> dict:
  """Evaluate `config.init_from` (or the workdir's latest checkpoint) with its EMA weights.

  Writes DIR/results.json, or DIR/eval_results.json when DIR is the checkpoint's own training
  workdir (its results.json belongs to the training run).
  """
  sharding.init_distributed()
  _check_inputs(config)
  setup_compilation_cache(config)
  facts = resolve(config)
  source = config.init_from or workdir
  params, batch_stats, src_step = ckpt_lib.load_variables(source)
  model = build_model(config, facts.num_classes, facts.stages[-1].dropout_rate)
  abstract = jax.eval_shape(
    lambda: model.init(
      jax.random.PRNGKey(0),
      jnp.zeros((1, config.eval_image_size, config.eval_image_size, 3)),
      train=False,
    )
  )
  expected = ckpt_lib.flat_shapes(
    {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
  )
  saved = ckpt_lib.flat_shapes({"params": params, "batch_stats": batch_stats})
  lines = ckpt_lib.describe_mismatch(saved, expected)
  if lines:
    raise ckpt_lib._mismatch_error(source, lines)  # pylint: disable=protected-access
  mesh = sharding.make_mesh(devices)
  variables = sharding.put_replicated({"params": params, "batch_stats": batch_stats}, mesh)
  t0 = time.perf_counter()
  final = make_evaluator(config, facts, mesh)(variables)
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
  out = paths.join(workdir, EVAL_RESULTS_NAME if same else RESULTS_NAME)
  results["results_file"] = out
  if jax.process_index() == 0:
    reporting.write_json_atomic(out, results)
  _print(
    f"eval of {results['source']} (step {src_step}): top1 {final['top1']:.4f} top5 "
    f"{final['top5']:.4f} on {final['num_examples']} images; written to {out}"
  )
  return results

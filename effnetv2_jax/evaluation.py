"""Evaluation: top-1/top-5 of some variables on the eval split, for the training loop (stage
ends, curve points, the final eval) and for `--mode=eval` (several eval sizes, BN recalibration).

The training loop's `Evaluator` compiles its step once per run, ahead of time on the background
compiler (effnetv2_jax/compile_ahead.py) when the loop asks; other eval sizes compile once each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effnetv2_jax import compile_ahead as compile_ahead_lib
from effnetv2_jax import config_validation
from effnetv2_jax import plan as plan_lib
from effnetv2_jax import sharding
from effnetv2_jax import state as state_lib
from effnetv2_jax import steps as steps_lib


def batch_spec(mesh, batch_size: int, image_size: int, *, mask: bool = False) -> dict:
  """The global batch the input pipeline delivers (after sharding.shard_batch), as abstract
  arrays: what a step is compiled for before its first batch exists."""
  sh = sharding.batch_sharding(mesh)
  spec = {
    "image": jax.ShapeDtypeStruct(
      (batch_size, image_size, image_size, 3), jnp.float32, sharding=sh
    ),
    "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sh),
  }
  if mask:
    spec["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32, sharding=sh)
  return spec


class Evaluator:
  """Evaluates variables on the eval split at the eval size. Its step compiles once for the whole
  run: ahead, on the background compiler, when `compile_ahead` is called, else at the first call."""

  KEY = "the eval step"

  def __init__(self, config, run: plan_lib.RunPlan, mesh, model=None):
    """`model` defaults to the config's at the last stage's dropout (unused: train=False)."""
    self.config, self.run, self.mesh = config, run, mesh
    if model is None:
      from effnetv2_jax import train  # the trainer's model construction (imports this module)

      model = train.build_model(config, run.num_classes, run.stages[-1].dropout_rate)
    self._jitted = sharding.jit_eval_step(
      steps_lib.make_eval_step(model, num_classes=run.num_classes), mesh
    )
    self._compiler = None
    self._compile_fn = None
    self._step = None

  def compile_ahead(self, compiler: compile_ahead_lib.BackgroundCompiler, state_spec) -> None:
    """Queue the eval step's compile on `compiler` (once per run; later calls do nothing)."""
    if self._compiler is not None or self._step is not None:
      return
    specs = self._step_specs(state_spec)
    self._compiler = compiler
    self._compile_fn = lambda: self._jitted.lower(*specs).compile()
    compiler.submit(self.KEY, self._compile_fn)

  def _step_specs(self, state_spec):
    size, batch = self.config.eval_image_size, self.config.eval_batch_size
    return state_lib.eval_variables(state_spec), batch_spec(self.mesh, batch, size, mask=True)

  def compile_step(self, state_spec):
    """The eval step lowered and compiled for the eval variables of `state_spec` (abstract train
    state) and a masked batch of eval_batch_size at eval_image_size; `compiled(variables, batch)`
    -> masked sums. The program the run evaluates with (plan mode's probe times it too)."""
    return self._jitted.lower(*self._step_specs(state_spec)).compile()

  def __call__(self, variables, *, image_size=None, max_examples=None) -> dict:
    """Eval dict at `image_size` (default config.eval_image_size); `max_examples` (None or 0:
    the whole split) evaluates the same fixed subset of that many images at every call."""
    size = image_size or self.config.eval_image_size
    if size != self.config.eval_image_size:  # the test-resolution search: one compile per size
      step = self._jitted
    else:
      if self._step is None:
        if self._compiler is None:
          self._step = self._jitted
        else:
          self._step, _, _ = self._compiler.get(self.KEY, self._compile_fn)
      step = self._step
    return run_eval(
      self.config, self.run, step, variables, self.mesh, image_size=size, max_examples=max_examples
    )


def run_eval(
  config,
  run: plan_lib.RunPlan,
  eval_step,
  variables,
  mesh,
  *,
  image_size: int | None = None,
  max_examples: int | None = None,
) -> dict:
  """Top-1/top-5 over the eval split at `image_size` (default config.eval_image_size), masked
  padding excluded. `max_examples` = N: only the split's first N images (per process: its
  shard's first share of N, input_pipeline.eval_iterator), so every eval sees the same N."""
  from effnetv2_jax.data import input_pipeline

  totals = None
  for batch in input_pipeline.eval_iterator(
    dataset=config.dataset,
    data_dir=config.data_dir,
    split=run.eval_split,
    global_batch_size=config.eval_batch_size,
    image_size=int(image_size or config.eval_image_size),
    family=run.family,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    max_skipped_fraction=config.get("max_skipped_fraction"),
    max_examples=max_examples or None,
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


EVAL_KEYS = ("top1", "top5", "loss", "num_examples")  # what run_eval returns: final_eval's keys


def eval_sizes_of(config, eval_sizes=None) -> list[int]:
  """The sizes `evaluate` evaluates at: `eval_sizes` in order, duplicates dropped, or
  [config.eval_image_size] when it is empty or None. ConfigError for a size that is not a
  positive integer."""
  sizes = []
  for size in eval_sizes or [config.eval_image_size]:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
      raise config_validation.ConfigError(
        "eval_sizes", f"must be positive integers (image sizes in pixels), got {size!r}"
      )
    if size not in sizes:
      sizes.append(size)
  return sizes


def recalibration_images(config, run: plan_lib.RunPlan) -> int:
  """How many train images `config.recalibrate_bn` recalibrates from: whole batches of
  eval_batch_size, no more than the train split holds (0 = off)."""
  n = min(int(config.recalibrate_bn or 0), run.num_train)
  return n // config.eval_batch_size * config.eval_batch_size


def recalibrated_variables(config, run: plan_lib.RunPlan, model, variables, image_size, mesh):
  """`variables` with BN statistics recomputed at `image_size` from the first
  `recalibration_images` of the train split in a seeded shuffle (config.seed; the same images at
  every size), with the eval preprocessing (effnetv2_jax/recalibrate.py)."""
  from effnetv2_jax import recalibrate
  from effnetv2_jax.data import input_pipeline

  n = recalibration_images(config, run)
  if n <= 0:
    raise config_validation.ConfigError(
      "recalibrate_bn",
      f"the train split {run.train_split!r} ({run.num_train} images) holds no whole batch of "
      f"eval_batch_size {config.eval_batch_size} to recalibrate from; lower eval_batch_size",
    )
  batches = input_pipeline.eval_iterator(
    dataset=config.dataset,
    data_dir=config.data_dir,
    split=run.train_split,
    global_batch_size=config.eval_batch_size,
    image_size=int(image_size),
    family=run.family,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    max_examples=n,
    shuffle_seed=config.seed,
    shuffle_buffer=config.shuffle_buffer,
  )
  stats = recalibrate.recalibrate_batch_stats(model, variables, batches, mesh=mesh)
  return {"params": variables["params"], "batch_stats": stats}

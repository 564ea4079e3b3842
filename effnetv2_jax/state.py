"""The training state: a pure pytree of arrays that carries over between progressive stages.

There is no `apply_fn`/`tx` inside: the model is rebuilt per stage (the dropout rate changes) while
the weights, optimizer slots, BN statistics, EMA and step carry over, and a pytree of arrays is what
orbax saves/restores and what `NamedSharding`s are attached to.

What the model reads (`params`, `batch_stats`) are trees, as Flax makes them. What only the update
touches is flat (`effnetv2_jax.flat.Flat`, a few 1-D buffers): the optimizer slots (the optimizer
runs on `optim.param_layout(params).ravel(params)`), `ema_params` and `ema_batch_stats`. A Flat
still reads like its tree (`state.ema_params["stem"]["conv"]["kernel"]`, `.to_tree()`), and
checkpoints hold the trees, under the same names as when every slot was a tree.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from effnetv2_jax import flat, optim

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 scalar: number of train steps taken (skipped non-finite steps included)
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  # EMA of params and of BN moving statistics (the official EMA covers both). None when the run
  # was created with `ema=False`; then evaluation uses the raw variables.
  ema_params: flat.Flat | None = None
  ema_batch_stats: flat.Flat | None = None


def _copy(tree: PyTree) -> PyTree:
  return jax.tree.map(jnp.copy, tree)


def new_train_state(
  params: PyTree, batch_stats: PyTree, tx: optax.GradientTransformation, *, ema: bool = True
) -> TrainState:
  """Step 0 from these variables: fresh optimizer slots (on the flat params) and, with `ema`,
  EMA copies of the variables (distinct buffers: donating a state whose EMA aliased the params
  would donate the same buffer twice)."""
  flat_params = optim.param_layout(params).ravel(params)
  return TrainState(
    step=jnp.zeros([], jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=tx.init(flat_params),
    ema_params=_copy(flat_params) if ema else None,
    ema_batch_stats=_copy(flat.ravel(batch_stats)) if ema else None,
  )


def create_train_state(
  rng: jax.Array, model, tx: optax.GradientTransformation, image_size: int, *, ema: bool = True
) -> TrainState:
  """Initialize the model on a one-image batch at `image_size` and build the optimizer state.

  EfficientNets end in global pooling, so the variables do not depend on `image_size`; it only has
  to be a size the model accepts.
  """
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)

  # One jitted function for init, optimizer slots and EMA copies: a single compile instead of a
  # compile per eager op.
  @jax.jit
  def init(rng):
    variables = model.init(rng, dummy, train=False)
    return new_train_state(variables["params"], variables.get("batch_stats", {}), tx, ema=ema)

  return init(rng)


def ema_decay_at(step, decay: float) -> jax.Array:
  """The EMA decay the train step applies when `state.step == step` (before the increment).

  TF's `ExponentialMovingAverage(decay, num_updates=global_step)` uses
  `min(decay, (1 + n) / (10 + n))`, and the official main.py runs `ema.apply` after the optimizer
  has incremented `global_step`, so `n = step + 1`: 2/11 = 0.182 at step 0, 3/12 = 0.25 at step
  1, 4/13 = 0.308 at step 2 (reference section 10, item 6). `decay=0` makes the "EMA" an exact
  copy of the weights.
  """
  n = jnp.asarray(step, jnp.float32) + 1.0  # the post-increment global step TF reads
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


EMA_HORIZONS = ("images", "steps")


def ema_decay_fn(decay: float, stages=None, batch_size: int | None = None, horizon="images"):
  """step -> the EMA decay that step applies, over a stage table whose batches may differ.

  'images' (config.ema_horizon's default): the average spans a fixed number of images whatever
  the stage's batch B: the per-step decay is `min(decay, (1 + n) / (10 + n)) ** (B / B_ref)`,
  B_ref = `batch_size` (config.batch_size, the batch `decay` is meant for) and n the images seen
  after the step / B_ref (the official warmup on that clock: n = step + 1 at a constant batch).
  'steps': `ema_decay_at(step, decay)` at every batch (the official per-step decay). With one
  batch for every stage both are exactly `ema_decay_at`.
  """
  if horizon not in EMA_HORIZONS:
    raise ValueError(f"ema_horizon must be one of {EMA_HORIZONS}, got {horizon!r}")
  clock = None if horizon == "steps" else optim.stage_clock(stages, batch_size)
  if clock is None:
    return lambda step: ema_decay_at(step, decay)

  def per_step(step):
    t, ratio = clock(step)
    n = t + ratio  # images seen once this step's update is done, in B_ref steps
    warm = jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))
    return jnp.power(warm, ratio).astype(jnp.float32)

  return per_step


def eval_variables(state: TrainState, use_ema: bool = True) -> dict:
  """The variables to evaluate: the EMA ones when present (the official recipe), else the raw."""
  if use_ema and state.ema_params is not None:
    return {
      "params": flat.as_tree(state.ema_params),
      "batch_stats": flat.as_tree(state.ema_batch_stats),
    }
  return {"params": state.params, "batch_stats": state.batch_stats}

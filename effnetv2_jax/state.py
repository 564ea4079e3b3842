"""The training state: a pure pytree of arrays that carries over between progressive stages.

There is no `apply_fn`/`tx` inside: the model is rebuilt per stage (the dropout rate changes) while
the weights, optimizer slots, BN statistics, EMA and step carry over, and a pytree of arrays is what
orbax saves/restores and what `NamedSharding`s are attached to.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 scalar: number of train steps taken (skipped non-finite steps included)
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  # EMA of params and of BN moving statistics (the official EMA covers both). None when the run
  # was created with `ema=False`; then evaluation uses the raw variables.
  ema_params: PyTree | None = None
  ema_batch_stats: PyTree | None = None


def _copy(tree: PyTree) -> PyTree:
  return jax.tree.map(jnp.copy, tree)


def create_train_state(
  rng: jax.Array, model, tx: optax.GradientTransformation, image_size: int, *, ema: bool = True
) -> TrainState:
  """Initialize the model on a one-image batch at `image_size` and build the optimizer state.

  EfficientNets end in global pooling, so the variables do not depend on `image_size`; it only has
  to be a size the model accepts.
  """
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)

  # One jitted function for init, optimizer slots and EMA copies: a single compile instead of a
  # compile per eager op, and the EMA copies are distinct buffers (donating a state whose EMA
  # aliased the params would donate the same buffer twice).
  @jax.jit
  def init(rng):
    variables = model.init(rng, dummy, train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
      step=jnp.zeros([], jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      ema_params=_copy(params) if ema else None,
      ema_batch_stats=_copy(batch_stats) if ema else None,
    )

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


def eval_variables(state: TrainState, use_ema: bool = True) -> dict:
  """The variables to evaluate: the EMA ones when present (the official recipe), else the raw."""
  if use_ema and state.ema_params is not None:
    return {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
  return {"params": state.params, "batch_stats": state.batch_stats}

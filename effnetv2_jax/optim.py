"""Optimizers, learning-rate schedules and weight decay of the official EfficientNetV2 recipe.

The official code (google/automl efficientnetv2: hparams.py, utils.py) trains with TF1 RMSProp, a
linear warmup followed by an exponential staircase decay counted from step 0, and weight decay as an
L2 term in the loss on kernels only. Every number comes from the config (`configs/default.py`).

The learning rate is a function of the *global* train step, not of an optimizer-internal counter:
the train step passes `step=state.step` to `tx.update`. This keeps the LR aligned with the step
(and with the progressive stage table) even when the divergence guard skips an update and leaves
the optimizer state untouched.

Stages with their own batch size (effnetv2_jax/progressive.py, `batch_rule`): the schedule is a
function of the images seen, counted in reference steps t = images / config.batch_size (so warmup
and decay epochs mean epochs of data), and each step's LR is scaled by its stage's batch:
lr(step) = schedule(t(step)) * B_stage / B_ref, i.e. lr_per_256 * B_stage / 256 at the peak.
`stage_clock` maps a step to (t, B_stage / B_ref) through the stage table. With one batch for
every stage the schedule is the plain function of the step, unchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from effnetv2_jax import flat

PyTree = Any

OPTIMIZERS = ("rmsprop", "sgd", "adamw")
SCHEDULES = ("exponential", "cosine", "constant")


def base_learning_rate(config) -> float:
  """LR scales linearly with the global batch: `lr_per_256 * batch_size / 256` (0.256 at 4096)."""
  return float(config.lr_per_256) * float(config.batch_size) / 256.0


def stage_clock(stages, batch_size: int):
  """step -> (t, r) as float32: t = global images seen before `step` / batch_size, r = the batch
  of the stage training `step` / batch_size. Piecewise linear over the stage table (a few selects,
  jit-friendly); past the last stage it extrapolates the last one. None when every stage trains
  at `batch_size` (then t is the step and r is 1: callers keep their exact step formulas)."""
  if not stages or all(int(s.batch_size) == int(batch_size) for s in stages):
    return None
  b_ref = float(batch_size)
  rows = [(int(s.first_step), s.first_example / b_ref, s.batch_size / b_ref) for s in stages]

  def clock(step):
    step = jnp.asarray(step, jnp.int32)
    t = jnp.zeros((), jnp.float32)
    r = jnp.ones((), jnp.float32)
    for first, offset, ratio in rows:  # stages in order: the last one that started wins
      started = step >= first
      here = jnp.float32(offset) + (step - first).astype(jnp.float32) * jnp.float32(ratio)
      t = jnp.where(started, here, t)
      r = jnp.where(started, jnp.float32(ratio), r)
    return t, r

  return clock


def lr_schedule(
  config, steps_per_epoch: float, total_steps: int | None = None, stages=None
) -> optax.Schedule:
  """Warmup + decay as in the official `WarmupLearningRateSchedule`.

  `stages` (the run's stage table): when their batches differ, the schedule below runs on the
  images seen in reference steps, times the stage's batch / config.batch_size (module docstring;
  'cosine' then ends at the table's last image). Otherwise, and without `stages`, it is exactly
  the function of the step described here.

  - warmup: `base * step / warmup_steps` for `step < warmup_steps` (starts at exactly 0), with
    `warmup_steps = int(warmup_epochs * steps_per_epoch)`, an integer as in the official code
    (e.g. 5 epochs of 1,256,144 / 4096 = 306.68 steps -> 1533 warmup steps, not 1533.38);
  - 'exponential': `base * rate ** floor(step / (decay_epochs * steps_per_epoch))`, counted from step
    0 (not from the end of warmup), floored at `min_lr`;
  - 'cosine': from `base` at step 0 to `min_lr` at `total_steps`, also counted from step 0;
  - 'constant': `base`.
  """
  kind = config.lr_schedule
  if kind not in SCHEDULES:
    raise ValueError(f"lr_schedule: unknown schedule {kind!r}; expected one of {SCHEDULES}")
  if steps_per_epoch <= 0:
    raise ValueError(f"lr_schedule: steps_per_epoch must be > 0, got {steps_per_epoch}")
  base = base_learning_rate(config)
  min_lr = float(config.min_lr)
  # Truncated to an integer like the official schedule (the LR divides by that integer too).
  warmup_steps = int(float(config.warmup_epochs) * float(steps_per_epoch))
  decay_steps = float(config.lr_decay_epochs) * float(steps_per_epoch)
  decay_rate = float(config.lr_decay_rate)
  clock = stage_clock(stages, config.batch_size)
  if clock is not None and kind == "cosine":  # over the images the table trains, in ref. steps
    total_steps = stages[-1].last_example / float(config.batch_size)
  if kind == "cosine":
    if not total_steps or total_steps <= 0:
      raise ValueError("lr_schedule: 'cosine' needs total_steps > 0")
  if kind == "exponential" and decay_steps <= 0:
    raise ValueError("lr_schedule: 'exponential' needs lr_decay_epochs > 0")

  def schedule(step):
    # float32 is exact for step counts well beyond any real run (2**24 steps).
    t = jnp.asarray(step, jnp.float32)
    if kind == "exponential":
      lr = base * decay_rate ** jnp.floor(t / decay_steps)
      lr = jnp.maximum(lr, min_lr)
    elif kind == "cosine":
      frac = jnp.clip(t / float(total_steps), 0.0, 1.0)
      lr = min_lr + (base - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    else:
      lr = jnp.full((), base, jnp.float32)
    if warmup_steps > 0:
      lr = jnp.where(t < warmup_steps, base * t / float(warmup_steps), lr)
    return lr.astype(jnp.float32)

  if clock is None:
    return schedule

  def staged(step):
    t, ratio = clock(step)
    return (schedule(t) * ratio).astype(jnp.float32)

  return staged


class StepLRState(NamedTuple):
  # Only used when the caller does not pass `step=` (e.g. a notebook); the train step always does.
  count: jax.Array


def scale_by_step_schedule(schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
  """Multiply updates by `-schedule(step)`, where `step` is the global step passed as an extra arg.

  Same role as `optax.scale_by_learning_rate`, but the LR follows the caller's step rather than a
  private counter (see the module docstring for why).
  """

  def init_fn(params):
    del params
    return StepLRState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, step=None, **extra_args):
    del params, extra_args
    lr = schedule(state.count if step is None else step)
    updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
    return updates, StepLRState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def tf1_rmsprop(
  schedule: optax.Schedule, *, decay: float, momentum: float, eps: float
) -> optax.GradientTransformationExtraArgs:
  """TF1 `RMSPropOptimizer` semantics (the official optimizer).

      ms  = decay * ms + (1 - decay) * g**2           ms starts at ONES (TF1 slot initializer)
      mom = momentum * mom + lr * g / sqrt(ms + eps)  lr INSIDE the buffer, eps INSIDE the sqrt
      w  -= mom

  This is exactly the chain `optax.rmsprop(..., initial_scale=1.0, eps_in_sqrt=True, momentum=m)`
  builds (scale_by_rms -> scale by -lr -> trace), with lr scaling *before* the momentum trace, so a
  changing LR only affects new contributions; tests/test_optim.py pins it against a numpy TF1
  update with a changing LR. We spell the chain out only to swap in the global-step LR.
  """
  return optax.chain(
    optax.scale_by_rms(decay=decay, eps=eps, initial_scale=1.0, eps_in_sqrt=True),
    scale_by_step_schedule(schedule),
    optax.trace(decay=momentum, nesterov=False),
  )


def make_optimizer(
  config, steps_per_epoch: float, total_steps: int, stages=None
) -> optax.GradientTransformationExtraArgs:
  """The optimizer named by `config.optimizer`, with the config's LR schedule (over `stages`, the
  run's stage table, when its batches differ: `lr_schedule`).

  Gradients arriving here already include the L2 term of the loss (see `l2_penalty`), except for
  'adamw', which decays weights decoupled from the gradient (use `loss_weight_decay(config)` to get
  the L2 coefficient the train step should put in the loss: 0 for adamw).
  """
  name = config.optimizer
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer: unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
  schedule = lr_schedule(config, steps_per_epoch, total_steps, stages)
  parts = []
  if config.grad_clip_norm and config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(config.grad_clip_norm)))
  if name == "rmsprop":
    parts.append(
      tf1_rmsprop(
        schedule,
        decay=float(config.rmsprop_decay),
        momentum=float(config.momentum),
        eps=float(config.rmsprop_eps),
      )
    )
  elif name == "sgd":
    # Order as TF's MomentumOptimizer: accumulate raw gradients, scale by the current LR.
    parts += [
      optax.trace(decay=float(config.momentum), nesterov=True),
      scale_by_step_schedule(schedule),
    ]
  else:  # adamw
    parts += [
      optax.scale_by_adam(b1=float(config.momentum)),
      optax.add_decayed_weights(float(config.weight_decay), mask=weight_decay_mask),
      scale_by_step_schedule(schedule),
    ]
  return optax.chain(*parts)


def for_run(config, run) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
  """(optimizer, LR schedule) of a resolved run (`plan.RunPlan`): what the trainer, plan mode's
  probe and the benchmarks build, over the run's stage table."""
  args = (config, run.steps_per_epoch, run.total_steps, run.stages)
  return make_optimizer(*args), lr_schedule(*args)


def loss_weight_decay(config) -> float:
  """Coefficient of the L2 term in the loss: `config.weight_decay`, or 0 when the optimizer decays
  weights itself (adamw), so weight decay is never applied twice."""
  return 0.0 if config.optimizer == "adamw" else float(config.weight_decay)


def _is_decayed(path, leaf) -> bool:
  # Conv, depthwise-conv and dense weights are all named '...kernel' in Flax (and in the TF
  # checkpoints); biases and BN scale/bias are not. The ndim check keeps a stray 1-D 'kernel' out.
  last = path[-1]
  name = getattr(last, "key", getattr(last, "name", str(last)))
  return isinstance(name, str) and name.endswith("kernel") and jnp.ndim(leaf) >= 2


DECAYED = "decay"  # the group label of decayed leaves in `param_layout`


def param_layout(params: PyTree) -> flat.Layout:
  """How the train step flattens params (and their gradients, optimizer slots and EMA): one buffer
  of the decayed kernels and one of everything else (per dtype), so the weight-decay mask of a
  flat tree is one bool per buffer."""
  return flat.Layout.of(params, group=lambda path, leaf: DECAYED if _is_decayed(path, leaf) else "")


def weight_decay_mask(params: PyTree) -> PyTree:
  """A pytree of bools like `params`: True for conv/dense kernels only (not biases, not BN).

  For params flattened by `param_layout` (a `flat.Flat`): one bool per buffer, alike."""
  if isinstance(params, flat.Flat):
    return params.map_groups(lambda label, _: label == DECAYED)
  return jax.tree_util.tree_map_with_path(_is_decayed, params)


def l2_penalty(params: PyTree, weight_decay: float) -> jax.Array:
  """`(wd / 2) * sum ||kernel||^2` over the masked leaves, in fp32 (TF's `wd * sum(l2_loss(v))`).

  `params` may be a tree or its `param_layout` Flat (then: one sum over the decayed buffer)."""
  mask = weight_decay_mask(params)
  sq = [
    jnp.sum(jnp.square(p.astype(jnp.float32)))
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))
    if m
  ]
  if not sq or not weight_decay:
    return jnp.zeros([], jnp.float32)
  return 0.5 * float(weight_decay) * sum(sq)

"""The train and eval steps: pure functions of (state, batch, rng), jitted by `sharding.py`.

No TensorFlow here. Both steps are written for the *global* batch: under `jax.jit` with a batch
sharded over the mesh's 'data' axis, the means inside BatchNorm and the loss are global reductions,
so 1 device and N devices compute the same numbers. (BatchNorm over groups, the model's
`bn_group_size`, reduces over fixed groups of consecutive images: also device-independent.)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from effnetv2_jax.optim import l2_penalty, param_layout
from effnetv2_jax.state import TrainState, ema_decay_at

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def smooth_labels(targets: jax.Array, label_smoothing: float) -> jax.Array:
  """`(1 - ls) * targets + ls / K` on (possibly mixed) soft targets, as TF's CE does after mixup."""
  if not label_smoothing:
    return targets
  k = targets.shape[-1]
  return targets * (1.0 - label_smoothing) + label_smoothing / k


def _all_finite(tree) -> jax.Array:
  # x * 0 is 0 where x is finite and NaN where it is not, so one fused multiply-sum per leaf
  # answers exactly (no overflow), where isfinite + all per leaf cost XLA:CPU three small ops.
  total = sum(jnp.sum(x * jnp.zeros((), x.dtype), dtype=jnp.float32) for x in jax.tree.leaves(tree))
  return jnp.isfinite(total)


def split_micro_batches(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [B / k, k, ...]: micro-batch j is `[:, j]`, rows j, j + k, j + 2k, ... of `x`.

  Interleaved, not contiguous: the batch is sharded over the devices in contiguous blocks, so
  rows [d * B / D, (d + 1) * B / D) are device d's, and in this view they are rows
  [d * B / (kD), (d + 1) * B / (kD)) of the leading axis for every j. Each micro-batch is then
  B / (kD) rows on every device, with no data movement (k must divide B / D). A [k, B / k] view
  would instead put micro-batch j on devices j * D / k, ... alone and force a reshuffle.
  """
  batch = x.shape[0]
  if batch % k:
    raise ValueError(
      f"grad_accum_steps={k} does not divide the batch of {batch}: micro-batches must be equal "
      "(config.grad_accum_steps must divide the batch per device)"
    )
  return x.reshape((batch // k, k) + x.shape[1:])


def make_train_step(
  model,
  tx: optax.GradientTransformation,
  *,
  num_classes: int,
  label_smoothing: float,
  weight_decay: float,
  ema_decay: float,
  mixup_alpha: float = 0.0,
  cutmix_alpha: float = 0.0,
  lr_fn: Callable[[jax.Array], jax.Array] | None = None,
  freeze_bn_stats: bool = False,
  cutmix_label: str = "batch_mean",
  ema_decay_fn: Callable[[jax.Array], jax.Array] | None = None,
  grad_accum_steps: int = 1,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
  """Build `train_step(state, batch, rng) -> (state, metrics)` for one progressive stage.

  `model` is the stage's model (its dropout rate and compute dtype are baked in); `mixup_alpha`,
  `cutmix_alpha` are the stage's (Python numbers, so one compile per stage). `rng` is the run's base
  key: the step's key is `fold_in(rng, state.step)`, so a resumed run draws the same dropout masks
  and mixing as an uninterrupted one. The model's dtype decides compute; params, optimizer state,
  EMA and BN statistics stay fp32.
  `weight_decay` is the L2 coefficient in the loss (`optim.loss_weight_decay(config)`).
  `freeze_bn_stats` keeps the BN running statistics fixed (fine-tuning). `cutmix_label` is
  `config.cutmix_label`: 'batch_mean' (official: one CutMix label weight per (half-)batch) or
  'per_example' (each example's own pasted fraction); see effnetv2_jax/mixing.py.
  `ema_decay_fn(step)`, when given, is the EMA decay of each step (`state.ema_decay_fn`: stages
  with their own batch); otherwise `ema_decay_at(step, ema_decay)`.

  Divergence guard: when the loss or any gradient is non-finite the update is dropped (params, BN
  stats, optimizer state and EMA keep their old values), the step still advances and
  `metrics['bad_step'] == 1`; the trainer stops after `config.max_bad_steps` in a row.

  Everything after the backward pass runs on flat buffers (`optim.param_layout`, effnetv2_jax/
  flat.py): the gradients are raveled once, the L2 term, the optimizer, the guard's checks and
  selects and the EMA are a few ops on a few long vectors, and the new params are unraveled once
  into the tree the model reads. (Per parameter, the same update cost XLA:CPU ~2,500 small
  kernels, and a whole-state `lax.cond` for the guard another ~2,200 copies, on B0.)

  Gradient accumulation (`grad_accum_steps` = k > 1, `config.grad_accum_steps`): the global batch
  of B images is trained as k micro-batches of B / k inside this one step, a `lax.scan` that keeps
  one micro-batch's activations alive at a time. Micro-batch j is rows j, j + k, j + 2k, ... of the
  batch (see `split_micro_batches`): with the batch split in contiguous blocks over the devices,
  each device's share of every micro-batch is already on it, so no image moves between devices
  (when k divides the per-device batch), and which images form a micro-batch does not depend on
  the device count. Per micro-batch: forward and backward at the same params, the BatchNorm
  running statistics updated in sequence (micro-batch j + 1 starts from j's), its own dropout and
  mixing keys (`fold_in(step key, j)`); mixup/CutMix pair examples within the micro-batch (the
  official code mixes within each replica's batch; with accumulation the micro-batch is that
  unit). The gradients and the loss are averaged over the k equal micro-batches, so the update is
  the full batch's mean-loss gradient whenever each example's loss depends on its micro-batch
  alone (no BN, or `bn_group_size` groups inside micro-batches); then the L2 term, the optimizer,
  the guard and the EMA run once, as for k = 1. k = 1 is exactly the step without accumulation.
  """
  mixing = mixup_alpha > 0 or cutmix_alpha > 0
  if cutmix_label not in ("batch_mean", "per_example"):
    raise ValueError(f"cutmix_label must be 'batch_mean' or 'per_example', got {cutmix_label!r}")
  k = grad_accum_steps
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"grad_accum_steps must be an integer >= 1, got {k!r}")
  if mixing:
    # Imported lazily: only stages that mix need the module.
    from effnetv2_jax import mixing as mixing_lib  # pylint: disable=g-import-not-at-top

  def forward_backward(params, batch_stats, images, labels, dropout_key, mix_key):
    """-> (ce, logits, new batch stats, tree gradient of ce) for one (micro-)batch."""
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if mixing:
      images, targets = mixing_lib.mix(
        mix_key,
        images,
        targets,
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        cutmix_label=cutmix_label,
      )
    targets = smooth_labels(targets.astype(jnp.float32), label_smoothing)

    def loss_fn(params):
      logits, new_vars = model.apply(
        {"params": params, "batch_stats": batch_stats},
        images,
        train=True,
        rngs={"dropout": dropout_key},
        mutable=["batch_stats"],
      )
      logits = logits.astype(jnp.float32)  # fp32 softmax/loss even when computing in bf16
      ce = jnp.mean(optax.softmax_cross_entropy(logits, targets))
      # freeze_bn_stats (fine-tuning from pretrained weights on small data): batches are still
      # normalised by their own statistics, but the running statistics keep the pretrained values.
      stats = batch_stats if freeze_bn_stats else new_vars.get("batch_stats", batch_stats)
      return ce, (logits, stats)

    (ce, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return ce, logits, stats, grads

  def accumulate(state, layout, images, labels, step_key):
    """k micro-batches in a scan -> (mean ce, correct count, last batch stats, mean flat grads)."""
    micro_images = split_micro_batches(images, k)
    micro_labels = split_micro_batches(labels, k)

    def body(carry, j):
      stats, grad_sum, ce_sum, correct = carry
      dropout_key, mix_key = jax.random.split(jax.random.fold_in(step_key, j))
      x = jax.lax.dynamic_index_in_dim(micro_images, j, axis=1, keepdims=False)
      y = jax.lax.dynamic_index_in_dim(micro_labels, j, axis=1, keepdims=False)
      ce, logits, stats, grads = forward_backward(state.params, stats, x, y, dropout_key, mix_key)
      grad_sum = jax.tree.map(jnp.add, grad_sum, layout.ravel(grads))
      correct = correct + jnp.sum((jnp.argmax(logits, -1) == y).astype(jnp.float32))
      return (stats, grad_sum, ce_sum + ce, correct), None

    zeros = jax.tree.map(jnp.zeros_like, layout.ravel(state.params))
    init = (state.batch_stats, zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (stats, grad_sum, ce_sum, correct), _ = jax.lax.scan(body, init, jnp.arange(k))
    return ce_sum / k, correct, stats, jax.tree.map(lambda g: g / k, grad_sum)

  def train_step(state: TrainState, batch: Batch, rng: jax.Array):
    step_key = jax.random.fold_in(rng, state.step)
    images = batch["image"]
    labels = batch["label"]
    layout = param_layout(state.params)
    if k == 1:
      dropout_key, mix_key = jax.random.split(step_key)
      ce, logits, new_batch_stats, grads = forward_backward(
        state.params, state.batch_stats, images, labels, dropout_key, mix_key
      )
      flat_grads = layout.ravel  # of the tree gradient, after the params (as before k existed)
      accuracy = lambda: jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    else:
      ce, correct, new_batch_stats, grads = accumulate(state, layout, images, labels, step_key)
      flat_grads = lambda g: g  # summed on the flat buffers already
      accuracy = lambda: correct / labels.shape[0]
    params = layout.ravel(state.params)
    # The L2 term of the loss and its gradient, on the flat decayed-kernel buffer.
    l2, l2_grads = jax.value_and_grad(lambda p: l2_penalty(p, weight_decay))(params)
    grads = jax.tree.map(jnp.add, flat_grads(grads), l2_grads)
    loss = ce + l2
    ok = jnp.isfinite(loss) & _all_finite(grads)

    # The global step drives the LR (optim.scale_by_step_schedule); plain optax transforms that
    # take no extra args are wrapped so they ignore it.
    updates, new_opt_state = optax.with_extra_args_support(tx).update(
      grads, state.opt_state, params, step=state.step
    )
    new_params = optax.apply_updates(params, updates)
    # A finite gradient can still produce an overflowing update; never keep non-finite weights.
    ok = ok & _all_finite(new_params)

    def keep(new, old):  # the guard: a select per buffer (a few for the flat trees)
      return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    ema_params = ema_batch_stats = None
    if state.ema_params is not None:
      # TF's EMA reads global_step after the optimizer incremented it: ema_decay_at(t) uses t + 1.
      d = ema_decay_at(state.step, ema_decay) if ema_decay_fn is None else ema_decay_fn(state.step)
      avg = lambda e, x: (d * e + (1.0 - d) * x).astype(e.dtype)
      ema_params = keep(jax.tree.map(avg, state.ema_params, new_params), state.ema_params)
      stats = state.ema_batch_stats.layout.ravel(new_batch_stats)
      ema_batch_stats = keep(jax.tree.map(avg, state.ema_batch_stats, stats), state.ema_batch_stats)

    new_state = state.replace(
      step=state.step + 1,
      params=keep(new_params, params).to_tree(),
      batch_stats=keep(new_batch_stats, state.batch_stats),
      opt_state=keep(new_opt_state, state.opt_state),
      ema_params=ema_params,
      ema_batch_stats=ema_batch_stats,
    )
    metrics = {
      "loss": loss,
      "ce_loss": ce,
      "l2_loss": l2,
      "accuracy": accuracy(),
      "grad_norm": optax.global_norm(grads),
      "bad_step": jnp.where(ok, 0.0, 1.0).astype(jnp.float32),
    }
    if lr_fn is not None:
      metrics["learning_rate"] = jnp.asarray(lr_fn(state.step), jnp.float32)
    return new_state, metrics

  return train_step


def make_eval_step(model, *, num_classes: int) -> Callable[[dict, Batch], Metrics]:
  """Build `eval_step(variables, batch) -> sums`, evaluating whatever `variables` it is given.

  The trainer passes the EMA variables (`effnetv2_jax.state.eval_variables(state)`). Returns SUMS weighted by
  `batch['mask']` (padding examples have mask 0), so totals over batches and hosts are exact:
  `{'top1_correct', 'top5_correct', 'loss_sum', 'count'}`; loss is plain CE (no smoothing).
  """
  k = min(5, num_classes)

  def eval_step(variables: dict, batch: Batch) -> Metrics:
    logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
    labels = batch["label"]
    mask = batch.get("mask")
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    valid = mask > 0
    top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    _, topk = jax.lax.top_k(logits, k)
    top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
    # Padding rows may carry any label (even -1): select rather than multiply so a garbage
    # loss on them cannot turn the sum into NaN.
    safe_labels = jnp.where(valid, labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
    return {
      "top1_correct": jnp.sum(jnp.where(valid, top1 * mask, 0.0)),
      "top5_correct": jnp.sum(jnp.where(valid, top5 * mask, 0.0)),
      "loss_sum": jnp.sum(jnp.where(valid, ce * mask, 0.0)),
      "count": jnp.sum(mask),
    }

  return eval_step

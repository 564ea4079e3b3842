"""BatchNorm recalibration at the evaluation size (FixRes-style, `config.recalibrate_bn`).

A network trained at one resolution and evaluated at another sees activations whose statistics
differ from the running ones it learned; recomputing them at the eval size from training images
(no augmentation) fixes that without touching a weight (Touvron et al., 2019, "Fixing the
train-test resolution discrepancy").

  new_stats = recalibrate_batch_stats(model, variables, batches)

What is computed: every BatchNorm layer's running statistics are replaced by the exact average,
over the K recalibration batches, of the statistics that layer computes on each batch in a
train-mode forward pass: mean = (1/K) sum_k mean_k, var = (1/K) sum_k var_k, with mean_k and
var_k (biased, as nn.BatchNorm keeps it) over the batch's images and pixels. It is computed by
running the model with `bn_momentum=0` (a layer's running value becomes exactly its batch
statistic) and summing those, not by an EMA, so the old statistics have no weight and the order
of the batches none. As in a train-mode pass, each layer normalizes with its batch's own
statistics, so a layer's statistics are those of the activations it sees in training. The model
is cloned with dropout and drop-path off (nothing stochastic changes the activations) and
`bn_group_size=0` (statistics over each whole recalibration batch). Nothing but `batch_stats` is
updated: params come back untouched, and the returned tree has the old one's structure.

The per-batch step is jitted once per call (so once per image size: an eval at several sizes
calls this once per size), with the batch sharded over `mesh` when one is given: BatchNorm's
means are global reductions, so 1 or N devices give the same statistics.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

# Module attributes switched off for recalibration, where the model defines them.
_RECALIBRATION_OVERRIDES = {
  "bn_momentum": 0.0,
  "dropout_rate": 0.0,
  "drop_path_rate": 0.0,
  "bn_group_size": 0,
}


def recalibration_model(model):
  """`model` with momentum-0 BatchNorm and no dropout, drop-path or BN groups."""
  names = {f for f in _RECALIBRATION_OVERRIDES if hasattr(model, f)}
  if "bn_momentum" not in names:
    raise ValueError(
      f"{type(model).__name__} has no bn_momentum attribute: recalibration sets it to 0 so that a "
      "train-mode pass stores each batch's own statistics"
    )
  return model.clone(**{f: _RECALIBRATION_OVERRIDES[f] for f in names})


def make_batch_stats_fn(model, mesh=None):
  """jit(variables, images) -> the batch_stats tree of one train-mode pass over `images`: each
  BN layer's statistics of this batch (momentum 0). Sharded over `mesh` when given."""
  rec = recalibration_model(model)

  def batch_stats_of(variables, images):
    _, updated = rec.apply(
      {"params": variables["params"], "batch_stats": variables["batch_stats"]},
      images,
      train=True,
      rngs={"dropout": jax.random.PRNGKey(0)},  # unused: every rate is 0
      mutable=["batch_stats"],
    )
    return jax.tree.map(lambda x: x.astype(jnp.float32), updated["batch_stats"])

  if mesh is None:
    return jax.jit(batch_stats_of)
  from effnetv2_jax import sharding  # pylint: disable=g-import-not-at-top

  rep = sharding.replicated(mesh)
  return jax.jit(
    batch_stats_of, in_shardings=(rep, sharding.batch_sharding(mesh)), out_shardings=rep
  )


def recalibrate_batch_stats(
  model, variables: Mapping[str, PyTree], batches: Iterable, *, mesh=None
) -> PyTree:
  """New batch_stats for `variables` from `batches` (see the module docstring).

  `batches`: images [B, H, W, 3] at the eval size, or dicts with an 'image' (and optionally a
  'mask', which must be all ones: a padded batch would skew the statistics). Every batch has the
  same weight, so give batches of one size. Returns a tree like variables['batch_stats'], each
  leaf in its old dtype; raises ValueError when `batches` is empty.
  """
  from effnetv2_jax import sharding  # pylint: disable=g-import-not-at-top

  old = variables["batch_stats"]
  fn = make_batch_stats_fn(model, mesh)
  total, count = None, 0
  for batch in batches:
    if isinstance(batch, Mapping):
      mask = batch.get("mask")
      if mask is not None and not bool(np.all(np.asarray(mask) > 0)):
        raise ValueError(
          "recalibrate_batch_stats: a batch holds padding (mask 0); use only full batches of "
          "real images"
        )
      images = batch["image"]
    else:
      images = batch
    if mesh is not None:
      images = sharding.shard_batch({"image": images}, mesh)["image"]
    stats = fn(variables, images)
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    count += 1
  if total is None:
    raise ValueError("recalibrate_batch_stats: no batches")
  new = jax.tree.map(lambda s, o: (s / count).astype(o.dtype), total, old)
  if jax.tree.structure(new) != jax.tree.structure(old):
    raise ValueError("recalibrated batch_stats do not have the model's structure")
  return new

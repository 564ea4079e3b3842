"""BatchNorm recalibration (effnetv2_jax/recalibrate.py): only the statistics change, and they
are the exact average of each batch's train-mode statistics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effnetv2_jax import models
from effnetv2_jax import recalibrate
from effnetv2_jax import sharding

import _train_fixtures as fx

EPS = 1e-3


class TinyBN(nn.Module):
  """Dense -> BN -> relu -> dropout -> Dense -> BN, on [B, H, W, C] images."""

  bn_momentum: float = 0.9
  dropout_rate: float = 0.5  # recalibration must switch it off

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: nn.BatchNorm(
      use_running_average=not train, momentum=self.bn_momentum, epsilon=EPS, name=name
    )
    x = bn("bn1")(nn.Dense(4, name="d1")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))
    x = bn("bn2")(nn.Dense(3, name="d2")(x))
    return jnp.mean(x, axis=(1, 2))


def _randomized(variables, seed=1):
  """Non-trivial BN scales/biases and running statistics, so nothing matches by accident."""
  leaves, tree = jax.tree.flatten(variables)
  rng = np.random.default_rng(seed)
  leaves = [np.asarray(x) + rng.normal(0, 0.3, np.shape(x)).astype(np.float32) for x in leaves]
  out = jax.tree.unflatten(tree, leaves)
  out["batch_stats"] = jax.tree.map(np.abs, out["batch_stats"])  # a variance must stay > 0
  return out


def _numpy_stats(variables, batches):
  p = jax.tree.map(np.asarray, variables["params"])
  sums = {"bn1": [0.0, 0.0], "bn2": [0.0, 0.0]}
  for x in batches:
    x = np.asarray(x, np.float64)
    h = x @ p["d1"]["kernel"] + p["d1"]["bias"]
    for name, nxt in (("bn1", "d2"), ("bn2", None)):
      m, v = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
      sums[name][0] += m
      sums[name][1] += v
      h = (h - m) / np.sqrt(v + EPS) * p[name]["scale"] + p[name]["bias"]
      if nxt:
        h = np.maximum(h, 0.0) @ p[nxt]["kernel"] + p[nxt]["bias"]
  k = len(batches)
  return {n: {"mean": s[0] / k, "var": s[1] / k} for n, s in sums.items()}


def test_statistics_are_the_average_of_each_batchs_train_mode_statistics():
  model = TinyBN()
  rng = np.random.default_rng(0)
  batches = [rng.normal(i, 1.0 + i, (6, 5, 5, 3)).astype(np.float32) for i in range(3)]
  variables = _randomized(model.init(jax.random.PRNGKey(0), batches[0], train=False))
  new = recalibrate.recalibrate_batch_stats(model, variables, batches)
  expected = _numpy_stats(variables, batches)
  for name in ("bn1", "bn2"):
    for stat in ("mean", "var"):
      np.testing.assert_allclose(new[name][stat], expected[name][stat], rtol=1e-4, atol=1e-5)
  # The old statistics have no weight, and the order of the batches none.
  other = dict(variables, batch_stats=jax.tree.map(lambda x: x * 7.0, variables["batch_stats"]))
  again = recalibrate.recalibrate_batch_stats(model, other, batches[::-1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new, again)


def test_batches_may_be_eval_iterator_dicts_but_not_padded():
  model = TinyBN()
  x = np.ones((4, 3, 3, 3), np.float32) * np.arange(4, dtype=np.float32)[:, None, None, None]
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  a = recalibrate.recalibrate_batch_stats(model, variables, [x])
  b = recalibrate.recalibrate_batch_stats(
    model, variables, [{"image": x, "label": np.zeros(4), "mask": np.ones(4)}]
  )
  jax.tree.map(np.testing.assert_array_equal, a, b)
  with pytest.raises(ValueError, match="padding"):
    recalibrate.recalibrate_batch_stats(
      model, variables, [{"image": x, "mask": np.array([1.0, 1.0, 1.0, 0.0])}]
    )
  with pytest.raises(ValueError, match="no batches"):
    recalibrate.recalibrate_batch_stats(model, variables, [])
  with pytest.raises(ValueError, match="bn_momentum"):
    recalibrate.recalibration_model(nn.Dense(2))


def test_only_batch_stats_change_on_an_efficientnet():
  model = models.create_model(
    "efficientnetv2-b0",
    num_classes=2,
    blocks=fx.TINY_BLOCKS,
    stem_filters=8,
    head_filters=16,
    drop_path_rate=0.2,
    dropout_rate=0.3,
    bn_group_size=2,  # off for recalibration: statistics over whole batches
  )
  rng = np.random.default_rng(0)
  batches = [rng.normal(0.5, 2.0, (4, 24, 24, 3)).astype(np.float32) for _ in range(2)]
  variables = model.init(jax.random.PRNGKey(0), batches[0], train=False)
  before = jax.tree.map(np.array, variables)  # host copies
  mesh = sharding.make_mesh(jax.devices()[:1])
  new = recalibrate.recalibrate_batch_stats(model, variables, batches, mesh=mesh)
  assert jax.tree.structure(new) == jax.tree.structure(variables["batch_stats"])
  for old, fresh in zip(jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(new)):
    assert old.shape == fresh.shape and old.dtype == fresh.dtype
  # Params (and the input statistics) untouched, bitwise; every statistic recomputed.
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, variables))
  changed = [
    not np.allclose(a, b)
    for a, b in zip(jax.tree.leaves(before["batch_stats"]), jax.tree.leaves(new))
  ]
  assert all(changed)
  # Deterministic (no dropout or drop-path left on): a second call gives the same numbers.
  again = recalibrate.recalibrate_batch_stats(model, variables, batches)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new, again)
  # The recalibrated variables run at eval.
  logits = model.apply({"params": variables["params"], "batch_stats": new}, batches[0], train=False)
  assert logits.shape == (4, 2) and np.isfinite(np.asarray(logits)).all()

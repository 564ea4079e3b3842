"""BatchNorm over groups of images (`bn_group_size`, models/layers.py GroupedBatchNorm).

The official TPU BatchNorm computes statistics over groups of per-replica batch x min(8, replicas)
images (reference section 10, item 9); `bn_group_size=G` does it for groups of G consecutive images
of the global batch, whatever the device count. The 1-vs-8-device check through a real train step
is in tests/test_sharding.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import imagenet
from effnetv2_jax import config_validation as cv
from effnetv2_jax import progressive, sharding
from effnetv2_jax.models import create_model
from effnetv2_jax.models.layers import ConvBNAct, GroupedBatchNorm, bn_module

MOMENTUM, EPS = 0.9, 1e-3


def _x(shape=(8, 4, 4, 3), seed=0):
  r = np.random.default_rng(seed)
  # A different offset and scale per image: groups really have different statistics.
  return (r.normal(size=shape) * (1 + np.arange(shape[0]))[:, None, None, None] + 3.0).astype(
    np.float32
  )


def _numpy_grouped_bn(x, g, scale, bias, ra_mean, ra_var):
  """Each group of g images normalised on its own; running stats from the mean over groups."""
  out, means, vars_ = [], [], []
  for start in range(0, x.shape[0], g):
    grp = x[start : start + g].astype(np.float64)
    m, v = grp.mean(axis=(0, 1, 2)), grp.var(axis=(0, 1, 2))  # biased variance, as TF and Flax
    out.append((grp - m) / np.sqrt(v + EPS) * scale + bias)
    means.append(m)
    vars_.append(v)
  new_mean = MOMENTUM * ra_mean + (1 - MOMENTUM) * np.mean(means, axis=0)
  new_var = MOMENTUM * ra_var + (1 - MOMENTUM) * np.mean(vars_, axis=0)
  return np.concatenate(out), new_mean, new_var


@pytest.mark.parametrize("g", [1, 2, 4, 8])
def test_grouped_bn_equals_normalising_each_group_separately(g):
  x = _x()
  r = np.random.default_rng(1)
  variables = {
    "params": {
      "scale": r.uniform(0.5, 1.5, 3).astype(np.float32),
      "bias": r.normal(size=3).astype(np.float32),
    },
    "batch_stats": {
      "mean": r.normal(size=3).astype(np.float32),
      "var": r.uniform(0.5, 2, 3).astype(np.float32),
    },
  }
  layer = GroupedBatchNorm(g, momentum=MOMENTUM, epsilon=EPS)
  y, upd = layer.apply(variables, x, mutable=["batch_stats"])
  ref, ref_mean, ref_var = _numpy_grouped_bn(
    x,
    g,
    *(variables[c][k] for c, k in [("params", "scale"), ("params", "bias")]),
    variables["batch_stats"]["mean"],
    variables["batch_stats"]["var"],
  )
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], ref_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"], ref_var, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="bn_group_size=3"):
    GroupedBatchNorm(3).apply(variables, x, mutable=["batch_stats"])


def _stage_repeats_b0():
  return create_model(
    "efficientnetv2-b0",
    num_classes=5,
    stage_repeats=(1, 1, 1, 1, 1, 1),
    dropout_rate=0.0,
    drop_path_rate=0.0,
  )


def test_a_grouped_network_is_the_network_run_on_each_group_separately():
  # Through every BN of a real model: batch 4 in groups of 2 == two batches of 2 with BN over the
  # whole (2-image) batch; the running statistics are the mean of the two separate updates.
  plain = _stage_repeats_b0()
  grouped = plain.clone(bn_group_size=2)
  # 64 px: the last stages still have 2 x 2 pixels, so a 2-image group has 8 values per statistic
  # (at 16 px a 1 x 1 map leaves 2, and rsqrt(var + eps) amplifies rounding chaotically).
  x = _x((4, 64, 64, 3), seed=2) / 3
  v = jax.jit(lambda x: plain.init(jax.random.PRNGKey(0), x, train=False))(x)
  train = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats"]))
  logits, upd = train(grouped)(v, x)
  parts = [train(plain)(v, x[i : i + 2]) for i in (0, 2)]
  np.testing.assert_allclose(logits, np.concatenate([p[0] for p in parts]), rtol=2e-4, atol=2e-5)
  jax.tree.map(
    lambda s, a, b: np.testing.assert_allclose(s, (a + b) / 2, rtol=1e-4, atol=1e-6),
    upd["batch_stats"],
    parts[0][1]["batch_stats"],
    parts[1][1]["batch_stats"],
  )
  # Whole-batch BN gives different logits, so the comparison above is not vacuous.
  whole, _ = train(plain)(v, x)
  assert np.abs(np.asarray(whole) - np.asarray(logits)).max() > 1e-3


def test_group_size_zero_is_bitwise_todays_batchnorm_and_eval_and_names_do_not_change():
  x = jnp.asarray(_x((4, 8, 8, 3)))
  # Today's layer: conv then Flax BatchNorm over the whole batch, float32.
  layer0 = ConvBNAct(6, 3, bn_group_size=0, bn_momentum=MOMENTUM, bn_epsilon=EPS)
  v = layer0.init(jax.random.PRNGKey(0), x, train=False)

  class Today(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(6, (3, 3), padding="SAME", use_bias=False, name="conv")(x)
      bn = nn.BatchNorm(
        use_running_average=False, momentum=MOMENTUM, epsilon=EPS, dtype=jnp.float32, name="bn"
      )
      return nn.swish(bn(x))

  got, got_upd = layer0.apply(v, x, train=True, mutable=["batch_stats"])
  ref, ref_upd = Today().apply(v, x, mutable=["batch_stats"])
  np.testing.assert_array_equal(got, ref)
  jax.tree.map(np.testing.assert_array_equal, got_upd, ref_upd)

  # A whole model: the default and bn_group_size=0 are the same module, so the same numbers.
  plain = _stage_repeats_b0()
  assert plain.bn_group_size == 0 and plain == plain.clone(bn_group_size=0)
  grouped = plain.clone(bn_group_size=2)
  xs = jnp.asarray(_x((4, 16, 16, 3), seed=3) / 3)
  v0 = jax.jit(lambda x: plain.init(jax.random.PRNGKey(0), x, train=False))(xs)
  v2 = jax.jit(lambda x: grouped.init(jax.random.PRNGKey(0), x, train=False))(xs)
  # Same variables (names 'scale', 'bias', 'mean', 'var', shapes, init values): checkpoints and
  # converters see no difference.
  jax.tree.map(np.testing.assert_array_equal, v0, v2)
  bn_leaves = {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(v2)[0] if len(p) > 2}
  assert {"scale", "bias", "mean", "var"} <= bn_leaves
  # Eval mode is unchanged: running statistics, bitwise the same.
  ev = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=False))(v0, xs)
  np.testing.assert_array_equal(ev(plain), ev(grouped))
  # The train step's variables come back under the same names.
  _, upd = jax.jit(lambda v, x: grouped.apply(v, x, train=True, mutable=["batch_stats"]))(v0, xs)
  assert jax.tree.structure(upd["batch_stats"]) == jax.tree.structure(v0["batch_stats"])


def test_bn_module_picks_the_layer():
  assert isinstance(bn_module(True, 0, name="bn"), nn.BatchNorm)
  assert isinstance(bn_module(False, 4, name="bn"), nn.BatchNorm)  # eval: running statistics
  assert isinstance(bn_module(True, 4, name="bn"), GroupedBatchNorm)


def test_grouped_normalisation_needs_no_communication_when_groups_fit_on_a_device():
  # 16 images on 8 devices in contiguous blocks of 2: groups of 2 live on one device each, so the
  # normalised output compiles without collectives; whole-batch BN needs an all-reduce.
  mesh = sharding.make_mesh(jax.devices())
  assert mesh.size == 8
  x = jnp.asarray(_x((16, 4, 4, 3)))
  v = GroupedBatchNorm(2).init(jax.random.PRNGKey(0), x)

  def hlo(layer):
    f = jax.jit(
      lambda v, x: layer.apply(v, x, mutable=["batch_stats"])[0],
      in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
      out_shardings=sharding.batch_sharding(mesh),
    )
    return f.lower(v, x).compile().as_text()

  collectives = ("all-reduce", "all-gather", "all-to-all", "collective-permute")
  grouped = hlo(GroupedBatchNorm(2, momentum=MOMENTUM, epsilon=EPS))
  assert not any(c in grouped for c in collectives), [c for c in collectives if c in grouped]
  whole = hlo(nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPS))
  assert "all-reduce" in whole


def test_model_override_is_checked_and_the_batch_must_be_divisible():
  for bad in (-1, 2.5, True):
    with pytest.raises(ValueError, match="bn_group_size"):
      create_model("efficientnetv2-b0", bn_group_size=bad)
  assert create_model("resnet50", bn_group_size=4).bn_group_size == 4
  model = create_model("efficientnetv2-b0", num_classes=3, stage_repeats=(1,) * 6, bn_group_size=3)
  x = jnp.zeros((4, 16, 16, 3))
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  with pytest.raises(ValueError, match="bn_group_size=3 .* batch of 4"):
    jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), v)


def _config(**changes):
  c = imagenet.get_config("variant=s")
  c.num_train_steps = 100
  for k, val in changes.items():
    c[k] = val
  return c


def test_validation_names_the_field():
  cv.validate_config(_config(), num_devices=8, check_dataset=False)  # 1024 divides 4096
  for bad, needle in ((3000, "does not divide batch_size 4096"), (-2, "integer >= 0")):
    with pytest.raises(cv.ConfigError) as e:
      cv.validate_config(_config(bn_group_size=bad), num_devices=8, check_dataset=False)
    assert e.value.field == "bn_group_size" and needle in str(e.value)
  c = _config()
  c.model_overrides.bn_group_size = 8
  with pytest.raises(cv.ConfigError, match="config.bn_group_size") as e:
    cv.validate_config(c, num_devices=8, check_dataset=False)
  assert e.value.field == "model_overrides"
  # The trainer's per-stage check, for stages with their own batch size.
  cv.check_bn_group_size(1024, 2048, "stage 1's batch")
  with pytest.raises(cv.ConfigError, match="does not divide stage 1's batch 1536"):
    cv.check_bn_group_size(1024, 1536, "stage 1's batch")


def test_validation_checks_every_stage_batch(monkeypatch):
  real = progressive.stages

  def with_batches(config, num_train_examples=None, **kw):
    table = real(config, num_train_examples, **kw)

    class StageWithBatch:
      def __init__(self, stage, batch_size):
        self.index, self.batch_size, self.num_steps = stage.index, batch_size, stage.num_steps

    return [StageWithBatch(s, 4096 if s.index == 0 else 1536) for s in table]

  monkeypatch.setattr(progressive, "stages", with_batches)
  with pytest.raises(cv.ConfigError, match="stage 1's batch 1536") as e:
    cv.validate_config(_config(), num_devices=8, check_dataset=False)
  assert e.value.field == "bn_group_size"

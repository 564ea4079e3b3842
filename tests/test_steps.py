"""Train/eval steps (effnetv2_jax/steps.py) and the train state (effnetv2_jax/state.py)."""

import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import effnetv2_jax
from configs import default
from effnetv2_jax import optim, state as state_lib, steps
from tiny_net import TinyNet

K = 10


@functools.lru_cache(maxsize=None)
def _init_state():
  # One init for the whole module (compiles are the slow part of these tests); bf16 and no-EMA
  # variants reuse it, since params are fp32 either way and only the EMA slots differ.
  c = default.get_config()
  c.batch_size, c.warmup_epochs, c.lr_schedule = 256, 0.0, "constant"
  tx = optim.make_optimizer(c, 10.0, 100)
  state = state_lib.create_train_state(jax.random.key(0), TinyNet(num_classes=K), tx, 8)
  return c, tx, state


@functools.lru_cache(maxsize=None)
def _setup(dropout=0.5, dtype=jnp.float32, ema=True, ema_decay=0.9999, mixup_alpha=0.0):
  c, tx, state = _init_state()
  if not ema:
    state = state.replace(ema_params=None, ema_batch_stats=None)
  model = TinyNet(num_classes=K, dropout_rate=dropout, dtype=dtype)
  step = steps.make_train_step(
    model,
    tx,
    num_classes=K,
    label_smoothing=0.1,
    weight_decay=1e-5,
    ema_decay=ema_decay,
    mixup_alpha=mixup_alpha,
    cutmix_alpha=0.0,
    lr_fn=optim.lr_schedule(c, 10.0),
  )
  return model, state, jax.jit(step)


def _dropout_key(rng, step):
  # The documented derivation: fold the step into the run key, first half of a split for dropout.
  return jax.random.split(jax.random.fold_in(rng, step))[0]


def _batch(n=8, seed=0):
  r = np.random.default_rng(seed)
  return {
    "image": jnp.asarray(r.normal(size=(n, 8, 8, 3)), jnp.float32),
    "label": jnp.asarray(r.integers(0, K, size=n), jnp.int32),
  }


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_ema_decay_warmup_formula():
  # TF reads the post-increment global step n = step + 1: min(d, (1 + n) / (10 + n)).
  assert float(state_lib.ema_decay_at(0, 0.9999)) == pytest.approx(2 / 11)
  assert float(state_lib.ema_decay_at(1, 0.9999)) == pytest.approx(3 / 12)
  assert float(state_lib.ema_decay_at(2, 0.9999)) == pytest.approx(4 / 13)
  assert float(state_lib.ema_decay_at(8, 0.9999)) == pytest.approx(10 / 19)
  assert float(state_lib.ema_decay_at(10**7, 0.9999)) == pytest.approx(0.9999)
  assert float(state_lib.ema_decay_at(10**7, 0.0)) == 0.0


def test_ema_covers_params_and_batch_stats():
  _, s0, step = _setup()
  s1, m = step(s0, _batch(), jax.random.key(1))
  d = 2 / 11  # official decay at step 0: (1 + n) / (10 + n) with n = step + 1 = 1
  for ema0, new, ema1 in (
    (s0.ema_params.to_tree(), s1.params, s1.ema_params.to_tree()),
    (s0.ema_batch_stats.to_tree(), s1.batch_stats, s1.ema_batch_stats.to_tree()),
  ):
    jax.tree.map(
      lambda e0, x, e1: np.testing.assert_allclose(e1, d * e0 + (1 - d) * x, rtol=1e-6, atol=1e-7),
      ema0,
      new,
      ema1,
    )
  # BN statistics moved, so the EMA test above was not vacuous for them.
  assert not np.allclose(
    s1.batch_stats["BatchNorm_0"]["mean"], s0.batch_stats["BatchNorm_0"]["mean"]
  )
  assert int(s1.step) == 1 and float(m["bad_step"]) == 0.0


def test_ema_decay_through_real_steps_is_2_11_then_3_12_then_4_13():
  _, s, step = _setup()
  for t, d in enumerate((2 / 11, 3 / 12, 4 / 13)):
    assert int(s.step) == t
    new, _ = step(s, _batch(seed=t), jax.random.key(1))
    jax.tree.map(
      lambda e0, x, e1: np.testing.assert_allclose(e1, d * e0 + (1 - d) * x, rtol=1e-6, atol=1e-7),
      (s.ema_params.to_tree(), s.ema_batch_stats.to_tree()),
      (new.params, new.batch_stats),
      (new.ema_params.to_tree(), new.ema_batch_stats.to_tree()),
    )
    s = new


def test_ema_disabled_representations():
  _, s0, step = _setup(ema=False)
  assert (
    state_lib.create_train_state(
      jax.random.key(0), TinyNet(num_classes=K), _init_state()[1], 8, ema=False
    ).ema_params
    is None
  )
  assert s0.ema_params is None and s0.ema_batch_stats is None
  s1, _ = step(s0, _batch(), jax.random.key(1))
  assert s1.ema_params is None
  assert state_lib.eval_variables(s1)["params"] is s1.params
  # ema_decay=0 with EMA slots: they are exact copies of the weights.
  _, s0, step = _setup(ema_decay=0.0)
  s1, _ = step(s0, _batch(), jax.random.key(1))
  _assert_trees_equal(s1.ema_params.to_tree(), s1.params)
  _assert_trees_equal(s1.ema_batch_stats.to_tree(), s1.batch_stats)


def test_label_smoothing_targets_and_loss():
  t = steps.smooth_labels(jax.nn.one_hot(jnp.array([3]), K), 0.1)
  np.testing.assert_allclose(t[0, 3], 0.91, rtol=1e-6)
  np.testing.assert_allclose(t[0, 0], 0.01, rtol=1e-6)
  np.testing.assert_allclose(jnp.sum(t), 1.0, rtol=1e-6)
  # The step's loss is CE against smoothed targets, plus the L2 term.
  # Dropout is on: reproducing the step's logits also pins the rng derivation.
  model, s0, step = _setup()
  b = _batch()
  _, m = step(s0, b, jax.random.key(1))
  logits, _ = model.apply(
    {"params": s0.params, "batch_stats": s0.batch_stats},
    b["image"],
    train=True,
    mutable=["batch_stats"],
    rngs={"dropout": _dropout_key(jax.random.key(1), 0)},
  )
  targets = steps.smooth_labels(jax.nn.one_hot(b["label"], K), 0.1)
  ce = jnp.mean(optax.softmax_cross_entropy(logits, targets))
  np.testing.assert_allclose(m["ce_loss"], ce, rtol=1e-5)
  np.testing.assert_allclose(m["loss"], ce + optim.l2_penalty(s0.params, 1e-5), rtol=1e-5)


def test_update_is_the_optimizer_on_the_tree_gradient():
  # The step runs the L2 term, the optimizer, the guard and the EMA on flat buffers; the new
  # params are what the same optimizer makes, leaf by leaf, of the tree gradient of CE + L2.
  model, s0, step = _setup()
  _, tx, _ = _init_state()
  b, rng = _batch(), jax.random.key(1)
  s1, m = step(s0, b, rng)

  def loss(params):
    logits, _ = model.apply(
      {"params": params, "batch_stats": s0.batch_stats},
      b["image"],
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": _dropout_key(rng, 0)},
    )
    targets = steps.smooth_labels(jax.nn.one_hot(b["label"], K), 0.1)
    ce = jnp.mean(optax.softmax_cross_entropy(logits, targets))
    return ce + optim.l2_penalty(params, 1e-5)

  grads = jax.grad(loss)(s0.params)
  updates, _ = tx.update(grads, tx.init(s0.params), s0.params, step=s0.step)
  want = optax.apply_updates(s0.params, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s1.params, want)
  assert not np.allclose(s1.params["Dense_0"]["kernel"], s0.params["Dense_0"]["kernel"])
  np.testing.assert_allclose(m["grad_norm"], optax.global_norm(grads), rtol=1e-5)


def test_smoothing_applies_after_mixing(monkeypatch):
  seen = {}

  def fake_mix(rng, images, onehot, *, mixup_alpha, cutmix_alpha, cutmix_label):
    seen["alphas"] = (mixup_alpha, cutmix_alpha)
    seen["cutmix_label"] = cutmix_label
    half = jnp.full_like(onehot, 0.0).at[:, :2].set(0.5)  # every example half class 0, half 1
    return images, half

  fake = types.ModuleType("effnetv2_jax.mixing")
  fake.mix = fake_mix
  monkeypatch.setitem(sys.modules, "effnetv2_jax.mixing", fake)
  monkeypatch.setattr(effnetv2_jax, "mixing", fake, raising=False)
  model, s0, step = _setup(dropout=0.0, mixup_alpha=0.2)
  b = _batch()
  _, m = step(s0, b, jax.random.key(1))
  assert seen["alphas"] == (0.2, 0.0) and seen["cutmix_label"] == "batch_mean"
  logits, _ = model.apply(
    {"params": s0.params, "batch_stats": s0.batch_stats},
    b["image"],
    train=True,
    mutable=["batch_stats"],
  )
  targets = jnp.zeros((8, K)).at[:, :2].set(0.5) * 0.9 + 0.01
  np.testing.assert_allclose(
    m["ce_loss"], jnp.mean(optax.softmax_cross_entropy(logits, targets)), rtol=1e-5
  )


def test_cutmix_label_option_reaches_the_mixing(monkeypatch):
  seen = {}

  def fake_mix(rng, images, onehot, *, mixup_alpha, cutmix_alpha, cutmix_label):
    seen["cutmix_label"] = cutmix_label
    return images, onehot

  fake = types.ModuleType("effnetv2_jax.mixing")
  fake.mix = fake_mix
  monkeypatch.setitem(sys.modules, "effnetv2_jax.mixing", fake)
  monkeypatch.setattr(effnetv2_jax, "mixing", fake, raising=False)
  _, tx, s0 = _init_state()
  kw = dict(num_classes=K, label_smoothing=0.0, weight_decay=0.0, ema_decay=0.0, cutmix_alpha=1.0)
  step = steps.make_train_step(TinyNet(num_classes=K), tx, cutmix_label="per_example", **kw)
  jax.eval_shape(step, s0, _batch(), jax.random.key(0))  # traces the step, compiles nothing
  assert seen["cutmix_label"] == "per_example"
  with pytest.raises(ValueError, match="cutmix_label"):
    steps.make_train_step(TinyNet(num_classes=K), tx, cutmix_label="per_batch", **kw)


def test_divergence_guard_skips_update_but_advances_step():
  _, s0, step = _setup()
  s1, _ = step(s0, _batch(), jax.random.key(1))
  bad = _batch(seed=1)
  bad["image"] = bad["image"].at[0, 0, 0, 0].set(jnp.nan)
  s2, m = step(s1, bad, jax.random.key(1))
  assert float(m["bad_step"]) == 1.0 and not np.isfinite(float(m["loss"]))
  assert int(s2.step) == 2
  for field in ("params", "batch_stats", "opt_state", "ema_params", "ema_batch_stats"):
    _assert_trees_equal(getattr(s2, field), getattr(s1, field))
  # Training goes on normally afterwards.
  s3, m = step(s2, _batch(seed=2), jax.random.key(1))
  assert float(m["bad_step"]) == 0.0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(s3))


def test_bf16_compute_keeps_fp32_state():
  _, s0, step = _setup(dtype=jnp.bfloat16)
  s1, m = step(s0, _batch(), jax.random.key(1))
  assert np.isfinite(float(m["loss"])) and m["loss"].dtype == jnp.float32
  for field in ("params", "batch_stats", "opt_state", "ema_params", "ema_batch_stats"):
    for x in jax.tree.leaves(getattr(s1, field)):
      if jnp.issubdtype(x.dtype, jnp.floating):
        assert x.dtype == jnp.float32, field


def test_rng_is_folded_with_step():
  _, s0, step = _setup()
  b = _batch()
  a1, ma = step(s0, b, jax.random.key(7))
  a2, mb = step(s0, b, jax.random.key(7))
  _assert_trees_equal(a1.params, a2.params)  # same (rng, step) -> same randomness
  # Same batch at a later step draws different dropout masks.
  _, mc = step(s0.replace(step=jnp.int32(5)), b, jax.random.key(7))
  assert float(mc["ce_loss"]) != float(ma["ce_loss"])


def test_eval_step_uses_given_variables_and_mask():
  model, s0, step = _setup()
  s1, _ = step(s0, _batch(), jax.random.key(1))
  model = TinyNet(num_classes=K)  # eval builds its own model; dropout is off at eval anyway
  s1 = s1.replace(ema_params=jax.tree.map(lambda x: x * 0.5, s1.ema_params))
  ev = jax.jit(steps.make_eval_step(model, num_classes=K))
  b = _batch(n=8, seed=3)
  b["mask"] = jnp.array([1, 1, 1, 1, 1, 1, 0, 0], jnp.float32)
  b["label"] = b["label"].at[6:].set(-1)  # padding rows may carry junk labels
  out_ema = ev(state_lib.eval_variables(s1), b)
  out_raw = ev(state_lib.eval_variables(s1, use_ema=False), b)

  logits = model.apply(state_lib.eval_variables(s1), b["image"][:6], train=False)
  labels = b["label"][:6]
  assert float(out_ema["count"]) == 6.0
  np.testing.assert_allclose(out_ema["top1_correct"], jnp.sum(jnp.argmax(logits, -1) == labels))
  top5 = jnp.sum(jnp.any(jax.lax.top_k(logits, 5)[1] == labels[:, None], -1))
  np.testing.assert_allclose(out_ema["top5_correct"], top5)
  np.testing.assert_allclose(
    out_ema["loss_sum"],
    jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels)),
    rtol=1e-5,
  )
  assert float(out_ema["loss_sum"]) != pytest.approx(float(out_raw["loss_sum"]))


def test_freeze_bn_stats_keeps_running_statistics_but_trains_weights():
  c, tx, state = _init_state()
  model = TinyNet(num_classes=K, dropout_rate=0.0)
  frozen = jax.jit(
    steps.make_train_step(
      model,
      tx,
      num_classes=K,
      label_smoothing=0.0,
      weight_decay=0.0,
      ema_decay=0.0,
      freeze_bn_stats=True,
    )
  )
  live = jax.jit(
    steps.make_train_step(
      model, tx, num_classes=K, label_smoothing=0.0, weight_decay=0.0, ema_decay=0.0
    )
  )
  rng = jax.random.key(1)
  after_frozen, _ = frozen(state, _batch(), rng)
  after_live, _ = live(state, _batch(), rng)
  _assert_trees_equal(after_frozen.batch_stats, state.batch_stats)
  # The unfrozen step does move them (so the assertion above could fail), and both train weights.
  changed = jax.tree.map(
    lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
    after_live.batch_stats,
    state.batch_stats,
  )
  assert any(jax.tree.leaves(changed))
  _assert_trees_equal(after_frozen.params, after_live.params)


def test_all_finite_is_exact_for_huge_values_and_catches_each_kind_of_non_finite():
  from effnetv2_jax.steps import _all_finite

  huge = {"a": jnp.full((3,), 3e38, jnp.float32), "b": jnp.full((2, 2), -3e38, jnp.bfloat16)}
  assert bool(_all_finite(huge))  # a sum or a norm of these would overflow
  for bad in (jnp.inf, -jnp.inf, jnp.nan):
    tree = {"a": jnp.ones((3,)).at[1].set(bad), "b": jnp.ones((2, 2), jnp.bfloat16)}
    assert not bool(_all_finite(tree)), bad
  assert bool(_all_finite({}))

"""Optimizer, LR schedule and weight decay of the official recipe (effnetv2_jax/optim.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from effnetv2_jax import optim


def _config(**kw):
  c = default.get_config()
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _tf1_rmsprop_numpy(w, grads, lrs, decay, momentum, eps):
  """TF1 RMSPropOptimizer, written from its documented update: ms starts at ones, eps inside the
  sqrt, and the learning rate multiplies the gradient *before* it enters the momentum buffer."""
  ms, mom = np.ones_like(w), np.zeros_like(w)
  for g, lr in zip(grads, lrs):
    ms = decay * ms + (1 - decay) * g * g
    mom = momentum * mom + lr * g / np.sqrt(ms + eps)
    w = w - mom
  return w


def _run_tx(tx, w, grads, pass_step=True):
  params = {"kernel": jnp.asarray(w)}
  state = tx.init(params)
  for t, g in enumerate(grads):
    kw = {"step": jnp.int32(t)} if pass_step else {}
    upd, state = tx.update({"kernel": jnp.asarray(g)}, state, params, **kw)
    params = optax.apply_updates(params, upd)
  return np.asarray(params["kernel"])


def test_rmsprop_matches_tf1_update_with_changing_lr():
  # warmup over 4 steps, then a staircase that drops every step: the LR differs at every step,
  # so where the LR sits (inside vs outside the momentum buffer) changes the result.
  c = _config(
    batch_size=256,
    lr_per_256=0.1,
    warmup_epochs=2.0,
    lr_decay_epochs=0.5,
    lr_decay_rate=0.5,
    optimizer="rmsprop",
  )
  spe, n = 2.0, 8
  sched = optim.lr_schedule(c, spe)
  lrs = [float(sched(t)) for t in range(n)]
  assert len(set(lrs)) == n
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(3, 4)).astype(np.float32)
  grads = [rng.normal(size=(3, 4)).astype(np.float32) * 3 for _ in range(n)]

  tx = optim.make_optimizer(c, spe, total_steps=100)
  got = _run_tx(tx, w0, grads)
  want = _tf1_rmsprop_numpy(w0.astype(np.float64), grads, lrs, 0.9, 0.9, 1e-3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  # The reference discriminates: PyTorch-style (lr applied outside the buffer) is different.
  ms, mom, w = np.ones_like(w0), np.zeros_like(w0), w0.astype(np.float64)
  for g, lr in zip(grads, lrs):
    ms = 0.9 * ms + 0.1 * g * g
    mom = 0.9 * mom + g / np.sqrt(ms + 1e-3)
    w = w - lr * mom
  assert np.max(np.abs(w - want)) > 1e-3

  # Without step= the transform falls back to its own counter: same numbers.
  np.testing.assert_allclose(_run_tx(tx, w0, grads, pass_step=False), got, rtol=1e-6)


def test_optax_rmsprop_agrees_under_constant_lr():
  # Our spelled-out chain is optax.rmsprop(initial_scale=1, eps_in_sqrt=True) with another LR source.
  c = _config(lr_schedule="constant", warmup_epochs=0.0, batch_size=256, lr_per_256=0.05)
  rng = np.random.default_rng(1)
  w0 = rng.normal(size=(5,)).astype(np.float32)
  grads = [rng.normal(size=(5,)).astype(np.float32) for _ in range(5)]
  ref = optax.rmsprop(0.05, decay=0.9, eps=1e-3, initial_scale=1.0, eps_in_sqrt=True, momentum=0.9)
  np.testing.assert_allclose(
    _run_tx(optim.make_optimizer(c, 10.0, 100), w0, grads),
    _run_tx(ref, w0, grads, pass_step=False),
    rtol=1e-6,
  )


def test_sgd_is_nesterov_momentum():
  c = _config(
    optimizer="sgd", lr_schedule="constant", warmup_epochs=0.0, batch_size=256, lr_per_256=0.1
  )
  rng = np.random.default_rng(2)
  w0 = rng.normal(size=(4,)).astype(np.float32)
  grads = [rng.normal(size=(4,)).astype(np.float32) for _ in range(4)]
  ref = optax.sgd(0.1, momentum=0.9, nesterov=True)
  np.testing.assert_allclose(
    _run_tx(optim.make_optimizer(c, 10.0, 100), w0, grads),
    _run_tx(ref, w0, grads, pass_step=False),
    rtol=1e-6,
  )


def test_adamw_decays_kernels_only_and_not_twice():
  c = _config(optimizer="adamw", lr_schedule="constant", warmup_epochs=0.0, weight_decay=0.5)
  assert optim.loss_weight_decay(c) == 0.0
  assert optim.loss_weight_decay(_config(optimizer="rmsprop", weight_decay=0.5)) == 0.5
  tx = optim.make_optimizer(c, 10.0, 100)
  params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zeros, tx.init(params), params, step=jnp.int32(0))
  assert np.all(np.asarray(upd["Dense_0"]["kernel"]) < 0)  # decayed with zero gradient
  np.testing.assert_array_equal(np.asarray(upd["Dense_0"]["bias"]), 0.0)


def test_schedule_warmup_staircase_and_batch_scaling():
  c = _config()  # official: 0.016 per 256 at batch 4096, 5 warmup epochs, 0.97 every 2.4 epochs
  spe = 100.0
  s = optim.lr_schedule(c, spe)
  base = 0.016 * 4096 / 256
  assert optim.base_learning_rate(c) == pytest.approx(0.256)
  assert float(s(0)) == 0.0
  assert float(s(250)) == pytest.approx(base * 0.5, rel=1e-6)
  assert float(s(499)) == pytest.approx(base * 499 / 500, rel=1e-6)
  # Staircase counted from step 0: boundaries at multiples of 240, warmup covering the first two.
  assert float(s(500)) == pytest.approx(base * 0.97**2, rel=1e-6)
  assert float(s(719)) == pytest.approx(base * 0.97**2, rel=1e-6)
  assert float(s(720)) == pytest.approx(base * 0.97**3, rel=1e-6)
  assert float(s(240 * 100)) == pytest.approx(base * 0.97**100, rel=1e-5)
  # LR scales linearly with the global batch.
  s512 = optim.lr_schedule(_config(batch_size=512), spe)
  assert float(s512(10_000)) == pytest.approx(float(s(10_000)) / 8, rel=1e-6)


def test_warmup_steps_are_truncated_to_an_integer_as_in_the_official_schedule():
  # 1.5 epochs of 3 steps: int(4.5) = 4 warmup steps (official), not 4.5. Constant decay, batch
  # 256, lr 0.016: base = 0.016.
  c = _config(lr_schedule="constant", warmup_epochs=1.5, batch_size=256)
  s = optim.lr_schedule(c, 3.0)
  base = 0.016
  assert float(s(0)) == 0.0
  assert float(s(2)) == pytest.approx(base * 2 / 4, rel=1e-6)  # a float warmup gives 2 / 4.5
  assert float(s(3)) == pytest.approx(base * 3 / 4, rel=1e-6)
  assert float(s(4)) == pytest.approx(base, rel=1e-6)  # warmup is over at step 4 (4 < 4.5 was not)
  # The ImageNet numbers: 5 epochs of 1,256,144 / 4096 images -> int(1533.38) = 1533 steps.
  s = optim.lr_schedule(_config(), 1256144 / 4096)
  assert float(s(1000)) == pytest.approx(0.256 * 1000 / 1533, rel=1e-6)
  assert float(s(1533)) == pytest.approx(0.256 * 0.97 ** (1533 // (2.4 * 1256144 / 4096)), rel=1e-6)
  # Under one warmup step after truncation: no warmup at all (the official `step < 0` never holds).
  s = optim.lr_schedule(_config(lr_schedule="constant", warmup_epochs=0.1, batch_size=256), 5.0)
  assert float(s(0)) == pytest.approx(base, rel=1e-6)


def test_schedule_cosine_and_constant():
  c = _config(lr_schedule="cosine", min_lr=1e-4, warmup_epochs=1.0, batch_size=256)
  s = optim.lr_schedule(c, 10.0, total_steps=1000)
  assert float(s(5)) == pytest.approx(0.016 * 0.5, rel=1e-6)  # still warming up
  assert float(s(500)) == pytest.approx((0.016 + 1e-4) / 2, rel=1e-5)
  assert float(s(1000)) == pytest.approx(1e-4, rel=1e-5)
  assert float(s(5000)) == pytest.approx(1e-4, rel=1e-5)
  with pytest.raises(ValueError, match="total_steps"):
    optim.lr_schedule(c, 10.0)
  k = optim.lr_schedule(_config(lr_schedule="constant", warmup_epochs=0.0, batch_size=256), 10.0)
  assert float(k(0)) == float(k(10**6)) == pytest.approx(0.016)


def _params():
  return {
    "stem": {
      "conv": {"kernel": jnp.full((3, 3, 3, 4), 1.0)},
      "bn": {"scale": jnp.full((4,), 2.0), "bias": jnp.full((4,), 3.0)},
    },
    "block": {
      "depthwise": {"kernel": jnp.full((3, 3, 1, 4), 0.5)},
      "se_reduce": {"kernel": jnp.full((1, 1, 4, 2), 2.0), "bias": jnp.ones((2,))},
    },
    "head": {"kernel": jnp.full((4, 10), 0.1), "bias": jnp.full((10,), 5.0)},
  }


def test_decay_mask_kernels_only():
  mask = optim.weight_decay_mask(_params())
  assert mask["stem"]["conv"]["kernel"] and mask["block"]["depthwise"]["kernel"]
  assert mask["block"]["se_reduce"]["kernel"] and mask["head"]["kernel"]
  assert not mask["stem"]["bn"]["scale"] and not mask["stem"]["bn"]["bias"]
  assert not mask["block"]["se_reduce"]["bias"] and not mask["head"]["bias"]


def test_l2_penalty_is_half_wd_sum_of_squared_kernels():
  p = _params()
  sq = 108 * 1.0 + 36 * 0.25 + 8 * 4.0 + 40 * 0.01
  assert float(optim.l2_penalty(p, 1e-5)) == pytest.approx(0.5 * 1e-5 * sq, rel=1e-6)
  assert float(optim.l2_penalty(p, 0.0)) == 0.0
  with pytest.raises(ValueError, match="optimizer"):
    optim.make_optimizer(_config(optimizer="lamb"), 10.0, 100)


@pytest.mark.parametrize("name", ["rmsprop", "sgd", "adamw"])
def test_optimizers_on_flat_params_match_the_tree(name):
  # The train step runs the optimizer on optim.param_layout's flat buffers; per leaf, that is the
  # same update as on the tree (here with a changing LR, grad clipping and, for adamw, the mask).
  c = _config(
    optimizer=name,
    batch_size=256,
    lr_per_256=0.1,
    warmup_epochs=2.0,
    lr_decay_epochs=0.5,
    lr_decay_rate=0.5,
    grad_clip_norm=5.0,
    weight_decay=0.1,
  )
  tx = optim.make_optimizer(c, 2.0, total_steps=100)
  tree = _params()
  layout = optim.param_layout(tree)
  flat_params = layout.ravel(tree)
  assert len(flat_params.buffers) == 2  # decayed kernels, everything else
  tree_state, flat_state = tx.init(tree), tx.init(flat_params)
  rng = np.random.default_rng(3)
  for t in range(6):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 3, jnp.float32), tree)
    upd, tree_state = tx.update(grads, tree_state, tree, step=jnp.int32(t))
    tree = optax.apply_updates(tree, upd)
    upd, flat_state = tx.update(layout.ravel(grads), flat_state, flat_params, step=jnp.int32(t))
    flat_params = optax.apply_updates(flat_params, upd)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), flat_params.to_tree(), tree
  )
  assert not np.allclose(tree["head"]["kernel"], _params()["head"]["kernel"])


def test_decay_mask_and_l2_of_flat_params():
  p = _params()
  f = optim.param_layout(p).ravel(p)
  assert [g for _, g in f.layout.groups] == ["", optim.DECAYED]
  assert jax.tree.leaves(optim.weight_decay_mask(f)) == [False, True]
  assert float(optim.l2_penalty(f, 1e-5)) == pytest.approx(
    float(optim.l2_penalty(p, 1e-5)), rel=1e-6
  )

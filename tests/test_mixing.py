"""Mixup / CutMix on device: label sums, CutMix weight = pasted fraction, half/half, static shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effnetv2_jax import mixing

B, H, W, K = 8, 12, 10, 5


_jitted = {}


def _mix(seed, images, labels, mixup_alpha, cutmix_alpha):
  """Jitted once per alpha pair (as in the train step); eager dispatch of Beta sampling is slow."""
  key = (mixup_alpha, cutmix_alpha)
  if key not in _jitted:
    _jitted[key] = jax.jit(
      lambda r, x, y: mixing.mix(r, x, y, mixup_alpha=key[0], cutmix_alpha=key[1])
    )
  return _jitted[key](jax.random.PRNGKey(seed), images, labels)


def _batch():
  # Example i is the constant image i, so the pasted partner pixels are recognisable.
  images = jnp.broadcast_to(jnp.arange(B, dtype=jnp.float32)[:, None, None, None], (B, H, W, 3))
  labels = jax.nn.one_hot(jnp.arange(B) % K, K)
  return images, labels


def test_alpha_zero_is_identity():
  images, labels = _batch()
  out_i, out_l = _mix(0, images, labels, 0.0, 0.0)
  np.testing.assert_array_equal(out_i, images)
  np.testing.assert_array_equal(out_l, labels)


# Same alpha pairs as the tests below, so each compiles once.
@pytest.mark.parametrize("mixup_alpha,cutmix_alpha", [(0.4, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_soft_labels_sum_to_one(mixup_alpha, cutmix_alpha):
  images, labels = _batch()
  for seed in range(5):
    out_i, out_l = _mix(seed, images, labels, mixup_alpha, cutmix_alpha)
    assert out_i.shape == images.shape and out_l.shape == labels.shape
    np.testing.assert_allclose(out_l.sum(-1), 1.0, atol=1e-6)


def test_mixup_uses_the_reversed_partner_with_lambda_at_least_half():
  images, labels = _batch()
  out_i, out_l = _mix(1, images, labels, 0.4, 0.0)
  i = np.arange(B)
  partner = i[::-1]
  # pixel value = lam * i + (1 - lam) * partner; recover lam and compare with the label weight.
  lam = np.where(
    i != partner, (out_i[:, 0, 0, 0] - partner) / np.where(i != partner, i - partner, 1), 1
  )
  assert (lam >= 0.5 - 1e-6).all() and (lam <= 1.0 + 1e-6).all()
  np.testing.assert_allclose(
    np.asarray(out_l)[i, i % K] - (partner % K == i % K) * (1 - lam), lam, atol=1e-5
  )


def test_cutmix_weight_equals_pasted_pixel_fraction():
  images, labels = _batch()
  for seed in range(10):
    out_i, out_l = _mix(seed, images, labels, 0.0, 1.0)
    out_i, out_l = np.asarray(out_i), np.asarray(out_l)
    for i in range(B):
      j = B - 1 - i
      pasted = (out_i[i, ..., 0] == j).mean() if i != j else 0.0
      assert set(np.unique(out_i[i])) <= {float(i), float(j)}  # only own or partner pixels
      if i % K != j % K:
        np.testing.assert_allclose(out_l[i, j % K], pasted, atol=1e-6)
        np.testing.assert_allclose(out_l[i, i % K], 1 - pasted, atol=1e-6)


def test_both_on_first_half_mixup_second_half_cutmix_within_halves():
  images, labels = _batch()
  out_i, _ = _mix(3, images, labels, 1.0, 1.0)
  out_i = np.asarray(out_i)
  half = B // 2
  for i in range(half):  # mixup: a constant image between own and partner value (partner in half)
    assert np.ptp(out_i[i]) < 1e-5
    lo, hi = sorted((i, half - 1 - i))
    assert lo - 1e-5 <= out_i[i, 0, 0, 0] <= hi + 1e-5
  for i in range(half, B):  # cutmix: only own pixels or the reversed second half's pixels
    assert set(np.unique(out_i[i])) <= {float(i), float(B - 1 - (i - half))}


def test_bfloat16_images_keep_their_dtype_labels_stay_float32():
  images, labels = _batch()
  out_i, out_l = _mix(0, images.astype(jnp.bfloat16), labels, 0.4, 0.0)
  assert out_i.dtype == jnp.bfloat16 and out_l.dtype == jnp.float32
  with pytest.raises(ValueError):
    mixing.mix(jax.random.PRNGKey(0), images, labels, mixup_alpha=-1.0, cutmix_alpha=0.0)

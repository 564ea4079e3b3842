"""Mixup / CutMix on device: label sums, CutMix weights (official batch mean, per example), half/half,
static shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effnetv2_jax import mixing

B, H, W, K = 8, 12, 10, 5


_jitted = {}


def _mix(seed, images, labels, mixup_alpha, cutmix_alpha, cutmix_label="batch_mean"):
  """Jitted once per alpha pair (as in the train step); eager dispatch of Beta sampling is slow."""
  key = (mixup_alpha, cutmix_alpha, cutmix_label)
  if key not in _jitted:
    _jitted[key] = jax.jit(
      lambda r, x, y: mixing.mix(
        r, x, y, mixup_alpha=key[0], cutmix_alpha=key[1], cutmix_label=key[2]
      )
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


def _pasted_fractions(out_i, first, last):
  """Per example i in [first, last): the fraction of its pixels taken from its partner."""
  n = last - first
  return np.array(
    [(out_i[i, ..., 0] == first + n - 1 - (i - first)).mean() for i in range(first, last)]
  )


def test_cutmix_weight_is_the_batch_mean_pasted_fraction_by_default():
  # Official datasets.py: ONE weight, reduce_sum(mask) / size(mask), for every example (this
  # replaces the former per-example pin, which is now cutmix_label='per_example', below).
  images, labels = _batch()
  for seed in range(10):
    out_i, out_l = _mix(seed, images, labels, 0.0, 1.0)
    out_i, out_l = np.asarray(out_i), np.asarray(out_l)
    mean = _pasted_fractions(out_i, 0, B).mean()
    for i in range(B):
      j = B - 1 - i
      assert set(np.unique(out_i[i])) <= {float(i), float(j)}  # pixels stay per example
      if i % K != j % K:
        np.testing.assert_allclose(out_l[i, j % K], mean, atol=1e-6)
        np.testing.assert_allclose(out_l[i, i % K], 1 - mean, atol=1e-6)


def test_cutmix_weight_per_example_equals_own_pasted_pixel_fraction():
  images, labels = _batch()
  for seed in range(10):
    out_i, out_l = _mix(seed, images, labels, 0.0, 1.0, "per_example")
    out_i, out_l = np.asarray(out_i), np.asarray(out_l)
    pasted = _pasted_fractions(out_i, 0, B)
    for i in range(B):
      j = B - 1 - i
      assert set(np.unique(out_i[i])) <= {float(i), float(j)}  # only own or partner pixels
      if i % K != j % K:
        np.testing.assert_allclose(out_l[i, j % K], pasted[i], atol=1e-6)
        np.testing.assert_allclose(out_l[i, i % K], 1 - pasted[i], atol=1e-6)


# Four boxes on 16 x 16 images, as (y0, y1, x0, x1) arrays over the examples: 0 x 0, 4 x 4, 8 x 8
# and 12 x 12 pixels, area fractions 0, 0.0625, 0.25, 0.5625.
BOXES = tuple(
  jnp.array(v, jnp.int32) for v in ([3, 0, 4, 2], [3, 4, 12, 14], [5, 4, 4, 2], [5, 8, 12, 14])
)
OFFICIAL_WEIGHT = (0 + 0.0625 + 0.25 + 0.5625) / 4  # = 0.21875, the official batch-mean weight


def test_fixed_boxes_give_the_official_weight_to_every_example():
  np.testing.assert_allclose(
    mixing.cutmix_label_weights(*BOXES, 16, 16, "batch_mean"), [0.21875] * 4, rtol=0, atol=0
  )
  assert OFFICIAL_WEIGHT == 0.21875
  np.testing.assert_allclose(
    mixing.cutmix_label_weights(*BOXES, 16, 16, "per_example"), [0, 0.0625, 0.25, 0.5625]
  )
  images = jnp.broadcast_to(jnp.arange(4.0)[:, None, None, None], (4, 16, 16, 3))
  labels = jax.nn.one_hot(jnp.arange(4), 4)
  out_i, out_l = mixing.paste_boxes(images, labels, BOXES, "batch_mean")
  # Pixels per example: example i holds (i's box area) pixels of its partner 3 - i.
  np.testing.assert_allclose(
    [(np.asarray(out_i)[i, ..., 0] == 3 - i).mean() for i in range(4)], [0, 0.0625, 0.25, 0.5625]
  )
  expected = np.eye(4) * (1 - 0.21875) + np.eye(4)[::-1] * 0.21875
  np.testing.assert_allclose(out_l, expected, atol=1e-7)
  _, out_l = mixing.paste_boxes(images, labels, BOXES, "per_example")
  frac = np.array([0, 0.0625, 0.25, 0.5625])[:, None]
  np.testing.assert_allclose(out_l, np.eye(4) * (1 - frac) + np.eye(4)[::-1] * frac, atol=1e-7)
  with pytest.raises(ValueError, match="cutmix_label"):
    mixing.cutmix_label_weights(*BOXES, 16, 16, "per_batch")


def test_with_mixup_on_the_batch_mean_is_over_the_cutmix_half_only(monkeypatch):
  # Fixed boxes for the second half (the CutMix half): its mean 0.21875, whatever the first half.
  monkeypatch.setattr(mixing, "cutmix_boxes", lambda rng, batch, h, w, alpha: BOXES)
  images = jnp.broadcast_to(jnp.arange(8.0)[:, None, None, None], (8, 16, 16, 3))
  labels = jax.nn.one_hot(jnp.arange(8), 8)
  out_i, out_l = mixing.mix(
    jax.random.PRNGKey(0), images, labels, mixup_alpha=1.0, cutmix_alpha=1.0
  )
  out_i, out_l = np.asarray(out_i), np.asarray(out_l)
  for i in range(4, 8):  # partner within the half: 4 <-> 7, 5 <-> 6
    j = 11 - i
    np.testing.assert_allclose(out_l[i, j], 0.21875, atol=1e-6)
    np.testing.assert_allclose(out_l[i, i], 1 - 0.21875, atol=1e-6)
  np.testing.assert_allclose(_pasted_fractions(out_i, 4, 8), [0, 0.0625, 0.25, 0.5625])
  # The mixup half's weights are its own lambdas (>= 0.5), not the CutMix mean.
  assert (out_l[np.arange(4), np.arange(4)] >= 0.5 - 1e-6).all()
  _, per = mixing.mix(
    jax.random.PRNGKey(0),
    images,
    labels,
    mixup_alpha=1.0,
    cutmix_alpha=1.0,
    cutmix_label="per_example",
  )
  np.testing.assert_allclose(np.asarray(per)[[4, 5, 6, 7], [7, 6, 5, 4]], [0, 0.0625, 0.25, 0.5625])


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

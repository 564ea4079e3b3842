"""Mixup and CutMix on device, inside the jitted train step (official EfficientNetV2 semantics).

Why on device rather than in tf.data:
  * deterministic from the step rng (`fold_in(rng, step)`), so a resumed run mixes identically and the
    input pipeline stays a per-example map (mixing needs a partner example, i.e. a whole batch);
  * no host CPU cost: a few elementwise ops on the accelerator versus a batch-wide op competing with
    decoding/RandAugment on the host, which is usually the bottleneck;
  * the per-stage alphas are Python floats, compiled into the stage's train step (which compiles once
    per stage anyway), and alpha 0 compiles to nothing.
No TensorFlow here (models and steps never import TF).

Semantics (reference section 4):
  * mixup: per example lam ~ Beta(a, a), lam = max(lam, 1 - lam), mixed with the reversed batch;
    labels lam * y + (1 - lam) * y_reversed;
  * CutMix: per example a box whose area fraction ~ Beta(a, a) at a uniform centre, clipped at the
    border, pasted from the reversed batch; label weight of the partner = the ACTUAL pasted fraction;
  * both alphas > 0: the first half of the batch gets mixup and the second half CutMix, each half
    mixed with its own reversal.
"Reversed batch" means the GLOBAL batch: the step is jitted over the global array (sharded on the
'data' axis), so `x[::-1]` pairs examples across devices; XLA inserts the needed collective. This matches
the official code on one host; a per-device reversal would be a different (cheaper) partner choice.
Label smoothing is applied afterwards by the loss, on the mixed soft labels.
Images may already be normalised: normalisation is affine and the weights sum to 1, so mixing
normalised images equals normalising mixed pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _reverse(x):
  return x[::-1]


def mixup(rng, images, labels, alpha: float):
  """Per-example mixup with the reversed batch; returns (images, soft labels)."""
  batch = images.shape[0]
  lam = jax.random.beta(rng, alpha, alpha, (batch,))
  lam = jnp.maximum(lam, 1.0 - lam)
  w_img = lam.reshape((batch,) + (1,) * (images.ndim - 1)).astype(images.dtype)
  mixed = w_img * images + (1.0 - w_img) * _reverse(images)
  w_lab = lam[:, None].astype(labels.dtype)
  return mixed, w_lab * labels + (1.0 - w_lab) * _reverse(labels)


def cutmix_boxes(rng, batch: int, height: int, width: int, alpha: float):
  """Integer boxes [y0, y1) x [x0, x1) per example; area fraction before clipping ~ Beta(a, a)."""
  r_area, r_y, r_x = jax.random.split(rng, 3)
  area = jax.random.beta(r_area, alpha, alpha, (batch,))
  side = jnp.sqrt(area)  # same aspect as the image
  cut_h = jnp.round(side * height).astype(jnp.int32)
  cut_w = jnp.round(side * width).astype(jnp.int32)
  cy = jax.random.randint(r_y, (batch,), 0, height)
  cx = jax.random.randint(r_x, (batch,), 0, width)
  y0 = jnp.clip(cy - cut_h // 2, 0, height)
  y1 = jnp.clip(cy + (cut_h - cut_h // 2), 0, height)
  x0 = jnp.clip(cx - cut_w // 2, 0, width)
  x1 = jnp.clip(cx + (cut_w - cut_w // 2), 0, width)
  return y0, y1, x0, x1


def cutmix(rng, images, labels, alpha: float):
  """Per-example CutMix from the reversed batch; label weight = actual (clipped) box fraction."""
  batch, height, width = images.shape[:3]
  y0, y1, x0, x1 = cutmix_boxes(rng, batch, height, width, alpha)
  # Static shapes: the box is a comparison against iotas, never a dynamic slice.
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  inside = (
    (rows >= y0[:, None, None])
    & (rows < y1[:, None, None])
    & (cols >= x0[:, None, None])
    & (cols < x1[:, None, None])
  )
  mixed = jnp.where(inside[..., None], _reverse(images), images)
  frac = ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)
  w = frac[:, None].astype(labels.dtype)
  return mixed, (1.0 - w) * labels + w * _reverse(labels)


def mix(rng, images, labels_onehot, *, mixup_alpha: float, cutmix_alpha: float):
  """Apply the stage's mixing. Alphas are static Python floats; 0 disables that method.

  images: [B, H, W, C] float; labels_onehot: [B, K] float (one-hot or already soft).
  Returns (images, soft_labels) with the same shapes and dtypes.
  """
  mixup_alpha, cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError(f"mixup/cutmix alphas must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
  labels_onehot = labels_onehot.astype(jnp.promote_types(labels_onehot.dtype, jnp.float32))
  if mixup_alpha > 0 and cutmix_alpha > 0:
    half = images.shape[0] // 2
    r_mix, r_cut = jax.random.split(rng)
    img_a, lab_a = mixup(r_mix, images[:half], labels_onehot[:half], mixup_alpha)
    img_b, lab_b = cutmix(r_cut, images[half:], labels_onehot[half:], cutmix_alpha)
    return jnp.concatenate([img_a, img_b]), jnp.concatenate([lab_a, lab_b])
  if mixup_alpha > 0:
    return mixup(rng, images, labels_onehot, mixup_alpha)
  if cutmix_alpha > 0:
    return cutmix(rng, images, labels_onehot, cutmix_alpha)
  return images, labels_onehot

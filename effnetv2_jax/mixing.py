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
    border, pasted from the reversed batch. The partner's label weight (`cutmix_label`):
      'batch_mean' (official, `datasets.py` cutmix; reference section 10 item 2): ONE scalar for
        the whole (half-)batch that CutMix mixes, the mean ACTUAL (clipped) pasted fraction over
        it, given to every example although each has its own box (areas 0, 1/16, 1/4, 9/16 give
        0.21875 to all four). The official mean is over the per-host batch its tf.data pipeline
        mixes; here it is over the global (half-)batch the step mixes (same expectation);
      'per_example' (timm's per-element mode, labels matching pixels): each example's own
        actual pasted fraction;
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


CUTMIX_LABELS = ("batch_mean", "per_example")


def cutmix_label_weights(y0, y1, x0, x1, height: int, width: int, label_mode: str = "batch_mean"):
  """[B] float32 partner-label weights for boxes [y0, y1) x [x0, x1) (see the module docstring)."""
  if label_mode not in CUTMIX_LABELS:
    raise ValueError(f"cutmix_label must be one of {CUTMIX_LABELS}, got {label_mode!r}")
  frac = ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)
  if label_mode == "batch_mean":
    # = sum of every mask pixel / (B * H * W), the official `reduce_sum(mask) / size(mask)`.
    frac = jnp.broadcast_to(jnp.mean(frac), frac.shape)
  return frac


def paste_boxes(images, labels, boxes, label_mode: str = "batch_mean"):
  """Paste box i of the reversed batch into example i; labels mixed by `cutmix_label_weights`.

  `boxes` = (y0, y1, x0, x1), integer [B] arrays (as `cutmix_boxes` draws them).
  """
  height, width = images.shape[1:3]
  y0, y1, x0, x1 = boxes
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
  w = cutmix_label_weights(y0, y1, x0, x1, height, width, label_mode)[:, None].astype(labels.dtype)
  return mixed, (1.0 - w) * labels + w * _reverse(labels)


def cutmix(rng, images, labels, alpha: float, label_mode: str = "batch_mean"):
  """Per-example CutMix boxes from the reversed batch; label weights per `label_mode`."""
  batch, height, width = images.shape[:3]
  boxes = cutmix_boxes(rng, batch, height, width, alpha)
  return paste_boxes(images, labels, boxes, label_mode)


def mix(
  rng,
  images,
  labels_onehot,
  *,
  mixup_alpha: float,
  cutmix_alpha: float,
  cutmix_label: str = "batch_mean",
):
  """Apply the stage's mixing. Alphas are static Python floats; 0 disables that method.

  images: [B, H, W, C] float; labels_onehot: [B, K] float (one-hot or already soft).
  `cutmix_label`: 'batch_mean' (official) or 'per_example' (`config.cutmix_label`); with both
  alphas on, the batch mean is over the CutMix (second) half only.
  Returns (images, soft_labels) with the same shapes and dtypes.
  """
  mixup_alpha, cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError(f"mixup/cutmix alphas must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
  if cutmix_label not in CUTMIX_LABELS:
    raise ValueError(f"cutmix_label must be one of {CUTMIX_LABELS}, got {cutmix_label!r}")
  labels_onehot = labels_onehot.astype(jnp.promote_types(labels_onehot.dtype, jnp.float32))
  if mixup_alpha > 0 and cutmix_alpha > 0:
    half = images.shape[0] // 2
    r_mix, r_cut = jax.random.split(rng)
    img_a, lab_a = mixup(r_mix, images[:half], labels_onehot[:half], mixup_alpha)
    img_b, lab_b = cutmix(r_cut, images[half:], labels_onehot[half:], cutmix_alpha, cutmix_label)
    return jnp.concatenate([img_a, img_b]), jnp.concatenate([lab_a, lab_b])
  if mixup_alpha > 0:
    return mixup(rng, images, labels_onehot, mixup_alpha)
  if cutmix_alpha > 0:
    return cutmix(rng, images, labels_onehot, cutmix_alpha, cutmix_label)
  return images, labels_onehot

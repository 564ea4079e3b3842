"""Per-family image preprocessing (reference section 5), written for tf.data map functions.

Families:
  'v2'      EfficientNetV2 S/M/L/XL (official `preprocessing.py`): train = random crop with area
            (0.05, 1), aspect (3/4, 4/3), no object-coverage constraint; bilinear resize; flip;
            RandAugment on uint8; (x - 128) / 128. Eval = centre crop of size/(size+32) of the short side
            below 320 px, whole image squashed to size x size from 320 px on.
  'v2-base' EfficientNetV2 B0-B3, EfficientNet V1, ResNet (official `preprocess_legacy.py`): train =
            Inception crop with area (0.08, 1), min_object_covered 0.1, falling back to the eval centre
            crop when no box is found; bicubic resize; flip; AutoAugment v0 or RandAugment; ImageNet
            mean/std. Eval = centre crop size/(size+32), bicubic.
  'small'   low-resolution datasets (Fashion-MNIST, CIFAR) and the official fine-tuning recipe: no crop,
            the whole image resized (bilinear), flip, RandAugment with its pixel constants scaled to
            the image size (randaug.scaled_hparams); (x/255 - 0.5)/0.5. Eval = whole image resized.
Randomness comes from a per-example stateless `seed` (shape [2]) so a batch is a pure function of
(global seed, example position): that is what makes resumed runs see identical batches.
Works for tiny inputs (28x28 Fashion-MNIST at 16-32 px): crops are clamped to at least 1 pixel.
"""

from __future__ import annotations

import tensorflow as tf

from effnetv2_jax.data import randaug
from effnetv2_jax.data.augment import Augment

FAMILIES = ("v2", "v2-base", "small")
EVAL_CROP_PADDING = 32  # eval crop side = size / (size + 32) * short side
V2_SQUASH_EVAL_FROM = 320  # 'v2' eval resizes the whole image at and above this size
V2_CROP_AREA = (0.05, 1.0)
BASE_CROP_AREA = (0.08, 1.0)
BASE_MIN_OBJECT_COVERED = 0.1
CROP_ASPECT = (3.0 / 4.0, 4.0 / 3.0)
CROP_MAX_ATTEMPTS = 10
V2_MEAN, V2_STD = 128.0, 128.0
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
NO_AUGMENT = Augment()


def check_family(family: str) -> None:
  if family not in FAMILIES:
    raise ValueError(f"Unknown preprocessing family {family!r}; expected one of {FAMILIES}")


def decode(image_bytes):
  """Any of JPEG (incl. CMYK/grey), PNG, GIF (first frame), BMP -> uint8 [H, W, 3]."""
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
  image.set_shape([None, None, 3])
  return image


def _resize_method(family):
  return "bicubic" if family == "v2-base" else "bilinear"


def normalize(image, family):
  """float [0, 255] -> the family's model input scale."""
  image = tf.cast(image, tf.float32)
  if family == "v2":
    return (image - V2_MEAN) / V2_STD
  if family == "small":
    return (image / 255.0 - 0.5) / 0.5
  return (image - tf.constant(IMAGENET_MEAN_RGB)) / tf.constant(IMAGENET_STD_RGB)


def center_crop(image, image_size):
  """Centre square of side image_size / (image_size + 32) * short side (official eval crop)."""
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  frac = image_size / (image_size + EVAL_CROP_PADDING)
  side = tf.cast(frac * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
  side = tf.maximum(side, 1)
  top, left = (h - side + 1) // 2, (w - side + 1) // 2
  return tf.slice(image, tf.stack([top, left, 0]), tf.stack([side, side, -1]))


def random_crop(image, family, image_size, seed):
  """The family's random-area crop (see module docstring)."""
  shape = tf.shape(image)
  whole = tf.constant([[[0.0, 0.0, 1.0, 1.0]]])
  v2 = family == "v2"
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    bounding_boxes=whole,
    seed=seed,
    min_object_covered=0.0 if v2 else BASE_MIN_OBJECT_COVERED,
    aspect_ratio_range=CROP_ASPECT,
    area_range=V2_CROP_AREA if v2 else BASE_CROP_AREA,
    max_attempts=CROP_MAX_ATTEMPTS,
    use_image_if_no_bounding_boxes=True,
  )
  crop = tf.slice(image, begin, size)
  if v2:
    return crop
  # Legacy rule: when sampling failed (the "crop" is the whole image) use the eval centre crop.
  failed = tf.reduce_all(tf.equal(size[:2], shape[:2]))
  return tf.cond(failed, lambda: center_crop(image, image_size), lambda: crop)


def _augment(image_float, augment, seed, hparams=None):
  """Apply AutoAugment / RandAugment on uint8 as the official code does (clip, truncate, augment)."""
  if not augment.active:
    return image_float
  image = tf.cast(tf.clip_by_value(image_float, 0.0, 255.0), tf.uint8)
  switches = dict(solarize=augment.solarize, enhance=augment.enhance)
  if augment.autoaugment:
    image = randaug.autoaugment(image, seed=seed, **switches)
  else:
    image = randaug.randaugment(
      image,
      augment.layers,
      augment.magnitude,
      seed=seed,
      hparams=hparams,
      ops=augment.ops,
      **switches,
    )
  return tf.cast(image, tf.float32)


def train_image(image, *, image_size, family, seed, augment=NO_AUGMENT):
  """uint8 [H, W, 3] -> float32 [image_size, image_size, 3], normalised, randomly augmented with
  `augment` (an `augment.Augment`; default none: crop and flip only)."""
  check_family(family)
  crop_seed, flip_seed, aug_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  if family != "small":
    image = random_crop(image, family, image_size, crop_seed)
  image = tf.image.resize(image, [image_size, image_size], method=_resize_method(family))
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  hparams = randaug.scaled_hparams(image_size) if family == "small" else None
  image = _augment(image, augment, aug_seed, hparams)
  image = normalize(image, family)
  image.set_shape([image_size, image_size, 3])
  return image


def eval_image(image, *, image_size, family):
  """uint8 [H, W, 3] -> float32 [image_size, image_size, 3], normalised, deterministic."""
  check_family(family)
  if family != "small" and not (family == "v2" and image_size >= V2_SQUASH_EVAL_FROM):
    image = center_crop(image, image_size)
  image = tf.image.resize(image, [image_size, image_size], method=_resize_method(family))
  image = normalize(image, family)
  image.set_shape([image_size, image_size, 3])
  return image

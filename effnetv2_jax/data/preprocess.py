"""Per-family image preprocessing (reference section 5), written for tf.data map functions.

Families:
  'v2'      EfficientNetV2 S/M/L/XL (official `preprocessing.py`): train = random crop with area
            (0.05, 1), aspect (3/4, 4/3), no object-coverage constraint; bilinear resize; flip;
            RandAugment on uint8; (x - 128) / 128. Eval = centre crop of size/(size+32) of the short side
            at offset (h - side) // 2 below 320 px, whole image squashed to size x size from 320 px on.
  'v2-base' EfficientNetV2 B0-B3, EfficientNet V1, ResNet (official `preprocess_legacy.py`): train =
            Inception crop with area (0.08, 1), min_object_covered 0.1, falling back to the eval centre
            crop when no box is found; JPEGs decoded and cropped in one `decode_and_crop_jpeg`; TF1
            bicubic resize without half-pixel centres (`resize`); flip; AutoAugment v0 or RandAugment;
            ImageNet mean/std. Eval = centre crop size/(size+32) at offset (h - side + 1) // 2, bicubic.
  'small'   low-resolution datasets (Fashion-MNIST, CIFAR) and the official fine-tuning recipe: no crop,
            the whole image resized (bilinear), flip, RandAugment with its pixel constants scaled to
            the image size (randaug.scaled_hparams); (x/255 - 0.5)/0.5. Eval = whole image resized.
Inputs are uint8 [H, W, 3] images or their encoded bytes (decoded here, see `train_image`).
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
# 'v2-base' bicubic: 'official' = TF1 resize_bicubic without half-pixel centres, 'half_pixel' = TF2.
BASE_RESIZE_MODES = ("official", "half_pixel")
NO_AUGMENT = Augment()


def check_family(family: str) -> None:
  if family not in FAMILIES:
    raise ValueError(f"Unknown preprocessing family {family!r}; expected one of {FAMILIES}")


def decode(image_bytes):
  """Any of JPEG (incl. CMYK/grey), PNG, GIF (first frame), BMP -> uint8 [H, W, 3]."""
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
  image.set_shape([None, None, 3])
  return image


def normalize(image, family):
  """float [0, 255] -> the family's model input scale."""
  image = tf.cast(image, tf.float32)
  if family == "v2":
    return (image - V2_MEAN) / V2_STD
  if family == "small":
    return (image / 255.0 - 0.5) / 0.5
  return (image - tf.constant(IMAGENET_MEAN_RGB)) / tf.constant(IMAGENET_STD_RGB)


def _slice(image, window):
  """image[top : top + height, left : left + width] for window [top, left, height, width]."""
  top, left, height, width = tf.unstack(window)
  return tf.slice(image, tf.stack([top, left, 0]), tf.stack([height, width, -1]))


def center_crop_window(shape, image_size, family="v2-base"):
  """[top, left, side, side] of the official eval crop: side = image_size / (image_size + 32) * short
  side. Offset (h - side) // 2 for 'v2' (official `preprocessing.py`), (h - side + 1) // 2 for the
  others (official `preprocess_legacy.py`); they differ by one pixel when h - side is odd."""
  h, w = shape[0], shape[1]
  frac = image_size / (image_size + EVAL_CROP_PADDING)
  side = tf.cast(frac * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
  side = tf.maximum(side, 1)
  round_up = 0 if family == "v2" else 1
  return tf.stack([(h - side + round_up) // 2, (w - side + round_up) // 2, side, side])


def center_crop(image, image_size, family="v2-base"):
  """Centre square of side image_size / (image_size + 32) * short side (official eval crop)."""
  return _slice(image, center_crop_window(tf.shape(image), image_size, family))


def random_crop_window(shape, family, image_size, seed):
  """[top, left, height, width] of the family's random-area crop (see module docstring) of an image
  of `shape` ([h, w, channels]; only h and w matter)."""
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
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  if v2:
    return window
  # Legacy rule: when sampling failed (the "crop" is the whole image) use the eval centre crop.
  failed = tf.reduce_all(tf.equal(size[:2], shape[:2]))
  return tf.where(failed, center_crop_window(shape, image_size, family), window)


def random_crop(image, family, image_size, seed):
  """The family's random-area crop (see module docstring)."""
  return _slice(image, random_crop_window(tf.shape(image), family, image_size, seed))


def decode_and_crop(image_bytes, window_fn):
  """Decodes `image_bytes` cropped to window_fn(shape) ([top, left, height, width] of an image of
  `shape`). A JPEG is decoded and cropped in one `decode_and_crop_jpeg` (the official base-family
  path: only the window's rows are decoded); other formats are decoded whole, then sliced. The pixels
  are those of `decode` followed by the slice, except that for a JPEG with subsampled chroma (4:2:0,
  most photos) libjpeg upsamples the chroma of the window's first and last column from inside the
  window (a few levels' difference there), as in the official code."""

  def jpeg():
    window = window_fn(tf.image.extract_jpeg_shape(image_bytes))
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def other():
    image = decode(image_bytes)
    return _slice(image, window_fn(tf.shape(image)))

  image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def _cropped(image, window_fn, family):
  """Crop `image` (uint8 [H, W, 3], or encoded bytes) to window_fn(shape): decode_and_crop_jpeg for
  'v2-base' bytes, as the official legacy preprocessing; decode (if bytes) and slice otherwise."""
  image = tf.convert_to_tensor(image)
  if image.dtype == tf.string:
    if family == "v2-base":
      return decode_and_crop(image, window_fn)
    image = decode(image)
  return _slice(image, window_fn(tf.shape(image)))


def _whole(image):
  image = tf.convert_to_tensor(image)
  return decode(image) if image.dtype == tf.string else image


def resize(image, image_size, family, base_resize="official"):
  """The family's resize to image_size x image_size, float32 out.

  'v2', 'small': bilinear (TF2 `tf.image.resize`, as the official code). 'v2-base': bicubic;
  base_resize 'official' is the official legacy code's `tf.compat.v1.image.resize_bicubic` (TF1
  kernel, align_corners=False, no half-pixel centres: the output grid is shifted by half an input
  pixel towards the top left); 'half_pixel' is TF2's `tf.image.resize(method='bicubic')`
  (half-pixel centres, Keys a = -0.5), correctly centred.
  """
  if family != "v2-base":
    return tf.image.resize(image, [image_size, image_size], method="bilinear")
  if base_resize not in BASE_RESIZE_MODES:
    raise ValueError(f"base_resize {base_resize!r} is not one of {', '.join(BASE_RESIZE_MODES)}")
  if base_resize == "half_pixel":
    return tf.image.resize(image, [image_size, image_size], method="bicubic")
  out = tf.raw_ops.ResizeBicubic(
    images=image[None],
    size=tf.constant([image_size, image_size], tf.int32),
    align_corners=False,
    half_pixel_centers=False,
  )
  return out[0]


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


def train_image(image, *, image_size, family, seed, augment=NO_AUGMENT, base_resize="official"):
  """uint8 [H, W, 3] or encoded image bytes -> float32 [image_size, image_size, 3], normalised,
  randomly augmented with `augment` (an `augment.Augment`; default none: crop and flip only).

  Bytes are decoded here: 'v2-base' decodes a JPEG and crops it in one op (official legacy code;
  the same crop window as for `decode(bytes)` passed in, see `decode_and_crop` for the pixels), the
  other families decode the whole image first (official `preprocessing.py`)."""
  check_family(family)
  crop_seed, flip_seed, aug_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  if family == "small":
    image = _whole(image)
  else:
    window_fn = lambda shape: random_crop_window(shape, family, image_size, crop_seed)  # noqa: E731
    image = _cropped(image, window_fn, family)
  image = resize(image, image_size, family, base_resize)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  hparams = randaug.scaled_hparams(image_size) if family == "small" else None
  image = _augment(image, augment, aug_seed, hparams)
  image = normalize(image, family)
  image.set_shape([image_size, image_size, 3])
  return image


def eval_image(image, *, image_size, family, base_resize="official"):
  """uint8 [H, W, 3] or encoded image bytes -> float32 [image_size, image_size, 3], normalised,
  deterministic."""
  check_family(family)
  if family == "small" or (family == "v2" and image_size >= V2_SQUASH_EVAL_FROM):
    image = _whole(image)
  else:
    window_fn = lambda shape: center_crop_window(shape, image_size, family)  # noqa: E731
    image = _cropped(image, window_fn, family)
  image = resize(image, image_size, family, base_resize)
  image = normalize(image, family)
  image.set_shape([image_size, image_size, 3])
  return image

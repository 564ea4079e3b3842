"""RandAugment and AutoAugment (policy v0) in core TensorFlow ops.

Semantics follow the official EfficientNet/EfficientNetV2 `autoaugment.py` (reference section 4): uint8
HWC images, fill value 128, levels on a 0..10 scale that extrapolate linearly above 10, RandAugment
applies `num_layers` ops each chosen uniformly from the 16 in `OPS` and always applied. The official code
used tensorflow_addons for rotate/shear/translate; tensorflow_addons is dead, so geometric ops call
`tf.raw_ops.ImageProjectiveTransformV3` directly (nearest interpolation, constant fill, as tfa did).

Every function is traceable (works eagerly and inside `tf.data.Dataset.map`). Randomness is stateless
when a `seed` (shape [2] integer tensor) is given, so the input pipeline can make each example's
augmentation a pure function of (global seed, example position).

Official-vs-corrected switches (see `augment.py`; the default is the released code's behaviour):
`solarize` ('official': Solarize's level threshold wraps modulo 256 as the released uint8 comparison
does; 'unwrapped') and `enhance` ('official': Contrast blends towards pixel count / 256 and Sharpness
truncates its smoothed image; 'corrected': the grey mean and rounding, as PIL's ImageEnhance).
"""

from __future__ import annotations

import functools
import math

import tensorflow as tf

from effnetv2_jax.data.augment import ENHANCE_MODES, SOLARIZE_MODES

# The 16 op names and the op-set parser live in a TF-free module (config validation uses them).
from effnetv2_jax.data.randaug_ops import OPS, parse_ops  # noqa: F401  (re-exported)

MAX_LEVEL = 10.0
FILL_VALUE = 128
# Official RandAugment hparams; AutoAugment v0 uses wider ranges for cutout/translate.
RANDAUGMENT_HPARAMS = dict(cutout_const=40, translate_const=100)
AUTOAUGMENT_HPARAMS = dict(cutout_const=100, translate_const=250)


# --------------------------------------------------------------------------------------------- ops
def blend(image1, image2, factor):
  """image1 + factor * (image2 - image1); factor > 1 extrapolates (clipped), factor 1 returns image2."""
  a = tf.cast(image1, tf.float32)
  b = tf.cast(image2, tf.float32)
  return tf.cast(tf.clip_by_value(a + factor * (b - a), 0.0, 255.0), tf.uint8)


def _apply_lut(image, lut):
  """Per-channel lookup table: lut [3, 256] uint8."""
  x = tf.cast(image, tf.int32) + tf.range(3, dtype=tf.int32) * 256  # offset each channel's table
  return tf.gather(tf.reshape(lut, [-1]), x)


def autocontrast(image):
  """Stretch each channel to [0, 255] (PIL ImageOps.autocontrast, cutoff 0); flat channels unchanged."""
  flat = tf.cast(tf.reshape(image, [-1, 3]), tf.float64)
  lo, hi = tf.reduce_min(flat, axis=0), tf.reduce_max(flat, axis=0)
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  ramp = tf.range(256, dtype=tf.float64)[None, :]
  # Same arithmetic as PIL's table (float64, truncation), so results match it exactly.
  stretched = tf.clip_by_value(ramp * scale[:, None] - (lo * scale)[:, None], 0.0, 255.0)
  lut = tf.where((hi > lo)[:, None], stretched, tf.broadcast_to(ramp, [3, 256]))
  return _apply_lut(image, tf.cast(lut, tf.uint8))


def equalize(image):
  """Histogram equalisation per channel with PIL's ImageOps.equalize table."""
  x = tf.cast(tf.reshape(image, [-1, 3]), tf.int32)
  luts = []
  for c in range(3):
    hist = tf.math.bincount(x[:, c], minlength=256, maxlength=256, dtype=tf.int32)
    last_nonzero = tf.reduce_max(tf.where(hist > 0)[:, 0])
    step = (tf.reduce_sum(hist) - tf.gather(hist, last_nonzero)) // 255
    lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
    identity = tf.range(256, dtype=tf.int32)
    luts.append(tf.where(step > 0, tf.clip_by_value(lut, 0, 255), identity))
  return _apply_lut(image, tf.cast(tf.stack(luts), tf.uint8))


def invert(image):
  return 255 - image


def posterize(image, bits):
  """Keep the `bits` high bits (bits <= 0 -> black, >= 8 -> unchanged)."""
  shift = tf.clip_by_value(8 - tf.cast(bits, tf.int32), 0, 8)
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift), tf.uint8)


def solarize(image, threshold=128):
  """Invert pixels >= threshold (compared as integers: a threshold of 256 or more changes nothing)."""
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_threshold(level, mode="official"):
  """Solarize's threshold at `level`: int(level / 10 * 256), as an int32 tensor.

  'official': the released op compares the uint8 image with the threshold cast to uint8, so it wraps
  modulo 256 (level 10 -> 0, i.e. every pixel is inverted; 11.67 -> 42; 15 -> 128). 'unwrapped': the
  integer itself, so from level 10 on Solarize leaves the image unchanged.
  """
  return _wrap_threshold(_int_level(level, 256), mode)


def _wrap_threshold(threshold, mode):
  _check_mode(mode, SOLARIZE_MODES, "solarize")
  return tf.math.floormod(threshold, 256) if mode == "official" else threshold


def _check_mode(mode, allowed, name):
  if mode not in allowed:
    raise ValueError(f"{name} mode {mode!r} is not one of {', '.join(allowed)}")


def solarize_add(image, addition=0, threshold=128):
  """Add `addition` (clipped) to pixels below threshold."""
  x = tf.cast(image, tf.int32)
  added = tf.cast(tf.clip_by_value(x + addition, 0, 255), tf.uint8)
  return tf.where(x < threshold, added, image)


def _grey(image):
  return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def color(image, factor):
  return blend(_grey(image), image, factor)


def contrast(image, factor, enhance="official"):
  """Blend with a uniform grey image. 'official': its level is int(min(pixel count / 256, 255)), what
  the released op computes as "mean" (the sum of the 256-bin grey histogram divided by 256: the
  pixel count, whatever the image shows); 'corrected': the mean grey level, truncated (PIL's
  ImageEnhance.Contrast uses the mean grey level too, rounded)."""
  _check_mode(enhance, ENHANCE_MODES, "enhance")
  if enhance == "official":
    count = tf.cast(tf.shape(image)[0] * tf.shape(image)[1], tf.float32)
    mean = tf.clip_by_value(count / 256.0, 0.0, 255.0)
  else:
    mean = tf.reduce_mean(tf.cast(tf.image.rgb_to_grayscale(image), tf.float32))
  return blend(tf.fill(tf.shape(image), tf.cast(mean, tf.uint8)), image, factor)


def brightness(image, factor):
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor, enhance="official"):
  """Blend with a 3x3 smoothed copy (PIL's SMOOTH kernel); the 1-pixel border stays unsmoothed.

  The smoothed copy is made uint8 by truncation ('official', the released op's cast) or rounding
  ('corrected', as PIL's filter)."""
  _check_mode(enhance, ENHANCE_MODES, "enhance")
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, strides=[1, 1, 1, 1], padding="SAME")[0]
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  rows, cols = tf.range(h)[:, None, None], tf.range(w)[None, :, None]
  interior = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
  smooth = tf.clip_by_value(smooth, 0.0, 255.0)
  smooth = tf.floor(smooth) if enhance == "official" else tf.round(smooth)
  smooth = tf.where(interior, smooth, x[0])
  return blend(tf.cast(smooth, tf.uint8), image, factor)


def _project(image, transform, fill=FILL_VALUE):
  """Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2); outside -> fill."""
  out = tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None],
    transforms=tf.cast(tf.reshape(transform, [1, 8]), tf.float32),
    output_shape=tf.shape(image)[:2],
    fill_value=tf.cast(fill, tf.float32),
    interpolation="NEAREST",
    fill_mode="CONSTANT",
  )
  return out[0]


def rotate(image, degrees, replace=FILL_VALUE):
  """Counter-clockwise rotation about the image centre."""
  theta = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  h = tf.cast(tf.shape(image)[0], tf.float32) - 1.0
  w = tf.cast(tf.shape(image)[1], tf.float32) - 1.0
  cos, sin = tf.cos(theta), tf.sin(theta)
  x_off = (w - (cos * w - sin * h)) / 2.0
  y_off = (h - (sin * w + cos * h)) / 2.0
  return _project(image, tf.stack([cos, -sin, x_off, sin, cos, y_off, 0.0, 0.0]), replace)


def shear_x(image, level, replace=FILL_VALUE):
  return _project(image, tf.stack([1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]), replace)


def shear_y(image, level, replace=FILL_VALUE):
  return _project(image, tf.stack([1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0]), replace)


def translate_x(image, pixels, replace=FILL_VALUE):
  """Content moves left by `pixels` (right if negative)."""
  return _project(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0, 0.0, 0.0]), replace)


def translate_y(image, pixels, replace=FILL_VALUE):
  return _project(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0]), replace)


def cutout(image, pad_size, replace=FILL_VALUE, seed=None):
  """Fill a (2*pad_size)^2 square (clipped at the border) at a uniformly random centre."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  seed = _seed_or_random(seed)
  cy = tf.random.stateless_uniform([], seed, maxval=h, dtype=tf.int32)
  cx = tf.random.stateless_uniform([], seed + 1, maxval=w, dtype=tf.int32)
  rows, cols = tf.range(h)[:, None, None], tf.range(w)[None, :, None]
  inside = (
    (rows >= cy - pad_size)
    & (rows < cy + pad_size)
    & (cols >= cx - pad_size)
    & (cols < cx + pad_size)
  )
  return tf.where(inside, tf.cast(replace, image.dtype), image)


# ------------------------------------------------------------------------------ levels -> arguments
def _seed_or_random(seed):
  if seed is None:
    return tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)
  seed = tf.convert_to_tensor(seed)
  return seed if seed.dtype in (tf.int32, tf.int64) else tf.cast(seed, tf.int64)


def _random_sign(value, seed):
  negate = tf.random.stateless_uniform([], seed) < 0.5
  return tf.where(negate, -value, value)


def _scaled(level, const):
  """(level / 10) * const as a float32 tensor; `level` may be a Python float or a tensor."""
  return tf.cast(tf.cast(level, tf.float64) / MAX_LEVEL * const, tf.float32)


def _int_level(level, const):
  """int((level / 10) * const), computed in float64 exactly as Python would (levels are >= 0)."""
  return tf.cast(tf.floor(tf.cast(level, tf.float64) / MAX_LEVEL * const), tf.int32)


def _solarize_level_threshold(image, threshold, mode):
  """The table's Solarize: `threshold` is int(level / 10 * 256), wrapped as `solarize_threshold`."""
  return solarize(image, _wrap_threshold(threshold, mode))


def _enhance_factor(level):
  return _scaled(level, 1.8) + 0.1


# name -> (op, args(level, hparams, seed) -> tuple). Levels may be tensors (AutoAugment looks them up
# from its policy table) or Python floats (RandAugment's static per-stage magnitude). The ops named in
# _MODES also take the official-vs-corrected switch of that name, as their last positional argument.
_OP_TABLE = {
  "AutoContrast": (autocontrast, lambda l, hp, s: ()),
  "Equalize": (equalize, lambda l, hp, s: ()),
  "Invert": (invert, lambda l, hp, s: ()),
  "Rotate": (rotate, lambda l, hp, s: (_random_sign(_scaled(l, 30.0), s),)),
  "Posterize": (posterize, lambda l, hp, s: (_int_level(l, 4),)),
  "Solarize": (_solarize_level_threshold, lambda l, hp, s: (_int_level(l, 256),)),
  "SolarizeAdd": (solarize_add, lambda l, hp, s: (_int_level(l, 110),)),
  "Color": (color, lambda l, hp, s: (_enhance_factor(l),)),
  "Contrast": (contrast, lambda l, hp, s: (_enhance_factor(l),)),
  "Brightness": (brightness, lambda l, hp, s: (_enhance_factor(l),)),
  "Sharpness": (sharpness, lambda l, hp, s: (_enhance_factor(l),)),
  "ShearX": (shear_x, lambda l, hp, s: (_random_sign(_scaled(l, 0.3), s),)),
  "ShearY": (shear_y, lambda l, hp, s: (_random_sign(_scaled(l, 0.3), s),)),
  "TranslateX": (
    translate_x,
    lambda l, hp, s: (_random_sign(_scaled(l, hp["translate_const"]), s),),
  ),
  "TranslateY": (
    translate_y,
    lambda l, hp, s: (_random_sign(_scaled(l, hp["translate_const"]), s),),
  ),
  "Cutout": (cutout, lambda l, hp, s: (_int_level(l, hp["cutout_const"]), FILL_VALUE, s)),
}
assert tuple(sorted(_OP_TABLE)) == tuple(sorted(OPS))
_MODES = {"Solarize": "solarize", "Contrast": "enhance", "Sharpness": "enhance"}


# The ops use no Python control flow on tensors, so AutoGraph has nothing to convert; skipping it makes
# tracing inside tf.data several times faster (AutoAugment has 25 x 2 conditional branches).
_no_autograph = tf.autograph.experimental.do_not_convert


@_no_autograph
def apply_op(
  image, name, level, seed=None, hparams=None, *, solarize="official", enhance="official"
):
  """Apply the op `name` at `level` (0..10 scale, extrapolating above 10). `solarize`/`enhance`:
  the official-vs-corrected switches (module docstring), used by the ops they concern."""
  fn = _OP_TABLE[name][0]
  args = op_arguments(name, level, seed, hparams)
  if name in _MODES:
    args += ({"solarize": solarize, "enhance": enhance}[_MODES[name]],)
  out = fn(image, *args)
  return tf.ensure_shape(out, image.shape)


def op_arguments(name, level, seed=None, hparams=None) -> tuple:
  """What `apply_op` passes op `name` after the image at `level`: the level mapped to the op's own
  units (degrees, pixels, factors, bits), without the mode switch."""
  return _OP_TABLE[name][1](level, hparams or RANDAUGMENT_HPARAMS, _seed_or_random(seed))


def scaled_hparams(image_size: int, reference_size: int = 224) -> dict:
  """RandAugment's pixel constants scaled from ImageNet-sized crops to `image_size`.

  The official constants (translate 100 px, cutout 40 px) assume ~224-px crops; on a 28-px image
  they push the whole picture out of frame at any magnitude. Scaling them keeps each op's effect
  the same fraction of the image, which is what the magnitude means.
  """
  ratio = image_size / reference_size
  return {k: max(1, int(round(v * ratio))) for k, v in RANDAUGMENT_HPARAMS.items()}


@_no_autograph
def randaugment(
  image_uint8_hwc,
  num_layers=2,
  magnitude=10.0,
  seed=None,
  hparams=None,
  ops=None,
  *,
  solarize="official",
  enhance="official",
):
  """RandAugment: `num_layers` times, apply one uniformly chosen op of `ops` at `magnitude`.

  `ops` (default all 16 `OPS`, as the official code) restricts the choice, e.g. to the geometric
  ops for grey-scale data where Invert/Solarize/Posterize change what the image shows. `hparams`
  overrides the pixel constants of the translate and cutout ops (default RANDAUGMENT_HPARAMS, the
  official ImageNet values). `solarize`, `enhance`: the official-vs-corrected switches.
  """
  ops = parse_ops(ops)
  image = tf.convert_to_tensor(image_uint8_hwc)
  if image.dtype != tf.uint8:
    raise TypeError(f"randaugment expects uint8 images, got {image.dtype}")
  seeds = tf.random.experimental.stateless_split(_seed_or_random(seed), 2 * max(num_layers, 1))
  for layer in range(num_layers):
    choice = tf.random.stateless_uniform([], seeds[2 * layer], maxval=len(ops), dtype=tf.int32)
    op_seed = seeds[2 * layer + 1]
    branches = [
      functools.partial(
        apply_op, image, name, magnitude, op_seed, hparams, solarize=solarize, enhance=enhance
      )
      for name in ops
    ]
    image = tf.switch_case(choice, branches)
  return image


# ------------------------------------------------------------------------------------ AutoAugment
# AutoAugment ImageNet policy "v0" as used by the official EfficientNet code: 25 sub-policies of two
# (op, probability, level) steps; one sub-policy is drawn per image.
POLICY_V0 = (
  (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)),
  (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
  (("Color", 0.4, 1), ("Rotate", 0.6, 8)),
  (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
  (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)),
  (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
  (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)),
  (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
  (("Color", 0.6, 1), ("Equalize", 1.0, 2)),
  (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
  (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)),
  (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
  (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)),
  (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
  (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)),
  (("Rotate", 1.0, 7), ("TranslateY", 0.8, 9)),
  (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)),
  (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
  (("Color", 1.0, 0), ("Rotate", 0.6, 2)),
  (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
  (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
  (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
  (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
  (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
  (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)


_POLICY_OPS = tf.constant([[OPS.index(name) for name, _, _ in sub] for sub in POLICY_V0], tf.int32)
_POLICY_PROBS = tf.constant([[p for _, p, _ in sub] for sub in POLICY_V0], tf.float32)
_POLICY_LEVELS = tf.constant([[l for _, _, l in sub] for sub in POLICY_V0], tf.float64)


@_no_autograph
def autoaugment(image_uint8_hwc, seed=None, *, solarize="official", enhance="official"):
  """AutoAugment v0: draw one sub-policy uniformly, apply each of its two ops with its probability.

  The sub-policy's (op, prob, level) are looked up as tensors, so the graph holds one 16-way switch
  per step instead of 25 x 2 op copies (tracing is ~10x faster, same result). `solarize` matters for
  ('Solarize', 0.6, 10): 'official' inverts every pixel there, 'unwrapped' changes nothing.
  """
  image = tf.convert_to_tensor(image_uint8_hwc)
  seeds = tf.random.experimental.stateless_split(_seed_or_random(seed), 5)
  choice = tf.random.stateless_uniform([], seeds[0], maxval=len(POLICY_V0), dtype=tf.int32)
  for step in range(2):
    op_index = _POLICY_OPS[choice, step]
    level = _POLICY_LEVELS[choice, step]
    op_seed = seeds[2 + 2 * step]

    def apply(img=image, op_index=op_index, level=level, op_seed=op_seed):
      branches = [
        functools.partial(
          apply_op,
          img,
          name,
          level,
          op_seed,
          AUTOAUGMENT_HPARAMS,
          solarize=solarize,
          enhance=enhance,
        )
        for name in OPS
      ]
      return tf.switch_case(op_index, branches)

    coin = tf.random.stateless_uniform([], seeds[1 + 2 * step])
    image = tf.cond(coin < _POLICY_PROBS[choice, step], apply, lambda img=image: img)
  return image

"""The one augmentation value (`augment.Augment`) and the official-vs-corrected RandAugment ops.

Official numbers are computed here from the released code's formulas (reference section 10, items
1 and 8), written out in numpy; no official code runs.
"""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from configs import imagenet
from effnetv2_jax import progressive
from effnetv2_jax.data import augment, randaug, randaug_ops
from effnetv2_jax.data.augment import Augment

import _train_fixtures as fx

_RNG = np.random.default_rng(0)
IMG = _RNG.integers(0, 256, size=(33, 41, 3), dtype=np.uint8)  # odd, non-square on purpose
SEED = tf.constant([4, 2])


# --- the value and its builder ------------------------------------------------------------------
def test_for_stage_reads_the_stage_and_the_config():
  c = imagenet.get_config("variant=s")
  c.num_train_steps = 100
  c.randaug_ops = " Rotate, ShearX "
  stages = progressive.stages(c)
  got = [augment.for_stage(c, s) for s in stages]
  assert [a.magnitude for a in got] == [s.randaug_magnitude for s in stages]
  first = got[0]
  assert (first.layers, first.ops, first.autoaugment) == (2, ("Rotate", "ShearX"), False)
  assert (first.solarize, first.enhance) == ("official", "official")
  assert first.randaugment and first.active
  # B0-B3: AutoAugment, magnitude 0.
  b0 = imagenet.get_config("variant=b0")
  b0.num_train_steps = 100
  a = augment.for_stage(b0, progressive.stages(b0)[0])
  assert a.autoaugment and a.active and not a.randaugment
  # The paper preset uses RandAugment's ops as defined.
  paper = imagenet.get_config("variant=s,preset=paper")
  paper.num_train_steps = 100
  a = augment.for_stage(paper, progressive.stages(paper)[-1])
  assert (a.solarize, a.enhance, a.magnitude) == ("unwrapped", "corrected", 15.0)


def test_augment_defaults_parse_and_refuse():
  none = Augment()
  assert not none.active and none.ops == randaug_ops.OPS and none.magnitude == 0.0
  assert Augment(magnitude=5, ops="").ops == randaug_ops.OPS  # '' = all 16
  assert Augment(ops="Invert").ops == ("Invert",)  # strings are parsed once, on construction
  assert not Augment(layers=0, magnitude=10).randaugment
  with pytest.raises(AttributeError):
    none.magnitude = 3.0  # frozen
  for kwargs, field in (
    ({"layers": -1}, "layers"),
    ({"magnitude": -1.0}, "magnitude"),
    ({"ops": "Rotate,Blur"}, "ops"),
    ({"solarize": "wrap"}, "solarize"),
    ({"enhance": "pil"}, "enhance"),
  ):
    with pytest.raises(augment.AugmentError) as e:
      Augment(**kwargs)
    assert e.value.field == field


@pytest.mark.parametrize(
  "field,value",
  [
    ("randaug_solarize", "wrapped"),
    ("randaug_enhance", "pil"),
    ("randaug_ops", "Rotate,Rotate"),
    ("randaug_layers", -2),
  ],
)
def test_config_errors_name_the_config_field(field, value):
  c = imagenet.get_config("variant=s")
  c[field] = value
  with pytest.raises(augment.AugmentError) as e:
    augment.check_config(c)
  assert e.value.field == field and str(e.value).startswith(field + ":")


def test_augment_module_does_not_import_tensorflow():
  code = (
    "import sys; from effnetv2_jax.data import augment; from effnetv2_jax import config_validation;"
    "augment.Augment(magnitude=10, ops='Rotate'); assert 'tensorflow' not in sys.modules"
  )
  subprocess.run(
    [sys.executable, "-c", code], check=True, cwd=fx.REPO, env=fx.subprocess_env(), timeout=120
  )


# --- Solarize: the official threshold wraps modulo 256 -------------------------------------------
def _official_threshold(magnitude):
  # autoaugment.py: int((level / 10) * 256), compared with a uint8 image after a cast to uint8.
  return int(magnitude / 10 * 256) % 256


def _solarized(image, threshold):
  return np.where(image < threshold, image, 255 - image)


@pytest.mark.parametrize("magnitude,threshold", [(5.0, 128), (10.0, 0), (11.67, 42), (15.0, 128)])
def test_official_solarize_threshold_wraps(magnitude, threshold):
  assert _official_threshold(magnitude) == threshold
  assert int(randaug.solarize_threshold(magnitude)) == threshold
  got = randaug.apply_op(IMG, "Solarize", magnitude, SEED).numpy()
  np.testing.assert_array_equal(got, _solarized(IMG, threshold))


def test_official_solarize_at_magnitude_10_inverts_every_pixel():
  np.testing.assert_array_equal(randaug.apply_op(IMG, "Solarize", 10.0, SEED).numpy(), 255 - IMG)
  # As AutoAugment v0's ('Solarize', 0.6, 10) applies it: the level is a float64 tensor there.
  level = tf.constant(10.0, tf.float64)
  got = randaug.apply_op(IMG, "Solarize", level, SEED, randaug.AUTOAUGMENT_HPARAMS).numpy()
  np.testing.assert_array_equal(got, 255 - IMG)


@pytest.mark.parametrize("magnitude", [10.0, 11.67, 15.0])
def test_unwrapped_solarize_leaves_the_image_from_magnitude_10(magnitude):
  assert int(randaug.solarize_threshold(magnitude, "unwrapped")) == int(magnitude / 10 * 256)
  got = randaug.apply_op(IMG, "Solarize", magnitude, SEED, solarize="unwrapped").numpy()
  np.testing.assert_array_equal(got, IMG)
  below = randaug.apply_op(IMG, "Solarize", 5.0, SEED, solarize="unwrapped").numpy()
  np.testing.assert_array_equal(below, _solarized(IMG, 128))  # below 10 both modes agree


def test_randaugment_and_autoaugment_pass_the_solarize_switch():
  one = dict(num_layers=1, magnitude=10.0, seed=SEED, ops="Solarize")
  np.testing.assert_array_equal(randaug.randaugment(IMG, **one).numpy(), 255 - IMG)
  np.testing.assert_array_equal(randaug.randaugment(IMG, **one, solarize="unwrapped").numpy(), IMG)
  # AutoAugment: the two modes differ only where a Solarize step at level 10 is drawn.
  differ = [
    s
    for s in range(40)
    if not np.array_equal(
      randaug.autoaugment(IMG, seed=[9, s]).numpy(),
      randaug.autoaugment(IMG, seed=[9, s], solarize="unwrapped").numpy(),
    )
  ]
  assert differ  # sub-policy 22, ('Posterize', 0.8, 2), ('Solarize', 0.6, 10), is drawn sometimes


# --- Contrast: the official "mean" is the pixel count / 256 --------------------------------------
_FACTOR_7 = np.float32(7.0 / 10 * 1.8) + np.float32(0.1)  # the enhance ops' factor at level 7


def _blend(degenerate, image, factor):
  a, b = degenerate.astype(np.float32), image.astype(np.float32)
  return np.clip(a + np.float32(factor) * (b - a), 0.0, 255.0).astype(np.uint8)


@pytest.mark.parametrize("shape,grey", [((33, 41), 5), ((64, 64), 16), ((300, 300), 255)])
@pytest.mark.parametrize("factor", [0.3, 1.6])
def test_official_contrast_blends_towards_pixel_count_over_256(shape, grey, factor):
  image = np.random.default_rng(1).integers(0, 256, size=shape + (3,), dtype=np.uint8)
  # autoaugment.py: mean = sum(256-bin histogram of the grey image) / 256, clipped, cast to uint8.
  assert int(min(shape[0] * shape[1] / 256, 255)) == grey  # 1353/256, 4096/256, 90000/256 -> 255
  want = _blend(np.full_like(image, grey), image, factor)
  np.testing.assert_array_equal(randaug.contrast(image, factor).numpy(), want)
  # RandAugment's Contrast at level 7 (factor 7 / 10 * 1.8 + 0.1 = 1.36) is this op.
  np.testing.assert_array_equal(
    randaug.apply_op(image, "Contrast", 7.0, SEED).numpy(),
    _blend(np.full_like(image, grey), image, _FACTOR_7),
  )


def test_corrected_contrast_blends_towards_the_grey_mean():
  grey = tf.image.rgb_to_grayscale(IMG).numpy().astype(np.float32).mean()
  want = _blend(np.full_like(IMG, int(grey)), IMG, 0.3)
  np.testing.assert_array_equal(randaug.contrast(IMG, 0.3, "corrected").numpy(), want)
  assert not np.array_equal(randaug.contrast(IMG, 0.3, "corrected"), randaug.contrast(IMG, 0.3))
  got = randaug.apply_op(IMG, "Contrast", 7.0, SEED, enhance="corrected").numpy()
  np.testing.assert_array_equal(got, _blend(np.full_like(IMG, int(grey)), IMG, _FACTOR_7))


# --- Sharpness: the official smoothed image is truncated, the corrected one rounded ---------------
def _smooth_sums(image):
  """13 x PIL's SMOOTH kernel response of the interior pixels, in exact integers."""
  x = image.astype(np.int64)
  h, w = x.shape[:2]
  total = sum(x[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
  return total + 4 * x[1:-1, 1:-1]  # centre weight 5 = 1 (in the sum) + 4


def test_official_sharpness_truncates_the_smoothed_image():
  # Factor 0 returns the smoothed image itself (blend's image1).
  sums = _smooth_sums(IMG)
  official = randaug.sharpness(IMG, 0.0).numpy().astype(np.int64)
  corrected = randaug.sharpness(IMG, 0.0, "corrected").numpy().astype(np.int64)
  exact = sums % 13 != 0  # where sum / 13 is an integer, float32 may land just below it
  np.testing.assert_array_equal(official[1:-1, 1:-1][exact], (sums // 13)[exact])
  assert np.isin(official[1:-1, 1:-1][~exact] - (sums // 13)[~exact], [-1, 0]).all()
  # Rounding: sum / 13 is never within 1/26 of a half, so float32 error cannot flip it.
  np.testing.assert_array_equal(corrected[1:-1, 1:-1], (2 * sums + 13) // 26)
  np.testing.assert_array_equal(official[0], IMG[0])  # the border keeps the image, both modes
  np.testing.assert_array_equal(corrected[:, -1], IMG[:, -1])
  # At a real factor the modes differ by the rounding, a level or so per pixel.
  diff = np.abs(
    randaug.sharpness(IMG, 0.3).numpy().astype(int)
    - randaug.sharpness(IMG, 0.3, "corrected").numpy().astype(int)
  )
  assert 0 < diff.max() <= 1
  for mode in ("official", "corrected"):
    got = randaug.apply_op(IMG, "Sharpness", 7.0, SEED, enhance=mode).numpy()
    smooth = randaug.sharpness(IMG, 0.0, mode).numpy()
    np.testing.assert_array_equal(got, _blend(smooth, IMG, _FACTOR_7))


def test_unknown_modes_are_refused():
  with pytest.raises(ValueError, match="enhance"):
    randaug.contrast(IMG, 0.3, "pil")
  with pytest.raises(ValueError, match="solarize"):
    randaug.apply_op(IMG, "Solarize", 10.0, SEED, solarize="wrap")

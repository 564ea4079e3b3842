"""Per-family preprocessing rules (reference section 5), including tiny Fashion-MNIST-sized inputs."""

import numpy as np
import pytest
import tensorflow as tf

from effnetv2_jax.data import preprocess
from effnetv2_jax.data.augment import Augment


def _framed(size=100, border=5):
  img = np.zeros((size, size, 3), np.uint8)
  img[:border], img[-border:], img[:, :border], img[:, -border:] = 255, 255, 255, 255
  return img


def test_v2_eval_squashes_from_320_and_center_crops_below():
  img = _framed()
  squashed = preprocess.eval_image(img, image_size=320, family="v2").numpy()
  assert squashed.shape == (320, 320, 3) and squashed[0, 0, 0] == pytest.approx(
    127 / 128
  )  # border kept
  # 224: crop side int(224/256 * 100) = 87 at offset 7 excludes the 5-px border entirely.
  cropped = preprocess.eval_image(img, image_size=224, family="v2").numpy()
  assert cropped.shape == (224, 224, 3) and np.allclose(cropped, -1.0)


def test_base_eval_always_center_crops_and_uses_mean_std():
  img = _framed(border=3)  # 380: crop side int(380/412 * 100) = 92 at offset 4
  out = preprocess.eval_image(img, image_size=380, family="v2-base").numpy()
  want = (0.0 - np.array(preprocess.IMAGENET_MEAN_RGB)) / np.array(preprocess.IMAGENET_STD_RGB)
  np.testing.assert_allclose(
    out, np.broadcast_to(want, out.shape), atol=1e-4
  )  # border cropped away


def test_center_crop_side():
  out = preprocess.center_crop(np.zeros((50, 80, 3), np.uint8), 224)
  assert out.shape == (43, 43, 3)  # int(224 / 256 * 50)
  assert preprocess.center_crop(np.zeros((1, 1, 3), np.uint8), 16).shape == (1, 1, 3)  # never empty


@pytest.mark.parametrize("family", preprocess.FAMILIES)
@pytest.mark.parametrize("image_size", [16, 32])
@pytest.mark.parametrize("aug", ["none", "randaug", "autoaugment"])
def test_train_on_tiny_images(family, image_size, aug):
  img = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
  kw = dict(
    image_size=image_size,
    family=family,
    seed=tf.constant([1, 2], tf.int64),
    augment=Augment(
      layers=2, magnitude=15.0 if aug == "randaug" else 0.0, autoaugment=aug == "autoaugment"
    ),
  )
  out = preprocess.train_image(img, **kw).numpy()
  assert out.shape == (image_size, image_size, 3) and np.isfinite(out).all()
  if family == "v2":
    assert out.min() >= -1.0 and out.max() <= 1.0
  np.testing.assert_array_equal(out, preprocess.train_image(img, **kw).numpy())  # seed-determined


def test_v2_random_crop_reaches_small_areas():
  # Area range (0.05, 1): some crops must be smaller than the legacy 0.08 minimum.
  img = np.zeros((200, 200, 3), np.uint8)
  areas = [
    np.prod(preprocess.random_crop(img, "v2", 64, tf.constant([s, 0])).shape[:2]) / 200**2
    for s in range(60)
  ]
  assert min(areas) < 0.08 and max(areas) <= 1.0


def test_unknown_family():
  with pytest.raises(ValueError, match="v2-base"):
    preprocess.eval_image(np.zeros((8, 8, 3), np.uint8), image_size=8, family="b0")


def test_small_family_keeps_the_whole_image():
  # A left half black / right half white image: a crop would change the column means.
  img = np.zeros((28, 28, 3), np.uint8)
  img[:, 14:] = 255
  out = preprocess.eval_image(tf.constant(img), image_size=28, family="small").numpy()
  np.testing.assert_allclose(out[:, :14], -1.0)
  np.testing.assert_allclose(out[:, 14:], 1.0)
  # Train without augmentation: the same picture up to a horizontal flip.
  tr = preprocess.train_image(
    tf.constant(img),
    image_size=28,
    family="small",
    seed=tf.constant([3, 4], tf.int64),
    augment=Augment(magnitude=0.0),
  ).numpy()
  assert np.allclose(tr, out) or np.allclose(tr, out[:, ::-1])


def test_small_family_scales_randaugment_pixel_constants():
  from effnetv2_jax.data import randaug

  assert randaug.scaled_hparams(224) == randaug.RANDAUGMENT_HPARAMS
  small = randaug.scaled_hparams(28)
  assert small == {"cutout_const": 5, "translate_const": 12}
  # Translating a 28-px image by the scaled constant at magnitude 10 keeps part of it in frame.
  img = tf.fill([28, 28, 3], tf.constant(200, tf.uint8))
  moved = randaug.apply_op(img, "TranslateX", 10.0, tf.constant([0, 1], tf.int64), small).numpy()
  assert (moved == 200).mean() > 0.5


def test_train_image_passes_the_randaugment_op_set():
  # With the op set reduced to Invert, every augmented image is the negative of the plain one
  # (up to the uint8 truncation RandAugment works in); the configured set reaches the op choice.
  img = np.random.default_rng(1).integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
  kw = dict(image_size=28, family="small", seed=tf.constant([3, 4], tf.int64))
  plain = preprocess.train_image(
    tf.constant(img), augment=Augment(layers=1, magnitude=0.0), **kw
  ).numpy()
  inverted = preprocess.train_image(
    tf.constant(img), augment=Augment(layers=1, magnitude=5.0, ops="Invert"), **kw
  ).numpy()
  np.testing.assert_allclose(inverted, -plain, atol=2 / 127.5)
  assert np.abs(plain).mean() > 0.1

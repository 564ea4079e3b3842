"""Per-family preprocessing rules (reference section 5), including tiny Fashion-MNIST-sized inputs."""

import io

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


# --- official base-family resize: TF1 bicubic without half-pixel centres ---------------------------
def _tf1_bicubic(image, size):
  """numpy reference of tf.compat.v1.image.resize_bicubic(align_corners=False,
  half_pixel_centers=False): input position = output index * (in / out) (no half-pixel shift), Keys
  cubic with a = -0.75, the fractional position rounded to 1/1024 (TF's coefficient table), edge
  pixels repeated."""
  a = -0.75

  def keys(x):
    x = abs(x)
    if x <= 1:
      return ((a + 2) * x - (a + 3)) * x * x + 1
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  def taps(in_size):
    scale = np.float32(in_size) / np.float32(size)
    rows = []
    for out in range(size):
      pos = np.float32(out) * scale
      base = int(np.floor(pos))
      t = np.rint(np.float32(pos - base) * np.float32(1024)) / 1024
      idx = np.clip([base - 1, base, base + 1, base + 2], 0, in_size - 1)
      rows.append((idx, [keys(1 + t), keys(t), keys(1 - t), keys(2 - t)]))
    return rows

  x = image.astype(np.float64)
  out = np.zeros((size, size, x.shape[2]))
  for i, (yi, wy) in enumerate(taps(x.shape[0])):
    for j, (xi, wx) in enumerate(taps(x.shape[1])):
      out[i, j] = np.einsum("a,b,abc->c", wy, wx, x[np.ix_(yi, xi)])
  return out


@pytest.mark.parametrize("shape,size", [((23, 31), 40), ((100, 90), 37)])  # up- and downsampling
def test_base_family_resizes_like_tf1_resize_bicubic(shape, size):
  img = np.random.default_rng(2).integers(0, 256, size=shape + (3,), dtype=np.uint8)
  got = preprocess.resize(tf.constant(img), size, "v2-base").numpy()
  np.testing.assert_allclose(got, _tf1_bicubic(img, size), atol=2e-3)
  tf1 = tf.compat.v1.image.resize_bicubic(img[None], [size, size])[0].numpy()
  np.testing.assert_array_equal(got, tf1)
  tf2 = tf.image.resize(img, [size, size], method="bicubic").numpy()
  assert np.abs(got - tf2).max() > 10  # the half-pixel shift moves every edge
  # The option: TF2's half-pixel-centred bicubic, what this code did before.
  half = preprocess.resize(tf.constant(img), size, "v2-base", base_resize="half_pixel").numpy()
  np.testing.assert_array_equal(half, tf2)
  with pytest.raises(ValueError, match="base_resize"):
    preprocess.resize(tf.constant(img), size, "v2-base", base_resize="tf1")
  bilinear = tf.image.resize(img, [size, size], method="bilinear").numpy()
  np.testing.assert_array_equal(preprocess.resize(tf.constant(img), size, "v2").numpy(), bilinear)


def test_base_family_eval_uses_the_tf1_resize():
  img = np.random.default_rng(3).integers(0, 256, size=(60, 50, 3), dtype=np.uint8)
  out = preprocess.eval_image(img, image_size=24, family="v2-base").numpy()
  crop = preprocess.center_crop(img, 24, "v2-base").numpy()
  want = tf.compat.v1.image.resize_bicubic(crop[None], [24, 24])[0]
  np.testing.assert_allclose(out, preprocess.normalize(want, "v2-base").numpy(), atol=1e-6)
  half = preprocess.eval_image(img, image_size=24, family="v2-base", base_resize="half_pixel")
  assert np.abs(half.numpy() - out).max() > 0.05


# --- decode_and_crop_jpeg for the base family --------------------------------------------------------
def _encoded(img, mode="RGB", fmt="JPEG", subsampling=0):
  """Encoded bytes; JPEG chroma subsampling 0 = 4:4:4 (none), 2 = 4:2:0 (most photos)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  buf = io.BytesIO()
  extra = dict(quality=90, subsampling=subsampling) if fmt == "JPEG" and mode != "L" else {}
  Image.fromarray(img).convert(mode).save(buf, fmt, **extra)
  return buf.getvalue()


def _photo(h=70, w=90, seed=4):
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (h + w)], -1)
  noise = np.random.default_rng(seed).normal(0, 25, size=(h, w, 3))
  return np.clip(base + noise, 0, 255).astype(np.uint8)


_WINDOWS = ([0, 0, 70, 90], [3, 5, 40, 41], [17, 33, 53, 57], [0, 16, 20, 32], [69, 89, 1, 1])


@pytest.mark.parametrize(
  "mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG")]
)
def test_decode_and_crop_equals_decode_then_slice(mode, fmt):
  data = tf.constant(_encoded(_photo(), mode, fmt))
  whole = preprocess.decode(data).numpy()
  for window in _WINDOWS:
    got = preprocess.decode_and_crop(data, lambda shape, w=window: tf.constant(w)).numpy()
    top, left, h, w = window
    np.testing.assert_array_equal(got, whole[top : top + h, left : left + w])


def test_decode_and_crop_of_subsampled_chroma_differs_only_at_the_crop_edges():
  # With 4:2:0 chroma, libjpeg's cropped decode upsamples the chroma of the window's first and last
  # column from inside the window only; the official base-family code sees these pixels too.
  data = tf.constant(_encoded(_photo(), subsampling=2))
  whole = preprocess.decode(data).numpy()
  edges_differ = False
  for window in _WINDOWS:
    got = preprocess.decode_and_crop(data, lambda shape, w=window: tf.constant(w)).numpy()
    top, left, h, w = window
    want = whole[top : top + h, left : left + w]
    np.testing.assert_array_equal(got[:, 1:-1], want[:, 1:-1])
    edges_differ |= not np.array_equal(got, want)
  assert edges_differ


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("RGB", "PNG")])
@pytest.mark.parametrize("family", preprocess.FAMILIES)
def test_bytes_in_equal_decoded_in(mode, fmt, family):
  # The crop window drawn from the JPEG header's shape is the one drawn from the decoded image
  # (a grey JPEG's header says 1 channel, the decoded image has 3).
  data = tf.constant(_encoded(_photo(), mode, fmt))
  decoded = preprocess.decode(data)
  kw = dict(image_size=24, family=family)
  for s in range(6):
    seed = tf.constant([s, 7], tf.int64)
    np.testing.assert_array_equal(
      preprocess.train_image(data, seed=seed, **kw).numpy(),
      preprocess.train_image(decoded, seed=seed, **kw).numpy(),
    )
  np.testing.assert_array_equal(
    preprocess.eval_image(data, **kw).numpy(), preprocess.eval_image(decoded, **kw).numpy()
  )


# --- v2 eval centre crop offset ----------------------------------------------------------------------
def test_v2_eval_center_crop_offset_is_official():
  # 100 px at 224: side int(224 / 256 * 100) = 87, h - side = 13 (odd). Official preprocessing.py
  # puts the crop at (100 - 87) // 2 = 6; the legacy (B0-B3) code at (100 - 87 + 1) // 2 = 7.
  shape = tf.constant([100, 100, 3])
  assert preprocess.center_crop_window(shape, 224, "v2").numpy().tolist() == [6, 6, 87, 87]
  assert preprocess.center_crop_window(shape, 224, "v2-base").numpy().tolist() == [7, 7, 87, 87]
  tall = tf.constant([121, 80, 3])  # side 70: (121 - 70) // 2 = 25 rows, (80 - 70) // 2 = 5 cols
  assert preprocess.center_crop_window(tall, 224, "v2").numpy().tolist() == [25, 5, 70, 70]
  assert preprocess.center_crop_window(tall, 224, "v2-base").numpy().tolist() == [26, 5, 70, 70]
  img = np.random.default_rng(5).integers(0, 256, size=(100, 100, 3), dtype=np.uint8)
  out = preprocess.eval_image(img, image_size=224, family="v2").numpy()
  want = tf.image.resize(img[6:93, 6:93], [224, 224], method="bilinear")
  np.testing.assert_allclose(out, preprocess.normalize(want, "v2").numpy(), atol=1e-6)

"""RandAugment / AutoAugment ops: eager and tf.data (graph) execution, PIL references, neutral levels."""

import functools

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from effnetv2_jax.data import randaug

_RNG = np.random.default_rng(0)
IMG = _RNG.integers(20, 220, size=(33, 41, 3), dtype=np.uint8)  # odd, non-square on purpose


def _graph(fn, image):
  """Run `fn` inside a tf.data map, i.e. traced into a graph function."""
  ds = tf.data.Dataset.from_tensors(tf.constant(image)).map(fn)
  return next(iter(ds)).numpy()


@pytest.mark.parametrize("name", randaug.OPS)
@pytest.mark.parametrize("level", [7.0, 15.0])  # 15 checks extrapolation beyond the 0..10 scale
def test_every_op_eager_equals_graph(name, level):
  fn = lambda x: randaug.apply_op(x, name, level, seed=tf.constant([4, 2]))
  eager = fn(tf.constant(IMG)).numpy()
  graph = _graph(fn, IMG)
  assert eager.dtype == np.uint8 and eager.shape == IMG.shape
  np.testing.assert_array_equal(eager, graph)


def test_ops_list_is_the_official_sixteen():
  assert len(randaug.OPS) == 16 and len(set(randaug.OPS)) == 16


_PIL_REFERENCES = [
  ("autocontrast", lambda x: randaug.autocontrast(x), lambda p: ImageOps.autocontrast(p)),
  ("equalize", lambda x: randaug.equalize(x), lambda p: ImageOps.equalize(p)),
  ("invert", lambda x: randaug.invert(x), lambda p: ImageOps.invert(p)),
  ("posterize2", lambda x: randaug.posterize(x, 2), lambda p: ImageOps.posterize(p, 2)),
  ("posterize5", lambda x: randaug.posterize(x, 5), lambda p: ImageOps.posterize(p, 5)),
  ("solarize", lambda x: randaug.solarize(x, 100), lambda p: ImageOps.solarize(p, 100)),
  ("solarize0", lambda x: randaug.solarize(x, 0), lambda p: ImageOps.solarize(p, 0)),
]


@pytest.mark.parametrize("label,ours,pil", _PIL_REFERENCES, ids=[r[0] for r in _PIL_REFERENCES])
def test_matches_pil_exactly(label, ours, pil):
  del label
  want = np.asarray(pil(Image.fromarray(IMG)))
  np.testing.assert_array_equal(ours(tf.constant(IMG)).numpy(), want)
  np.testing.assert_array_equal(_graph(ours, IMG), want)


def test_equalize_and_autocontrast_on_low_contrast_image():
  # Narrow histograms exercise the non-trivial tables (a flat channel must stay unchanged).
  img = _RNG.integers(100, 120, size=(16, 16, 3), dtype=np.uint8)
  img[..., 2] = 77
  for ours, pil in (
    (randaug.equalize, ImageOps.equalize),
    (randaug.autocontrast, ImageOps.autocontrast),
  ):
    np.testing.assert_array_equal(ours(img).numpy(), np.asarray(pil(Image.fromarray(img))))


@pytest.mark.parametrize(
  "ours,enhancer",
  [
    (randaug.color, ImageEnhance.Color),
    (randaug.brightness, ImageEnhance.Brightness),
    # The 'corrected' Contrast and Sharpness are the PIL ops; the official ones are pinned below.
    (functools.partial(randaug.contrast, enhance="corrected"), ImageEnhance.Contrast),
    (functools.partial(randaug.sharpness, enhance="corrected"), ImageEnhance.Sharpness),
  ],
)
@pytest.mark.parametrize("factor", [0.3, 1.6])
def test_enhance_ops_close_to_pil(ours, enhancer, factor):
  # Grey weights/rounding differ slightly between TF and PIL; within a few levels is the same op.
  want = np.asarray(enhancer(Image.fromarray(IMG)).enhance(factor)).astype(int)
  got = ours(IMG, factor).numpy().astype(int)
  assert np.abs(got - want).max() <= 3


NEUTRAL = [
  ("rotate0", lambda x: randaug.rotate(x, 0.0)),
  ("shear_x0", lambda x: randaug.shear_x(x, 0.0)),
  ("shear_y0", lambda x: randaug.shear_y(x, 0.0)),
  ("translate_x0", lambda x: randaug.translate_x(x, 0.0)),
  ("translate_y0", lambda x: randaug.translate_y(x, 0.0)),
  ("color1", lambda x: randaug.color(x, 1.0)),
  ("contrast1", lambda x: randaug.contrast(x, 1.0)),
  ("brightness1", lambda x: randaug.brightness(x, 1.0)),
  ("sharpness1", lambda x: randaug.sharpness(x, 1.0)),
  ("posterize8", lambda x: randaug.posterize(x, 8)),
  ("solarize256", lambda x: randaug.solarize(x, 256)),
  ("solarize_add0", lambda x: randaug.solarize_add(x, 0)),
  ("cutout0", lambda x: randaug.cutout(x, 0, seed=tf.constant([1, 1]))),
]


@pytest.mark.parametrize("label,fn", NEUTRAL, ids=[n[0] for n in NEUTRAL])
def test_identity_at_neutral_magnitude(label, fn):
  del label
  np.testing.assert_array_equal(fn(tf.constant(IMG)).numpy(), IMG)
  np.testing.assert_array_equal(_graph(fn, IMG), IMG)


def test_geometry_against_numpy():
  square = IMG[:33, :33]
  np.testing.assert_array_equal(randaug.rotate(square, 90.0).numpy(), np.rot90(square))  # CCW
  moved = randaug.translate_x(IMG, 5.0).numpy()
  np.testing.assert_array_equal(moved[:, :-5], IMG[:, 5:])
  assert (moved[:, -5:] == randaug.FILL_VALUE).all()  # uncovered area gets the official fill 128
  sheared = randaug.shear_x(IMG, 0.3).numpy()
  np.testing.assert_array_equal(sheared[0], IMG[0])  # row 0 does not move under x-shear
  assert (sheared[-1, -10:] == 128).all()


def test_cutout_box_size_and_fill():
  out = randaug.cutout(np.zeros((64, 64, 3), np.uint8), 5, seed=tf.constant([7, 7])).numpy()
  filled = (out == 128).all(-1)
  rows, cols = np.nonzero(filled)
  assert rows.max() - rows.min() + 1 <= 10 and cols.max() - cols.min() + 1 <= 10
  assert filled.sum() > 0


def test_level_to_argument_semantics():
  hp, seed = randaug.RANDAUGMENT_HPARAMS, tf.constant([0, 0])
  args = lambda name, level: randaug.op_arguments(name, level, seed, hp)
  assert abs(abs(float(args("Rotate", 10.0)[0])) - 30.0) < 1e-5
  assert abs(abs(float(args("Rotate", 15.0)[0])) - 45.0) < 1e-5  # extrapolates above 10
  assert abs(abs(float(args("ShearX", 5.0)[0])) - 0.15) < 1e-6
  assert abs(abs(float(args("TranslateY", 10.0)[0])) - 100.0) < 1e-4
  assert int(args("Posterize", 10.0)[0]) == 4 and int(args("Solarize", 5.0)[0]) == 128
  assert int(args("SolarizeAdd", 7.0)[0]) == 77 and int(args("Cutout", 10.0)[0]) == 40
  assert (
    abs(float(args("Color", 10.0)[0]) - 1.9) < 1e-6
    and abs(float(args("Color", 20.0)[0]) - 3.7) < 1e-6
  )


def test_randaugment_is_a_function_of_its_seed():
  a = randaug.randaugment(IMG, 2, 10.0, seed=[1, 2]).numpy()
  b = _graph(lambda x: randaug.randaugment(x, 2, 10.0, seed=tf.constant([1, 2])), IMG)
  np.testing.assert_array_equal(a, b)
  outs = {randaug.randaugment(IMG, 2, 10.0, seed=[1, s]).numpy().tobytes() for s in range(8)}
  assert len(outs) > 4  # different seeds pick different ops
  np.testing.assert_array_equal(randaug.randaugment(IMG, 0, 10.0, seed=[1, 2]).numpy(), IMG)
  with pytest.raises(TypeError):
    randaug.randaugment(IMG.astype(np.float32))


def test_randaugment_op_subset():
  # A one-op set always applies that op, with the op's own seed: equal to apply_op directly.
  seed = tf.constant([5, 6])
  only_rotate = randaug.randaugment(IMG, 1, 9.0, seed=seed, ops="Rotate").numpy()
  op_seed = tf.random.experimental.stateless_split(seed, 2)[1]
  np.testing.assert_array_equal(only_rotate, randaug.apply_op(IMG, "Rotate", 9.0, op_seed).numpy())
  # Over many seeds a two-op set produces exactly those two ops' outputs, both of them.
  outs = set()
  for s in range(12):
    seed = tf.constant([7, s])
    op_seed = tf.random.experimental.stateless_split(seed, 2)[1]
    got = randaug.randaugment(IMG, 1, 8.0, seed=seed, ops=("Invert", "Equalize")).numpy()
    cands = {n: randaug.apply_op(IMG, n, 8.0, op_seed).numpy() for n in ("Invert", "Equalize")}
    outs.add(next(n for n, c in cands.items() if np.array_equal(c, got)))
  assert outs == {"Invert", "Equalize"}
  # The default ('' or None) is the official 16, so seeded outputs do not change.
  np.testing.assert_array_equal(
    randaug.randaugment(IMG, 2, 10.0, seed=[1, 2], ops="").numpy(),
    randaug.randaugment(IMG, 2, 10.0, seed=[1, 2]).numpy(),
  )
  assert randaug.parse_ops(" Rotate, ShearX ") == ("Rotate", "ShearX")
  for bad in ("Rotate,Blur", "Rotate,Rotate", ","):
    with pytest.raises(ValueError):
      randaug.parse_ops(bad)


def test_autoaugment_policy_v0():
  assert len(randaug.POLICY_V0) == 25 and all(len(s) == 2 for s in randaug.POLICY_V0)
  assert all(op in randaug.OPS for sub in randaug.POLICY_V0 for op, _, _ in sub)
  a = randaug.autoaugment(IMG, seed=[3, 4]).numpy()
  b = _graph(lambda x: randaug.autoaugment(x, seed=tf.constant([3, 4])), IMG)
  np.testing.assert_array_equal(a, b)
  assert a.shape == IMG.shape and a.dtype == np.uint8

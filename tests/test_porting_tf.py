"""Official google/automl TF checkpoints -> our variables.

No official checkpoint can be downloaded here, so the tests write real TF checkpoint files
(tf.raw_ops.SaveV2, which takes the variable names verbatim) with the official names: raw weights,
different EMA copies, RMSProp slots and global_step, as a training run leaves them. Placement is
checked three ways: hand-written official names, an exact round trip, and logits of a TF forward
pass written here from the reference notes (it reads the official names directly, not our table).
"""

import jax
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from effnetv2_jax.models import create_model  # noqa: E402
from effnetv2_jax.porting import from_tf_checkpoint, to_tf_names  # noqa: E402
from effnetv2_jax.porting.tf_checkpoint import from_tf_variables  # noqa: E402
from _porting_fixtures import assert_same_tree, leaf_value, random_variables  # noqa: E402

BN = "tpu_batch_normalization"
SMALL_S = dict(stage_repeats=(2, 2, 1, 2, 1, 1))  # every S block layout, 9 blocks instead of 40


def _rename_classifier(tensors, model_name, layer):
  """The classifier under `layer` (e.g. 'head_1/dense', as the current main.py writes it)."""
  old = f"{model_name}/head/dense/"
  return {
    (f"{model_name}/{layer}/" + n[len(old) :]) if n.startswith(old) else n: v
    for n, v in tensors.items()
  }


def write_official_checkpoint(prefix, model_name, seed=0, classifier="head/dense", **overrides):
  """A checkpoint as official training leaves it; returns (raw variables, EMA variables)."""
  raw, specs, _ = random_variables(model_name, seed=seed, **overrides)
  ema, _, _ = random_variables(model_name, seed=seed + 100, **overrides)
  tensors = _rename_classifier(to_tf_names(raw, model_name, **overrides), model_name, classifier)
  ema_names = _rename_classifier(to_tf_names(ema, model_name, **overrides), model_name, classifier)
  for name, value in ema_names.items():
    tensors[name + "/ExponentialMovingAverage"] = value
    if not name.endswith(("moving_mean", "moving_variance")):
      tensors[name + "/RMSProp"] = np.ones_like(value)
      tensors[name + "/RMSProp_1"] = np.zeros_like(value)
  tensors["global_step"] = np.array(1234, np.int64)
  names = sorted(tensors)
  tf.raw_ops.SaveV2(
    prefix=str(prefix),
    tensor_names=names,
    shape_and_slices=[""] * len(names),
    tensors=[tf.constant(tensors[n]) for n in names],
  )
  return raw, ema, specs


def tf_logits(w, scope, specs, x):
  """EfficientNetV2 inference in TF ops, straight from the official names (reference, sec. 1 & 7)."""

  def bn(h, name):
    n = f"{scope}/{name}/"
    return (h - w[n + "moving_mean"]) / np.sqrt(w[n + "moving_variance"] + 1e-3) * w[
      n + "gamma"
    ] + w[n + "beta"]

  def conv(h, name, stride=1):
    return tf.nn.conv2d(h, w[f"{scope}/{name}/kernel"], stride, "SAME")

  h = tf.nn.silu(bn(conv(x, "stem/conv2d", 2), f"stem/{BN}"))
  for k, s in enumerate(specs):
    b, inputs, expand = f"blocks_{k}/", h, s.expand_ratio != 1
    if s.fused and expand:
      h = tf.nn.silu(bn(conv(h, b + "conv2d", s.stride), b + BN))
      h = bn(conv(h, b + "conv2d_1"), b + BN + "_1")
    elif s.fused:
      h = tf.nn.silu(bn(conv(h, b + "conv2d", s.stride), b + BN))
    else:
      if expand:
        h = tf.nn.silu(bn(conv(h, b + "conv2d"), b + BN))
      dw = w[f"{scope}/{b}depthwise_conv2d/depthwise_kernel"]
      h = tf.nn.depthwise_conv2d(h, dw, [1, s.stride, s.stride, 1], "SAME")
      h = tf.nn.silu(bn(h, b + (BN + "_1" if expand else BN)))
      se = tf.reduce_mean(h, [1, 2], keepdims=True)
      se = tf.nn.silu(conv(se, b + "se/conv2d") + w[f"{scope}/{b}se/conv2d/bias"])
      se = tf.sigmoid(conv(se, b + "se/conv2d_1") + w[f"{scope}/{b}se/conv2d_1/bias"])
      h = bn(
        conv(h * se, b + ("conv2d_1" if expand else "conv2d")),
        b + (BN + "_2" if expand else BN + "_1"),
      )
    if s.stride == 1 and s.in_filters == s.out_filters:
      h = h + inputs
  h = tf.reduce_mean(tf.nn.silu(bn(conv(h, "head/conv2d"), f"head/{BN}")), [1, 2])
  return (h @ w[f"{scope}/head/dense/kernel"] + w[f"{scope}/head/dense/bias"]).numpy()


@pytest.mark.parametrize(
  "name,overrides", [("efficientnetv2-b0", {}), ("efficientnetv2-s", SMALL_S)]
)
def test_ema_weights_give_the_official_forward_pass(tmp_path, name, overrides):
  _, ema, specs = write_official_checkpoint(tmp_path / "ckpt", name, **overrides)
  variables = from_tf_checkpoint(str(tmp_path / "ckpt"), name, **overrides)
  assert_same_tree(variables, ema)  # EMA copies, exactly, every array
  reader = tf.train.load_checkpoint(str(tmp_path / "ckpt"))
  official = {
    n[: -len("/ExponentialMovingAverage")]: reader.get_tensor(n)
    for n in reader.get_variable_to_shape_map()
    if n.endswith("/ExponentialMovingAverage")
  }
  x = np.random.default_rng(5).normal(0, 1, (2, 32, 32, 3)).astype(np.float32)
  expected = tf_logits(official, name, specs, x)
  model = create_model(name, num_classes=10, **overrides)
  got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)


def test_raw_weights_on_request(tmp_path):
  raw, _, _ = write_official_checkpoint(tmp_path / "ckpt", "efficientnetv2-b0", seed=2)
  assert_same_tree(
    from_tf_checkpoint(str(tmp_path / "ckpt"), "efficientnetv2-b0", use_ema=False), raw
  )


def test_official_names_of_every_s_block_layout():
  """Full S, in memory: official names spelled out by hand land in the right place."""
  raw, _, _ = random_variables("efficientnetv2-s", seed=4)
  w = {f"{n}/ExponentialMovingAverage": v for n, v in to_tf_names(raw, "efficientnetv2-s").items()}
  w.update({n[: -len("/ExponentialMovingAverage")]: v * 0 for n, v in w.items()})
  s = "efficientnetv2-s/"
  ema = lambda n: w[s + n + "/ExponentialMovingAverage"]
  assert ema("blocks_1/conv2d/kernel").shape == (3, 3, 24, 24)  # fused e1: the only conv
  assert ema("blocks_2/conv2d/kernel").shape == (3, 3, 24, 96)  # fused e4: expand ...
  assert ema("blocks_2/conv2d_1/kernel").shape == (1, 1, 96, 48)  # ... then project
  assert ema("blocks_10/conv2d/kernel").shape == (1, 1, 64, 256)  # MBConv: expand
  assert ema("blocks_10/depthwise_conv2d/depthwise_kernel").shape == (3, 3, 256, 1)
  assert ema("blocks_10/se/conv2d/kernel").shape == (1, 1, 256, 16)  # SE from the block input
  assert ema(f"blocks_39/{BN}_2/moving_variance").shape == (256,)
  assert ema("head/dense/kernel").shape == (1280, 10)
  v = from_tf_variables(w, "efficientnetv2-s")
  pairs = {
    "params/blocks_1/project/conv/kernel": "blocks_1/conv2d/kernel",
    "params/blocks_2/expand/bn/scale": f"blocks_2/{BN}/gamma",
    "batch_stats/blocks_2/project/bn/mean": f"blocks_2/{BN}_1/moving_mean",
    "params/blocks_10/dw/bn/bias": f"blocks_10/{BN}_1/beta",
    "params/blocks_10/se/expand/bias": "blocks_10/se/conv2d_1/bias",
    "params/blocks_10/project/conv/kernel": "blocks_10/conv2d_1/kernel",
    "batch_stats/blocks_39/project/bn/var": f"blocks_39/{BN}_2/moving_variance",
    "params/classifier/kernel": "head/dense/kernel",
  }
  for ours, official in pairs.items():
    collection, path = ours.split("/", 1)
    np.testing.assert_array_equal(leaf_value(v, collection, path), ema(official), err_msg=ours)
  np.testing.assert_array_equal(
    leaf_value(v, "params", "blocks_10/dw/conv/kernel")[:, :, 0],
    ema("blocks_10/depthwise_conv2d/depthwise_kernel")[..., 0],
  )


def test_checkpoint_of_the_current_main_py_with_head_1_classifier_converts(tmp_path):
  # TF1 name scoping: the classifier's second `name_scope('head')` becomes `head_1`.
  raw, ema, _ = write_official_checkpoint(
    tmp_path / "ckpt", "efficientnetv2-b0", seed=8, classifier="head_1/dense"
  )
  reader = tf.train.load_checkpoint(str(tmp_path / "ckpt"))
  stored = reader.get_variable_to_shape_map()
  assert "efficientnetv2-b0/head_1/dense/kernel/ExponentialMovingAverage" in stored
  assert not any("/head/dense/" in n for n in stored)
  converted = from_tf_checkpoint(str(tmp_path / "ckpt"), "efficientnetv2-b0")
  assert_same_tree(converted, ema)
  # The class count is read from head_1/dense/kernel too (10 here, not the default 1000).
  assert leaf_value(converted, "params", "classifier/kernel").shape == (1280, 10)
  assert_same_tree(
    from_tf_checkpoint(str(tmp_path / "ckpt"), "efficientnetv2-b0", use_ema=False), raw
  )
  # And through the converter that writes a checkpoint of this package.
  from effnetv2_jax.porting import convert

  summary = convert.convert(
    str(tmp_path / "ckpt"), "tf", "efficientnetv2-b0", str(tmp_path / "out")
  )
  assert summary["num_classes"] == 10 and summary["weights"] == "ema"


def test_missing_classifier_error_names_both_tried_names():
  raw, _, _ = random_variables("efficientnetv2-b0", seed=9)
  w = {n: v for n, v in to_tf_names(raw, "efficientnetv2-b0").items() if "/head/dense/" not in n}
  with pytest.raises(ValueError) as err:
    from_tf_variables(w, "efficientnetv2-b0", use_ema=False, num_classes=10)
  p = "efficientnetv2-b0/"
  for leaf in ("kernel", "bias"):
    needle = f"params/classifier/{leaf} <- none of {p}head/dense/{leaf}, {p}head_1/dense/{leaf}"
    assert needle in str(err.value), str(err.value)


def test_problems_are_reported_together():
  raw, _, _ = random_variables("efficientnetv2-b0", seed=6)
  w = {}
  for n, value in to_tf_names(raw, "efficientnetv2-b0").items():
    w[n], w[n + "/ExponentialMovingAverage"] = value, value
  p = "efficientnetv2-b0/"
  del w[p + f"blocks_5/{BN}_1/moving_mean/ExponentialMovingAverage"]  # EMA copy missing
  w[p + "blocks_7/conv2d/kernel/ExponentialMovingAverage"] = np.zeros((1, 1, 3, 3), np.float32)
  w[p + "blocks_30/conv2d/kernel"] = np.zeros((1,), np.float32)  # no such block in B0
  w["global_step"] = np.array(3)
  with pytest.raises(ValueError) as err:
    from_tf_variables(w, "efficientnetv2-b0")
  text = str(err.value)
  for needle in (
    f"missing (1): batch_stats/blocks_5/dw/bn/mean <- {p}blocks_5/{BN}_1/moving_mean",
    "shape mismatch (1)",
    "blocks_7/conv2d/kernel",
    "unexpected (2)",
    f"{p}blocks_30/conv2d/kernel (no EMA copy)",
    f"{p}blocks_5/{BN}_1/moving_mean (no EMA copy)",
  ):
    assert needle in text, text
  assert "global_step" not in text


def test_checkpoint_without_ema_copies_says_how_to_load_it(tmp_path):
  raw, _, _ = random_variables("efficientnetv2-b0", seed=7)
  w = to_tf_names(raw, "efficientnetv2-b0")
  with pytest.raises(ValueError, match="use_ema=False"):
    from_tf_variables(w, "efficientnetv2-b0")
  assert_same_tree(from_tf_variables(w, "efficientnetv2-b0", use_ema=False), raw)


def test_directory_with_checkpoint_state_file(tmp_path):
  _, ema, _ = write_official_checkpoint(tmp_path / "model.ckpt-1234", "efficientnetv2-b0")
  (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-1234"\n')
  assert_same_tree(from_tf_checkpoint(str(tmp_path), "efficientnetv2-b0"), ema)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no TF checkpoint"):
    from_tf_checkpoint(str(tmp_path / "empty"), "efficientnetv2-b0")

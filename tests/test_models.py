"""Model registry, exact parameter counts, precision and regularization properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from effnetv2_jax.models import count_macs, count_params, create_model, list_models, model_defaults
from effnetv2_jax.models.effnetv2 import build_block_specs, parse_block_string, round_filters
from effnetv2_jax.models.layers import DropPath

# Trainable parameters, 1000 classes: official effnetv2_model_test.py (V2), official EfficientNet
# (V1) and torchvision (ResNet).
EXPECTED_PARAMS = {
  "efficientnetv2-b0": 7_139_704,
  "efficientnetv2-b1": 8_141_052,
  "efficientnetv2-b2": 10_096_086,
  "efficientnetv2-b3": 14_358_406,
  "efficientnetv2-s": 21_458_488,
  "efficientnetv2-m": 54_139_356,
  "efficientnetv2-l": 118_515_272,
  "efficientnetv2-xl": 208_119_808,
  "efficientnet-b0": 5_288_548,
  "efficientnet-b7": 66_347_960,
  "resnet50": 25_557_032,
  "resnet152": 60_192_808,
}
# Block counts from the reference table (S 40, M 57, L 79, XL 100; B0-B3 21/27/28/32).
EXPECTED_BLOCKS = {
  "efficientnetv2-b0": 21,
  "efficientnetv2-b1": 27,
  "efficientnetv2-b2": 28,
  "efficientnetv2-b3": 32,
  "efficientnetv2-s": 40,
  "efficientnetv2-m": 57,
  "efficientnetv2-l": 79,
  "efficientnetv2-xl": 100,
}


def abstract_init(model, size=32, channels=3):
  x = jnp.zeros((1, size, size, channels))
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_trainable_param_count_is_exact(name):
  assert count_params(abstract_init(create_model(name))) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_BLOCKS))
def test_block_count_matches_table(name):
  params = abstract_init(create_model(name))["params"]
  assert sum(k.startswith("blocks_") for k in params) == EXPECTED_BLOCKS[name]


def test_registry_lists_all_families_and_rejects_unknown_names():
  names = list_models()
  for n in [
    "efficientnetv2-b0",
    "efficientnetv2-xl",
    "efficientnet-b0",
    "efficientnet-b7",
    "resnet50",
    "resnet152",
  ]:
    assert n in names
  with pytest.raises(ValueError, match="Did you mean 'efficientnetv2-s'"):
    create_model("efficientnetv2_s")
  with pytest.raises(ValueError, match="does not accept"):
    create_model("efficientnetv2-s", dropout=0.1)
  with pytest.raises(ValueError, match="depthwise_impl"):
    create_model("efficientnetv2-s", depthwise_impl="fast")
  assert model_defaults("efficientnetv2-s") == dict(train_size=300, eval_size=384, dropout_rate=0.2)


def test_param_names_are_the_documented_scheme():
  p = abstract_init(create_model("efficientnetv2-s"))["params"]
  assert set(p["stem"]) == {"conv", "bn"} and set(p["head"]) == {"conv", "bn"}
  assert set(p["classifier"]) == {"kernel", "bias"}
  assert set(p["blocks_0"]) == {"project"}  # fused e=1
  assert set(p["blocks_2"]) == {"expand", "project"}  # fused e=4
  assert set(p["blocks_10"]) == {"expand", "dw", "se", "project"}  # MBConv + SE
  assert p["blocks_10"]["dw"]["conv"]["kernel"].shape == (3, 3, 1, 256)
  assert p["blocks_10"]["se"]["reduce"]["kernel"].shape == (1, 1, 256, 16)  # SE on input width 64
  r = abstract_init(create_model("resnet50"))["params"]
  assert set(r["layer1_0"]) == {"conv1", "conv2", "conv3", "downsample"} and "fc" in r


def test_block_strings_parse_and_reject_garbage():
  assert parse_block_string("r2_k3_s1_e1_i24_o24_c1") == (2, 3, 1, 1, 24, 24, 0.0, True)
  assert parse_block_string("r3_k5_s22_e6_i40_o80_se0.25") == (3, 5, 2, 6, 40, 80, 0.25, False)
  with pytest.raises(ValueError, match="bad token"):
    parse_block_string("r2_k3_x1_e1_i24_o24")
  with pytest.raises(ValueError, match="lacks"):
    parse_block_string("r2_k3_e1_i24_o24")
  with pytest.raises(ValueError, match="previous stage"):
    build_block_specs(["r1_k3_s1_e1_i24_o24_c1", "r1_k3_s2_e4_i32_o48_c1"])


def test_v1_rounding_has_the_ten_percent_guard_and_v2_does_not():
  assert round_filters(11, 1.0) == 8  # V2: plain rounding
  assert round_filters(11, 1.0, round_down_guard=True) == 16  # V1: 8 < 0.9 * 11, add 8 back
  assert round_filters(32, 1.2) == 40 and round_filters(1280, 1.1) == 1408


# A small network with every block kind (fused e=1, fused e=4, MBConv+SE) keeps compiles short.
TINY = dict(
  blocks=["r1_k3_s1_e1_i16_o16_c1", "r1_k3_s2_e4_i16_o32_c1", "r2_k3_s2_e4_i32_o64_se0.25"],
  head_filters=128,
)


def key(seed):
  # XLA:CPU takes ~6x longer to compile threefry than the 'rbg' generator; the values don't matter.
  return jax.random.key(seed, impl="rbg")


def jit_init(model, x):
  return jax.jit(lambda k, x: model.init(k, x))(key(0), x)


def jit_train(model, v, x, seed):
  f = jax.jit(
    lambda v, x, k: model.apply(v, x, train=True, rngs={"dropout": k}, mutable=["batch_stats"])
  )
  return f(v, x, key(seed))


def test_initializers_follow_the_official_code():
  model = create_model("efficientnetv2-b0", **TINY)
  v = jit_init(model, jnp.zeros((1, 16, 16, 3)))
  p = v["params"]
  k = np.asarray(p["blocks_3"]["project"]["conv"]["kernel"])  # 1x1, 256 -> 64
  assert abs(k.std() - np.sqrt(2 / 64)) < 0.05 * np.sqrt(2 / 64)
  dw = np.asarray(p["blocks_3"]["dw"]["conv"]["kernel"])  # fan_out = 3*3*1
  assert abs(dw.std() - np.sqrt(2 / 9)) < 0.07 * np.sqrt(2 / 9)
  fc = np.asarray(p["classifier"]["kernel"])
  assert np.abs(fc).max() <= 1 / np.sqrt(1000) and np.abs(fc).max() > 0.9 / np.sqrt(1000)
  assert not np.any(np.asarray(p["classifier"]["bias"]))
  bs = v["batch_stats"]["stem"]["bn"]
  assert np.all(np.asarray(bs["mean"]) == 0) and np.all(np.asarray(bs["var"]) == 1)


def test_bfloat16_compute_keeps_params_and_batch_stats_float32_and_logits_float32():
  model = create_model("efficientnetv2-b0", num_classes=10, dtype=jnp.bfloat16, **TINY)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  v = jit_init(model, x)
  assert {a.dtype for a in jax.tree_util.tree_leaves(v)} == {jnp.dtype(jnp.float32)}
  logits, upd = jit_train(model, v, x, 2)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
  assert {a.dtype for a in jax.tree_util.tree_leaves(upd)} == {jnp.dtype(jnp.float32)}
  # The statistics moved (training-mode BN), by the 0.1 share of momentum 0.9.
  batch_mean = np.asarray(upd["batch_stats"]["stem"]["bn"]["mean"]) / 0.1
  assert np.abs(batch_mean).max() > 1e-3
  assert jax.jit(model.apply)(v, x).dtype == jnp.float32


def test_drop_path_drops_whole_samples_and_is_identity_at_eval():
  x = jnp.ones((256, 4, 4, 8))
  layer = DropPath(0.5)
  y = np.asarray(layer.apply({}, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)}))
  per_sample = y.reshape(256, -1)
  # Element-wise dropout would mix 0 and 2 inside a sample; drop-path keeps or drops it whole.
  assert np.all(per_sample.min(1) == per_sample.max(1))
  assert set(np.unique(per_sample)) == {0.0, 2.0}
  assert 0.3 < (per_sample[:, 0] == 0).mean() < 0.7
  assert np.array_equal(np.asarray(layer.apply({}, x, train=False)), np.asarray(x))


def test_drop_path_rate_is_linear_in_block_index():
  model = create_model("efficientnetv2-s", drop_path_rate=0.3)
  rates = {}

  def record(next_fun, args, kwargs, ctx):
    if isinstance(ctx.module, DropPath):
      rates[ctx.module.scope.path[0]] = ctx.module.rate
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    abstract_init(model)
  assert rates["blocks_0"] == 0.0  # S's first block has a residual
  assert rates["blocks_39"] == pytest.approx(0.3 * 39 / 40)
  assert "blocks_2" not in rates  # stride 2: no residual, no drop-path


def test_train_mode_regularization_depends_on_rng_and_eval_does_not():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  noisy = create_model(
    "efficientnetv2-b0", num_classes=5, dropout_rate=0.0, drop_path_rate=0.9, **TINY
  )
  v = jit_init(noisy, x)
  assert not np.allclose(jit_train(noisy, v, x, 0)[0], jit_train(noisy, v, x, 1)[0])
  quiet = create_model(
    "efficientnetv2-b0", num_classes=5, dropout_rate=0.0, drop_path_rate=0.0, **TINY
  )
  np.testing.assert_allclose(jit_train(quiet, v, x, 0)[0], jit_train(quiet, v, x, 1)[0], atol=1e-6)
  evaluate = jax.jit(lambda v, x, k: noisy.apply(v, x, rngs={"dropout": k}))
  np.testing.assert_array_equal(evaluate(v, x, key(0)), evaluate(v, x, key(1)))


def test_a_new_variant_is_defined_purely_from_config_values():
  """A tiny Fashion-MNIST model: lists (as ml_collections gives them), grayscale 28x28."""
  model = create_model(
    "efficientnetv2-b0",
    num_classes=10,
    blocks=["r1_k3_s1_e1_i16_o16_c1", "r2_k3_s2_e4_i16_o32_c1", "r2_k3_s2_e4_i32_o64_se0.25"],
    width_mult=0.5,
    stage_repeats=[1, 1, 3],
    head_filters=128,
    dropout_rate=0.1,
  )
  assert isinstance(model.blocks, tuple) and hash(model.stage_repeats)
  x = jnp.zeros((2, 28, 28, 1))
  v = jit_init(model, x)
  p = v["params"]
  assert sum(k.startswith("blocks_") for k in p) == 5
  assert p["stem"]["conv"]["kernel"].shape == (3, 3, 1, 8)  # 16 * 0.5
  assert p["head"]["conv"]["kernel"].shape == (1, 1, 32, 128)
  assert jax.jit(model.apply)(v, x).shape == (2, 10)


def test_stem_stride_one_keeps_full_resolution_at_four_times_the_macs():
  """`stem_stride=1` (tiny images): same parameters, every later feature map 2x larger per side."""
  tiny = dict(blocks=("r1_k3_s1_e1_i8_o8_c1", "r1_k3_s2_e4_i8_o16_se0.25"), head_filters=32)
  x = jnp.zeros((1, 28, 28, 3))
  inter = {}
  for stride in (2, 1):
    model = create_model("efficientnetv2-b0", num_classes=10, stem_stride=stride, **tiny)
    v = jit_init(model, x)
    _, state = model.apply(v, x, capture_intermediates=lambda mdl, _: mdl.name == "head")
    inter[stride] = (
      count_params(v),
      state["intermediates"]["head"]["__call__"][0].shape,
      count_macs("efficientnetv2-b0", 28, num_classes=10, stem_stride=stride, **tiny),
    )
  assert inter[1][0] == inter[2][0]
  assert inter[2][1] == (1, 7, 7, 32) and inter[1][1] == (1, 14, 14, 32)
  assert 3.5 < inter[1][2] / inter[2][2] < 4.5


@pytest.mark.parametrize(
  "name,overrides",
  [
    ("efficientnet-b0", dict(stage_repeats=[1] * 7, width_mult=0.25)),  # keeps the 5x5 stages
    ("resnet50", dict(depths=[1, 1, 1, 1])),
  ],
)
def test_baselines_run_forward_and_train(name, overrides):
  model = create_model(name, num_classes=3, drop_path_rate=0.1, **overrides)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  v = jit_init(model, x)
  logits, upd = jit_train(model, v, x, 2)
  assert logits.shape == (2, 3) and np.all(np.isfinite(logits))
  assert set(upd) == {"batch_stats"}


def test_models_and_porting_never_import_tensorflow():
  """House rule: TF lives under data/ only, so synthetic-data benchmarks run where TF is absent."""
  import subprocess
  import sys

  code = (
    'import sys, effnetv2_jax.models as m, effnetv2_jax.porting; m.count_macs("efficientnetv2-b0", 64); '
    'bad = [n for n in sys.modules if n.split(".")[0] in ("tensorflow", "keras")]; '
    "assert not bad, bad"
  )
  subprocess.run([sys.executable, "-c", code], check=True)

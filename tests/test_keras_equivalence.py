"""Same weights, same logits as keras.applications' EfficientNetV2 (inference mode, fp32).

Keras' BN statistics start at mean 0 / variance 1 and its biases at 0, which would hide mistakes in
BN (epsilon, which statistic goes where) and in the SE biases; every such weight is randomized first.
"""

import time

import jax
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from effnetv2_jax.models import create_model  # noqa: E402
from effnetv2_jax.porting import from_keras  # noqa: E402

KERAS_MODELS = {
  "efficientnetv2-b0": "EfficientNetV2B0",
  "efficientnetv2-b1": "EfficientNetV2B1",
  "efficientnetv2-b2": "EfficientNetV2B2",
  "efficientnetv2-b3": "EfficientNetV2B3",
  "efficientnetv2-s": "EfficientNetV2S",
  "efficientnetv2-m": "EfficientNetV2M",
  "efficientnetv2-l": "EfficientNetV2L",
}
SIZE = 64


def randomized_keras_model(name, seed=0):
  model = getattr(keras.applications, KERAS_MODELS[name])(
    weights=None,
    include_preprocessing=False,
    classifier_activation=None,
    input_shape=(SIZE, SIZE, 3),
  )
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      c = layer.gamma.shape[0]
      layer.set_weights(
        [
          rng.uniform(0.4, 1.0, c),
          rng.normal(0, 0.2, c),
          rng.normal(0, 0.2, c),
          rng.uniform(1.0, 3.0, c),
        ]
      )
    elif layer.name == "predictions":
      k, b = layer.get_weights()
      # Larger than the official init so logits are O(1) and a 1e-4 tolerance means something.
      layer.set_weights(
        [rng.normal(0, 1 / np.sqrt(k.shape[0]), k.shape) * 4, rng.normal(0, 0.1, b.shape)]
      )
    elif getattr(layer, "use_bias", False) and layer.weights:
      k, b = layer.get_weights()
      layer.set_weights([k, rng.normal(0, 0.2, b.shape)])
  return model


def images(seed=1):
  return np.random.default_rng(seed).normal(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)


@pytest.mark.parametrize("name", list(KERAS_MODELS))
def test_logits_match_keras(name):
  t0 = time.time()
  kmodel = randomized_keras_model(name)
  x = images()
  expected = np.asarray(kmodel(x, training=False))
  variables = from_keras(kmodel, name)
  model = create_model(name)
  got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
  print(
    name,
    "max |logit|",
    np.abs(expected).max(),
    "diff",
    np.abs(got - expected).max(),
    f"{time.time() - t0:.1f}s",
  )
  assert np.abs(expected).max() > 0.3 and expected.std() > 0.1  # the comparison is not trivial
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_comparison_would_catch_a_bn_epsilon_mistake():
  """Negative control: the PyTorch-default epsilon (1e-5) moves logits several times the tolerance."""
  name = "efficientnetv2-b0"
  kmodel = randomized_keras_model(name)
  x = images()
  expected = np.asarray(kmodel(x, training=False))
  variables = from_keras(kmodel, name)
  wrong_eps = create_model(name, bn_epsilon=1e-5)
  got = np.asarray(jax.jit(lambda v, x: wrong_eps.apply(v, x))(variables, x))
  assert np.abs(got - expected).max() > 4e-4
  # And the XLA depthwise path agrees with Keras just as the default (shift on CPU) one does.
  xla = create_model(name, depthwise_impl="xla")
  got = np.asarray(jax.jit(lambda v, x: xla.apply(v, x))(variables, x))
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_from_keras_reports_every_mismatch_instead_of_a_partial_result():
  kmodel = randomized_keras_model("efficientnetv2-b0")
  with pytest.raises(ValueError) as err:
    from_keras(kmodel, "efficientnetv2-b1")  # B1 has more blocks than the Keras B0
  assert "missing" in str(err.value) and "block1b_" in str(err.value)
  with pytest.raises(ValueError, match="shape mismatch"):
    from_keras(kmodel, "efficientnetv2-b0", width_mult=1.1)

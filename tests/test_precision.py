"""`config.dtype='auto'` (effnetv2_jax/precision.py): bfloat16 compute on TPU/GPU, float32 on CPU."""

import jax
import jax.numpy as jnp
import pytest

from configs import default
from effnetv2_jax import config_validation as cv
from effnetv2_jax import precision, train


@pytest.mark.parametrize(
  "backend,expected",
  [("tpu", "bfloat16"), ("gpu", "bfloat16"), ("cuda", "bfloat16"), ("cpu", "float32")],
)
def test_auto_is_bfloat16_on_accelerators_and_float32_on_cpu(backend, expected):
  assert precision.resolve_dtype("auto", backend=backend) == expected


def test_explicit_names_pass_through_and_auto_follows_this_machine():
  for name in ("float32", "bfloat16"):
    assert precision.resolve_dtype(name, backend="tpu") == name
    assert precision.resolve_dtype(name, backend="cpu") == name
  expected = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  assert precision.resolve_dtype("auto") == expected
  with pytest.raises(ValueError, match="dtype"):
    precision.resolve_dtype("float16")


def test_validation_accepts_auto_and_the_trainer_builds_the_resolved_dtype():
  c = default.get_config()
  c.dtype = "auto"
  c.num_train_steps = 100
  cv.validate_config(c, num_devices=1, check_dataset=False)
  model = train.build_model(c, 10, 0.0)
  assert model.dtype == train.DTYPES[precision.resolve_dtype("auto")]
  assert jnp.dtype(model.dtype) == jnp.dtype(precision.resolve_dtype("auto"))

"""The shifted multiply-add depthwise conv equals XLA's grouped convolution, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effnetv2_jax.models.layers import depthwise_conv, resolve_depthwise_impl, same_padding


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_shift_matches_xla_in_value_and_gradients(size, stride, kernel_size):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(size * 100 + stride * 10 + kernel_size), 3)
  x = jax.random.normal(kx, (2, size, size + 1, 6))  # non-square: H and W padded apart
  w = jax.random.normal(kw, (kernel_size, kernel_size, 1, 6))
  out_shape = (2, -(-size // stride), -(-(size + 1) // stride), 6)
  g = jax.random.normal(kg, out_shape)

  def loss(impl):
    return lambda x, w: jnp.sum(depthwise_conv(x, w, stride, impl) * g)

  y_shift = depthwise_conv(x, w, stride, "shift")
  y_xla = depthwise_conv(x, w, stride, "xla")
  assert y_shift.shape == out_shape
  np.testing.assert_allclose(y_shift, y_xla, rtol=1e-5, atol=1e-5)
  gx_s, gw_s = jax.grad(loss("shift"), argnums=(0, 1))(x, w)
  gx_x, gw_x = jax.grad(loss("xla"), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(gx_s, gx_x, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(gw_s, gw_x, rtol=1e-5, atol=1e-4)


def test_padding_is_tf_same_with_the_extra_pixel_at_the_end():
  assert same_padding(8, 3, 2) == ((0, 1), 4)  # TF puts the odd pixel bottom/right
  assert same_padding(7, 3, 2) == ((1, 1), 4)
  assert same_padding(7, 3, 1) == ((1, 1), 7)
  assert same_padding(8, 5, 2) == ((1, 2), 4)
  # A one-hot input shows where the kernel lands: at stride 2 on an even size, output pixel 0
  # sees input rows/cols 0..1 (no padding before), which symmetric padding would get wrong.
  x = jnp.zeros((1, 8, 8, 1)).at[0, 0, 0, 0].set(1.0)
  w = jnp.arange(1.0, 10.0).reshape(3, 3, 1, 1)
  y = depthwise_conv(x, w, 2, "shift")
  assert float(y[0, 0, 0, 0]) == 1.0  # tap (0, 0) hits input (0, 0); symmetric would give 5


def test_bfloat16_stays_bfloat16():
  x = jnp.ones((1, 6, 6, 4), jnp.bfloat16)
  w = jnp.ones((3, 3, 1, 4), jnp.bfloat16)
  assert depthwise_conv(x, w, 1, "shift").dtype == jnp.bfloat16


def test_auto_picks_shift_on_cpu_and_rejects_unknown():
  expected = "shift" if jax.default_backend() == "cpu" else "xla"
  assert resolve_depthwise_impl("auto") == expected
  with pytest.raises(ValueError, match="depthwise_impl"):
    resolve_depthwise_impl("cudnn")

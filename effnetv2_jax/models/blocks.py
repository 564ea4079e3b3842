"""MBConv and Fused-MBConv, as in the official EfficientNetV2 code (effnetv2_model.py).

Child names (each a ConvBNAct with `conv` and `bn` inside, see layers.py):
  MBConv:            expand (1x1, only if expand_ratio != 1), dw (depthwise kxk, stride), se, project (1x1)
  FusedMBConv e != 1: expand (kxk, stride), se (never used by the published configs), project (1x1)
  FusedMBConv e == 1: project (kxk, stride, WITH activation: there is no expand conv to carry it)
The residual (with per-sample drop-path) exists only when stride == 1 and in == out.
"""

from typing import Any, Callable

import jax.numpy as jnp
from flax import linen as nn

from effnetv2_jax.models.layers import ConvBNAct, DropPath, SqueezeExcite

Dtype = Any


class _BlockBase(nn.Module):
  in_filters: int
  out_filters: int
  kernel_size: int = 3
  strides: int = 1
  expand_ratio: int = 1
  se_filters: int = 0  # width of the SE bottleneck; 0 = no SE
  drop_path_rate: float = 0.0  # this block's own rate (already scaled by its depth index)
  act: Callable = nn.swish
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-3
  depthwise_impl: str = "auto"
  bn_group_size: int = 0  # images per BN statistic in training; 0 = the whole batch
  dtype: Dtype = jnp.float32

  def conv(self, features, kernel_size=1, strides=1, act=True, depthwise=False, name=None):
    return ConvBNAct(
      features,
      kernel_size,
      strides,
      act=self.act if act else None,
      depthwise=depthwise,
      bn_momentum=self.bn_momentum,
      bn_epsilon=self.bn_epsilon,
      depthwise_impl=self.depthwise_impl,
      bn_group_size=self.bn_group_size,
      dtype=self.dtype,
      name=name,
    )

  @property
  def has_residual(self) -> bool:
    return self.strides == 1 and self.in_filters == self.out_filters

  def residual(self, x, inputs, train):
    if not self.has_residual:
      return x
    return DropPath(self.drop_path_rate, name="drop_path")(x, train) + inputs

  def squeeze_excite(self, x):
    if self.se_filters <= 0:
      return x
    return SqueezeExcite(self.se_filters, act=self.act, dtype=self.dtype, name="se")(x)


class MBConv(_BlockBase):
  """Inverted bottleneck: 1x1 expand -> depthwise kxk -> SE -> 1x1 project (linear)."""

  @nn.compact
  def __call__(self, inputs, train: bool = False):
    hidden = self.in_filters * self.expand_ratio
    x = inputs
    if self.expand_ratio != 1:
      x = self.conv(hidden, name="expand")(x, train)
    x = self.conv(hidden, self.kernel_size, self.strides, depthwise=True, name="dw")(x, train)
    x = self.squeeze_excite(x)
    x = self.conv(self.out_filters, act=False, name="project")(x, train)
    return self.residual(x, inputs, train)


class FusedMBConv(_BlockBase):
  """Expand and depthwise fused into one full kxk conv -> (SE) -> 1x1 project (linear)."""

  @nn.compact
  def __call__(self, inputs, train: bool = False):
    if self.expand_ratio != 1:
      x = self.conv(
        self.in_filters * self.expand_ratio, self.kernel_size, self.strides, name="expand"
      )(inputs, train)
      x = self.squeeze_excite(x)
      x = self.conv(self.out_filters, act=False, name="project")(x, train)
    else:
      x = self.squeeze_excite(inputs)
      x = self.conv(self.out_filters, self.kernel_size, self.strides, act=True, name="project")(
        x, train
      )
    return self.residual(x, inputs, train)

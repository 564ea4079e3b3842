"""ResNet-50/152 v1.5 (stride in the 3x3 conv, as torchvision): the paper also trains these progressively.

Parameter names mirror torchvision so a converter is a table lookup:
  stem/{conv,bn}                       (conv1, bn1)
  layer<s>_<j>/{conv1,conv2,conv3}/{conv,bn}, layer<s>_<j>/downsample/{conv,bn}   (layer<s>.<j>...)
  fc/{kernel,bias}
Padding is symmetric like torchvision (so its weights port), not TF-SAME. Defaults: BN momentum 0.9
(Flax semantics, = PyTorch 0.1), epsilon 1e-5; the optional drop-path follows the EfficientNet rule.
"""

from typing import Any, Tuple

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from effnetv2_jax.models.layers import ConvBNAct, DropPath, norm_options

Dtype = Any
RESNET_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet152": (3, 8, 36, 3)}
RESNET_STAGE_WIDTHS = (64, 128, 256, 512)  # bottleneck width; the block outputs 4x this
EXPANSION = 4


def _fc_kernel_init(key, shape, dtype=jnp.float32):
  """uniform(+-1/sqrt(fan_in)), torchvision's nn.Linear default."""
  limit = 1.0 / np.sqrt(shape[0])
  return nn.initializers.uniform(2 * limit)(key, shape, dtype) - limit


def _pad(k: int):
  return ((k // 2, k // 2), (k // 2, k // 2))


class Bottleneck(nn.Module):
  width: int
  strides: int = 1
  drop_path_rate: float = 0.0
  zero_init_residual: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_group_size: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs, train: bool = False):
    conv = lambda f, k, s, name, act=nn.relu, **kw: ConvBNAct(
      f,
      k,
      s,
      act=act,
      padding=_pad(k),
      bn_momentum=self.bn_momentum,
      bn_epsilon=self.bn_epsilon,
      bn_group_size=self.bn_group_size,
      dtype=self.dtype,
      name=name,
      **kw,
    )
    out = self.width * EXPANSION
    x = conv(self.width, 1, 1, "conv1")(inputs, train)
    x = conv(self.width, 3, self.strides, "conv2")(x, train)
    # Zero-init of the last BN scale (Goyal et al.) makes each block start as the identity.
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    x = conv(out, 1, 1, "conv3", act=None, bn_scale_init=last_scale)(x, train)
    shortcut = inputs
    if self.strides != 1 or inputs.shape[-1] != out:
      shortcut = conv(out, 1, self.strides, "downsample", act=None)(inputs, train)
    x = DropPath(self.drop_path_rate, name="drop_path")(x, train)
    return nn.relu(x + shortcut)


class ResNet(nn.Module):
  depths: Tuple[int, ...] = RESNET_DEPTHS["resnet50"]
  num_classes: int = 1000
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  zero_init_residual: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  depthwise_impl: str = "auto"  # accepted for a uniform create_model interface; ResNet has none
  bn_group_size: int = 0  # images per BatchNorm statistic in training; 0 = the whole batch
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    norm = norm_options(self)
    x = images.astype(self.dtype)
    x = ConvBNAct(64, 7, 2, act=nn.relu, padding=_pad(7), name="stem", **norm)(x, train)
    x = nn.max_pool(x, (3, 3), (2, 2), padding=_pad(3))
    total, k = sum(self.depths), 0
    for s, (depth, width) in enumerate(zip(self.depths, RESNET_STAGE_WIDTHS)):
      for j in range(depth):
        x = Bottleneck(
          width,
          2 if (j == 0 and s > 0) else 1,
          drop_path_rate=self.drop_path_rate * k / total,
          zero_init_residual=self.zero_init_residual,
          name=f"layer{s + 1}_{j}",
          **norm,
        )(x, train)
        k += 1
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=jnp.float32, kernel_init=_fc_kernel_init, name="fc")(x)

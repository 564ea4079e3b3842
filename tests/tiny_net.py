"""A tiny Flax model with the calling convention of `effnetv2_jax.models` (Conv, BN, Dropout,
Dense), so the training-core tests are fast and independent of the real models."""

import flax.linen as nn
import jax.numpy as jnp

from effnetv2_jax.models.layers import bn_module


class TinyNet(nn.Module):
  num_classes: int = 10
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  bn_group_size: int = 0  # as the real models: images per BN statistic in training, 0 = all

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), strides=2, use_bias=False, dtype=self.dtype)(x)
    # Flax momentum = TF decay 0.9, eps 1e-3 as in the official models.
    x = bn_module(
      train, self.bn_group_size, momentum=0.9, epsilon=1e-3, dtype=self.dtype, name="BatchNorm_0"
    )(x)
    x = nn.silu(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)

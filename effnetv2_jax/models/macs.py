"""Multiply-add counting by shape tracing: exact for whatever architecture a module builds.

`jax.eval_shape` runs the model abstractly (no FLOPs, no memory), while a Flax method interceptor
records every conv, depthwise conv and dense layer with its input/output shapes. MACs per layer:
  conv:      H_out * W_out * kh * kw * (C_in / groups) * C_out   (1x1 PointwiseConv alike)
  depthwise: H_out * W_out * kh * kw * C
  dense:     C_in * C_out
This is the convention of the official figures (TF profiler multiply-adds of convs and matmuls);
batch norm, activations, pooling and the SE gate multiply are elementwise and not counted.
"""

from typing import Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from effnetv2_jax.models.layers import DepthwiseConv, PointwiseConv


def trace_macs(model: nn.Module, image_size: int, channels: int = 3) -> List[Tuple[str, int]]:
  """[(module path, MACs)] for one image of image_size x image_size, in call order."""
  records = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    if context.method_name != "__call__" or not isinstance(
      mod, (nn.Conv, nn.Dense, DepthwiseConv, PointwiseConv)
    ):
      return out
    x = args[0]
    path = "/".join(mod.scope.path)
    if isinstance(mod, nn.Dense):
      macs = int(np.prod(x.shape[1:])) * mod.features
    elif isinstance(mod, DepthwiseConv):
      macs = int(np.prod(out.shape[1:])) * mod.kernel_size**2
    elif isinstance(mod, PointwiseConv):
      macs = int(np.prod(out.shape[1:])) * x.shape[-1]
    else:
      kh, kw = mod.kernel_size
      cin = x.shape[-1] // mod.feature_group_count
      macs = int(np.prod(out.shape[1:])) * kh * kw * cin
    records.append((path, macs))
    return out

  images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
  return records


def macs_of(model: nn.Module, image_size: int) -> int:
  return sum(m for _, m in trace_macs(model, image_size))


def macs_by_top_module(model: nn.Module, image_size: int) -> Dict[str, int]:
  """MACs grouped by top-level child (stem, blocks_k, head, classifier): for tables and debugging."""
  totals: Dict[str, int] = {}
  for path, m in trace_macs(model, image_size):
    top = path.split("/")[0]
    totals[top] = totals.get(top, 0) + m
  return totals

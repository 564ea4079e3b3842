"""Model registry: EfficientNetV2 B0-B3/S/M/L/XL, EfficientNet B0-B7, ResNet-50/152.

  model = create_model('efficientnetv2-s', num_classes=1000, dtype=jnp.bfloat16, dropout_rate=0.3)
  variables = model.init(rng, images_nhwc, train=False)        # {'params', 'batch_stats'}, float32
  logits = model.apply(variables, images, train=False)         # [B, num_classes] float32
  logits, upd = model.apply(variables, images, train=True, rngs={'dropout': key},
                            mutable=['batch_stats'])

Overrides (plain python values from configs are fine; lists become tuples):
  all families:  dropout_rate, drop_path_rate, bn_momentum, bn_epsilon, depthwise_impl,
                 bn_group_size (images per BatchNorm statistic in training, 0 = the whole batch;
                 the trainer passes `config.bn_group_size`, see layers.GroupedBatchNorm)
  EfficientNets: blocks (block strings), width_mult, depth_mult, stage_repeats (exact block count per
                 stage), stem_filters, stem_stride, head_filters, remat (rematerialize blocks: less memory, more
                 compute; set `model_overrides.remat=True` in a config)
  ResNets:       depths (blocks per stage), zero_init_residual
Parameter names: see effnetv2.py (EfficientNets) and resnet.py.
"""

import difflib
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from effnetv2_jax.models.effnetv1 import V1_VARIANTS, efficientnet_v1
from effnetv2_jax.models.effnetv2 import DROP_PATH_RATE, V2_VARIANTS, EfficientNet
from effnetv2_jax.models.layers import DEPTHWISE_IMPLS, depthwise_conv
from effnetv2_jax.models.macs import macs_of
from effnetv2_jax.models.resnet import RESNET_DEPTHS, ResNet

__all__ = [
  "create_model",
  "list_models",
  "count_macs",
  "count_params",
  "model_defaults",
  "depthwise_conv",
  "DEPTHWISE_IMPLS",
]

_COMMON = (
  "dropout_rate",
  "drop_path_rate",
  "bn_momentum",
  "bn_epsilon",
  "depthwise_impl",
  "bn_group_size",
)
_EFFNET = _COMMON + (
  "blocks",
  "width_mult",
  "depth_mult",
  "stage_repeats",
  "stem_filters",
  "stem_stride",
  "head_filters",
  "remat",
)
_RESNET = _COMMON + ("depths", "zero_init_residual")
_TUPLE_FIELDS = ("blocks", "stage_repeats", "depths")


def _efficientnet_v2(name, **kw):
  v = V2_VARIANTS[name]
  kw.setdefault("blocks", v.blocks)
  kw.setdefault("width_mult", v.width_mult)
  kw.setdefault("depth_mult", v.depth_mult)
  kw.setdefault("dropout_rate", v.dropout_rate)
  kw.setdefault("drop_path_rate", DROP_PATH_RATE)
  return EfficientNet(**kw)


def _resnet(name, **kw):
  kw.setdefault("depths", RESNET_DEPTHS[name])
  return ResNet(**kw)


# name -> (builder, accepted overrides)
_REGISTRY: Dict[str, tuple] = {}
_REGISTRY.update({n: (_efficientnet_v2, _EFFNET) for n in V2_VARIANTS})
_REGISTRY.update({n: (efficientnet_v1, _EFFNET) for n in V1_VARIANTS})
_REGISTRY.update({n: (_resnet, _RESNET) for n in RESNET_DEPTHS})


def list_models() -> List[str]:
  return list(_REGISTRY)


def _check_name(name: str):
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown model {name!r}.{hint} Known models: {', '.join(_REGISTRY)}")


def _normalize(value: Any) -> Any:
  """Config values -> hashable module attributes (ml_collections hands us lists)."""
  if isinstance(value, (list, tuple)):
    return tuple(_normalize(v) for v in value)
  if isinstance(value, np.generic):
    return value.item()
  return value


def create_model(
  name: str, *, num_classes: int = 1000, dtype: Any = jnp.float32, **overrides
) -> nn.Module:
  """Build a registered model; `overrides` replace architecture or regularization defaults."""
  _check_name(name)
  builder, allowed = _REGISTRY[name]
  unknown = sorted(set(overrides) - set(allowed))
  if unknown:
    raise ValueError(f"{name} does not accept override(s) {unknown}; accepted: {list(allowed)}")
  kw = {k: _normalize(v) for k, v in overrides.items()}
  for key in _TUPLE_FIELDS:
    if key in kw and kw[key] is not None and not isinstance(kw[key], tuple):
      raise ValueError(f"{key} must be a list or tuple, got {kw[key]!r}")
  if "blocks" in kw and (not kw["blocks"] or not all(isinstance(b, str) for b in kw["blocks"])):
    raise ValueError(f"blocks must be a non-empty list of block strings, got {kw['blocks']!r}")
  if "bn_group_size" in kw:
    g = kw["bn_group_size"]
    if isinstance(g, bool) or not isinstance(g, int) or g < 0:
      raise ValueError(f"bn_group_size must be an integer >= 0 (0 = whole batch), got {g!r}")
  if "depthwise_impl" in kw and kw["depthwise_impl"] not in DEPTHWISE_IMPLS:
    raise ValueError(
      f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {kw['depthwise_impl']!r}"
    )
  return builder(name, num_classes=int(num_classes), dtype=dtype, **kw)


def model_defaults(name: str) -> Dict[str, Any]:
  """Published defaults for a model: train_size, eval_size, dropout_rate."""
  _check_name(name)
  if name in V2_VARIANTS:
    v = V2_VARIANTS[name]
    return dict(train_size=v.train_size, eval_size=v.eval_size, dropout_rate=v.dropout_rate)
  if name in V1_VARIANTS:
    v = V1_VARIANTS[name]
    return dict(train_size=v.resolution, eval_size=v.resolution, dropout_rate=v.dropout_rate)
  return dict(train_size=224, eval_size=224, dropout_rate=0.0)


def count_params(variables) -> int:
  """Trainable parameter count of `variables['params']` (or of a bare params tree).

  Works on jax.eval_shape output too, so large models can be counted without allocating them.
  """
  params = variables["params"] if "params" in variables else variables
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def count_macs(model_name: str, image_size: int, **overrides) -> int:
  """Multiply-adds of one image's forward pass (convs and dense layers, incl. SE and classifier)."""
  num_classes = overrides.pop("num_classes", 1000)
  return macs_of(create_model(model_name, num_classes=num_classes, **overrides), int(image_size))

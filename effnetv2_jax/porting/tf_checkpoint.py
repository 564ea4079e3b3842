"""Official google/automl EfficientNetV2 (and EfficientNet) TF checkpoints -> our variables.

The official code builds Keras layers inside TF1 name scopes, so a variable's name is its scope
plus the layer's auto-generated name, uniquified per scope in creation order: the first Conv2D of
a block is `conv2d`, the second `conv2d_1`, the BatchNorms `tpu_batch_normalization{,_1,_2}`.
Which conv is `conv2d` therefore depends on which children the block creates, hence one table per
block layout (names.block_layout). Example, S block 3 (Fused e4): `blocks_3/conv2d` is the kxk
expand and `blocks_3/conv2d_1` the 1x1 project; in a Fused e1 block `conv2d` is the only conv.

The classifier: released checkpoints (and `get_model`'s loader) name it `head/dense`; checkpoints
written by the current official main.py name it `head_1/dense`, because the model calls the
classifier inside a second `tf.name_scope('head')`, which TF1 graph mode uniquifies (reference
section 10, item 11). Both are accepted (`CLASSIFIER_LAYERS`, tried in that order); when neither
is there the error names both. Exporting (`to_tf_names`) writes the released `head/dense`.

Exponential moving averages are stored as `<variable>/ExponentialMovingAverage` and are what the
published accuracy was measured with (the raw weights lose several points), so they are taken by
default; optimizer slots (`<variable>/RMSProp`, ...) and `global_step` are skipped.

TensorFlow is imported only inside `read_tf_checkpoint`, so this module imports without it.
"""

import os
from typing import Dict, Mapping, Optional

import numpy as np

from effnetv2_jax.porting import names

EMA_SUFFIX = "/ExponentialMovingAverage"
BN = "tpu_batch_normalization"
# The classifier's layer, released name first (see the module docstring).
CLASSIFIER_LAYERS = ("head/dense", "head_1/dense")
# Our module path -> official name (or alternatives), outside the blocks (under the model's scope).
TF_FIXED = {
  "stem/conv": "stem/conv2d",
  "stem/bn": f"stem/{BN}",
  "head/conv": "head/conv2d",
  "head/bn": f"head/{BN}",
  "classifier": CLASSIFIER_LAYERS,
}
_SE = {"se/reduce": "se/conv2d", "se/expand": "se/conv2d_1"}
# Per block layout: our child module -> official layer name inside `blocks_k/`.
TF_BLOCKS = {
  "fused_e1": {**_SE, "project/conv": "conv2d", "project/bn": BN},
  "fused": {
    "expand/conv": "conv2d",
    "expand/bn": BN,
    **_SE,
    "project/conv": "conv2d_1",
    "project/bn": f"{BN}_1",
  },
  "mbconv": {
    "expand/conv": "conv2d",
    "expand/bn": BN,
    "dw/conv": "depthwise_conv2d",
    "dw/bn": f"{BN}_1",
    **_SE,
    "project/conv": "conv2d_1",
    "project/bn": f"{BN}_2",
  },
  # No expand conv: the depthwise conv's BN is the block's first, the project conv its first Conv2D.
  "mbconv_e1": {
    "dw/conv": "depthwise_conv2d",
    "dw/bn": BN,
    **_SE,
    "project/conv": "conv2d",
    "project/bn": f"{BN}_1",
  },
}
TF_LEAVES = names.leaf_names("kernel", "bias", "gamma", "moving_mean", "moving_variance")
TF_BN_BIAS = "beta"  # a BN's `bias` is `beta`; conv/dense `bias` keeps its name
TF_DEPTHWISE_KERNEL = "depthwise_kernel"


def tf_lookup(specs, prefix: str):
  """lookup(leaf) -> (official name, transform) for a model with these block specs."""

  def lookup(leaf: names.Leaf):
    layer = names.module_path(leaf, specs, TF_BLOCKS, TF_FIXED, lambda k, _, c: f"blocks_{k}/{c}")
    if layer is None:
      return None
    weight = TF_LEAVES[(leaf.collection, leaf.path[-1])]
    transform = None
    if isinstance(layer, tuple):  # alternatives (the classifier): same weight name in each
      return tuple(f"{prefix}/{one}/{weight}" for one in layer), transform
    if leaf.path[-2] == "bn" and weight == "bias":
      weight = TF_BN_BIAS
    elif layer.endswith("depthwise_conv2d"):
      weight, transform = TF_DEPTHWISE_KERNEL, "tf_depthwise"
    return f"{prefix}/{layer}/{weight}", transform

  return lookup


def read_tf_checkpoint(path: str) -> Dict[str, np.ndarray]:
  """Every variable of a TF checkpoint (a prefix, or a directory with a `checkpoint` file)."""
  import tensorflow as tf  # late: only this converter needs TensorFlow

  if os.path.isdir(path):
    found = tf.train.latest_checkpoint(path)
    if found is None:
      raise FileNotFoundError(f"{path}: no TF checkpoint (no `checkpoint` file) in this directory")
    path = found
  reader = tf.train.load_checkpoint(path)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _model_scope(variables: Mapping[str, np.ndarray], model_name: str) -> str:
  """The top scope holding the network: normally the model name, e.g. `efficientnetv2-s`."""
  if f"{model_name}/stem/conv2d/kernel" in variables:
    return model_name
  scopes = sorted(
    {n[: -len("/stem/conv2d/kernel")] for n in variables if n.endswith("/stem/conv2d/kernel")}
  )
  if len(scopes) == 1:
    return scopes[0]
  raise ValueError(
    f"cannot find the {model_name} network in the checkpoint: expected "
    f"{model_name}/stem/conv2d/kernel; stem kernels found under {scopes or 'none'}"
  )


def select_weights(
  variables: Mapping[str, np.ndarray], use_ema: bool = True
) -> Dict[str, np.ndarray]:
  """Model variable name -> the array to load: its EMA copy (use_ema) or the raw value.

  Every name of the form `<variable>/<suffix>` where `<variable>` is itself in the checkpoint is
  a slot of it (EMA, optimizer) and not a weight of its own. With use_ema, raw and EMA values are
  never mixed: a variable without an EMA copy is reported, not loaded raw.
  """
  base = {n for n in variables if "/" not in n or n.rsplit("/", 1)[0] not in variables}
  if not use_ema:
    return {n: variables[n] for n in base}
  if not any(n.endswith(EMA_SUFFIX) for n in variables):
    raise ValueError(
      "the checkpoint has no ExponentialMovingAverage copies; pass use_ema=False "
      "(--use_ema=false) to load the raw weights, which usually evaluate worse"
    )
  # A variable without its EMA copy stays visible under a name no table asks for, so it is
  # reported (as unexpected, next to the missing weight) instead of silently dropped.
  return {
    n if n + EMA_SUFFIX in variables else f"{n} (no EMA copy)": variables.get(
      n + EMA_SUFFIX, variables[n]
    )
    for n in base
  }


def from_tf_checkpoint(
  path: str, model_name: str, use_ema: bool = True, **overrides
) -> Dict[str, dict]:
  """Variables {'params', 'batch_stats'} for `create_model(model_name)` from an official checkpoint.

  The class count is read from `head/dense/kernel` (or `head_1/dense/kernel`) unless
  `num_classes` is given. Raises
  ValueError naming every missing, unexpected and mis-shaped variable.
  """
  return from_tf_variables(read_tf_checkpoint(path), model_name, use_ema, where=path, **overrides)


def from_tf_variables(
  variables: Mapping[str, np.ndarray],
  model_name: str,
  use_ema: bool = True,
  where: Optional[str] = None,
  **overrides,
) -> Dict[str, dict]:
  """from_tf_checkpoint on an already-read name -> array mapping."""
  scope = _model_scope(variables, model_name)
  weights = select_weights(variables, use_ema)
  classes = names.classifier_classes(
    weights, [f"{scope}/{layer}/kernel" for layer in CLASSIFIER_LAYERS], axis=1
  )
  num_classes = overrides.pop("num_classes", None) or classes or 1000
  _, specs, leaves = names.build(model_name, num_classes, **overrides)
  # Names outside the network's scope (global_step, learning-rate counters) are not weights.
  ignore = lambda n: not n.startswith(scope + "/")
  return names.fill_variables(
    leaves,
    weights,
    tf_lookup(specs, scope),
    ignore=ignore,
    what=f"TF checkpoint {where or ''} ({'EMA' if use_ema else 'raw'} weights) does not match "
    f"{model_name}",
  )


def to_tf_names(
  variables: Mapping[str, dict], model_name: str, **overrides
) -> Dict[str, np.ndarray]:
  """Our variables -> official names and layouts (the inverse of from_tf_checkpoint, no EMA)."""
  num_classes = int(np.shape(variables["params"]["classifier"]["kernel"])[1])
  _, specs, leaves = names.build(model_name, num_classes, **overrides)
  return names.to_source(variables, leaves, tf_lookup(specs, model_name))

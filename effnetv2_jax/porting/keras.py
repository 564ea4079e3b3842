"""Keras applications EfficientNetV2 (B0-B3, S, M, L) -> this package's variables.

Keras names layers per stage and letter (`block4b_se_reduce`); we number blocks flat (`blocks_k`).
The mapping is a table from our module path (with `{b}` for the block) to a Keras layer name, plus a
table from our leaf names to Keras weight names. Nothing is matched by position or shape, and every
missing, unexpected or mis-shaped weight is reported together in one ValueError.

TensorFlow/Keras are never imported here: the function only reads `layer.name` and `layer.weights`.
"""

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from effnetv2_jax.porting import names

# Our module path (relative; `{b}` = the block's Keras prefix such as 'block2a_') -> Keras layer name.
KERAS_V2_LAYERS: Dict[str, str] = {
  "stem/conv": "stem_conv",
  "stem/bn": "stem_bn",
  "blocks_{k}/expand/conv": "{b}expand_conv",
  "blocks_{k}/expand/bn": "{b}expand_bn",
  "blocks_{k}/dw/conv": "{b}dwconv2",
  "blocks_{k}/dw/bn": "{b}bn",
  "blocks_{k}/se/reduce": "{b}se_reduce",
  "blocks_{k}/se/expand": "{b}se_expand",
  "blocks_{k}/project/conv": "{b}project_conv",
  "blocks_{k}/project/bn": "{b}project_bn",
  "head/conv": "top_conv",
  "head/bn": "top_bn",
  "classifier": "predictions",
}
# (collection, our leaf name) -> Keras weight name. Depthwise kernels need a transpose (below).
KERAS_WEIGHTS: Dict[Tuple[str, str], str] = {
  ("params", "kernel"): "kernel",
  ("params", "bias"): "bias",
  ("params", "scale"): "gamma",
  ("batch_stats", "mean"): "moving_mean",
  ("batch_stats", "var"): "moving_variance",
}
KERAS_BN_BIAS = "beta"  # BN's `bias` is Keras' `beta`; conv/dense `bias` keeps its name


def keras_block_prefix(stage: int, index_in_stage: int) -> str:
  """Keras' `block{stage+1}{letter}_` naming (1-based stage, letters a, b, ... per stage)."""
  return f"block{stage + 1}{chr(ord('a') + index_in_stage)}_"


def _our_layer_path(path: Tuple[str, ...]) -> Tuple[str, str]:
  """('blocks_3','dw','conv','kernel') -> ('blocks_{k}/dw/conv', 'blocks_3'); leaf excluded."""
  module = "/".join(path[:-1])
  if path[0].startswith("blocks_"):
    return "blocks_{k}/" + "/".join(path[1:-1]), path[0]
  return module, ""


def _keras_weights(keras_model) -> Dict[str, np.ndarray]:
  """'layer/weight' -> array for every weight of the Keras model (names without Keras' ':0')."""
  out = {}
  for layer in keras_model.layers:
    for w in layer.weights:
      leaf = w.name.split("/")[-1].split(":")[0]
      out[f"{layer.name}/{leaf}"] = np.asarray(w.numpy() if hasattr(w, "numpy") else w)
  return out


def from_keras(keras_model, model_name: str, **overrides) -> Dict[str, dict]:
  """Variables {'params', 'batch_stats'} for `create_model(model_name, ...)` from a Keras model.

  The class count is read from the Keras classifier. Raises ValueError listing every missing,
  unexpected or mis-shaped weight; never returns a partial result.
  """
  from effnetv2_jax.models import create_model  # late: keeps `porting` importable on its own

  src = _keras_weights(keras_model)
  if "predictions/kernel" in src:
    overrides.setdefault("num_classes", src["predictions/kernel"].shape[1])
  num_classes = overrides.pop("num_classes", 1000)
  model = create_model(model_name, num_classes=num_classes, **overrides)
  if not hasattr(model, "architecture"):
    raise ValueError(
      f"{model_name} is not an EfficientNet; Keras porting covers EfficientNetV2 only"
    )
  _, specs, _ = model.architecture()
  prefixes = [keras_block_prefix(s.stage, s.index_in_stage) for s in specs]
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))

  used, missing, mismatched = set(), [], []
  result: Dict[str, dict] = {}
  for collection in ("params", "batch_stats"):
    flat = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(shapes[collection])[0]:
      path = tuple(k.key for k in key_path)
      ours = "/".join(path)
      template, block = _our_layer_path(path)
      if template not in KERAS_V2_LAYERS:
        missing.append(f"{ours} (no table entry for {template!r})")
        continue
      b = prefixes[int(block.split("_")[1])] if block else ""
      layer = KERAS_V2_LAYERS[template].format(b=b)
      weight = KERAS_WEIGHTS[(collection, path[-1])]
      if path[-2] == "bn" and path[-1] == "bias":
        weight = KERAS_BN_BIAS
      name = f"{layer}/{weight}"
      if name not in src:
        missing.append(f"{ours} <- {name}")
        continue
      value = src[name]
      if template.endswith("dw/conv"):
        value = value.transpose(0, 1, 3, 2)  # Keras [k, k, C, 1] -> ours [k, k, 1, C]
      if value.shape != leaf.shape:
        mismatched.append(f"{ours} {leaf.shape} <- {name} {value.shape}")
        continue
      used.add(name)
      flat[path] = jnp.asarray(value, dtype=leaf.dtype)
    result[collection] = _unflatten(flat)
  problems = names.describe_problems(missing, mismatched, sorted(set(src) - used))
  if problems:
    raise ValueError(
      f"Keras model {getattr(keras_model, 'name', '?')!r} does not match {model_name}: {problems}"
    )
  return result


def _unflatten(flat: Dict[Tuple[str, ...], jnp.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree

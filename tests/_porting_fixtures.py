"""Shared by the porting tests: our variables filled with known random values.

Random (not init) values on purpose: init leaves BN mean 0 / var 1 and biases 0, which would hide
a swapped mean/var or a lost SE bias. Scales keep activations O(1) so tolerances mean something.
"""

import numpy as np

from effnetv2_jax.porting import names


def random_variables(model_name, seed=0, num_classes=10, **overrides):
  _, specs, leaves = names.build(model_name, num_classes, **overrides)
  rng = np.random.default_rng(seed)
  values = {}
  for leaf in leaves:
    kind = leaf.path[-1]
    if kind == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape)
    elif kind == "scale":
      value = rng.uniform(0.5, 1.0, leaf.shape)
    elif kind == "var":
      value = rng.uniform(0.5, 2.0, leaf.shape)
    else:  # bias, mean
      value = rng.normal(0, 0.1, leaf.shape)
    values[leaf.name] = value.astype(np.float32)
  # The converters' own assembly, with a table that names each leaf by itself.
  variables = names.fill_variables(
    leaves, values, lambda leaf: (leaf.name, None), what="random variables"
  )
  return variables, specs, leaves


def leaf_value(variables, collection, path):
  node = variables[collection]
  for k in path.split("/"):
    node = node[k]
  return np.asarray(node)


def assert_same_tree(a, b):
  import jax

  fa = dict(jax.tree_util.tree_flatten_with_path(a)[0])
  fb = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))

"""Flat buffers for a tree of arrays (effnetv2_jax/flat.py): layout, round trip, pytree and
checkpoint forms."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from effnetv2_jax import flat


def _tree():
  return {
    "conv": {"kernel": jnp.arange(24.0).reshape(2, 3, 4), "bias": jnp.arange(4.0) + 100},
    "bn": {"scale": jnp.full((3,), 7.0), "count": jnp.arange(2, dtype=jnp.int32)},
    "head": {"kernel": jnp.ones((1, 2)) * -1},
  }


def _is_kernel(path, leaf):
  return "kernel" if path[-1].key == "kernel" else ""


def test_one_buffer_per_dtype_and_group_in_tree_order():
  t = _tree()
  layout = flat.Layout.of(t, group=_is_kernel)
  f = layout.ravel(t)
  assert layout.groups == (("float32", ""), ("float32", "kernel"), ("int32", ""))
  assert [b.shape for b in f.buffers] == [(7,), (26,), (2,)]
  # Leaves of a group follow one another in tree (sorted key) order: bn.scale, then conv.bias.
  np.testing.assert_array_equal(f.buffers[0], [7, 7, 7, 100, 101, 102, 103])
  np.testing.assert_array_equal(f.buffers[1][:24], np.arange(24.0))  # conv.kernel, head.kernel
  assert f.buffers[2].dtype == jnp.int32
  jax.tree.map(np.testing.assert_array_equal, f.to_tree(), t)
  np.testing.assert_array_equal(f["conv"]["kernel"], t["conv"]["kernel"])  # reads like the tree
  assert repr(f) == "Flat(5 leaves in float32[7], float32/kernel[26], int32[2])"


def test_a_flat_is_a_pytree_of_its_buffers():
  t = _tree()
  f = flat.ravel(t)
  assert len(jax.tree.leaves(f)) == 2  # float32, int32
  g = jax.tree.map(lambda x: x * 2, f)
  assert isinstance(g, flat.Flat) and g.layout == f.layout
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, 2 * b), g.to_tree(), t)
  # Under jit the layout is static: ravel and unravel trace to a concatenate and slices.
  out = jax.jit(lambda tree: flat.ravel(tree).to_tree())(t)
  jax.tree.map(np.testing.assert_array_equal, out, t)
  # Abstract values unravel to abstract leaves with the buffer's sharding.
  abstract = jax.eval_shape(flat.ravel, t)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract.to_tree()) == jax.tree.map(
    lambda x: (x.shape, x.dtype), t
  )
  assert flat.as_tree(f) is not f and flat.as_tree(t) is t
  empty = flat.ravel({})
  assert empty.buffers == () and empty.to_tree() == {}


def test_checkpoint_form_is_the_tree():
  t = _tree()
  f = flat.ravel(t, group=_is_kernel)
  state = serialization.to_state_dict({"slot": f})
  # The same arrays under the same names as the tree itself would be written.
  jax.tree.map(np.testing.assert_array_equal, state, serialization.to_state_dict({"slot": t}))
  moved = jax.tree.map(lambda x: np.asarray(x) + 1, state)
  back = serialization.from_state_dict({"slot": f}, moved)["slot"]
  assert isinstance(back, flat.Flat) and back.layout == f.layout
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b + 1), back.to_tree(), t)

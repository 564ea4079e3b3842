"""A pytree of arrays stored as a few flat buffers: one 1-D buffer per (dtype, group) of leaves.

What the train step does to the optimizer slots, the EMA and the divergence guard is elementwise
(or a whole-tree sum), so it costs the same arithmetic on one long vector as on 243 small arrays,
but XLA:CPU runs one small kernel per array and per op, and on B0 those kernels, each a few
microseconds of work behind tens of microseconds of dispatch, added up to a fifth of the step
(experiments/results/bench_train_step.md). `Flat` keeps such a tree as a few buffers, the way
PyTorch's multi-tensor ("foreach") optimizers do:

  layout = Layout.of(params, group=lambda path, leaf: "decay" if ... else "")
  f = layout.ravel(params)   # Flat: f.buffers is one 1-D array per group (a concatenate)
  f.to_tree()                # the tree again (static slices + reshapes)
  f["stem"]["conv"]["kernel"]  # reads like the tree it flattens

`Flat` is a pytree whose leaves are its buffers (the layout is static aux data), so `jax.tree.map`,
optax transforms, `jnp.where` and shardings see a few arrays. Its checkpoint form
(flax.serialization, as orbax sees it) is the unflattened tree, so a checkpoint holds the same
arrays under the same names whether a slot is flat in memory or not.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each leaf of a tree lives in the buffers: static and hashable (jit keys on it)."""

  treedef: Any  # jax.tree_util.PyTreeDef of the tree
  groups: tuple[tuple[str, str], ...]  # (dtype name, group label) per buffer, sorted
  leaves: tuple[tuple[int, int, tuple[int, ...]], ...]  # (buffer index, offset, shape) per leaf
  sizes: tuple[int, ...]  # elements per buffer

  def __repr__(self):  # inside every pytree-structure message: keep it short
    groups = ", ".join(
      f"{d}{'/' + g if g else ''}[{n}]" for n, (d, g) in zip(self.sizes, self.groups)
    )
    return f"Layout({len(self.leaves)} leaves in {groups})"

  @classmethod
  def of(cls, tree: PyTree, group: Callable[[Any, Any], str] | None = None) -> "Layout":
    """The layout of `tree` (arrays or ShapeDtypeStructs): leaves of one dtype and one
    `group(path, leaf)` label share a buffer, in tree order."""
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = [
      (np.dtype(leaf.dtype).name, group(path, leaf) if group else "") for path, leaf in path_leaves
    ]
    groups = tuple(sorted(set(keys)))
    sizes = [0] * len(groups)
    leaves = []
    for key, (_, leaf) in zip(keys, path_leaves):
      b = groups.index(key)
      shape = tuple(int(d) for d in leaf.shape)
      leaves.append((b, sizes[b], shape))
      sizes[b] += math.prod(shape)
    return cls(treedef, groups, tuple(leaves), tuple(sizes))

  def ravel(self, tree: PyTree) -> "Flat":
    """`tree` (of this layout's structure and shapes) as a Flat: one concatenate per buffer."""
    leaves = self.treedef.flatten_up_to(tree)
    parts = [[] for _ in self.groups]
    for (b, _, _), leaf in zip(self.leaves, leaves):
      parts[b].append(jnp.reshape(leaf, (-1,)))
    return Flat([p[0] if len(p) == 1 else jnp.concatenate(p) for p in parts], self)

  def unravel(self, buffers) -> PyTree:
    """The tree held in `buffers` (arrays, host arrays, or ShapeDtypeStructs: then the leaves are
    ShapeDtypeStructs carrying the buffer's sharding, which must be replicated)."""
    leaves = []
    for b, offset, shape in self.leaves:
      buf = buffers[b]
      if isinstance(buf, jax.ShapeDtypeStruct):
        leaves.append(
          jax.ShapeDtypeStruct(shape, buf.dtype, sharding=getattr(buf, "sharding", None))
        )
      else:
        leaves.append(buf[offset : offset + math.prod(shape)].reshape(shape))
    return self.treedef.unflatten(leaves)

  def template(self) -> PyTree:
    """The tree of ShapeDtypeStructs this layout holds (no buffers needed)."""
    return self.unravel(
      [jax.ShapeDtypeStruct((n,), d) for n, (d, _) in zip(self.sizes, self.groups)]
    )


class Flat:
  """A tree kept as `buffers`, one 1-D array per group of `layout` (see the module docstring)."""

  __slots__ = ("buffers", "layout")

  def __init__(self, buffers, layout: Layout):
    self.buffers = tuple(buffers)
    self.layout = layout

  def to_tree(self) -> PyTree:
    return self.layout.unravel(self.buffers)

  def __getitem__(self, key):
    return self.to_tree()[key]

  def map_groups(self, fn: Callable[[str, Any], Any]) -> "Flat":
    """A Flat of the same layout whose buffer `i` is `fn(label_i, buffer_i)` (e.g. a mask)."""
    return Flat(
      [fn(label, b) for (_, label), b in zip(self.layout.groups, self.buffers)], self.layout
    )

  def __repr__(self):
    return "Flat" + repr(self.layout)[len("Layout") :]


def _flatten_with_keys(f: Flat):
  keys = [jax.tree_util.DictKey(f"{d}/{g}" if g else d) for d, g in f.layout.groups]
  return list(zip(keys, f.buffers)), f.layout


jax.tree_util.register_pytree_with_keys(
  Flat,
  _flatten_with_keys,
  lambda layout, buffers: Flat(buffers, layout),
  lambda f: (f.buffers, f.layout),
)


def as_tree(x: PyTree) -> PyTree:
  """`x.to_tree()` for a Flat, `x` itself for anything else (a tree already)."""
  return x.to_tree() if isinstance(x, Flat) else x


def ravel(tree: PyTree, group: Callable[[Any, Any], str] | None = None) -> Flat:
  """`Layout.of(tree, group).ravel(tree)`."""
  return Layout.of(tree, group).ravel(tree)


# --- checkpoints: a Flat is written and read as the tree it holds -----------------------------------


def _to_state_dict(f: Flat) -> dict:
  return serialization.to_state_dict(f.to_tree())


def _from_state_dict(target: Flat, state: dict) -> Flat:
  tree = serialization.from_state_dict(target.layout.template(), state)
  restored = target.layout.ravel(tree)
  shardings = [getattr(b, "sharding", None) for b in target.buffers]
  if all(s is not None for s in shardings):
    return Flat([jax.device_put(b, s) for b, s in zip(restored.buffers, shardings)], target.layout)
  return restored


serialization.register_serialization_state(Flat, _to_state_dict, _from_state_dict)

"""What every name-table converter shares: walk our variables, look each array up, report at once.

A converter is (1) a table from our module paths to the source format's names, per block layout,
and (2) a `lookup(leaf) -> (source name, transform)` built from it. The source name may be a tuple
of alternatives (one file format, two naming generations): the first one present is used, and
when none is, the report names every one tried. `fill_variables` asks the
lookup for every array of the model, checks shapes, and raises ONE ValueError naming every
missing, unexpected and mis-shaped array, so a wrong model name or a truncated file never yields
a half-loaded model. `to_source` runs the same lookup backwards (our variables -> the source's
names and layouts); tests use it to build source files from known arrays, and users can use it to
hand weights back to timm or TF.

Arrays stay numpy on the host: nothing is placed on a device until the caller applies the model,
and zero-copy views (np.broadcast_to) pass through, which lets tests check XL's 208M-parameter
mapping without allocating it.
"""

import functools
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# Layout changes between a source array and ours: name -> (to ours, back to the source).
# torch conv OIHW -> our HWIO; the same permutation takes torch depthwise [C,1,k,k] to [k,k,1,C].
TRANSFORMS: Dict[Optional[str], Tuple[Callable, Callable]] = {
  None: (lambda a: a, lambda a: a),
  "torch_conv": (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
  "torch_linear": (lambda a: a.T, lambda a: a.T),  # [out, in] <-> [in, out]
  "tf_depthwise": (lambda a: a.transpose(0, 1, 3, 2),) * 2,  # [k,k,C,1] <-> [k,k,1,C]
}
_MAX_LISTED = 20

# Every kind of array our models hold, as (collection, leaf name).
LEAF_KINDS = (
  ("params", "kernel"),
  ("params", "bias"),
  ("params", "scale"),
  ("batch_stats", "mean"),
  ("batch_stats", "var"),
)


def leaf_names(
  kernel: str, bias: str, scale: str, mean: str, var: str
) -> Dict[Tuple[str, str], str]:
  """A source format's name for each of LEAF_KINDS: (collection, our leaf) -> its name."""
  return dict(zip(LEAF_KINDS, (kernel, bias, scale, mean, var)))


class Leaf(NamedTuple):
  """One array of our variables and where it sits in the network."""

  collection: str  # 'params' | 'batch_stats'
  path: Tuple[str, ...]  # ('blocks_3', 'dw', 'conv', 'kernel')
  shape: Tuple[int, ...]
  dtype: np.dtype
  block: int  # flat block index k for `blocks_k/...`, else -1

  @property
  def module(self) -> str:
    """Our module path without the block and leaf: 'dw/conv' (in a block) or 'stem/bn'."""
    return "/".join(self.path[1:-1] if self.block >= 0 else self.path[:-1])

  @property
  def name(self) -> str:
    return f"{self.collection}/" + "/".join(self.path)


def block_layout(spec) -> str:
  """Which children a block has, hence which table applies: fused/mbconv, with or without expand."""
  return ("fused" if spec.fused else "mbconv") + ("_e1" if spec.expand_ratio == 1 else "")


def build(model_name: str, num_classes: int, **overrides):
  """(model, block specs, leaves) of an EfficientNet, without allocating its weights.

  Cached: tracing a large model's init takes seconds, and converting then inverting (tests,
  to_timm/from_timm) asks for the same model twice.
  """
  try:
    return _build_cached(model_name, int(num_classes), tuple(sorted(overrides.items())))
  except TypeError:  # an unhashable override (a list from a config): build uncached
    return _build(model_name, int(num_classes), overrides)


@functools.lru_cache(maxsize=16)
def _build_cached(model_name, num_classes, overrides):
  return _build(model_name, num_classes, dict(overrides))


def _build(model_name, num_classes, overrides):
  from effnetv2_jax.models import create_model  # late: porting stays importable on its own

  model = create_model(model_name, num_classes=num_classes, **overrides)
  if not hasattr(model, "architecture"):
    raise ValueError(
      f"{model_name} is not an EfficientNet; the converters cover EfficientNet V1/V2"
    )
  _, specs, _ = model.architecture()
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  leaves = []
  for collection in ("params", "batch_stats"):
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(shapes.get(collection, {}))[0]:
      path = tuple(k.key for k in key_path)
      block = int(path[0].split("_")[1]) if path[0].startswith("blocks_") else -1
      leaves.append(Leaf(collection, path, tuple(leaf.shape), np.dtype(leaf.dtype), block))
  return model, specs, tuple(leaves)


def _unflatten(items: Sequence[Tuple[Leaf, np.ndarray]]) -> Dict[str, dict]:
  tree: Dict[str, dict] = {"params": {}, "batch_stats": {}}
  for leaf, value in items:
    node = tree[leaf.collection]
    for k in leaf.path[:-1]:
      node = node.setdefault(k, {})
    node[leaf.path[-1]] = value
  return tree


def describe_problems(missing: Sequence[str], mismatched: Sequence[str], unexpected: Sequence[str]):
  """'missing (3): a; b; c | unexpected (1): d', at most _MAX_LISTED names each; '' if all match."""
  problems = []
  for title, names in (
    ("missing", missing),
    ("shape mismatch", mismatched),
    ("unexpected", unexpected),
  ):
    if names:
      more = " ..." if len(names) > _MAX_LISTED else ""
      problems.append(f"{title} ({len(names)}): " + "; ".join(names[:_MAX_LISTED]) + more)
  return " | ".join(problems)


def module_path(leaf: Leaf, specs, blocks: Mapping, fixed: Mapping, block_name: Callable):
  """The source's module for one of our leaves, or None: `fixed[leaf.module]` outside the
  blocks; inside block k, `block_name(k, spec, child)` with `child = blocks[layout][module]`."""
  if leaf.block < 0:
    return fixed.get(leaf.module)
  spec = specs[leaf.block]
  child = blocks[block_layout(spec)].get(leaf.module)
  return None if child is None else block_name(leaf.block, spec, child)


def fill_variables(
  leaves: Sequence[Leaf],
  source: Mapping[str, np.ndarray],
  lookup: Callable,
  *,
  what: str,
  ignore: Callable[[str], bool] = lambda name: False,
) -> Dict[str, dict]:
  """Variables {'params', 'batch_stats'} with every leaf taken from `source` via `lookup`.

  `lookup(leaf)` returns (source name, transform key) or None when the table has no entry for
  that module; the name may be a tuple of alternatives, tried in order. `ignore(name)` marks source names that are legitimately unused (optimizer slots,
  BN counters). Raises ValueError naming every problem; `what` says which file/model in it.
  """
  items, used, missing, mismatched = [], set(), [], []
  for leaf in leaves:
    entry = lookup(leaf)
    if entry is None:
      missing.append(f"{leaf.name} (no table entry for {leaf.module!r})")
      continue
    candidates, transform = entry
    candidates = (candidates,) if isinstance(candidates, str) else tuple(candidates)
    name = next((n for n in candidates if n in source), None)
    if name is None:
      tried = candidates[0] if len(candidates) == 1 else "none of " + ", ".join(candidates)
      missing.append(f"{leaf.name} <- {tried}")
      continue
    used.add(name)
    value = TRANSFORMS[transform][0](np.asarray(source[name]))
    if tuple(value.shape) != leaf.shape:
      mismatched.append(f"{leaf.name} {leaf.shape} <- {name} {tuple(np.shape(source[name]))}")
      continue
    items.append((leaf, np.asarray(value, dtype=leaf.dtype)))
  unexpected = sorted(n for n in source if n not in used and not ignore(n))
  problems = describe_problems(missing, mismatched, unexpected)
  if problems:
    raise ValueError(f"{what}: {problems}")
  return _unflatten(items)


def to_source(
  variables: Mapping[str, dict], leaves: Sequence[Leaf], lookup: Callable
) -> Dict[str, np.ndarray]:
  """The inverse of fill_variables: source name -> array in the source's layout."""
  out = {}
  for leaf in leaves:
    entry = lookup(leaf)
    if entry is None:
      raise ValueError(f"{leaf.name}: no table entry for {leaf.module!r}")
    node = variables[leaf.collection]
    for k in leaf.path:
      node = node[k]
    name = entry[0] if isinstance(entry[0], str) else entry[0][0]  # the first alternative
    out[name] = TRANSFORMS[entry[1]][1](np.asarray(node))
  return out


def classifier_classes(
  source: Mapping[str, np.ndarray], name: "str | Sequence[str]", axis: int
) -> Optional[int]:
  """The class count from the source's classifier array (the first of `name`'s alternatives
  present), if it has one."""
  for n in (name,) if isinstance(name, str) else name:
    if n in source:
      return int(np.shape(source[n])[axis])
  return None

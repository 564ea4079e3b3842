"""Checkpoints: an orbax CheckpointManager holding the train state plus a small JSON record.

Layout: `<workdir>/checkpoints/<step>/{state,meta}`. `state` is the TrainState converted to nested
dicts (flax.serialization.to_state_dict), so what is on disk is plain arrays under readable paths
(`params.stem.conv.kernel`, `opt_state.1.0.nu...`), never pickled objects. `meta` is JSON: step,
stage index, a hash of the config and the model name / class count it was trained with.

Atomicity: orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it once every
array is on disk, so a process killed mid-write leaves only a tmp directory, which `latest_step`
never reports (a test pins this).

Before restoring, the tree on disk is compared array by array with the abstract state the caller
expects; any difference (another model, another number of classes) raises CheckpointMismatchError
naming the arrays, instead of a shape error from deep inside the restore.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from effnetv2_jax import paths

CHECKPOINT_SUBDIR = "checkpoints"
_MAX_LISTED = 12  # mismatched arrays named in an error message


class CheckpointMismatchError(ValueError):
  """The checkpoint on disk does not fit the model/state being trained."""


def config_hash(config) -> str:
  """A short stable hash of the resolved config (to notice a resume with a changed config)."""
  text = json.dumps(
    config.to_dict() if hasattr(config, "to_dict") else dict(config), sort_keys=True, default=str
  )
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _path_str(path) -> str:
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(str(k.name))
    else:
      parts.append(str(k))
  return ".".join(parts)


def flat_shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'a.b.c': (shape, dtype)} for every array-like leaf of `tree` (None/empty nodes skipped)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if leaf is None or not hasattr(leaf, "shape"):
      continue
    out[_path_str(path)] = (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
  return out


def describe_mismatch(
  saved: Mapping[str, Any], expected: Mapping[str, Any], prefix: str = ""
) -> list[str]:
  """Human-readable differences between two flat_shapes() dicts (empty if they agree)."""
  lines = []
  for name in sorted(set(saved) | set(expected)):
    if prefix and not name.startswith(prefix):
      continue
    if name not in saved:
      lines.append(f"{name}: missing from the checkpoint (model expects {expected[name][0]})")
    elif name not in expected:
      lines.append(f"{name}: in the checkpoint {saved[name][0]} but not in the model")
    elif saved[name][0] != expected[name][0]:
      lines.append(f"{name}: checkpoint shape {saved[name][0]} != model shape {expected[name][0]}")
  return lines


def _mismatch_error(where: str, lines: list[str]) -> CheckpointMismatchError:
  # The model's own arrays first; optimizer slots and EMA copies repeat the same differences.
  primary = [l for l in lines if l.startswith(("params.", "batch_stats."))]
  shown = (primary or lines)[:_MAX_LISTED]
  rest = len(lines) - len(shown)
  more = f"\n  ... and {rest} more (optimizer slots, EMA copies)" if rest else ""
  return CheckpointMismatchError(
    f"checkpoint {where} does not match the model being trained ({len(lines)} arrays differ; "
    "another model_name, model_overrides or num_classes?):\n  " + "\n  ".join(shown) + more
  )


def check_compatible(where: str, saved: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
  """Raise CheckpointMismatchError naming the arrays in which two flat_shapes() dicts differ."""
  lines = describe_mismatch(saved, expected)
  if lines:
    raise _mismatch_error(where, lines)


def _as_abstract(tree):
  """ShapeDtypeStructs (keeping shardings) for a tree of arrays or ShapeDtypeStructs."""

  def leaf(x):
    if x is None:
      return None
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

  return jax.tree.map(leaf, tree)


def checkpoint_dir(workdir: str) -> str:
  """`<workdir>/checkpoints`: absolute for a local workdir, the URL as given for gs://... ."""
  if paths.is_remote(workdir):
    return paths.join(workdir, CHECKPOINT_SUBDIR)  # orbax takes gs:// URLs as they are
  return os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR))


def _handlers():
  return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


class Checkpointer:
  """Save / find / restore train states in `<workdir>/checkpoints` (all processes call it)."""

  def __init__(
    self, workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False
  ):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep if keep and keep > 0 else None,
      create=not read_only,
      read_only=read_only,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only,  # remove what a killed writer left behind
    )
    self._mgr = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "meta"), item_handlers=_handlers()
    )

  # --- queries -------------------------------------------------------------------------------
  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def saved_shapes(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    md = self._mgr.item_metadata(step)["state"]
    tree = getattr(md, "tree", md)
    return flat_shapes(tree)

  def reached_preemption(self, step: int) -> bool:
    """Orbax's multi-host preemption agreement (only meaningful under jax.distributed)."""
    return bool(self._mgr.reached_preemption(step))

  def read_meta(self, step: int) -> dict:
    return json.loads(paths.read_text(paths.join(self.directory, str(step), "meta", "metadata")))

  # --- save / restore ------------------------------------------------------------------------
  def save(self, step: int, state, meta: Mapping[str, Any]) -> bool:
    """Start writing `state` at `step` (async); returns False if that step is already saved."""
    if step in self._mgr.all_steps():
      return False
    self._mgr.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(serialization.to_state_dict(state)),
        meta=ocp.args.JsonSave(dict(meta, step=int(step))),
      ),
      force=True,
    )
    return True

  def wait(self):
    self._mgr.wait_until_finished()

  def close(self):
    """Wait for in-flight writes and release the manager (safe to call twice)."""
    if self._mgr is not None:
      self._mgr.wait_until_finished()
      self._mgr.close()
      self._mgr = None

  def check_compatible(self, step: int, abstract_state):
    """Raise CheckpointMismatchError unless the saved tree has the expected arrays and shapes."""
    expected = flat_shapes(serialization.to_state_dict(abstract_state))
    check_compatible(f"{self.directory}/{step}", self.saved_shapes(step), expected)

  def restore(self, step: int, abstract_state):
    """Restore `step` into the structure, dtypes and shardings of `abstract_state`.

    `abstract_state` is a TrainState of jax.ShapeDtypeStruct (with .sharding) or of real arrays.
    Returns (state, meta).
    """
    self.check_compatible(step, abstract_state)
    target = _as_abstract(serialization.to_state_dict(abstract_state))
    restored = self._mgr.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
    )
    state = serialization.from_state_dict(abstract_state, restored["state"])
    return state, dict(restored["meta"] or {})


def load_variables(
  path: str, *, step: int | None = None, prefer_ema: bool = True
) -> tuple[dict, dict, int]:
  """Read params and batch_stats (EMA if present) from a checkpoint of this package.

  `path` is a workdir, its `checkpoints` directory or a single step directory. Used by
  `config.init_from` (fine-tuning) and `--mode=eval`. Returns (params, batch_stats, step); the
  arrays come back as host numpy arrays. No pickle: orbax reads tensorstore arrays and JSON.
  """
  path = paths.normalize(path)
  if paths.isdir(paths.join(path, "state")):  # a step directory
    if paths.is_remote(path):
      root, _, name = path.rstrip("/").rpartition("/")
    else:
      root, name = os.path.dirname(path), os.path.basename(path)
    step = int(name)
  elif paths.isdir(paths.join(path, CHECKPOINT_SUBDIR)):
    root = paths.join(path, CHECKPOINT_SUBDIR)
  else:
    root = path
  if not paths.isdir(root):
    raise FileNotFoundError(f"init_from: no checkpoint directory at {path}")
  mgr = ocp.CheckpointManager(
    root,
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    item_names=("state", "meta"),
    item_handlers=_handlers(),
  )
  try:
    if step is None:
      step = mgr.latest_step()
      if step is None:
        raise FileNotFoundError(f"init_from: no complete checkpoint under {root}")
    md = mgr.item_metadata(step)["state"]
    tree = getattr(md, "tree", md)
    device = jax.local_devices()[0]
    target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(
        m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(device)
      ),
      tree,
      is_leaf=lambda m: hasattr(m, "shape"),
    )
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    restored = jax.device_get(restored["state"])
  finally:
    mgr.close()
  if prefer_ema and restored.get("ema_params"):
    return restored["ema_params"], restored.get("ema_batch_stats") or {}, int(step)
  params = restored["params"]
  batch_stats = restored.get("batch_stats") or {}
  return params, batch_stats, int(step)


def merge_pretrained(init_params, loaded_params, log=logging.info):
  """Take every loaded array whose path and shape match; keep the fresh init elsewhere.

  A classifier head with another number of classes is the usual (and logged) re-initialised part.
  Returns (params, reinitialised_names).
  """
  loaded = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(loaded_params)[0]}
  reinit = []

  def pick(path, fresh):
    name = _path_str(path)
    src = loaded.get(name)
    if src is None or tuple(src.shape) != tuple(fresh.shape):
      reinit.append(name)
      return fresh
    return np.asarray(src, dtype=fresh.dtype)

  merged = jax.tree_util.tree_map_with_path(pick, init_params)
  if reinit:
    log(
      "init_from: re-initialised %d arrays not matching the checkpoint: %s",
      len(reinit),
      ", ".join(reinit[:_MAX_LISTED]) + (" ..." if len(reinit) > _MAX_LISTED else ""),
    )
  return merged, reinit

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

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
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


class CheckpointUnreadableError(RuntimeError):
  """No checkpoint of a workdir (or not the one named) can be read; `str()` is one line."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint write failed (no space, permission, quota); `str()` is one line that names the
  path, the error, the last complete checkpoint and how to go on."""


def first_line(error: BaseException, limit: int = 240) -> str:
  """The gist of an error from deep inside orbax/tensorstore: the operating system's message where
  the chain carries one ('no space left on device'), else the error's first line, without
  tensorstore's JSON spec."""
  chain, e = [], error
  while e is not None and e not in chain:
    chain.append(e)
    e = e.__cause__ or e.__context__
  for e in chain:
    if isinstance(e, OSError) and e.strerror:
      return e.strerror.lower() + (f": {e.filename}" if e.filename else "")
    code = re.search(r"os_error_code=\\?'(\d+)", str(e))  # tensorstore's way of saying errno
    if code:
      return os.strerror(int(code.group(1))).lower()
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  text = text.split(" [tensorstore_spec=")[0]
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _quiet_aborted_reads() -> None:
  """After a failed restore, tensorstore still completes the aborted reads' futures, whose
  callbacks then find orbax's event loop closed: each one would print a 'RuntimeError: Event loop
  is closed' traceback (hundreds per checkpoint). Those, and only those, are dropped from then on.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_callbacks", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
      return
    previous(unraisable)

  hook.drops_closed_loop_callbacks = True
  sys.unraisablehook = hook


def _nbytes(tree) -> int:
  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


def _size(n: int) -> str:
  return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


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
    self._pending: tuple[int, int] | None = None  # (step, bytes) of the last write started
    self._failed: CheckpointWriteError | None = None

  # --- queries -------------------------------------------------------------------------------
  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def saved_shapes(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    md = self._mgr.item_metadata(step)["state"]
    shapes = flat_shapes(getattr(md, "tree", md))
    if not shapes:  # a checkpoint without array metadata is damaged, not of another model
      raise ValueError(f"the array metadata of {self.directory}/{step} is missing or empty")
    return shapes

  def reached_preemption(self, step: int) -> bool:
    """Orbax's multi-host preemption agreement (only meaningful under jax.distributed)."""
    return bool(self._mgr.reached_preemption(step))

  def read_meta(self, step: int) -> dict:
    return json.loads(paths.read_text(paths.join(self.directory, str(step), "meta", "metadata")))

  # --- save / restore ------------------------------------------------------------------------
  def save(self, step: int, state, meta: Mapping[str, Any]) -> bool:
    """Start writing `state` at `step` (async); returns False if that step is already saved.

    A failed write raises CheckpointWriteError, here or (async) from the next `check_for_errors`,
    `wait` or `save`; its half-written tmp folder is removed first.
    """
    self.wait()  # orbax would wait for the previous write inside save(): report its failure as its own
    if step in self._mgr.all_steps():
      return False
    self._pending = (int(step), _nbytes(state))
    try:
      self._mgr.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(serialization.to_state_dict(state)),
          meta=ocp.args.JsonSave(dict(meta, step=int(step))),
        ),
        force=True,
      )
    except Exception as e:  # pylint: disable=broad-except  (a synchronous part of the write)
      raise self._write_error(e) from None
    return True

  def check_for_errors(self) -> None:
    """Raise CheckpointWriteError if an async write has failed since the last call (cheap: the
    trainer calls it every step, so a full disk stops the run at the next step)."""
    if self._mgr is None:
      return
    try:
      self._mgr.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e) from None

  def wait(self):
    try:
      self._mgr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e) from None

  def close(self):
    """Wait for in-flight writes and release the manager (safe to call twice). A write failure
    already reported is not raised again."""
    if self._mgr is None:
      return
    try:
      if self._failed is None:
        self.wait()
    finally:
      try:
        self._mgr.close()
      except Exception:  # pylint: disable=broad-except  (its failure was reported above)
        pass
      self._mgr = None

  def _write_error(self, error: BaseException) -> CheckpointWriteError:
    if self._failed is not None:  # orbax re-raises the same failure at every later call
      return self._failed
    step, nbytes = self._pending or (None, 0)
    removed = self._remove_tmp_dirs()
    done = [s for s in self._mgr.all_steps(read=True) if s != step] if self._mgr else []
    where = f"{self.directory}/{step}" if step is not None else self.directory
    need = f" (its arrays need about {_size(nbytes)}" if nbytes else ""
    if need and not paths.is_remote(self.directory):
      try:
        need += f", {_size(shutil.disk_usage(self.directory).free)} free"
      except OSError:
        pass
    need += ")" if need else ""
    then = (
      f"the last complete checkpoint is step {max(done)}; rerunning the same command resumes from it"
      if done
      else "there is no complete checkpoint yet; rerunning the same command starts from step 0"
    )
    self._failed = CheckpointWriteError(
      f"cannot write checkpoint {where}: {first_line(error)}{need}; {then}"
      + (f" (removed the half-written {', '.join(removed)})" if removed else "")
    )
    return self._failed

  def _remove_tmp_dirs(self) -> list[str]:
    if paths.is_remote(self.directory) or jax.process_index() != 0:
      return []  # orbax removes remote tmp dirs itself at the next start (cleanup_tmp_directories)
    removed = []
    for path in glob.glob(os.path.join(self.directory, "*.orbax-checkpoint-tmp*")):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(os.path.basename(path))
    return removed

  def restore_latest(self, abstract_state):
    """Restore the newest checkpoint that reads; -> (step, state, meta), or None without any.

    A newer one that cannot be read (unreadable, truncated, a missing or corrupt metadata or
    array file) costs one warning: it is moved aside to `<step>.corrupt` (never deleted) once an
    older one has been restored. CheckpointMismatchError (another model) is raised as it is; if
    no checkpoint reads, CheckpointUnreadableError names the steps tried and nothing is moved.
    """
    failed = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, abstract_state)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        _quiet_aborted_reads()
        failed.append((step, first_line(e)))
        continue
      for bad, why in failed:
        moved = self._move_aside(bad)
        logging.warning(
          "checkpoint at step %d cannot be restored (%s); moved it to %s and resumed from step %d",
          bad,
          why,
          moved,
          step,
        )
      return step, state, meta
    if failed:
      tried = ", ".join(str(s) for s, _ in failed)
      raise CheckpointUnreadableError(
        f"no checkpoint in {self.directory} can be restored (tried steps {tried}; step "
        f"{failed[0][0]}: {failed[0][1]}); nothing was changed: move the unreadable step folders "
        "out of it to start again from step 0, or restore them from a backup"
      )
    return None

  def _move_aside(self, step: int) -> str:
    src = paths.join(self.directory, str(step))
    dst, n = f"{src}.corrupt", 1
    while paths.exists(dst):
      n += 1
      dst = f"{src}.corrupt{n}"
    if jax.process_index() == 0:
      paths.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
    self._mgr.reload()
    return dst

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
    try:
      restored = _read_state(mgr, step)
    except Exception as e:  # pylint: disable=broad-except
      _quiet_aborted_reads()
      raise CheckpointUnreadableError(
        f"checkpoint {paths.join(root, str(step))} cannot be read ({first_line(e)}); "
        "name another step directory, or restore this one from a backup"
      ) from None
  finally:
    mgr.close()
  if prefer_ema and restored.get("ema_params"):
    return restored["ema_params"], restored.get("ema_batch_stats") or {}, int(step)
  params = restored["params"]
  batch_stats = restored.get("batch_stats") or {}
  return params, batch_stats, int(step)


def _read_state(mgr, step: int) -> dict:
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
  return jax.device_get(restored["state"])


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

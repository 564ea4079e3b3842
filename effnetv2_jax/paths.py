"""Local paths and remote URLs (gs://BUCKET/run) behind one small set of file operations.

A remote path is any `scheme://...` string. Remote operations go through `etils.epath` (installed
with orbax), which reaches gs:// through TensorFlow's gfile or gcsfs. Local paths keep using the
plain `os` calls the package used before, so local behaviour does not change.

Remote URLs are never passed through os.path.abspath / expanduser: that turns `gs://b/run` into a
local directory `<cwd>/gs:/b/run`, which is the bug this module exists to prevent.
"""

from __future__ import annotations

import os
import re

# The files a workdir holds besides its checkpoints (effnetv2_jax.checkpoint) and TensorBoard events.
RESULTS_NAME = "results.json"  # a finished training run's; a sweep skips trials that have one
EVAL_RESULTS_NAME = "eval_results.json"  # --mode=eval of a training workdir
PLAN_NAME = "plan.json"  # --mode=plan --plan_probe: the measured plan (effnetv2_jax/plan_probe.py)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path) -> bool:
  """True for `scheme://...` URLs (gs://, s3://, ...); False for local paths."""
  return isinstance(path, str) and bool(_URL.match(path))


def _epath(path: str):
  """epath.Path for a remote URL. Tests replace this to map URLs onto a local directory."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  try:
    return epath.Path(path)
  except KeyError:  # epath knows no class for this scheme (e.g. file://)
    raise ValueError(
      f"{path}: URL scheme not supported (use a local path or gs://, s3://, az://)"
    ) from None


def normalize(path: str) -> str:
  """Absolute local path (~ expanded); a remote URL comes back unchanged."""
  if is_remote(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
  """os.path.join locally; for a URL, '/'-joined with the URL itself left as it is."""
  if is_remote(base):
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
  return os.path.join(base, *parts)


def exists(path: str) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  """mkdir -p. On GCS, directories are only name prefixes; this is a harmless no-op there."""
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def read_text(path: str) -> str:
  """File contents; FileNotFoundError if it is missing (locally and remotely)."""
  if is_remote(path):
    p = _epath(path)
    if not p.exists():
      raise FileNotFoundError(path)
    return p.read_text()
  with open(path) as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """Write a whole file. A GCS object write is atomic: readers see the old or the new object."""
  _write(path, text, "w")


def write_bytes(path: str, data: bytes) -> None:
  """`write_text` for binary contents (a plot)."""
  _write(path, data, "wb")


def _write(path: str, data, mode: str) -> None:
  if is_remote(path):
    target = _epath(path)
    if mode == "wb":
      target.write_bytes(data)
    else:
      target.write_text(data)
  else:
    with open(path, mode) as f:
      f.write(data)


def remove(path: str, missing_ok: bool = True) -> None:
  try:
    if is_remote(path):
      p = _epath(path)
      if not p.exists():
        raise FileNotFoundError(path)
      p.unlink()
    else:
      os.unlink(path)
  except FileNotFoundError:
    if not missing_ok:
      raise


def rename(src: str, dst: str) -> None:
  """Atomic os.replace locally; remotely a copy + delete (not atomic: prefer write_text)."""
  if is_remote(src) or is_remote(dst):
    _epath(src).replace(_epath(dst) if is_remote(dst) else dst)
  else:
    os.replace(src, dst)

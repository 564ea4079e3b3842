"""What a run tells the world: interval-averaged metrics, a progress line with ETA, results.json.

TensorBoard events go through clu's metric writers (process 0 only: the others get a logging-only
writer). results.json is written to a tmp file and renamed, so a reader never sees half of it;
on a gs:// workdir it is written as one object, which GCS also replaces atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np

from effnetv2_jax import paths


def params_checksum(params) -> str:
  """sha256 hex of every parameter's bytes, leaves in sorted path order (name, dtype, shape too).

  Replicated global arrays (multi-host) are read from one local shard, so every process computes
  the same digest without gathering.
  """
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, x in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError(f"params_checksum: {jax.tree_util.keystr(path)} is not replicated")
      x = x.addressable_data(0)
    a = np.ascontiguousarray(np.asarray(x))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  if h:
    return f"{h}h{m:02d}m"
  if m:
    return f"{m}m{s:02d}s"
  return f"{s}s"


class IntervalMeter:
  """Averages scalar train metrics over the steps since the last flush (host-side, no clu.Std).

  Each add() takes the step's metrics dict of device scalars; they are fetched lazily at flush so
  the host does not block on every step.
  """

  def __init__(self):
    self._pending: list[Mapping[str, Any]] = []
    self._t0 = time.perf_counter()
    self._steps = 0

  def add(self, metrics: Mapping[str, Any]):
    self._pending.append(metrics)
    self._steps += 1

  def flush(self) -> tuple[dict[str, float], float, int]:
    """Returns (means, seconds elapsed, steps) for the interval and starts a new one."""
    fetched = jax.device_get(self._pending)
    means: dict[str, float] = {}
    if fetched:
      for key in fetched[0]:
        vals = [float(np.asarray(m[key])) for m in fetched if key in m]
        means[key] = float(np.mean(vals)) if vals else float("nan")
    dt, steps = time.perf_counter() - self._t0, self._steps
    self._pending, self._steps, self._t0 = [], 0, time.perf_counter()
    return means, dt, steps


def progress_line(
  *,
  stage_index: int,
  num_stages: int,
  step: int,
  total_steps: int,
  metrics: Mapping[str, float],
  images_per_sec: float,
  eta_s: float,
) -> str:
  """`stage 2/4 step 1200/4000 (30.0%) loss 0.41 acc 0.87 lr 1.2e-03 312 img/s ETA 4m12s`."""
  pct = 100.0 * step / max(total_steps, 1)
  parts = [f"stage {stage_index + 1}/{num_stages}", f"step {step}/{total_steps} ({pct:.1f}%)"]
  if "loss" in metrics:
    parts.append(f"loss {metrics['loss']:.4f}")
  if "accuracy" in metrics:
    parts.append(f"acc {metrics['accuracy']:.3f}")
  if "lr" in metrics:
    parts.append(f"lr {metrics['lr']:.2e}")
  if metrics.get("bad_step"):
    parts.append(f"bad {metrics['bad_step']:.2f}")
  parts.append(f"{images_per_sec:.0f} img/s")
  parts.append(f"ETA {format_duration(eta_s)}")
  return " ".join(parts)


class EtaClock:
  """Estimates remaining time from training throughput measured in this process.

  Work is counted in pixel-steps (steps x image_size^2), since a progressive run's later stages
  cost more per step: a rate measured at 128 px would otherwise promise a far too early finish.
  Compile and eval time are excluded from the rate; each remaining stage is charged an average
  compile time (measured so far) so the ETA does not jump at stage boundaries.
  """

  def __init__(self):
    self.train_s = 0.0
    self.work = 0.0
    self.compile_s: list[float] = []

  def add_train(self, seconds: float, steps: int, image_size: int = 1):
    self.train_s += seconds
    self.work += steps * image_size**2

  def add_compile(self, seconds: float):
    self.compile_s.append(seconds)

  def eta(self, remaining: list[tuple[int, int]], remaining_stages: int = 0) -> float:
    """`remaining`: (steps, image_size) still to train, per stage."""
    if self.work == 0:
      return float("nan")
    per_unit = self.train_s / self.work
    compile_avg = float(np.mean(self.compile_s)) if self.compile_s else 0.0
    todo = sum(steps * size**2 for steps, size in remaining)
    return todo * per_unit + remaining_stages * compile_avg


def _jsonable(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return str(x)


def write_json_atomic(path: str, obj: Mapping[str, Any]):
  """Write JSON to `path` via a tmp file in the same directory and an atomic rename.

  A remote `path` (gs://...) is written directly: an object upload is atomic by itself, and a
  rename there would be a non-atomic copy + delete.
  """
  if paths.is_remote(path):
    paths.write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=False, default=_jsonable)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError:  # no space, permission: leave no half-written tmp file behind
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def create_writer(workdir: str):
  """clu writer: TensorBoard events + logging on process 0, logging only elsewhere."""
  from clu import metric_writers  # imported lazily: pulls in TF's summary ops

  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

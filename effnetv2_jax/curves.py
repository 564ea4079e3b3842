"""Time to accuracy: an eval curve recorded during training, when it crosses a target, a plot.

What the training loop records (results.json, and each checkpoint's metadata so a run resumed
after preemption keeps its earlier points):

  results['curve'] = Curve.to_dict() = {
      'eval_every_steps': int, 'eval_every_seconds': float, 'eval_subset': int (0 = all),
      'eval_s_total': float,                    # sum of the points' eval_s
      'points': [{'step', 'wall_s', 'images_seen', 'top1', 'top5', 'eval_s', 'stage',
                  'image_size', 'num_examples'}, ...]}          # in step order
  results['train_curve'] = TrainCurve.to_list() = [{'step', 'wall_s', 'loss'}, ...]
      # one entry per log interval: the mean train loss of the interval's steps, ending at `step`

Clock: `wall_s` is the run's wall clock (`train.StageLog.total_wall_s()`: seconds since the first
run of the workdir started, summed over its interrupted runs), so it counts everything the run
pays for: compiles, input, stage-end and curve evals, checkpoints. A point's `wall_s` is read
when the evaluated weights are ready (before its own eval; `Curve.measure` waits for pending
train steps first) and its `eval_s` is the eval's own duration, so a reader subtracts the eval
cost with `wall_s - sum(eval_s of the earlier points)` (`time_to(..., exclude_eval=True)`).

When: `Curve.due(step, now)` is true after a train step that is a multiple of `eval_every_steps`,
or when `eval_every_seconds` of wall clock passed since the last point's eval ended (or the run's
start); both 0 = no curve. Never twice for one step, never at step 0.

Multi-host: `due` by steps is the same on every process; by seconds it reads each host's clock,
so use `due_everywhere` (process 0 decides, one small broadcast per call) there, or every
process would not join the same eval.
"""

from __future__ import annotations

import io
import time
from typing import Any, Callable, Mapping, Sequence

from effnetv2_jax import paths

POINT_FIELDS = (
  "step",
  "wall_s",
  "images_seen",
  "top1",
  "top5",
  "eval_s",
  "stage",
  "image_size",
  "num_examples",
)
CURVES_PNG = "curves.png"


class Curve:
  """The eval points of one run (see the module docstring for the format and the clock)."""

  def __init__(self, every_steps: int = 0, every_seconds: float = 0.0, subset: int = 0):
    self.every_steps = int(every_steps)
    self.every_seconds = float(every_seconds)
    self.subset = int(subset)
    self.points: list[dict] = []

  @classmethod
  def from_config(cls, config, saved: Mapping | None = None, *, upto_step: int | None = None):
    """The config's settings (eval_every_steps, eval_every_seconds, eval_subset) with the points
    of `saved` (a checkpoint's meta['curve'], or None for a fresh run) up to `upto_step`."""
    curve = cls(
      config.get("eval_every_steps", 0),
      config.get("eval_every_seconds", 0.0),
      config.get("eval_subset", 0),
    )
    if saved:
      curve.points = _points_upto(saved.get("points", ()), upto_step)
    return curve

  @property
  def enabled(self) -> bool:
    return self.every_steps > 0 or self.every_seconds > 0

  def add(
    self,
    step: int,
    wall_s: float,
    images_seen: int,
    top1: float,
    top5: float,
    eval_s: float,
    stage: int,
    image_size: int,
    num_examples: int | None = None,
  ) -> dict:
    """Append one point (in step order) and return it."""
    if self.points and int(step) <= self.points[-1]["step"]:
      raise ValueError(f"curve point at step {step} after one at step {self.points[-1]['step']}")
    point = {
      "step": int(step),
      "wall_s": float(wall_s),
      "images_seen": int(images_seen),
      "top1": float(top1),
      "top5": float(top5),
      "eval_s": float(eval_s),
      "stage": int(stage),
      "image_size": int(image_size),
      "num_examples": None if num_examples is None else int(num_examples),
    }
    self.points.append(point)
    return point

  def _mark(self) -> float:
    """When the last curve eval ended on the run's clock (0: the run's start)."""
    if not self.points:
      return 0.0
    last = self.points[-1]
    return last["wall_s"] + last["eval_s"]

  def due(self, step: int, now: float) -> bool:
    """Whether to evaluate after train step `step`, the run's wall clock reading `now`."""
    step = int(step)
    if step <= 0 or not self.enabled:
      return False
    if self.points and self.points[-1]["step"] >= step:
      return False
    if self.every_steps > 0 and step % self.every_steps == 0:
      return True
    return self.every_seconds > 0 and now - self._mark() >= self.every_seconds

  def due_everywhere(self, step: int, now: float) -> bool:
    """`due`, decided by process 0 and broadcast when several processes train (see the module
    docstring); the plain `due` on one process, or when only `eval_every_steps` is set."""
    import jax  # pylint: disable=g-import-not-at-top

    decision = self.due(step, now)
    if jax.process_count() == 1 or self.every_seconds <= 0:
      return decision
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return bool(multihost_utils.broadcast_one_to_all(np.int32(decision)))

  def measure(
    self,
    evaluator: Callable[..., Mapping[str, Any]],
    variables,
    *,
    wall_clock: Callable[[], float],
    step: int,
    images_seen: int,
    stage: int,
    image_size: int,
    max_examples: int | None = None,
  ) -> dict:
    """Evaluate `variables` with `evaluator` (a train.Evaluator) and add the point.

    Waits for the train steps still running on the device before reading `wall_clock()`, so
    their time counts as training and `eval_s` is the eval alone.
    """
    import jax  # pylint: disable=g-import-not-at-top

    jax.block_until_ready(variables)
    wall_s = wall_clock()
    t0 = time.perf_counter()
    ev = evaluator(variables, max_examples=max_examples)
    eval_s = time.perf_counter() - t0
    return self.add(
      step,
      wall_s,
      images_seen,
      ev["top1"],
      ev["top5"],
      eval_s,
      stage,
      image_size,
      num_examples=ev.get("num_examples"),
    )

  @property
  def eval_s_total(self) -> float:
    return float(sum(p["eval_s"] for p in self.points))

  def to_dict(self) -> dict:
    return {
      "eval_every_steps": self.every_steps,
      "eval_every_seconds": self.every_seconds,
      "eval_subset": self.subset,
      "eval_s_total": self.eval_s_total,
      "points": [dict(p) for p in self.points],
    }

  @classmethod
  def from_dict(cls, d: Mapping | None, *, upto_step: int | None = None) -> Curve:
    """The inverse of `to_dict`; points after `upto_step` (the step resumed from) are dropped."""
    d = d or {}
    curve = cls(
      d.get("eval_every_steps", 0), d.get("eval_every_seconds", 0.0), d.get("eval_subset", 0)
    )
    curve.points = _points_upto(d.get("points", ()), upto_step)
    return curve


class TrainCurve:
  """The per-log-interval train loss: [{'step', 'wall_s', 'loss'}] (module docstring)."""

  def __init__(self, entries: Sequence[Mapping] = ()):
    self.entries = [dict(e) for e in entries]

  def add(self, step: int, wall_s: float, loss: float) -> dict:
    entry = {"step": int(step), "wall_s": float(wall_s), "loss": float(loss)}
    self.entries.append(entry)
    return entry

  def to_list(self) -> list[dict]:
    return [dict(e) for e in self.entries]

  @classmethod
  def from_list(cls, entries: Sequence[Mapping] | None, *, upto_step: int | None = None):
    return cls(_points_upto(entries or (), upto_step))


def _points_upto(points, upto_step: int | None) -> list[dict]:
  return [dict(p) for p in points if upto_step is None or int(p["step"]) <= int(upto_step)]


def _curve_points(results) -> list[dict]:
  """The points of a results dict, a Curve.to_dict(), a Curve, or a list of points."""
  if isinstance(results, Curve):
    return results.points
  if isinstance(results, Mapping):
    if "points" in results:
      return list(results["points"])
    return list((results.get("curve") or {}).get("points", ()))
  return list(results or ())


def _times(points: Sequence[Mapping], exclude_eval: bool) -> list[float]:
  out, paid = [], 0.0
  for p in points:
    out.append(p["wall_s"] - (paid if exclude_eval else 0.0))
    paid += p["eval_s"]
  return out


def time_to(results, top1: float, *, exclude_eval: bool = False) -> float | None:
  """Wall seconds at which the curve first reaches `top1`; None if it never does.

  `results`: a results dict (its 'curve'), a `Curve.to_dict()`, a `Curve` or a list of points.
  Linear interpolation in (wall seconds, top-1) between the last point below the target and the
  first at or above it; a target met by the first point is its time (nothing is assumed before
  it). `exclude_eval=True` first subtracts the earlier points' eval seconds from each time, which
  gives the time the run would have taken without curve evals.
  """
  points = _curve_points(results)
  times = _times(points, exclude_eval)
  for i, p in enumerate(points):
    if p["top1"] >= top1:
      if i == 0:
        return float(times[0])
      a0, a1 = points[i - 1]["top1"], p["top1"]
      frac = (top1 - a0) / (a1 - a0)  # a0 < top1 <= a1
      return float(times[i - 1] + frac * (times[i] - times[i - 1]))
  return None


def _step_to_wall(results) -> tuple[list[float], list[float]]:
  """(steps, wall seconds) pairs from the train curve and the eval points, for locating steps."""
  pairs = {0: 0.0}
  for e in results.get("train_curve") or ():
    pairs[int(e["step"])] = float(e["wall_s"])
  for p in _curve_points(results):
    pairs.setdefault(int(p["step"]), float(p["wall_s"]))
  steps = sorted(pairs)
  walls = [pairs[s] for s in steps]
  for i in range(1, len(walls)):  # a monotone clock even if the sources disagree a little
    walls[i] = max(walls[i], walls[i - 1])
  return [float(s) for s in steps], walls


def stage_starts(results) -> list[tuple[float, int, int]]:
  """(wall seconds, stage index, image size) where each stage of results['stages'] began: a
  record's 'start_wall_s' when the trainer stored one, else its first step located on the run's
  clock by linear interpolation of the recorded (step, wall_s) pairs."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  steps, walls = _step_to_wall(results)
  out = []
  for s in results.get("stages") or ():
    if s.get("start_wall_s") is not None:
      t = float(s["start_wall_s"])
    else:
      t = float(np.interp(s["first_step"], steps, walls))
    out.append((t, int(s["index"]), int(s["image_size"])))
  return out


def plot_curves(results: Mapping, path: str, *, title: str | None = None) -> str | None:
  """Write a PNG of top-1 (upper panel) and train loss (lower panel) against wall minutes, with
  the stage boundaries as vertical lines labelled with the stage's image size. Returns `path`,
  or None (nothing written) when `results` hold neither a curve nor a train curve. Local or
  remote (gs://) `path`; matplotlib's Agg backend, no display needed, no global pyplot state."""
  points = _curve_points(results)
  train = list(results.get("train_curve") or ())
  if not points and not train:
    return None
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(8, 6.5), dpi=100)
  FigureCanvasAgg(fig)
  ax_acc, ax_loss = fig.subplots(2, 1, sharex=True)
  minutes = lambda s: s / 60.0
  if points:
    ax_acc.plot(
      [minutes(p["wall_s"]) for p in points],
      [100 * p["top1"] for p in points],
      marker="o",
      markersize=3,
      label="top-1 (EMA)",
    )
    ax_acc.plot(
      [minutes(t) for t in _times(points, exclude_eval=True)],
      [100 * p["top1"] for p in points],
      linestyle="--",
      alpha=0.6,
      label="top-1, eval time excluded",
    )
    ax_acc.legend(loc="lower right", fontsize=8)
  else:
    ax_acc.text(
      0.5, 0.5, "no eval curve recorded", ha="center", va="center", transform=ax_acc.transAxes
    )
  ax_acc.set_ylabel("eval top-1 (%)")
  ax_acc.grid(alpha=0.3)
  if train:
    ax_loss.plot([minutes(e["wall_s"]) for e in train], [e["loss"] for e in train], color="C2")
  else:
    ax_loss.text(
      0.5, 0.5, "no train loss recorded", ha="center", va="center", transform=ax_loss.transAxes
    )
  ax_loss.set_ylabel("train loss")
  ax_loss.set_xlabel("wall time (minutes: compiles, input and evals included)")
  ax_loss.grid(alpha=0.3)
  for t, index, size in stage_starts(results):
    for ax in (ax_acc, ax_loss):
      ax.axvline(minutes(t), color="grey", linestyle=":", linewidth=1)
    ax_acc.annotate(
      f"{size}px",
      xy=(minutes(t), 1.0),
      xycoords=("data", "axes fraction"),
      xytext=(2, -10),
      textcoords="offset points",
      fontsize=8,
      color="grey",
    )
  if title is None:
    config = results.get("config") or {}
    title = str(config.get("model_name", "")) or None
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  data = buf.getvalue()
  paths.write_bytes(path, data)
  return path

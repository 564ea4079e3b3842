"""What a run carries from step to step besides the train state: the divergence guard and the
stage log (per-stage records, the time-to-accuracy curves, each checkpoint's metadata).
"""

from __future__ import annotations

import logging
import time

import jax

from effnetv2_jax import curves
from effnetv2_jax import progressive


class TrainingDivergedError(RuntimeError):
  """Too many consecutive non-finite steps; the last good checkpoint is left as it was."""


class DivergenceGuard:
  """Counts consecutive non-finite steps and stops the run after `max_bad_steps` in a row.

  The train step itself drops a non-finite update; this object only decides when to give up. Each
  step's flag is read on the host one step late (after the next step has been dispatched), so the
  host never waits for the device between steps; `check()` drains what is pending (before a
  checkpoint, at a stage end).
  """

  def __init__(self, max_bad_steps: int, checkpoint_dir: str):
    self.max_bad_steps = max_bad_steps
    self.checkpoint_dir = checkpoint_dir
    self.bad_run = 0
    self._pending: list[tuple[int, jax.Array]] = []

  @property
  def diverging(self) -> bool:
    """The last step read was bad: the state is the last good one, but never checkpoint now."""
    return self.bad_run > 0

  def observe(self, step: int, bad_step: jax.Array) -> None:
    """Record `step`'s device flag, after reading the previous step's (its device work is done)."""
    self.check()
    self._pending.append((step, bad_step))

  def check(self) -> None:
    while self._pending:
      step, bad_step = self._pending.pop(0)
      if float(bad_step) == 0:
        self.bad_run = 0
        continue
      self.bad_run += 1
      logging.warning(
        "step %d: non-finite loss or gradient, update skipped (%d in a row)", step, self.bad_run
      )
      if self.bad_run >= self.max_bad_steps:
        raise TrainingDivergedError(
          f"training diverged: {self.bad_run} consecutive non-finite steps ending at step "
          f"{step} (max_bad_steps={self.max_bad_steps}); the last good checkpoint in "
          f"{self.checkpoint_dir} is kept. Lower the learning rate or enable grad_clip_norm."
        )


def _stage_record(stage: progressive.Stage, prev: dict | None) -> dict:
  rec = {
    "index": stage.index,
    "image_size": stage.image_size,
    "randaug_magnitude": stage.randaug_magnitude,
    "mixup_alpha": stage.mixup_alpha,
    "cutmix_alpha": stage.cutmix_alpha,
    "dropout_rate": stage.dropout_rate,
    "first_step": stage.first_step,
    "last_step": stage.last_step,
    "steps": stage.num_steps,
    "batch_size": stage.batch_size,  # global; a resume checks it (train._check_stage_table)
    "first_example": stage.first_example,  # global images trained before the stage
    "wall_s": 0.0,
    "compile_s": 0.0,
    "compile_wait_s": 0.0,
  }
  if prev:  # accumulated by earlier (interrupted) runs of this workdir
    kept = ("wall_s", "compile_s", "compile_wait_s", "eval_top1", "eval_top5", "start_wall_s")
    # How an earlier run trained the stage (train.StageStep.record): a stage finished before
    # the restart is not compiled again, so its micro-batching is only known from there.
    kept += ("grad_accum_steps", "micro_batch", "peak_bytes", "memory_budget_bytes")
    rec.update({k: prev[k] for k in kept if k in prev})
  return rec


class StageLog:
  """Per-stage records (sizes, steps, wall and compile seconds, evals) and the run's wall clock,
  carried across interruptions in each checkpoint's metadata."""

  def __init__(self, stages, header: dict, config, meta: dict | None = None, step: int = 0):
    meta = meta or {}
    prev = {int(k): v for k, v in meta.get("stages", {}).items()}
    self.records = {s.index: _stage_record(s, prev.get(s.index)) for s in stages}
    self.header = dict(header)  # config hash, model name, class count
    self.prior_wall_s = float(meta.get("total_wall_s", 0.0))
    self.t0 = time.perf_counter()
    # Time to accuracy: eval points during training and the train loss per log interval, kept up
    # to the step resumed from (effnetv2_jax/curves.py).
    self.curve = curves.Curve.from_config(config, meta.get("curve"), upto_step=step)
    self.train_curve = curves.TrainCurve.from_list(meta.get("train_curve"), upto_step=step)

  def add_time(self, stage_index: int, **seconds: float) -> None:
    """Add to the stage's 'wall_s', 'compile_s' (the compile's own duration, wherever it ran)
    or 'compile_wait_s' (what the loop waited for it)."""
    rec = self.records[stage_index]
    for key, value in seconds.items():
      rec[key] += value

  def set_eval(self, stage_index: int, ev: dict) -> None:
    self.records[stage_index].update(eval_top1=ev["top1"], eval_top5=ev["top5"])

  def total_wall_s(self) -> float:
    return self.prior_wall_s + time.perf_counter() - self.t0

  def stages(self) -> list[dict]:
    return [self.records[i] for i in sorted(self.records)]

  def checkpoint_meta(self, step: int, stage_index: int) -> dict:
    return dict(
      self.header,
      step=step,
      stage=stage_index,
      total_wall_s=self.total_wall_s(),
      stages={str(k): v for k, v in self.records.items()},
      curve=self.curve.to_dict(),
      train_curve=self.train_curve.to_list(),
    )

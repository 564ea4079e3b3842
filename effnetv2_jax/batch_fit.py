"""progressive.batch_rule='fit': each stage's global batch is the largest whose compiled train step
fits the per-device memory budget (memory_fit.budget_bytes).

The stage table depends on the batches (each stage trains its share of the run's images in steps
of its own batch), so the trainer settles them once, when a run starts, in this order:

  1. plan.resolve gives the provisional table: every stage at batch_size. Its image sizes,
     regularization and shares of images are already final (none depends on the batch).
  2. Per stage, its train step (k = 1, no accumulation) is compiled, never run, at two global
     batches: one multiple and the cap (memory_fit.fit_batch); the line through their peaks gives
     the largest multiple under the budget. That batch is compiled once more and, should its own
     peak be over the budget (the line is a prediction), walked down until one fits. So a stage
     costs three compiles up front; the chosen batch is predicted to be the largest, and is
     measured to fit.
  3. plan.with_stage_batches(config, run, batches) is the run's table; LR (lr_per_256 * B / 256),
     schedule and EMA follow each stage's batch as for any per-stage batches.

The result is recorded in every checkpoint's metadata and in results.json ('batch_fit'). A resumed
run takes the batches from the newest checkpoint and measures nothing: the table a checkpoint was
trained on stays the table (train._check_stage_table compares them), even when the budget, the
compiler or the device would now give another answer.

  limits(config, num_devices)       -> (multiple, max_batch): what the batches are rounded to and
                                       capped at (0 = no max_batch_size: CAP_TIMES_BATCH_SIZE)
  fit_stage_batch(measure, budget, ...) -> (batch, {batch: peak measured})
  fit_batches(measure, budget, stages, ...) -> BatchFit (measure(stage, batch) -> peak bytes)
  recorded(checkpointer)            -> BatchFit | None (the newest readable checkpoint's)

Nothing here compiles or imports JAX: the trainer's `train.fit_measure` is the measure.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

from effnetv2_jax import memory_fit
from effnetv2_jax import progressive

# With progressive.max_batch_size = 0 a fitted batch is at most this many times batch_size: the
# upper probe must be some batch, and beyond ~16x the reference the linear LR scaling rule is far
# outside where it is known to hold (about 8k images). Set max_batch_size to cap lower.
CAP_TIMES_BATCH_SIZE = 16
META_KEY = "batch_fit"


def limits(config, num_devices: int) -> tuple[int, int]:
  """(multiple, max_batch): batches are multiples of lcm(devices, progressive.batch_multiple,
  bn_group_size), as under 'pixels', and at most progressive.max_batch_size (0: 16 x
  batch_size), rounded down to the multiple."""
  multiple = progressive.batch_multiple(config, num_devices)
  cap = int(config.progressive.get("max_batch_size", 0) or 0)
  cap = cap or CAP_TIMES_BATCH_SIZE * int(config.batch_size)
  return multiple, cap // multiple * multiple


@dataclasses.dataclass(frozen=True)
class BatchFit:
  """The batches 'fit' chose and what they were chosen from."""

  batches: tuple[int, ...]  # global batch per stage
  budget_bytes: int  # per device
  multiple: int
  max_batch: int
  image_sizes: tuple[int, ...]
  measured: tuple[dict, ...]  # per stage: global batch -> peak bytes per device, as compiled
  seconds: float = 0.0  # what measuring took when the run started (compiles, before step 0)

  def peak(self, stage_index: int) -> int:
    """The measured peak of the stage's chosen batch."""
    return self.measured[stage_index][self.batches[stage_index]]

  def to_dict(self) -> dict:
    return {
      "batches": list(self.batches),
      "budget_bytes": self.budget_bytes,
      "multiple": self.multiple,
      "max_batch": self.max_batch,
      "image_sizes": list(self.image_sizes),
      "measured": [{str(b): p for b, p in sorted(m.items())} for m in self.measured],
      "seconds": self.seconds,
    }

  @classmethod
  def from_dict(cls, d: dict) -> "BatchFit":
    return cls(
      batches=tuple(int(b) for b in d["batches"]),
      budget_bytes=int(d["budget_bytes"]),
      multiple=int(d["multiple"]),
      max_batch=int(d["max_batch"]),
      image_sizes=tuple(int(s) for s in d["image_sizes"]),
      measured=tuple({int(b): int(p) for b, p in m.items()} for m in d["measured"]),
      seconds=float(d.get("seconds", 0.0)),
    )


def _does_not_fit(stage, multiple, num_devices, needed, budget) -> memory_fit.DoesNotFitError:
  return memory_fit.DoesNotFitError(
    f"stage {stage.index} ({stage.image_size}px) does not fit in device memory under "
    f"progressive.batch_rule 'fit': its smallest batch, {multiple} images "
    f"({multiple // num_devices} per device), needs {memory_fit.format_bytes(needed)} per "
    f"device, the budget is {memory_fit.format_bytes(budget)} (config.device_memory_bytes, 0 = "
    "the device's limit less config.device_memory_margin). Use a smaller "
    "progressive.batch_multiple, more devices, bfloat16, model_overrides.remat=True, or a "
    "smaller progressive.max_image_size"
  )


def fit_stage_batch(
  measure: Callable[[int], int],
  budget: int,
  *,
  multiple: int,
  max_batch: int,
  stage: progressive.Stage,
  num_devices: int,
) -> tuple[int, dict]:
  """-> (batch, {batch: peak}): the largest multiple of `multiple` up to `max_batch` that the
  line through two measured peaks predicts under `budget`, measured to fit (walked down along
  the line through the measured points when its own peak is over). `measure(batch)` compiles the
  stage's step at that global batch and returns its per-device peak bytes. DoesNotFitError
  naming the stage, its image size and the bytes when even one multiple is over the budget."""
  measured: dict[int, int] = {}

  def peak(batch: int) -> int:
    if batch not in measured:
      measured[batch] = int(measure(batch))
    return measured[batch]

  batch = memory_fit.fit_batch(peak, budget, multiple=multiple, max_batch=max_batch)
  if batch == 0:
    raise _does_not_fit(stage, multiple, num_devices, measured[multiple], budget)
  while peak(batch) > budget:  # fit_batch measured one multiple within it, so this ends there
    below = max(b for b, p in measured.items() if p <= budget)
    line = memory_fit.PeakLine.through((below, measured[below]), (batch, measured[batch]))
    guess = line.largest_fitting(budget, multiple, max_batch)
    logging.info(
      "stage %d: batch %d needs %d bytes, over the budget %d; trying %d",
      stage.index,
      batch,
      measured[batch],
      budget,
      max(below, min(batch - multiple, guess)),
    )
    batch = max(below, min(batch - multiple, guess))
  return batch, dict(sorted(measured.items()))


def fit_batches(
  measure: Callable[[progressive.Stage, int], int],
  budget: int,
  stages: Sequence[progressive.Stage],
  *,
  multiple: int,
  max_batch: int,
  num_devices: int,
) -> BatchFit:
  """Every stage's batch (`fit_stage_batch` with `measure(stage, batch)`): the table's image
  sizes and regularization are those of `stages` (the provisional table), their batches unused."""
  batches, measured = [], []
  for stage in stages:
    batch, points = fit_stage_batch(
      lambda b, s=stage: measure(s, b),
      budget,
      multiple=multiple,
      max_batch=max_batch,
      stage=stage,
      num_devices=num_devices,
    )
    logging.info(
      "stage %d (%dpx): batch %d fits %d bytes (measured %s)",
      stage.index,
      stage.image_size,
      batch,
      budget,
      points,
    )
    batches.append(batch)
    measured.append(points)
  return BatchFit(
    batches=tuple(batches),
    budget_bytes=int(budget),
    multiple=int(multiple),
    max_batch=int(max_batch),
    image_sizes=tuple(int(s.image_size) for s in stages),
    measured=tuple(measured),
  )


def recorded(checkpointer) -> BatchFit | None:
  """The batches recorded in the newest checkpoint whose metadata reads; None without any, or
  when that checkpoint was not trained under 'fit' (then the trainer fits, and the stage-table
  check refuses a resume whose batches differ)."""
  for step in sorted(checkpointer.all_steps(), reverse=True):
    try:
      meta = checkpointer.read_meta(step)
    except Exception:  # pylint: disable=broad-except  (restore_latest skips it too)
      continue
    fit = meta.get(META_KEY)
    return BatchFit.from_dict(fit) if fit else None
  return None

"""Fitting a stage's train step into device memory: measured peaks, a linear fit, micro-batches.

XLA's buffer assignment knows, per device, what a compiled program needs before it ever runs
(`compiled.memory_analysis()`): its arguments (the state and the batch), its outputs (aliased to
the donated state), and its temporaries (activations kept for the backward, scratch). So a
batch that fits can be chosen from compiles alone, nothing allocated:

  peak_bytes(compiled)              the per-device peak of one compiled step
  budget_bytes(config, device)      what one device may use: config.device_memory_bytes, or what
                                    the device reports minus config.device_memory_margin
  fit_batch(measure, budget, ...)   the largest batch that fits, from a line through the peaks
                                    measured at two batch sizes (not a search of compiles)
  plan_stage(measure, budget, target)  (micro-batch, k): the fewest micro-batches of a stage's global
                                    batch whose step fits; DoesNotFitError when none does
  fit_stage(compile_at, budget, target)  plan_stage over real compiles, checked on the chosen program

Peak memory is close to linear in the batch: the state is a fixed cost and activations grow per
image. The line is fitted through two measured points and used between them; the program finally
chosen is compiled anyway (it is the step the stage runs), so its own peak is checked and one more
micro-batch is taken in case the line was optimistic. With accumulation the peak against the
micro-batch is rather the larger of a floor (the update after the scan: params, gradients,
optimizer slots, EMA) and a line (experiments/results/bench_memory_accum.md: B0 at 128 px needs
the same 278 MiB at 4 and at 1 image per micro-batch), a convex curve, so plan_stage's chord lies
above it: its k fits, at worst one step more micro-batches than the fewest that would.

Nothing here imports TensorFlow or builds a model: the `measure`/`compile_at` callables do.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

GiB = 2.0**30


class DoesNotFitError(ValueError):
  """Even the smallest micro-batch of a stage needs more memory per device than the budget."""


def peak_bytes(compiled) -> int:
  """Per-device bytes `compiled` (a `jax.stages.Compiled`) needs while it runs.

  arguments + outputs - aliased + temporaries: the donated state's outputs reuse its argument
  buffers (alias), so they are counted once; generated code is left out (kilobytes to a few MiB,
  inside the budget's margin). The same sum on every backend: this jaxlib's CompiledMemoryStats
  has no peak field of its own (newer ones add `peak_memory_in_bytes`, not on every backend).
  """
  m = compiled.memory_analysis()
  if m is None:
    raise RuntimeError("this backend reports no memory analysis for compiled programs")
  return int(
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )


def host_memory_bytes() -> int:
  """Physical RAM of this host (0 where the OS does not say)."""
  try:
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
  except (ValueError, OSError, AttributeError):
    return 0


def device_memory_bytes(device, margin: float) -> int:
  """What `device` may use, less the `margin` fraction kept for what the step's analysis does not
  count (the next batch already on the device, allocator fragmentation, the eval step).

  GPU/TPU: the allocator's `bytes_limit` (on GPU already XLA_PYTHON_CLIENT_MEM_FRACTION of the
  card). CPU devices report nothing; they share the host's RAM, so each gets the physical RAM
  divided by the number of CPU devices of this process (several when
  --xla_force_host_platform_device_count emulates a mesh). Set config.device_memory_bytes to
  override either.
  """
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without the call)
    stats = None
  limit = int((stats or {}).get("bytes_limit", 0))
  if not limit:
    import jax  # pylint: disable=g-import-not-at-top

    share = max(1, len([d for d in jax.local_devices() if d.platform == device.platform]))
    limit = host_memory_bytes() // share
  if not limit:
    raise RuntimeError(
      f"device {device} reports no memory limit and the host's RAM is unknown: set "
      "config.device_memory_bytes"
    )
  return int(limit * (1.0 - margin))


def budget_bytes(config, device) -> int:
  """config.device_memory_bytes when set (> 0: taken as it is, no margin), else
  `device_memory_bytes(device, config.device_memory_margin)`."""
  configured = int(config.get("device_memory_bytes", 0) or 0)
  if configured > 0:
    return configured
  return device_memory_bytes(device, float(config.get("device_memory_margin", 0.1)))


@dataclasses.dataclass(frozen=True)
class PeakLine:
  """peak(batch) ~ intercept + slope * batch, through two measured points."""

  intercept: float  # bytes: the state and everything else the batch does not scale
  slope: float  # bytes per image of the (global or micro-) batch
  points: tuple[tuple[int, int], ...]  # the (batch, measured peak) it was fitted through

  @classmethod
  def through(cls, a: tuple[int, int], b: tuple[int, int]) -> "PeakLine":
    (b1, p1), (b2, p2) = sorted((a, b))
    if b1 == b2:
      raise ValueError(f"a line needs two different batch sizes, got {b1} twice")
    slope = (p2 - p1) / (b2 - b1)
    return cls(float(p1 - slope * b1), float(slope), ((b1, p1), (b2, p2)))

  def at(self, batch: int) -> float:
    return self.intercept + self.slope * batch

  def largest_fitting(self, budget: int, multiple: int, max_batch: int) -> int:
    """The largest multiple of `multiple` up to `max_batch` predicted to fit (0: none)."""
    if self.slope <= 0:  # no growth measured: everything up to max_batch fits if anything does
      top = max_batch // multiple * multiple
      return top if self.at(top) <= budget else 0
    batch = int((budget - self.intercept) // self.slope)
    return max(0, min(batch, max_batch) // multiple * multiple)


def fit_batch(
  measure: Callable[[int], int],
  budget: int,
  *,
  multiple: int,
  max_batch: int,
  probes: tuple[int, int] | None = None,
) -> int:
  """The largest batch (a multiple of `multiple`, at most `max_batch`) whose step fits `budget`.

  `measure(batch)` compiles the step at `batch` (never runs it) and returns its `peak_bytes`.
  It is called twice, at `probes` (default: `multiple` and `max_batch`, so the answer lies
  between them), and the line through the two peaks gives the answer; a probe that already
  measures within the budget at `max_batch` is the answer. 0 when even `multiple` does not fit.
  The returned batch is predicted, not measured (callers compile it anyway: `fit_stage` checks).
  """
  if multiple < 1 or max_batch < multiple:
    raise ValueError(f"need 1 <= multiple <= max_batch, got {multiple}, {max_batch}")
  top = max_batch // multiple * multiple
  lo, hi = probes or (multiple, top)
  p_hi = measure(hi)
  if hi == top and p_hi <= budget:
    return top
  p_lo = measure(lo)
  if lo == multiple and p_lo > budget:
    return 0
  return PeakLine.through((lo, p_lo), (hi, p_hi)).largest_fitting(budget, multiple, max_batch)


def accum_candidates(batch_size: int, num_devices: int, group_size: int = 0) -> list[int]:
  """The k that split `batch_size` into equal micro-batches evenly spread over `num_devices`
  (k divides the batch per device) and tiled by BN groups of `group_size` (0: any); ascending."""
  per_device = batch_size // num_devices
  ks = [k for k in range(1, per_device + 1) if per_device % k == 0]
  if group_size:
    ks = [k for k in ks if (batch_size // k) % group_size == 0]
  return ks


def format_bytes(n: float) -> str:
  """'1.25 GiB (1342177280 bytes)': the error messages' form."""
  return f"{n / GiB:.2f} GiB ({int(n)} bytes)"


def does_not_fit(stage_index, image_size, micro_batch, k, num_devices, needed, budget):
  per_device = micro_batch // num_devices
  return DoesNotFitError(
    f"stage {stage_index} ({image_size}px) does not fit in device memory: even micro-batches of "
    f"{micro_batch} images ({per_device} per device, {k} accumulation steps) need "
    f"{format_bytes(needed)} per device, the budget is {format_bytes(budget)} "
    "(config.device_memory_bytes, 0 = the device's limit less config.device_memory_margin). "
    "Use bfloat16, model_overrides.remat=True, more devices, or a smaller progressive.max_image_size"
  )


@dataclasses.dataclass(frozen=True)
class FitTarget:
  """The stage whose step is fitted: its global batch over `num_devices`, in BN groups of
  `group_size` (0: none), and what an error names (stage index, image size)."""

  batch_size: int
  num_devices: int
  stage_index: int
  image_size: int
  group_size: int = 0


def plan_stage(measure: Callable[[int], int], budget: int, target: FitTarget) -> tuple[int, int]:
  """-> (micro_batch, k): the smallest k whose micro-batch of batch_size / k is predicted to fit.

  `measure(micro_batch)` compiles the stage's step for the whole global batch trained as
  batch_size / micro_batch micro-batches and returns its per-device `peak_bytes`. The full batch
  is measured first (k = 1: no accumulation when it fits), then the smallest micro-batch the
  candidates allow (one image per device when BN groups permit: DoesNotFitError, naming the
  stage, image size and bytes, when even that exceeds the budget) and the largest accumulated one
  (k = the smallest candidate above 1); the line through those two gives k for the rest.
  """
  batch_size, num_devices, group_size = target.batch_size, target.num_devices, target.group_size
  stage_index, image_size = target.stage_index, target.image_size
  ks = accum_candidates(batch_size, num_devices, group_size)
  if not ks:
    raise ValueError(
      f"stage {stage_index}: no micro-batch of {batch_size} tiles {num_devices} devices and BN "
      f"groups of {group_size}"
    )
  if measure(batch_size) <= budget:
    return batch_size, 1
  k_max = ks[-1]
  smallest = batch_size // k_max
  p_small = measure(smallest)
  if p_small > budget:
    raise does_not_fit(stage_index, image_size, smallest, k_max, num_devices, p_small, budget)
  accumulated = [k for k in ks if k > 1]
  k2 = accumulated[0]
  if k2 == k_max:
    return smallest, k_max
  p2 = measure(batch_size // k2)
  if p2 <= budget:
    return batch_size // k2, k2
  # Between the two accumulated programs: both carry the same gradient buffers, so one line.
  line = PeakLine.through((smallest, p_small), (batch_size // k2, p2))
  for k in accumulated[1:]:
    if line.at(batch_size // k) <= budget:
      return batch_size // k, k
  return smallest, k_max


@dataclasses.dataclass(frozen=True)
class StageFit:
  """What `fit_stage` chose and what it measured."""

  compiled: Any  # the chosen program, compiled: the step the stage runs
  grad_accum_steps: int
  micro_batch: int
  peak_bytes: int
  budget_bytes: int
  measured: dict  # micro-batch -> peak bytes of every program compiled to decide


def fit_stage(compile_at: Callable[[int], Any], budget: int, target: FitTarget) -> StageFit:
  """`plan_stage` with `compile_at(k)` (the stage's step, compiled with k micro-batches) as the
  measure; the chosen program is the one returned (compiled once: every compile is kept until
  the choice is made), after its own peak is checked against the budget (the next k when the
  line's prediction was low)."""
  batch_size, stage_index = target.batch_size, target.stage_index
  compiled: dict[int, Any] = {}
  measured: dict[int, int] = {}

  def program(k: int):
    if k not in compiled:
      compiled[k] = compile_at(k)
      measured[batch_size // k] = peak_bytes(compiled[k])
    return compiled[k]

  def measure(micro_batch: int) -> int:
    program(batch_size // micro_batch)
    return measured[micro_batch]

  _, planned = plan_stage(measure, budget, target)
  ks = accum_candidates(batch_size, target.num_devices, target.group_size)
  # plan_stage measured the smallest micro-batch within the budget, so this loop ends by k_max.
  for k in ks[ks.index(planned) :]:
    chosen = program(k)
    if measured[batch_size // k] <= budget:
      break
    logging.info(
      "stage %d: %d micro-batches need %d bytes, over the predicted fit; trying more",
      stage_index,
      k,
      measured[batch_size // k],
    )
  return StageFit(
    compiled=chosen,
    grad_accum_steps=k,
    micro_batch=batch_size // k,
    peak_bytes=measured[batch_size // k],
    budget_bytes=int(budget),
    measured=dict(sorted(measured.items())),
  )

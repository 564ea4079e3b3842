"""Progressive learning with adaptive regularization: the stage table.

Training runs in `num_stages` stages. Each stage has its own image size and regularization strength
(RandAugment magnitude, mixup and CutMix alpha, dropout); weights, optimizer slots, EMA, BN statistics
and the global step carry over between stages, and the learning-rate schedule is global. Stage i
covers steps [int(i/M * N), int((i+1)/M * N)) of the N total steps, in every preset, unless
`stage_fractions` or the 'hold_then_ramp' size curve (below) set other lengths.

How the per-stage values are interpolated between the config's `min_*` and `max_*` end points is
the `preset`:

- 'paper': the paper's Algorithm 1. Everything, dropout included, moves linearly from the min values
  at stage 0 to the max values at the last stage: v_i = v_min + (v_max - v_min) * i / (M - 1).
- 'official': what the released code does. Image size int(min + (max - min) * (i + 1) / M), so the
  first stage is already above `min_image_size` (S: 171, 214, 257, 300); RandAugment, mixup and CutMix
  are linspace(min, max, M)[i]; dropout is not scheduled and stays at `max_dropout`.
- 'none': a single stage at the max size and max regularization (the non-progressive baseline).

Beyond equal linear stages (both optional; the defaults give exactly the tables above):

- `progressive.stage_fractions`: the stages' lengths as fractions of training, one per stage,
  summing to 1, e.g. (0.25, 0.25, 0.5); empty = equal lengths. Stage i ends at step
  int(c_i * N) where c_i is the cumulative fraction through stage i (the last ends at N exactly),
  so the boundaries are integers covering [0, N) without gaps; every stage must get at least one
  step (validation). Sizes and regularization still follow the preset, by stage index.
- `progressive.size_curve`: 'linear' (the preset's rule above) or 'hold_then_ramp': hold
  `min_image_size` for `hold_fraction` of training, ramp up, and keep `max_image_size` for a tail
  of `tail_fraction`. The loop compiles once per stage, so a stage is a constant (size, reg) over
  its steps, and the curve maps onto the `num_stages` = M discrete stages like this:
    * stage sizes move in equal steps, as in Algorithm 1: stage i gets
      size_i = min + (max - min) * i / (M - 1) (then `size_multiple` rounding);
    * lengths: with hold_fraction > 0 the first stage (min size) covers the hold; with
      tail_fraction > 0 the last stage (max size) covers the tail; the R remaining "ramp" stages
      share the rest, 1 - hold - tail, equally. With hold = tail = 0 this is the paper table.
    * regularization follows the size as in Algorithm 1: t_i = (size_i - min) / (max - min)
      (before rounding, so t_i = i / (M - 1)) for RandAugment, mixup and CutMix, and for dropout
      under 'paper'; under 'official' dropout stays at `max_dropout`, as that preset keeps it.
  So hold_then_ramp is the paper's sizes with stage lengths (hold, ramp/R, ..., ramp/R, tail);
  it needs M >= 1 + (hold > 0) + (tail > 0) stages, and `stage_fractions` must stay empty (the
  fractions follow from hold and tail). Neither applies to 'none' (one stage; validation).

Per-stage batch size (`progressive.batch_rule`, `progressive.batch_sizes`; the defaults keep
every stage at `config.batch_size`, the reference batch B_ref, in every preset):

- 'constant': every stage trains at B_ref (the released code and the paper).
- 'pixels': B_i = B_ref * (S_last / S_i)^2, so a batch holds about as many pixels as the last
  stage's: rounded down to a multiple of lcm(device count, `batch_multiple`, `bn_group_size`),
  at most `max_batch_size` (0: no cap), at least one multiple; the last stage keeps B_ref.
- 'fit': the largest batch that fits in memory, measured from the compiled step when the run
  starts (effnetv2_jax/batch_fit.py) and passed in as `stage_batches`; until then its table is
  the constant one (`provisional_batches`: what plan mode and validation see).
- `batch_sizes`: one global batch per stage, given explicitly (with batch_rule 'constant').

The run's length is counted in images: N_ref = total_steps(config) reference steps of B_ref
images, split into stages by the preset / fractions exactly as above (stage i ends at image
b_i * B_ref, b_i its reference-step boundary). Stage i then trains round((b_i * B_ref - P_i) /
B_i) steps of B_i images, P_i the images the stages before it actually trained (so a rounding
error is made up by the next stage and the run's images stay within half a batch of
N_ref * B_ref), and at least one step when its share of images is not empty. With a constant
batch every stage is exactly the table above, bit for bit. `Stage.first_example` is the number
of (global) images trained on before the stage starts: the input pipeline resumes from it, and
the LR schedule and EMA count images through it (effnetv2_jax/optim.py, state.py).

This is pure configuration: it neither touches JAX devices nor reads the dataset (the train
split's size and the device count are passed in; `effnetv2_jax.plan.resolve` looks the size up
once per run).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

PRESETS = ("paper", "official", "none")
SIZE_CURVES = ("linear", "hold_then_ramp")
BATCH_RULES = ("constant", "pixels", "fit")


@dataclasses.dataclass(frozen=True)
class Stage:
  index: int
  image_size: int
  randaug_magnitude: float
  mixup_alpha: float
  cutmix_alpha: float
  dropout_rate: float
  first_step: int
  last_step: int  # exclusive
  batch_size: int  # global images per step of this stage
  first_example: int  # global images trained on before this stage

  @property
  def num_steps(self) -> int:
    return self.last_step - self.first_step

  @property
  def num_examples(self) -> int:
    return self.num_steps * self.batch_size

  @property
  def last_example(self) -> int:
    return self.first_example + self.num_examples

  def examples_at(self, step: int) -> int:
    """Global images trained on once `step` steps are done (a step of this stage, or its end)."""
    return self.first_example + (step - self.first_step) * self.batch_size


def total_steps(config, num_train_examples: int | None = None) -> int:
  """`config.num_train_steps` when positive, else num_epochs over the train split (official: int())."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  if num_train_examples is None:
    raise ValueError(
      "the run length is given in epochs (num_epochs): pass the train split's size "
      "(effnetv2_jax.plan.resolve does), or set num_train_steps"
    )
  return int(config.num_epochs * num_train_examples / config.batch_size)


def _round_size(size: float, multiple: int) -> int:
  size = int(size)
  if multiple <= 1:
    return size
  return max(multiple, int(round(size / multiple)) * multiple)


def _lerp(lo: float, hi: float, t: float) -> float:
  return float(lo + (hi - lo) * t)


def _get(p, name, default):
  """A progressive field that configs written before it existed may lack."""
  return p.get(name, default) if hasattr(p, "get") else getattr(p, name, default)


def _cumulative_bounds(fractions: Sequence[float], n: int) -> list[int]:
  """[0, b_1, ..., n]: stage i ends at int(c_i * n), c_i the cumulative fraction (last: n)."""
  bounds, c = [0], 0.0
  for f in fractions[:-1]:
    c += float(f)
    bounds.append(int(c * n + 1e-9))  # 0.25 + 0.25 + 0.5 must not floor 0.49999.. * n
  bounds.append(n)
  return bounds


def hold_then_ramp_fractions(num_stages: int, hold: float, tail: float) -> tuple[float, ...]:
  """The stage lengths of the 'hold_then_ramp' curve (module docstring): hold, equal ramp
  stages, tail. ValueError when the stages cannot hold it."""
  m, hold, tail = int(num_stages), float(hold), float(tail)
  if not (0 <= hold < 1 and 0 <= tail < 1 and hold + tail < 1):
    raise ValueError(f"hold_fraction {hold} + tail_fraction {tail} must be in [0, 1)")
  ramp_stages = m - (hold > 0) - (tail > 0)
  if ramp_stages < 1:
    raise ValueError(
      f"{m} stages cannot hold a hold stage, a ramp and a tail stage: need at least "
      f"{1 + (hold > 0) + (tail > 0)}"
    )
  ramp = (1.0 - hold - tail) / ramp_stages
  return tuple(([hold] if hold > 0 else []) + [ramp] * ramp_stages + ([tail] if tail > 0 else []))


def stage_fractions(config) -> tuple[float, ...] | None:
  """The stages' lengths as fractions of training, or None for equal stages (the presets)."""
  p = config.progressive
  if p.preset == "none":
    return None
  if _get(p, "size_curve", "linear") == "hold_then_ramp":
    return hold_then_ramp_fractions(
      p.num_stages, _get(p, "hold_fraction", 0.0), _get(p, "tail_fraction", 0.0)
    )
  fractions = tuple(float(f) for f in (_get(p, "stage_fractions", ()) or ()))
  return fractions or None


def batch_multiple(config, num_devices: int = 1) -> int:
  """What 'pixels' rounds every stage's batch to: lcm(num_devices, progressive.batch_multiple,
  bn_group_size), so each batch splits evenly over the devices and into whole BatchNorm groups."""
  m = math.lcm(max(int(num_devices), 1), max(int(_get(config.progressive, "batch_multiple", 1)), 1))
  group = int(config.get("bn_group_size", 0) or 0) if hasattr(config, "get") else 0
  return math.lcm(m, group) if group > 0 else m


def num_stages(config) -> int:
  return 1 if config.progressive.preset == "none" else int(config.progressive.num_stages)


def provisional_batches(config) -> tuple[int, ...] | None:
  """'fit' without measurements: every stage at batch_size (the table before the trainer fits
  the batches); None for the other rules, whose batches follow from the config alone."""
  p = config.progressive
  if _get(p, "batch_rule", "constant") != "fit" or tuple(_get(p, "batch_sizes", ()) or ()):
    return None
  return (int(config.batch_size),) * num_stages(config)


def stage_batch_sizes(config, image_sizes: Sequence[int], num_devices: int = 1) -> tuple[int, ...]:
  """The global batch of each stage of sizes `image_sizes` under the config's batch rule (module
  docstring). ValueError for 'fit' (its batches are measured elsewhere: pass `stage_batches`)."""
  p = config.progressive
  b_ref, m = int(config.batch_size), len(image_sizes)
  explicit = tuple(_get(p, "batch_sizes", ()) or ())
  if explicit:
    if len(explicit) != m:
      raise ValueError(f"progressive.batch_sizes has {len(explicit)} entries for {m} stages")
    return tuple(int(b) for b in explicit)
  rule = _get(p, "batch_rule", "constant")
  if rule == "constant":
    return (b_ref,) * m
  if rule == "fit":
    raise ValueError(
      "progressive.batch_rule 'fit' takes its batches from the compiled step's memory: pass "
      "them as stage_batches (effnetv2_jax.plan.resolve)"
    )
  if rule != "pixels":
    raise ValueError(f"progressive.batch_rule must be one of {BATCH_RULES}, got {rule!r}")
  multiple = batch_multiple(config, num_devices)
  cap = int(_get(p, "max_batch_size", 0) or 0)
  last = int(image_sizes[-1])
  out = []
  for i, size in enumerate(image_sizes):
    if i == m - 1:  # the reference stage
      out.append(b_ref)
      continue
    b = b_ref * last * last // (int(size) * int(size))  # integers: exact, no float rounding
    if cap > 0:
      b = min(b, cap)
    out.append(max(multiple, b // multiple * multiple))
  return tuple(out)


def _steps_in_images(ref_bounds: Sequence[int], b_ref: int, batches: Sequence[int]):
  """[(first_step, last_step, first_example)] per stage: stage i trains the images up to
  ref_bounds[i + 1] * b_ref in steps of batches[i] (module docstring; exact at a constant batch)."""
  out, step, seen = [], 0, 0
  for i, b in enumerate(batches):
    n = 0
    if ref_bounds[i + 1] > ref_bounds[i]:  # an empty share stays empty (validation names it)
      n = max(1, (ref_bounds[i + 1] * b_ref - seen + b // 2) // b)
    out.append((step, step + n, seen))
    step, seen = step + n, seen + n * b
  return out


def examples_at(table: Sequence[Stage], step: int) -> int:
  """Global images trained on once `step` steps are done (the sum over the stages so far)."""
  return stage_at(table, step).examples_at(step)


def stages(
  config,
  num_train_examples: int | None = None,
  *,
  num_devices: int = 1,
  stage_batches: Sequence[int] | None = None,
) -> list[Stage]:
  """The stage table for `config` (see the module docstring for the presets, curves and batches).

  `num_devices`: the devices a global batch is split over ('pixels' rounds to it; the other
  rules ignore it). `stage_batches`: each stage's global batch, chosen by the caller (the 'fit'
  rule); overrides the config's rule.
  """
  p = config.progressive
  n = total_steps(config, num_train_examples)
  preset = p.preset
  if preset not in PRESETS:
    raise ValueError(f"progressive.preset must be one of {PRESETS}, got {preset!r}")
  curve = _get(p, "size_curve", "linear")
  if curve not in SIZE_CURVES:
    raise ValueError(f"progressive.size_curve must be one of {SIZE_CURVES}, got {curve!r}")
  m = 1 if preset == "none" else int(p.num_stages)
  fractions = stage_fractions(config)
  if fractions is not None and len(fractions) != m:
    raise ValueError(f"progressive.stage_fractions has {len(fractions)} entries for {m} stages")
  if fractions is None:
    bounds = [int(i / m * n) for i in range(m + 1)]
  else:
    bounds = _cumulative_bounds(fractions, n)

  rows = []
  for i in range(m):
    if preset == "none":
      size, t_reg, dropout_t = p.max_image_size, 1.0, 1.0
    elif preset == "paper" or curve == "hold_then_ramp":
      # Algorithm 1: size and regularization at the stage's position i / (M - 1); under
      # hold_then_ramp, t = (size - min) / (max - min) is the same number.
      t = i / (m - 1) if m > 1 else 1.0
      size, t_reg = _lerp(p.min_image_size, p.max_image_size, t), t
      dropout_t = t if preset == "paper" else 1.0  # 'official' keeps dropout at its max
    else:  # official
      ratio = (i + 1) / m
      size = p.min_image_size + (p.max_image_size - p.min_image_size) * ratio
      t_reg = i / (m - 1) if m > 1 else 1.0  # linspace(min, max, m)[i]
      dropout_t = 1.0  # the released code keeps dropout at its final value
    rows.append(
      {
        "index": i,
        "image_size": _round_size(size, p.size_multiple),
        "randaug_magnitude": _lerp(p.min_randaug, p.max_randaug, t_reg),
        "mixup_alpha": _lerp(p.min_mixup, p.max_mixup, t_reg),
        "cutmix_alpha": _lerp(p.min_cutmix, p.max_cutmix, t_reg),
        "dropout_rate": _lerp(p.min_dropout, p.max_dropout, dropout_t),
      }
    )
  if stage_batches is not None:
    batches = tuple(int(b) for b in stage_batches)
    if len(batches) != m or min(batches) < 1:
      raise ValueError(f"stage_batches {batches} must be {m} positive global batch sizes")
  else:
    batches = stage_batch_sizes(config, [r["image_size"] for r in rows], num_devices)
  spans = _steps_in_images(bounds, int(config.batch_size), batches)
  return [
    Stage(**row, first_step=a, last_step=b, batch_size=batch, first_example=seen)
    for row, batch, (a, b, seen) in zip(rows, batches, spans)
  ]


def stage_at(table: Sequence[Stage], step: int) -> Stage:
  """The stage that trains `step`; the last stage for a step at or past the end (a finished run)."""
  for s in table:
    if s.first_step <= step < s.last_step:
      return s
  if step >= table[-1].last_step:
    return table[-1]
  raise ValueError(f"step {step} is before the first stage")

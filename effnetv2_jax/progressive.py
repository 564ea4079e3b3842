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

This is pure configuration: it neither touches JAX devices nor reads the dataset (the train
split's size is passed in; `effnetv2_jax.plan.resolve` looks it up once per run).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

PRESETS = ("paper", "official", "none")
SIZE_CURVES = ("linear", "hold_then_ramp")


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

  @property
  def num_steps(self) -> int:
    return self.last_step - self.first_step


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


def stages(config, num_train_examples: int | None = None) -> list[Stage]:
  """The stage table for `config` (see the module docstring for the presets and curves)."""
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

  out = []
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
    out.append(
      Stage(
        index=i,
        image_size=_round_size(size, p.size_multiple),
        randaug_magnitude=_lerp(p.min_randaug, p.max_randaug, t_reg),
        mixup_alpha=_lerp(p.min_mixup, p.max_mixup, t_reg),
        cutmix_alpha=_lerp(p.min_cutmix, p.max_cutmix, t_reg),
        dropout_rate=_lerp(p.min_dropout, p.max_dropout, dropout_t),
        first_step=bounds[i],
        last_step=bounds[i + 1],
      )
    )
  return out


def stage_at(table: Sequence[Stage], step: int) -> Stage:
  """The stage that trains `step`; the last stage for a step at or past the end (a finished run)."""
  for s in table:
    if s.first_step <= step < s.last_step:
      return s
  if step >= table[-1].last_step:
    return table[-1]
  raise ValueError(f"step {step} is before the first stage")

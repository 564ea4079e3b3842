"""Progressive learning with adaptive regularization: the stage table.

Training runs in `num_stages` stages. Each stage has its own image size and regularization strength
(RandAugment magnitude, mixup and CutMix alpha, dropout); weights, optimizer slots, EMA, BN statistics
and the global step carry over between stages, and the learning-rate schedule is global. Stage i
covers steps [int(i/M * N), int((i+1)/M * N)) of the N total steps, in both presets.

How the per-stage values are interpolated between the config's `min_*` and `max_*` end points is
the `preset`:

- 'paper': the paper's Algorithm 1. Everything, dropout included, moves linearly from the min values
  at stage 0 to the max values at the last stage: v_i = v_min + (v_max - v_min) * i / (M - 1).
- 'official': what the released code does. Image size int(min + (max - min) * (i + 1) / M), so the
  first stage is already above `min_image_size` (S: 171, 214, 257, 300); RandAugment, mixup and CutMix
  are linspace(min, max, M)[i]; dropout is not scheduled and stays at `max_dropout`.
- 'none': a single stage at the max size and max regularization (the non-progressive baseline).

This is pure configuration: it neither touches JAX devices nor reads the dataset (the train
split's size is passed in; `effnetv2_jax.plan.resolve` looks it up once per run).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

PRESETS = ("paper", "official", "none")


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


def stages(config, num_train_examples: int | None = None) -> list[Stage]:
  """The stage table for `config` (see the module docstring for the presets)."""
  p = config.progressive
  n = total_steps(config, num_train_examples)
  preset = p.preset
  if preset not in PRESETS:
    raise ValueError(f"progressive.preset must be one of {PRESETS}, got {preset!r}")
  m = 1 if preset == "none" else int(p.num_stages)

  out = []
  for i in range(m):
    if preset == "none":
      size, t_reg, dropout_t = p.max_image_size, 1.0, 1.0
    elif preset == "paper":
      t = i / (m - 1) if m > 1 else 1.0
      size, t_reg, dropout_t = _lerp(p.min_image_size, p.max_image_size, t), t, t
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
        first_step=int(i / m * n),
        last_step=int((i + 1) / m * n),
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

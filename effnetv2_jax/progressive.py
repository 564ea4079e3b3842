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

Nothing here touches JAX devices or TensorFlow, so `--mode=plan` is instant.
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


def dataset_train_size(config) -> int:
  """The train split's size from the dataset registry (only needed when steps come from epochs)."""
  from effnetv2_jax.data import datasets  # imported lazily: it pulls in TensorFlow

  return datasets.get_dataset_info(config.dataset, config.data_dir).num_train


def total_steps(config, num_train_examples: int | None = None) -> int:
  """`config.num_train_steps` when positive, else num_epochs over the train split (official: int())."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  if num_train_examples is None:
    num_train_examples = dataset_train_size(config)
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


def format_plan(config, num_train_examples: int | None = None) -> str:
  """The stage table as markdown: sizes, regularization, steps, epochs, MACs and compute share.

  MACs are counted analytically from the architecture (no compilation), so the share of compute
  per stage shows where progressive learning saves time: early stages at small sizes are cheap.
  """
  from effnetv2_jax import models

  if num_train_examples is None and config.num_train_steps <= 0:
    num_train_examples = dataset_train_size(config)
  table = stages(config, num_train_examples)
  steps_per_epoch = (num_train_examples / config.batch_size) if num_train_examples else None
  overrides = dict(config.model_overrides)
  macs = [models.count_macs(config.model_name, s.image_size, **overrides) for s in table]
  work = [mac * s.num_steps for mac, s in zip(macs, table)]
  total_work = sum(work) or 1
  lines = [
    f"model {config.model_name}, preset {config.progressive.preset}, "
    f"{table[-1].last_step} steps at batch {config.batch_size}, eval at {config.eval_image_size}px",
    "",
    "| stage | size | randaug | mixup | cutmix | dropout | steps | epochs | GMACs/img | compute |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for s, mac, w in zip(table, macs, work):
    epochs = f"{s.num_steps / steps_per_epoch:.1f}" if steps_per_epoch else "-"
    lines.append(
      f"| {s.index} | {s.image_size} | {s.randaug_magnitude:.3g} | {s.mixup_alpha:.3g} | "
      f"{s.cutmix_alpha:.3g} | {s.dropout_rate:.3g} | {s.first_step}-{s.last_step} | {epochs} | "
      f"{mac / 1e9:.3f} | {100 * w / total_work:.1f}% |"
    )
  # What the same number of steps would cost at the final size alone (the 'none' baseline).
  flat = macs[-1] * table[-1].last_step
  lines.append("")
  lines.append(
    f"train compute vs. all steps at {table[-1].image_size}px: {total_work / flat:.2f}x"
    if flat
    else ""
  )
  return "\n".join(lines)

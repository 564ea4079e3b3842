"""One resolved run: every number a config implies, computed once, in one place.

  run = plan.resolve(config)       # the only place the dataset registry and split sizes are read
  run.num_train, run.steps_per_epoch, run.total_steps, run.stages, run.base_lr, ...
  print(plan.format_plan(config, run))

`--mode=plan`, config validation, the optimizer and the trainer all read this object, so the
schedule plan mode prints is the schedule that runs, also when `train_split` is a sub-split
(tests/test_plan.py). Nothing here touches a JAX device or compiles anything.
"""

from __future__ import annotations

import dataclasses

from effnetv2_jax import progressive


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """What the config resolves to once the dataset registry is consulted."""

  num_classes: int
  train_split: str
  eval_split: str
  num_train: int  # examples in the split actually trained on
  batch_size: int  # global
  steps_per_epoch: float
  total_steps: int
  stages: tuple[progressive.Stage, ...]
  family: str  # preprocessing family ('v2', 'v2-base', 'small')
  base_lr: float  # after the batch scaling rule (lr_per_256 * batch / 256)
  dtype: str  # compute dtype name, 'auto' resolved for this machine

  def stage_at(self, step: int) -> progressive.Stage:
    return progressive.stage_at(self.stages, step)

  def remaining_stages(self, step: int) -> list[progressive.Stage]:
    """The stages that still have steps to train once `step` steps are done."""
    return [s for s in self.stages if step < s.last_step]


def _dataset(config):
  from effnetv2_jax.data import datasets  # lazily: a split size other than the registry's needs TF

  return datasets, datasets.get_dataset_info(config.dataset, config.data_dir)


def train_examples(config) -> int:
  """The size of the split this config trains on (not of the dataset's whole train split): the
  registry's where it knows the split (plan mode needs no data), else the prepared data's."""
  datasets, info = _dataset(config)
  split = config.train_split or info.train_split
  if not info.is_folder and info.known_split_size(split) is None:
    datasets.check_prepared(config.dataset, config.data_dir)  # a clear error, not a TFDS trace
  return int(datasets.split_num_examples(config.dataset, split, config.data_dir))


def resolve(config, *, num_train: int | None = None, num_classes: int | None = None) -> RunPlan:
  """The run `config` describes. Given both `num_train` and `num_classes` (synthetic benchmarks),
  no dataset is consulted; otherwise they come from the dataset and the configured split."""
  from effnetv2_jax import config_validation
  from effnetv2_jax import optim
  from effnetv2_jax import precision

  train_split, eval_split = config.train_split or "", config.eval_split or ""
  if num_train is None or num_classes is None:
    _, info = _dataset(config)
    train_split, eval_split = train_split or info.train_split, eval_split or info.eval_split
    num_train = train_examples(config) if num_train is None else num_train
    num_classes = num_classes or config.num_classes or info.num_classes
  table = progressive.stages(config, num_train)
  return RunPlan(
    num_classes=int(num_classes),
    train_split=train_split,
    eval_split=eval_split,
    num_train=int(num_train),
    batch_size=int(config.batch_size),
    steps_per_epoch=num_train / config.batch_size,
    total_steps=table[-1].last_step,
    stages=tuple(table),
    family=config_validation.preprocess_family(config),
    base_lr=optim.base_learning_rate(config),
    dtype=precision.resolve_dtype(config.dtype),
  )


def schedule_shape(config, run: RunPlan) -> str:
  """One line on stage lengths and the size curve when they are not the preset's equal stages."""
  p = config.progressive
  curve = p.get("size_curve", "linear")
  fractions = progressive.stage_fractions(config)
  if fractions is None:
    return ""
  shares = ", ".join(f"{100 * s.num_steps / max(run.total_steps, 1):.1f}%" for s in run.stages)
  if curve == "hold_then_ramp":
    head = (
      f"size curve hold_then_ramp: hold {p.hold_fraction:g} at {p.min_image_size}px, "
      f"tail {p.tail_fraction:g} at {p.max_image_size}px"
    )
  else:
    head = f"stage fractions {tuple(float(f) for f in fractions)}"
  return f"{head}; stage lengths {shares} of the steps"


def accumulation_line(config, run: RunPlan) -> str:
  """One line on gradient accumulation (config.grad_accum_steps); "" when it is off."""
  k = int(config.get("grad_accum_steps", 1))
  if k == 1:
    return ""
  if k > 1:
    return (
      f"gradient accumulation: {k} micro-batches of {run.batch_size // k} per step "
      "(one optimizer and EMA update per step)"
    )
  budget = int(config.get("device_memory_bytes", 0))
  where = (
    f"{budget / 2**30:.2f} GiB per device (config.device_memory_bytes)"
    if budget
    else f"the device's memory less {config.get('device_memory_margin', 0.1):g} of it"
  )
  return (
    "gradient accumulation: chosen per stage when its step compiles, the fewest micro-batches "
    f"whose step fits {where}"
  )


def format_plan(config, run: RunPlan) -> str:
  """The stage table as markdown: sizes, regularization, steps, epochs, MACs and compute share.

  MACs are counted analytically from the architecture (no compilation), so the share of compute
  per stage shows where progressive learning saves time: early stages at small sizes are cheap.
  """
  from effnetv2_jax import models

  overrides = dict(config.model_overrides)
  macs = [models.count_macs(config.model_name, s.image_size, **overrides) for s in run.stages]
  work = [mac * s.num_steps for mac, s in zip(macs, run.stages)]
  total_work = sum(work) or 1
  lines = [
    f"model {config.model_name}, preset {config.progressive.preset}, {run.total_steps} steps at "
    f"batch {run.batch_size} ({run.num_train} examples in {run.train_split!r}, "
    f"{run.steps_per_epoch:.2f} steps/epoch), base lr {run.base_lr:.4g}, {run.dtype}, "
    f"eval on {run.eval_split!r} at {config.eval_image_size}px",
  ]
  shape = schedule_shape(config, run)
  if shape:
    lines.append(shape)
  accum = accumulation_line(config, run)
  if accum:
    lines.append(accum)
  lines += [
    "",
    "| stage | size | randaug | mixup | cutmix | dropout | steps | epochs | GMACs/img | compute |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for s, mac, w in zip(run.stages, macs, work):
    lines.append(
      f"| {s.index} | {s.image_size} | {s.randaug_magnitude:.3g} | {s.mixup_alpha:.3g} | "
      f"{s.cutmix_alpha:.3g} | {s.dropout_rate:.3g} | {s.first_step}-{s.last_step} | "
      f"{s.num_steps / run.steps_per_epoch:.1f} | {mac / 1e9:.3f} | {100 * w / total_work:.1f}% |"
    )
  # What the same number of steps would cost at the final size alone (the 'none' baseline).
  flat = macs[-1] * run.total_steps
  if flat:
    lines += [
      "",
      f"train compute vs. all steps at {run.stages[-1].image_size}px: {total_work / flat:.2f}x",
    ]
  return "\n".join(lines)

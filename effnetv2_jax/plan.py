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
  batch_size: int  # global; the reference batch B_ref (every stage's, unless the stages differ)
  steps_per_epoch: float  # epochs of B_ref steps: what warmup and decay epochs are counted in
  total_steps: int
  stages: tuple[progressive.Stage, ...]  # each with its own global batch_size
  family: str  # preprocessing family ('v2', 'v2-base', 'small')
  base_lr: float  # after the batch scaling rule (lr_per_256 * batch / 256), at B_ref
  dtype: str  # compute dtype name, 'auto' resolved for this machine
  num_devices: int = 1  # the devices the stage batches were rounded for ('pixels')
  # batch_rule 'fit' before its batches are measured: the stages are at the constant batch_size
  # until the trainer fits them (effnetv2_jax/batch_fit.py) and calls `with_stage_batches`.
  batches_provisional: bool = False

  def stage_at(self, step: int) -> progressive.Stage:
    return progressive.stage_at(self.stages, step)

  def examples_at(self, step: int) -> int:
    """Global images trained on once `step` steps are done (summed over the stages' batches)."""
    return progressive.examples_at(self.stages, step)

  @property
  def constant_batch(self) -> bool:
    return all(s.batch_size == self.batch_size for s in self.stages)

  def stage_lr(self, stage: progressive.Stage) -> float:
    """The stage's peak LR: lr_per_256 * its batch / 256 (before warmup and decay)."""
    return self.base_lr * stage.batch_size / self.batch_size

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


def resolve(
  config,
  *,
  num_train: int | None = None,
  num_classes: int | None = None,
  num_devices: int = 1,
  stage_batches=None,
) -> RunPlan:
  """The run `config` describes. Given both `num_train` and `num_classes` (synthetic benchmarks),
  no dataset is consulted; otherwise they come from the dataset and the configured split.

  `num_devices`: how many devices a global batch is split over; only the 'pixels' batch rule
  reads it (it rounds each stage's batch to a multiple of it). The trainer passes its mesh's
  size; plan mode and benchmarks leave 1 (a table for any device count that divides
  progressive.batch_multiple). Nothing here asks JAX for it. `stage_batches`: each stage's
  global batch, chosen by the caller (the 'fit' rule), instead of the config's rule; 'fit'
  without them resolves the constant-batch table, marked `batches_provisional`."""
  from effnetv2_jax import config_validation
  from effnetv2_jax import optim
  from effnetv2_jax import precision

  train_split, eval_split = config.train_split or "", config.eval_split or ""
  if num_train is None or num_classes is None:
    _, info = _dataset(config)
    train_split, eval_split = train_split or info.train_split, eval_split or info.eval_split
    num_train = train_examples(config) if num_train is None else num_train
    num_classes = num_classes or config.num_classes or info.num_classes
  provisional = stage_batches is None and progressive.provisional_batches(config) is not None
  if provisional:
    stage_batches = progressive.provisional_batches(config)
  table = progressive.stages(
    config, num_train, num_devices=num_devices, stage_batches=stage_batches
  )
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
    num_devices=int(num_devices),
    batches_provisional=provisional,
  )


def with_stage_batches(config, run: RunPlan, stage_batches) -> RunPlan:
  """`run` with each stage at its batch of `stage_batches` (the 'fit' rule's, once measured):
  the stage table in images rebuilt for them, nothing else looked up again."""
  table = progressive.stages(
    config, run.num_train, num_devices=run.num_devices, stage_batches=stage_batches
  )
  return dataclasses.replace(
    run, stages=tuple(table), total_steps=table[-1].last_step, batches_provisional=False
  )


def schedule_shape(config, run: RunPlan) -> str:
  """One line on stage lengths and the size curve when they are not the preset's equal stages."""
  p = config.progressive
  curve = p.get("size_curve", "linear")
  fractions = progressive.stage_fractions(config)
  if fractions is None:
    return ""
  if run.constant_batch:
    shares = ", ".join(f"{100 * s.num_steps / max(run.total_steps, 1):.1f}%" for s in run.stages)
  else:
    total = max(run.stages[-1].last_example, 1)
    shares = ", ".join(f"{100 * s.num_examples / total:.1f}%" for s in run.stages)
  if curve == "hold_then_ramp":
    head = (
      f"size curve hold_then_ramp: hold {p.hold_fraction:g} at {p.min_image_size}px, "
      f"tail {p.tail_fraction:g} at {p.max_image_size}px"
    )
  else:
    head = f"stage fractions {tuple(float(f) for f in fractions)}"
  unit = "steps" if run.constant_batch else "images"
  return f"{head}; stage lengths {shares} of the {unit}"


def fit_line(config, run: RunPlan) -> str:
  """How batch_rule 'fit' chooses the batches, and whether the table shows them yet."""
  from effnetv2_jax import batch_fit

  multiple, cap = batch_fit.limits(config, run.num_devices)
  budget = int(config.get("device_memory_bytes", 0))
  where = (
    f"{budget / 2**30:.2f} GiB per device (config.device_memory_bytes)"
    if budget
    else f"the device's memory less {config.get('device_memory_margin', 0.1):g} of it"
  )
  how = (
    f"per-stage batch: batch_rule fit, the largest multiple of {multiple} (for "
    f"{run.num_devices} device(s)), at most {cap}, whose compiled step fits {where}"
  )
  if run.batches_provisional:
    return (
      f"{how}; chosen when the run starts, from compiled memory (two probe compiles and a check "
      "per stage, nothing runs), and kept in the checkpoints for a resume: the table below is "
      f"provisional, every stage at batch_size {run.batch_size}"
    )
  return f"{how}; LR lr_per_256 * batch / 256 per stage, schedule in images"


def batch_line(config, run: RunPlan) -> str:
  """One line on the per-stage batches when they are not all config.batch_size."""
  p = config.progressive
  if p.get("batch_rule", "constant") == "fit" and not tuple(p.get("batch_sizes", ()) or ()):
    return fit_line(config, run)
  if run.constant_batch:
    return ""
  if tuple(p.get("batch_sizes", ()) or ()):
    how = "progressive.batch_sizes"
  else:
    how = f"batch_rule {p.get('batch_rule', 'constant')}"
  if p.get("batch_rule", "constant") == "pixels" and not tuple(p.get("batch_sizes", ()) or ()):
    multiple = progressive.batch_multiple(config, run.num_devices)
    cap = int(p.get("max_batch_size", 0) or 0)
    how += f" (multiples of {multiple} for {run.num_devices} device(s)"
    how += f", at most {cap})" if cap else ", no cap)"
  ema = config.get("ema_horizon", "images")
  return (
    f"per-stage batch: {how}; LR lr_per_256 * batch / 256 per stage, schedule in images "
    f"({run.stages[-1].last_example} in all), EMA horizon in {ema}"
  )


def accumulation_line(config, run: RunPlan) -> str:
  """One line on gradient accumulation (config.grad_accum_steps); "" when it is off."""
  k = int(config.get("grad_accum_steps", 1))
  if k == 1:
    return ""
  if k > 1:
    micro = "/".join(str(s.batch_size // k) for s in run.stages)
    return (
      f"gradient accumulation: {k} micro-batches of {micro} per step "
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
  """The stage table as markdown: sizes, regularization, steps, batch and LR, epochs, MACs and
  compute share.

  MACs are counted analytically from the architecture (no compilation), so the share of compute
  per stage shows where progressive learning saves time: early stages at small sizes are cheap.
  """
  from effnetv2_jax import models

  overrides = dict(config.model_overrides)
  macs = [models.count_macs(config.model_name, s.image_size, **overrides) for s in run.stages]
  work = [mac * s.num_examples for mac, s in zip(macs, run.stages)]
  total_work = sum(work) or 1
  batch, ref = f"batch {run.batch_size}", ""
  if not run.constant_batch:
    batch = "batches " + "/".join(str(s.batch_size) for s in run.stages)
    ref = f" at the reference batch {run.batch_size}"
  lines = [
    f"model {config.model_name}, preset {config.progressive.preset}, {run.total_steps} steps at "
    f"{batch} ({run.num_train} examples in {run.train_split!r}, "
    f"{run.steps_per_epoch:.2f} steps/epoch{ref}), base lr {run.base_lr:.4g}{ref}, {run.dtype}, "
    f"eval on {run.eval_split!r} at {config.eval_image_size}px",
  ]
  for extra in (
    schedule_shape(config, run),
    batch_line(config, run),
    accumulation_line(config, run),
  ):
    if extra:
      lines.append(extra)
  lines += [
    "",
    (
      "| stage | size | randaug | mixup | cutmix | dropout | steps | batch | lr | epochs "
      "| GMACs/img | compute |"
    ),
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for s, mac, w in zip(run.stages, macs, work):
    lines.append(
      f"| {s.index} | {s.image_size} | {s.randaug_magnitude:.3g} | {s.mixup_alpha:.3g} | "
      f"{s.cutmix_alpha:.3g} | {s.dropout_rate:.3g} | {s.first_step}-{s.last_step} | "
      f"{s.batch_size} | {run.stage_lr(s):.4g} | {s.num_examples / run.num_train:.1f} | "
      f"{mac / 1e9:.3f} | {100 * w / total_work:.1f}% |"
    )
  # What the same images would cost at the final size alone (the 'none' baseline).
  flat = macs[-1] * run.stages[-1].last_example
  if flat:
    lines += [
      "",
      f"train compute vs. all {'steps' if run.constant_batch else 'images'} at "
      f"{run.stages[-1].image_size}px: {total_work / flat:.2f}x",
    ]
  return "\n".join(lines)

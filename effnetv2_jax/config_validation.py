"""Config validation: every mistake is caught before anything compiles or touches the workdir.

Each error names the config field and says what to do; `main` prints it as one line and exits 2.
"""

from __future__ import annotations

import os

from effnetv2_jax import batch_fit
from effnetv2_jax import optim
from effnetv2_jax import paths
from effnetv2_jax import precision
from effnetv2_jax import progressive
from effnetv2_jax import state as state_lib
from effnetv2_jax.data import augment

V2_FULL_MODELS = ("efficientnetv2-s", "efficientnetv2-m", "efficientnetv2-l", "efficientnetv2-xl")
DTYPES = precision.DTYPE_NAMES  # 'auto' is resolved at run time (effnetv2_jax/precision.py)
FAMILIES = ("auto", "v2", "v2-base", "small")
CUTMIX_LABELS = ("batch_mean", "per_example")


class ConfigError(ValueError):
  """A config field with a bad value; `str()` is one line: 'field: what is wrong and the fix'."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field


def preprocess_family(config) -> str:
  """'v2' (S/M/L/XL: (x-128)/128, bilinear, crop area from 0.05) or 'v2-base' (everything else)."""
  if config.preprocess_family != "auto":
    return config.preprocess_family
  return "v2" if config.model_name in V2_FULL_MODELS else "v2-base"


def _require(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(field, message)


def _one_of(config, field: str, allowed) -> None:
  _require_in(config[field], allowed, field)


def _require_in(value, allowed, field: str) -> None:
  _require(value in allowed, field, f"{value!r} is not one of {', '.join(map(str, allowed))}")


def _validate_model(config) -> None:
  from effnetv2_jax import models

  names = models.list_models()
  _require(
    config.model_name in names,
    "model_name",
    f"unknown model {config.model_name!r}; choose one of {', '.join(names)}",
  )
  try:  # building the module object checks the override names without initialising anything
    models.create_model(config.model_name, num_classes=2, **dict(config.model_overrides))
  except (TypeError, ValueError) as e:
    raise ConfigError("model_overrides", f"{e}") from None


def _validate_progressive(config) -> None:
  p = config.progressive
  _require_in(p.preset, progressive.PRESETS, "progressive.preset")
  _require(int(p.num_stages) >= 1, "progressive.num_stages", f"must be >= 1, got {p.num_stages}")
  for end in ("min_image_size", "max_image_size"):
    v = p[end]
    _require(
      isinstance(v, int) and v > 0, f"progressive.{end}", f"must be a positive integer, got {v!r}"
    )
  _require(
    p.min_image_size <= p.max_image_size,
    "progressive.min_image_size",
    f"{p.min_image_size} is larger than progressive.max_image_size {p.max_image_size}",
  )
  _require(
    isinstance(p.size_multiple, int) and p.size_multiple >= 1,
    "progressive.size_multiple",
    f"must be an integer >= 1, got {p.size_multiple!r}",
  )
  for name in ("randaug", "mixup", "cutmix", "dropout"):
    lo, hi = p[f"min_{name}"], p[f"max_{name}"]
    _require(lo >= 0, f"progressive.min_{name}", f"must be >= 0, got {lo}")
    _require(hi >= 0, f"progressive.max_{name}", f"must be >= 0, got {hi}")
    _require(
      lo <= hi, f"progressive.min_{name}", f"{lo} is larger than progressive.max_{name} {hi}"
    )
  _require(p.max_dropout < 1.0, "progressive.max_dropout", f"must be < 1, got {p.max_dropout}")
  _validate_schedule_shape(p)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _validate_schedule_shape(p) -> None:
  """stage_fractions, size_curve, hold_fraction, tail_fraction (effnetv2_jax/progressive.py)."""
  curve = p.get("size_curve", "linear")
  _require_in(curve, progressive.SIZE_CURVES, "progressive.size_curve")
  fractions = p.get("stage_fractions", ()) or ()
  _require(
    isinstance(fractions, (tuple, list)),
    "progressive.stage_fractions",
    f"must be a tuple of stage lengths (fractions of training), got {fractions!r}",
  )
  num_stages = 1 if p.preset == "none" else int(p.num_stages)
  if fractions:
    field = "progressive.stage_fractions"
    _require(
      p.preset != "none",
      field,
      "preset 'none' trains one stage; leave stage_fractions empty",
    )
    _require(
      curve == "linear",
      field,
      "size_curve 'hold_then_ramp' sets the stage lengths itself (hold_fraction, "
      "tail_fraction); leave stage_fractions empty",
    )
    _require(
      len(fractions) == num_stages,
      field,
      f"has {len(fractions)} entries for progressive.num_stages {num_stages}; give one per stage",
    )
    _require(
      all(_is_number(f) and f > 0 for f in fractions),
      field,
      f"every entry must be a number > 0, got {tuple(fractions)}",
    )
    total = float(sum(fractions))
    _require(
      abs(total - 1.0) <= 1e-6,
      field,
      f"{tuple(fractions)} sums to {total:g}; the fractions of training must sum to 1",
    )
  hold, tail = p.get("hold_fraction", 0.0), p.get("tail_fraction", 0.0)
  for name, v in (("hold_fraction", hold), ("tail_fraction", tail)):
    _require(
      _is_number(v) and 0 <= v < 1,
      f"progressive.{name}",
      f"must be a fraction of training in [0, 1), got {v!r}",
    )
    _require(
      v == 0 or curve == "hold_then_ramp",
      f"progressive.{name}",
      f"is only used by size_curve 'hold_then_ramp' (size_curve is {curve!r}); set it to 0",
    )
  if curve == "hold_then_ramp":
    _require(
      p.preset != "none",
      "progressive.size_curve",
      "preset 'none' trains one stage at max_image_size; use 'linear'",
    )
    _require(
      hold + tail < 1,
      "progressive.hold_fraction",
      f"hold_fraction {hold} + tail_fraction {tail} leave no ramp; their sum must be < 1",
    )
    need = 1 + (hold > 0) + (tail > 0)
    _require(
      num_stages >= need,
      "progressive.num_stages",
      f"{num_stages} stages cannot hold the hold stage, a ramp and the tail stage of "
      f"size_curve 'hold_then_ramp'; use at least {need}",
    )


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _require_int(value, low: int, field: str, what: str) -> None:
  """`field` holds an integer >= low; `what` says what it counts."""
  _require(
    _is_int(value) and value >= low, field, f"must be an integer >= {low} ({what}), got {value!r}"
  )


def _validate_stage_batches(config, num_devices: int) -> None:
  """batch_rule, batch_sizes, batch_multiple, max_batch_size (effnetv2_jax/progressive.py) and
  ema_horizon."""
  p = config.progressive
  rule = p.get("batch_rule", "constant")
  _require_in(rule, progressive.BATCH_RULES, "progressive.batch_rule")
  sizes = p.get("batch_sizes", ()) or ()
  field = "progressive.batch_sizes"
  _require(
    isinstance(sizes, (tuple, list)),
    field,
    f"must be a tuple of global batch sizes, one per stage, got {sizes!r}",
  )
  if sizes:
    num_stages = 1 if p.preset == "none" else int(p.num_stages)
    _require(
      rule == "constant",
      field,
      f"sets every stage's batch itself; leave progressive.batch_rule 'constant' (not {rule!r})",
    )
    _require(
      len(sizes) == num_stages,
      field,
      f"has {len(sizes)} entries for {num_stages} stages; give one global batch per stage",
    )
    for b in sizes:
      _require(
        _is_int(b) and b > 0 and b % num_devices == 0,
        field,
        f"{b!r} is not a positive multiple of the {num_devices} devices; every stage's "
        f"global batch must split evenly over them",
      )
  _require_int(
    p.get("batch_multiple", 1),
    1,
    "progressive.batch_multiple",
    "'pixels' rounds stage batches down to multiples of it",
  )
  cap = p.get("max_batch_size", 0)
  _require(
    _is_int(cap) and (cap == 0 or cap >= config.batch_size),
    "progressive.max_batch_size",
    f"must be 0 (no cap) or an integer >= batch_size {config.batch_size} (the last stage "
    f"trains at batch_size), got {cap!r}",
  )
  if rule == "fit":
    _validate_fit(config, num_devices)
  horizon = config.get("ema_horizon", "images")
  _require_in(horizon, state_lib.EMA_HORIZONS, "ema_horizon")


def _validate_fit(config, num_devices: int) -> None:
  """batch_rule 'fit' (effnetv2_jax/batch_fit.py): no fixed batch to split, one multiple room."""
  k = config.get("grad_accum_steps", 1)
  _require(
    k == 1,
    "grad_accum_steps",
    f"must be 1 with progressive.batch_rule 'fit', got {k!r}: 'fit' changes each stage's batch "
    "until its step fits memory, gradient accumulation keeps the batch and splits it into "
    "micro-batches until they fit; they are alternatives. Use grad_accum_steps=1 with 'fit', or "
    "batch_rule 'constant'/'pixels' with grad_accum_steps=0",
  )
  multiple, top = batch_fit.limits(config, num_devices)
  cap = int(config.progressive.get("max_batch_size", 0) or 0)
  _require(
    top >= multiple,
    "progressive.max_batch_size" if cap else "progressive.batch_multiple",
    f"'fit' rounds batches to multiples of {multiple} (lcm of the {num_devices} devices, "
    f"progressive.batch_multiple and bn_group_size) and caps them at "
    f"{cap or batch_fit.CAP_TIMES_BATCH_SIZE * config.batch_size}"
    f"{'' if cap else f' ({batch_fit.CAP_TIMES_BATCH_SIZE} x batch_size: max_batch_size 0)'}: "
    "not one multiple fits under the "
    "cap; lower progressive.batch_multiple or raise progressive.max_batch_size",
  )


def _validate_curve_and_recalibration(config) -> None:
  """eval_every_steps, eval_every_seconds, eval_subset (effnetv2_jax/curves.py), recalibrate_bn."""
  for field, what in (
    ("eval_every_steps", "train steps between curve evals"),
    ("eval_subset", "eval images per curve eval"),
    ("recalibrate_bn", "train images to recompute the BN statistics from"),
  ):
    _require_int(config.get(field, 0), 0, field, f"{what}; 0 = off")
  v = config.get("eval_every_seconds", 0.0)
  _require(
    _is_number(v) and v >= 0,
    "eval_every_seconds",
    f"must be a number >= 0 (wall seconds between curve evals; 0 = off), got {v!r}",
  )
  n = config.get("recalibrate_bn", 0)
  _require(
    n == 0 or n >= config.eval_batch_size,
    "recalibrate_bn",
    f"{n} images are less than one batch of eval_batch_size {config.eval_batch_size}; the "
    "statistics are averaged over whole batches: use at least that many, or 0",
  )


def check_bn_group_size(group_size, batch_size: int, field: str = "batch_size") -> None:
  """ConfigError unless `group_size` (config.bn_group_size) is 0 or divides `batch_size`.

  The trainer can call it for each stage's batch (`field` names where that batch comes from).
  """
  _require(
    isinstance(group_size, int) and not isinstance(group_size, bool) and group_size >= 0,
    "bn_group_size",
    f"must be an integer >= 0 (0 = BatchNorm over the whole batch), got {group_size!r}",
  )
  if group_size:
    _require(
      batch_size % group_size == 0,
      "bn_group_size",
      f"{group_size} does not divide {field} {batch_size}: BatchNorm groups must tile the batch; "
      f"use a divisor of {batch_size} (or 0 for the whole batch)",
    )


def check_grad_accum(config, batch_size: int, num_devices: int, field: str = "batch_size") -> None:
  """ConfigError unless config.grad_accum_steps is 0 (chosen per stage) or a k >= 1 that splits
  `batch_size` into equal micro-batches spread evenly over `num_devices` (k divides the batch
  per device) and tiled by config.bn_group_size. The trainer can call it per stage batch."""
  k = config.get("grad_accum_steps", 1)
  _require(
    isinstance(k, int) and not isinstance(k, bool) and k >= 0,
    "grad_accum_steps",
    f"must be an integer >= 0 (micro-batches per step: 1 = off, 0 = chosen per stage to fit "
    f"device memory), got {k!r}",
  )
  if k <= 1:
    return
  per_device = batch_size // num_devices
  _require(
    per_device % k == 0,
    "grad_accum_steps",
    f"{k} does not divide the {per_device} images per device of {field} {batch_size} on "
    f"{num_devices} devices: every micro-batch must have the same share on every device; use a "
    f"divisor of {per_device}",
  )
  g = config.bn_group_size
  if isinstance(g, int) and g > 0:
    _require(
      (batch_size // k) % g == 0,
      "grad_accum_steps",
      f"micro-batches of {batch_size // k} ({field} {batch_size} / {k}) are not tiled by "
      f"bn_group_size {g}: BatchNorm groups lie inside a micro-batch; use fewer micro-batches or "
      "a smaller bn_group_size",
    )


def _validate_memory_budget(config) -> None:
  """device_memory_bytes, device_memory_margin (effnetv2_jax/memory_fit.py)."""
  b = config.get("device_memory_bytes", 0)
  _require(
    isinstance(b, int) and not isinstance(b, bool) and b >= 0,
    "device_memory_bytes",
    f"must be an integer >= 0 (bytes per device; 0 = what the device reports), got {b!r}",
  )
  m = config.get("device_memory_margin", 0.1)
  _require(
    _is_number(m) and 0 <= m < 1,
    "device_memory_margin",
    f"must be a fraction in [0, 1) of the device's memory kept free, got {m!r}",
  )


def validate_config(
  config,
  *,
  num_devices: int | None = None,
  num_train_examples: int | None = None,
  check_dataset: bool = True,
) -> None:
  """Raises ConfigError for the first bad field. Cheap: builds no arrays and compiles nothing.

  `num_devices` defaults to `jax.device_count()` (all processes); `num_train_examples` to the
  registry's size of the train split, looked up only when the run length is given in epochs.
  """
  _one_of(config, "dtype", DTYPES)
  _one_of(config, "optimizer", optim.OPTIMIZERS)
  _one_of(config, "lr_schedule", optim.SCHEDULES)
  _one_of(config, "preprocess_family", FAMILIES)
  _one_of(config, "cutmix_label", CUTMIX_LABELS)
  _validate_model(config)
  _validate_progressive(config)
  _require(
    "bn_group_size" not in config.model_overrides,
    "model_overrides",
    "bn_group_size is a top-level field: set config.bn_group_size instead",
  )

  if num_devices is None:
    import jax

    num_devices = jax.device_count()
  for field in ("batch_size", "eval_batch_size"):
    v = config[field]
    _require(isinstance(v, int) and v > 0, field, f"must be a positive integer, got {v!r}")
    _require(
      v % num_devices == 0,
      field,
      f"{v} is not divisible by the {num_devices} devices; use a multiple of {num_devices}",
    )
  check_bn_group_size(config.bn_group_size, config.batch_size)
  _validate_stage_batches(config, num_devices)
  check_grad_accum(config, config.batch_size, num_devices)
  _validate_memory_budget(config)
  ev = config.eval_image_size
  _require(
    isinstance(ev, int) and ev > 0,
    "eval_image_size",
    f"must be a positive integer (the evaluation resolution), got {ev!r}",
  )
  _require(
    config.num_train_steps > 0 or config.num_epochs > 0,
    "num_epochs",
    "set num_epochs > 0 or num_train_steps > 0",
  )
  _require(config.lr_per_256 > 0, "lr_per_256", f"must be > 0, got {config.lr_per_256}")
  _require(config.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {config.warmup_epochs}")
  _require(
    0 <= config.label_smoothing < 1,
    "label_smoothing",
    f"must be in [0, 1), got {config.label_smoothing}",
  )
  _require(0 <= config.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {config.ema_decay}")
  try:  # randaug_layers, randaug_ops, autoaugment, randaug_solarize, randaug_enhance
    augment.check_config(config)
  except augment.AugmentError as e:
    raise ConfigError(e.field, e.reason) from None
  msf = config.max_skipped_fraction
  _require(
    isinstance(msf, (int, float)) and not isinstance(msf, bool) and 0 <= msf <= 1,
    "max_skipped_fraction",
    f"must be a share in [0, 1] of the records read (0: stop at the first unreadable record), "
    f"got {msf!r}",
  )
  for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "max_bad_steps"):
    _require(config[field] >= 1, field, f"must be >= 1, got {config[field]}")
  _validate_curve_and_recalibration(config)
  # A remote init_from (gs://...) is not looked up here (that needs the network); loading it
  # reports a missing checkpoint as FileNotFoundError, which main also turns into exit code 2.
  if config.init_from and not paths.is_remote(config.init_from):
    _require(
      isinstance(config.init_from, str) and os.path.isdir(os.path.expanduser(config.init_from)),
      "init_from",
      f"{config.init_from!r} is not a directory holding a checkpoint of this package",
    )

  if check_dataset:
    from effnetv2_jax.data import datasets

    try:
      datasets.get_dataset_info(config.dataset, config.data_dir)
    except ValueError as e:
      raise ConfigError("dataset", str(e)) from None
  if config.num_train_steps <= 0 and num_train_examples is None:
    from effnetv2_jax import plan  # the size of the split trained on, as the run resolves it

    num_train_examples = plan.train_examples(config)
  n = progressive.total_steps(config, num_train_examples)
  stages = 1 if config.progressive.preset == "none" else config.progressive.num_stages
  _require(
    n >= stages,
    "progressive.num_stages",
    f"{stages} stages need at least {stages} train steps, the run has {n}; "
    "lower num_stages or train longer",
  )
  # 'fit' is checked on its provisional table (every stage at batch_size): its measured
  # batches are multiples of the devices and BN groups by construction.
  table = progressive.stages(
    config,
    num_train_examples,
    num_devices=num_devices,
    stage_batches=progressive.provisional_batches(config),
  )
  empty = [s.index for s in table if s.num_steps <= 0]
  if empty:
    field = (
      "progressive.hold_fraction"
      if config.progressive.get("size_curve", "linear") == "hold_then_ramp"
      else "progressive.stage_fractions"
    )
    _require(
      False,
      field,
      f"stage {empty[0]} gets no train steps of the run's {n}; lengthen it or train longer",
    )
  # Stages that carry their own batch size must be tiled by the BN groups (and micro-batches) too.
  for stage in table:
    check_bn_group_size(config.bn_group_size, stage.batch_size, f"stage {stage.index}'s batch")
    check_grad_accum(config, stage.batch_size, num_devices, f"stage {stage.index}'s batch")

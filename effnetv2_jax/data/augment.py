"""What a training stage augments with, as one value: `Augment`, built once per stage by `for_stage`.

The input pipeline, the per-family preprocessing and the RandAugment/AutoAugment ops all take this
one object, so a new augmentation switch is a field here and in `configs/default.py`, not a keyword
threaded through four signatures. The op subset (`config.randaug_ops`) is parsed here and nowhere
else; config validation calls `check_config`, which builds the same value.

Free of TensorFlow (plan mode and config validation import it on machines without the data).

Official-vs-corrected switches (reference section 10, items 1 and 8). The default of each is what
the released code does, bugs included, because that is what produced the published numbers:
  * ``solarize``: 'official' = the threshold int(magnitude / 10 * 256) is cast to the image's uint8
    dtype and wraps modulo 256 (magnitude 10 -> 0: every pixel inverted; 11.67 -> 42; 15 -> 128);
    'unwrapped' = the threshold stays an integer, so from magnitude 10 on no pixel reaches it and
    Solarize returns the image unchanged (what the op means: solarize less as the threshold rises).
    Also applies to AutoAugment v0's ('Solarize', 0.6, 10).
  * ``enhance``: 'official' = Contrast blends towards (pixel count / 256) instead of the grey mean
    (a bug of the released op: the histogram's sum, not its mean) and Sharpness truncates the smoothed
    image to uint8; 'corrected' = Contrast uses the grey mean and Sharpness rounds, as PIL's
    ImageEnhance does.
"""

from __future__ import annotations

import dataclasses
from effnetv2_jax.data.randaug_ops import OPS, parse_ops

SOLARIZE_MODES = ("official", "unwrapped")
ENHANCE_MODES = ("official", "corrected")

# Augment field -> the config field it comes from (error messages name the config field).
CONFIG_FIELDS = {
  "layers": "randaug_layers",
  "magnitude": "progressive.max_randaug",
  "ops": "randaug_ops",
  "autoaugment": "autoaugment",
  "solarize": "randaug_solarize",
  "enhance": "randaug_enhance",
}


class AugmentError(ValueError):
  """A bad augmentation setting; `field` names it, `reason` says what is wrong."""

  def __init__(self, field: str, reason: str):
    super().__init__(f"{field}: {reason}")
    self.field = field
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Augment:
  """The augmentation of one training stage. `Augment()` augments nothing (crop and flip remain).

  layers, magnitude: RandAugment's number of ops per image and their level (0..10 scale,
    extrapolating above 10); RandAugment is off when either is 0.
  ops: RandAugment's op set, a tuple of names from `OPS` (a comma-separated string or None is
    parsed on construction; None and '' mean all 16, the official set).
  autoaugment: AutoAugment policy v0 instead of RandAugment (layers/magnitude/ops are then unused).
  solarize, enhance: the official-vs-corrected switches, see the module docstring.
  """

  layers: int = 2
  magnitude: float = 0.0
  ops: tuple[str, ...] = OPS
  autoaugment: bool = False
  solarize: str = "official"
  enhance: str = "official"

  def __post_init__(self):
    if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 0:
      raise AugmentError("layers", f"must be >= 0, got {self.layers}")
    if not self.magnitude >= 0:  # also refuses NaN
      raise AugmentError("magnitude", f"must be >= 0, got {self.magnitude}")
    try:
      ops = parse_ops(self.ops)
    except ValueError as e:
      raise AugmentError("ops", str(e)) from None
    object.__setattr__(self, "ops", ops)
    object.__setattr__(self, "magnitude", float(self.magnitude))
    object.__setattr__(self, "autoaugment", bool(self.autoaugment))
    for field, allowed in (("solarize", SOLARIZE_MODES), ("enhance", ENHANCE_MODES)):
      value = getattr(self, field)
      if value not in allowed:
        raise AugmentError(field, f"{value!r} is not one of {', '.join(allowed)}")

  @property
  def randaugment(self) -> bool:
    """Whether RandAugment runs (AutoAugment off, at least one layer, magnitude above 0)."""
    return not self.autoaugment and self.layers > 0 and self.magnitude > 0

  @property
  def active(self) -> bool:
    """Whether any op-based augmentation runs (the image then goes through uint8)."""
    return self.autoaugment or self.randaugment


def _from_config(config, magnitude: float) -> Augment:
  def get(field, default):
    return config.get(field, default)  # a config saved before a field existed gets its default

  try:
    return Augment(
      layers=get("randaug_layers", 2),
      magnitude=magnitude,
      ops=get("randaug_ops", ""),
      autoaugment=get("autoaugment", False),
      solarize=get("randaug_solarize", "official"),
      enhance=get("randaug_enhance", "official"),
    )
  except AugmentError as e:
    raise AugmentError(CONFIG_FIELDS[e.field], e.reason) from None


def for_stage(config, stage) -> Augment:
  """The augmentation of `stage` (a `progressive.Stage`): its RandAugment magnitude, everything
  else from the config (randaug_layers, randaug_ops, autoaugment, randaug_solarize,
  randaug_enhance). Raises AugmentError naming the config field of a bad value."""
  return _from_config(config, stage.randaug_magnitude)


def check_config(config) -> Augment:
  """Validates the config's augmentation fields (the magnitude comes from the stage table and is
  checked there); returns the augmentation at magnitude 0. Raises AugmentError."""
  return _from_config(config, 0.0)

"""RandAugment's op names and the parser of a configured op subset; free of TensorFlow, so config
validation can check `config.randaug_ops` before anything heavy is imported."""

from __future__ import annotations

# The official order: RandAugment draws an index into this tuple, so the order fixes which op a
# given seed picks.
OPS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "Posterize",
  "Solarize",
  "Color",
  "Contrast",
  "Brightness",
  "Sharpness",
  "ShearX",
  "ShearY",
  "TranslateX",
  "TranslateY",
  "Cutout",
  "SolarizeAdd",
)


def parse_ops(spec) -> tuple:
  """RandAugment's op set from a config value: '' or None = all 16 official `OPS`; otherwise a
  comma-separated string (or sequence) of names from `OPS`, e.g. 'Rotate,ShearX,TranslateX'."""
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    return OPS
  names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n) for n in spec]
  names = [n for n in names if n]
  if not names:
    raise ValueError(
      f'{spec!r} names no RandAugment op; use "" for all 16 or names from {", ".join(OPS)}'
    )
  unknown = [n for n in names if n not in OPS]
  if unknown:
    raise ValueError(f"unknown RandAugment op(s) {unknown}; choose from {', '.join(OPS)}")
  if len(set(names)) != len(names):
    raise ValueError(f"RandAugment ops repeat a name: {names}")
  return tuple(names)

"""Helpers shared by the config files: parsing the `:key=value,...` argument of a config path."""

from __future__ import annotations

import ast


def parse_arg(arg: str | None, **defaults):
  """Parses 'variant=s,preset=paper,runlocal' into a dict over `defaults` (a bare key means True).

  Values are Python literals where they parse as one ('1e-3', 'True', '3'), else strings. An
  unknown key is an error naming the known ones, so a typo never silently does nothing.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}")
    if not sep:
      out[key] = True
      continue
    try:
      out[key] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key] = value.strip()
  return out


def shrink_for_local_run(config, *, image_size: int = 32, steps: int = 4, batch_size: int = 8):
  """`runlocal`: the same experiment at toy scale, a few steps at tiny sizes on a CPU."""
  config.batch_size = batch_size
  config.eval_batch_size = batch_size
  config.num_train_steps = steps
  config.progressive.num_stages = min(config.progressive.num_stages, 2)
  config.progressive.min_image_size = image_size // 2
  config.progressive.max_image_size = image_size
  config.eval_image_size = image_size
  if config.get("bn_group_size"):  # keep grouped BatchNorm on, with groups that tile the batch
    config.bn_group_size = batch_size // 2
  config.warmup_epochs = 0.0
  config.log_every_steps = 1
  config.checkpoint_every_steps = steps
  config.eval_every_seconds = 0.0  # a few steps: no wall-clock curve points (tests set steps)
  config.shuffle_buffer = 64
  config.runlocal = True
  return config

"""Command line: train, evaluate or print the stage plan of a config.

  python -m effnetv2_jax.main --config=configs/demo.py --workdir=/tmp/demo
  python -m effnetv2_jax.main --config=configs/imagenet.py:variant=s,preset=paper \\
      --workdir=gs://bucket/s --config.batch_size=2048
  python -m effnetv2_jax.main --config=configs/demo.py --workdir=/tmp/demo --mode=eval
  python -m effnetv2_jax.main --config=configs/demo.py --workdir=/tmp/demo --mode=eval \\
      --eval_sizes=24,28,32 --config.recalibrate_bn=5000   # test-resolution search, FixRes BN
  python -m effnetv2_jax.main --config=configs/imagenet.py:variant=s --mode=plan
  python -m effnetv2_jax.main --config=configs/demo.py --mode=plan --plan_probe --workdir=/tmp/demo
      # compiles each stage, times a few steps, predicts the run's wall time: /tmp/demo/plan.json

Exit codes: see `effnetv2_jax.exit_codes` (0 done or preempted, 2 bad input as one `error: ...`
line without a traceback, 3 training diverged).
"""

import logging as std_logging
import os
import re
import sys

# TensorFlow (input pipeline only) greets every process with C++ info lines; keep warnings.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from effnetv2_jax import exit_codes

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (path[:args]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
_MODE = flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "eval", "plan"],
  "train: train and evaluate (resuming); eval: evaluate init_from or the "
  "workdir's latest checkpoint; plan: print the stage table.",
)
_PLAN_PROBE = flags.DEFINE_bool(
  "plan_probe",
  False,
  "--mode=plan only: also compile each stage's train step and the eval step, time a few steps "
  "on synthetic data and predict each stage's and the whole run's wall time; writes "
  "WORKDIR/plan.json (needs --workdir). Without it plan mode touches no device.",
)
_PLAN_PROBE_STEPS = flags.DEFINE_integer(
  "plan_probe_steps",
  3,
  "--plan_probe: timed steps per stage and for the eval step, after one warm-up.",
)

_EVAL_SIZES = flags.DEFINE_list(
  "eval_sizes",
  [],
  "--mode=eval only: comma-separated image sizes to evaluate at, one top-1 each (the "
  "test-resolution search), e.g. 224,256,288; empty = config.eval_image_size. With "
  "--config.recalibrate_bn=N the BN statistics are recomputed at each size first.",
)

EXIT_BAD_INPUT = exit_codes.BAD_INPUT
EXIT_DIVERGED = exit_codes.DIVERGED
EXIT_WRITE_FAILED = exit_codes.WRITE_FAILED


def _fail(message: str, code: int) -> None:
  first = str(message).strip().splitlines()
  print(f"error: {first[0] if first else message}", file=sys.stderr, flush=True)
  rest = first[1:]
  if rest:  # e.g. the list of mismatched arrays: still no traceback
    print("\n".join(rest), file=sys.stderr, flush=True)
  sys.exit(code)


def parse_eval_sizes(values) -> list[int]:
  """`--eval_sizes` entries (strings or ints) -> positive ints; ConfigError naming the flag."""
  from effnetv2_jax import config_validation

  sizes = []
  for v in values or ():
    text = str(v).strip()
    if not text:
      continue
    try:
      size = int(text)
    except ValueError:
      size = 0
    if size <= 0 or str(size) != text.lstrip("+"):
      raise config_validation.ConfigError(
        "--eval_sizes", f"{text!r} is not a positive integer image size (e.g. 224,256,288)"
      )
    sizes.append(size)
  return sizes


def _run_plan_probe(config, workdir, steps) -> None:
  import jax

  from effnetv2_jax import config_validation
  from effnetv2_jax import paths
  from effnetv2_jax import plan
  from effnetv2_jax import plan_probe
  from effnetv2_jax import sharding

  if not workdir:
    raise config_validation.ConfigError(
      "--workdir", "is required with --plan_probe (the measured plan goes to WORKDIR/plan.json)"
    )
  plan_probe.check_probe_steps(steps)
  sharding.init_distributed()  # before anything asks for the devices
  num_devices = jax.device_count()
  config_validation.validate_config(config, num_devices=num_devices)
  print(plan.format_plan(config, plan.resolve(config, num_devices=num_devices)) + "\n", flush=True)
  _, table = plan_probe.run_probe(config, workdir, steps=steps, log=lambda m: print(m, flush=True))
  print("\n" + table, flush=True)
  print(f"written to {paths.join(workdir, paths.PLAN_NAME)}", flush=True)


def run(config, workdir, mode, eval_sizes=None, *, plan_probe=False, plan_probe_steps=3) -> int:
  # Imported here so `--help` and flag errors stay fast.
  from effnetv2_jax import checkpoint as ckpt_lib
  from effnetv2_jax import config_validation
  from effnetv2_jax import memory_fit
  from effnetv2_jax import plan
  from effnetv2_jax import train
  from effnetv2_jax import workdir as workdir_lib
  from effnetv2_jax.data import datasets

  try:
    if plan_probe and mode != "plan":
      raise config_validation.ConfigError("--plan_probe", "is only used by --mode=plan")
    if mode == "plan" and plan_probe:
      _run_plan_probe(config, workdir, plan_probe_steps)
      return 0
    if mode == "plan":  # no device, no compile, nothing written
      config_validation.validate_config(config, num_devices=1)
      print(plan.format_plan(config, plan.resolve(config)), flush=True)
      return 0
    sizes = parse_eval_sizes(eval_sizes)
    if sizes and mode != "eval":
      raise config_validation.ConfigError("--eval_sizes", "is only used by --mode=eval")
    if not workdir:
      raise config_validation.ConfigError("--workdir", "is required for --mode=" + mode)
    if mode == "eval":
      train.evaluate(config, workdir, eval_sizes=sizes)
      return 0
    result = train.train_and_evaluate(config, workdir)
    return 0 if result["status"] in ("completed", "preempted", "stopped") else 1
  except config_validation.ConfigError as e:
    _fail(str(e), EXIT_BAD_INPUT)
  except (
    datasets.DatasetNotPreparedError,
    datasets.CorruptDataError,
    ckpt_lib.CheckpointMismatchError,
    ckpt_lib.CheckpointUnreadableError,
    workdir_lib.WorkdirLockedError,
    memory_fit.DoesNotFitError,
    FileNotFoundError,
  ) as e:
    _fail(str(e), EXIT_BAD_INPUT)
  except train.TrainingDivergedError as e:
    _fail(str(e), EXIT_DIVERGED)
  except (ckpt_lib.CheckpointWriteError, train.ResultsWriteError) as e:
    _fail(str(e), EXIT_WRITE_FAILED)
  return 1


def _unknown_field_message(text: str, args) -> str:
  """`--config.batch_sise: no such field; did you mean batch_size?` from ml_collections' error,
  whose text is the field name and a hint, quoted and escaped several times over."""
  words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)
  name = words[0] if words else text
  overrides = [a.split("=")[0] for a in args if a.startswith("--config.")]
  where = next((o for o in overrides if o.rsplit(".", 1)[-1] == name), "--config." + name)
  hint = re.search(r'Did you mean \W*"?([A-Za-z0-9_]+)', text)
  suffix = f"; did you mean {hint.group(1)}?" if hint else " (see configs/default.py)"
  return f"{where}: no such field{suffix}"


def parse_flags(argv):
  """absl's parser, but a bad `--config...` flag is one `error:` line and exit 2, no traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # an override naming a field the config lacks
    _fail(_unknown_field_message(str(e), argv[1:]), EXIT_BAD_INPUT)
  except flags.Error as e:
    _fail(str(e), EXIT_BAD_INPUT)
  except Exception as e:  # pylint: disable=broad-except  (the config file itself failed to load)
    _fail(f"--config: {type(e).__name__}: {e}", EXIT_BAD_INPUT)


def _drop_orbax_errors(record) -> bool:
  """orbax logs a failed write or read with tracebacks from its own threads; the trainer reports
  the same failure as one line (a warning, or an error and exit 2/4), so orbax's warnings and
  errors are dropped unless EFFNET_VERBOSE is set."""
  from_orbax = f"{os.sep}orbax{os.sep}" in (record.pathname or "")
  return not (from_orbax and record.levelno >= std_logging.WARNING)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  verbose = bool(os.environ.get("EFFNET_VERBOSE"))
  logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
  if not verbose:
    logging.get_absl_handler().addFilter(_drop_orbax_errors)
    # The same failure again, from the asyncio tasks orbax writes with ("Task exception was never
    # retrieved"); this program runs no asyncio code of its own.
    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
  try:
    config = _CONFIG.value
    config.get("seed")  # a config file that failed to load only reports it on first access
  except Exception as e:  # pylint: disable=broad-except
    _fail("--config: " + " ".join(str(e).split()), EXIT_BAD_INPUT)
  sys.exit(
    run(
      config,
      _WORKDIR.value,
      _MODE.value,
      _EVAL_SIZES.value,
      plan_probe=_PLAN_PROBE.value,
      plan_probe_steps=_PLAN_PROBE_STEPS.value,
    )
  )


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=parse_flags)

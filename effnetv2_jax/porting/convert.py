"""Convert published weights into a checkpoint of this package (what `config.init_from` reads).

  python -m effnetv2_jax.porting.convert --source=FILE --format=tf|timm|keras --model=NAME --out=DIR

  --format=tf     an official google/automl checkpoint (prefix or directory); EMA weights unless
                  --use_ema=false
  --format=timm   a timm `tf_efficientnetv2_*` / `tf_efficientnet_*` state dict as .safetensors or
                  .npz (a PyTorch .pt/.pth/.bin pickle is refused: convert it to safetensors first)
  --format=keras  a Keras `.keras` file, loaded with safe_mode=True
  --num_classes   optional check of the class count read from the source's classifier
  --model_overrides '{"width_mult": 0.5}'   JSON, for variants built with overrides

The result is DIR/checkpoints/0 in the trainer's own layout (checkpoint.Checkpointer: orbax
arrays plus a JSON record), so the same directory serves all three next steps:

  python -m effnetv2_jax.main --mode=eval --config=configs/imagenet.py:variant=s \\
      --config.init_from=DIR --workdir=/tmp/eval            # top-1/top-5, results.json
  python -m effnetv2_jax.main --config=<a finetune config> --config.init_from=DIR --workdir=W
      # another class count: the classifier is re-initialised, and the log says so
  python -m effnetv2_jax.porting.export --checkpoint=DIR --model=NAME --image_size=384 --out=E
"""

import argparse
import json
import os
import sys
from typing import Dict, Optional

import jax
import numpy as np

FORMATS = ("tf", "timm", "keras")


def load_source(
  source: str, fmt: str, model_name: str, *, use_ema: bool = True, **overrides
) -> Dict[str, dict]:
  """Variables {'params', 'batch_stats'} from `source` in format `fmt` (see the module doc)."""
  if fmt == "tf":
    from effnetv2_jax.porting.tf_checkpoint import from_tf_checkpoint

    return from_tf_checkpoint(source, model_name, use_ema=use_ema, **overrides)
  if not os.path.exists(source):
    raise FileNotFoundError(f"--source: {source} does not exist")
  if fmt == "timm":
    from effnetv2_jax.porting.timm import from_timm, load_state_dict

    return from_timm(load_state_dict(source), model_name, **overrides)
  if fmt == "keras":
    if not source.endswith(".keras"):
      raise ValueError(
        f"{source}: --format=keras reads .keras files (safe to load); "
        'save the model with model.save("model.keras") first'
      )
    import keras  # late: only this format needs Keras
    from effnetv2_jax.porting.keras import from_keras

    # safe_mode refuses lambdas and other code embedded in the file.
    model = keras.models.load_model(source, compile=False, safe_mode=True)
    return from_keras(model, model_name, **overrides)
  raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")


def num_classes_of(variables) -> int:
  return int(np.shape(variables["params"]["classifier"]["kernel"])[1])


def save_variables(variables: Dict[str, dict], out_dir: str, meta: dict) -> str:
  """Write `variables` as step 0 of DIR/checkpoints; refuses to overwrite an existing one."""
  from effnetv2_jax import checkpoint

  ckpt = checkpoint.Checkpointer(out_dir, keep=1, async_save=False)
  try:
    if ckpt.latest_step() is not None:
      raise FileExistsError(
        f"--out: {ckpt.directory} already holds a checkpoint "
        f"(step {ckpt.latest_step()}); choose an empty directory"
      )
    state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    ckpt.save(0, state, meta)
    ckpt.wait()
  finally:
    ckpt.close()
  return os.path.join(ckpt.directory, "0")


def convert(
  source: str,
  fmt: str,
  model_name: str,
  out_dir: str,
  *,
  num_classes: Optional[int] = None,
  use_ema: bool = True,
  **overrides,
) -> dict:
  """Convert and save; returns a summary (also what the CLI prints)."""
  variables = load_source(source, fmt, model_name, use_ema=use_ema, **overrides)
  classes = num_classes_of(variables)
  if num_classes and int(num_classes) != classes:
    # Changing the head belongs to fine-tuning (init_from re-initialises it); a converter
    # that silently dropped the trained classifier would hide a wrong source file.
    raise ValueError(
      f"{source} has a {classes}-class classifier, not {num_classes}; convert it "
      "as is and fine-tune with config.init_from (the head is re-initialised there)"
    )
  meta = {
    "model_name": model_name,
    "num_classes": classes,
    "model_overrides": overrides,
    "converted_from": os.path.abspath(source),
    "format": fmt,
    "weights": "ema" if (use_ema and fmt == "tf") else "as stored",
  }
  path = save_variables(variables, out_dir, meta)
  count = sum(int(np.prod(np.shape(v))) for v in jax.tree_util.tree_leaves(variables["params"]))
  return dict(meta, checkpoint=path, trainable_params=count)


def _bool(text: str) -> bool:
  if text.lower() in ("1", "true", "yes"):
    return True
  if text.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_args(argv):
  p = argparse.ArgumentParser(
    prog="python -m effnetv2_jax.porting.convert", description=__doc__.split("\n")[0]
  )
  p.add_argument(
    "--source", required=True, help="checkpoint prefix/dir, .safetensors/.npz, or .keras"
  )
  p.add_argument("--format", required=True, choices=FORMATS)
  p.add_argument("--model", required=True, help="registered model name, e.g. efficientnetv2-s")
  p.add_argument("--out", required=True, help="output directory (gets checkpoints/0)")
  p.add_argument("--num_classes", type=int, default=None)
  p.add_argument("--use_ema", type=_bool, default=True, help="tf format: load the EMA weights")
  p.add_argument("--model_overrides", default="{}", help="JSON dict of create_model overrides")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    overrides = json.loads(args.model_overrides)
  except json.JSONDecodeError as e:
    raise SystemExit(f"--model_overrides is not JSON: {e}")
  summary = convert(
    args.source,
    args.format,
    args.model,
    args.out,
    num_classes=args.num_classes,
    use_ema=args.use_ema,
    **overrides,
  )
  print(
    f"converted {args.format} {args.source} -> {summary['checkpoint']}: {args.model}, "
    f"{summary['num_classes']} classes, {summary['trainable_params']:,} parameters"
  )
  print(
    f"evaluate: python -m effnetv2_jax.main --mode=eval --config=... "
    f"--config.model_name={args.model} --config.init_from={os.path.abspath(args.out)}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())

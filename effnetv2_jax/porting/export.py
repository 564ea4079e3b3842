"""Export a model for serving: logits = f(images), no RNG, no BatchNorm updates, weights inside.

  python -m effnetv2_jax.porting.export --checkpoint=DIR --model=NAME --image_size=N --out=OUT
      [--batch_size=B (default: any batch)] [--model_overrides JSON] [--saved_model=false]

OUT gets:
  inference.stablehlo   jax.export serialization (StableHLO + calling convention). Load it with
                        jax alone: `jax.export.deserialize(bytearray(open(f, 'rb').read())).call(x)`;
                        lowered for CPU, CUDA and TPU, weights embedded as constants.
  saved_model/          the same function through jax2tf for TF Serving / TF:
                        `tf.saved_model.load(d).signatures['serving_default'](images=x)['logits']`;
                        weights are tf.Variables (a SavedModel graph caps constants at 2 GB).
  export.json           model, image size, classes, input contract, files.
Input: float32 NHWC [batch, N, N, 3], ALREADY preprocessed as the model family expects (V2: pixels
(x - 128) / 128 after the eval resize; see effnetv2_jax/data/preprocess.py). Output: float32 logits.

The depthwise convolution is exported as XLA's grouped convolution (depthwise_impl='xla'), the
portable form; the default 'auto' would pick the CPU-only shifted-sum rewrite on this machine.
"""

import argparse
import dataclasses
import json
import os
import sys
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

STABLEHLO_FILE = "inference.stablehlo"
SAVED_MODEL_DIR = "saved_model"
PLATFORMS = ("cpu", "cuda", "tpu")


def inference_fn(variables: Dict[str, dict], model_name: str, **model_kwargs):
  """(images -> logits, model): eval-mode apply with `variables` closed over as constants."""
  from effnetv2_jax.models import create_model

  num_classes = int(np.shape(variables["params"]["classifier"]["kernel"])[1])
  model_kwargs.setdefault("depthwise_impl", "xla")
  model = create_model(model_name, num_classes=num_classes, **model_kwargs)
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

  def infer(images):
    # train=False: BN uses its moving statistics, dropout/drop-path are off, nothing is mutated.
    return model.apply(variables, images, train=False)

  return infer, model


@dataclasses.dataclass(frozen=True)
class InputContract:
  """What an exported function takes: float32 NHWC [batch, size, size, 3]; batch None = any."""

  image_size: int
  batch_size: Optional[int] = None
  platforms: Sequence[str] = PLATFORMS

  @property
  def batch_dim(self) -> str:
    return "b" if self.batch_size is None else str(int(self.batch_size))

  def spec(self) -> jax.ShapeDtypeStruct:
    """The argument jax.export lowers for (a symbolic batch when any batch is allowed)."""
    n = self.image_size
    batch = jax.export.symbolic_shape("b")[0] if self.batch_size is None else int(self.batch_size)
    return jax.ShapeDtypeStruct((batch, n, n, 3), jnp.float32)

  def describe(self) -> str:
    n = self.image_size
    return f"float32 NHWC [{self.batch_size or 'any'}, {n}, {n}, 3]"


def export_stablehlo(infer, contract: InputContract, path: str) -> str:
  exported = jax.export.export(jax.jit(infer), platforms=tuple(contract.platforms))(contract.spec())
  _write_atomic(path, exported.serialize())
  return path


def export_saved_model(
  variables: Dict[str, dict], model, contract: InputContract, path: str
) -> str:
  """jax2tf SavedModel with a `serving_default` signature images -> logits."""
  import tensorflow as tf  # late: only the SavedModel needs TensorFlow
  from jax.experimental import jax2tf

  n = contract.image_size
  apply = lambda v, x: model.apply(v, x, train=False)
  converted = jax2tf.convert(
    apply,
    with_gradient=False,
    native_serialization_platforms=tuple(contract.platforms),
    polymorphic_shapes=[None, f"({contract.batch_dim}, {n}, {n}, 3)"],
  )
  module = tf.Module()
  module.variables_tree = tf.nest.map_structure(
    lambda a: tf.Variable(np.asarray(a), trainable=False),
    {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})},
  )

  @tf.function(
    autograph=False,
    input_signature=[tf.TensorSpec([contract.batch_size, n, n, 3], tf.float32, name="images")],
  )
  def serve(images):
    return {"logits": converted(module.variables_tree, images)}

  module.serve = serve
  tf.saved_model.save(module, path, signatures={"serving_default": serve})
  return path


def export_inference(
  variables: Dict[str, dict],
  model_name: str,
  image_size: int,
  out_dir: str,
  *,
  batch_size: Optional[int] = None,
  saved_model: bool = True,
  platforms: Sequence[str] = PLATFORMS,
  **model_kwargs,
) -> dict:
  """Write the StableHLO export (and a SavedModel) of `variables` to `out_dir`; returns export.json."""
  os.makedirs(out_dir, exist_ok=True)
  infer, model = inference_fn(variables, model_name, **model_kwargs)
  contract = InputContract(image_size, batch_size, tuple(platforms))
  files = {"stablehlo": export_stablehlo(infer, contract, os.path.join(out_dir, STABLEHLO_FILE))}
  if saved_model:
    path = os.path.join(out_dir, SAVED_MODEL_DIR)
    files["saved_model"] = export_saved_model(variables, model, contract, path)
  record = {
    "model_name": model_name,
    "model_kwargs": {k: v for k, v in model_kwargs.items()},
    "image_size": int(image_size),
    "num_classes": int(model.num_classes),
    "input": f"{contract.describe()}, preprocessed for the model family (V2: (x - 128) / 128)",
    "output": "float32 logits [batch, num_classes]",
    "platforms": list(platforms),
    "files": files,
  }
  _write_atomic(
    os.path.join(out_dir, "export.json"), json.dumps(record, indent=1, default=str).encode()
  )
  return record


def _write_atomic(path: str, data: bytes):
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)  # a reader never sees half a file


def load_stablehlo(path: str):
  """The exported function, callable as f(images) -> logits (needs only jax)."""
  with open(path, "rb") as f:
    return jax.export.deserialize(bytearray(f.read())).call


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m effnetv2_jax.porting.export", description=__doc__.split("\n")[0]
  )
  p.add_argument("--checkpoint", required=True, help="a checkpoint of this package (EMA preferred)")
  p.add_argument("--model", required=True)
  p.add_argument("--image_size", required=True, type=int)
  p.add_argument("--out", required=True)
  p.add_argument("--batch_size", type=int, default=None, help="fixed batch; default: any")
  p.add_argument("--model_overrides", default="{}", help="JSON dict of create_model overrides")
  p.add_argument("--saved_model", default="true", choices=("true", "false"))
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  from effnetv2_jax import checkpoint

  params, batch_stats, step = checkpoint.load_variables(args.checkpoint)
  record = export_inference(
    {"params": params, "batch_stats": batch_stats},
    args.model,
    args.image_size,
    args.out,
    batch_size=args.batch_size,
    saved_model=args.saved_model == "true",
    **json.loads(args.model_overrides),
  )
  print(
    f"exported {args.model} (checkpoint step {step}) at {args.image_size}px to {args.out}: "
    + ", ".join(record["files"].values())
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())

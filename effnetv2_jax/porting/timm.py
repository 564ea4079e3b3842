"""timm `tf_efficientnetv2_*` (B0-B3, S, M, L, XL) and `tf_efficientnet_*` state dicts -> our variables.

timm numbers blocks per stage (`blocks.<stage>.<block>`), we number them flat (`blocks_k`); the
BlockSpec of block k carries its (stage, index in stage), so the table only maps child names per
block layout. Only the `tf_` ports use TF-SAME padding like our models; timm's other EfficientNets
pad symmetrically and would load without error but lose about a point of accuracy.

Files are read without pickle: `.npz` (numpy, allow_pickle=False) and `.safetensors` (a small
reader below: 8-byte little-endian header length, a JSON header, raw little-endian bytes). A
PyTorch `.pt/.pth/.bin` file is a pickle that can run code when loaded, so it is refused with the
command that turns it into safetensors on a machine that has torch.
"""

import json
import os
from typing import Dict, Mapping

import numpy as np

from effnetv2_jax.porting import names

# Our module path -> timm module name, outside the blocks.
TIMM_FIXED = {
  "stem/conv": "conv_stem",
  "stem/bn": "bn1",
  "head/conv": "conv_head",
  "head/bn": "bn2",
  "classifier": "classifier",
}
# Per block layout (names.block_layout): our child module -> timm child module.
_SE = {"se/reduce": "se.conv_reduce", "se/expand": "se.conv_expand"}
TIMM_BLOCKS = {
  # ConvBnAct ('cn' in timm's arch strings): one kxk conv with BN and activation.
  "fused_e1": {"project/conv": "conv", "project/bn": "bn1"},
  # EdgeResidual ('er'): kxk expand, 1x1 linear project.
  "fused": {
    "expand/conv": "conv_exp",
    "expand/bn": "bn1",
    **_SE,
    "project/conv": "conv_pwl",
    "project/bn": "bn2",
  },
  # InvertedResidual ('ir').
  "mbconv": {
    "expand/conv": "conv_pw",
    "expand/bn": "bn1",
    "dw/conv": "conv_dw",
    "dw/bn": "bn2",
    **_SE,
    "project/conv": "conv_pwl",
    "project/bn": "bn3",
  },
  # DepthwiseSeparableConv ('ds', EfficientNet V1's first stage): no expand.
  "mbconv_e1": {
    "dw/conv": "conv_dw",
    "dw/bn": "bn1",
    **_SE,
    "project/conv": "conv_pw",
    "project/bn": "bn2",
  },
}
# (collection, our leaf) -> timm parameter/buffer name.
TIMM_LEAVES = names.leaf_names("weight", "bias", "weight", "running_mean", "running_var")
# Buffers timm keeps that have no counterpart here (the BN update counter).
TIMM_IGNORED_SUFFIXES = (".num_batches_tracked",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def timm_lookup(specs):
  """lookup(leaf) -> (timm name, transform) for a model with these block specs."""

  def lookup(leaf: names.Leaf):
    module = names.module_path(
      leaf,
      specs,
      TIMM_BLOCKS,
      TIMM_FIXED,
      lambda _, spec, c: f"blocks.{spec.stage}.{spec.index_in_stage}.{c}",
    )
    if module is None:
      return None
    transform = None
    if leaf.path[-1] == "kernel":
      transform = "torch_linear" if leaf.module == "classifier" else "torch_conv"
    return f"{module}.{TIMM_LEAVES[(leaf.collection, leaf.path[-1])]}", transform

  return lookup


def from_timm(
  state_dict: Mapping[str, np.ndarray], model_name: str, **overrides
) -> Dict[str, dict]:
  """Variables {'params', 'batch_stats'} for `create_model(model_name)` from a timm state dict.

  `state_dict` maps timm names to numpy arrays (see load_state_dict). The class count is read
  from `classifier.weight` unless `num_classes` is given. Raises ValueError naming every missing,
  unexpected and mis-shaped array.
  """
  classes = names.classifier_classes(state_dict, "classifier.weight", axis=0)
  num_classes = overrides.pop("num_classes", None) or classes or 1000
  _, specs, leaves = names.build(model_name, num_classes, **overrides)
  return names.fill_variables(
    leaves,
    state_dict,
    timm_lookup(specs),
    what=f"timm state dict does not match {model_name}",
    ignore=lambda n: n.endswith(TIMM_IGNORED_SUFFIXES),
  )


def to_timm(variables: Mapping[str, dict], model_name: str, **overrides) -> Dict[str, np.ndarray]:
  """Our variables -> a timm-named state dict (numpy, torch layouts); the inverse of from_timm."""
  num_classes = int(np.shape(variables["params"]["classifier"]["kernel"])[1])
  _, specs, leaves = names.build(model_name, num_classes, **overrides)
  return names.to_source(variables, leaves, timm_lookup(specs))


# ---------------------------------------------------------------------------------------------
# Files. safetensors dtype codes -> numpy dtypes (bfloat16 from ml_dtypes, which jax ships with).
def _safetensors_dtypes():
  import ml_dtypes

  return {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
  }


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """name -> array (read-only views of a memory map) from a .safetensors file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{path}: too short to be a safetensors file")
    n = int.from_bytes(head, "little")
    if n > size - 8:
      raise ValueError(f"{path}: header length {n} exceeds the file size; not safetensors?")
    header = json.loads(f.read(n))
  data = (
    np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    if size > 8 + n
    else np.zeros(0, np.uint8)
  )
  dtypes, out = _safetensors_dtypes(), {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = np.dtype(dtypes[info["dtype"]]) if info["dtype"] in dtypes else None
    if dtype is None:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    count = int(np.prod(info["shape"], dtype=np.int64))
    if end - begin != count * dtype.itemsize or end > data.size:
      raise ValueError(
        f"{path}: tensor {name!r} offsets {begin}..{end} do not fit shape "
        f"{info['shape']} {info['dtype']} (file truncated?)"
      )
    out[name] = data[begin:end].view(dtype).reshape(info["shape"])
  return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]):
  """Write name -> array as .safetensors (tests build timm-format files with it)."""
  codes = {np.dtype(v): k for k, v in _safetensors_dtypes().items()}
  header, chunks, offset = {}, [], 0
  for name, value in tensors.items():
    value = np.ascontiguousarray(value)
    raw = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
    header[name] = {
      "dtype": codes[value.dtype],
      "shape": list(value.shape),
      "data_offsets": [offset, offset + len(raw)],
    }
    chunks.append(raw)
    offset += len(raw)
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
  with open(path, "wb") as f:
    f.write(len(text).to_bytes(8, "little") + text)
    for raw in chunks:
      f.write(raw)


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """name -> numpy array from a `.safetensors` or `.npz` file; never unpickles anything."""
  lower = path.lower()
  if lower.endswith(PICKLE_SUFFIXES):
    raise ValueError(
      f"{path} is a PyTorch pickle; loading it could run arbitrary code, so it is refused. "
      'Convert it once where torch is installed: python -c "import torch, safetensors.torch as st; '
      f"st.save_file(torch.load('{os.path.basename(path)}', map_location='cpu', weights_only=True), "
      "'model.safetensors')\" (or download the model.safetensors that timm publishes on the HF Hub)."
    )
  if lower.endswith(".safetensors"):
    return read_safetensors(path)
  if lower.endswith(".npz"):
    with np.load(path, allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  raise ValueError(f"{path}: unknown state dict format; expected .safetensors or .npz")


def load_timm(path: str, model_name: str, **overrides) -> Dict[str, dict]:
  return from_timm(load_state_dict(path), model_name, **overrides)

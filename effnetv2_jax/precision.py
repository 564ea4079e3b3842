"""Compute precision: `config.dtype` ('float32' | 'bfloat16' | 'auto') -> the dtype the model computes in.

The official runs train with `mixed_precision=True` (reference section 10, item 10): bfloat16
compute on TPU with float32 variables and float32 logits. 'auto' reproduces that where bfloat16 is
fast (TPU, and GPUs, whose tensor cores take bfloat16) and stays float32 on the CPU, where
bfloat16 has no fast path. It is resolved at run time, on the machine that trains, so one config
serves a TPU pod and a CPU smoke run. Whatever the compute dtype, parameters, BatchNorm statistics,
the loss and the optimizer state stay float32 (models/layers.py, steps.py).

The trainer calls `resolve_dtype(config.dtype)` once and looks the name up in its dtype table; the
resolved name is what a run should record (results.json), since 'auto' alone does not say what ran.
No TensorFlow here; jax is imported only to ask for the backend.
"""

from __future__ import annotations

DTYPE_NAMES = ("float32", "bfloat16", "auto")
# Backends on which 'auto' computes in bfloat16 (jax.default_backend() names; 'gpu' covers CUDA
# and ROCm in current JAX, the explicit names older or plugin builds report).
BF16_BACKENDS = ("tpu", "gpu", "cuda", "rocm")


def resolve_dtype(name: str, backend: str | None = None) -> str:
  """'float32' | 'bfloat16' for `name`; 'auto' -> 'bfloat16' on TPU/GPU, 'float32' otherwise.

  `backend` defaults to `jax.default_backend()` (pass it to resolve for another machine).
  """
  if name not in DTYPE_NAMES:
    raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
  if name != "auto":
    return name
  if backend is None:
    import jax

    backend = jax.default_backend()
  return "bfloat16" if str(backend).lower() in BF16_BACKENDS else "float32"

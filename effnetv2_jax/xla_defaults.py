"""XLA:CPU settings this codebase runs with by default, applied when the package is imported.

XLA reads `XLA_FLAGS` once, when its first backend starts, so the flags are added to the
environment at import time, before any computation. They are added only when:
  - no accelerator plugin (CUDA, ROCm, TPU) is installed, or JAX_PLATFORMS asks for cpu only,
    so GPU and TPU runs see exactly the flags their user set;
  - the user has not set the same flag (their value wins);
  - EFFNETV2_JAX_XLA_DEFAULTS is not 0 (the switch to measure without them);
  - no JAX backend has started yet (after that a flag would silently do nothing).

The flags, and why (numbers in experiments/results/bench_train_step.md):
  --xla_cpu_enable_concurrency_optimized_scheduler=false
      XLA:CPU's default scheduler orders independent ops to run concurrently. On a machine with few
      cores they then contend: the nine kernel-gradient reductions of one depthwise conv ran in
      23 ms that way and in 5 ms one after another. With the plain scheduler the EfficientNetV2-B0
      train step (batch 32 at 128 px, 2 cores) went from 36 to 41 images/s. A per-jit
      `compiler_options` entry is accepted by XLA but has no effect, hence the environment.
"""
from __future__ import annotations

import importlib.metadata
import os

CPU_FLAGS = ('--xla_cpu_enable_concurrency_optimized_scheduler=false',)
SWITCH = 'EFFNETV2_JAX_XLA_DEFAULTS'
_ACCELERATOR_DISTRIBUTIONS = ('jax-cuda', 'jax_cuda', 'jax-rocm', 'jax_rocm', 'libtpu')


def _accelerator_plugin_installed() -> bool:
  for dist in importlib.metadata.distributions():
    name = (dist.metadata['Name'] or '').lower()
    if name.startswith(_ACCELERATOR_DISTRIBUTIONS):
      return True
  return False


def _cpu_only(environ) -> bool:
  platforms = environ.get('JAX_PLATFORMS', '').strip().lower()
  if platforms:
    return platforms == 'cpu'
  return not _accelerator_plugin_installed()


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # private API moved: assume not started, the flags are then merely unused
    return False


def apply(environ=os.environ) -> tuple[str, ...]:
  """Adds the CPU defaults to environ['XLA_FLAGS'] where allowed; returns the flags it added."""
  if environ.get(SWITCH, '1') == '0' or not _cpu_only(environ) or _backend_started():
    return ()
  current = environ.get('XLA_FLAGS', '')
  added = tuple(f for f in CPU_FLAGS if f.split('=')[0] not in current)
  if added:
    environ['XLA_FLAGS'] = ' '.join([current.strip(), *added]).strip()
  return added

"""XLA:CPU settings this codebase runs with by default, applied when the package is imported.

XLA reads `XLA_FLAGS` once, when its first backend starts, so the flags are added to the
environment at import time, before any computation. They are added only when:
  - no accelerator plugin (CUDA, ROCm, TPU) is installed, or JAX_PLATFORMS asks for cpu only,
    so GPU and TPU runs see exactly the flags their user set;
  - the user has not set the same flag (their value wins);
  - EFFNETV2_JAX_XLA_DEFAULTS is not 0 (the switch to measure without them);
  - no JAX backend has started yet (after that a flag would silently do nothing);
  - the installed XLA knows the flag (XLA aborts on an unknown one, and experimental flags come
    and go between jaxlib releases): its name must appear in jaxlib's XLA library.

The flags, and why (numbers in experiments/results/bench_train_step.md):
  --xla_cpu_enable_concurrency_optimized_scheduler=false
      XLA:CPU's default scheduler orders independent ops to run concurrently. On a machine with few
      cores they then contend: the nine kernel-gradient reductions of one depthwise conv ran in
      23 ms that way and in 5 ms one after another. With the plain scheduler the EfficientNetV2-B0
      train step (batch 32 at 128 px, 2 cores) went from 36 to 41 images/s. A per-jit
      `compiler_options` entry is accepted by XLA but has no effect, hence the environment.
  --xla_cpu_experimental_ynn_fusion_type=dot,reduce
      By default XLA:CPU hands convolutions, dots and reductions to YNNPACK. For the dense 3x3
      convolutions of the stem and the Fused-MBConv stages, XLA's own (Eigen) convolution was
      about twice as fast here (32->128 channels at 32x32, batch 32: forward 26 -> 12 ms, forward
      and backward 48-69 -> 33 ms), so only dots and reductions stay with YNNPACK; taking those
      away too made the whole step 2.5x slower (reductions). Whole B0 step: +14-20%.
"""

from __future__ import annotations

import importlib.metadata
import os

CPU_FLAGS = (
  "--xla_cpu_enable_concurrency_optimized_scheduler=false",
  "--xla_cpu_experimental_ynn_fusion_type=dot,reduce",
)
SWITCH = "EFFNETV2_JAX_XLA_DEFAULTS"
_ACCELERATOR_DISTRIBUTIONS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


def _accelerator_plugin_installed() -> bool:
  for dist in importlib.metadata.distributions():
    name = (dist.metadata["Name"] or "").lower()
    if name.startswith(_ACCELERATOR_DISTRIBUTIONS):
      return True
  return False


def _cpu_only(environ) -> bool:
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms == "cpu"
  return not _accelerator_plugin_installed()


def _known_to_xla(flags) -> tuple[str, ...]:
  """The `flags` whose names appear in jaxlib's XLA library, in order: one pass over its shared
  libraries (read by mmap; no backend starts), however many flags are asked about."""
  import glob
  import importlib.util
  import mmap

  spec = importlib.util.find_spec("jaxlib")
  if not flags or spec is None or not spec.origin:
    return ()
  names = {f: f.lstrip("-").split("=")[0].encode() for f in flags}
  found = set()
  root = os.path.dirname(spec.origin)
  for path in glob.glob(os.path.join(root, "*.so")) + glob.glob(os.path.join(root, "*", "*.so")):
    try:
      with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        found.update(
          flag for flag, name in names.items() if flag not in found and m.find(name) >= 0
        )
    except (OSError, ValueError):  # unreadable, or empty (mmap of 0 bytes)
      continue
    if len(found) == len(names):
      break
  return tuple(f for f in flags if f in found)


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # private API moved: assume not started, the flags are then merely unused
    return False


def apply(environ=os.environ) -> tuple[str, ...]:
  """Adds the CPU defaults to environ['XLA_FLAGS'] where allowed; returns the flags it added."""
  if environ.get(SWITCH, "1") == "0" or not _cpu_only(environ) or _backend_started():
    return ()
  current = environ.get("XLA_FLAGS", "")
  added = _known_to_xla([f for f in CPU_FLAGS if f.split("=")[0] not in current])
  if added:
    environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
  return added

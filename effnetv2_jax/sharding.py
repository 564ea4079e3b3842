"""Data parallelism with `jax.jit` over a one-axis ('data') device mesh.

The state is replicated, the batch is split along its first axis over every device of every
process, and XLA inserts the collectives: BatchNorm's batch mean and the loss mean become global
reductions with no `axis_name` plumbing, so the step computes the same numbers on 1 or N devices.
With `config.bn_group_size = G` BatchNorm reduces over groups of G consecutive images instead; the
batch axis is split in contiguous blocks, so a group lies on one device when G divides the
per-device batch (no communication for it) and spans devices otherwise (XLA reduces within it).
Output shardings are pinned and the state is donated, so each stage's step compiles exactly once
and does not hold two copies of the state.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'; the other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Place a host/single-device pytree (e.g. a fresh TrainState) replicated on the mesh.

  Every process must pass the same values (true for a state initialized from the config seed).
  """
  return jax.device_put(tree, replicated(mesh))


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Stitch each process's slice of the global batch into global arrays sharded over 'data'.

  `local_batch` holds this process's rows only (global batch / process count); the global batch
  must split evenly over the mesh's devices.
  """
  sharding = batch_sharding(mesh)
  n_local = len(mesh.local_devices)
  out = {}
  for name, value in local_batch.items():
    value = np.asarray(value)
    if value.ndim == 0 or value.shape[0] % n_local:
      raise ValueError(
        f"shard_batch: '{name}' has local batch shape {value.shape}; its first axis must be a "
        f"multiple of this process's {n_local} devices (choose batch_size as a multiple of "
        f"the total device count, {mesh.size})"
      )
    out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out


def jit_train_step(train_step: Callable, mesh: Mesh, state: Any) -> Callable:
  """Jit `train_step(state, batch, rng)`: replicated state and rng, data-sharded batch.

  `state` is only read for its structure (one replicated sharding per leaf); pinning the output
  sharding to the input's keeps the donated buffers reusable and the cache at one entry per shape.
  """
  rep = replicated(mesh)
  state_sh = jax.tree.map(lambda _: rep, state)
  return jax.jit(
    train_step,
    in_shardings=(state_sh, batch_sharding(mesh), rep),
    out_shardings=(state_sh, rep),
    donate_argnums=(0,),
  )


def jit_eval_step(eval_step: Callable, mesh: Mesh) -> Callable:
  """Jit `eval_step(variables, batch)`: replicated variables, data-sharded batch, replicated sums.

  Nothing is donated: the variables (the EMA) are still needed after evaluation.
  """
  rep = replicated(mesh)
  return jax.jit(eval_step, in_shardings=(rep, batch_sharding(mesh)), out_shardings=rep)


def _launched_multiprocess() -> bool:
  env = os.environ
  for var in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(env.get(var, "1") or 1) > 1:
      return True
  # Multi-host Cloud TPU slices list their workers; a single host lists one (or none).
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


_initialized = False


def init_distributed() -> None:
  """`jax.distributed.initialize()` when this process is one of several; a no-op otherwise.

  Must run before anything touches a JAX device. With `JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` set (our localhost launcher, or any custom one) they are
  passed explicitly; on Cloud TPU / Slurm / Open MPI JAX detects the cluster itself. Idempotent.
  """
  global _initialized
  if _initialized or jax.distributed.is_initialized() or not _launched_multiprocess():
    return
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS") or env.get("JAX_NUM_PROCESSES"):
    missing = [
      v
      for v in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
      if not env.get(v)
    ]
    if missing:
      raise RuntimeError(
        f"init_distributed: multi-process launch needs {', '.join(missing)} "
        "set as well (coordinator host:port, process count, this process's id)"
      )
    jax.distributed.initialize(
      coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
      num_processes=int(env["JAX_NUM_PROCESSES"]),
      process_id=int(env["JAX_PROCESS_ID"]),
    )
  else:
    jax.distributed.initialize()
  _initialized = True
  logging.info(
    "jax.distributed initialized: process %d of %d, %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.device_count(),
  )

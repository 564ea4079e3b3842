"""One process of tests/test_sharding.py::test_two_processes_match_one (not a test module).

Launched with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set, it joins the
jax.distributed job, trains the tiny model a few steps on the global mesh feeding only its own rows
of each batch, and saves the losses and the flattened final params to argv[1].
"""

import sys

import numpy as np

from effnetv2_jax import sharding

sharding.init_distributed()  # before anything touches a device

import jax  # noqa: E402

import test_sharding  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 4, (
  jax.process_count(),
  jax.device_count(),
)
metrics, state, _, _ = test_sharding._run(jax.devices())
np.savez(
  sys.argv[1],
  loss=np.array([m["loss"] for m in metrics]),
  params=np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.params)]),
)

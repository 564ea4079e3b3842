"""One process of tests/test_multihost.py (not a test module), launched as 2 processes x 2 CPU
devices (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set) or 1 process x 4.

argv: workdir, dataset root, steps, npz prefix. Two checks share the launch:
  1. the training core alone: tests/test_sharding.py's TinyNet steps on the global mesh, each
     process feeding only its own rows of each batch; the losses and the flattened final params
     go to <npz prefix><process index>.npz;
  2. the whole training loop: train the tiny config in workdir. Every process reads the same
     *global* batch through the real input pipeline and keeps its own rows, so a 2x2 run and a
     1x4 run see identical global batches (the real per-process split gives each process
     different examples, which is right for training but leaves nothing to compare).
"""

import sys

from effnetv2_jax import sharding

sharding.init_distributed()  # before anything touches a device

import jax  # noqa: E402
import numpy as np  # noqa: E402

# As tests/conftest.py: dropout masks must not depend on how an array is sharded.
jax.config.update("jax_threefry_partitionable", True)

from effnetv2_jax import train  # noqa: E402
from effnetv2_jax.data import input_pipeline  # noqa: E402

import _train_fixtures as fx  # noqa: E402
import test_sharding  # noqa: E402

workdir, data, steps, npz_prefix = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
print(
  f"process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local "
  f"of {jax.device_count()} devices",
  flush=True,
)
assert jax.device_count() == 4, jax.device_count()

# 1. The training core.
metrics, state, _, _ = test_sharding.train_tiny(jax.devices())
np.savez(
  f"{npz_prefix}{jax.process_index()}.npz",
  loss=np.array([m["loss"] for m in metrics]),
  params=np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.params)]),
)

# 2. The training loop.
_real = input_pipeline.train_iterator


def _same_global_batches(**kw):
  index, count = kw["process_index"], kw["process_count"]
  # The global stream: this process' position times the processes (every process is as far).
  kw.update(process_index=0, process_count=1, start_example=kw["start_example"] * count)
  for batch in _real(**kw):
    rows = len(batch["label"]) // count
    yield {k: v[index * rows : (index + 1) * rows] for k, v in batch.items()}


input_pipeline.train_iterator = _same_global_batches

cfg = fx.tiny_config(data, steps=steps, log_every=1, ckpt_every=2)
cfg.progressive.preset = "none"
cfg.progressive.max_image_size = cfg.eval_image_size = 16
cfg.progressive.max_mixup = 0.0
res = train.train_and_evaluate(cfg, workdir)
assert res["status"] == "completed"

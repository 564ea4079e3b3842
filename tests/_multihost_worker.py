"""One process of tests/test_multihost.py (not a test module): train the tiny config.

argv: workdir, dataset root, steps. Every process reads the same *global* batch through the real
input pipeline and keeps its own rows, so a 2x2 run and a 1x4 run see identical global batches
(the real per-process split gives each process different examples, which is right for training
but leaves nothing to compare).
"""

import sys

from effnetv2_jax import sharding

sharding.init_distributed()  # before anything touches a device

import jax  # noqa: E402

from effnetv2_jax import train  # noqa: E402
from effnetv2_jax.data import input_pipeline  # noqa: E402

import _train_fixtures as fx  # noqa: E402

_real = input_pipeline.train_iterator


def _same_global_batches(**kw):
  index, count = kw["process_index"], kw["process_count"]
  kw.update(process_index=0, process_count=1)
  for batch in _real(**kw):
    rows = len(batch["label"]) // count
    yield {k: v[index * rows : (index + 1) * rows] for k, v in batch.items()}


input_pipeline.train_iterator = _same_global_batches

workdir, data, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = fx.tiny_config(data, steps=steps, log_every=1, ckpt_every=2)
cfg.progressive.preset = "none"
cfg.progressive.max_image_size = cfg.eval_image_size = 16
cfg.progressive.max_mixup = 0.0
print(
  f"process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local "
  f"of {jax.device_count()} devices",
  flush=True,
)
res = train.train_and_evaluate(cfg, workdir)
assert res["status"] == "completed"

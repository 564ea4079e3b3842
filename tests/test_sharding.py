"""Data parallelism (effnetv2_jax/sharding.py): same numbers on 1 and 8 devices, one compile.

`train_tiny` is also what each process of tests/test_multihost.py runs (2 processes x 2 devices
against 1 process x 4), so keep it importable without pytest fixtures."""

import jax
import numpy as np
import pytest

from configs import default
from effnetv2_jax import optim, sharding, state as state_lib, steps
from tiny_net import TinyNet

K = 10
GLOBAL_BATCH = 16


def train_tiny(devices, num_steps=3, bn_group_size=0, grad_accum_steps=1):
  """Train a few steps on a mesh over `devices`; return (metrics per step, final state, jitted)."""
  c = default.get_config()
  c.batch_size, c.warmup_epochs = GLOBAL_BATCH, 1.0  # warmup: a changing LR inside the run
  tx = optim.make_optimizer(c, 2.0, 100)
  # dropout on: masks must not depend on sharding
  model = TinyNet(num_classes=K, dropout_rate=0.5, bn_group_size=bn_group_size)
  mesh = sharding.make_mesh(devices)
  state = state_lib.create_train_state(jax.random.key(0), model, tx, 8)
  state = sharding.put_replicated(state, mesh)
  step = sharding.jit_train_step(
    steps.make_train_step(
      model,
      tx,
      num_classes=K,
      label_smoothing=0.1,
      weight_decay=1e-5,
      ema_decay=0.9999,
      lr_fn=optim.lr_schedule(c, 2.0),
      grad_accum_steps=grad_accum_steps,
    ),
    mesh,
    state,
  )
  rng = jax.random.key(42)
  metrics = []
  # Each process feeds only its own rows of the global batch (all of it when single-process).
  n_local = GLOBAL_BATCH // jax.process_count()
  rows = slice(jax.process_index() * n_local, (jax.process_index() + 1) * n_local)
  for t in range(num_steps):
    r = np.random.default_rng(t)
    batch = sharding.shard_batch(
      {
        "image": r.normal(size=(GLOBAL_BATCH, 8, 8, 3)).astype(np.float32)[rows],
        "label": r.integers(0, K, size=GLOBAL_BATCH).astype(np.int32)[rows],
      },
      mesh,
    )
    state, m = step(state, batch, rng)
    metrics.append(jax.device_get(m))
  # Replicated arrays: every process holds a full copy, so read its first shard.
  host_state = jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), state)
  return metrics, host_state, step, mesh


@pytest.fixture(scope="module")
def runs():
  assert jax.device_count() == 8, "tests/conftest.py must force 8 CPU devices"
  return train_tiny(jax.devices()[:1]), train_tiny(jax.devices())


def test_one_and_eight_devices_agree(runs):
  (m1, s1, _, _), (m8, s8, _, mesh8) = runs
  assert mesh8.size == 8
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(a["loss"], b["loss"], atol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
  assert m1[-1]["learning_rate"] > m1[0]["learning_rate"]
  # BatchNorm statistics are global-batch statistics on both meshes, and so are params and EMA.
  for field in ("params", "batch_stats", "ema_params", "ema_batch_stats", "opt_state"):
    jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5),
      getattr(s1, field),
      getattr(s8, field),
    )


# 16 images on 8 devices, 2 per device: groups of 2 sit on one device each, groups of 4 span two.
@pytest.mark.parametrize("bn_group_size", [2, 4])
def test_grouped_batchnorm_is_the_same_on_one_and_eight_devices(runs, bn_group_size):
  (m1, s1, _, _), _ = runs
  g1 = train_tiny(jax.devices()[:1], num_steps=2, bn_group_size=bn_group_size)
  g8 = train_tiny(jax.devices(), num_steps=2, bn_group_size=bn_group_size)
  for a, b in zip(g1[0], g8[0]):
    np.testing.assert_allclose(a["loss"], b["loss"], atol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
  for field in ("params", "batch_stats", "ema_params", "ema_batch_stats", "opt_state"):
    jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5),
      getattr(g1[1], field),
      getattr(g8[1], field),
    )
  # Grouped statistics really differ from whole-batch ones (the same first batch and keys).
  assert abs(float(g1[0][0]["loss"]) - float(m1[0]["loss"])) > 1e-4


def test_step_compiles_once_and_survives_donation(runs):
  _, (_, state, step, mesh) = runs
  compiles = []

  def listener(event, duration, **kw):
    if "backend_compile" in event:
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    state = sharding.put_replicated(state, mesh)
    batch = sharding.shard_batch(
      {
        "image": np.zeros((GLOBAL_BATCH, 8, 8, 3), np.float32),
        "label": np.zeros((GLOBAL_BATCH,), np.int32),
      },
      mesh,
    )
    rng = jax.random.key(0)
    s1, _ = step(state, batch, rng)
    s2, m = step(s1, batch, rng)  # the donated s1 buffers are not needed again
    jax.block_until_ready(s2)
    step_compiles = len(compiles)
    jax.jit(lambda x: x * 3)(m["loss"]).block_until_ready()  # the listener does see compiles
    assert len(compiles) == step_compiles + 1
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert step_compiles == 0  # the fixture's three steps compiled it; these two hit the cache
  assert step._cache_size() == 1
  assert int(s2.step) == 5 and np.isfinite(m["loss"])
  assert s1.params["Dense_0"]["kernel"].is_deleted()  # donation really happened
  assert s2.params["Dense_0"]["kernel"].sharding.is_fully_replicated


def test_eval_sums_agree_across_meshes(runs):
  (_, s1, _, _), _ = runs
  model = TinyNet(num_classes=K)
  r = np.random.default_rng(9)
  host = {
    "image": r.normal(size=(GLOBAL_BATCH, 8, 8, 3)).astype(np.float32),
    "label": r.integers(0, K, size=GLOBAL_BATCH).astype(np.int32),
    "mask": (np.arange(GLOBAL_BATCH) < 13).astype(np.float32),
  }
  out = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(devices)
    ev = sharding.jit_eval_step(steps.make_eval_step(model, num_classes=K), mesh)
    out.append(
      jax.device_get(
        ev(
          sharding.put_replicated(state_lib.eval_variables(s1), mesh),
          sharding.shard_batch(host, mesh),
        )
      )
    )
  assert out[0]["count"] == out[1]["count"] == 13
  for k in out[0]:
    np.testing.assert_allclose(out[0][k], out[1][k], rtol=1e-5)


def test_shard_batch_rejects_uneven_batch():
  mesh = sharding.make_mesh()
  with pytest.raises(ValueError, match="multiple"):
    sharding.shard_batch({"image": np.zeros((12, 2, 2, 3), np.float32)}, mesh)


def test_init_distributed_is_noop_single_process(monkeypatch):
  for var in (
    "JAX_NUM_PROCESSES",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "JAX_COORDINATOR_ADDRESS",
  ):
    monkeypatch.delenv(var, raising=False)
  sharding.init_distributed()
  assert jax.process_count() == 1

"""Multi-host: 2 processes x 2 CPU devices (jax.distributed on localhost, gloo collectives) compute
what 1 process x 4 devices computes, for the training core alone (tests/test_sharding.py's TinyNet
steps) and for the whole training loop on the same global batches.

One launch serves both checks: each process of tests/_multihost_worker.py runs the core steps, then
the loop. Every process compiles unoptimized (fx.UNOPTIMIZED_ENV), the reference too: what makes
the numbers equal is the sharding (global BatchNorm statistics and loss mean, per-process rows),
which XLA's SPMD partitioner lays out at any optimization level. The 1-vs-8-device numerics of a
single process, compiled as the trainer compiles, are pinned in tests/test_sharding.py.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from effnetv2_jax import checkpoint as ckpt_lib

import _train_fixtures as fx

STEPS = 4
pytestmark = pytest.mark.slow


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
  """Runs the 2x2 processes and the 1x4 process side by side; returns (tmp dir, their outputs)."""
  base = tmp_path_factory.mktemp("multihost")
  data = fx.make_folder_dataset(str(base / "data"))
  port = _free_port()

  def launch(name, devices, **env):
    argv = [os.path.join(fx.REPO, "tests", "_multihost_worker.py"), str(base / name), data]
    return subprocess.Popen(
      [sys.executable, *argv, str(STEPS), str(base / f"steps_{name}_")],
      cwd=fx.REPO,
      env=fx.subprocess_env(num_devices=devices, JAX_PLATFORMS="cpu", **fx.UNOPTIMIZED_ENV, **env),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )

  procs = [
    launch(
      "2x2",
      2,
      JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
      JAX_NUM_PROCESSES=2,
      JAX_PROCESS_ID=i,
    )
    for i in range(2)
  ]
  procs.append(launch("1x4", 4))
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=400)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append(out)
    assert p.returncode == 0, out[-5000:]
  return base, outs


def test_train_steps_on_two_processes_match_one(launched):
  """Each process fed only its own rows of the global batch: the same losses and final params."""
  base, _ = launched
  ref = np.load(base / "steps_1x4_0.npz")
  for pid in range(2):
    got = np.load(base / f"steps_2x2_{pid}.npz")
    np.testing.assert_allclose(got["loss"], ref["loss"], atol=1e-5)
    np.testing.assert_allclose(got["params"], ref["params"], atol=1e-5)


def test_two_processes_match_one(launched):
  base, outs = launched
  multi_wd, single_wd = str(base / "2x2"), str(base / "1x4")
  assert "process 0/2, 2 local of 4 devices" in outs[0]
  assert "process 1/2, 2 local of 4 devices" in outs[1]
  assert "process 0/1, 4 local of 4 devices" in outs[2]
  assert "step 4/4" in outs[0] and "step 4/4" not in outs[1]  # only process 0 reports

  with open(os.path.join(multi_wd, "results.json")) as f:
    multi = json.load(f)
  with open(os.path.join(single_wd, "results.json")) as f:
    single = json.load(f)
  # Eval covers the split exactly once across both processes' shards.
  assert multi["final_eval"]["num_examples"] == single["final_eval"]["num_examples"] == 16
  np.testing.assert_allclose(multi["final_eval"]["loss"], single["final_eval"]["loss"], rtol=1e-4)

  for prefer_ema in (False, True):
    pm, _, sm = ckpt_lib.load_variables(multi_wd, prefer_ema=prefer_ema)
    ps, _, ss = ckpt_lib.load_variables(single_wd, prefer_ema=prefer_ema)
    assert sm == ss == STEPS
    flat_m = dict(ckpt_lib.flat_shapes(pm))
    assert flat_m == dict(ckpt_lib.flat_shapes(ps))
    for a, b in zip(jax.tree.leaves(pm), jax.tree.leaves(ps)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # The multi-process run wrote one set of TensorBoard events (process 0) and released its lock.
  assert len([f for f in os.listdir(multi_wd) if f.startswith("events.out")]) == 1
  assert not os.path.exists(os.path.join(multi_wd, ".lock"))

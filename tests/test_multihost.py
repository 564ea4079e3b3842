"""Multi-host: the whole training loop on 2 processes x 2 CPU devices (jax.distributed on
localhost, gloo collectives) matches 1 process x 4 devices on the same global batches."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from effnetv2_jax import checkpoint as ckpt_lib

import _train_fixtures as fx

STEPS = 4


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(wd, data, devices, **env):
  return subprocess.Popen(
    [sys.executable, os.path.join(fx.REPO, "tests", "_multihost_worker.py"), wd, data, str(STEPS)],
    cwd=fx.REPO,
    env=fx.subprocess_env(num_devices=devices, **env),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  data = fx.make_folder_dataset(str(tmp_path / "data"))
  port = _free_port()
  multi_wd, single_wd = str(tmp_path / "2x2"), str(tmp_path / "1x4")
  procs = [
    _launch(
      multi_wd,
      data,
      2,
      JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
      JAX_NUM_PROCESSES=2,
      JAX_PROCESS_ID=i,
    )
    for i in range(2)
  ]
  procs.append(_launch(single_wd, data, 4))
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
    for a, b in zip(__import__("jax").tree.leaves(pm), __import__("jax").tree.leaves(ps)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # The multi-process run wrote one set of TensorBoard events (process 0) and released its lock.
  assert len([f for f in os.listdir(multi_wd) if f.startswith("events.out")]) == 1
  assert not os.path.exists(os.path.join(multi_wd, ".lock"))

"""Reliability: the workdir lock, SIGTERM preemption, SIGKILL at any moment, divergence, bad input.

The subprocess tests run the real CLI (`python -m effnetv2_jax.main`) on a tiny folder dataset.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from effnetv2_jax import workdir as workdir_lib

import _train_fixtures as fx


# --- workdir lock -------------------------------------------------------------------------------
def _write_lock(wd, **info):
  os.makedirs(wd, exist_ok=True)
  with open(os.path.join(wd, ".lock"), "w") as f:
    json.dump(info, f)


def _dead_pid():
  p = subprocess.Popen(["true"])
  p.wait()
  return p.pid


def test_second_run_on_a_workdir_is_refused_naming_the_first(tmp_path):
  wd = str(tmp_path)
  with workdir_lib.WorkdirLock(wd):
    with pytest.raises(workdir_lib.WorkdirLockedError, match=f"pid {os.getpid()}"):
      workdir_lib.WorkdirLock(wd).acquire()
  assert not os.path.exists(os.path.join(wd, ".lock"))  # released on exit
  workdir_lib.WorkdirLock(wd).acquire().release()  # and free again


@pytest.mark.parametrize("kind", ["dead_pid", "reused_pid", "garbage"])
def test_stale_lock_is_taken_over(tmp_path, caplog, kind):
  wd = str(tmp_path)
  host = socket.gethostname()
  if kind == "dead_pid":
    _write_lock(wd, pid=_dead_pid(), host=host, start_time="x", proc_start="1")
  elif kind == "reused_pid":  # our pid, but recorded for a process that started at another time
    _write_lock(wd, pid=os.getpid(), host=host, start_time="x", proc_start="12345")
  else:  # a lock file that is not JSON
    with open(os.path.join(wd, ".lock"), "w") as f:
      f.write("{")
  with caplog.at_level("WARNING"):
    lock = workdir_lib.WorkdirLock(wd).acquire()
  assert "stale lock" in caplog.text
  with open(os.path.join(wd, ".lock")) as f:
    assert json.load(f)["pid"] == os.getpid()
  lock.release()


def test_lock_of_another_host_is_refused(tmp_path):
  _write_lock(str(tmp_path), pid=1, host="some-other-vm", start_time="t")
  with pytest.raises(workdir_lib.WorkdirLockedError, match="some-other-vm"):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()


def test_sigterm_only_sets_the_flag():
  with workdir_lib.PreemptionFlag() as flag:
    assert not flag.requested
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):
      if flag.requested:
        break
      time.sleep(0.01)
    assert flag.requested and flag.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # previous handler restored

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


# --- the real CLI, interrupted -------------------------------------------------------------------
import queue  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import threading  # noqa: E402

from effnetv2_jax import checkpoint as ckpt_lib  # noqa: E402

STEPS = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  base = tmp_path_factory.mktemp("reliability")
  return {"base": base, "data": fx.make_folder_dataset(str(base / "data"))}


class _Cli:
  """`python -m effnetv2_jax.main` on one CPU device, its output read line by line.

  Every run here, the reference included, is such a subprocess: the pytest process has 8 forced
  CPU devices, and XLA:CPU numerics on 1 of 8 devices differ in the last bits from a 1-device
  process, which would make a bitwise comparison meaningless. All of them compile unoptimized
  (fx.UNOPTIMIZED_ENV), so the compared runs are in the same mode.
  """

  def __init__(self, env, wd, **cfg):
    path = fx.write_config_file(
      str(env["base"] / f"cfg_{time.time_ns()}.py"),
      env["data"],
      steps=STEPS,
      cache=fx.CACHE_DIR,
      **cfg,
    )
    self.proc = subprocess.Popen(
      [sys.executable, "-m", "effnetv2_jax.main", f"--config={path}", f"--workdir={wd}"],
      cwd=fx.REPO,
      env=fx.subprocess_env(num_devices=1, **fx.UNOPTIMIZED_ENV),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    self.lines, self._q = [], queue.Queue()
    threading.Thread(target=self._pump, daemon=True).start()

  def _pump(self):
    for line in self.proc.stdout:
      self._q.put(line.rstrip("\n"))
    self._q.put(None)

  def wait_for(self, pattern, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
      try:
        line = self._q.get(timeout=1)
      except queue.Empty:
        continue
      if line is None:
        break
      self.lines.append(line)
      if re.search(pattern, line):
        return line
    raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))

  def finish(self, timeout=180):
    rc = self.proc.wait(timeout=timeout)
    while True:
      line = self._q.get(timeout=10)
      if line is None:
        return rc
      self.lines.append(line)

  def run_to_end(self):
    assert self.finish() == 0, "\n".join(self.lines)
    with open(os.path.join(self.proc.args[-1].split("=", 1)[1], "results.json")) as f:
      return json.load(f)


def test_interrupted_cli_runs_end_with_the_uninterrupted_params(env):
  """kill -9 mid-stage while checkpoints are written every step, SIGTERM (preemption), kill -9
  right at the stage boundary, then a plain restart: the final parameters are bitwise those of
  an uninterrupted run."""
  reference = _Cli(env, str(env["base"] / "reference")).run_to_end()
  wd = str(env["base"] / "interrupted")
  rnd = random.Random(1234)

  cli = _Cli(env, wd, log_every=1, ckpt_every=1)
  cli.wait_for(r"step 2/8")
  time.sleep(rnd.uniform(0.0, 0.3))
  cli.proc.kill()
  cli.finish()

  cli = _Cli(env, wd, log_every=1, ckpt_every=100)  # no periodic saves: only the preemption one
  first = cli.wait_for(r"^resumed from .* at step \d+|step \d+/8")
  cli.proc.send_signal(signal.SIGTERM)
  assert cli.finish() == 0, "\n".join(cli.lines)
  msg = [l for l in cli.lines if l.startswith("preempted at step")]
  assert len(msg) == 1, "\n".join(cli.lines)
  step = int(re.match(r"preempted at step (\d+)", msg[0]).group(1))
  ck = ckpt_lib.Checkpointer(wd, read_only=True)
  assert ck.latest_step() == step < STEPS, (first, cli.lines)  # the current step was saved
  ck.close()
  assert not os.path.exists(os.path.join(wd, ".lock"))  # released on the way out

  cli = _Cli(env, wd, log_every=1, ckpt_every=1)
  cli.wait_for(r"^stage 2/2: ")  # compiled, about to run the first step of stage 2
  cli.proc.kill()
  cli.finish()

  final = _Cli(env, wd).run_to_end()  # also takes over the dead run's stale lock
  assert os.listdir(fx.CACHE_DIR)  # the persistent compilation cache is on by default
  assert final["params_checksum"] == reference["params_checksum"]
  assert final["final_eval"] == reference["final_eval"]

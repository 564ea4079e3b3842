"""Storage faults cost a warning or one error line, never the run's progress.

- A corrupt or truncated latest checkpoint (or one whose metadata is gone): the run warns once,
  moves it aside to `<step>.corrupt`, resumes from the newest older one that reads and ends with
  the params an uninterrupted run has. If none reads: one error line, exit 2, nothing moved.
- A full disk while checkpointing: one error line naming the path, the error and the last complete
  checkpoint, exit 4, the half-written tmp folder removed, the lock released; once there is space
  again the rerun resumes and ends exactly as an uninterrupted run. The disk is a real 600 kB
  tmpfs where this process may mount one (root), else a checkpoint writer patched to fail with
  ENOSPC (the same path through the trainer, minus orbax's background thread).
- A full disk for results.json: one error line, exit 4; the rerun only evaluates and writes it.
"""

import errno
import functools
import logging
import os
import shutil
import subprocess

import jax
import orbax.checkpoint as ocp
import pytest

from effnetv2_jax import checkpoint as ckpt_lib
from effnetv2_jax import main as main_lib
from effnetv2_jax import reporting
from effnetv2_jax import train

import _train_fixtures as fx

STEPS = 8
ONE = jax.devices()[:1]


def _config(data):
  c = fx.tiny_config(data, steps=STEPS, log_every=4, ckpt_every=2, cache=fx.CACHE_DIR)
  c.keep_checkpoints = 3
  return c


def _run(config, workdir, **kw):
  return train.train_and_evaluate(config, workdir, devices=ONE, **kw)


@pytest.fixture(scope="module", autouse=True)
def _trainer_settings():
  """Every run compiles unoptimized (the reference of the comparisons is this module's too), and
  the persistent cache the runs turn on is off again for later modules (see tests/test_train.py)."""
  with fx.restored_compilation_cache(), fx.unoptimized_xla():
    yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return fx.make_folder_dataset(str(tmp_path_factory.mktemp("faults") / "data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
  """The params checksum of an uninterrupted run."""
  return _run(_config(data), str(tmp_path_factory.mktemp("faults") / "ref"))["params_checksum"]


def _cli(config, workdir, capsys, mode="train"):
  """main.run as the command line runs it (on one device, like the other runs here, so that its
  params can be compared with theirs) -> (exit code, stderr lines)."""
  real = train.train_and_evaluate, train.evaluate
  train.train_and_evaluate = functools.partial(real[0], devices=ONE)
  train.evaluate = functools.partial(real[1], devices=ONE)
  try:
    with pytest.raises(SystemExit) as e:
      main_lib.run(config, workdir, mode)
  finally:
    train.train_and_evaluate, train.evaluate = real
  return e.value.code, capsys.readouterr().err.strip().splitlines()


def _array_files(step_dir):
  out = []
  for d, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(d) == "d":
      out += [os.path.join(d, f) for f in files]
  assert out
  return out


def _damage(step_dir, kind):
  if kind == "missing_metadata":
    os.unlink(os.path.join(step_dir, "state", "_METADATA"))
    return
  for path in _array_files(step_dir):
    with open(path, "rb") as f:
      blob = bytearray(f.read())
    if kind == "flipped":  # a bad disk: bytes changed in place
      for i in range(0, len(blob), 64):
        blob[i] ^= 0xFF
    else:  # truncated: a copy that stopped half way
      blob = blob[: len(blob) // 2]
    with open(path, "wb") as f:
      f.write(bytes(blob))


@pytest.mark.parametrize("kind", ["flipped", "truncated", "missing_metadata"])
def test_unreadable_latest_checkpoint_falls_back_and_resumes_exactly(
  data, reference, tmp_path, caplog, kind
):
  wd = str(tmp_path / "wd")
  assert _run(_config(data), wd, stop_at_step=6)["step"] == 6
  ck_dir = os.path.join(wd, "checkpoints")
  assert sorted(os.listdir(ck_dir)) == ["2", "4", "6"]
  _damage(os.path.join(ck_dir, "6"), kind)
  with caplog.at_level(logging.WARNING):
    final = _run(_config(data), wd)
  assert final["status"] == "completed"
  assert final["params_checksum"] == reference  # resumed from step 4, exactly
  warnings = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].startswith("checkpoint at step 6 cannot be restored (")
  assert f"moved it to {ck_dir}/6.corrupt and resumed from step 4" in warnings[0]
  assert "\n" not in warnings[0]
  assert "6.corrupt" in os.listdir(ck_dir)  # kept, never deleted
  assert 8 in ckpt_lib.Checkpointer(wd, read_only=True).all_steps()


def test_no_readable_checkpoint_is_one_error_line_and_nothing_moves(data, tmp_path, capsys):
  wd = str(tmp_path / "wd")
  _run(_config(data), wd, stop_at_step=4)
  ck_dir = os.path.join(wd, "checkpoints")
  for step in ("2", "4"):
    _damage(os.path.join(ck_dir, step), "flipped")
  code, err = _cli(_config(data), wd, capsys)
  assert code == main_lib.EXIT_BAD_INPUT == 2
  assert len(err) == 1, err
  assert err[0].startswith(f"error: no checkpoint in {ck_dir} can be restored (tried steps 4, 2;")
  assert "nothing was changed" in err[0]
  assert sorted(os.listdir(ck_dir)) == ["2", "4"]
  assert not os.path.exists(os.path.join(wd, ".lock"))


def test_eval_and_init_from_of_a_corrupt_checkpoint_are_one_error_line(data, tmp_path, capsys):
  wd = str(tmp_path / "wd")
  _run(_config(data), wd, stop_at_step=2)
  _damage(os.path.join(wd, "checkpoints", "2"), "truncated")
  for mode in ("eval", "train"):  # train: init_from the corrupt run
    c = _config(data)
    c.init_from = wd
    code, err = _cli(c, str(tmp_path / f"new_{mode}"), capsys, mode=mode)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(
      f"error: checkpoint {wd}/checkpoints/2 cannot be read ("
    )


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
  """A workdir whose checkpoint writes fail with ENOSPC from the second checkpoint on."""
  mnt = tmp_path / "small"
  mnt.mkdir()
  mounted = (
    subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True
    ).returncode
    == 0
  )
  if not mounted:
    real_save = ocp.CheckpointManager.save

    def failing_save(self, step, *a, **k):
      if step >= 4:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      return real_save(self, step, *a, **k)

    monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
  yield str(mnt / "wd"), mounted
  if mounted:
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_while_checkpointing_stops_cleanly_and_resumes(
  data, reference, full_disk, tmp_path, capsys, monkeypatch
):
  wd, mounted = full_disk
  code, err = _cli(_config(data), wd, capsys)
  assert code == main_lib.EXIT_WRITE_FAILED == 4
  assert len(err) == 1, err
  ck_dir = os.path.join(wd, "checkpoints")
  done = sorted(int(s) for s in os.listdir(ck_dir) if s.isdigit())
  assert not done or done[-1] < STEPS
  assert err[0].startswith(f"error: cannot write checkpoint {ck_dir}/")
  assert ": no space left on device (its arrays need about " in err[0]
  if done:
    assert f"the last complete checkpoint is step {done[-1]}; rerunning the same command" in err[0]
  else:
    assert "there is no complete checkpoint yet; rerunning the same command starts" in err[0]
  assert not [n for n in os.listdir(ck_dir) if "orbax-checkpoint-tmp" in n]  # removed
  assert not os.path.exists(os.path.join(wd, ".lock"))  # released
  # Space again (a copy of the workdir on a normal disk): the rerun resumes and ends exactly.
  monkeypatch.undo()
  again = str(tmp_path / "again")
  shutil.copytree(wd, again)
  final = _run(_config(data), again)
  assert final["status"] == "completed" and final["params_checksum"] == reference


def test_full_disk_for_results_json_is_one_line_and_the_rerun_writes_it(
  data, reference, tmp_path, capsys, monkeypatch
):
  wd = str(tmp_path / "wd")

  def no_space(path, obj):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

  monkeypatch.setattr(reporting, "write_json_atomic", no_space)
  code, err = _cli(_config(data), wd, capsys)
  assert code == 4 and len(err) == 1, err
  results = os.path.join(wd, "results.json")
  assert err[0] == (
    f"error: cannot write {results}: no space left on device: {results}; training is complete "
    f"and checkpointed at step {STEPS}: free space and rerun the same command to evaluate and "
    "write it again"
  )
  assert not os.path.exists(results) and not os.path.exists(os.path.join(wd, ".lock"))
  monkeypatch.undo()
  final = _run(_config(data), wd)
  assert final["params_checksum"] == reference and os.path.exists(results)
  assert all(s["wall_s"] > 0 for s in final["stages"])


def test_sigterm_is_honoured_while_the_input_pipeline_stalls(data, tmp_path, monkeypatch):
  """The input hangs after its first batch (a livelocked reader, here in the prefetch thread): the
  loop, waiting for batch 2, still sees the preemption request, checkpoints step 1 and stops."""
  import threading
  import time

  from effnetv2_jax import workdir as workdir_lib
  from effnetv2_jax.data import input_pipeline

  real = input_pipeline.train_iterator
  release = threading.Event()
  flag = workdir_lib.PreemptionFlag()
  stalled_at = []

  def stalling(**kw):
    for i, batch in enumerate(real(**kw)):
      if i == 1:  # the notice arrives while the reader hangs (it never recovers by itself)
        stalled_at.append(time.perf_counter())
        flag.request()
        release.wait(60)
      yield batch

  monkeypatch.setattr(input_pipeline, "train_iterator", stalling)
  try:
    result = _run(_config(data), str(tmp_path / "wd"), preemption=flag)
  finally:
    release.set()
  assert result == {"status": "preempted", "step": 1}
  assert time.perf_counter() - stalled_at[0] < 10  # the checkpoint write included
  ck = ckpt_lib.Checkpointer(str(tmp_path / "wd"), read_only=True)
  assert ck.latest_step() == 1
  ck.close()

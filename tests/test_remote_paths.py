"""gs:// workdirs: URLs are told from local paths and never mangled into `<cwd>/gs:/...`.

No network here. The remote branch is exercised for real by `fake_gcs`: it maps gs://bucket/...
onto a local directory at the two seams where the package meets storage (paths._epath for the
small files, orbax's CheckpointManager for checkpoints), so everything above them -- URL joins,
the advisory lock, results.json, read_meta, load_variables -- runs the same code as on GCS.
"""

import json
import os
import socket

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from effnetv2_jax import checkpoint as ckpt_lib
from effnetv2_jax import config_validation as cv
from effnetv2_jax import paths
from effnetv2_jax import reporting
from effnetv2_jax import workdir as workdir_lib
from configs import imagenet


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://X -> tmp_path/gcs/X; returns (local_of(url), list of directories orbax was given)."""
  root = tmp_path / "gcs"
  root.mkdir()

  def local_of(url):
    assert url.startswith("gs://"), url
    return str(root / url[len("gs://") :])

  monkeypatch.setattr(paths, "_epath", lambda url: epath.Path(local_of(url)))
  given = []
  real_mgr = ocp.CheckpointManager

  def manager(directory, *a, **kw):
    given.append(directory)
    return real_mgr(local_of(directory) if paths.is_remote(directory) else directory, *a, **kw)

  monkeypatch.setattr(ckpt_lib.ocp, "CheckpointManager", manager)
  return local_of, given


# --- classification and joins ------------------------------------------------------------------
@pytest.mark.parametrize(
  "path,remote",
  [
    ("gs://bucket/run", True),
    ("s3://b/x", True),
    ("gs://b", True),
    ("/tmp/run", False),
    ("run", False),
    ("~/run", False),
    ("./gs:/b/run", False),
    ("", False),
    ("C:/x", False),
    (None, False),
  ],
)
def test_is_remote(path, remote):
  assert paths.is_remote(path) is remote


def test_remote_urls_are_joined_and_normalized_as_given():
  assert paths.join("gs://b/run", "checkpoints") == "gs://b/run/checkpoints"
  assert paths.join("gs://b/run/", "checkpoints", "5") == "gs://b/run/checkpoints/5"
  assert paths.normalize("gs://b/run") == "gs://b/run"
  assert ckpt_lib.checkpoint_dir("gs://b/run") == "gs://b/run/checkpoints"


def test_local_paths_behave_as_before(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.join("run", "x") == os.path.join("run", "x")
  assert paths.normalize("~/r") == os.path.abspath(os.path.expanduser("~/r"))
  assert ckpt_lib.checkpoint_dir("run") == os.path.join(str(tmp_path), "run", "checkpoints")
  ck = ckpt_lib.Checkpointer("run")
  assert ck.directory == os.path.join(str(tmp_path), "run", "checkpoints")
  ck.close()


def test_unsupported_scheme_says_so():
  with pytest.raises(ValueError, match="not supported"):
    paths.exists("nosuchscheme://x/y")


# --- checkpoints ---------------------------------------------------------------------------------
def test_checkpointer_hands_orbax_the_url_unchanged_and_round_trips(
  fake_gcs, tmp_path, monkeypatch
):
  local_of, given = fake_gcs
  monkeypatch.chdir(tmp_path)
  st = {
    "params": {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)},
    "batch_stats": {"m": jnp.ones((3,), jnp.float32)},
  }
  ck = ckpt_lib.Checkpointer("gs://b/run", keep=2)
  assert ck.directory == "gs://b/run/checkpoints"
  assert given == ["gs://b/run/checkpoints"]
  ck.save(7, st, {"stage": 2})
  ck.wait()
  assert ck.latest_step() == 7
  assert ck.read_meta(7)["stage"] == 2  # read through the remote branch of paths
  restored, meta = ck.restore(7, st)
  assert meta["step"] == 7
  np.testing.assert_array_equal(restored["params"]["w"], st["params"]["w"])
  ck.close()
  assert not os.path.exists(tmp_path / "gs:")  # nothing landed in a local "gs:" folder
  assert os.path.isdir(local_of("gs://b/run/checkpoints/7"))

  # init_from / --mode=eval path: a step directory, a checkpoints dir and a workdir URL all load.
  for src in ("gs://b/run", "gs://b/run/checkpoints", "gs://b/run/checkpoints/7"):
    params, stats, step = ckpt_lib.load_variables(src)
    assert step == 7
    np.testing.assert_array_equal(params["w"], np.asarray(st["params"]["w"]))
    np.testing.assert_array_equal(stats["m"], np.ones(3))
  assert given[-1] == "gs://b/run/checkpoints"
  with pytest.raises(FileNotFoundError, match="gs://b/none"):
    ckpt_lib.load_variables("gs://b/none")


# --- results.json ------------------------------------------------------------------------------
def test_results_json_is_written_to_the_url(fake_gcs, tmp_path, monkeypatch):
  local_of, _ = fake_gcs
  monkeypatch.chdir(tmp_path)
  paths.makedirs("gs://b/run")
  obj = {"top1": np.float32(0.5), "shape": np.arange(3), "stage": 2}
  reporting.write_json_atomic("gs://b/run/results.json", obj)
  reporting.write_json_atomic(str(tmp_path / "local.json"), obj)
  text = open(local_of("gs://b/run/results.json")).read()
  assert text == open(tmp_path / "local.json").read()  # the same bytes as a local run writes
  assert json.loads(text) == {"top1": 0.5, "shape": [0, 1, 2], "stage": 2}
  assert sorted(os.listdir(local_of("gs://b/run"))) == ["results.json"]  # no tmp file left over
  assert not os.path.exists(tmp_path / "gs:")


def test_local_results_json_unchanged(tmp_path):
  p = str(tmp_path / "d" / "results.json")
  reporting.write_json_atomic(p, {"a": 1})
  assert open(p).read() == '{\n  "a": 1\n}\n'
  assert os.listdir(tmp_path / "d") == ["results.json"]


# --- workdir lock --------------------------------------------------------------------------------
def test_remote_lock_is_advisory_but_refuses_a_live_holder(fake_gcs, caplog):
  local_of, _ = fake_gcs
  lock = workdir_lib.WorkdirLock("gs://b/run")
  assert lock.path == "gs://b/run/.lock"
  with caplog.at_level("WARNING"):
    lock.acquire()
  assert "advisory" in caplog.text
  info = json.load(open(local_of("gs://b/run/.lock")))
  assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
  with pytest.raises(workdir_lib.WorkdirLockedError, match=f"pid {os.getpid()}"):
    workdir_lib.WorkdirLock("gs://b/run").acquire()
  lock.release()
  assert not os.path.exists(local_of("gs://b/run/.lock"))
  workdir_lib.WorkdirLock("gs://b/run").acquire().release()  # free again


def test_remote_lock_of_another_host_is_refused_without_a_pid_check(fake_gcs, monkeypatch):
  local_of, _ = fake_gcs
  os.makedirs(local_of("gs://b/run"))
  with open(local_of("gs://b/run/.lock"), "w") as f:
    json.dump({"pid": 1, "host": "some-other-vm", "start_time": "t"}, f)
  monkeypatch.setattr(
    workdir_lib, "_holder_alive", lambda info: pytest.fail("pid checked for another host's lock")
  )
  with pytest.raises(
    workdir_lib.WorkdirLockedError, match="some-other-vm.*delete gs://b/run/.lock"
  ):
    workdir_lib.WorkdirLock("gs://b/run").acquire()


def test_remote_stale_lock_of_this_host_is_taken_over(fake_gcs):
  local_of, _ = fake_gcs
  os.makedirs(local_of("gs://b/run"))
  with open(local_of("gs://b/run/.lock"), "w") as f:
    json.dump({"pid": 2**22 + 12345, "host": socket.gethostname(), "start_time": "t"}, f)
  with workdir_lib.WorkdirLock("gs://b/run"):
    assert json.load(open(local_of("gs://b/run/.lock")))["pid"] == os.getpid()


# --- config validation -------------------------------------------------------------------------
def test_validation_accepts_a_remote_init_from_without_touching_it(monkeypatch):
  monkeypatch.setattr(paths, "_epath", lambda url: pytest.fail("validation touched " + url))
  c = imagenet.get_config("variant=s")
  c.num_train_steps = 100
  c.init_from = "gs://bucket/ckpt"
  cv.validate_config(c, num_devices=1, check_dataset=False)
  c.init_from = "/no/such/checkpoint"
  with pytest.raises(cv.ConfigError, match="init_from"):
    cv.validate_config(c, num_devices=1, check_dataset=False)

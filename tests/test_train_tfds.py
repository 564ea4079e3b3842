"""The trainer end to end on a TFDS dataset (Fashion-MNIST built offline from generated idx files).

The other trainer tests use an image folder (subprocesses need data on disk); this one goes
through the TFDS source: registry, prepared builder, per-process split, 28-px grayscale images.
It trains two progressive stages, checkpoints, resumes from a mid-run stop, and writes results.
"""

import os

import jax
import pytest

from configs import demo
from effnetv2_jax import main as main_lib
from effnetv2_jax import plan
from effnetv2_jax import train
from effnetv2_jax.data import prepare

import _train_fixtures as fx
from test_data_prepare import write_idx_set

ONE = jax.devices()[:1]


@pytest.fixture(scope="module", autouse=True)
def _unoptimized():
  """The runs check the data source, the schedule and the resume, not numbers: they compile
  unoptimized (compiling is most of what these few steps cost)."""
  with fx.unoptimized_xla():
    yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  base = tmp_path_factory.mktemp("tfds_train")
  src = base / "idx"
  src.mkdir()
  write_idx_set(str(src), num_train=24, num_test=10)
  out = str(base / "tfds")
  prepare.prepare_fashion_mnist(data_dir=out, source_dir=str(src))
  return out


def test_demo_config_trains_and_resumes_on_prepared_tfds_data(data_dir, tmp_path):
  c = demo.get_config("runlocal")  # the real demo model and schedule, 4 steps in 2 stages
  c.data_dir = data_dir
  c.compilation_cache_dir = ""
  wd = str(tmp_path / "wd")
  assert train.train_and_evaluate(c, wd, stop_at_step=3, devices=ONE)["status"] == "stopped"
  results = train.train_and_evaluate(c, wd, devices=ONE)
  assert results["status"] == "completed" and results["step"] == 4
  assert results["final_eval"]["num_examples"] == 10  # the whole generated test split
  assert [s["image_size"] for s in results["stages"]] == [8, 16]
  assert os.path.exists(os.path.join(wd, "results.json"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(wd))


def test_plan_mode_prints_the_schedule_that_runs_for_a_sub_split(data_dir, tmp_path, capsys):
  """With the length in epochs and `train_split` a sub-split, the steps come from the sub-split's
  size (12 of 24 images), in plan mode and in the run alike, not from the registry's 60,000."""
  c = demo.get_config("runlocal")
  c.data_dir = data_dir
  c.compilation_cache_dir = ""
  c.train_split = "train[:50%]"
  c.num_train_steps = -1
  c.num_epochs = 4.0  # 4 * 12 / batch 8 = 6 steps, two stages of 3
  c.checkpoint_every_steps = 100
  assert main_lib.run(c, str(tmp_path / "unused"), "plan") == 0
  printed = capsys.readouterr().out
  resolved = plan.resolve(c)
  assert resolved.num_train == 12 and resolved.total_steps == 6
  assert "6 steps at batch 8 (12 examples in 'train[:50%]'" in printed
  for s in resolved.stages:
    assert (
      f"| {s.index} | {s.image_size} |" in printed
      and f"| {s.first_step}-{s.last_step} |" in printed
    )
  results = train.train_and_evaluate(c, str(tmp_path / "wd"), devices=ONE)
  ran = [(s["image_size"], s["first_step"], s["last_step"]) for s in results["stages"]]
  assert ran == [(s.image_size, s.first_step, s.last_step) for s in resolved.stages]
  assert results["step"] == resolved.total_steps

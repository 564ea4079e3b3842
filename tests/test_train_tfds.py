"""The trainer end to end on a TFDS dataset (Fashion-MNIST built offline from generated idx files).

The other trainer tests use an image folder (subprocesses need data on disk); this one goes
through the TFDS source: registry, prepared builder, per-process split, 28-px grayscale images.
It trains two progressive stages, checkpoints, resumes from a mid-run stop, and writes results.
"""

import os

import jax

from configs import demo
from effnetv2_jax import train
from effnetv2_jax.data import prepare

from test_data_prepare import write_idx_set

ONE = jax.devices()[:1]


def test_demo_config_trains_and_resumes_on_prepared_tfds_data(tmp_path):
  src = tmp_path / "idx"
  src.mkdir()
  write_idx_set(str(src), num_train=24, num_test=10)
  data_dir = str(tmp_path / "tfds")
  prepare.prepare_fashion_mnist(data_dir=data_dir, source_dir=str(src))

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

"""Every config mistake is one message naming the field, raised before anything compiles."""

import subprocess
import sys

import pytest

from configs import demo, imagenet
from effnetv2_jax import config_validation as cv

import _train_fixtures as fx


def _config(**changes):
  c = imagenet.get_config("variant=s")
  c.num_train_steps = 100
  for path, value in changes.items():
    node = c
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _error(config, **kw):
  kw.setdefault("num_devices", 1)
  kw.setdefault("check_dataset", False)
  with pytest.raises(cv.ConfigError) as e:
    cv.validate_config(config, **kw)
  return e.value


@pytest.mark.parametrize(
  "change,field",
  [
    ({"model_name": "efficientnetv3-s"}, "model_name"),
    ({"model_overrides.not_a_knob": 1}, "model_overrides"),
    ({"progressive.min_image_size": 0}, "progressive.min_image_size"),
    ({"progressive.max_image_size": -5}, "progressive.max_image_size"),
    ({"progressive.min_image_size": 400}, "progressive.min_image_size"),  # min > max (300)
    ({"progressive.num_stages": 200}, "progressive.num_stages"),  # more stages than steps
    ({"progressive.min_randaug": -1.0}, "progressive.min_randaug"),
    ({"progressive.max_mixup": -0.2}, "progressive.max_mixup"),
    ({"progressive.preset": "fast"}, "progressive.preset"),
    ({"eval_image_size": 0}, "eval_image_size"),
    ({"eval_image_size": None}, "eval_image_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"dtype": "float16"}, "dtype"),
    ({"optimizer": "lamb"}, "optimizer"),
    ({"label_smoothing": 1.5}, "label_smoothing"),
    ({"init_from": "/no/such/checkpoint"}, "init_from"),
    ({"randaug_ops": "Rotate,Flip"}, "randaug_ops"),
    ({"randaug_layers": -1}, "randaug_layers"),
    ({"randaug_solarize": "wrap"}, "randaug_solarize"),
    ({"randaug_enhance": "pil"}, "randaug_enhance"),
    ({"cutmix_label": "per_batch"}, "cutmix_label"),
    ({"max_skipped_fraction": 1.5}, "max_skipped_fraction"),
    ({"max_skipped_fraction": -0.01}, "max_skipped_fraction"),
  ],
)
def test_bad_field_is_named(change, field):
  err = _error(_config(**change))
  assert err.field == field
  assert str(err).startswith(field + ":") and "\n" not in str(err)


def test_max_skipped_fraction_default_and_range():
  assert imagenet.get_config("variant=s").max_skipped_fraction == 0.001
  for ok in (0.0, 0.001, 1.0):
    cv.validate_config(_config(max_skipped_fraction=ok), num_devices=1, check_dataset=False)


def test_batch_not_divisible_by_devices_says_what_to_use():
  err = _error(_config(batch_size=4100), num_devices=8)
  assert err.field == "batch_size" and "multiple of 8" in str(err)


def test_unknown_dataset():
  err = _error(_config(dataset="imagenet2013"), check_dataset=True)
  assert err.field == "dataset"


def test_shipped_configs_are_valid():
  for arg in ("variant=s", "variant=b0,preset=paper", "variant=xl,preset=none"):
    cv.validate_config(imagenet.get_config(arg), num_devices=8, num_train_examples=1281167)
  cv.validate_config(demo.get_config(), num_devices=1, num_train_examples=60000)


def test_cli_reports_one_line_and_exit_code_2(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "effnetv2_jax.main",
    "--config=configs/imagenet.py:variant=s",
    f"--workdir={tmp_path / 'wd'}",
    "--mode=plan",
    "--config.progressive.min_image_size=-3",
  ]
  out = subprocess.run(
    cmd, capture_output=True, text=True, cwd=fx.REPO, env=fx.subprocess_env(), timeout=120
  )
  assert out.returncode == 2
  lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert lines == ["error: progressive.min_image_size: must be a positive integer, got -3"]
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize(
  "override, message",
  [
    (
      "--config.batch_sise=2",
      "error: --config.batch_sise: no such field; did you mean batch_size?",
    ),
    (
      "--config.progressive.num_stagez=2",
      "error: --config.progressive.num_stagez: no such field; did you mean num_stages?",
    ),
    ("--config.zzzqqq=2", "error: --config.zzzqqq: no such field (see configs/default.py)"),
  ],
)
def test_misspelt_override_is_one_readable_line(tmp_path, override, message):
  cmd = [sys.executable, "-m", "effnetv2_jax.main", "--config=configs/demo.py", "--mode=plan"]
  out = subprocess.run(
    cmd + [override],
    capture_output=True,
    text=True,
    cwd=fx.REPO,
    env=fx.subprocess_env(),
    timeout=120,
  )
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [message]

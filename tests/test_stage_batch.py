"""Per-stage batch size (progressive.batch_rule / batch_sizes): the stage table in images, the LR
and EMA across a batch change, the data order, validation, plan mode, and the training loop
resumed across a batch change (bitwise) and on 1 vs 8 devices.

The loop runs use tests/_train_fixtures.py's tiny two-stage config (16px then 24px) under 'pixels'
with batch_multiple 8: stage 0 trains 2 steps of 16 images, stage 1 4 steps of 8 images.
"""

import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, imagenet
from effnetv2_jax import checkpoint as ckpt_lib
from effnetv2_jax import config_validation as cv
from effnetv2_jax import optim
from effnetv2_jax import plan
from effnetv2_jax import progressive
from effnetv2_jax import state as state_lib

import _train_fixtures as fx

ONE = jax.devices()[:1]


def _span(table):
  return [(s.first_step, s.last_step, s.batch_size, s.first_example) for s in table]


def _s_paper(steps=1000, **fields):
  c = imagenet.get_config("variant=s,preset=paper")  # sizes 128, 185, 242, 300; batch 4096
  c.num_train_steps = steps
  for k, v in fields.items():
    c.progressive[k] = v
  return c


def _two_stage(**fields):
  """B_ref 8, 8 reference steps, 16px then 24px: 'pixels' gives 8 * (24/16)^2 = 18 -> 16."""
  c = default.get_config()
  c.batch_size, c.num_train_steps = 8, 8
  p = c.progressive
  p.preset, p.num_stages, p.min_image_size, p.max_image_size = "paper", 2, 16, 24
  p.batch_rule, p.batch_multiple = "pixels", 8
  for k, v in fields.items():
    c[k] = v
  return c


# --- the stage table ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "preset,fields",
  [
    ("official", {}),
    ("paper", {"stage_fractions": (0.1, 0.2, 0.3, 0.4)}),
    ("none", {}),
    ("paper", {"size_curve": "hold_then_ramp", "hold_fraction": 0.3, "tail_fraction": 0.2}),
  ],
)
def test_constant_rule_is_the_step_table_with_every_stage_at_batch_size(preset, fields):
  c = imagenet.get_config(f"variant=s,preset={preset}")
  c.num_train_steps = 997
  for k, v in fields.items():
    c.progressive[k] = v
  assert c.progressive.batch_rule == "constant" and c.progressive.batch_sizes == ()
  table = progressive.stages(c, num_devices=8)
  fractions = progressive.stage_fractions(c)
  m = len(table)
  if fractions is None:
    bounds = [int(i / m * 997) for i in range(m + 1)]
  else:
    bounds = [0]
    for f in np.cumsum(fractions)[:-1]:
      bounds.append(int(float(f) * 997 + 1e-9))
    bounds.append(997)
  assert _span(table) == [(a, b, 4096, a * 4096) for a, b in itertools.pairwise(bounds)]
  # The schedule and the EMA are the step functions of before, bit for bit.
  plain = optim.lr_schedule(c, 306.7, 997)
  staged = optim.lr_schedule(c, 306.7, 997, table)
  steps = jnp.arange(0, 1000, 7)
  np.testing.assert_array_equal(jax.vmap(staged)(steps), jax.vmap(plain)(steps))
  ema = state_lib.ema_decay_fn(0.9999, table, 4096, "images")
  np.testing.assert_array_equal(
    jax.vmap(ema)(steps), jax.vmap(lambda s: state_lib.ema_decay_at(s, 0.9999))(steps)
  )


def test_pixels_rule_batches_steps_and_images_by_hand():
  # B_i = 4096 * 300^2 // S_i^2: 22500, 10771, 6294 -> multiples of 64: 22464, 10752, 6272.
  table = progressive.stages(_s_paper(batch_rule="pixels"))
  assert [s.image_size for s in table] == [128, 185, 242, 300]
  assert [s.batch_size for s in table] == [22464, 10752, 6272, 4096]
  # 1,024,000 images per stage; each stage rounds what is left to its batch:
  # 1035232 // 22464 = 46, (2048000 - 1033344 + 5376) // 10752 = 94, ... -> 164, 250.
  assert _span(table) == [
    (0, 46, 22464, 0),
    (46, 140, 10752, 1_033_344),
    (140, 304, 6272, 2_044_032),
    (304, 554, 4096, 3_072_640),
  ]
  assert abs(table[-1].last_example - 1000 * 4096) <= 4096 // 2
  # The multiple is lcm(devices, batch_multiple): 8 devices and batch_multiple 1 -> 8.
  eight = progressive.stages(_s_paper(batch_rule="pixels", batch_multiple=1), num_devices=8)
  assert [s.batch_size for s in eight] == [22496, 10768, 6288, 4096]
  # ...and 64 covers 8 devices: the same table on 1 and on 8.
  assert progressive.stages(_s_paper(batch_rule="pixels"), num_devices=8) == table


def test_pixels_rule_cap_and_bn_groups():
  table = progressive.stages(_s_paper(batch_rule="pixels", max_batch_size=8192))
  assert [s.batch_size for s in table] == [8192, 8192, 6272, 4096]
  # 1024000 / 8192 = 125 exactly; the third stage leaves 1664 images to the last.
  assert _span(table) == [
    (0, 125, 8192, 0),
    (125, 250, 8192, 1_024_000),
    (250, 413, 6272, 2_048_000),
    (413, 663, 4096, 3_070_336),
  ]
  # BatchNorm groups of 1024 must tile every batch: they join the multiple.
  c = _s_paper(batch_rule="pixels")
  c.bn_group_size = 1024
  assert [s.batch_size for s in progressive.stages(c)] == [21504, 10240, 6144, 4096]
  cv.validate_config(c, num_devices=8, check_dataset=False)


def test_explicit_batches_and_the_callers_stage_batches():
  c = _s_paper(batch_sizes=(8192, 8192, 4096, 4096))
  assert [s.batch_size for s in progressive.stages(c)] == [8192, 8192, 4096, 4096]
  # 'fit': the trainer will pass the fitted batches; they override the rule.
  run = plan.resolve(_s_paper(), num_train=100_000, num_classes=1000, stage_batches=(64, 32, 16, 8))
  assert [s.batch_size for s in run.stages] == [64, 32, 16, 8]
  assert run.examples_at(run.total_steps) == run.stages[-1].last_example
  with pytest.raises(ValueError, match="stage_batches"):
    progressive.stages(_s_paper(), stage_batches=(64, 32))
  with pytest.raises(ValueError, match="fit"):
    progressive.stages(_s_paper(batch_rule="fit"))


def test_two_stage_table():
  table = progressive.stages(_two_stage())
  assert _span(table) == [(0, 2, 16, 0), (2, 6, 8, 32)]
  assert [progressive.examples_at(table, t) for t in range(7)] == [0, 16, 32, 40, 48, 56, 64]


# --- LR and EMA across the batch change -------------------------------------------------------


def _values(fn, steps=7):
  return [float(v) for v in jax.vmap(fn)(jnp.arange(steps))]


def test_lr_follows_images_and_scales_with_the_stage_batch():
  # Reference steps seen before each step: 0, 2, 4, 5, 6, 7 (8 past the end); ratio 2 then 1.
  c = _two_stage(lr_per_256=0.256, lr_schedule="constant", warmup_epochs=2.0)
  table = progressive.stages(c)
  # 4 reference steps per epoch: warmup 8 of them; base 0.256 * 8 / 256 = 0.008.
  lr = optim.lr_schedule(c, 4.0, 6, table)
  assert _values(lr) == pytest.approx([0.0, 0.004, 0.004, 0.005, 0.006, 0.007, 0.008])
  c = _two_stage(lr_per_256=0.256, warmup_epochs=0.0, lr_decay_epochs=1.0, lr_decay_rate=0.5)
  lr = optim.lr_schedule(c, 4.0, 6, table)  # halves every 4 reference steps, x2 in stage 0
  assert _values(lr) == pytest.approx([0.016, 0.016, 0.004, 0.004, 0.004, 0.004, 0.002])
  # The optimizer runs on the same schedule: plain SGD's first update is -lr * g.
  c = _two_stage(
    lr_per_256=0.256, lr_schedule="constant", warmup_epochs=2.0, optimizer="sgd", momentum=0.0
  )
  tx = optim.make_optimizer(c, 4.0, 6, table)
  g = {"w": jnp.ones((3,))}
  updates, _ = tx.update(g, tx.init(g), g, step=jnp.int32(1))
  np.testing.assert_allclose(updates["w"], -0.004, rtol=1e-6)


def test_ema_decay_keeps_its_horizon_in_images():
  table = progressive.stages(_two_stage())
  # n (images after the step / 8) = 2, 4, 5, 6, 7, 8; decay min(d, (1+n)/(10+n)) ** (B / 8).
  images = state_lib.ema_decay_fn(0.9, table, 8, "images")
  want = [(3 / 12) ** 2, (5 / 14) ** 2, 6 / 15, 7 / 16, 8 / 17, 9 / 18]
  assert _values(images, 6) == pytest.approx(want, rel=1e-6)
  # d ** (B / B_ref) once the warmup no longer bites: 0.3 ** 2 in stage 0, 0.3 in stage 1.
  assert _values(state_lib.ema_decay_fn(0.3, table, 8, "images"), 4) == pytest.approx(
    [0.0625, 0.09, 0.3, 0.3]
  )
  # 'steps' keeps the official per-step decay whatever the batch.
  steps = state_lib.ema_decay_fn(0.9, table, 8, "steps")
  assert _values(steps, 4) == pytest.approx([2 / 11, 3 / 12, 4 / 13, 5 / 14])


# --- data order ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return fx.make_folder_dataset(str(tmp_path_factory.mktemp("stage_batch_data")))


def _examples(folder, batches, process_index=0, process_count=1):
  """Concatenated (images, labels) of consecutive iterators: [(global batch, count), ...], each
  starting where the one before stopped."""
  from effnetv2_jax.data import input_pipeline
  from effnetv2_jax.data.augment import Augment

  images, labels, local_pos = [], [], 0
  for batch, count in batches:
    it = input_pipeline.train_iterator(
      dataset=f"folder:{folder}",
      data_dir=None,
      split=None,
      global_batch_size=batch,
      image_size=16,
      family="v2",
      augment=Augment(magnitude=5.0),
      seed=1,
      start_example=local_pos,
      process_index=process_index,
      process_count=process_count,
      shuffle_buffer=64,
    )
    for _ in range(count):
      b = next(it)
      images.append(b["image"])
      labels.append(b["label"])
    local_pos += count * batch // process_count
  return np.concatenate(images), np.concatenate(labels)


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_examples_and_augmentation_do_not_depend_on_the_batch(folder, process_index, process_count):
  """40 examples of this process' stream (16 per epoch on 2 processes: across epochs), read as
  20 batches of 2 or as 4, 8 and 8 in three consecutive iterators: the same images, bitwise."""
  n = process_count
  small = _examples(folder, [(2 * n, 20)], process_index, n)
  mixed = _examples(folder, [(4 * n, 2), (8 * n, 2), (16 * n, 1)], process_index, n)
  assert len(small[1]) == 40
  np.testing.assert_array_equal(mixed[1], small[1])
  np.testing.assert_array_equal(mixed[0], small[0])


# --- validation and plan mode -------------------------------------------------------------------


@pytest.mark.parametrize(
  "fields,field,needle",
  [
    ({"batch_rule": "sqrt"}, "progressive.batch_rule", "not one of"),
    ({"batch_sizes": (4096, 4096, 4096)}, "progressive.batch_sizes", "3 entries for 4"),
    ({"batch_sizes": (4096, 4096, 4100, 4096)}, "progressive.batch_sizes", "8 devices"),
    (
      {"batch_sizes": (8192, 4096, 4096, 4096), "batch_rule": "pixels"},
      "progressive.batch_sizes",
      "leave progressive.batch_rule 'constant'",
    ),
    ({"batch_multiple": 0}, "progressive.batch_multiple", "integer >= 1"),
    (
      {"batch_rule": "pixels", "max_batch_size": 1024},
      "progressive.max_batch_size",
      ">= batch_size",
    ),
  ],
)
def test_validation_names_the_field(fields, field, needle):
  with pytest.raises(cv.ConfigError, match=needle) as e:
    cv.validate_config(_s_paper(**fields), num_devices=8, check_dataset=False)
  assert e.value.field == field


def test_validation_of_ema_horizon_and_a_good_pixels_config():
  c = _s_paper(batch_rule="pixels", max_batch_size=8192)
  cv.validate_config(c, num_devices=8, check_dataset=False)
  c.ema_horizon = "epochs"
  with pytest.raises(cv.ConfigError, match="not one of images, steps") as e:
    cv.validate_config(c, num_devices=8, check_dataset=False)
  assert e.value.field == "ema_horizon"


def test_plan_mode_shows_batch_and_lr_per_stage():
  c = _s_paper(batch_rule="pixels", max_batch_size=8192)
  run = plan.resolve(c, num_train=1_024_000, num_classes=1000)
  text = plan.format_plan(c, run)
  assert "| stage | size | randaug | mixup | cutmix | dropout | steps | batch | lr |" in text
  # lr_per_256 0.016: 0.016 * 8192 / 256 = 0.512; stage 0 trains exactly one epoch of images.
  assert "| 0 | 128 | 5 | 0 | 0 | 0.1 | 0-125 | 8192 | 0.512 | 1.0 |" in text
  assert "| 3 | 300 | 15 | 0 | 0 | 0.3 | 413-663 | 4096 | 0.256 |" in text
  assert (
    "per-stage batch: batch_rule pixels (multiples of 64 for 1 device(s), at most 8192)" in text
  )
  # The constant batch keeps the table's first line as before.
  c = _s_paper()
  assert "1000 steps at batch 4096" in plan.format_plan(
    c, plan.resolve(c, num_train=10**6, num_classes=10)
  )


# --- the training loop --------------------------------------------------------------------------


def pixel_config(data, cache):
  """The tiny two-stage trainer config under 'pixels': 2 steps at 16 images, 4 at 8."""
  c = fx.tiny_config(data, steps=8, cache=cache)
  c.progressive.batch_rule = "pixels"
  c.progressive.batch_multiple = 8  # the same table on 1 and on 8 devices
  c.eval_every_stage = False
  return c


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
  """The uninterrupted reference run; `starts` records (start_example, global batch) of every
  train iterator the trainer opens while the module's loop tests run."""
  from effnetv2_jax import train
  from effnetv2_jax.data import input_pipeline

  base = tmp_path_factory.mktemp("stage_batch_loop")
  data = fx.make_folder_dataset(str(base / "data"))
  real, starts = input_pipeline.train_iterator, []

  def recording(**kw):
    starts.append((kw["start_example"], kw["global_batch_size"]))
    return real(**kw)

  input_pipeline.train_iterator = recording
  try:
    with fx.restored_compilation_cache(), fx.unoptimized_xla():
      ref_wd = str(base / "reference")
      ref = train.train_and_evaluate(pixel_config(data, fx.CACHE_DIR), ref_wd, devices=ONE)
      yield {
        "base": base,
        "data": data,
        "ref": ref,
        "ref_wd": ref_wd,
        "train": train,
        "starts": starts,
        "ref_starts": list(starts),
      }
  finally:
    input_pipeline.train_iterator = real


def test_results_record_each_stages_batch(loop):
  ref = loop["ref"]
  assert ref["status"] == "completed" and ref["step"] == 6
  got = [
    (s["first_step"], s["last_step"], s["batch_size"], s["first_example"]) for s in ref["stages"]
  ]
  assert got == [(0, 2, 16, 0), (2, 6, 8, 32)]
  assert [e["step"] for e in ref["train_curve"]] == [2, 4, 6]
  # Stage 1's input starts where stage 0's 2 x 16 images ended.
  assert loop["ref_starts"] == [(0, 16), (32, 8)]


def test_resumed_across_the_batch_change_ends_bitwise_equal(loop):
  """Stopped mid stage 0, exactly at the batch change and one step after it, then finished:
  the same params as the uninterrupted run. A resume with another batch rule is refused."""
  train, data, ref = loop["train"], loop["data"], loop["ref"]
  wd = str(loop["base"] / "interrupted")
  cfg = pixel_config(data, fx.CACHE_DIR)
  # (Unoptimized, as the reference: the `loop` fixture's mode holds while its tests run.)
  del loop["starts"][:]
  assert train.train_and_evaluate(cfg, wd, stop_at_step=1, devices=ONE)["step"] == 1
  constant = pixel_config(data, fx.CACHE_DIR)
  constant.progressive.batch_rule = "constant"
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="stage 0 trained at batch 16"):
    train.train_and_evaluate(constant, wd, devices=ONE)
  for stop in (2, 3):
    assert train.train_and_evaluate(cfg, wd, stop_at_step=stop, devices=ONE)["step"] == stop
  final = train.train_and_evaluate(cfg, wd, devices=ONE)
  assert final["status"] == "completed" and final["step"] == 6
  # Each run opened the input at the images trained so far: 0; 16 after step 1 (of 16 images;
  # that run stopped at the batch change); 32 there, in steps of 8; 40 one step after it.
  assert loop["starts"] == [(0, 16), (16, 16), (32, 8), (40, 8)]
  assert final["params_checksum"] == ref["params_checksum"]
  assert final["final_eval"] == ref["final_eval"]


_EIGHT = """
import json, sys
sys.path.insert(0, {tests!r})
import jax
jax.config.update("jax_threefry_partitionable", True)
import test_stage_batch as t
from effnetv2_jax import train
assert jax.device_count() == 8, jax.device_count()
res = train.train_and_evaluate(t.pixel_config({data!r}, ""), {wd!r})
out = dict(step=res["step"], stages=res["stages"], loss=res["final_eval"]["loss"])
print("RESULT " + json.dumps(out))
"""


def test_one_and_eight_devices_agree(loop):
  """The same run on an 8-device mesh (a subprocess, without the persistent cache: see
  tests/test_train.py) trains the same table to the same weights, up to float reassociation."""
  wd = str(loop["base"] / "eight")
  script = _EIGHT.format(tests=os.path.join(fx.REPO, "tests"), data=loop["data"], wd=wd)
  proc = subprocess.run(
    [sys.executable, "-c", script],
    check=False,
    cwd=fx.REPO,
    env=fx.subprocess_env(num_devices=8, JAX_PLATFORMS="cpu", **fx.UNOPTIMIZED_ENV),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
  line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
  eight = json.loads(line[len("RESULT ") :])
  ref = loop["ref"]
  assert eight["step"] == ref["step"] == 6
  keys = ("first_step", "last_step", "batch_size", "first_example")
  assert [[s[k] for k in keys] for s in eight["stages"]] == [
    [s[k] for k in keys] for s in ref["stages"]
  ]
  np.testing.assert_allclose(eight["loss"], ref["final_eval"]["loss"], rtol=1e-4)
  p8, _, s8 = ckpt_lib.load_variables(wd)
  p1, _, s1 = ckpt_lib.load_variables(loop["ref_wd"])
  assert s8 == s1 == 6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p8, p1)

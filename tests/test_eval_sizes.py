"""Evaluation at several sizes, on a fixed subset, and after BN recalibration, on the tiny folder
dataset and a freshly initialised (untrained: nothing here needs accuracy) checkpoint."""

import json
import os

import jax
import pytest

from effnetv2_jax import checkpoint as ckpt_lib
from effnetv2_jax import config_validation as cv
from effnetv2_jax import main as main_lib
from effnetv2_jax import optim
from effnetv2_jax import plan
from effnetv2_jax import sharding
from effnetv2_jax import train
from effnetv2_jax.data import input_pipeline

import _train_fixtures as fx

ONE = jax.devices()[:1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  base = tmp_path_factory.mktemp("eval_sizes")
  data = fx.make_folder_dataset(str(base / "data"))
  cfg = fx.tiny_config(data, steps=8, cache="")
  run = plan.resolve(cfg)
  mesh = sharding.make_mesh(ONE)
  model = train.build_model(cfg, run.num_classes, run.stages[0].dropout_rate)
  tx = optim.make_optimizer(cfg, run.steps_per_epoch, run.total_steps)
  state = train.init_state(cfg, model, tx, 16, mesh)
  wd = str(base / "ckpt")
  ck = ckpt_lib.Checkpointer(wd, keep=1)
  ck.save(8, state, {})
  ck.wait()
  ck.close()
  return {"base": base, "data": data, "ckpt": wd, "run": run, "mesh": mesh}


def _config(env, **fields):
  cfg = fx.tiny_config(env["data"], steps=8, cache="")
  cfg.init_from = env["ckpt"]
  for k, v in fields.items():
    cfg[k] = v
  return cfg


def _variables(env):
  params, stats, _ = ckpt_lib.load_variables(env["ckpt"])
  return sharding.put_replicated({"params": params, "batch_stats": stats}, env["mesh"])


def test_eval_subset_evaluates_exactly_n_images_the_same_each_time(env):
  cfg = _config(env)
  evaluator = train.Evaluator(cfg, env["run"], env["mesh"])
  v = _variables(env)
  full = evaluator(v)
  assert full["num_examples"] == 16
  a = evaluator(v, max_examples=5)
  b = evaluator(v, max_examples=5)
  assert a["num_examples"] == 5 and a == b
  assert evaluator(v, max_examples=100)["num_examples"] == 16  # more than the split: all of it
  assert evaluator(v, max_examples=0) == full  # 0 = all


def _labels(**kw):
  out = []
  for batch in input_pipeline.eval_iterator(global_batch_size=4, image_size=16, family="v2", **kw):
    out += [int(x) for x, m in zip(batch["label"], batch["mask"]) if m > 0]
  return out


def test_eval_iterator_subsets_are_the_first_n_and_split_over_processes(env):
  kw = dict(dataset="folder:" + env["data"], data_dir=None, split="val")
  first5 = _labels(**kw)[:5]
  assert _labels(max_examples=5, **kw) == first5
  per_process = [_labels(max_examples=5, process_index=i, process_count=2, **kw) for i in range(2)]
  assert sum(map(len, per_process)) == 5


def test_shuffled_train_images_for_recalibration_mix_the_classes(env):
  kw = dict(dataset="folder:" + env["data"], data_dir=None, split="train", max_examples=8)
  assert set(_labels(**kw)) == {0}  # the folder lists class 0 first
  shuffled = _labels(shuffle_seed=3, **kw)
  assert len(shuffled) == 8 and set(shuffled) == {0, 1}
  assert _labels(shuffle_seed=3, **kw) == shuffled  # the same images every call


def _read(path):
  with open(path) as f:
    return json.load(f)


def test_several_sizes_in_one_call_equal_separate_evals(env):
  cfg = _config(env)
  both = train.evaluate(cfg, str(env["base"] / "both"), eval_sizes=[16, 24], devices=ONE)
  alone = {
    s: train.evaluate(cfg, str(env["base"] / f"alone{s}"), eval_sizes=[s], devices=ONE)
    for s in (16, 24)
  }
  assert [e["image_size"] for e in both["evals"]] == [16, 24]
  for e in both["evals"]:
    (only,) = alone[e["image_size"]]["evals"]
    assert {k: e[k] for k in train.EVAL_KEYS} == {k: only[k] for k in train.EVAL_KEYS}
    assert e["recalibrate_bn"] == 0
  # final_eval: the config's eval size (24), run_eval's keys only, as without eval_sizes.
  default = train.evaluate(cfg, str(env["base"] / "default"), devices=ONE)
  assert both["final_eval"] == default["final_eval"] == alone[24]["final_eval"]
  assert set(both["final_eval"]) == set(train.EVAL_KEYS)
  assert [e["image_size"] for e in default["evals"]] == [24]
  on_disk = _read(os.path.join(env["base"], "both", "results.json"))
  assert [e["image_size"] for e in on_disk["evals"]] == [16, 24]
  # Without the config's size among them, final_eval is the first size's.
  other = train.evaluate(cfg, str(env["base"] / "other"), eval_sizes=[16], devices=ONE)
  assert other["final_eval"] == {k: both["evals"][0][k] for k in train.EVAL_KEYS}


def test_recalibration_before_each_size(env):
  cfg = _config(env, recalibrate_bn=20)  # rounds down to 2 batches of eval_batch_size 8
  assert train.recalibration_images(cfg, env["run"]) == 16
  res = train.evaluate(cfg, str(env["base"] / "recal"), eval_sizes=[16, 24], devices=ONE)
  assert [e["recalibrate_bn"] for e in res["evals"]] == [16, 16]
  plain = train.evaluate(_config(env), str(env["base"] / "plain"), eval_sizes=[24], devices=ONE)
  assert res["final_eval"]["loss"] != plain["final_eval"]["loss"]  # init statistics were 0/1
  # The same as recalibrating by hand at 24 px, then evaluating.
  model = train.build_model(cfg, env["run"].num_classes, env["run"].stages[-1].dropout_rate)
  v = train.recalibrated_variables(cfg, env["run"], model, _variables(env), 24, env["mesh"])
  by_hand = train.Evaluator(cfg, env["run"], env["mesh"])(v, image_size=24)
  assert res["final_eval"] == by_hand


def test_eval_sizes_flag(env, capsys):
  cfg = _config(env)
  assert main_lib.parse_eval_sizes(["224", " 256", "", "288"]) == [224, 256, 288]
  for bad in (["x"], ["0"], ["-224"], ["22.5"]):
    with pytest.raises(SystemExit) as e:
      main_lib.run(cfg, str(env["base"] / "cli"), "eval", bad)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --eval_sizes: ") and "not a positive integer" in err
  with pytest.raises(SystemExit) as e:
    main_lib.run(cfg, str(env["base"] / "cli"), "train", ["224"])
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: --eval_sizes: is only used by --mode=eval\n"
  assert not os.path.exists(env["base"] / "cli")
  with pytest.raises(cv.ConfigError, match="eval_sizes"):
    train.eval_sizes_of(cfg, [24, 0])
  assert train.eval_sizes_of(cfg, [32, 24, 32]) == [32, 24]
  assert train.eval_sizes_of(cfg, []) == [24]


@pytest.mark.parametrize(
  "field,value",
  [
    ("eval_every_steps", -1),
    ("eval_every_seconds", -2.0),
    ("eval_subset", -3),
    ("recalibrate_bn", -1),
    ("recalibrate_bn", 3),  # less than one eval batch (8)
  ],
)
def test_bad_curve_and_recalibration_fields_are_named(env, field, value):
  cfg = _config(env)
  cfg.init_from = ""
  cfg[field] = value  # (ConfigDict itself refuses another type)
  with pytest.raises(cv.ConfigError) as e:
    cv.validate_config(cfg, num_devices=1)
  assert e.value.field == field and str(e.value).startswith(field + ":")


def test_good_curve_fields_validate(env):
  cfg = _config(env, eval_every_steps=2, eval_every_seconds=30.0, eval_subset=5, recalibrate_bn=8)
  cfg.init_from = ""
  cv.validate_config(cfg, num_devices=1)

"""Every config file loads and validates with every variant, the recipes say what the reference says,
and the `runlocal` variants train 2 steps end to end (on the tiny folder dataset: no TFDS data here).

Training covers one run per code path: the demo (2 progressive stages), B0 (v2-base preprocessing
with AutoAugment, 2 stages), 21k pretraining of S (v2 preprocessing, one stage) and fine-tuning S
from that checkpoint ('small' preprocessing, init_from). M/L/XL, B1-B3 and the other presets only
validate: their runlocal variants are the real networks, and on a loaded 2-core CPU each 2-step run
costs 30-60 s (mostly compiling) for no new code path. For the same reason the B0 and S runs keep
one block per stage (the same block types, heads and preprocessing), and all compile unoptimized.
"""

import glob
import importlib
import itertools
import os

import jax
import pytest

from configs import demo
from effnetv2_jax import config_validation
from effnetv2_jax import train

import _train_fixtures as fx

CONFIG_DIR = os.path.join(fx.REPO, "configs")
NOT_EXPERIMENTS = {"__init__", "default", "common"}
ONE = jax.devices()[:1]


def _product(**axes):
  return [
    ",".join(f"{k}={v}" for k, v in zip(axes, vals)) for vals in itertools.product(*axes.values())
  ]


# file -> every argument combination it accepts (runlocal is added to each below).
VARIANTS = {
  "demo": ["", "model=resnet"] + [f"model={m}" for m in demo.NETWORKS if m != "v2"],
  "imagenet": _product(
    variant=["b0", "b1", "b2", "b3", "s", "m", "l", "xl"], preset=["official", "paper", "none"]
  ),
  "imagenet21k": _product(variant=["s", "m", "l", "xl"]),
  "finetune": _product(
    dataset=["imagenet2012", "cifar10", "cifar100", "oxford_flowers102", "cars196"],
    variant=["s", "m", "l", "xl"],
    preset=["paper", "official"],
  ),
}


def _files():
  return sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
    if os.path.basename(p)[:-3] not in NOT_EXPERIMENTS
  )


def _load(name, arg):
  return importlib.import_module(f"configs.{name}").get_config(arg or None)


def test_every_config_file_has_its_variants_listed_here():
  # A new config file must be added to VARIANTS, or its variants would go untested.
  assert set(_files()) == set(VARIANTS), (
    f"configs/ has {_files()}; VARIANTS lists {sorted(VARIANTS)}"
  )


@pytest.mark.parametrize("name,arg", [(n, a) for n in sorted(VARIANTS) for a in VARIANTS[n]])
def test_config_and_its_runlocal_variant_validate(name, arg):
  for runlocal in (False, True):
    full_arg = ",".join(filter(None, [arg, "runlocal" if runlocal else ""]))
    config = _load(name, full_arg)
    # check_dataset: every dataset named by a config is in the registry (imagenet21k included).
    config_validation.validate_config(config, num_devices=1)
    assert config.runlocal == runlocal
    if runlocal:
      assert config.num_train_steps <= 8 and config.batch_size <= 8


def test_unknown_arguments_and_values_are_refused():
  with pytest.raises(ValueError, match="known"):
    _load("finetune", "datset=cifar10")
  with pytest.raises(ValueError, match="dataset"):
    _load("finetune", "dataset=mnist")
  with pytest.raises(ValueError, match="variant"):
    _load("imagenet21k", "variant=b0")
  with pytest.raises(ValueError, match="v2-stem2"):  # the message lists the networks
    _load("demo", "model=v3")


def test_imagenet21k_recipe_is_the_reference_one():
  c = _load("imagenet21k", "variant=l")
  assert c.dataset == "imagenet21k" and c.num_epochs == 60 and c.batch_size == 4096
  assert c.lr_per_256 * c.batch_size / 256 == pytest.approx(0.128)
  assert (c.lr_schedule, c.warmup_epochs, c.label_smoothing) == ("cosine", 1.0, 0.0)
  p = c.progressive
  assert p.preset == "none" and p.max_image_size == 224 == c.eval_image_size
  assert p.max_randaug == p.max_mixup == p.max_cutmix == p.max_dropout == 0.0
  from effnetv2_jax.data import datasets

  assert datasets.get_dataset_info("imagenet21k").num_classes == 21_843


@pytest.mark.parametrize("preset", ["official", "paper", "none"])
def test_imagenet_presets_train_on_the_official_split(preset):
  from effnetv2_jax.data import datasets

  c = _load("imagenet", f"variant=s,preset={preset}")
  assert (c.train_split, c.eval_split) == (datasets.IMAGENET_TRAIN_MINUS_MINIVAL, "validation")
  assert datasets.split_num_examples(c.dataset, c.train_split) == 1_256_144  # no data needed
  assert datasets.split_num_examples(c.dataset, c.eval_split) == 50_000
  # The released code's op semantics, except in the paper preset (RandAugment's ops as defined).
  ops = ("unwrapped", "corrected") if preset == "paper" else ("official", "official")
  assert (c.randaug_solarize, c.randaug_enhance) == ops


@pytest.mark.parametrize("name", ["imagenet", "imagenet21k", "finetune"])
def test_imagenet_configs_compute_in_the_machines_precision(name):
  # 'auto': bfloat16 on TPU/GPU like the official mixed_precision=True, float32 on CPU.
  for arg in VARIANTS[name]:
    assert _load(name, arg).dtype == "auto"


@pytest.mark.parametrize(
  "preset,cutmix_label,bn_group_size",
  [("official", "batch_mean", 1024), ("none", "batch_mean", 1024), ("paper", "per_example", 0)],
)
def test_imagenet_presets_pick_the_released_code_or_the_intended_behaviour(
  preset, cutmix_label, bn_group_size
):
  c = _load("imagenet", f"variant=l,preset={preset}")
  assert (c.cutmix_label, c.bn_group_size) == (cutmix_label, bn_group_size)
  # 1024 = the official per-replica batch x min(8, replicas) at batch 4096 on 32 replicas.
  assert bn_group_size in (0, 4096 // 32 * min(8, 32))
  local = _load("imagenet", f"variant=l,preset={preset},runlocal")
  assert local.bn_group_size == (local.batch_size // 2 if bn_group_size else 0)


@pytest.mark.parametrize(
  "preset,schedule,wd", [("paper", "cosine", 0.0), ("official", "constant", 1e-5)]
)
def test_finetune_recipe_per_preset(preset, schedule, wd):
  from configs import finetune

  small = _load("finetune", f"dataset=cifar10,variant=m,preset={preset}")
  big = _load("finetune", f"dataset=imagenet2012,variant=s,preset={preset}")
  for c in (small, big):
    assert c.batch_size == 512 and c.lr_per_256 * 2 == pytest.approx(0.001)
    assert (c.lr_schedule, c.weight_decay, c.ema_decay) == (schedule, wd, 0.9996)
    assert c.progressive.preset == "none" and c.preprocess_family == "small"
    assert c.progressive.max_image_size == c.eval_image_size
  assert small.eval_image_size == 480 and big.eval_image_size == 384
  assert small.num_train_steps == 10_000  # 15 CIFAR epochs at 512 are only 1,464 steps
  assert big.num_train_steps == int(15 * 1_281_167 / 512) == finetune.finetune_steps(1_281_167)


# --- runlocal variants train end to end ---------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _trainer_settings():
  """The runs check that each config trains end to end, not its numbers: they compile unoptimized
  (compiling is most of what a 2-step run of a real network costs). The persistent cache they turn
  on is off again for later modules (see tests/test_train.py)."""
  with fx.restored_compilation_cache(), fx.unoptimized_xla():
    yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return fx.make_folder_dataset(
    str(tmp_path_factory.mktemp("cfgdata") / "data"), num_train=16, num_val=8
  )


def _train_two_steps(name, arg, data, workdir, size=16, **fields):
  config = _load(name, arg)
  config.dataset = f"folder:{data}"
  config.train_split = config.eval_split = None  # the folder's own; ImageNet's would not exist
  config.num_train_steps = 2
  config.progressive.min_image_size = size // 2
  config.progressive.max_image_size = config.eval_image_size = size
  config.compilation_cache_dir = fx.CACHE_DIR
  for k, v in fields.items():  # dotted paths: 'model_overrides.stage_repeats'
    *parents, leaf = k.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = v
  config_validation.validate_config(config, num_devices=1)
  results = train.train_and_evaluate(config, str(workdir), devices=ONE)
  assert results["status"] == "completed" and results["step"] == 2
  assert 0.0 <= results["final_eval"]["top1"] <= 1.0 and results["final_eval"]["num_examples"] == 8
  return results


# One block per stage of the 6-stage B0/S networks: the same block types and heads, a fraction of
# the compile time (the full S chain took 217 s on the loaded 2-core CPU, the full B0 one 111 s).
ONE_BLOCK = {"model_overrides.stage_repeats": (1,) * 6}


@pytest.mark.slow
@pytest.mark.parametrize(
  "name,arg,fields",
  [
    pytest.param("demo", "runlocal", {}, id="demo-runlocal"),
    pytest.param(  # v2-base preprocessing + AutoAugment
      "imagenet", "variant=b0,preset=official,runlocal", ONE_BLOCK, id="imagenet-b0-official"
    ),
  ],
)
def test_runlocal_trains_two_steps(name, arg, fields, data, tmp_path):
  results = _train_two_steps(name, arg, data, tmp_path / "wd", **fields)
  stages = 1 if "preset=none" in arg else min(2, _load(name, arg).progressive.num_stages)
  assert len(results["stages"]) == stages


@pytest.mark.slow
def test_21k_pretraining_then_finetune_from_it(data, tmp_path):
  pre = tmp_path / "21k"
  _train_two_steps("imagenet21k", "variant=s,runlocal", data, pre, **ONE_BLOCK)
  # The fine-tune run starts from the pretraining checkpoint (its 'small' preprocessing differs).
  results = _train_two_steps(
    "finetune",
    "dataset=cifar10,variant=s,preset=official,runlocal",
    data,
    tmp_path / "ft",
    init_from=str(pre),
    **ONE_BLOCK,
  )
  assert results["config"]["init_from"] == str(pre)

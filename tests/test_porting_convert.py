"""The convert CLI writes a checkpoint the trainer reads: load_variables, --mode=eval, fine-tuning."""

import json
import os

import jax
import numpy as np
import pytest

import _train_fixtures as fx
from effnetv2_jax import checkpoint, plan, train
from effnetv2_jax.models import create_model
from effnetv2_jax.porting import convert, to_timm
from effnetv2_jax.porting.timm import write_safetensors
from _porting_fixtures import assert_same_tree, random_variables

ONE = jax.devices()[:1]
# The trainer fixtures' tiny network (2 blocks: fused e1 + MBConv with SE) and 2 classes.
TINY = dict(blocks=tuple(fx.TINY_BLOCKS), stem_filters=8, head_filters=16)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  base = tmp_path_factory.mktemp("convert")
  variables, _, _ = random_variables("efficientnetv2-b0", seed=11, num_classes=2, **TINY)
  source = str(base / "tiny.safetensors")
  write_safetensors(source, to_timm(variables, "efficientnetv2-b0", **TINY))
  out = str(base / "converted")
  rc = convert.main(
    [
      f"--source={source}",
      "--format=timm",
      "--model=efficientnetv2-b0",
      f"--out={out}",
      "--num_classes=2",
      "--model_overrides=" + json.dumps({**TINY, "blocks": list(TINY["blocks"])}),
    ]
  )
  assert rc == 0
  return base, source, out, variables


def test_checkpoint_holds_exactly_the_source_arrays(converted):
  _, _, out, variables = converted
  params, batch_stats, step = checkpoint.load_variables(out)
  assert step == 0
  assert_same_tree({"params": params, "batch_stats": batch_stats}, variables)
  meta = checkpoint.Checkpointer(out, read_only=True).read_meta(0)
  assert meta["model_name"] == "efficientnetv2-b0" and meta["num_classes"] == 2
  assert meta["format"] == "timm"


def test_eval_mode_from_converted_weights_equals_applying_them(converted):
  """train.evaluate(init_from=converted) gives the loss of applying the variables directly."""
  base, _, out, variables = converted
  data = fx.make_folder_dataset(str(base / "data"), num_train=8, num_val=16)
  cfg = fx.tiny_config(data)
  cfg.init_from = out
  res = train.evaluate(cfg, str(base / "eval"), devices=ONE)
  assert res["final_eval"]["num_examples"] == 16
  with open(os.path.join(base, "eval", "results.json")) as f:
    assert json.load(f)["final_eval"] == res["final_eval"]
  # The same split and preprocessing, applied here without the trainer.
  from effnetv2_jax.data import input_pipeline

  facts = plan.resolve(cfg)
  model = create_model("efficientnetv2-b0", num_classes=2, **TINY)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  losses, correct = [], []
  for batch in input_pipeline.eval_iterator(
    dataset=cfg.dataset,
    data_dir=cfg.data_dir,
    split=facts.eval_split,
    global_batch_size=8,
    image_size=cfg.eval_image_size,
    family=facts.family,
  ):
    logits = np.asarray(apply(variables, batch["image"]), np.float64)
    keep = batch["mask"] > 0
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    losses += list(-logp[np.arange(len(logp)), batch["label"]][keep])
    correct += list((logits.argmax(-1) == batch["label"])[keep])
  assert len(losses) == 16
  assert res["final_eval"]["loss"] == pytest.approx(np.mean(losses), rel=1e-5)
  assert res["final_eval"]["top1"] == pytest.approx(np.mean(correct))


def test_fine_tuning_with_other_classes_reinitialises_only_the_head(converted):
  _, _, out, variables = converted
  params, _, _ = checkpoint.load_variables(out)
  fresh = random_variables("efficientnetv2-b0", seed=0, num_classes=5, **TINY)[0]["params"]
  logged = []
  merged, reinit = checkpoint.merge_pretrained(fresh, params, log=lambda *a: logged.append(a))
  assert reinit == ["classifier.bias", "classifier.kernel"] and logged
  np.testing.assert_array_equal(
    merged["blocks_1"]["se"]["reduce"]["kernel"],
    variables["params"]["blocks_1"]["se"]["reduce"]["kernel"],
  )
  assert merged["classifier"]["kernel"].shape == (16, 5)


def test_refusals_are_clear(converted, tmp_path):
  _, source, out, _ = converted
  args = [
    "--format=timm",
    "--model=efficientnetv2-b0",
    "--model_overrides=" + json.dumps({**TINY, "blocks": list(TINY["blocks"])}),
  ]
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    convert.main([f"--source={source}", f"--out={out}"] + args)
  with pytest.raises(ValueError, match="2-class classifier, not 1000"):
    convert.main([f"--source={source}", f"--out={tmp_path / 'a'}", "--num_classes=1000"] + args)
  pt = tmp_path / "weights.pth"
  pt.write_bytes(b"\x80\x04not really a pickle")
  with pytest.raises(ValueError, match="pickle"):
    convert.main([f"--source={pt}", f"--out={tmp_path / 'b'}"] + args)
  assert not os.path.exists(tmp_path / "a" / "checkpoints" / "0")
  with pytest.raises(ValueError, match="does not match efficientnetv2-b1"):
    convert.main(
      [
        f"--source={source}",
        f"--out={tmp_path / 'c'}",
        "--format=timm",
        "--model=efficientnetv2-b1",
      ]
    )


def test_keras_file_is_loaded_safely_and_converted(tmp_path):
  keras = pytest.importorskip("keras")
  from effnetv2_jax.porting import from_keras

  kmodel = keras.applications.EfficientNetV2B0(
    weights=None, include_preprocessing=False, input_shape=(32, 32, 3), classes=3
  )
  path = str(tmp_path / "b0.keras")
  kmodel.save(path)
  summary = convert.convert(path, "keras", "efficientnetv2-b0", str(tmp_path / "out"))
  assert summary["num_classes"] == 3
  params, batch_stats, _ = checkpoint.load_variables(str(tmp_path / "out"))
  assert_same_tree(
    {"params": params, "batch_stats": batch_stats},
    jax.tree.map(np.asarray, from_keras(kmodel, "efficientnetv2-b0")),
  )

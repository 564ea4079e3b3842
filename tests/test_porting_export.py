"""Exported inference (StableHLO via jax.export, and a jax2tf SavedModel) gives model.apply's logits."""

import json
import os

import jax
import numpy as np
import pytest

import _train_fixtures as fx
from _porting_fixtures import random_variables
from effnetv2_jax.models import create_model
from effnetv2_jax.porting import convert, export, to_timm
from effnetv2_jax.porting.timm import write_safetensors

TINY = dict(blocks=tuple(fx.TINY_BLOCKS), stem_filters=8, head_filters=16)
SIZE = 32


def tiny_variables(seed=21):
  variables, _, _ = random_variables("efficientnetv2-b0", seed=seed, num_classes=4, **TINY)
  # A larger classifier than the fixture's so logits are O(1) and atol 1e-5 means something.
  variables["params"]["classifier"]["kernel"] = variables["params"]["classifier"]["kernel"] * 8
  return variables


def reference_logits(variables, x):
  model = create_model("efficientnetv2-b0", num_classes=4, **TINY)
  return np.asarray(model.apply(variables, x, train=False))


def images(n, seed=0):
  return np.random.default_rng(seed).normal(0, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """checkpoint (via the convert CLI) -> the export CLI, as a user runs them."""
  base = tmp_path_factory.mktemp("export")
  variables = tiny_variables()
  overrides = json.dumps({**TINY, "blocks": list(TINY["blocks"])})
  write_safetensors(str(base / "w.safetensors"), to_timm(variables, "efficientnetv2-b0", **TINY))
  convert.main(
    [
      f"--source={base / 'w.safetensors'}",
      "--format=timm",
      "--model=efficientnetv2-b0",
      f"--out={base / 'ckpt'}",
      f"--model_overrides={overrides}",
    ]
  )
  assert (
    export.main(
      [
        f"--checkpoint={base / 'ckpt'}",
        "--model=efficientnetv2-b0",
        f"--image_size={SIZE}",
        f"--out={base / 'out'}",
        f"--model_overrides={overrides}",
      ]
    )
    == 0
  )
  return base / "out", variables


def test_stablehlo_export_matches_apply_for_any_batch(exported):
  out, variables = exported
  infer = export.load_stablehlo(str(out / export.STABLEHLO_FILE))
  for n in (1, 3):  # one symbolic batch dimension serves both
    x = images(n, seed=n)
    expected = reference_logits(variables, x)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(np.asarray(infer(x)), expected, atol=1e-5, rtol=0)
  record = json.loads((out / "export.json").read_text())
  assert record["num_classes"] == 4 and record["image_size"] == SIZE
  assert set(record["platforms"]) == {"cpu", "cuda", "tpu"}


def test_export_has_no_rng_and_no_state(exported):
  out, _ = exported
  with open(out / export.STABLEHLO_FILE, "rb") as f:
    exp = jax.export.deserialize(bytearray(f.read()))
  assert len(exp.in_avals) == 1 and exp.in_avals[0].shape[1:] == (SIZE, SIZE, 3)  # images only
  assert len(exp.out_avals) == 1 and exp.out_avals[0].shape[1:] == (4,)  # logits only
  x = images(2, seed=7)
  np.testing.assert_array_equal(np.asarray(exp.call(x)), np.asarray(exp.call(x)))


def test_saved_model_matches_apply(exported):
  tf = pytest.importorskip("tensorflow")
  out, variables = exported
  loaded = tf.saved_model.load(str(out / export.SAVED_MODEL_DIR))
  x = images(2, seed=9)
  got = loaded.signatures["serving_default"](images=tf.constant(x))["logits"].numpy()
  np.testing.assert_allclose(got, reference_logits(variables, x), atol=1e-5, rtol=0)


def test_fixed_batch_export_rejects_other_batches(tmp_path):
  variables = tiny_variables(seed=5)
  export.export_inference(
    variables,
    "efficientnetv2-b0",
    SIZE,
    str(tmp_path),
    batch_size=2,
    saved_model=False,
    platforms=("cpu",),
    **TINY,
  )
  infer = export.load_stablehlo(str(tmp_path / export.STABLEHLO_FILE))
  x = images(2, seed=3)
  np.testing.assert_allclose(
    np.asarray(infer(x)), reference_logits(variables, x), atol=1e-5, rtol=0
  )
  with pytest.raises(Exception, match="shape"):
    infer(images(3))
  assert not os.path.exists(tmp_path / export.SAVED_MODEL_DIR)

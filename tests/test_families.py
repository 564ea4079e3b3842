"""Progressive learning works for every model family (the paper's Table 12: ResNet, EfficientNet).

Each family trains two tiny progressive stages end to end through the real trainer; the stages'
sizes must be the planned ones and evaluation must see the whole split.
"""

import jax
import pytest

from effnetv2_jax import train

import _train_fixtures as fx

ONE = jax.devices()[:1]
FAMILIES = {
  "efficientnet-b0": {
    "blocks": ["r1_k3_s1_e1_i8_o8_se0.25", "r1_k3_s2_e4_i8_o16_se0.25"],
    "stem_filters": 8,
    "head_filters": 16,
  },
  "resnet50": {"depths": [1, 1, 1, 1]},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return fx.make_folder_dataset(
    str(tmp_path_factory.mktemp("families") / "data"), num_train=16, num_val=6
  )


@pytest.mark.parametrize("model_name", sorted(FAMILIES))
def test_progressive_training_runs_for_family(model_name, data, tmp_path):
  c = fx.tiny_config(data, steps=4, log_every=2, ckpt_every=4)
  c.model_name = model_name
  c.model_overrides = FAMILIES[model_name]
  results = train.train_and_evaluate(c, str(tmp_path / "wd"), devices=ONE)
  assert results["status"] == "completed"
  assert [s["image_size"] for s in results["stages"]] == [16, 24]
  assert [s["steps"] for s in results["stages"]] == [2, 2]
  assert results["final_eval"]["num_examples"] == 6

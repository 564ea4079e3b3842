"""Progressive learning works for every model family (the paper's Table 12: ResNet, EfficientNet).

For each family the trainer's own pieces are put together step by step: the run resolved by
`plan.resolve`, the state from `train.init_state`, each stage's step from `train.make_stage_step`
jitted by `sharding.jit_train_step` and fed by the real input pipeline at the stage's size, and
`train.Evaluator`. The stages must be the planned ones (sizes and steps), each stage's steps must
train the state the previous stage left (params change, losses finite, nothing skipped), and
evaluation must see the whole split. The loop around these pieces (checkpoints, resume, logging)
is tests/test_train.py's; the stage sizes and steps of a full run are pinned there too.
"""

import jax
import numpy as np
import pytest

from effnetv2_jax import optim, plan, sharding, train
from effnetv2_jax import state as state_lib
from effnetv2_jax.data import augment, input_pipeline

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


@pytest.fixture(scope="module", autouse=True)
def _unoptimized():
  """Nothing here compares numbers across runs, and compiling is most of what one step costs."""
  with fx.unoptimized_xla():
    yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return fx.make_folder_dataset(
    str(tmp_path_factory.mktemp("families") / "data"), num_train=16, num_val=6
  )


def _batches(config, run, stage):
  """The stage's batches, as the trainer reads them (the stage's size and augmentation)."""
  data = input_pipeline.train_iterator(
    dataset=config.dataset,
    data_dir=config.data_dir,
    split=run.train_split,
    global_batch_size=run.batch_size,
    image_size=stage.image_size,
    family=run.family,
    augment=augment.for_stage(config, stage),
    seed=config.seed,
    start_step=stage.first_step,
    shuffle_buffer=config.shuffle_buffer,
  )
  return [next(data) for _ in range(stage.num_steps)]


@pytest.mark.parametrize("model_name", sorted(FAMILIES))
def test_progressive_stages_train_for_family(model_name, data):
  c = fx.tiny_config(data, steps=4, log_every=2, ckpt_every=4)
  c.model_name = model_name
  c.model_overrides = FAMILIES[model_name]
  run = plan.resolve(c)
  assert [s.image_size for s in run.stages] == [16, 24]
  assert [s.num_steps for s in run.stages] == [2, 2]

  mesh = sharding.make_mesh(ONE)
  tx = optim.make_optimizer(c, run.steps_per_epoch, run.total_steps)
  lr_fn = optim.lr_schedule(c, run.steps_per_epoch, run.total_steps)
  first = run.stages[0]
  model = train.build_model(c, run.num_classes, first.dropout_rate)
  state = train.init_state(c, model, tx, first.image_size, mesh)
  rng = jax.device_put(jax.random.PRNGKey(c.seed), sharding.replicated(mesh))
  for stage in run.stages:  # each stage's steps, on the state the previous stage left
    step = sharding.jit_train_step(train.make_stage_step(c, run, stage, tx, lr_fn), mesh, state)
    before = jax.device_get(state.params)  # the step donates the state
    for batch in _batches(c, run, stage):
      assert batch["image"].shape == (run.batch_size, stage.image_size, stage.image_size, 3)
      state, metrics = step(state, sharding.shard_batch(batch, mesh), rng)
      metrics = jax.device_get(metrics)
      assert np.isfinite(metrics["loss"]) and metrics["bad_step"] == 0, (stage, metrics)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, state.params)
    assert all(jax.tree.leaves(changed)), (stage, changed)
  assert int(state.step) == run.total_steps == 4

  final_eval = train.Evaluator(c, run, mesh)(state_lib.eval_variables(state))
  assert final_eval["num_examples"] == 6  # the whole split, exactly once
  assert 0.0 <= final_eval["top1"] <= final_eval["top5"] <= 1.0

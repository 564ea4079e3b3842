"""Checkpoints: exact round trip into the target's sharding, half-written steps never restored,
mismatched models named array by array, retention, fine-tuning init, and no pickle anywhere."""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util

from effnetv2_jax import checkpoint as ckpt_lib
from effnetv2_jax import flat
from effnetv2_jax import models
from effnetv2_jax import optim
from effnetv2_jax import sharding
from effnetv2_jax import state as state_lib
from configs import default

BLOCKS = ["r1_k3_s1_e1_i8_o8_c1", "r1_k3_s2_e4_i8_o16_se0.25"]


def _model(num_classes=3, blocks=BLOCKS):
  return models.create_model(
    "efficientnetv2-b0", num_classes=num_classes, blocks=blocks, stem_filters=8, head_filters=16
  )


def _tx():
  c = default.get_config()
  c.batch_size = 8
  return optim.make_optimizer(c, steps_per_epoch=10, total_steps=100)


@pytest.fixture(scope="module")
def trained_state():
  # Built once (model init compiles): every leaf moved off its init value, so a restore that
  # silently re-initialised something would show.
  st = state_lib.create_train_state(jax.random.PRNGKey(0), _model(), _tx(), 16)
  return jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x + 7, st)


def _abstract(model, mesh=None):
  abs_ = jax.eval_shape(
    lambda: state_lib.create_train_state(jax.random.PRNGKey(1), model, _tx(), 16)
  )
  if mesh is None:
    return abs_
  rep = sharding.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abs_)


def _equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
    np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
  )


def test_round_trip_is_exact_and_uses_target_sharding(tmp_path, trained_state):
  model, mesh = _model(), sharding.make_mesh()
  st = trained_state
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  assert ck.latest_step() is None
  ck.save(5, st, {"stage": 1})
  ck.wait()
  restored, meta = ck.restore(5, _abstract(model, mesh))
  ck.close()
  assert meta["step"] == 5 and meta["stage"] == 1
  assert _equal(restored, st)
  assert jax.tree.structure(restored) == jax.tree.structure(st)
  leaf = restored.params["classifier"]["kernel"]
  assert leaf.sharding == sharding.replicated(mesh) and len(leaf.sharding.device_set) == mesh.size


def test_half_written_checkpoint_is_never_restored(tmp_path, trained_state):
  model, mesh = _model(), sharding.make_mesh()
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  ck.save(2, trained_state, {})
  ck.close()
  # What a writer killed mid-save leaves: orbax's tmp directory for a later step, never renamed.
  tmp = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1700000000"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "garbage").write_bytes(b"\x00" * 10)
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  assert ck.latest_step() == 2
  assert ck.all_steps() == [2]
  restored, _ = ck.restore(2, _abstract(model, mesh))
  assert int(restored.step) == 7  # the fixture adds 7 to integer leaves
  ck.close()
  assert not tmp.exists()  # and the leftover is cleaned up


@pytest.mark.parametrize(
  "other,expect",
  [
    (
      dict(num_classes=5),
      "params.classifier.kernel: checkpoint shape (16, 3) != model shape (16, 5)",
    ),
    (dict(blocks=BLOCKS[:1]), "params.blocks_1"),
  ],
)
def test_mismatched_model_names_the_arrays(tmp_path, trained_state, other, expect):
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  ck.save(1, trained_state, {})
  ck.wait()
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    ck.restore(1, _abstract(_model(**other), sharding.make_mesh()))
  ck.close()
  assert expect in str(e.value)
  assert "num_classes" in str(e.value)  # says what to check


def _tree_slots_state(model):
  """A state as create_train_state built it before the optimizer slots and EMA were flat
  (effnetv2_jax/flat.py): every slot a tree, so this is what such a run wrote to disk."""
  v = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 16, 16, 3)), train=False)
  p, b = v["params"], v["batch_stats"]
  st = state_lib.TrainState(
    step=jnp.int32(0),
    params=p,
    batch_stats=b,
    opt_state=_tx().init(p),
    ema_params=jax.tree.map(jnp.copy, p),
    ema_batch_stats=jax.tree.map(jnp.copy, b),
  )
  # Every leaf off its init value, each slot differently, so a restore into the wrong slot shows.
  leaves, treedef = jax.tree.flatten(st)
  return treedef.unflatten([x + i + 1 for i, x in enumerate(leaves)])


def test_a_checkpoint_with_tree_shaped_slots_restores(tmp_path):
  model, mesh = _model(), sharding.make_mesh()
  old = _tree_slots_state(model)
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=1)
  ck.save(4, old, {})
  ck.wait()
  # The same arrays under the same names as a checkpoint of today's state.
  new_names = ckpt_lib.flat_shapes(serialization.to_state_dict(_abstract(model)))
  assert ck.saved_shapes(4) == new_names
  assert "opt_state.0.0.nu.stem.conv.kernel" in new_names
  assert "ema_params.blocks_1.expand.conv.kernel" in new_names
  restored, _ = ck.restore(4, _abstract(model, mesh))
  ck.close()
  assert isinstance(restored.ema_params, flat.Flat)
  assert isinstance(restored.opt_state[0][0].nu, flat.Flat)
  want = traverse_util.flatten_dict(serialization.to_state_dict(old), sep=".")
  got = traverse_util.flatten_dict(serialization.to_state_dict(restored), sep=".")
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)


def test_keeps_only_the_last_k(tmp_path, trained_state):
  st = trained_state
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  for s in (1, 2, 3, 4):
    ck.save(s, st, {})
  assert ck.save(4, st, {}) is False  # a step is never written twice
  ck.close()
  assert ckpt_lib.Checkpointer(str(tmp_path), keep=2).all_steps() == [3, 4]


def test_init_from_takes_ema_and_reinitialises_a_different_head(
  tmp_path, monkeypatch, trained_state
):
  src = trained_state
  src = src.replace(ema_params=jax.tree.map(lambda x: x * 0 + 0.5, src.params))
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=1)
  ck.save(9, src, {})
  ck.close()

  def no_pickle(*a, **k):
    raise AssertionError("checkpoint loading must not unpickle")

  monkeypatch.setattr(pickle, "loads", no_pickle)
  monkeypatch.setattr(pickle, "load", no_pickle)
  params, stats, step = ckpt_lib.load_variables(str(tmp_path))
  assert step == 9
  assert np.all(np.asarray(params["stem"]["conv"]["kernel"]) == 0.5)  # EMA, not raw

  fresh = jax.tree.map(lambda x: np.full(x.shape, 2.0, x.dtype), _abstract(_model(10)).params)
  merged, reinit = ckpt_lib.merge_pretrained(fresh, params, log=lambda *a: None)
  assert sorted(reinit) == ["classifier.bias", "classifier.kernel"]
  assert np.array_equal(merged["classifier"]["kernel"], fresh["classifier"]["kernel"])
  assert np.all(np.asarray(merged["stem"]["conv"]["kernel"]) == 0.5)


def test_checkpoint_files_hold_no_pickles(tmp_path, trained_state):
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=1)
  ck.save(1, trained_state, {"stage": 0})
  ck.close()
  for dirpath, _, files in os.walk(tmp_path):
    for f in files:
      with open(os.path.join(dirpath, f), "rb") as fh:
        head = fh.read(2)
      assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), f

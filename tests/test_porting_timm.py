"""timm state dicts -> our variables: names, layouts, files, and errors that name the culprits.

The state dicts are synthetic (no network, no torch): built from known arrays with timm's names
and torch layouts, some through the inverse table and some spelled out by hand, so a table that is
wrong in both directions is still caught by the hand-written expectations.
"""

import numpy as np
import pytest

from effnetv2_jax.porting import from_timm, load_state_dict, names, to_timm
from effnetv2_jax.porting.timm import read_safetensors, timm_lookup, write_safetensors
from _porting_fixtures import assert_same_tree, leaf_value, random_variables


@pytest.fixture(scope="module")
def s_model():
  return random_variables("efficientnetv2-s", seed=1)


def test_round_trip_is_exact_b0_and_s(s_model):
  for name, (variables, _, _) in (
    ("efficientnetv2-b0", random_variables("efficientnetv2-b0")),
    ("efficientnetv2-s", s_model),
  ):
    sd = to_timm(variables, name)
    assert_same_tree(from_timm(sd, name), variables)


def test_hand_written_timm_names_land_where_they_should(s_model):
  """Each block layout of S, written as timm names it, in torch layout."""
  variables, specs, _ = s_model
  sd = to_timm(variables, "efficientnetv2-s")
  # Block 1 of S is the second fused-e1 block of stage 0 ('cn' ConvBnAct) and has a residual.
  assert specs[1].stage == 0 and specs[1].index_in_stage == 1 and specs[1].fused
  np.testing.assert_array_equal(
    sd["blocks.0.1.conv.weight"].transpose(2, 3, 1, 0),
    leaf_value(variables, "params", "blocks_1/project/conv/kernel"),
  )
  # Block 2 opens stage 1 (fused e4, 'er'): conv_exp is the 3x3 expand, conv_pwl the 1x1 project.
  assert sd["blocks.1.0.conv_exp.weight"].shape == (96, 24, 3, 3)
  assert sd["blocks.1.0.conv_pwl.weight"].shape == (48, 96, 1, 1)
  np.testing.assert_array_equal(
    sd["blocks.1.0.bn2.running_var"],
    leaf_value(variables, "batch_stats", "blocks_2/project/bn/var"),
  )
  # Block 10 opens stage 3 (MBConv e4 + SE, 'ir'): depthwise [C,1,k,k], SE from the block input.
  assert sd["blocks.3.0.conv_dw.weight"].shape == (256, 1, 3, 3)
  assert sd["blocks.3.0.se.conv_reduce.weight"].shape == (16, 256, 1, 1)
  dw = leaf_value(variables, "params", "blocks_10/dw/conv/kernel")
  assert dw.shape == (3, 3, 1, 256)
  np.testing.assert_array_equal(
    sd["blocks.3.0.conv_dw.weight"][:, 0], dw[:, :, 0].transpose(2, 0, 1)
  )
  np.testing.assert_array_equal(
    sd["blocks.3.0.bn3.running_mean"],
    leaf_value(variables, "batch_stats", "blocks_10/project/bn/mean"),
  )
  np.testing.assert_array_equal(
    sd["blocks.3.0.se.conv_expand.bias"],
    leaf_value(variables, "params", "blocks_10/se/expand/bias"),
  )
  # Stem, head and the Linear classifier ([out, in] in torch).
  np.testing.assert_array_equal(sd["bn1.weight"], leaf_value(variables, "params", "stem/bn/scale"))
  np.testing.assert_array_equal(
    sd["bn2.running_var"], leaf_value(variables, "batch_stats", "head/bn/var")
  )
  np.testing.assert_array_equal(
    sd["classifier.weight"].T, leaf_value(variables, "params", "classifier/kernel")
  )
  assert sd["conv_stem.weight"].shape == (24, 3, 3, 3) and sd["classifier.weight"].shape == (
    10,
    1280,
  )


def test_efficientnet_v1_first_block_is_depthwise_separable():
  variables, _, _ = random_variables("efficientnet-b0")
  sd = to_timm(variables, "efficientnet-b0")
  # timm's 'ds' block: conv_dw, bn1, se, conv_pw, bn2 (no expand conv, no bn3).
  assert {k.rsplit(".", 1)[0] for k in sd if k.startswith("blocks.0.0.")} == {
    "blocks.0.0.conv_dw",
    "blocks.0.0.bn1",
    "blocks.0.0.se.conv_reduce",
    "blocks.0.0.se.conv_expand",
    "blocks.0.0.conv_pw",
    "blocks.0.0.bn2",
  }
  assert_same_tree(from_timm(sd, "efficientnet-b0"), variables)


def test_xl_maps_every_array_without_allocating_it():
  """XL (208M parameters) through zero-stride views: each timm array is a distinct constant."""
  _, specs, leaves = names.build("efficientnetv2-xl", 1000)
  lookup = timm_lookup(specs)
  zeros = {}
  for leaf in leaves:
    name, transform = lookup(leaf)
    zeros[name] = names.TRANSFORMS[transform][1](np.broadcast_to(np.float32(0), leaf.shape))
  index = {n: i for i, n in enumerate(sorted(zeros))}
  sd = {n: np.broadcast_to(np.float32(index[n]), z.shape) for n, z in zeros.items()}
  # XL stages hold 4, 8, 8, 16, 24, 32, 8 blocks: flat block 60 opens stage 5, 99 closes stage 6.
  assert (
    len(specs) == 100 and "blocks.6.7.conv_pwl.weight" in sd and "blocks.7.0.bn1.weight" not in sd
  )
  variables = from_timm(sd, "efficientnetv2-xl")
  assert (
    leaf_value(variables, "params", "blocks_99/project/conv/kernel").flat[0]
    == index["blocks.6.7.conv_pwl.weight"]
  )
  assert (
    leaf_value(variables, "batch_stats", "blocks_60/expand/bn/var").flat[0]
    == index["blocks.5.0.bn1.running_var"]
  )
  assert (
    leaf_value(variables, "params", "blocks_59/se/reduce/kernel").flat[0]
    == index["blocks.4.23.se.conv_reduce.weight"]
  )
  trainable = sum(int(np.prod(v.shape)) for n, v in sd.items() if "running_" not in n)
  assert trainable == 208_119_808  # the official XL count at 1000 classes (reference section 1)


def test_missing_extra_and_misshaped_names_are_all_reported(s_model):
  variables, _, _ = s_model
  sd = dict(to_timm(variables, "efficientnetv2-s"))
  del sd["blocks.2.3.bn2.running_mean"]
  sd["blocks.9.0.conv_pw.weight"] = np.zeros((1,), np.float32)
  sd["blocks.4.0.conv_pwl.weight"] = sd["blocks.4.0.conv_pwl.weight"][:-1]
  sd["bn1.num_batches_tracked"] = np.array(7)  # timm's counter: ignored, not unexpected
  with pytest.raises(ValueError) as err:
    from_timm(sd, "efficientnetv2-s")
  text = str(err.value)
  for needle in (
    "missing (1)",
    "blocks.2.3.bn2.running_mean",
    "unexpected (1)",
    "blocks.9.0.conv_pw.weight",
    "shape mismatch (1)",
    "blocks.4.0.conv_pwl.weight",
  ):
    assert needle in text, text
  assert "num_batches_tracked" not in text


def test_wrong_model_name_is_refused(s_model):
  sd = to_timm(s_model[0], "efficientnetv2-s")
  with pytest.raises(ValueError, match="does not match efficientnetv2-m"):
    from_timm(sd, "efficientnetv2-m")


def test_safetensors_and_npz_files_round_trip(tmp_path):
  variables, _, _ = random_variables("efficientnetv2-b0", seed=3)
  sd = to_timm(variables, "efficientnetv2-b0")
  sd["bn1.num_batches_tracked"] = np.array(12, np.int64)
  write_safetensors(tmp_path / "m.safetensors", sd)
  np.savez(tmp_path / "m.npz", **sd)
  for path in ("m.safetensors", "m.npz"):
    loaded = load_state_dict(str(tmp_path / path))
    assert loaded.keys() == sd.keys()
    assert_same_tree(from_timm(loaded, "efficientnetv2-b0"), variables)


def test_safetensors_bfloat16_and_truncation(tmp_path):
  import ml_dtypes

  x = np.arange(12, dtype=np.float32).reshape(3, 4) / 8  # exactly representable in bf16
  write_safetensors(tmp_path / "a.safetensors", {"x": x.astype(ml_dtypes.bfloat16)})
  got = read_safetensors(str(tmp_path / "a.safetensors"))["x"]
  np.testing.assert_array_equal(got.astype(np.float32), x)
  raw = (tmp_path / "a.safetensors").read_bytes()
  (tmp_path / "b.safetensors").write_bytes(raw[:-4])
  with pytest.raises(ValueError, match="'x'.*truncated"):
    read_safetensors(str(tmp_path / "b.safetensors"))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_pickle_files_are_refused_before_being_opened(tmp_path, suffix):
  # The file does not even exist: the refusal must come from the name, never from reading it.
  with pytest.raises(ValueError, match="pickle.*safetensors"):
    load_state_dict(str(tmp_path / f"model{suffix}"))

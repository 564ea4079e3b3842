"""tf.data pipeline: resume determinism, exact eval counts, per-process shards, bad images."""

import os

import numpy as np
import pytest
from PIL import Image

from effnetv2_jax.data import input_pipeline
from effnetv2_jax.data import prepare
from effnetv2_jax.data import preprocess
from effnetv2_jax.data.augment import Augment
from test_data_prepare import write_idx_set  # pylint: disable=g-bad-import-order

NUM_TRAIN, NUM_TEST = 50, 37  # neither divisible by the batch sizes below


@pytest.fixture(scope="module")
def fm_dir(tmp_path_factory):
  src = str(tmp_path_factory.mktemp("idx"))
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  write_idx_set(src, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=1)
  prepare.prepare_fashion_mnist(data_dir=data_dir, source_dir=src)
  return data_dir


def _train(fm_dir, **kw):
  args = dict(
    dataset="fashion_mnist",
    data_dir=fm_dir,
    split=None,
    global_batch_size=8,
    image_size=20,
    family="v2",
    augment=Augment(magnitude=15.0),
    seed=3,
    shuffle_buffer=64,
  )
  args.update(kw)
  return input_pipeline.train_iterator(**args)


# RandAugment on in one case, off in the other (crop/flip randomness remains) to keep tracing time low.
@pytest.mark.parametrize("process_index,process_count,magnitude", [(0, 1, 15.0), (1, 2, 0.0)])
def test_resume_from_step_k_equals_the_tail_of_an_uninterrupted_run(
  fm_dir, process_index, process_count, magnitude
):
  kw = dict(
    process_index=process_index, process_count=process_count, augment=Augment(magnitude=magnitude)
  )
  full = _train(fm_dir, **kw)
  batches = [next(full) for _ in range(12)]  # > 1 epoch of this shard: crosses epoch boundaries
  k = 7
  resumed = _train(fm_dir, start_step=k, **kw)
  for want in batches[k:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_array_equal(got["image"], want["image"])
  b_local = 8 // process_count
  assert batches[0]["image"].shape == (b_local, 20, 20, 3) and batches[0]["label"].dtype == np.int32
  # Same data, different seed -> different order/augmentation.
  other = next(_train(fm_dir, seed=4, **kw))
  assert not np.array_equal(other["image"], batches[0]["image"])


def test_epochs_cover_the_shard_once_each(fm_dir):
  # 50 = 5 batches per epoch
  it = _train(fm_dir, global_batch_size=10, augment=Augment(magnitude=0.0))
  labels = [np.concatenate([next(it)["label"] for _ in range(5)]) for _ in range(2)]
  assert sorted(labels[0]) == sorted(labels[1])  # each epoch is a permutation of the split
  assert not np.array_equal(labels[0], labels[1])  # reshuffled per epoch


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_counts_exactly_the_split(fm_dir, process_count):
  total, seen_labels = 0.0, []
  for index in range(process_count):
    it = input_pipeline.eval_iterator(
      dataset="fashion_mnist",
      data_dir=fm_dir,
      split=None,
      global_batch_size=6 * process_count,
      image_size=16,
      family="v2",
      process_index=index,
      process_count=process_count,
    )
    batches = list(it)
    assert all(b["image"].shape == (6, 16, 16, 3) for b in batches)  # padded to full batches
    for b in batches:
      total += b["mask"].sum()
      seen_labels.extend(b["label"][b["mask"] > 0])
    assert len(batches) == -(-(-(-NUM_TEST // process_count)) // 6)  # same step count everywhere
  assert total == NUM_TEST
  import tensorflow_datasets as tfds

  want = [int(ex["label"]) for ex in tfds.load("fashion_mnist", split="test", data_dir=fm_dir)]
  assert sorted(seen_labels) == sorted(want)


def _solid(value, mode="RGB", size=(24, 30)):
  return Image.fromarray(np.full(size + (3,), value, np.uint8)).convert(mode)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """train/ and val/ with 3 classes; images are solid grey whose level encodes the class."""
  root = tmp_path_factory.mktemp("folder")
  levels = {"apple": 40, "banana": 130, "cherry": 220}
  for split, per_class in (("train", 4), ("val", 3)):
    for cls, level in levels.items():
      d = root / split / cls
      os.makedirs(d)
      for i in range(per_class):
        # Mix encodings: RGB JPEG, greyscale JPEG, CMYK JPEG, PNG.
        mode, fmt = [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG")][i % 4]
        _solid(level, mode).save(d / f"{i}.{fmt.lower().replace('jpeg', 'jpg')}", fmt)
  # One corrupt file in each split: a JPEG header followed by garbage.
  (root / "train" / "banana" / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
  (root / "val" / "cherry" / "zz_bad.jpg").write_bytes(b"not an image at all")
  return str(root), levels


def _class_of(image, levels):
  level = image.mean() * 128 + 128  # undo the 'v2' normalisation
  return min(range(len(levels)), key=lambda c: abs(sorted(levels.values())[c] - level))


def test_eval_skips_and_counts_corrupt_images_and_keeps_labels(folder):
  root, levels = folder
  before = input_pipeline.decode_failures()
  it = input_pipeline.eval_iterator(
    dataset=f"folder:{root}",
    data_dir=None,
    split=None,
    global_batch_size=4,
    image_size=16,
    family="v2",
  )
  batches = list(it)
  assert it.decode_failures == 1 and input_pipeline.decode_failures() == before + 1
  assert sum(b["mask"].sum() for b in batches) == 9  # 10 files, 1 corrupt
  for b in batches:
    for image, label, mask in zip(b["image"], b["label"], b["mask"]):
      if mask:
        assert _class_of(image, levels) == label  # a skipped record never shifts labels


def test_train_skips_corrupt_images_without_crashing(folder):
  root, levels = folder
  it = input_pipeline.train_iterator(
    dataset=f"folder:{root}",
    data_dir=None,
    split=None,
    global_batch_size=4,
    image_size=16,
    family="v2",
    augment=Augment(magnitude=0.0),
    seed=0,
  )
  batches = [next(it) for _ in range(13)]  # 13 files per epoch, 12 decodable -> 4 epochs
  # One bad record per epoch; a 5th-epoch one is counted once a later record is delivered.
  assert it.decode_failures in (4, 5)
  for b in batches:
    for image, label in zip(b["image"], b["label"]):
      assert _class_of(image, levels) == label


def test_base_family_with_autoaugment_on_tiny_images(fm_dir):
  it = _train(fm_dir, family="v2-base", augment=Augment(autoaugment=True), image_size=16)
  b = next(it)
  assert b["image"].shape == (8, 16, 16, 3) and np.isfinite(b["image"]).all()


def test_bad_arguments(fm_dir):
  with pytest.raises(ValueError, match="family"):
    _train(fm_dir, family="v3")
  with pytest.raises(ValueError, match="divisible"):
    _train(fm_dir, global_batch_size=9, process_count=2)


def test_base_family_decodes_and_crops_jpegs_in_the_pipeline(folder):
  # v2-base takes the decode_and_crop_jpeg path for the JPEGs (RGB, grey, CMYK), decode + slice for
  # the PNGs, and still drops the corrupt file (a JPEG header followed by garbage).
  root, levels = folder
  mean = np.array(preprocess.IMAGENET_MEAN_RGB)
  std = np.array(preprocess.IMAGENET_STD_RGB)

  def class_of(image):
    level = (image * std + mean).mean()
    return min(range(len(levels)), key=lambda c: abs(sorted(levels.values())[c] - level))

  it = input_pipeline.eval_iterator(
    dataset=f"folder:{root}",
    data_dir=None,
    split=None,
    global_batch_size=4,
    image_size=16,
    family="v2-base",
  )
  batches = list(it)
  assert it.decode_failures == 1 and sum(b["mask"].sum() for b in batches) == 9
  for b in batches:
    for image, label, mask in zip(b["image"], b["label"], b["mask"]):
      if mask:
        assert class_of(image) == label
  train = input_pipeline.train_iterator(
    dataset=f"folder:{root}",
    data_dir=None,
    split=None,
    global_batch_size=4,
    image_size=16,
    family="v2-base",
    augment=Augment(autoaugment=True),
    seed=0,
  )
  for _ in range(3):
    b = next(train)
    assert b["image"].shape == (4, 16, 16, 3) and np.isfinite(b["image"]).all()

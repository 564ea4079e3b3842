"""Offline Fashion-MNIST preparation and the dataset registry's errors."""

import gzip
import os
import struct

import numpy as np
import pytest

from effnetv2_jax.data import datasets
from effnetv2_jax.data import prepare


def write_idx_set(directory, num_train=12, num_test=5, seed=0):
  """Writes the four Fashion-MNIST idx files (gzip, big-endian headers) with random content."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  data = {}
  for split, prefix, n in (("train", "train", num_train), ("test", "t10k", num_test)):
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    with gzip.open(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), "wb") as f:
      f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
    with gzip.open(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as f:
      f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    data[split] = (images, labels)
  return data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  src = str(tmp_path_factory.mktemp("idx"))
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  data = write_idx_set(src)
  prepare.prepare_fashion_mnist(data_dir=data_dir, source_dir=src)
  return data_dir, data


def test_prepared_fashion_mnist_loads_with_standard_tfds_builder(prepared):
  import tensorflow_datasets as tfds

  data_dir, data = prepared
  builder = tfds.builder("fashion_mnist", data_dir=data_dir)
  assert builder.is_prepared()
  assert str(builder.info.version) == "3.0.1"  # the standard builder's version, not a fork
  assert builder.info.features["label"].names[0] == "T-shirt/top"
  for split in ("train", "test"):
    ds = tfds.load("fashion_mnist", split=split, data_dir=data_dir)
    got = {(ex["image"].numpy().tobytes(), int(ex["label"])) for ex in ds}
    images, labels = data[split]
    want = {(img[..., None].tobytes(), int(lbl)) for img, lbl in zip(images, labels)}
    assert got == want  # every image kept its own label
  datasets.check_prepared("fashion_mnist", data_dir)  # does not raise


def test_prepare_rejects_wrong_magic(tmp_path):
  write_idx_set(str(tmp_path))
  with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
    f.write(struct.pack(">II", 2051, 5) + bytes(5))
  with pytest.raises(ValueError, match="2049"):
    prepare.prepare_fashion_mnist(data_dir=str(tmp_path / "out"), source_dir=str(tmp_path))


def test_prepare_names_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
    prepare.prepare_fashion_mnist(data_dir=str(tmp_path / "out"), source_dir=str(tmp_path))


def test_unknown_dataset_lists_known_names():
  with pytest.raises(ValueError) as e:
    datasets.get_dataset_info("imagenet")
  for name in ("imagenet2012", "fashion_mnist", "cifar10", "folder:"):
    assert name in str(e.value)


def test_not_prepared_messages_say_how(tmp_path):
  with pytest.raises(datasets.DatasetNotPreparedError) as e:
    datasets.check_prepared("fashion_mnist", str(tmp_path))
  assert "python -m effnetv2_jax.data.prepare fashion_mnist" in str(e.value)
  assert isinstance(e.value, RuntimeError)
  with pytest.raises(datasets.DatasetNotPreparedError) as e:
    datasets.check_prepared("imagenet2012", str(tmp_path))
  msg = str(e.value)
  assert "ILSVRC2012_img_train.tar" in msg and "tfds build imagenet2012" in msg
  assert os.path.join(str(tmp_path), "downloads", "manual") in msg
  with pytest.raises(datasets.DatasetNotPreparedError, match="does not exist"):
    datasets.check_prepared(f"folder:{tmp_path}/nope")


def test_registry_facts():
  info = datasets.get_dataset_info("imagenet2012_minival")
  assert (info.tfds_name, info.train_split, info.eval_split) == (
    "imagenet2012",
    "train[:-25021]",
    "train[-25021:]",
  )
  assert info.num_train + info.num_eval == datasets.get_dataset_info("imagenet2012").num_train
  assert datasets.get_dataset_info("fashion_mnist").num_classes == 10
  assert datasets.get_dataset_info("cifar100").num_classes == 100


def test_folder_dataset_classes_sorted_and_splits(tmp_path):
  for split, classes in (("train", ("b", "a", "c")), ("val", ("a", "c"))):
    for c in classes:
      os.makedirs(tmp_path / split / c)
      (tmp_path / split / c / "x.jpg").write_bytes(b"")
  info = datasets.get_dataset_info(f"folder:{tmp_path}")
  assert info.class_names == ("a", "b", "c") and info.num_classes == 3
  assert (info.train_split, info.eval_split, info.num_train, info.num_eval) == (
    "train",
    "val",
    3,
    2,
  )
  paths, labels = datasets.folder_files(info.folder_root, "val", info.class_names)
  assert [os.path.basename(os.path.dirname(p)) for p in paths] == ["a", "c"] and labels == [0, 2]


# --- the official ImageNet splits are known without the data -------------------------------------
def test_split_num_examples_knows_the_official_imagenet_splits_without_data(tmp_path):
  for data_dir in (None, str(tmp_path)):  # tmp_path: an empty data_dir, nothing prepared
    n = lambda split, name="imagenet2012": datasets.split_num_examples(name, split, data_dir)  # noqa: E731
    assert n(datasets.IMAGENET_TRAIN_MINUS_MINIVAL) == 1_256_144
    assert n(datasets.IMAGENET_MINIVAL) == 25_021
    assert n(datasets.IMAGENET_VALIDATION) == 50_000
    assert n(datasets.IMAGENET_TRAIN) == 1_281_167
    assert n(datasets.IMAGENET_MINIVAL, "imagenet2012_minival") == 25_021
    assert n("train[:-25021]") == 1_256_146  # imagenet2012_minival's train split
    assert n("train", "cifar10") == 50_000 and n("test", "cifar10") == 10_000
  assert datasets.IMAGENET_TRAIN_MINUS_MINIVAL == "train[:1256144]"
  assert datasets.IMAGENET_MINIVAL == "train[-25021:]"
  # Disjoint: train ends at 1,256,144, minival starts at 1,281,167 - 25,021 = 1,256,146.
  assert datasets.IMAGENET_OFFICIAL_TRAIN_SIZE <= datasets.IMAGENET_TRAIN_SIZE - 25_021
  # A split string the registry does not know needs the prepared data.
  with pytest.raises(Exception):
    datasets.split_num_examples("imagenet2012", "train[:10%]", str(tmp_path))


def test_split_num_examples_falls_back_to_the_prepared_data(prepared):
  data_dir, _ = prepared
  assert datasets.split_num_examples("fashion_mnist", "train[:5]", data_dir) == 5
  assert datasets.split_num_examples("fashion_mnist", "train+test", data_dir) == 17
  assert datasets.split_num_examples("fashion_mnist", "test", data_dir) == 10_000  # the registry's


# --- lookups are cached: a folder tree is listed once per process ---------------------------------
def test_folder_tree_is_listed_once(tmp_path, monkeypatch):
  for split, per_class in (("train", 3), ("val", 2), ("test", 1)):
    for c in ("a", "b"):
      os.makedirs(tmp_path / split / c)
      for i in range(per_class):
        (tmp_path / split / c / f"{i}.jpg").write_bytes(b"")
  listed = []
  real = os.listdir
  monkeypatch.setattr(os, "listdir", lambda p: listed.append(os.fspath(p)) or real(p))
  datasets.clear_cache()
  name = f"folder:{tmp_path}"
  info = datasets.get_dataset_info(name)
  assert (info.num_train, info.num_eval) == (6, 4)
  for _ in range(3):
    assert datasets.get_dataset_info(name) is info
    assert datasets.get_dataset_info(name, None) is info
    assert datasets.split_size(info, "train") == 6 and datasets.split_size(info, "val") == 4
    assert datasets.split_num_examples(name, "train") == 6
    assert datasets.split_num_examples(name, "test") == 2
    datasets.check_prepared(name)
    assert datasets.folder_files(info.folder_root, "val", info.class_names)[1] == [0, 0, 1, 1]
  assert len(listed) == len(set(listed))  # no directory listed twice
  root = str(tmp_path)
  want = {root} | {os.path.join(root, s) for s in ("train", "val", "test")}
  want |= {os.path.join(root, s, c) for s in ("train", "val", "test") for c in ("a", "b")}
  assert set(listed) == want
  # clear_cache forgets: a file added on disk shows up afterwards.
  (tmp_path / "train" / "a" / "new.jpg").write_bytes(b"")
  assert datasets.get_dataset_info(name).num_train == 6
  datasets.clear_cache()
  assert datasets.get_dataset_info(name).num_train == 7


# --- the "not prepared" message names the TFDS data dir --------------------------------------------
def test_not_prepared_message_names_the_default_tfds_dir():
  default_root = os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  import tensorflow_datasets as tfds

  if tfds.builder("cars196").is_prepared():
    pytest.skip("cars196 is prepared in the default data dir of this machine")
  with pytest.raises(datasets.DatasetNotPreparedError) as e:
    datasets.check_prepared("cars196")
  msg = str(e.value)
  assert f"is not prepared in {default_root!r}" in msg
  assert f"--data_dir={default_root}`" in msg
  assert f"in {os.path.dirname(default_root)!r}" not in msg  # the old message: one level too high


def test_data_dir_root_of_a_builder_config():
  # Builders with a config (imagenet2012_subset/1pct) sit one level deeper: name/config/version.
  class Old:  # a TFDS without `data_dir_root`
    data_dir = "/data/tfds/imagenet2012_subset/1pct/5.0.0"

    class info:  # noqa: N801
      full_name = "imagenet2012_subset/1pct/5.0.0"

  assert datasets._data_dir_root(Old()) == "/data/tfds"  # pylint: disable=protected-access
  Old.data_dir, Old.info.full_name = "/data/tfds/fashion_mnist/3.0.1", "fashion_mnist/3.0.1"
  assert datasets._data_dir_root(Old()) == "/data/tfds"  # pylint: disable=protected-access


# --- the CLI prints one line per split and a summary ---------------------------------------------
def test_prepare_cli_prints_one_line_per_split(tmp_path):
  import subprocess
  import sys

  import _train_fixtures as fx

  src, data_dir = str(tmp_path / "idx"), str(tmp_path / "tfds")
  write_idx_set(src, num_train=30, num_test=7)
  cmd = [
    sys.executable,
    "-m",
    "effnetv2_jax.data.prepare",
    "fashion_mnist",
    f"--data_dir={data_dir}",
    f"--source_dir={src}",
  ]
  out = subprocess.run(
    cmd, capture_output=True, text=True, cwd=fx.REPO, env=fx.subprocess_env(), timeout=300
  )
  assert out.returncode == 0, out.stderr
  path = os.path.join(data_dir, "fashion_mnist", "3.0.1")
  assert out.stdout.splitlines() == [
    "fashion_mnist train: 30 examples",
    "fashion_mnist test: 7 examples",
    f"prepared fashion_mnist in {path}: 2 splits, 37 examples",
  ]
  assert out.stderr == ""  # no progress bars, TFDS prints or absl/TF log lines
  again = subprocess.run(
    cmd, capture_output=True, text=True, cwd=fx.REPO, env=fx.subprocess_env(), timeout=300
  )
  assert again.stdout.splitlines()[-1].startswith("already prepared fashion_mnist in ")
  assert again.stderr == ""

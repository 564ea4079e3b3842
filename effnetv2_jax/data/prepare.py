"""Prepare datasets offline.

  python -m effnetv2_jax.data.prepare fashion_mnist [--data_dir=DIR] [--source_dir=DIR]

Fashion-MNIST is the demo's embedded dataset. TFDS' own builder downloads the four idx files from the
internet; here the *standard* builder (same features, version, split names, so `tfds.load('fashion_mnist')`
works afterwards) runs with its download step redirected to local idx files, by default those of Debian's
`dataset-fashion-mnist` package. Only the download is replaced: parsing and writing stay TFDS' own code,
so the result is byte-for-byte what a networked `tfds build fashion_mnist` produces from the same files.

The builder hard-codes 60,000/10,000 examples; the counts are taken from the idx headers instead so a
small generated idx set (tests) builds too. Debian's files give exactly 60,000/10,000.

Output: one line per split and a summary line. TFDS' progress bars, its own prints and absl/TF
logging below ERROR are silenced while the builder runs (they were ~60 lines in the first minute).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging as py_logging
import os
import shutil
import struct
import sys
import tempfile
from unittest import mock

from absl import app, flags, logging

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_FILES = {  # key used by TFDS' mnist builder -> file name
  "train_data": "train-images-idx3-ubyte.gz",
  "train_labels": "train-labels-idx1-ubyte.gz",
  "test_data": "t10k-images-idx3-ubyte.gz",
  "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049  # idx3 uint8 images, idx1 uint8 labels

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "data_dir", None, "TFDS data_dir to write to (default: TFDS default, ~/tensorflow_datasets)."
)
flags.DEFINE_string(
  "source_dir", DEBIAN_FASHION_MNIST_DIR, "Directory with the four *-ubyte.gz idx files."
)


def _open_idx(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx_header(path: str) -> tuple[int, tuple[int, ...]]:
  """(magic, dims) of an idx file; raises ValueError naming the file if it is not one."""
  with _open_idx(path) as f:
    head = f.read(4)
    if len(head) < 4:
      raise ValueError(f"{path}: too short to be an idx file")
    magic = struct.unpack(">I", head)[0]
    ndim = magic & 0xFF
    raw = f.read(4 * ndim)
  # A truncated header yields no dims; the caller's magic/shape checks then report the file.
  dims = struct.unpack(f">{ndim}I", raw) if len(raw) == 4 * ndim else ()
  return magic, dims


def _check_sources(source_dir: str) -> dict[str, int]:
  """Validates the four idx files; returns {'train': n, 'test': n}."""
  missing = [n for n in _IDX_FILES.values() if not os.path.exists(os.path.join(source_dir, n))]
  if missing:
    raise FileNotFoundError(
      f"Fashion-MNIST idx files missing in {source_dir!r}: {missing}. Install Debian's "
      "`dataset-fashion-mnist` package or pass --source_dir=DIR holding the four *-ubyte.gz files."
    )
  counts = {}
  for split in ("train", "test"):
    img_path = os.path.join(source_dir, _IDX_FILES[f"{split}_data"])
    lbl_path = os.path.join(source_dir, _IDX_FILES[f"{split}_labels"])
    img_magic, img_dims = read_idx_header(img_path)
    lbl_magic, lbl_dims = read_idx_header(lbl_path)
    if img_magic != _IMAGES_MAGIC or len(img_dims) != 3 or tuple(img_dims[1:]) != (28, 28):
      raise ValueError(
        f"{img_path}: expected idx3 uint8 28x28 images (magic {_IMAGES_MAGIC}), got "
        f"magic {img_magic} dims {img_dims}"
      )
    if lbl_magic != _LABELS_MAGIC:
      raise ValueError(
        f"{lbl_path}: expected idx1 uint8 labels (magic {_LABELS_MAGIC}), got {lbl_magic}"
      )
    if not img_dims or not lbl_dims or img_dims[0] != lbl_dims[0]:
      raise ValueError(f"{split}: {img_dims[0]} images but {lbl_dims[0]} labels")
    counts[split] = img_dims[0]
  return counts


def _shim_importlib_resources():
  """TFDS 4.9.10 uses the `importlib_resources` backport when building, but only declares it for
  Python < 3.9. On 3.9+ the stdlib module has the same API, so alias it instead of failing."""
  try:
    import importlib_resources  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    import importlib.abc  # noqa: F401  (makes importlib.resources.abc importable on 3.11)
    import importlib.resources
    import importlib.resources.abc  # noqa: F401

    sys.modules["importlib_resources"] = importlib.resources


@contextlib.contextmanager
def quiet_build():
  """While a TFDS builder runs: no progress bars, no TFDS prints (its 'Downloading and preparing'
  and 'Dataset ... downloaded and prepared' lines go to stdout), absl and TF Python logging at ERROR.
  Everything is restored afterwards; what TFDS printed is replayed to stderr if the build fails."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.utils import tqdm_utils

  bars = getattr(tqdm_utils, "_active", True)
  verbosity = logging.get_verbosity()
  tf_logger = py_logging.getLogger("tensorflow")
  tf_level = tf_logger.level
  printed = io.StringIO()
  tfds.display_progress_bar(False)
  logging.set_verbosity(logging.ERROR)
  tf_logger.setLevel(py_logging.ERROR)
  try:
    with contextlib.redirect_stdout(printed):
      yield
  except BaseException:
    sys.stderr.write(printed.getvalue())
    raise
  finally:
    tfds.display_progress_bar(bars)
    logging.set_verbosity(verbosity)
    tf_logger.setLevel(tf_level)


def prepare_fashion_mnist(
  data_dir: str | None = None,
  source_dir: str = DEBIAN_FASHION_MNIST_DIR,
  num_shards: int | None = None,
) -> str:
  """Builds TFDS' fashion_mnist from local idx files; returns the dataset directory written.

  `num_shards`: files per split (None: TFDS' choice, one for Fashion-MNIST); tests use several."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.image_classification import mnist as tfds_mnist

  counts = _check_sources(source_dir)
  _shim_importlib_resources()
  builder = tfds.builder("fashion_mnist", data_dir=data_dir)
  if builder.is_prepared():
    return builder.data_dir

  with tempfile.TemporaryDirectory(prefix="fashion_mnist_idx_") as tmp:
    # TFDS' parser reads *extracted* files (download_and_extract gunzips them), so gunzip here too.
    extracted = {}
    for key, fname in _IDX_FILES.items():
      dst = os.path.join(tmp, fname[:-3])
      with _open_idx(os.path.join(source_dir, fname)) as src, open(dst, "wb") as out:
        shutil.copyfileobj(src, out)
      extracted[key] = dst

    def local_download_and_extract(self, url_or_urls):
      del self
      # The builder asks for {key: url}; answer each key with its local file, whatever the URL.
      return {key: extracted[key] for key in url_or_urls}

    with (
      mock.patch.object(
        tfds.download.DownloadManager, "download_and_extract", local_download_and_extract
      ),
      mock.patch.object(tfds_mnist, "_TRAIN_EXAMPLES", counts["train"]),
      mock.patch.object(tfds_mnist, "_TEST_EXAMPLES", counts["test"]),
      quiet_build(),
    ):
      builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False, num_shards=num_shards)
      )
  return builder.data_dir


_PREPARERS = {"fashion_mnist": prepare_fashion_mnist}


def prepare(name: str, data_dir: str | None = None, source_dir: str = DEBIAN_FASHION_MNIST_DIR):
  """Prepares `name` and prints one line per split and a summary; returns the dataset directory."""
  import tensorflow_datasets as tfds

  with quiet_build():  # the builder lookups log "no dataset_info.json" warnings too
    already = tfds.builder(name, data_dir=data_dir).is_prepared()
    path = _PREPARERS[name](data_dir=data_dir, source_dir=source_dir)
    splits = tfds.builder(name, data_dir=data_dir).info.splits
  for split in splits:
    print(f"{name} {split}: {splits[split].num_examples:,} examples", flush=True)
  total = sum(s.num_examples for s in splits.values())
  state = "already prepared" if already else "prepared"
  print(f"{state} {name} in {path}: {len(splits)} splits, {total:,} examples", flush=True)
  return path


def main(argv):
  if len(argv) != 2 or argv[1] not in _PREPARERS:
    raise app.UsageError(
      f"usage: python -m effnetv2_jax.data.prepare {{{'|'.join(_PREPARERS)}}} "
      "[--data_dir=DIR] [--source_dir=DIR]"
    )
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads
  # TensorFlow's C++ library still prints its load-time notes (oneDNN) to stderr whatever the
  # level: hold stderr back, at the file-descriptor level, and show it only if preparing fails.
  with _stderr_held_back():
    prepare(argv[1], data_dir=FLAGS.data_dir, source_dir=FLAGS.source_dir)


@contextlib.contextmanager
def _stderr_held_back():
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    except BaseException:
      sys.stderr.flush()
      os.dup2(saved, 2)
      held.seek(0)
      os.write(2, held.read())
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


if __name__ == "__main__":
  app.run(main)

"""tf.data input pipeline: per-process shards, stage-dependent preprocessing, exact resume and eval.

Train order and augmentation are pure functions of (seed, global step, process):
  * each process reads its own contiguous slice of the split (`tfds.even_splits`, or the same
    arithmetic on a folder's sorted file list), chosen by the process_index/process_count arguments;
  * epoch e of that slice is the raw record stream shuffled with a seed derived from (seed, e, process);
  * local example position p (0, 1, 2, ... across epochs) lands in local batch p // B_local, i.e. global
    step t = p // B_local, and every random op for that example is seeded from (seed, global example
    position) with stateless TF ops.
So `start_step=k` computes p0 = k * B_local, skips whole epochs arithmetically and `p0 % n` raw records
(still encoded: skipping costs no decoding), and yields exactly the batches an uninterrupted iterator
yields from step k on. Exception: records that fail to decode are dropped (and counted), which shifts
the later examples of that epoch into earlier batches; a resume then matches only if no record
failed before the resume point within its epoch. TFDS datasets were decoded once when built, so in
practice this concerns image folders with corrupt files.

Decode failures: the record's local position travels with it; after the failing record is dropped
(`ignore_errors`), the host iterator sees a gap in positions and counts it (`decode_failures()`).
"""

from __future__ import annotations

import threading

import numpy as np
import tensorflow as tf

from effnetv2_jax.data import datasets
from effnetv2_jax.data import preprocess
from effnetv2_jax.data.augment import Augment

NO_AUGMENT = Augment()

_POS = "_pos"  # position of an example in this process' stream; -1 marks eval padding
_INF = np.iinfo(np.int64).max


class DecodeStats:
  """Thread-safe count of records skipped because they failed to read/decode/preprocess."""

  def __init__(self):
    self._lock = threading.Lock()
    self.failures = 0

  def add(self, n: int, log: bool = False) -> None:
    if n > 0:
      with self._lock:
        self.failures += n
        total = self.failures
      if log:
        tf.get_logger().warning(
          "input pipeline: skipped %d undecodable image(s) (%d in this process so far)", n, total
        )


_TOTAL = DecodeStats()


def decode_failures() -> int:
  """Records skipped by every iterator of this process so far (log this with the step metrics)."""
  return _TOTAL.failures


class BatchIterator:
  """Host-side iterator of numpy batches; strips the position key and counts skipped records."""

  def __init__(self, ds: tf.data.Dataset, first_pos: int, n_local: int | None = None):
    self._it = ds.as_numpy_iterator()
    self._next_pos = first_pos
    self._n_local = n_local  # eval only: lets the last batch account for trailing failures
    self.stats = DecodeStats()

  @property
  def decode_failures(self) -> int:
    return self.stats.failures

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    try:
      batch = next(self._it)
    except StopIteration:
      if self._n_local is not None:
        self._count(self._n_local - self._next_pos)
        self._next_pos = self._n_local
      raise
    pos = batch.pop(_POS)
    real = pos[pos >= 0]
    if real.size:
      self._count(int(real.max()) + 1 - self._next_pos - real.size)
      self._next_pos = int(real.max()) + 1
    return batch

  def _count(self, n):
    if n > 0:
      self.stats.add(n)
      _TOTAL.add(n, log=True)  # the warning reaches the logs even if the caller never asks


# ---------------------------------------------------------------------------------------- sources
def _shard_bounds(n: int, index: int, count: int) -> tuple[int, int]:
  """Same contiguous, near-equal slicing as tfds.even_splits (first n % count shards get one more)."""
  return n * index // count, n * (index + 1) // count


def _source(info, data_dir, split, process_index, process_count, cache):
  """(raw dataset of {'raw', 'label'}, load_fn raw->bytes, local sizes of every process)."""
  if info.is_folder:
    paths, labels = datasets.folder_files(info.folder_root, split, info.class_names)
    sizes = [
      b - a for a, b in (_shard_bounds(len(paths), i, process_count) for i in range(process_count))
    ]
    lo, hi = _shard_bounds(len(paths), process_index, process_count)
    ds = tf.data.Dataset.from_tensor_slices(
      {"raw": tf.constant(paths[lo:hi], tf.string), "label": tf.constant(labels[lo:hi], tf.int64)}
    )
    return (ds.cache() if cache else ds), tf.io.read_file, sizes
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  datasets.check_prepared(info.name, data_dir)
  builder = tfds.builder(info.tfds_name, data_dir=data_dir)
  subsplits = tfds.even_splits(split, n=process_count)
  sizes = [builder.info.splits[s].num_examples for s in subsplits]
  # Files in a fixed order (the shuffle below is ours, seeded); images stay encoded until after
  # skip/shuffle so resuming and the shuffle buffer handle small byte strings, not pixels.
  ds = builder.as_dataset(
    split=subsplits[process_index],
    shuffle_files=False,
    decoders={"image": tfds.decode.SkipDecoding()},
  )
  ds = ds.map(lambda ex: {"raw": ex["image"], "label": ex["label"]})
  return (ds.cache() if cache else ds), (lambda raw: raw), sizes


def _options(private_threadpool_size):
  options = tf.data.Options()
  options.deterministic = True
  # One op per element at a time: parallelism comes from the map's parallel calls, and a small
  # private pool keeps TF from competing with XLA for every core of a small host.
  options.threading.max_intra_op_parallelism = 1
  if private_threadpool_size:
    options.threading.private_threadpool_size = private_threadpool_size
  return options


def _check(global_batch_size, process_index, process_count, family):
  preprocess.check_family(family)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}"
    )
  return global_batch_size // process_count


def _epoch_seed(seed, epoch, process_index):
  # Distinct, reproducible shuffle per (seed, epoch, process); int64 arithmetic in the graph.
  return (tf.cast(seed, tf.int64) * 1_000_003 + epoch) * 1_009 + process_index


# ------------------------------------------------------------------------------------------ train
def train_iterator(
  *,
  dataset: str,
  data_dir: str | None,
  split: str | None,
  global_batch_size: int,
  image_size: int,
  family: str,
  augment: Augment = NO_AUGMENT,
  seed: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  shuffle_buffer: int = 16384,
  cache: bool = False,
  num_parallel_calls: int = tf.data.AUTOTUNE,
  private_threadpool_size: int | None = None,
  prefetch_batches: int = 2,
) -> BatchIterator:
  """Infinite iterator of this process' share of each global batch: {'image' float32 [B,H,W,3]
  normalised, 'label' int32 [B]}, B = global_batch_size // process_count. See the module docstring
  for the determinism/resume contract. `.decode_failures` counts skipped records.

  `augment`: the stage's augmentation (`augment.for_stage(config, stage)`; default none).
  num_parallel_calls, private_threadpool_size, prefetch_batches: tf.data tuning only, never results.
  """
  if not isinstance(augment, Augment):
    raise TypeError(f"augment must be an augment.Augment, got {type(augment).__name__}")
  b_local = _check(global_batch_size, process_index, process_count, family)
  info = datasets.get_dataset_info(dataset, data_dir)
  split = split or info.train_split
  raw, load, sizes = _source(info, data_dir, split, process_index, process_count, cache)
  n_local = sizes[process_index]
  if n_local == 0:
    raise ValueError(
      f"{dataset}:{split} has no examples for process {process_index}/{process_count}"
    )
  first_pos = start_step * b_local
  first_epoch, first_skip = divmod(first_pos, n_local)
  buffer = max(1, min(shuffle_buffer, n_local))

  def epoch(e):
    shuffled = raw.shuffle(
      buffer, seed=_epoch_seed(seed, e, process_index), reshuffle_each_iteration=False
    )
    return shuffled.skip(tf.where(e == first_epoch, tf.constant(first_skip, tf.int64), 0))

  ds = tf.data.Dataset.range(first_epoch, _INF).flat_map(epoch)
  ds = ds.enumerate(start=first_pos)
  base_seed = tf.constant([seed, 0x5EED], tf.int64)

  def process(pos, ex):
    step, slot = pos // b_local, pos % b_local
    global_pos = step * global_batch_size + process_index * b_local + slot
    ex_seed = tf.random.experimental.stateless_fold_in(base_seed, global_pos)
    image = preprocess.train_image(
      load(ex["raw"]), image_size=image_size, family=family, seed=ex_seed, augment=augment
    )
    return {"image": image, "label": tf.cast(ex["label"], tf.int32), _POS: pos}

  ds = ds.map(process, num_parallel_calls=num_parallel_calls).ignore_errors()
  ds = ds.batch(b_local, drop_remainder=True).prefetch(prefetch_batches)
  return BatchIterator(ds.with_options(_options(private_threadpool_size)), first_pos)


# ------------------------------------------------------------------------------------------- eval
def num_eval_batches(sizes: list[int], local_batch: int) -> int:
  """Every process runs the same number of eval steps: enough for the largest shard."""
  return max(-(-max(sizes) // local_batch), 1)


def eval_iterator(
  *,
  dataset: str,
  data_dir: str | None,
  split: str | None,
  global_batch_size: int,
  image_size: int,
  family: str,
  process_index: int = 0,
  process_count: int = 1,
  max_examples: int | None = None,
  shuffle_seed: int | None = None,
  shuffle_buffer: int = 16384,
  num_parallel_calls: int = tf.data.AUTOTUNE,
  private_threadpool_size: int | None = None,
  prefetch_batches: int = 2,
) -> BatchIterator:
  """One pass of {'image', 'label', 'mask'}; padding examples have mask 0 (and label 0) so the sum of
  masks over all processes equals the split size (minus skipped undecodable records, if any).

  `max_examples` = N (None or 0: all): a fixed subset of N examples, the same on every call: each
  process takes the first n_i records of its shard, n_i its share of N split as the split itself
  is (`_shard_bounds`), so the masks sum to N (to the split size when N is larger), and on one
  process the subset is the split's first N. `shuffle_seed`: shuffle the records first (seeded,
  `shuffle_buffer` of them at a time, once: every call sees the same order), e.g. to draw
  BatchNorm-recalibration images from a class-sorted train split with the eval preprocessing.
  """
  b_local = _check(global_batch_size, process_index, process_count, family)
  info = datasets.get_dataset_info(dataset, data_dir)
  split = split or info.eval_split
  raw, load, sizes = _source(info, data_dir, split, process_index, process_count, cache=False)
  if shuffle_seed is not None and sizes[process_index]:
    buffer = max(1, min(int(shuffle_buffer), sizes[process_index]))
    seed = _epoch_seed(shuffle_seed, 0, process_index)
    raw = raw.shuffle(buffer, seed=seed, reshuffle_each_iteration=False)
  if max_examples:
    caps = [
      b - a
      for a, b in (_shard_bounds(int(max_examples), i, process_count) for i in range(process_count))
    ]
    sizes = [min(n, cap) for n, cap in zip(sizes, caps)]
    raw = raw.take(sizes[process_index])
  total = num_eval_batches(sizes, b_local) * b_local

  def process(pos, ex):
    image = preprocess.eval_image(load(ex["raw"]), image_size=image_size, family=family)
    return {
      "image": image,
      "label": tf.cast(ex["label"], tf.int32),
      "mask": tf.constant(1.0),
      _POS: pos,
    }

  ds = raw.enumerate().map(process, num_parallel_calls=num_parallel_calls).ignore_errors()
  pad = {
    "image": tf.zeros([image_size, image_size, 3], tf.float32),
    "label": tf.constant(0, tf.int32),
    "mask": tf.constant(0.0),
    _POS: tf.constant(-1, tf.int64),
  }
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat()).take(total)
  ds = ds.batch(b_local, drop_remainder=True).prefetch(prefetch_batches)
  return BatchIterator(
    ds.with_options(_options(private_threadpool_size)), 0, n_local=sizes[process_index]
  )

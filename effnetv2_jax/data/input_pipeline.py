"""tf.data input pipeline: per-process shards, stage-dependent preprocessing, exact resume and eval.

Train order and augmentation are pure functions of (seed, example position, process), not of the
batch size:
  * each process reads its own contiguous slice of the split (`tfds.even_splits`, or the same
    arithmetic on a folder's sorted file list), chosen by the process_index/process_count arguments;
  * epoch e of that slice is the raw record stream shuffled with a seed derived from (seed, e, process);
  * local example position p (0, 1, 2, ... across epochs) is the p-th example this process trains
    on, and every random op for that example is seeded from (seed, p * process_count +
    process_index) with stateless TF ops (on one process: from (seed, p)). Batches are consecutive
    runs of positions, whatever their size.
So `start_example=p0` (the examples of this process' stream already trained on) skips whole
epochs arithmetically and `p0 % n` raw records (still encoded: skipping costs no decoding), and
yields exactly the examples an uninterrupted iterator yields from position p0 on, in batches of
this iterator's size: a progressive stage with its own batch starts where the stage before it
stopped. `start_step=k` is `start_example=k * B_local` (one batch size throughout).

Damaged data (a record of a TFDS split that fails to read: a TFRecord checksum error, a truncated or
missing shard; see records.py): the record keeps its slot in the raw stream, so every other record
has the position, batch and augmentation a clean shard gives it, and a resume still matches. Train:
the slot trains on the nearest readable record of the same file instruction (a duplicate); eval: that
slot is masked out. Only a slot with no readable record in its whole file instruction (an unreadable
shard) is dropped, as an undecodable record is.

Records that fail to decode (image folders with corrupt files; TFDS images were decoded once when
built) are dropped (`ignore_errors`), which shifts the later examples of that epoch into earlier
batches; a resume then matches only if no record failed before the resume point within its epoch.
The record's local position travels with it, so the host iterator counts a dropped record from the
gap in positions.

Counting: both kinds are "skipped records", counted per role ('train', 'eval') when their slot is
delivered (`skipped_records()`, `skipped_by_shard()`; each pass over a damaged record counts again).
An iterator given `max_skipped_fraction` raises `CorruptDataError` (one line naming the worst shard)
once its skipped records exceed that share of max(records read, its records per epoch).

`Prefetcher` runs an iterator's `next()` in a thread so a consumer can wait in short slices (and see a
preemption request) while the input pipeline is slow or stalled.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

from effnetv2_jax.data import datasets
from effnetv2_jax.data import preprocess
from effnetv2_jax.data import records
from effnetv2_jax.data.augment import Augment

NO_AUGMENT = Augment()

_POS = "_pos"  # position of an example in this process' stream; -1 marks eval padding
_INF = np.iinfo(np.int64).max


_BAD = records.BAD  # index of the shard whose unreadable record this slot stands in for; -1: sound
_DROP = records.DROP  # a slot without any readable record to stand in for it: dropped at decoding
ROLES = ("train", "eval")


# Defined in the TF-free registry module so that the CLI can catch it without importing TF.
CorruptDataError = datasets.CorruptDataError


class SkipStats:
  """Thread-safe counts of skipped records: in total and per shard ('' = undecodable, no shard)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.total = 0
    self.by_shard: collections.Counter = collections.Counter()

  def add(self, n: int, shard: str = "") -> None:
    if n > 0:
      with self._lock:
        self.total += n
        self.by_shard[shard] += n

  def worst(self) -> tuple[str, int]:
    with self._lock:
      named = [(k, v) for k, v in self.by_shard.items() if k]
      return max(named, key=lambda kv: kv[1]) if named else ("", 0)


_ROLE_STATS = {role: SkipStats() for role in ROLES}


def skipped_records() -> dict[str, int]:
  """{'train': n, 'eval': n}: records skipped (unreadable or undecodable) by this process' iterators
  of each role so far; a damaged record counts each time its slot comes round. For the progress
  line, TensorBoard and results.json."""
  return {role: stats.total for role, stats in _ROLE_STATS.items()}


def skipped_by_shard() -> dict[str, dict[str, int]]:
  """{role: {shard file: skipped records}}; undecodable records, whose shard is not known, under ''."""
  return {role: dict(stats.by_shard) for role, stats in _ROLE_STATS.items()}


def damaged_shards() -> dict[str, int]:
  """{shard file: distinct unreadable records in it} for the damaged TFRecord files met so far."""
  return records.damaged_files()


def decode_failures() -> int:
  """Records skipped by every iterator of this process so far, all roles together (kept for the
  callers of the first version; `skipped_records()` splits it by role)."""
  return sum(skipped_records().values())


class BatchIterator:
  """Host-side iterator of numpy batches: strips the bookkeeping keys, counts skipped records (from
  position gaps and replaced slots) and enforces `max_skipped_fraction`."""

  def __init__(
    self,
    ds: tf.data.Dataset,
    first_pos: int,
    *,
    role: str,
    n_local: int,
    shards: list[str] | None = None,
    name: str = "",
    max_skipped_fraction: float | None = None,
    finite: bool = False,
  ):
    self._it = ds.as_numpy_iterator()
    self._first_pos = self._next_pos = first_pos
    self._n_local = n_local  # records per epoch of this process: the fraction's smallest base
    self._finite = finite  # eval: the last batch accounts for trailing skipped records
    self._shards = list(shards or [])
    self._role = role
    self._name = name
    self._limit = max_skipped_fraction
    self.stats = SkipStats()

  @property
  def skipped(self) -> int:
    return self.stats.total

  @property
  def decode_failures(self) -> int:  # the first version's name
    return self.stats.total

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    try:
      batch = next(self._it)
    except StopIteration:
      if self._finite:
        self._count(self._n_local - self._next_pos)
        self._next_pos = max(self._next_pos, self._n_local)
        self._check()
      raise
    pos = batch.pop(_POS)
    bad = batch.pop(_BAD)
    real = pos >= 0
    if real.any():
      self._count(int(pos[real].max()) + 1 - self._next_pos - int(real.sum()))
      self._next_pos = int(pos[real].max()) + 1
    for index, n in zip(*np.unique(bad[bad >= 0], return_counts=True)):
      self._count(int(n), self._shards[index])
    self._check()
    return batch

  def _count(self, n: int, shard: str = "") -> None:
    if n > 0:
      self.stats.add(n, shard)
      _ROLE_STATS[self._role].add(n, shard)
      if not shard:  # replaced slots were logged once per file by records.py
        tf.get_logger().warning(
          "input pipeline: skipped %d undecodable %s record(s) (%d skipped by this iterator)",
          n,
          self._role,
          self.stats.total,
        )

  def _check(self) -> None:
    if self._limit is None or not self.stats.total:
      return
    read = self._next_pos - self._first_pos
    base = max(read, self._n_local, 1)
    if self.stats.total <= self._limit * base:
      return
    shard, n = self.stats.worst()
    if not shard:  # only drops and decode failures so far: the damaged file the reader met
      damaged = {p: k for p, k in records.damaged_files().items() if p in self._shards}
      shard, n = max(damaged.items(), key=lambda kv: kv[1]) if damaged else ("", 0)
    where = f"worst shard {shard} ({n} skipped)" if shard else "undecodable images (no shard)"
    raise CorruptDataError(
      f"{self._name} {self._role} data: {self.stats.total} records skipped as unreadable or "
      f"undecodable in {read} read, more than max_skipped_fraction={self._limit:g} of {base}; "
      f"{where}: restore or rebuild the data, or raise max_skipped_fraction",
      role=self._role,
      shard=shard,
    )


# ---------------------------------------------------------------------------------------- sources
def _shard_bounds(n: int, index: int, count: int) -> tuple[int, int]:
  """Same contiguous, near-equal slicing as tfds.even_splits (first n % count shards get one more)."""
  return n * index // count, n * (index + 1) // count


_AUTOCACHE_BYTES = 250 << 20  # TFDS' own auto-cache limit (cifar10 is about 150 MiB)


def _source(info, data_dir, split, process_index, process_count, cache, autocache=False):
  """(raw dataset of {..., '_bad', '_drop'}, decode_fn raw element -> (encoded image, int64 label),
  local sizes of every process, the shard files '_bad' indexes). Images stay encoded (a folder's
  are paths) until after skip/shuffle, so resuming and the shuffle buffer handle small byte
  strings, and the decode_fn runs in the parallel map. `autocache`: cache a TFDS dataset of at
  most 250 MiB in memory as TFDS' own reader does (from the second epoch on nothing is read or
  checked again)."""
  if info.is_folder:
    paths, labels = datasets.folder_files(info.folder_root, split, info.class_names)
    sizes = [
      b - a for a, b in (_shard_bounds(len(paths), i, process_count) for i in range(process_count))
    ]
    lo, hi = _shard_bounds(len(paths), process_index, process_count)
    n = hi - lo
    ds = tf.data.Dataset.from_tensor_slices(
      {
        "raw": tf.constant(paths[lo:hi], tf.string),
        "label": tf.constant(labels[lo:hi], tf.int64),
        _BAD: tf.fill([n], tf.constant(-1, tf.int32)),
        _DROP: tf.zeros([n], tf.bool),
      }
    )
    decode = lambda ex: (tf.io.read_file(ex["raw"]), ex["label"])  # noqa: E731
    return (ds.cache() if cache else ds), decode, sizes, []
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  datasets.check_prepared(info.name, data_dir)
  builder = tfds.builder(info.tfds_name, data_dir=data_dir)
  subsplits = tfds.even_splits(split, n=process_count)
  sizes = [builder.info.splits[s].num_examples for s in subsplits]
  if records.is_tfrecord(builder):
    ds, shards = records.split_records(builder, subsplits[process_index], ("image", "label"))
    decode = lambda ex: (ex["image"], ex["label"])  # noqa: E731
  else:  # another file format: TFDS' reader (without the cardinality check that livelocks)
    ds = builder.as_dataset(
      split=subsplits[process_index],
      shuffle_files=False,
      decoders={"image": tfds.decode.SkipDecoding()},  # images are decoded by preprocess
      read_config=tfds.ReadConfig(assert_cardinality=False),
    )
    ds = ds.map(
      lambda ex: {
        "raw": ex["image"],
        "label": ex["label"],
        _BAD: tf.constant(-1, tf.int32),
        _DROP: tf.constant(False),
      }
    )
    decode = lambda ex: (ex["raw"], tf.cast(ex["label"], tf.int64))  # noqa: E731
    shards = []
  size = int(builder.info.dataset_size or 0)
  cache = cache or (autocache and 0 < size <= _AUTOCACHE_BYTES)
  return (ds.cache() if cache else ds), decode, sizes, shards


def _decoded(decode, ex):
  """decode(ex), failing for a `_drop` slot first, so that the `ignore_errors` after the map drops
  it like an undecodable record (no extra per-record stage for a case that is almost never there)."""
  keep = tf.debugging.assert_equal(ex[_DROP], False, message="unreadable record dropped")
  with tf.control_dependencies([keep]):
    return decode(ex)


@dataclasses.dataclass(frozen=True)
class Tuning:
  """tf.data knobs that change speed, never results: parallel decode calls, the private thread
  pool's size (None: TF's default), batches prefetched."""

  num_parallel_calls: int = tf.data.AUTOTUNE
  private_threadpool_size: int | None = None
  prefetch_batches: int = 2

  def options(self) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    # One op per element at a time: parallelism comes from the map's parallel calls, and a small
    # private pool keeps TF from competing with XLA for every core of a small host.
    options.threading.max_intra_op_parallelism = 1
    if self.private_threadpool_size:
      options.threading.private_threadpool_size = self.private_threadpool_size
    return options


DEFAULT_TUNING = Tuning()


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
  start_example: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
  shuffle_buffer: int = 16384,
  cache: bool = False,
  max_skipped_fraction: float | None = None,
  tuning: Tuning = DEFAULT_TUNING,
) -> BatchIterator:
  """Infinite iterator of this process' share of each global batch: {'image' float32 [B,H,W,3]
  normalised, 'label' int32 [B]}, B = global_batch_size // process_count. See the module docstring
  for the determinism/resume contract and damaged records. `.skipped` counts skipped records.

  `augment`: the stage's augmentation (`augment.for_stage(config, stage)`; default none).
  `start_example`: the local position to start from (this process' examples already trained on);
  None: `start_step * B`. Give one of the two.
  `max_skipped_fraction`: raise CorruptDataError above this share of skipped records (None: never).
  `tuning`: tf.data speed knobs only (`Tuning`), never results.
  """
  if not isinstance(augment, Augment):
    raise TypeError(f"augment must be an augment.Augment, got {type(augment).__name__}")
  b_local = _check(global_batch_size, process_index, process_count, family)
  info = datasets.get_dataset_info(dataset, data_dir)
  split = split or info.train_split
  raw, decode, sizes, shards = _source(
    info, data_dir, split, process_index, process_count, cache, autocache=True
  )
  n_local = sizes[process_index]
  if n_local == 0:
    raise ValueError(
      f"{dataset}:{split} has no examples for process {process_index}/{process_count}"
    )
  if start_example is not None and start_step:
    raise ValueError("give start_step or start_example, not both")
  first_pos = int(start_step) * b_local if start_example is None else int(start_example)
  if first_pos < 0:
    raise ValueError(f"start_example must be >= 0, got {first_pos}")
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
    # Unique per (process, position) and independent of the batch size.
    global_pos = pos * process_count + process_index
    ex_seed = tf.random.experimental.stateless_fold_in(base_seed, global_pos)
    encoded, label = _decoded(decode, ex)
    image = preprocess.train_image(
      encoded, image_size=image_size, family=family, seed=ex_seed, augment=augment
    )
    return {"image": image, "label": tf.cast(label, tf.int32), _POS: pos, _BAD: ex[_BAD]}

  ds = ds.map(process, num_parallel_calls=tuning.num_parallel_calls).ignore_errors()
  ds = ds.batch(b_local, drop_remainder=True).prefetch(tuning.prefetch_batches)
  return BatchIterator(
    ds.with_options(tuning.options()),
    first_pos,
    role="train",
    n_local=n_local,
    shards=shards,
    name=f"{dataset}:{split}",
    max_skipped_fraction=max_skipped_fraction,
  )


# ------------------------------------------------------------------------------------------- eval
def num_eval_batches(sizes: list[int], local_batch: int) -> int:
  """Every process runs the same number of eval steps: enough for the largest shard."""
  return max(-(-max(sizes) // local_batch), 1)


def eval_iterator(
  *,
  dataset: str,
  data_dir: str | None,
  split: str | None,
  max_examples: int | None = None,
  global_batch_size: int,
  image_size: int,
  family: str,
  process_index: int = 0,
  process_count: int = 1,
  shuffle_seed: int | None = None,
  shuffle_buffer: int = 16384,
  max_skipped_fraction: float | None = None,
  tuning: Tuning = DEFAULT_TUNING,
) -> BatchIterator:
  """One pass of {'image', 'label', 'mask'}; padding examples have mask 0 (and label 0) so the sum of
  masks over all processes equals the split size minus the skipped records (unreadable ones are
  masked out in their slot, undecodable ones dropped). `max_skipped_fraction`: as train_iterator's.

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
  raw, decode, sizes, shards = _source(
    info, data_dir, split, process_index, process_count, cache=False
  )
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
    encoded, label = _decoded(decode, ex)
    image = preprocess.eval_image(encoded, image_size=image_size, family=family)
    return {
      "image": image,
      "label": tf.cast(label, tf.int32),
      "mask": tf.where(ex[_BAD] >= 0, 0.0, 1.0),  # a stand-in for an unreadable record
      _POS: pos,
      _BAD: ex[_BAD],
    }

  ds = raw.enumerate().map(process, num_parallel_calls=tuning.num_parallel_calls).ignore_errors()
  pad = {
    "image": tf.zeros([image_size, image_size, 3], tf.float32),
    "label": tf.constant(0, tf.int32),
    "mask": tf.constant(0.0),
    _POS: tf.constant(-1, tf.int64),
    _BAD: tf.constant(-1, tf.int32),
  }
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat()).take(total)
  ds = ds.batch(b_local, drop_remainder=True).prefetch(tuning.prefetch_batches)
  return BatchIterator(
    ds.with_options(tuning.options()),
    0,
    role="eval",
    n_local=sizes[process_index],
    shards=shards,
    name=f"{dataset}:{split}",
    max_skipped_fraction=max_skipped_fraction,
    finite=True,
  )


# --------------------------------------------------------------------------------------- prefetch
class Interrupted(Exception):
  """`Prefetcher.get` stopped waiting because `should_stop()` became true."""


class Prefetcher:
  """Runs `next(iterator)` in one daemon thread, `depth` batches ahead, so the consumer can wait in
  short slices and notice a stop request while the input pipeline is slow or stalled.

    data = Prefetcher(train_iterator(...), depth=2)
    batch = data.get(should_stop=lambda: preemption.requested)   # raises Interrupted

  Batches come out in the iterator's order (one producer). An exception of the iterator (e.g.
  CorruptDataError) is raised by the `get` that would have returned the next batch, StopIteration at
  the end; both again on every later call. `close()` stops the producer at its next batch; a
  producer blocked inside `next()` cannot be interrupted, but it is a daemon thread and holds at most
  `depth` + 1 batches.
  """

  _ITEM, _END, _ERROR = range(3)

  def __init__(self, iterator: Iterator, depth: int = 2, poll_s: float = 0.1):
    if depth < 1:
      raise ValueError(f"depth must be >= 1, got {depth}")
    self._source = iterator
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._closed = threading.Event()
    self._poll_s = poll_s
    self._final = None  # (kind, value) once the end or an error was taken off the queue
    self._thread = threading.Thread(target=self._produce, name="input-prefetch", daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._closed.is_set():
      try:
        self._queue.put(item, timeout=self._poll_s)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self) -> None:
    try:
      for batch in self._source:
        if not self._put((self._ITEM, batch)):
          return
      self._put((self._END, None))
    except BaseException as e:  # pylint: disable=broad-except  (handed to the consumer)
      self._put((self._ERROR, e))

  def get(
    self, timeout: float | None = None, should_stop: Callable[[], bool] | None = None
  ) -> dict:
    """The next batch. Waits at most `timeout` seconds (None: no limit; then TimeoutError); checks
    `should_stop()` every `poll_s` while no batch is ready and raises Interrupted when it is true."""
    if self._final is not None:
      return self._finish(*self._final)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
      try:
        kind, value = self._queue.get_nowait()
        break
      except queue.Empty:
        pass
      if should_stop is not None and should_stop():
        raise Interrupted("stop requested while waiting for the input pipeline")
      wait = self._poll_s
      if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
          raise TimeoutError(f"no batch from the input pipeline within {timeout:g}s")
        wait = min(wait, left)
      try:
        kind, value = self._queue.get(timeout=wait)
        break
      except queue.Empty:
        continue
    if kind == self._ITEM:
      return value
    self._final = (kind, value)
    return self._finish(kind, value)

  def _finish(self, kind, value):
    if kind == self._END:
      raise StopIteration
    raise value

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return self.get()

  def close(self) -> None:
    self._closed.set()
    try:
      while True:
        self._queue.get_nowait()
    except queue.Empty:
      pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

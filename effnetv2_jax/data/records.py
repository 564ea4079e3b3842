"""Corruption-tolerant reading of a TFDS split's TFRecord files, in TFDS' own record order.

Why not `builder.as_dataset`: when a record fails its CRC (or a shard is truncated), tf.data's
TFRecord reader returns DataLossError and moves on to the next file, so the rest of that shard is
lost; TFDS' `assert_cardinality` then raises on every later call, and under `ignore_errors` that is
an endless loop inside one `GetNext` (issue 21: a Fashion-MNIST shard with flipped bytes kept a run
at 135% CPU for 13 minutes, in C++, where no SIGTERM handler runs). A shard file that cannot be
opened loops the same way (tf.data retries the open).

`split_records(builder, split, keys)` reads what `builder.as_dataset(split, shuffle_files=False)` does:
the split's file instructions (file, skip, take), interleaved with TFDS' default cycle and block
lengths; on clean files it yields exactly TFDS' records in TFDS' order (tests compare). Each file
is read by tf.data's TFRecordDataset (C++, CRC-checked) up to its first failure; only then does
`recover` (Python, once per damaged file per epoch) index the file and resynchronise:
  * a record with a sound header but a bad payload CRC costs exactly that record;
  * a damaged header (length or its CRC): the next sound record is searched byte by byte (a sound
    record has a plausible length, a header CRC and a payload CRC); the records lost in between are
    counted from the gap's bytes and reconciled with the shard's record count from the TFDS
    metadata (exact when a file has one such gap, an estimate when it has several);
  * a truncated shard loses only the records past the cut;
  * a shard that cannot be opened (missing, a directory) loses all its records.
The index of a damaged file is kept for the process' lifetime, so later epochs only re-read it.

Slot rule (what keeps the order of every other record): each record keeps its slot, the index it
has in a clean file, so the stream has the clean stream's length and order. The slot of an
unreadable record carries the nearest readable record of the same file instruction before it (else
after it), flagged `_bad` = its instruction's index; the consumer decides what that means (train:
a duplicate trains in that slot; eval: masked out). If no record of the instruction is readable the
slot is flagged `_drop` (its features zeros or empty): the consumer removes it, which is the only
case where later examples move. A damaged file's records from its first failure to the end of the
instruction are read by `recover` at once (memory: at most one shard's bytes per damaged file).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

import numpy as np
import tensorflow as tf

# tf.io exports no random-access reader; this is the one tf.compat.v1's `tf_record_random_reader`
# documents (C++ reads and CRC checks): read(offset) -> (record, next_offset).
from tensorflow.python.lib.io import tf_record as _tf_record  # pylint: disable=g-direct-tensorflow-import

OK, REPLACED, LOST = 0, 1, 2  # per-slot status produced by `recover`
BAD, DROP = "_bad", "_drop"  # the keys of the slot flags
_FRAME = 16  # uint64 length + uint32 masked CRC of the length, then data, then uint32 masked CRC
_CHUNK = 4 << 20  # bytes scanned at a time while resynchronising
_BATCH = 128  # records per step of the per-file bookkeeping

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FileIndex:
  """Byte offset of every slot of one file (None: unreadable), and what went wrong."""

  path: str
  offsets: tuple[int | None, ...]
  problems: tuple[str, ...]
  final: bool = True  # False: the file could not be opened; tried again next time

  @property
  def num_bad(self) -> int:
    return sum(o is None for o in self.offsets)


_lock = threading.Lock()
_indexes: dict[tuple[str, int], FileIndex] = {}


def damaged_files() -> dict[str, int]:
  """{file path: unreadable records in it} for every damaged file this process has indexed."""
  with _lock:
    return {i.path: i.num_bad for i in _indexes.values() if i.num_bad}


def clear_cache() -> None:
  """Forget the indexes of damaged files (tests; or after a damaged file was replaced)."""
  with _lock:
    _indexes.clear()


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__


def _reads(reader, offset: int) -> int | None:
  """End offset of the sound record at `offset`, or None. Other errors than damage (a filesystem
  that is briefly unavailable) propagate: `recover` then loses this pass only, caching nothing."""
  try:
    return reader.read(offset)[1]
  except (tf.errors.DataLossError, IndexError):
    return None


def _resync(reader, f, start: int, size: int) -> int | None:
  """Offset of the first sound record at or after `start`, or None (nothing sound to the end).

  Only offsets whose 8 length bytes are a plausible length (the record fits in the file) are
  tried; each try is one C++ header (and payload) CRC check."""
  pos = start
  while pos + _FRAME <= size:
    f.seek(pos)
    buf = np.frombuffer(f.read(min(_CHUNK, size - pos)), np.uint8)
    n = buf.size - 7  # offsets in this chunk whose 8 length bytes are all in it
    if n <= 0:
      return None
    hi_zero = (
      (buf[4 : n + 4] == 0) & (buf[5 : n + 5] == 0) & (buf[6 : n + 6] == 0) & (buf[7 : n + 7] == 0)
    )
    lo = buf[0:n].astype(np.int64)
    lo |= buf[1 : n + 1].astype(np.int64) << 8
    lo |= buf[2 : n + 2].astype(np.int64) << 16
    lo |= buf[3 : n + 3].astype(np.int64) << 24
    starts = pos + np.arange(n, dtype=np.int64)
    for i in np.flatnonzero(hi_zero & (starts + _FRAME + lo <= size)):
      if _reads(reader, int(starts[i])) is not None:
        return int(starts[i])
    pos += n
  return None


def _length_at(f, offset: int) -> int:
  f.seek(offset)
  raw = f.read(8)
  return int.from_bytes(raw, "little") if len(raw) == 8 else -1


def index_file(path: str, num_slots: int) -> FileIndex:
  """Walks `path` record by record (see the module docstring); cached per (path, num_slots)."""
  key = (path, int(num_slots))
  with _lock:
    if key in _indexes and _indexes[key].final:
      return _indexes[key]
  index = _index_file(path, int(num_slots))
  with _lock:
    if key not in _indexes or not _indexes[key].final:
      _indexes[key] = index
  if index.num_bad:
    _log.warning(
      "input pipeline: %s: %d of %d records unreadable (%s); each of their slots gets a "
      "neighbouring record, see effnetv2_jax/data/records.py",
      path,
      index.num_bad,
      num_slots,
      "; ".join(index.problems),
    )
  return index


def _index_file(path: str, num_slots: int) -> FileIndex:
  try:
    reader = _tf_record.tf_record_random_reader(path)
    size = tf.io.gfile.stat(path).length
    f = tf.io.gfile.GFile(path, "rb")
  except (tf.errors.OpError, OSError) as e:
    problem = f"cannot open: {_first_line(e)}"
    return FileIndex(path, (None,) * num_slots, (problem,), final=False)
  entries: list = []  # offset | None (one lost record) | ("gap", bytes) (unknown count)
  problems, bad_crc, sizes = [], 0, []
  off, cut = 0, False
  with f:
    while off < size:
      end = _reads(reader, off)
      if end is not None:
        entries.append(off)
        sizes.append(end - off)
        off = end
        continue
      length = _length_at(f, off)
      nxt = off + _FRAME + length
      if 0 <= length and nxt <= size and (nxt == size or _reads(reader, nxt) is not None):
        entries.append(None)  # sound header, damaged payload: exactly one record
        bad_crc += 1
        off = nxt
        continue
      nxt = _resync(reader, f, off + 1, size)
      if nxt is None:  # nothing sound to the end: truncated, or damaged to its end
        problems.append(f"unreadable from byte {off} to the end ({size - off} bytes)")
        cut = True
        break
      entries.append(("gap", nxt - off))
      problems.append(f"unreadable bytes {off}-{nxt}")
      off = nxt
  if bad_crc:
    problems.insert(0, f"{bad_crc} record(s) failing their checksum")
  slots = _resolve(entries, num_slots, sizes, cut, problems)
  return FileIndex(path, tuple(slots), tuple(problems))


def _resolve(entries, num_slots, sizes, cut, problems) -> list:
  """Expands the gaps of unknown record count so the file has `num_slots` slots."""
  gaps = [i for i, e in enumerate(entries) if isinstance(e, tuple)]
  known = len(entries) - len(gaps)
  mean = (sum(sizes) / len(sizes)) if sizes else 0.0
  counts = {i: max(1, round(entries[i][1] / mean)) if mean else 1 for i in gaps}
  rest = num_slots - known - sum(counts.values())
  if gaps and not cut:  # the file ends on a record boundary: the gaps hold every missing record
    largest = max(gaps, key=lambda i: entries[i][1])
    counts[largest] = max(1, counts[largest] + rest)
    rest = num_slots - known - sum(counts.values())
  slots = []
  for i, e in enumerate(entries):
    slots.extend([None] * counts[i] if i in counts else [e])
  if rest > 0:  # records past a cut (or a file that ends early on a record boundary)
    slots.extend([None] * rest)
    if not cut:
      problems.append(f"{rest} record(s) missing at the end")
  if len(slots) > num_slots:
    problems.append(f"{len(slots)} records where the metadata says {num_slots}; extra ones ignored")
    slots = slots[:num_slots]
  return slots


def _openable(path) -> bool:
  try:
    with tf.io.gfile.GFile(path.decode() if isinstance(path, bytes) else path, "rb") as f:
      f.read(1)
    return True
  except (tf.errors.OpError, OSError):
    return False


def recover(path, skip, take, num_read, num_slots):
  """Records and statuses of slots [skip + num_read, skip + take) of `path` (slot rule above);
  the first `num_read` slots of the instruction were read by tf.data."""
  path = path.decode() if isinstance(path, bytes) else str(path)
  lo, first, hi = int(skip), int(skip) + int(num_read), int(skip) + int(take)
  try:
    offsets = index_file(path, int(num_slots)).offsets
    reader = (
      _tf_record.tf_record_random_reader(path)
      if any(o is not None for o in offsets[lo:hi])
      else None
    )

    def read(slot):
      off = offsets[slot]
      if off is None:
        return None
      try:
        return reader.read(off)[0]
      except (tf.errors.DataLossError, IndexError):
        return None

    # The nearest readable slot after a run of unreadable ones and its record (none looked up yet).
    after = [first - 1, None]

    def donor_after(slot):
      if after[0] <= slot:
        after[:] = [hi, None]
        for s in range(slot + 1, hi):
          rec = read(s)
          if rec is not None:
            after[:] = [s, rec]
            break
      return after[1]

    prev = None  # the nearest readable record before the current slot, within the instruction
    for s in range(first - 1, lo - 1, -1):
      prev = read(s)
      if prev is not None:
        break
    records, status = [], []
    for s in range(first, hi):
      rec = read(s)
      if rec is not None:
        prev = rec
        records.append(rec)
        status.append(OK)
        continue
      donor = prev if prev is not None else donor_after(s)
      records.append(b"" if donor is None else donor)
      status.append(LOST if donor is None else REPLACED)
  except Exception as e:  # pylint: disable=broad-except  (never an error inside tf.data: see above)
    _log.warning("input pipeline: %s: reading failed (%s); slots %d-%d lost", path, e, first, hi)
    records, status = [b""] * (hi - first), [LOST] * (hi - first)
  return np.array(records, dtype=object), np.array(status, dtype=np.int32)


def _instruction_dataset(inp, spec) -> tf.data.Dataset:
  """One file instruction: tf.data reads up to the first failure, `recover` the rest.

  The bookkeeping and parsing work on batches of `_BATCH` records (a per-record stage would cost
  as much as reading the record), unbatched at the end."""
  path, skip, take, num_slots = inp["path"], inp["skip"], inp["take"], inp["num_slots"]
  # tf.data retries a file it cannot open forever (under ignore_errors): never hand it one.
  openable = tf.numpy_function(_openable, [path], tf.bool, stateful=True)
  files = tf.boolean_mask(tf.reshape(path, [1]), tf.reshape(openable, [1]))
  # After a read error the reader moves past the file: ignore_errors ends this file's stream.
  fast = tf.data.TFRecordDataset(files).ignore_errors().skip(skip).take(take).batch(_BATCH)
  # An empty batch marks the end of what tf.data read (batch() never yields an empty one); the
  # scan pairs every batch with the number of records before it.
  ds = fast.concatenate(tf.data.Dataset.from_tensors(tf.zeros([0], tf.string)))
  ds = ds.scan(tf.constant(0, tf.int64), lambda n, recs: (n + tf.size(recs, tf.int64), (n, recs)))

  def expand(n, recs):
    def rest():
      more, status = tf.numpy_function(
        recover, [path, skip, take, n, num_slots], [tf.string, tf.int32], stateful=True
      )
      status = tf.reshape(status, [-1])
      return tf.reshape(more, [-1]), status

    def read():  # what tf.data read (nothing for the end marker of a complete instruction)
      return recs, tf.zeros([tf.size(recs)], tf.int32)

    recs, status = tf.cond((tf.size(recs) == 0) & (n < take), rest, read)
    # A lost slot's empty record parses to the defaults (an empty string is an empty Example).
    out = tf.io.parse_example(recs, spec)
    out[BAD] = tf.where(status == OK, tf.constant(-1, tf.int32), inp["index"])
    out[DROP] = status == LOST
    return out

  return ds.map(expand).unbatch()


def _with_defaults(spec: dict) -> dict:
  out = {}
  for key, feature in spec.items():
    if not isinstance(feature, tf.io.FixedLenFeature):
      raise ValueError(f"feature {key!r} is not a fixed-length feature ({feature})")
    if feature.dtype == tf.string:
      zero = np.full(feature.shape, b"", dtype=object)
    else:
      zero = np.zeros(feature.shape, feature.dtype.as_numpy_dtype)
    out[key] = tf.io.FixedLenFeature(feature.shape, feature.dtype, default_value=zero)
  return out


def _interleave_lengths(builder) -> tuple[int, int]:
  """TFDS' default interleave (cycle, block) lengths for `shuffle_files=False`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  config = tfds.ReadConfig()
  cycle = config.interleave_cycle_length
  if not isinstance(cycle, int):  # TFDS' MISSING: 1 for ordered datasets, else 16
    cycle = 1 if getattr(builder.info, "disable_shuffling", False) else 16
  return cycle, config.interleave_block_length


def split_records(builder, split, keys=("image", "label")) -> tuple[tf.data.Dataset, list[str]]:
  """(dataset of {key: the serialized feature, for each of `keys`; '_bad': int32; '_drop': bool},
  the file of each instruction index '_bad' refers to), in `builder.as_dataset(split,
  shuffle_files=False)` order. Features come as stored (an image stays encoded: TFDS'
  SkipDecoding); a '_drop' slot has zeros/empty strings. `keys` must be fixed-length features."""
  instructions = builder.info.splits[split].file_instructions
  if not instructions:
    raise ValueError(f"split {split!r} of {builder.name} has no files")
  paths = [os.fspath(fi.filename) for fi in instructions]
  inputs = {
    "index": np.arange(len(instructions), dtype=np.int32),
    "path": paths,
    "skip": np.array([fi.skip for fi in instructions], np.int64),
    "take": np.array([fi.take for fi in instructions], np.int64),
    "num_slots": np.array([fi.examples_in_shard for fi in instructions], np.int64),
  }
  example_spec = builder.info.features.tf_example_spec
  spec = _with_defaults({k: example_spec[k] for k in keys})
  cycle, block = _interleave_lengths(builder)
  ds = tf.data.Dataset.from_tensor_slices(inputs).interleave(
    lambda inp: _instruction_dataset(inp, spec),
    cycle_length=cycle,
    block_length=block,
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )
  return ds, paths


def is_tfrecord(builder) -> bool:
  fmt = getattr(builder.info, "file_format", None)
  return fmt is None or str(getattr(fmt, "value", fmt)).lower() == "tfrecord"

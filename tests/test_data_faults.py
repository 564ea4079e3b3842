"""Damaged TFRecord shards (issue 21): a bad record is skipped in its slot, the rest of its shard is
read, every other record keeps its position, the skipped share is bounded, nothing is deleted; and
the Prefetcher lets a consumer stop while the input pipeline stalls."""

import functools
import hashlib
import os
import re
import shutil
import struct
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from effnetv2_jax.data import input_pipeline
from effnetv2_jax.data import prepare
from effnetv2_jax.data import records
from effnetv2_jax.data.augment import Augment
from test_data_prepare import write_idx_set  # pylint: disable=g-bad-import-order

NUM_TRAIN, NUM_TEST, SHARDS = 240, 40, 2
PER_SHARD = NUM_TRAIN // SHARDS
VERSION_DIR = os.path.join("fashion_mnist", "3.0.1")


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory):
  src = str(tmp_path_factory.mktemp("idx"))
  data_dir = str(tmp_path_factory.mktemp("tfds_clean"))
  write_idx_set(src, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=5)
  prepare.prepare_fashion_mnist(data_dir=data_dir, source_dir=src, num_shards=SHARDS)
  return data_dir


def _shard(data_dir, index, split="train"):
  name = f"fashion_mnist-{split}.tfrecord-{index:05d}-of-{SHARDS:05d}"
  return os.path.join(data_dir, VERSION_DIR, name)


def _frames(path):
  """(offset, data length) of every record of a sound TFRecord file."""
  out, off = [], 0
  data = open(path, "rb").read()
  while off < len(data):
    (length,) = struct.unpack_from("<Q", data, off)
    out.append((off, length))
    off += 16 + length
  return out


def _damaged_copy(clean_dir, tmp_path, damage):
  """A copy of the clean data dir with `damage(shard0_path, frames)` applied to train shard 0."""
  data_dir = str(tmp_path / "tfds")
  shutil.copytree(clean_dir, data_dir)
  path = _shard(data_dir, 0)
  damage(path, _frames(path))
  return data_dir, path


def _flip(path, offset):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0xFF]))


def _payload(record):
  return lambda path, frames: _flip(path, frames[record][0] + 12 + frames[record][1] // 2)


def _length_field(*recs):
  def damage(path, frames):
    for r in recs:
      _flip(path, frames[r][0] + 1)  # the length's second byte: the header CRC fails

  return damage


def _truncate_in(record):
  def damage(path, frames):
    with open(path, "r+b") as f:
      f.truncate(frames[record][0] + 20)

  return damage


def _snapshot(data_dir):
  out = {}
  for root, _, files in os.walk(data_dir):
    for name in files:
      p = os.path.join(root, name)
      out[os.path.relpath(p, data_dir)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


def _within(seconds, fn):
  """fn() in a daemon thread: a livelocked pipeline fails the test instead of hanging it."""
  out = []

  def run():
    try:
      out.append((True, fn()))
    except BaseException as e:  # noqa: BLE001  (re-raised in the test's thread)
      out.append((False, e))

  t = threading.Thread(target=run, daemon=True)
  t.start()
  t.join(seconds)
  assert out, f"no result within {seconds}s (livelock?)"
  ok, value = out[0]
  if not ok:
    raise value
  return value


def _eval(data_dir, **kw):
  it = input_pipeline.eval_iterator(
    dataset="fashion_mnist",
    data_dir=data_dir,
    split="train",  # eval keeps the raw order: slot i of the stream is position i
    global_batch_size=16,
    image_size=16,
    family="v2",
    **kw,
  )
  batches = list(it)
  cat = {k: np.concatenate([b[k] for b in batches]) for k in ("image", "label", "mask")}
  return it, cat


@functools.lru_cache(maxsize=None)
def _raw_stream(clean_dir):
  """The clean train split's serialized records in stream order (TFDS' order: the first test)."""
  import tensorflow_datasets as tfds

  builder = tfds.builder("fashion_mnist", data_dir=clean_dir)
  ds, _ = records.split_records(builder, "train", ("image",))
  return tuple(ex["image"] for ex in ds.as_numpy_iterator())


def _raw_slot_of(clean_dir, shard, record):
  """Index, in the split's raw (TFDS) order, of record `record` of train shard `shard`."""
  serialized = list(tf.data.TFRecordDataset(_shard(clean_dir, shard)).as_numpy_iterator())[record]
  want = tf.io.parse_single_example(serialized, {"image": tf.io.FixedLenFeature([], tf.string)})
  return _raw_stream(clean_dir).index(want["image"].numpy())


# --- a clean split reads exactly as TFDS reads it ------------------------------------------------
def test_clean_split_reads_in_tfds_order(clean_dir):
  import tensorflow_datasets as tfds

  builder = tfds.builder("fashion_mnist", data_dir=clean_dir)
  assert len(builder.info.splits["train"].file_instructions) == SHARDS
  dec = {"image": tfds.decode.SkipDecoding()}
  for split in ["train", "train[7:203]", *tfds.even_splits("train", 3), "test"]:
    ours, shards = records.split_records(builder, split)
    got = [(ex["image"], ex["label"], ex["_bad"], ex["_drop"]) for ex in ours.as_numpy_iterator()]
    ref = builder.as_dataset(split=split, shuffle_files=False, decoders=dec)
    want = [(ex["image"], ex["label"]) for ex in ref.as_numpy_iterator()]
    assert [g[:2] for g in got] == want, split  # same records, same order
    assert all(g[2] == -1 and not g[3] for g in got)
    assert all(os.path.exists(s) for s in shards)


# --- one unreadable record: its slot gets a neighbour, every other slot is unchanged -------------
@pytest.mark.parametrize(
  "damage,bad,donor",
  [
    (_payload(50), range(50, 51), 49),  # data CRC fails: exactly that record
    (_length_field(50), range(50, 51), 49),  # header CRC fails: resynchronised at record 51
    (_payload(0), range(0, 1), 1),  # no record before it in the shard: the next one stands in
    (_truncate_in(100), range(100, PER_SHARD), 99),  # a truncated shard loses only the cut
  ],
  ids=["payload", "length", "first", "truncated"],
)
def test_eval_masks_exactly_the_unreadable_slots(clean_dir, tmp_path, damage, bad, donor):
  data_dir, path = _damaged_copy(clean_dir, tmp_path, damage)
  before = _snapshot(data_dir)
  skipped_before = input_pipeline.skipped_records()["eval"]
  _, want = _eval(clean_dir)
  it, got = _eval(data_dir)
  assert it.skipped == len(bad)
  assert input_pipeline.skipped_records()["eval"] == skipped_before + len(bad)
  assert input_pipeline.skipped_by_shard()["eval"][path] >= len(bad)
  assert input_pipeline.damaged_shards()[path] == len(bad)
  assert got["mask"].sum() == NUM_TRAIN - len(bad)
  bad_slots = {_raw_slot_of(clean_dir, 0, r) for r in bad}
  donor_slot = _raw_slot_of(clean_dir, 0, donor)
  assert got["image"].shape == want["image"].shape  # no slot lost: same positions
  for i in range(len(want["label"])):
    if i in bad_slots:
      assert got["mask"][i] == 0
      np.testing.assert_array_equal(got["image"][i], want["image"][donor_slot])
      assert got["label"][i] == want["label"][donor_slot]
    else:
      assert got["mask"][i] == want["mask"][i]
      assert got["label"][i] == want["label"][i]
      np.testing.assert_array_equal(got["image"][i], want["image"][i])
  assert _snapshot(data_dir) == before  # nothing written, nothing deleted


def test_two_damaged_headers_in_one_shard_resynchronise_exactly(clean_dir, tmp_path):
  data_dir, path = _damaged_copy(clean_dir, tmp_path, _length_field(30, 80))
  index = records.index_file(path, PER_SHARD)
  assert [i for i, o in enumerate(index.offsets) if o is None] == [30, 80]
  frames = _frames(_shard(clean_dir, 0))
  assert [o for o in index.offsets if o is not None] == [
    off for i, (off, _) in enumerate(frames) if i not in (30, 80)
  ]


def test_resolve_spreads_gaps_by_size_and_reconciles_the_count():
  resolve = records._resolve  # pylint: disable=protected-access
  # 3 sound records of 100 bytes, a 200-byte gap, 1 record, a 100-byte gap; the file ends cleanly.
  entries = [0, 100, 200, ("gap", 200), 500, ("gap", 100)]
  sizes = [100] * 4
  assert resolve(entries, 7, sizes, False, []) == [0, 100, 200, None, None, 500, None]
  # The metadata's count wins; the difference goes to the largest gap (at least 1 slot each).
  assert resolve(entries, 8, sizes, False, []) == [0, 100, 200, None, None, None, 500, None]
  assert resolve(entries, 6, sizes, False, []) == [0, 100, 200, None, 500, None]
  # After a cut the missing records are the last ones.
  assert resolve([0, 100], 5, [100, 100], True, []) == [0, 100, None, None, None]
  problems = []
  assert resolve([0, 100, 200], 2, sizes, False, problems) == [0, 100]
  assert "extra ones ignored" in problems[0]


# --- train: positions, resume, one index per damaged file, speed --------------------------------
def _train(data_dir, **kw):
  args = dict(
    dataset="fashion_mnist",
    data_dir=data_dir,
    split=None,
    global_batch_size=16,
    image_size=16,
    family="v2",
    augment=Augment(),
    seed=11,
    shuffle_buffer=64,
  )
  args.update(kw)
  return input_pipeline.train_iterator(**args)


def test_train_keeps_every_other_record_in_its_slot_and_resumes(clean_dir, tmp_path, monkeypatch):
  data_dir, path = _damaged_copy(clean_dir, tmp_path, _payload(50))
  calls = []
  real = records._index_file  # pylint: disable=protected-access
  monkeypatch.setattr(records, "_index_file", lambda *a: calls.append(a) or real(*a))
  steps = 2 * NUM_TRAIN // 16 + 3  # two epochs and a bit
  it_clean, it_bad = _train(clean_dir), _train(data_dir)
  want = [next(it_clean) for _ in range(steps)]
  got = [next(it_bad) for _ in range(steps)]
  donor = list(tf.data.TFRecordDataset(_shard(clean_dir, 0)).as_numpy_iterator())[49]
  donor_label = tf.io.parse_single_example(donor, {"label": tf.io.FixedLenFeature([], tf.int64)})
  differ = 0
  for w, g in zip(want, got):
    for i in range(16):
      if not np.array_equal(w["image"][i], g["image"][i]):
        differ += 1
        assert g["label"][i] == int(donor_label["label"])
      else:
        assert w["label"][i] == g["label"][i]
  assert differ == it_bad.skipped and differ in (2, 3)  # once per epoch, nothing else moved
  assert len(calls) == 1  # the damaged file is indexed once, not once per epoch
  k = 9
  resumed = _train(data_dir, start_step=k)
  for w in got[k:]:
    g = next(resumed)
    np.testing.assert_array_equal(g["image"], w["image"])
    np.testing.assert_array_equal(g["label"], w["label"])


def test_bytes_flipped_every_n_bytes_finish_fast_and_the_share_is_bounded(clean_dir, tmp_path):
  def every(path, frames):
    size = os.path.getsize(path)
    for off in range(20_000, size, 20_000):  # the "every 2 MB" on a 112 KB shard
      _flip(path, off)

  data_dir, path = _damaged_copy(clean_dir, tmp_path, every)
  before = _snapshot(data_dir)
  it = _train(data_dir)
  guard = input_pipeline.Prefetcher(it)  # a livelock fails the test instead of hanging it
  for _ in range(2 * NUM_TRAIN // 16):
    guard.get(timeout=120)  # the livelocked version never got past the first damage
  n_bad = len(range(20_000, os.path.getsize(path), 20_000))  # one record per flip
  assert input_pipeline.damaged_shards()[path] == n_bad
  assert it.skipped == 2 * n_bad  # every damaged record, once per epoch

  with pytest.raises(input_pipeline.CorruptDataError) as e:
    it = _train(data_dir, max_skipped_fraction=0.001)
    for _ in range(NUM_TRAIN // 16):
      next(it)
  msg = str(e.value)
  assert "\n" not in msg and path in msg and "max_skipped_fraction=0.001" in msg
  assert e.value.shard == path and e.value.role == "train"
  # Within the first epoch the allowance is a share of the epoch, not of the few records read.
  it = _train(data_dir, max_skipped_fraction=0.05)
  for _ in range(2 * NUM_TRAIN // 16):
    next(it)
  with pytest.raises(input_pipeline.CorruptDataError, match="eval data"):
    _eval(data_dir, max_skipped_fraction=0.001)
  assert _snapshot(data_dir) == before


def test_an_unopenable_shard_is_dropped_and_named(clean_dir, tmp_path):
  def remove(path, frames):
    os.rename(path, path + ".moved")

  data_dir, path = _damaged_copy(clean_dir, tmp_path, remove)
  it, got = _within(120, lambda: _eval(data_dir))  # tf.data alone retries the open forever
  assert it.skipped == PER_SHARD and got["mask"].sum() == NUM_TRAIN - PER_SHARD
  _, want = _eval(clean_dir)
  keep = sorted(map(bytes, want["image"][want["mask"] > 0]))
  seen = sorted(map(bytes, got["image"][got["mask"] > 0]))
  assert set(seen) < set(keep) and len(seen) == PER_SHARD  # the other shard, every record once
  with pytest.raises(input_pipeline.CorruptDataError, match=re.escape(path)):
    _eval(data_dir, max_skipped_fraction=0.1)
  # Train drops the shard's slots (nothing can stand in for them) and keeps going.
  it = _train(data_dir)
  _within(120, lambda: [next(it) for _ in range(NUM_TRAIN // 16)])
  assert it.skipped >= PER_SHARD
  assert os.path.exists(path + ".moved")


def test_undecodable_images_count_against_the_share_too(tmp_path):
  from PIL import Image

  for i in range(9):
    d = tmp_path / "train" / f"c{i % 3}"
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(d / f"{i}.png")
  (tmp_path / "train" / "c0" / "zz.png").write_bytes(b"not a png")
  kw = dict(dataset=f"folder:{tmp_path}", data_dir=None, split=None, global_batch_size=5)
  kw.update(image_size=8, family="v2", augment=Augment(), seed=0)
  it = input_pipeline.train_iterator(**kw)
  [next(it) for _ in range(4)]  # two epochs of 10 files
  assert it.skipped >= 1
  with pytest.raises(input_pipeline.CorruptDataError, match=r"undecodable images \(no shard\)"):
    it = input_pipeline.train_iterator(max_skipped_fraction=0.05, **kw)
    [next(it) for _ in range(4)]


# --- Prefetcher ------------------------------------------------------------------------------------
def test_prefetcher_keeps_order_and_forwards_errors():
  def source():
    yield from range(5)
    raise input_pipeline.CorruptDataError("bad shard x", role="train", shard="x")

  p = input_pipeline.Prefetcher(source(), depth=2)
  assert [p.get(timeout=10) for _ in range(5)] == [0, 1, 2, 3, 4]
  for _ in range(2):  # sticky
    with pytest.raises(input_pipeline.CorruptDataError, match="bad shard x"):
      p.get(timeout=10)
  assert list(input_pipeline.Prefetcher(iter(range(7)), depth=3)) == list(range(7))


def test_prefetcher_returns_within_a_second_of_a_stop_request_while_the_source_stalls():
  release = threading.Event()

  def stalled():
    yield "first"
    release.wait(60)  # a pipeline stuck in C++
    yield "late"

  p = input_pipeline.Prefetcher(stalled(), depth=2)
  assert p.get(timeout=10) == "first"
  stop_at = time.monotonic() + 0.5
  t0 = time.monotonic()
  with pytest.raises(input_pipeline.Interrupted):
    p.get(should_stop=lambda: time.monotonic() > stop_at)
  waited = time.monotonic() - t0
  assert 0.4 < waited < 1.5
  with pytest.raises(TimeoutError):
    p.get(timeout=0.2)
  release.set()
  assert p.get(timeout=10) == "late"  # nothing lost by the interruptions
  p.close()

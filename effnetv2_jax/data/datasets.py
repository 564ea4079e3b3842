"""Dataset registry: names -> TFDS builders (or image folders), class counts, default splits.

A registry entry is a `DatasetInfo` carrying the *static* facts (class count, default train/eval
split and their sizes, the sizes of other split strings it knows, how to prepare the data), so a
config can be validated and a step count planned without touching the data (`split_num_examples`).
Sizes of other split strings (``train[:10%]``) are resolved from the prepared TFDS metadata by
`split_size`, because only TFDS knows exactly how it rounds percentage slices.

Names:
  * ``imagenet2012``: TFDS' ImageNet-1k. Its registry defaults are ``train`` (1,281,167) and
    ``validation`` (50,000); the official recipe's splits are the constants below:
    `IMAGENET_TRAIN_MINUS_MINIVAL` (1,256,144) to train on, `IMAGENET_VALIDATION` to report on and
    `IMAGENET_MINIVAL` (25,021) for model selection (configs/imagenet.py uses them);
  * ``imagenet2012_minival``: the same data with every other training image / minival as train / eval
    split;
  * ``imagenet2012_subset/1pct`` and ``/10pct`` (TFDS' semi-supervised subsets), ``cifar10``,
    ``cifar100``, ``oxford_flowers102``, ``cars196``, ``fashion_mnist``;
  * ``imagenet21k``: TFDS has no builder for it; the name points at a TFDS dataset the user builds
    (single integer labels: the pipeline has no multi-hot labels), see ``_IMAGENET21K_HINT``;
  * ``folder:/path/to/root``: class-per-subfolder images. If ``root`` has split subdirectories
    (``train`` and one of ``val``/``validation``/``test``) those are the splits; otherwise the root itself
    holds the class folders and is the single split ``all`` (used for both train and eval).
Any TFDS split string may be passed as ``split=`` to the input pipeline; it is handed to TFDS unchanged.

Lookups are cached per process (`get_dataset_info` by (name, data_dir); a folder's directories are
listed once): validation, the trainer and every iterator ask for the same facts. A folder changed
on disk after its first lookup needs `clear_cache()`.
"""

from __future__ import annotations

import dataclasses
import functools
import os

IMAGENET_TRAIN_SIZE = 1_281_167
IMAGENET_VALIDATION_SIZE = 50_000
# The official ImageNet splits (reference sections 2 and 10.3): the released code trains on
# 1,256,144 training images, holds 25,021 out as "minival" for model selection and reports on the
# 50,000 validation images. Its counts add up to 1,281,165, two fewer than the training set.
# Which images: its TFRecord input (`datasets.py` ImageNetInput) takes minival as the first 20 of
# the 1,024 train-* files (imagenet_to_gcs.py writes them in a random.seed(0) order) and trains on
# files 20-1023; its TFDS input (ImageNetTfdsInput) trains on 'train[:98%]' and means the last 2% as
# minival (written 'train[2%:]', which would overlap train). TFDS orders its examples differently
# from those files, so no TFDS slice holds the same images. These follow the TFDS input (minival at
# the end of train) with the TFRecord input's exact counts: train is the first 1,256,144 examples,
# minival the last 25,021, and the 2 examples between them are in neither.
IMAGENET_OFFICIAL_TRAIN_SIZE = 1_256_144
IMAGENET_MINIVAL_SIZE = 25_021
IMAGENET_TRAIN = "train"  # all 1,281,167
IMAGENET_VALIDATION = "validation"
IMAGENET_TRAIN_MINUS_MINIVAL = f"train[:{IMAGENET_OFFICIAL_TRAIN_SIZE}]"
IMAGENET_MINIVAL = f"train[-{IMAGENET_MINIVAL_SIZE}:]"
_IMAGENET_ALL_BUT_MINIVAL = f"train[:-{IMAGENET_MINIVAL_SIZE}]"  # imagenet2012_minival's train
_IMAGENET_SPLIT_SIZES = (
  (IMAGENET_TRAIN, IMAGENET_TRAIN_SIZE),
  (IMAGENET_VALIDATION, IMAGENET_VALIDATION_SIZE),
  (IMAGENET_TRAIN_MINUS_MINIVAL, IMAGENET_OFFICIAL_TRAIN_SIZE),
  (IMAGENET_MINIVAL, IMAGENET_MINIVAL_SIZE),
  (_IMAGENET_ALL_BUT_MINIVAL, IMAGENET_TRAIN_SIZE - IMAGENET_MINIVAL_SIZE),
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
_FOLDER_PREFIX = "folder:"
_FOLDER_EVAL_DIRS = ("val", "validation", "test")


class DatasetNotPreparedError(RuntimeError):
  """The dataset's files are not where TFDS (or the folder reader) looks for them."""


class CorruptDataError(RuntimeError):
  """More than `max_skipped_fraction` of the records an input iterator read were unreadable or
  undecodable (effnetv2_jax/data/input_pipeline.py). `str()` is one line naming the worst shard;
  `.shard` is that file ('' when unknown, e.g. undecodable images), `.role` 'train' or 'eval'."""

  def __init__(self, message: str, *, role: str, shard: str):
    super().__init__(message)
    self.role = role
    self.shard = shard


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  tfds_name: str  # '' for image folders
  num_classes: int
  train_split: str
  eval_split: str
  num_train: int
  num_eval: int
  folder_root: str | None = None  # only for folder: datasets
  class_names: tuple[str, ...] = ()  # folder datasets: sorted class subfolder names
  prepare_hint: str = ""  # how to make the data available; used in error messages
  split_sizes: tuple[tuple[str, int], ...] = ()  # (split string, size) known besides train/eval

  @property
  def is_folder(self) -> bool:
    return self.folder_root is not None

  def known_split_size(self, split: str) -> int | None:
    """The registry's size of `split` (spaces ignored), or None when only the data can tell."""
    split = split.replace(" ", "")
    if split == self.train_split:
      return self.num_train
    if split == self.eval_split:
      return self.num_eval
    return dict(self.split_sizes).get(split)


def _tfds_hint(tfds_name: str) -> str:
  return (
    f"build it with `tfds build {tfds_name} --data_dir=DATA_DIR` on a machine with network "
    "access (or copy a prepared data_dir here)."
  )


_IMAGENET_HINT = (
  "ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and "
  "ILSVRC2012_img_val.tar into DATA_DIR/downloads/manual/, then run "
  "`tfds build imagenet2012 --data_dir=DATA_DIR` (about 150 GB of disk while building)."
)
_FASHION_HINT = (
  "build it offline from Debian's dataset-fashion-mnist files with "
  "`python -m effnetv2_jax.data.prepare fashion_mnist --data_dir=DATA_DIR` "
  "(or `tfds build fashion_mnist` where a network exists)."
)

# TFDS ships no ImageNet-21k builder (the data is behind a login), so the entry names a dataset the
# user builds; the sizes are the paper's round figures and only convert epochs to steps.
IMAGENET21K_CLASSES = 21_843  # the released code's count; the paper says 21,841 (reference sec. 9)
IMAGENET21K_TRAIN_SIZE = (
  13_000_000  # "about 13M training images" (paper); set num_train_steps to pin
)
IMAGENET21K_EVAL_SIZE = 100_000
_IMAGENET21K_HINT = (
  "TFDS has no ImageNet-21k builder: create one with `tfds new imagenet21k` whose examples are "
  '{"image": jpeg, "label": int in [0, 21843)} with splits "train" and "validation" (one label per '
  "image: multi-hot labels are not supported), then `tfds build imagenet21k --data_dir=DATA_DIR`; "
  'or use dataset="folder:/path/to/unpacked/fall11" (class-per-subfolder, slow to list at this size).'
)

# name -> DatasetInfo, filled by the _register calls below.
_REGISTRY: dict[str, DatasetInfo] = {}


def _register(name, tfds_name, *counts_and_splits, hint=None, split_sizes=()):
  """Add a TFDS dataset: (name, tfds_name, num_classes, train_split, eval_split, num_train,
  num_eval) in DatasetInfo's field order, then how to prepare it and further known split sizes."""
  _REGISTRY[name] = DatasetInfo(
    name,
    tfds_name,
    *counts_and_splits,
    prepare_hint=hint or _tfds_hint(tfds_name),
    split_sizes=tuple(split_sizes),
  )


_register(
  "imagenet2012",
  "imagenet2012",
  1000,
  IMAGENET_TRAIN,
  IMAGENET_VALIDATION,
  IMAGENET_TRAIN_SIZE,
  IMAGENET_VALIDATION_SIZE,
  hint=_IMAGENET_HINT,
  split_sizes=_IMAGENET_SPLIT_SIZES,
)
# Trains on every training image outside minival (1,256,146: two more than the official split, see
# above) and evaluates on minival.
_register(
  "imagenet2012_minival",
  "imagenet2012",
  1000,
  _IMAGENET_ALL_BUT_MINIVAL,
  IMAGENET_MINIVAL,
  IMAGENET_TRAIN_SIZE - IMAGENET_MINIVAL_SIZE,
  IMAGENET_MINIVAL_SIZE,
  hint=_IMAGENET_HINT,
  split_sizes=_IMAGENET_SPLIT_SIZES,
)
_register(
  "imagenet2012_subset/1pct",
  "imagenet2012_subset/1pct",
  1000,
  "train",
  "validation",
  12_811,
  50_000,
  hint=_IMAGENET_HINT.replace("imagenet2012 ", "imagenet2012_subset/1pct "),
)
_register(
  "imagenet2012_subset/10pct",
  "imagenet2012_subset/10pct",
  1000,
  "train",
  "validation",
  128_116,
  50_000,
  hint=_IMAGENET_HINT.replace("imagenet2012 ", "imagenet2012_subset/10pct "),
)
_register("cifar10", "cifar10", 10, "train", "test", 50_000, 10_000)
_register("cifar100", "cifar100", 100, "train", "test", 50_000, 10_000)
# Flowers: the usual transfer protocol trains on train+validation (1,020 each) and tests on test.
_register(
  "oxford_flowers102",
  "oxford_flowers102",
  102,
  "train+validation",
  "test",
  2_040,
  6_149,
  split_sizes=(("train", 1_020), ("validation", 1_020)),
)
_register("cars196", "cars196", 196, "train", "test", 8_144, 8_041)
_register(
  "imagenet21k",
  "imagenet21k",
  IMAGENET21K_CLASSES,
  "train",
  "validation",
  IMAGENET21K_TRAIN_SIZE,
  IMAGENET21K_EVAL_SIZE,
  hint=_IMAGENET21K_HINT,
)
_register("fashion_mnist", "fashion_mnist", 10, "train", "test", 60_000, 10_000, hint=_FASHION_HINT)


def known_names() -> list[str]:
  return sorted(_REGISTRY) + ["folder:/path/to/root"]


@functools.lru_cache(maxsize=None)
def _class_dirs(split_dir: str) -> tuple[str, ...]:
  """Sorted subdirectory names of `split_dir` (listed once per process; see clear_cache)."""
  return tuple(
    sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
  )


def _list_class_dirs(split_dir: str) -> list[str]:
  return list(_class_dirs(split_dir))


def _is_image(fname: str) -> bool:
  return fname.lower().endswith(IMAGE_EXTENSIONS)


@functools.lru_cache(maxsize=None)
def _folder_splits(root: str) -> tuple[tuple[str, str], ...]:
  subdirs = set(_class_dirs(root)) if os.path.isdir(root) else set()
  if "train" in subdirs:
    splits = [("train", os.path.join(root, "train"))]
    splits += [(d, os.path.join(root, d)) for d in _FOLDER_EVAL_DIRS if d in subdirs]
    return tuple(splits)
  return (("all", root),)


def folder_splits(root: str) -> dict[str, str]:
  """Split name -> directory holding the class folders of that split."""
  return dict(_folder_splits(root))


@functools.lru_cache(maxsize=None)
def _split_files(split_dir: str, class_names: tuple[str, ...]) -> tuple[tuple, tuple]:
  index = {c: i for i, c in enumerate(class_names)}
  paths, labels = [], []
  for cls in _class_dirs(split_dir):
    if cls not in index:
      # Never guess a label: a class unseen in train would silently map to a wrong index.
      raise ValueError(
        f"class folder {cls!r} in {split_dir!r} does not exist in the train split "
        f"(classes: {list(class_names)[:10]}...)"
      )
    cls_dir = os.path.join(split_dir, cls)
    for fname in sorted(os.listdir(cls_dir)):
      if _is_image(fname):
        paths.append(os.path.join(cls_dir, fname))
        labels.append(index[cls])
  return tuple(paths), tuple(labels)


def folder_files(
  root: str, split: str, class_names: tuple[str, ...]
) -> tuple[list[str], list[int]]:
  """Sorted (path, label) lists of one folder split; labels index the TRAIN split's class names."""
  splits = folder_splits(root)
  if split not in splits:
    raise ValueError(f"folder dataset {root!r} has splits {sorted(splits)}, not {split!r}")
  paths, labels = _split_files(splits[split], tuple(class_names))
  return list(paths), list(labels)


def _folder_info(name: str) -> DatasetInfo:
  root = os.path.abspath(os.path.expanduser(name[len(_FOLDER_PREFIX) :]))
  hint = (
    f"create {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg "
    f'(or {root}/<class>/*.jpg for a single split named "all").'
  )
  if not os.path.isdir(root):
    raise DatasetNotPreparedError(f"Image folder {root!r} does not exist: {hint}")
  splits = folder_splits(root)
  train_split = "train" if "train" in splits else "all"
  eval_split = next((s for s in _FOLDER_EVAL_DIRS if s in splits), train_split)
  classes = _class_dirs(splits[train_split])
  if not classes:
    raise DatasetNotPreparedError(
      f"Image folder {splits[train_split]!r} has no class subfolders: {hint}"
    )
  num_train = len(folder_files(root, train_split, classes)[0])
  num_eval = len(folder_files(root, eval_split, classes)[0])
  return DatasetInfo(
    name=name,
    tfds_name="",
    num_classes=len(classes),
    train_split=train_split,
    eval_split=eval_split,
    num_train=num_train,
    num_eval=num_eval,
    folder_root=root,
    class_names=classes,
    prepare_hint=hint,
  )


def get_dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
  """Registry lookup, cached per (name, data_dir): a folder dataset's tree is listed once per
  process. ``data_dir`` is part of the key only; the registry's facts do not depend on it."""
  return _cached_info(name, data_dir)


@functools.lru_cache(maxsize=None)
def _cached_info(name: str, data_dir: str | None) -> DatasetInfo:
  del data_dir
  if name.startswith(_FOLDER_PREFIX):
    return _folder_info(name)
  if name not in _REGISTRY:
    raise ValueError(f"Unknown dataset {name!r}; known datasets: {', '.join(known_names())}")
  return _REGISTRY[name]


def clear_cache() -> None:
  """Forget every cached lookup (dataset infos, folder listings): for tests, or after a folder
  dataset changed on disk."""
  for cached in (_cached_info, _class_dirs, _folder_splits, _split_files):
    cached.cache_clear()


def _builder(info: DatasetInfo, data_dir: str | None):
  import tensorflow_datasets as tfds  # Imported lazily: the registry itself needs no TF.

  return tfds.builder(info.tfds_name, data_dir=data_dir)


def check_prepared(name: str, data_dir: str | None = None) -> None:
  """Raises DatasetNotPreparedError, with one message saying how to prepare it, if data is missing."""
  info = get_dataset_info(name, data_dir)
  if info.is_folder:
    return  # _folder_info already checked the directory layout.
  try:
    builder = _builder(info, data_dir)
    # `is_prepared` is the public spelling in recent TFDS; fall back to the metadata file.
    prepared = (
      builder.is_prepared()
      if hasattr(builder, "is_prepared")
      else os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))
    )
  except Exception as e:  # pylint: disable=broad-except  (bad config name, unreadable dir, ...)
    # TFDS lists every builder it knows when a name is not one of them (imagenet21k): keep line 1.
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise DatasetNotPreparedError(
      f"Dataset {name!r} is not usable in data_dir {data_dir!r} ({reason}); {info.prepare_hint}"
    ) from e
  if not prepared:
    root = data_dir or _data_dir_root(builder)
    hint = info.prepare_hint.replace("DATA_DIR", root)
    raise DatasetNotPreparedError(
      f"Dataset {name!r} (TFDS {info.tfds_name!r}) is not prepared in {root!r}: {hint}"
    )


def _data_dir_root(builder) -> str:
  """The TFDS data_dir a builder reads from (~/tensorflow_datasets by default): its data_dir minus
  '<name>[/<config>]/<version>'."""
  root = getattr(builder, "data_dir_root", None)
  if root:
    return os.fspath(root)
  path = os.fspath(builder.data_dir)
  for _ in str(builder.info.full_name).split("/"):
    path = os.path.dirname(path)
  return path


def split_size(info: DatasetInfo, split: str, data_dir: str | None = None) -> int:
  """Number of examples of `split` (any TFDS split string, or a folder split name), from the
  prepared data; the registry's size where the data is not prepared and the registry knows it."""
  if info.is_folder:
    if split in (info.train_split, info.eval_split):  # counted when the info was built
      return info.num_train if split == info.train_split else info.num_eval
    return len(folder_files(info.folder_root, split, info.class_names)[0])
  static = info.known_split_size(split)
  try:
    return _builder(info, data_dir).info.splits[split].num_examples
  except Exception:  # pylint: disable=broad-except  (not prepared: the static count is the best we know)
    if static is None:
      raise
    return static


def split_num_examples(name: str, split: str, data_dir: str | None = None) -> int:
  """Size of `split` of dataset `name` without needing the data where the registry knows it (e.g.
  `IMAGENET_TRAIN_MINUS_MINIVAL` -> 1,256,144, `IMAGENET_MINIVAL` -> 25,021, 'validation' -> 50,000),
  so plan mode works on a machine without ImageNet; otherwise from the prepared data (`split_size`)."""
  info = get_dataset_info(name, data_dir)
  known = None if info.is_folder else info.known_split_size(split)
  return known if known is not None else split_size(info, split, data_dir)

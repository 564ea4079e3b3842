"""Shared by the trainer tests: a tiny image-folder dataset, a tiny two-stage config, and the JAX
settings their end-to-end runs use.

A folder dataset (not tfds.testing.mock_data) because subprocess tests (SIGTERM, SIGKILL,
multi-host) need data that exists outside the test process.
"""

import contextlib
import os
import sys
import tempfile
import textwrap

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One persistent XLA cache for every trainer test run (in-process and subprocesses, and across
# sessions): only the first run of a program pays for compiling it.
CACHE_DIR = os.path.join(tempfile.gettempdir(), f"effnetv2_jax_test_xla_cache_{os.getuid()}")
# End-to-end runs of tiny models spend most of their time in XLA's optimization passes, not in
# running the programs; these settings skip most of those passes. In-process: `unoptimized_xla()`
# around a module; subprocesses: `subprocess_env(..., **UNOPTIMIZED_ENV)`. A test that compares
# numbers must have both sides in the same mode. The mode is part of the persistent cache's key
# (JAX hashes the compile options, which it sets: tests/test_train.py checks), so optimized and
# unoptimized programs never share an entry of CACHE_DIR.
UNOPTIMIZED_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
TINY_BLOCKS = ["r1_k3_s1_e1_i8_o8_c1", "r1_k3_s2_e4_i8_o16_se0.25"]


def make_folder_dataset(
  root, *, num_train=32, num_val=16, size=32, classes=("dark", "light"), seed=0
):
  """Class-per-folder PNGs whose brightness tells the class (so a tiny model can learn it)."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  for split, n in (("train", num_train), ("val", num_val)):
    for c, name in enumerate(classes):
      d = os.path.join(root, split, name)
      os.makedirs(d, exist_ok=True)
      for i in range(n // len(classes)):
        base = 60 + 120 * c
        img = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f"{i:03d}.png"))
  return root


CONFIG_BODY = """
def get_config(arg=None):
  from configs import default
  c = default.get_config()
  c.seed = 3
  c.model_name = "efficientnetv2-b0"
  c.model_overrides.blocks = {blocks!r}
  c.model_overrides.stem_filters = 8
  c.model_overrides.head_filters = 16
  c.model_overrides.drop_path_rate = 0.1
  c.dataset = "folder:{data}"
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_train_steps = {steps}
  c.eval_image_size = 24
  c.progressive.preset = "paper"
  c.progressive.num_stages = 2
  c.progressive.min_image_size = 16
  c.progressive.max_image_size = 24
  c.progressive.min_randaug = 2.0
  c.progressive.max_randaug = 4.0
  c.progressive.min_mixup = 0.0
  c.progressive.max_mixup = 0.2
  c.progressive.min_dropout = 0.1
  c.progressive.max_dropout = 0.2
  c.shuffle_buffer = 64
  c.warmup_epochs = 1.0
  c.lr_per_256 = 0.5
  c.ema_decay = 0.99
  c.log_every_steps = {log_every}
  c.checkpoint_every_steps = {ckpt_every}
  c.keep_checkpoints = 2
  c.compilation_cache_dir = {cache!r}
  return c
"""


def config_source(data, *, steps=8, log_every=2, ckpt_every=3, cache=""):
  return textwrap.dedent(CONFIG_BODY).format(
    blocks=TINY_BLOCKS,
    data=data,
    steps=steps,
    log_every=log_every,
    ckpt_every=ckpt_every,
    cache=cache,
  )


def tiny_config(data, **kw):
  """The same config as `write_config_file` writes, built in-process."""
  ns = {}
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  exec(config_source(data, **kw), ns)  # pylint: disable=exec-used
  return ns["get_config"]()


def write_config_file(path, data, **kw):
  with open(path, "w") as f:
    f.write(config_source(data, **kw))
  return path


def subprocess_env(num_devices=None, **extra):
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  if num_devices is not None:
    flags = [
      f
      for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={num_devices}"])
  env.update({k: str(v) for k, v in extra.items()})
  return env


@contextlib.contextmanager
def unoptimized_xla():
  """Compile with `jax_disable_most_optimizations` inside; restore the setting on the way out.

  JAX's in-memory caches are not keyed on the setting, so they are cleared on entry and exit: the
  programs compiled inside are all unoptimized, and none of them is reused after.
  """
  import jax

  before = jax.config.read("jax_disable_most_optimizations")
  jax.clear_caches()
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)
    jax.clear_caches()


@contextlib.contextmanager
def restored_compilation_cache():
  """The trainer turns the persistent cache on for this process (config.compilation_cache_dir);
  later test modules must not inherit it (emulated-device collective programs loaded from it can
  deadlock, see tests/test_train.py)."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  before = jax.config.jax_compilation_cache_dir
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()

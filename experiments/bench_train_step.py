r"""Train-step throughput: this codebase vs timm (PyTorch) vs Keras applications, in one run.

  python experiments/bench_train_step.py --model efficientnetv2-s --batch 16 --image-size 128
  python experiments/bench_train_step.py --model efficientnetv2-b0 --batch 32 --image-size 128 --dtype bf16
  python experiments/bench_train_step.py --compile-report      # cold vs warm persistent-cache compiles

Every contender runs in its own worker process (no TF/torch/JAX thread pools fighting in one
process, no import clashes), built and warmed up first. The parent then runs ROUNDS rounds; in each
round every worker in turn times STEPS train steps while the others sleep on a pipe. The reported
figure is the median over rounds, so a neighbour's load that comes and goes hits every contender
alike; the ratios are computed from those medians.

What each contender times (synthetic data already in memory, labels random, 1000 classes):
  jax    steps.make_train_step + sharding.jit_train_step: forward, backward, L2 in the loss, label
         smoothing, TF1-RMSProp with the global-step LR, BN statistics, EMA of params and BN stats,
         the divergence guard. Exactly the trainer's step.
  timm   tf_efficientnetv2_<v> (TF-SAME padding, as ours), train mode, drop_rate/drop_path_rate as
         ours, CE with label smoothing 0.1, torch.optim.RMSprop(alpha=0.9, eps=1e-3, momentum=0.9,
         weight_decay=1e-5). NO EMA (timm keeps EMA outside the step), so it does slightly less
         work than ours. bf16: torch.autocast('cpu', bfloat16).
  keras  keras.applications.EfficientNetV2<V>(weights=None), a tf.function step with GradientTape
         (no model.fit), RMSprop(rho=0.9, momentum=0.9, epsilon=1e-3), CE with label smoothing,
         no EMA. bf16: the 'mixed_bfloat16' policy.

`--jax-variant LABEL:key=val,...` adds further JAX workers to the same run (A/B of a model override
such as depthwise_impl=xla, or of `prng=rbg`, `threefry=unrolled`, `xla_flags=...`, `remat=1`, or
`src=DIR`: another checkout's effnetv2_jax, e.g. a git worktree of the commit before a change); by
default one 'jax' worker with the defaults. `env_EFFNETV2_JAX_XLA_DEFAULTS=0` measures without the XLA:CPU flags the
package adds on import (effnetv2_jax/xla_defaults.py). Results are appended to
experiments/results/bench_train_step.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results", "bench_train_step.md")
TAG = "@@"  # worker result lines start with this; everything else a library prints is ignored

TIMM_NAMES = {
  "efficientnetv2-s": "tf_efficientnetv2_s",
  "efficientnetv2-m": "tf_efficientnetv2_m",
  "efficientnetv2-l": "tf_efficientnetv2_l",
  "efficientnetv2-b0": "tf_efficientnetv2_b0",
  "efficientnetv2-b1": "tf_efficientnetv2_b1",
  "efficientnetv2-b2": "tf_efficientnetv2_b2",
  "efficientnetv2-b3": "tf_efficientnetv2_b3",
}
KERAS_NAMES = {
  "efficientnetv2-s": "EfficientNetV2S",
  "efficientnetv2-m": "EfficientNetV2M",
  "efficientnetv2-l": "EfficientNetV2L",
  "efficientnetv2-b0": "EfficientNetV2B0",
  "efficientnetv2-b1": "EfficientNetV2B1",
  "efficientnetv2-b2": "EfficientNetV2B2",
  "efficientnetv2-b3": "EfficientNetV2B3",
}
DROPOUT = {
  "efficientnetv2-b0": 0.2,
  "efficientnetv2-b1": 0.2,
  "efficientnetv2-b2": 0.3,
  "efficientnetv2-b3": 0.3,
  "efficientnetv2-s": 0.2,
  "efficientnetv2-m": 0.3,
  "efficientnetv2-l": 0.4,
}
DROP_PATH = 0.2
NUM_CLASSES = 1000


def _say(**kw):
  print(TAG, json.dumps(kw), flush=True)


def _serve(run_steps):
  """Worker loop: 'run N' -> time N steps; 'quit' -> exit."""
  for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
      return
    n = int(cmd[1])
    t0 = time.perf_counter()
    run_steps(n)
    _say(seconds=time.perf_counter() - t0, steps=n)


# ------------------------------------------------------------------------------------------------
# Workers
def _parse_variant(spec):
  """'a=1,b=x,y' -> {'a': '1', 'b': 'x,y'}: a piece without '=' continues the previous value, so
  a value may hold commas (XLA list flags)."""
  opts, key = {}, None
  for item in filter(None, spec.split(",")):
    if "=" not in item and key is not None:
      opts[key] += "," + item
      continue
    key, v = item.split("=", 1)
    opts[key] = v
  return opts


def _coerce(v):
  if not isinstance(v, str):
    return v
  for cast in (int, float):
    try:
      return cast(v)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(v.lower(), v)


def build_jax_step(model_name, batch, size, dtype_name, opts=None, log=None):
  """-> (jitted step, state, batch, rng, compile seconds). Shared with bench_memory.py.

  `log(message)`, when given, hears each phase as it ends (state built, lowered, compiled), so a
  run cut off by a time limit still tells where its time went.
  """
  log = log or (lambda _: None)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from configs import default
  from effnetv2_jax import models, optim, sharding, state as state_lib, steps

  opts = dict(opts or {})
  dtype = jnp.bfloat16 if dtype_name == "bf16" else jnp.float32
  c = default.get_config()
  c.batch_size = batch
  overrides = {k: _coerce(v) for k, v in opts.items()}
  overrides.setdefault("dropout_rate", DROPOUT.get(model_name, 0.2))
  model = models.create_model(model_name, num_classes=NUM_CLASSES, dtype=dtype, **overrides)
  tx = optim.make_optimizer(c, steps_per_epoch=1000.0, total_steps=100000)
  lr_fn = optim.lr_schedule(c, 1000.0, 100000)
  step = steps.make_train_step(
    model,
    tx,
    num_classes=NUM_CLASSES,
    label_smoothing=c.label_smoothing,
    weight_decay=optim.loss_weight_decay(c),
    ema_decay=c.ema_decay,
    lr_fn=lr_fn,
  )
  mesh = sharding.make_mesh()
  state = sharding.put_replicated(
    state_lib.create_train_state(jax.random.PRNGKey(0), model, tx, size), mesh
  )
  r = np.random.default_rng(0)
  host = {
    "image": r.normal(size=(batch, size, size, 3)).astype(np.float32),
    "label": r.integers(0, NUM_CLASSES, size=batch).astype(np.int32),
  }
  data = sharding.shard_batch(host, mesh)
  rng = jax.device_put(jax.random.PRNGKey(1), sharding.replicated(mesh))
  jax.block_until_ready((state, data))
  log("state and batch on the device")
  jitted = sharding.jit_train_step(step, mesh, state)
  t0 = time.perf_counter()
  lowered = jitted.lower(state, data, rng)
  t1 = time.perf_counter()
  log(f"lowered in {t1 - t0:.1f}s")
  compiled = lowered.compile()
  t2 = time.perf_counter()
  log(f"compiled in {t2 - t1:.1f}s")
  return compiled, state, data, rng, {"trace_s": t1 - t0, "compile_s": t2 - t1}


def jax_runner(compiled, state, data, rng):
  """-> run(n): `n` more train steps of `compiled` on the fixed batch, blocking until they are
  done. The state carries over between calls (it is donated, so the caller's copy is consumed)."""
  import jax

  holder = [state]

  def run(n):
    s = holder[0]
    for _ in range(n):
      s, metrics = compiled(s, data, rng)
    jax.block_until_ready((s, metrics))
    holder[0] = s

  return run


def unroll_threefry_on_cpu():
  """Lower Threefry-2x32 on CPU unrolled, as JAX does on GPU and TPU, instead of its CPU default,
  a 5-trip while loop that costs XLA:CPU ~45 thunks per random draw. Same bits. On B0 (batch 32,
  128 px) it takes the thunks per step from ~3,800 to ~2,250 for ~15% more compile time; the
  thunks it saves are tiny (~1.4 us each untraced), so it is an experiment switch (a private JAX
  API), not a default: `--jax-variant LABEL:threefry=unrolled`, profile_train_step.py --threefry."""
  from jax._src.interpreters import mlir
  from jax._src.random import threefry2x32

  mlir.register_lowering(
    threefry2x32.threefry2x32_p, threefry2x32._threefry2x32_lowering_rule, platform="cpu"
  )


def worker_jax(args, opts):
  if "xla_flags" in opts:
    # Several flags in one variant: join them with '+' (commas separate variant options).
    flags = opts.pop("xla_flags").replace("+", " ")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
  for k in [k for k in opts if k.startswith("env_")]:
    os.environ[k[4:]] = opts.pop(k)
  prng = opts.pop("prng", None)
  threefry = opts.pop("threefry", None)
  opts.pop("src", None)
  import jax

  if prng:
    jax.config.update("jax_default_prng_impl", prng)
  if threefry == "unrolled":
    unroll_threefry_on_cpu()
  compiled, state, data, rng, times = build_jax_step(
    args.model, args.batch, args.image_size, args.dtype, opts
  )
  run = jax_runner(compiled, state, data, rng)
  run(2)  # warm-up: first calls allocate and touch every buffer
  _say(ready=True, version=f"jax {jax.__version__}", **times)
  _serve(run)


def _stub_torchvision():
  """timm imports torchvision (datasets, transforms, FrozenBatchNorm2d) at import time, for its data
  pipeline and BN-freezing helpers. PyPI's torchvision wheels link against CUDA torch, so with the
  CPU torch wheel an empty stand-in answers those imports (in the benchmark process only): every
  name it hands out is a placeholder class that a create_model + train step never touches."""
  import importlib.abc
  import importlib.machinery
  import importlib.util
  import types

  try:
    import torchvision  # noqa: F401  a working install wins

    return
  except Exception:  # pylint: disable=broad-except
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[name]

  class _Meta(type):
    def __getattr__(cls, attr):  # InterpolationMode.NEAREST and the like: more placeholders
      if attr.startswith("__"):
        raise AttributeError(attr)
      return _Meta(attr, (_Placeholder,), {})

  class _Placeholder(metaclass=_Meta):
    def __init__(self, *a, **k):
      raise RuntimeError("torchvision is stubbed out in this benchmark")

  class _Stub(types.ModuleType):
    def __getattr__(self, attr):
      if attr.startswith("__"):
        raise AttributeError(attr)
      return _Meta(attr, (_Placeholder,), {})

  class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
      if name == "torchvision" or name.startswith("torchvision."):
        return importlib.machinery.ModuleSpec(name, self, is_package=True)
      return None

    def create_module(self, spec):
      m = _Stub(spec.name)
      m.__path__ = []
      m.__version__ = "0.0+stub"
      return m

    def exec_module(self, module):
      pass

  sys.meta_path.insert(0, _Finder())


def worker_timm(args, opts):
  import torch

  _stub_torchvision()
  import timm

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  model = timm.create_model(
    TIMM_NAMES[args.model],
    pretrained=False,
    num_classes=NUM_CLASSES,
    drop_rate=DROPOUT.get(args.model, 0.2),
    drop_path_rate=DROP_PATH,
  )
  model.train()
  channels_last = opts.get("channels_last", "0") == "1"
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  opt = torch.optim.RMSprop(
    model.parameters(), lr=1e-3, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=1e-5
  )
  loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
  x = torch.randn(args.batch, 3, args.image_size, args.image_size).contiguous(memory_format=fmt)
  y = torch.randint(0, NUM_CLASSES, (args.batch,))
  bf16 = args.dtype == "bf16"

  def run(n):
    for _ in range(n):
      opt.zero_grad(set_to_none=True)
      with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(model(x), y)
      loss.backward()
      opt.step()

  t0 = time.perf_counter()
  run(2)
  _say(
    ready=True,
    version=f"torch {torch.__version__}, timm {timm.__version__}",
    warmup_s=time.perf_counter() - t0,
  )
  _serve(run)


def worker_keras(args, opts):
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  import keras

  if args.dtype == "bf16":
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
  keras.utils.set_random_seed(0)
  ctor = getattr(keras.applications, KERAS_NAMES[args.model])
  model = ctor(
    weights=None,
    input_shape=(args.image_size, args.image_size, 3),
    classes=NUM_CLASSES,
    include_top=True,
  )
  opt = keras.optimizers.RMSprop(learning_rate=1e-3, rho=0.9, momentum=0.9, epsilon=1e-3)
  loss_fn = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)
  x = tf.random.normal((args.batch, args.image_size, args.image_size, 3))
  y = tf.one_hot(tf.random.uniform((args.batch,), 0, NUM_CLASSES, tf.int32), NUM_CLASSES)

  @tf.function(jit_compile=opts.get("xla", "0") == "1")
  def step(x, y):
    with tf.GradientTape() as tape:
      loss = loss_fn(y, tf.cast(model(x, training=True), tf.float32))
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  def run(n):
    for _ in range(n):
      loss = step(x, y)
    loss.numpy()

  t0 = time.perf_counter()
  run(2)
  _say(
    ready=True,
    version=f"tensorflow {tf.__version__}, keras {keras.__version__}",
    warmup_s=time.perf_counter() - t0,
  )
  _serve(run)


WORKERS = {"jax": worker_jax, "timm": worker_timm, "keras": worker_keras}


# ------------------------------------------------------------------------------------------------
# Parent
class Worker:
  def __init__(self, label, kind, args, variant=""):
    self.label, self.kind = label, kind
    cmd = [
      sys.executable,
      os.path.abspath(__file__),
      "--worker",
      kind,
      "--variant",
      variant,
      "--model",
      args.model,
      "--batch",
      str(args.batch),
      "--image-size",
      str(args.image_size),
      "--dtype",
      args.dtype,
    ]
    self.log = tempfile.NamedTemporaryFile(
      "w+", prefix=f"bench_{label}_", suffix=".log", delete=False
    )
    # `src=DIR` (a variant option) imports effnetv2_jax from another checkout, e.g. a
    # `git worktree` of the commit before a change: before/after in one interleaved run.
    src = _parse_variant(variant).get("src", ROOT)
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    self.proc = subprocess.Popen(
      cmd,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=self.log,
      text=True,
      env=env,
      cwd=ROOT,
    )
    self.info, self.rates = None, []

  def read(self):
    for line in self.proc.stdout:
      if line.startswith(TAG):
        return json.loads(line[len(TAG) :])
    self.log.flush()
    with open(self.log.name) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"{self.label} worker died:\n{tail}")

  def start(self):
    self.info = self.read()

  def time(self, steps, batch):
    self.proc.stdin.write(f"run {steps}\n")
    self.proc.stdin.flush()
    r = self.read()
    self.rates.append(batch * r["steps"] / r["seconds"])

  def close(self):
    try:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.flush()
    except BrokenPipeError:
      pass
    self.proc.wait(timeout=60)


def _available(module):
  import importlib.util

  return importlib.util.find_spec(module) is not None


def _loadavg():
  try:
    return "%.2f %.2f %.2f" % os.getloadavg()
  except OSError:
    return "n/a"


def bench(args):
  contenders = []
  variants = args.jax_variant or ["jax:"]
  for spec in variants:
    label, _, opts = spec.partition(":")
    contenders.append((label, "jax", opts))
  skipped = []
  for kind, module in (("timm", "timm"), ("keras", "keras")):
    if kind in args.frameworks.split(","):
      if kind == "timm" and args.model not in TIMM_NAMES or not _available(module):
        skipped.append(
          f"{kind} (not installed: pip install -e .[bench])"
          if not _available(module)
          else f"{kind} (no such model)"
        )
      else:
        contenders.append((kind, kind, args.timm_variant if kind == "timm" else ""))
  load_before = _loadavg()
  workers = []
  for label, kind, opts in contenders:  # build one at a time: compiles must not overlap timings
    w = Worker(label, kind, args, opts)
    w.start()
    workers.append(w)
    print(f"{label:>10}: ready ({w.info})", flush=True)
  try:
    for r in range(args.rounds):
      order = workers if r % 2 == 0 else workers[::-1]
      for w in order:
        w.time(args.steps, args.batch)
      print(f"round {r}: " + "  ".join(f"{w.label} {w.rates[-1]:.2f}" for w in workers), flush=True)
  finally:
    for w in workers:
      w.close()
  load_after = _loadavg()
  med = {w.label: statistics.median(w.rates) for w in workers}
  ours = med[workers[0].label]
  lines = []
  cmd = "python experiments/bench_train_step.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  lines.append(f"### {args.model}, batch {args.batch} at {args.image_size}px, {args.dtype}")
  lines.append("")
  lines.append(f"`{cmd}`  ")
  lines.append(
    f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} cores, "
    f"load average {load_before} before / {load_after} after; {args.rounds} rounds x "
    f"{args.steps} steps, interleaved, median"
  )
  lines.append("")
  lines.append(
    f"| contender | images/s (median) | min-max | {workers[0].label} / this | version | compile/warm-up |"
  )
  lines.append("|---|---|---|---|---|---|")
  for w in workers:
    setup = {k: round(v, 1) for k, v in w.info.items() if k.endswith("_s")}
    lines.append(
      f"| {w.label} | {med[w.label]:.2f} | {min(w.rates):.2f}-{max(w.rates):.2f} | "
      f"{ours / med[w.label]:.2f}x | {w.info.get('version', '')} | {setup} |"
    )
  if skipped:
    lines.append("")
    lines.append("Skipped: " + ", ".join(skipped))
  lines.append("")
  text = "\n".join(lines)
  print()
  print(text)
  if not args.no_record:
    _record(text)


def _record(text):
  import plotting

  plotting.append_record(
    os.path.basename(RESULTS),
    "# Train-step throughput: effnetv2_jax vs timm vs Keras (same machine, same run)\n\n"
    "Written by `experiments/bench_train_step.py`; see its docstring for what each contender times.",
    text,
  )


# ------------------------------------------------------------------------------------------------
# Compile-time report: cold vs warm persistent cache, two processes.
REPORT_SCRIPT = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import jax
from configs import demo
from effnetv2_jax import progressive, train
c = demo.get_config()
c.compilation_cache_dir = {cache!r}
train.setup_compilation_cache(c)
sys.path.insert(0, {root!r} + '/experiments')
from bench_train_step import build_jax_step
out = []
for st in progressive.stages(c, 60000):
    opts = dict(c.model_overrides.to_dict(), dropout_rate=st.dropout_rate)
    t0 = time.perf_counter()
    _, _, _, _, t = build_jax_step(c.model_name, c.batch_size, st.image_size, 'fp32', opts)
    out.append(dict(size=st.image_size, total_s=time.perf_counter() - t0, **t))
print('@@', json.dumps(out))
"""


def compile_report(args):
  cache = tempfile.mkdtemp(prefix="effnetv2_cache_")
  script = REPORT_SCRIPT.format(root=ROOT, cache=cache)
  runs = {}
  for name in ("cold", "warm"):
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    line = [l for l in p.stdout.splitlines() if l.startswith(TAG)]
    if not line:
      raise RuntimeError(p.stderr[-3000:])
    runs[name] = json.loads(line[0][len(TAG) :])
  n_files = sum(len(f) for _, _, f in os.walk(cache))
  lines = [
    "### Train-step compile time per demo stage: cold vs warm persistent cache",
    "",
    "`python experiments/bench_train_step.py --compile-report`  ",
    f"{time.strftime('%Y-%m-%d %H:%M')}, load average {_loadavg()}; configs/demo.py "
    f"(batch 128), two fresh processes sharing one cache dir ({n_files} cache files "
    "after both). compile = `lowered.compile()` (XLA, or a cache read when warm); trace = "
    "jit tracing + lowering; total includes model/state construction.",
    "",
    "| stage size | cold compile s | warm compile s | cold trace s | warm trace s | cold total s | warm total s |",
    "|---|---|---|---|---|---|---|",
  ]
  for c, w in zip(runs["cold"], runs["warm"]):
    lines.append(
      f"| {c['size']} | {c['compile_s']:.2f} | {w['compile_s']:.2f} | {c['trace_s']:.2f} | "
      f"{w['trace_s']:.2f} | {c['total_s']:.2f} | {w['total_s']:.2f} |"
    )
  text = "\n".join(lines) + "\n"
  print(text)
  if not args.no_record:
    _record(text)


def main():
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--model", default="efficientnetv2-s")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--image-size", type=int, default=128)
  ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
  ap.add_argument("--steps", type=int, default=3, help="train steps per contender per round")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--frameworks", default="timm,keras", help="others besides jax: timm,keras")
  ap.add_argument(
    "--jax-variant",
    action="append",
    help="LABEL:key=val,... (repeatable); the first is the one ratios refer to",
  )
  ap.add_argument("--timm-variant", default="", help="e.g. channels_last=1")
  ap.add_argument("--no-record", action="store_true", help="print only, do not append results")
  ap.add_argument("--compile-report", action="store_true")
  ap.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
  ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    WORKERS[args.worker](args, _parse_variant(args.variant))
  elif args.compile_report:
    compile_report(args)
  else:
    bench(args)


if __name__ == "__main__":
  main()

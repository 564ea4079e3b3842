r"""Train-step throughput: this codebase vs timm (PyTorch) vs Keras applications, in one run.

  python -m experiments.bench_train_step --model efficientnetv2-s --batch 16 --image-size 128
  python -m experiments.bench_train_step --model efficientnetv2-b0 --batch 32 --image-size 128 \
      --dtype bf16
  python -m experiments.bench_train_step --compile-report   # cold vs warm persistent-cache compiles
  python -m experiments.bench_train_step --model efficientnetv2-b0 --batch 32 --image-size 128 \
      --frameworks none --jax-variant jax: --jax-variant before:src=/tmp/before  # vs another commit

Every contender runs in its own worker process (no TF/torch/JAX thread pools fighting in one
process, no import clashes), built and warmed up first. The parent then runs ROUNDS rounds; in each
round every worker in turn times STEPS train steps while the others sleep on a pipe. The reported
figure is the median over rounds, so a neighbour's load that comes and goes hits every contender
alike; the ratios are computed from those medians.

What each contender times (synthetic data already in memory, labels random, 1000 classes):
  jax    common.build_jax_step: the trainer's own step (train.make_stage_step, train.init_state,
         sharding.jit_train_step) for a one-stage run of configs/default.py: forward, backward, L2
         in the loss, label smoothing, TF1-RMSProp with the global-step LR, BN statistics, EMA of
         params and BN stats, the divergence guard; dropout the model's published rate.
  timm   common.timm_train_step: tf_efficientnetv2_<v> (TF-SAME padding, as ours), train mode,
         drop_rate/drop_path_rate as ours, CE with label smoothing 0.1, torch.optim.RMSprop(
         alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=1e-5). NO EMA (timm keeps EMA outside the
         step), so it does slightly less work than ours. bf16: torch.autocast('cpu', bfloat16).
  keras  keras.applications.EfficientNetV2<V>(weights=None), a tf.function step with GradientTape
         (no model.fit), RMSprop(rho=0.9, momentum=0.9, epsilon=1e-3), CE with label smoothing,
         no EMA. bf16: the 'mixed_bfloat16' policy.

`--jax-variant LABEL:key=val,...` adds further JAX workers to the same run (A/B of a model override
such as depthwise_impl=xla or dropout_rate=0.3, or of `prng=rbg`, `xla_flags=A+B`, `remat=1`, or
`src=DIR`: another checkout, e.g. `git worktree add /tmp/before HEAD~1`, whose worker imports that
checkout's effnetv2_jax and configs and builds the step with that checkout's own build_jax_step,
from its experiments/common.py or, in the older layout, its experiments/bench_train_step.py;
its 'version' cell names the checkout). By default one 'jax' worker with the defaults.
`env_EFFNETV2_JAX_XLA_DEFAULTS=0` measures without the XLA:CPU flags the package adds on import
(effnetv2_jax/xla_defaults.py). Results are appended to
experiments/results/bench_train_step.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from experiments import common

MODULE = "experiments.bench_train_step"
RESULTS = "bench_train_step.md"
TITLE = "Train-step throughput: effnetv2_jax vs timm vs Keras (same machine, same run)"

KERAS_NAMES = {
  "efficientnetv2-s": "EfficientNetV2S",
  "efficientnetv2-m": "EfficientNetV2M",
  "efficientnetv2-l": "EfficientNetV2L",
  "efficientnetv2-b0": "EfficientNetV2B0",
  "efficientnetv2-b1": "EfficientNetV2B1",
  "efficientnetv2-b2": "EfficientNetV2B2",
  "efficientnetv2-b3": "EfficientNetV2B3",
}


def _serve(run, version, **info):
  """Worker loop, after two warm-up steps (first calls allocate and touch every buffer) and the
  'ready' report: 'run N' -> time N steps; 'quit' -> exit."""
  t0 = time.perf_counter()
  run(2)
  common.say(dict(ready=True, version=version, **(info or {"warmup_s": time.perf_counter() - t0})))
  for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
      return
    n = int(cmd[1])
    t0 = time.perf_counter()
    run(n)
    common.say(dict(seconds=time.perf_counter() - t0, steps=n))


# ------------------------------------------------------------------------------------------------
# Workers
def parse_variant(spec):
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


def worker_jax(args, opts):
  """The process-wide options first (before JAX starts), then the step: this checkout's, or with
  `src=DIR` that checkout's own step builder (common.step_builder)."""
  if "xla_flags" in opts:
    # Several flags in one variant: join them with '+' (commas separate variant options).
    flags = opts.pop("xla_flags").replace("+", " ")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
  for k in [k for k in opts if k.startswith("env_")]:
    os.environ[k[4:]] = opts.pop(k)
  prng = opts.pop("prng", None)
  src = opts.pop("src", None)
  build = common.step_builder(src)
  import jax

  if prng:
    jax.config.update("jax_default_prng_impl", prng)
  compiled, state, data, rng, times = build(
    args.model, args.batch, args.image_size, args.dtype, opts
  )
  import effnetv2_jax

  version = f"jax {jax.__version__}"
  if src:  # the checkout this worker really imported
    version += f", effnetv2_jax of {os.path.dirname(os.path.dirname(effnetv2_jax.__file__))}"
  _serve(common.jax_runner(compiled, state, data, rng), version, **times)


def worker_timm(args, opts):
  import torch

  torch.set_num_threads(os.cpu_count())
  run = common.timm_train_step(
    args.model,
    args.batch,
    args.image_size,
    bf16=args.dtype == "bf16",
    channels_last=opts.get("channels_last", "0") == "1",
  )
  import timm

  _serve(run, f"torch {torch.__version__}, timm {timm.__version__}")


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
    classes=common.NUM_CLASSES,
    include_top=True,
  )
  opt = keras.optimizers.RMSprop(learning_rate=1e-3, rho=0.9, momentum=0.9, epsilon=1e-3)
  loss_fn = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)
  x = tf.random.normal((args.batch, args.image_size, args.image_size, 3))
  n = common.NUM_CLASSES
  y = tf.one_hot(tf.random.uniform((args.batch,), 0, n, tf.int32), n)

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

  _serve(run, f"tensorflow {tf.__version__}, keras {keras.__version__}")


WORKERS = {"jax": worker_jax, "timm": worker_timm, "keras": worker_keras}


# ------------------------------------------------------------------------------------------------
# Parent
class Worker:
  def __init__(self, label, kind, args, variant=""):
    self.label, self.kind = label, kind
    cmd = [sys.executable, "-m", MODULE, "--worker", kind, "--variant", variant]
    cmd += ["--model", args.model, "--batch", str(args.batch), "--image-size", str(args.image_size)]
    cmd += ["--dtype", args.dtype]
    self.log = tempfile.NamedTemporaryFile(
      "w+", prefix=f"bench_{label}_", suffix=".log", delete=False
    )
    # `src=DIR` (a variant option) benchmarks another checkout, e.g. a `git worktree` of the
    # commit before a change: before/after in one interleaved run. Its worker starts in DIR, so
    # `python -m` puts DIR first on sys.path and `effnetv2_jax` and `configs` are DIR's; the
    # `experiments` package is DIR's too when DIR has one (this layout: its own worker and step),
    # else this checkout's (on PYTHONPATH: a regular package wins over a folder without
    # __init__.py), which then runs DIR's experiments/bench_train_step.py build_jax_step.
    src = parse_variant(variant).get("src")
    path = os.pathsep.join(filter(None, [common.ROOT, os.environ.get("PYTHONPATH")]))
    self.proc = subprocess.Popen(
      cmd,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=self.log,
      text=True,
      env=dict(os.environ, PYTHONPATH=path),
      cwd=os.path.abspath(src) if src else common.ROOT,
    )
    self.info, self.rates = None, []

  def read(self):
    for line in self.proc.stdout:
      if line.startswith(common.TAG):
        return common.tagged(line)[0]
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


def bench(args):
  contenders = []
  variants = args.jax_variant or ["jax:"]
  for spec in variants:
    label, _, opts = spec.partition(":")
    contenders.append((label, "jax", opts))
  skipped = []
  for kind, module in (("timm", "timm"), ("keras", "keras")):
    if kind in args.frameworks.split(","):
      if kind == "timm" and args.model not in common.TIMM_NAMES or not _available(module):
        skipped.append(
          f"{kind} (not installed: pip install -e .[bench])"
          if not _available(module)
          else f"{kind} (no such model)"
        )
      else:
        contenders.append((kind, kind, args.timm_variant if kind == "timm" else ""))
  load_before = common.load_average()
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
  med = {w.label: statistics.median(w.rates) for w in workers}
  ours = med[workers[0].label]
  lines = common.heading(
    f"{args.model}, batch {args.batch} at {args.image_size}px, {args.dtype}",
    common.command(MODULE),
    f"{platform.machine()}, {os.cpu_count()} cores, load average {load_before} before / "
    f"{common.load_average()} after; {args.rounds} rounds x {args.steps} steps, interleaved, "
    "median",
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
  _report(args, "\n".join(lines))


def _report(args, text):
  print()
  common.publish(text, RESULTS, TITLE, MODULE, record=not args.no_record)


# ------------------------------------------------------------------------------------------------
# Compile-time report: cold vs warm persistent cache, two processes.
def compile_report(args):
  cache = tempfile.mkdtemp(prefix="effnetv2_cache_")
  cmd = [sys.executable, "-m", "experiments.compile_report_worker", "--cache", cache]
  runs = {}
  for name in ("cold", "warm"):
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=common.ROOT)
    reports = common.tagged(p.stdout)
    if not reports:
      raise RuntimeError(p.stderr[-3000:])
    runs[name] = reports[0]
  n_files = sum(len(f) for _, _, f in os.walk(cache))
  lines = common.heading(
    "Train-step compile time per demo stage: cold vs warm persistent cache",
    common.command(MODULE),
    f"load average {common.load_average()}; configs/demo.py "
    f"(batch 128), two fresh processes sharing one cache dir ({n_files} cache files "
    "after both). compile = `lowered.compile()` (XLA, or a cache read when warm); trace = "
    "jit tracing + lowering; total includes model/state construction.",
  )
  lines += [
    "",
    "| stage size | cold compile s | warm compile s | cold trace s | warm trace s | cold total s | warm total s |",
    "|---|---|---|---|---|---|---|",
  ]
  for c, w in zip(runs["cold"], runs["warm"]):
    lines.append(
      f"| {c['size']} | {c['compile_s']:.2f} | {w['compile_s']:.2f} | {c['trace_s']:.2f} | "
      f"{w['trace_s']:.2f} | {c['total_s']:.2f} | {w['total_s']:.2f} |"
    )
  _report(args, "\n".join(lines) + "\n")


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
    WORKERS[args.worker](args, parse_variant(args.variant))
  elif args.compile_report:
    compile_report(args)
  else:
    bench(args)


if __name__ == "__main__":
  main()

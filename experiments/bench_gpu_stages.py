r"""Stage switches and per-stage batches on a GPU: EfficientNetV2-S at 128/185/242/300 px, bf16.

  python -m experiments.bench_gpu_stages                   # one H100/H200, synthetic data
  python -m experiments.bench_gpu_stages --dry-run-cpu     # tiny sizes on the CPU: proves it

Issue 18 item 5's GPU row. The run is built as the trainer builds it: configs/imagenet.py
(variant s, preset 'paper': stages 128/185/242/300 px, dropout 0.1 -> 0.3), dtype bfloat16,
batch_size 256 (the reference batch, the last stage's), `plan.resolve` without a dataset (the
registry's ImageNet train size, 1000 classes), the run's optimizer and LR schedule, the fresh
state from `train.init_state`, each stage's step from `train.compile_stage_step` and the
compile thread of `compile_ahead.BackgroundCompiler`. Data are random batches of each stage's
shape (plan_probe.synthetic_batch): no TensorFlow is imported.

In order (a run cut off by `--budget-s` reports what it finished, and the order puts the cheaper
target first):
  1. The state build (`train.init_state`, its jit compile included). Only this reads and fills
     `--compile-cache`; every step compile below is cold (plan_probe.cold_compiles), or the waits
     would mean nothing.
  2. The 128-px comparison: stage 1's step at its 'pixels' batch (B_ref * (300/128)^2, rounded
     down to a multiple of 64, at most `--max-batch`) and the same stage at the constant batch
     (256), both compiled in front (the first is the run's first stage: its cold compile is not
     hidden, as in the trainer), then img/s of each over `--steps` steps with nothing compiling.
     An out-of-memory at the 'pixels' batch halves `--max-batch` (said in the notes).
  3. The stage switches, with the 'pixels' batches: as the trainer does, the next stage's step
     is submitted to the compile thread when a stage starts. A stage trains `--steps` steps
     (img/s while the next compile runs) and then on until that compile is ready, at most
     `--max-stage-s` (0: no cap but the budget): a real stage trains for hours, far longer than
     any compile, so this is the wait a real run sees. Then `--steps` more steps with nothing
     compiling (img/s alone). At the switch: the loop's wait (BackgroundCompiler.get), the next
     stage's first step, and the switch cost = wait + (first step - a steady step): a step that
     compiled again at its first call (a spec mismatch) would show there.

On a GPU the background compile's autotuning (XLA's config-assigner pass, about half of a cold S
compile on the 2026-11-28 H200) times candidate kernels on the device that is training: "img/s
while next compiles" against "img/s alone" shows what that costs the stage, and kernels picked on
a busy device may be slower (the last stage's "img/s alone" at 300 px, batch 256, can be held
against bench_gpu's 2448 img/s there, compiled on an idle device).

Targets (issue 18): at most 10 s per switch (about 145 s compiling at the switch before
compile-ahead) and at least 1.3x img/s at 128 px with the 'pixels' batch against 256. The
measurement runs in a worker process that reports after every phase, so a worker cut off by the
budget still leaves its finished rows. Appends a block to experiments/results/bench_gpu.md
(`--dry-run-cpu` prints only, unless `--record`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

from experiments import common

MODULE = "experiments.bench_gpu_stages"
RESULTS = "bench_gpu.md"
TITLE = "GPU training throughput and MFU: effnetv2_jax vs timm"
SWITCH_TARGET_S = 10.0
RATIO_TARGET = 1.3
# --dry-run-cpu: four stages 32/40/48/56 px of an S-layout net at toy width, a few steps each.
DRY_RUN = dict(min_size=32, max_size=56, batch=8, max_batch=32, batch_multiple=4, steps=2)
TINY_S = dict(
  stem_filters=8, head_filters=32, blocks=("r1_k3_s1_e1_i8_o8_c1", "r1_k3_s2_e4_i8_o16_se0.25")
)


def stage_config(args, rule: str, max_batch: int):
  """configs/imagenet.py (the model's variant, preset 'paper') as this benchmark runs it."""
  from configs import imagenet

  c = imagenet.get_config(f"variant={args.model.removeprefix('efficientnetv2-')},preset=paper")
  c.dtype = "bfloat16"
  c.batch_size = c.eval_batch_size = args.batch
  c.grad_accum_steps = 1
  c.compile_ahead = True
  c.compilation_cache_dir = ""  # the worker sets the cache itself, for the state build only
  p = c.progressive
  p.num_stages, p.min_image_size, p.max_image_size = args.stages, args.min_size, args.max_size
  p.batch_rule, p.max_batch_size, p.batch_multiple = rule, max_batch, args.batch_multiple
  if args.dry_run_cpu:
    for key, value in TINY_S.items():
      c.model_overrides[key] = value
  return c


class _Resolved:
  """One config's run as the trainer resolves it: the plan, its optimizer and LR function."""

  def __init__(self, args, rule, max_batch, num_devices):
    from effnetv2_jax import config_validation, optim, plan
    from effnetv2_jax.data import datasets  # the registry only: no TensorFlow

    num_train = datasets.IMAGENET_OFFICIAL_TRAIN_SIZE
    self.config = stage_config(args, rule, max_batch)
    config_validation.validate_config(
      self.config, num_devices=num_devices, num_train_examples=num_train, check_dataset=False
    )
    self.run = plan.resolve(
      self.config, num_train=num_train, num_classes=common.NUM_CLASSES, num_devices=num_devices
    )
    r = self.run
    self.tx, self.lr_fn = optim.for_run(self.config, r)

  def compile_fn(self, stage, mesh, state_spec, rng):
    from effnetv2_jax import train

    return lambda: train.compile_stage_step(
      self.config, self.run, stage, self.tx, self.lr_fn, mesh, state_spec, rng
    )


def _signalling(compile_fn, ready: threading.Event):
  """`compile_fn` that sets `ready` when it ends (also when it fails: the switch then raises)."""

  def run():
    try:
      return compile_fn()
    finally:
      ready.set()

  return run


def _is_oom(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def worker(args):
  t_start = time.perf_counter()
  deadline = t_start + (args.deadline_s or float("inf"))

  def log(msg):
    print(f"[stages {time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

  import jax

  from effnetv2_jax import compile_ahead, plan_probe, sharding, train

  mesh = sharding.make_mesh()
  n = int(mesh.size)
  out = {"device": mesh.devices.flat[0].device_kind, "num_devices": n, "jax": jax.__version__}
  out.update(stages=[], notes=[], sizes=[], batches=[], done=False)
  pixels = _Resolved(args, "pixels", args.max_batch, n)
  const = _Resolved(args, "constant", args.max_batch, n)
  out["sizes"] = [s.image_size for s in pixels.run.stages]
  out["batches"] = [s.batch_size for s in pixels.run.stages]
  common.say(out)

  # 1. The state (the one thing the persistent cache may hold).
  t0 = time.perf_counter()
  if args.compile_cache:
    cached = pixels.config.copy_and_resolve_references()
    cached.compilation_cache_dir = args.compile_cache
    train.setup_compilation_cache(cached)
  first = pixels.run.stages[0]

  def fresh_state():
    model = train.build_model(pixels.config, pixels.run.num_classes, first.dropout_rate)
    return jax.block_until_ready(
      train.init_state(pixels.config, model, pixels.tx, first.image_size, mesh)
    )

  holder = [fresh_state()]
  out["init_s"], out["cache"] = time.perf_counter() - t0, args.compile_cache or "none"
  log(f"state built in {out['init_s']:.1f}s")
  common.say(out)
  state_spec = train.spec_of(holder[0])
  rng = jax.device_put(jax.random.PRNGKey(pixels.config.seed), sharding.replicated(mesh))

  def steps(compiled, batch, count):
    """`count` steps, dispatched back to back, then waited for: -> seconds per step."""
    t = time.perf_counter()
    s = holder[0]
    for _ in range(count):
      s, metrics = compiled(s, batch, rng)  # the state is donated
    jax.block_until_ready((s, metrics))
    holder[0] = s
    return (time.perf_counter() - t) / count

  def data(stage, batch_size):
    return plan_probe.synthetic_batch(
      mesh, batch_size, stage.image_size, common.NUM_CLASSES, seed=stage.index
    )

  with plan_probe.cold_compiles():
    compiler = compile_ahead.BackgroundCompiler(True)
    key = lambda s: f"stage {s.index + 1}/{len(pixels.run.stages)} ({s.image_size}px)"

    # 2. The 128-px comparison, both steps compiled in front and timed with nothing compiling.
    max_batch = args.max_batch
    while True:
      first = pixels.run.stages[0]
      step0, c0, w0 = compiler.get(key(first), pixels.compile_fn(first, mesh, state_spec, rng))
      log(f"{key(first)} at batch {first.batch_size} compiled in front in {c0:.1f}s")
      try:
        batch0 = data(first, first.batch_size)
        steps(step0.compiled, batch0, args.warmup)
        pix_s = steps(step0.compiled, batch0, args.steps)
        break
      except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError)
        if not _is_oom(e) or first.batch_size <= args.batch:
          raise
        out["notes"].append(
          f"out of memory at the 'pixels' batch {first.batch_size} ({first.image_size}px): "
          f"max_batch_size halved to {max_batch // 2}"
        )
        max_batch //= 2
        pixels = _Resolved(args, "pixels", max_batch, n)
        out["batches"] = [s.batch_size for s in pixels.run.stages]
        if any(x.is_deleted() for x in jax.tree.leaves(holder[0])):
          holder[0] = fresh_state()  # the failed step had consumed the donated state
        log(out["notes"][-1])
    row0 = dict(
      index=0,
      size=first.image_size,
      batch=first.batch_size,
      compile_s=c0,
      wait_s=w0,
      first_step_s=None,
      peak_bytes=step0.peak_bytes,
      cold_in_front=True,
    )
    c_stage = const.run.stages[0]
    step_c, cc, _ = compiler.get(("constant",), const.compile_fn(c_stage, mesh, state_spec, rng))
    batch_c = data(c_stage, c_stage.batch_size)
    steps(step_c.compiled, batch_c, args.warmup)
    const_s = steps(step_c.compiled, batch_c, args.steps)
    out["ratio"] = dict(
      size=first.image_size,
      constant_batch=c_stage.batch_size,
      constant_ips=c_stage.batch_size / const_s,
      constant_compile_s=cc,
      pixels_batch=first.batch_size,
      pixels_ips=first.batch_size / pix_s,
    )
    del step_c, batch_c
    log(f"128-px comparison: {out['ratio']}")
    common.say(out)

    # 3. The stage switches, 'pixels' batches, compile-ahead as in the trainer.
    table = pixels.run.stages
    current, batch, row = step0, batch0, row0
    for stage in table:
      if stage.index > 0:
        spec = train.spec_of(holder[0])
        fallback = pixels.compile_fn(stage, mesh, spec, rng)  # only if nothing was submitted
        current, compile_s, wait_s = compiler.get(key(stage), fallback)
        batch = data(stage, stage.batch_size)
        t = time.perf_counter()
        steps(current.compiled, batch, 1)
        row = dict(
          index=stage.index,
          size=stage.image_size,
          batch=stage.batch_size,
          compile_s=compile_s,
          wait_s=wait_s,
          first_step_s=time.perf_counter() - t,
          peak_bytes=current.peak_bytes,
          cold_in_front=False,
        )
      t_stage, trained = time.perf_counter(), 0
      if stage.index + 1 < len(table):
        nxt = table[stage.index + 1]
        ready = threading.Event()
        compiler.submit(
          key(nxt), _signalling(pixels.compile_fn(nxt, mesh, train.spec_of(holder[0]), rng), ready)
        )
        row["overlap_step_s"] = steps(current.compiled, batch, args.steps)
        trained = args.steps
        cap = t_stage + args.max_stage_s if args.max_stage_s > 0 else deadline
        while not ready.is_set() and time.perf_counter() < min(cap, deadline):
          steps(current.compiled, batch, args.steps)
          trained += args.steps
        if not ready.is_set() and time.perf_counter() >= deadline:
          row.update(train_s=time.perf_counter() - t_stage, train_steps=trained)
          out["stages"].append(row)
          out["notes"].append(
            f"budget: stopped in stage {stage.index + 1} while the next step was still compiling"
          )
          log(out["notes"][-1])
          common.say(out)
          return  # the compile thread cannot be interrupted; main() exits without it
      if trained == 0 or ready.is_set():
        row["alone_step_s"] = steps(current.compiled, batch, args.steps)
        trained += args.steps
      row.update(train_s=time.perf_counter() - t_stage, train_steps=trained)
      out["stages"].append(row)
      log(f"{key(stage)}: {row}")
      common.say(out)
    compiler.close()
  out["done"] = True
  out["tensorflow_imported"] = "tensorflow" in sys.modules
  common.say(out)


# ------------------------------------------------------------------------------------------------
def _met(ok: bool) -> str:
  return "**met**" if ok else "**missed**"


def format_report(rep: dict | None, *, title: str, cmd: str, wall_s: float, failed=None) -> str:
  """The markdown block from the worker's last report (pure: tests/test_bench_gpu_stages.py)."""
  rep = rep or {}
  device = rep.get("device", "?")
  facts = f"wall {wall_s:.0f}s; {rep.get('num_devices', '?')} x {device}; jax {rep.get('jax', '?')}"
  if "init_s" in rep:
    facts += f"; state build {rep['init_s']:.1f}s (compile cache for it: {rep['cache']})"
  lines = common.heading(title, cmd, facts)
  lines += [
    "",
    (
      "Step compiles cold (persistent cache off). Stage 1 compiles in front; each later stage on "
      "the compile thread while the stage before trains (at least the timed steps, then until "
      "the compile is ready). switch s = wait + (first step - steady step)."
    ),
    "",
    (
      "| stage | size | batch | peak MiB | compile s | wait s | first step s | switch s | "
      "trained s (steps) | img/s while next compiles | img/s alone |"
    ),
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  rows = {r["index"]: r for r in rep.get("stages", [])}
  switches = []
  for i, (size, batch) in enumerate(zip(rep.get("sizes", []), rep.get("batches", []))):
    r = rows.get(i)
    if r is None:
      lines.append(f"| {i + 1} | {size} | {batch} | not reached |  |  |  |  |  |  |  |")
      switches.append(None)
      continue
    ips = lambda key, r=r: f"{r['batch'] / r[key]:.1f}" if r.get(key) else "n/a"
    steady = r.get("alone_step_s") or r.get("overlap_step_s") or 0.0
    mib = f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") else "?"
    if r["cold_in_front"]:
      first, switch = "", "(cold, in front)"
    else:
      cost = r["wait_s"] + max(0.0, r["first_step_s"] - steady)
      switches.append(cost)
      first, switch = f"{r['first_step_s']:.2f}", f"{cost:.2f}"
    lines.append(
      f"| {i + 1} | {r['size']} | {r['batch']} | {mib} | {r['compile_s']:.1f} | "
      f"{r['wait_s']:.2f} | {first} | {switch} | {r['train_s']:.1f} ({r['train_steps']}) | "
      f"{ips('overlap_step_s')} | {ips('alone_step_s')} |"
    )
  lines.append("")
  ratio = rep.get("ratio")
  if ratio:
    x = ratio["pixels_ips"] / ratio["constant_ips"]
    lines.append(
      f"- {ratio['size']} px, nothing compiling: constant batch {ratio['constant_batch']} "
      f"{ratio['constant_ips']:.1f} img/s, 'pixels' batch {ratio['pixels_batch']} "
      f"{ratio['pixels_ips']:.1f} img/s: ratio {x:.2f}x (target: at least {RATIO_TARGET}x): "
      f"{_met(x >= RATIO_TARGET)}."
    )
  else:
    lines.append(f"- 128-px comparison: not reached (target: at least {RATIO_TARGET}x).")
  done = [s for s in switches if s is not None]
  if done:
    waits = "/".join("n/a" if s is None else f"{s:.2f}" for s in switches)
    complete = " (later switches not measured)" if len(done) < len(switches) else ""
    lines.append(
      f"- Switch cost per switch: {waits} s (target: at most {SWITCH_TARGET_S:g} s each): "
      f"{_met(max(done) <= SWITCH_TARGET_S)}{complete}."
    )
  else:
    lines.append(f"- Switches: none reached (target: at most {SWITCH_TARGET_S:g} s each).")
  notes = list(rep.get("notes", [])) + ([failed] if failed else [])
  if rep.get("tensorflow_imported"):
    notes.append("TensorFlow was imported (it must not be)")
  if notes:
    lines += ["", "Notes: " + "; ".join(notes)]
  return "\n".join(lines) + "\n"


def _run_worker(args, argv, log_dir):
  cmd = [sys.executable, "-m", MODULE, "--worker"] + argv
  env = dict(os.environ, PYTHONPATH=common.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if args.dry_run_cpu:
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  log_path = os.path.join(log_dir, "stages_worker.log")
  with open(log_path, "w") as err:
    try:
      p = subprocess.run(
        cmd,
        check=False,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env=env,
        timeout=args.budget_s,
        cwd=common.ROOT,
      )
      stdout, failed = p.stdout, p.returncode and f"worker exit {p.returncode}"
    except subprocess.TimeoutExpired as e:
      stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
      stdout, failed = stdout or "", f"worker cut off at the {args.budget_s:.0f}s budget"
  with open(log_path, errors="replace") as f:
    tail = f.read().splitlines()[-30:]
  if failed:
    sys.stderr.write("\n".join(tail) + "\n")
    phases = [line for line in tail if line.startswith("[stages")]
    failed += f" (last: {(phases or tail or [''])[-1]!r}; log {log_path})"
  reports = common.tagged(stdout)
  return (reports[-1] if reports else None), failed


def parse_args(argv):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--model", default="efficientnetv2-s")
  ap.add_argument("--min-size", type=int, default=128)
  ap.add_argument("--max-size", type=int, default=300)
  ap.add_argument("--stages", type=int, default=4)
  ap.add_argument("--batch", type=int, default=256, help="the constant (reference) batch")
  ap.add_argument("--max-batch", type=int, default=1024, help="cap of the 'pixels' batches")
  ap.add_argument("--batch-multiple", type=int, default=64)
  ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument(
    "--max-stage-s", type=float, default=0.0, help="cap on a stage's training (0: the budget)"
  )
  ap.add_argument("--budget-s", type=float, default=None, help="450 on a GPU, 300 dry run")
  ap.add_argument("--compile-cache", default="", help="persistent cache for the state build only")
  ap.add_argument("--log-dir", default="", help="where the worker's stderr goes")
  ap.add_argument("--dry-run-cpu", action="store_true", help="tiny sizes on the CPU")
  ap.add_argument("--record", action="store_true", help="record a --dry-run-cpu run too")
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--deadline-s", type=float, default=0.0, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.dry_run_cpu and not args.worker:
    for k, v in DRY_RUN.items():
      setattr(args, k, v)
    args.warmup = 1
  if args.budget_s is None:
    args.budget_s = 300.0 if args.dry_run_cpu else 450.0
  return args


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.worker:
    code = 0
    try:
      worker(args)
    except BaseException:  # pylint: disable=broad-except  (reported; the parent reads the log)
      import traceback

      traceback.print_exc()
      code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no waiting on a compile thread nobody needs any more
  t0 = time.perf_counter()
  keys = ("model", "min_size", "max_size", "stages", "batch", "max_batch", "batch_multiple")
  keys += ("steps", "warmup", "max_stage_s", "compile_cache")
  wargv = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keys]
  # The worker stops training a few seconds before the parent's deadline, to report.
  wargv.append(f"--deadline-s={max(args.budget_s - 15.0, args.budget_s * 0.9)}")
  if args.dry_run_cpu:
    wargv.append("--dry-run-cpu")
  log_dir = args.log_dir or tempfile.mkdtemp(prefix="bench_gpu_stages_")
  os.makedirs(log_dir, exist_ok=True)
  rep, failed = _run_worker(args, wargv, log_dir)
  title = (
    f"Stage switches and per-stage batches: {args.model}, bf16, {(rep or {}).get('device', '?')}"
    + (" (CPU dry run, tiny sizes)" if args.dry_run_cpu else "")
  )
  wall_s = time.perf_counter() - t0
  text = format_report(
    rep, title=title, cmd=common.command(MODULE, argv), wall_s=wall_s, failed=failed
  )
  common.publish(text, RESULTS, TITLE, MODULE, record=not args.dry_run_cpu or args.record)
  return rep, text


if __name__ == "__main__":
  main()

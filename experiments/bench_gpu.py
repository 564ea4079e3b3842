r"""GPU training throughput and MFU: this codebase vs timm, EfficientNetV2-S at 300 and 384, bf16.

  python -m experiments.bench_gpu                      # one H100/H200, < 8 minutes, synthetic data
  python -m experiments.bench_gpu --torch-compile      # timm also under torch.compile
  python -m experiments.bench_gpu --dry-run-cpu        # tiny sizes on the CPU: proves the script

No TensorFlow is imported (the train step and models never import it). Each contender runs in its
own subprocess, one after the other, so neither holds GPU memory while the other measures.

  jax   the trainer's full step (common.build_jax_step: forward, backward, L2, label
        smoothing, TF1-RMSProp, BN statistics, EMA, divergence guard), compute dtype bf16 (params,
        optimizer, EMA and BN statistics fp32). Batch: compile once at a probe batch, read XLA's
        buffer assignment (`memory_analysis()`), take the largest power of two whose temp + state
        fits 90% of the device; halve on an out-of-memory at run time.
  timm  common.timm_train_step: tf_efficientnetv2_s (same TF-SAME architecture), channels_last,
        torch.autocast bf16, RMSprop(alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=1e-5), CE with
        label smoothing, no EMA; batch by doubling until out of memory. `--torch-compile` compiles
        the model. Both use the model's published dropout (models.model_defaults).

Diagnostics for a worker that does not finish in its budget (both off by default):
  --xla-pass-times   XLA logs each HLO pass's time (TF_CPP_VMODULE=hlo_pass_pipeline=1); the
                     passes that took longest are summarised in the Notes, so a slow compile names
                     its pass.
  --stack-every S    every S seconds the worker logs its main thread's Python stack, so a
                     cut-off run shows whether it was tracing, compiling or running.
Each worker's stderr goes to `<--log-dir>/<worker>_worker.log` (default: a temporary folder).

MFU = images/s * (3 * 2 * MACs per image, forward MACs from models.count_macs) / peak dense bf16
FLOP/s of the device (H100 SXM / H200: 989e12; `--peak-tflops` overrides). Appends a row block to
experiments/results/bench_gpu.md (`--dry-run-cpu` prints only, unless `--record`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from experiments import common

MODULE = "experiments.bench_gpu"
PEAK_BF16 = (
  ("H200", 989e12),
  ("H100 PCIe", 756e12),
  ("H100", 989e12),
  ("A100", 312e12),
  ("L4", 121e12),
)


def _print_stack_every(seconds, log):
  """A daemon thread that logs the main thread's Python stack every `seconds`. (faulthandler's
  dump_traceback_later does this without the GIL and crashed the worker mid-trace here.)"""
  import threading
  import traceback

  main_id = threading.main_thread().ident

  def loop():
    while True:
      time.sleep(seconds)
      frame = sys._current_frames().get(main_id)
      if frame is not None:
        stack = traceback.format_stack(frame)[-6:]
        log("main thread is at:\n" + "".join(stack).rstrip())

  threading.Thread(target=loop, daemon=True).start()


# ------------------------------------------------------------------------------------------------
def _row(args, size, batch, images_per_s, compile_s):
  """One measured size of a worker's report, with the model's forward MACs for the MFU."""
  from effnetv2_jax import models

  macs = models.count_macs(args.model, size)
  return dict(size=size, batch=batch, images_per_s=images_per_s, compile_s=compile_s, macs=macs)


def jax_worker(args):
  t_start = time.perf_counter()

  def log(msg):  # stderr, timestamped: the parent shows the tail when a worker is cut off
    print(f"[jax {time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

  if args.stack_every > 0:
    _print_stack_every(args.stack_every, log)
  import jax

  if args.compile_cache:
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  assert "tensorflow" not in sys.modules, "the GPU benchmark must not import TensorFlow"
  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  limit = stats.get("bytes_limit", args.cpu_memory_gib * 2**30)
  out = {"device": dev.device_kind, "jax": jax.__version__, "rows": []}
  for size in args.sizes:
    probe = args.probe_batch
    log(f"{size}px: building the step at batch {probe}")
    compiled, state, data, rng, t = common.build_jax_step(args.model, probe, size, "bf16", log=log)
    mem = compiled.memory_analysis()
    per_image = mem.temp_size_in_bytes / probe
    fixed = mem.argument_size_in_bytes
    batch = probe
    while batch * 2 <= args.max_batch and fixed + per_image * batch * 2 < 0.9 * limit:
      batch *= 2
    while True:
      try:
        if batch != probe:
          del compiled, state, data
          compiled, state, data, rng, t = common.build_jax_step(
            args.model, batch, size, "bf16", log=log
          )
        run = common.jax_runner(compiled, state, data, rng)
        run(args.warmup)
        log(f"{size}px batch {batch}: {args.warmup} warm-up steps done")
        break
      except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED
        if (
          "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower() or batch <= 1
        ):
          raise
        batch //= 2
        probe = -1  # force a fresh compile at the smaller batch
    ips = common.throughput(run, batch, args.steps, warmup=0)
    row = _row(args, size, batch, ips, t["compile_s"])
    out["rows"].append(dict(row, per_image_mib=per_image / 2**20))
    print(
      f"jax {size}px batch {batch}: {ips:.1f} img/s (compile {t['compile_s']:.0f}s)",
      file=sys.stderr,
      flush=True,
    )
    common.say(out)  # after every size: a worker cut off by the budget still reports it
    del compiled, run, data, state
  common.say(out)


def timm_worker(args):
  import torch

  common.stub_torchvision()
  import timm

  assert "tensorflow" not in sys.modules
  cuda = torch.cuda.is_available() and not args.dry_run_cpu
  dev = "cuda" if cuda else "cpu"
  torch.backends.cudnn.benchmark = True
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  out = {
    "device": torch.cuda.get_device_name() if cuda else "cpu",
    "torch": torch.__version__,
    "timm": timm.__version__,
    "rows": [],
  }

  def make(batch, size, compile_model):
    return common.timm_train_step(
      args.model,
      batch,
      size,
      bf16=True,
      device=dev,
      channels_last=True,
      compile_model=compile_model,
    )

  def fits(batch, size):
    try:
      make(batch, size, False)(2)
      return True
    except torch.cuda.OutOfMemoryError:
      return False
    finally:
      if cuda:
        torch.cuda.empty_cache()

  for size in args.sizes:
    batch = args.probe_batch
    while batch * 2 <= args.max_batch and fits(batch * 2, size):
      batch *= 2
    if cuda:
      torch.cuda.empty_cache()
    t0 = time.perf_counter()
    run = make(batch, size, args.torch_compile)
    run(args.warmup)
    setup = time.perf_counter() - t0
    ips = common.throughput(run, batch, args.steps, warmup=0)
    out["rows"].append(_row(args, size, batch, ips, setup))
    print(f"timm {size}px batch {batch}: {ips:.1f} img/s", file=sys.stderr, flush=True)
    common.say(out)
    del run
    if cuda:
      torch.cuda.empty_cache()
  common.say(out)


# ------------------------------------------------------------------------------------------------
def _peak(device_kind, override):
  if override:
    return override * 1e12
  for key, flops in PEAK_BF16:
    if key in device_kind:
      return flops
  return None


_PASS_LINE = re.compile(r"HLO pass: (\S+) time: .*?\((\d+) us\)")


def summarize_pass_times(log_text, top=8):
  """-> [(pass name, total seconds, calls)], the `top` slowest HLO passes in an XLA log written
  with TF_CPP_VMODULE=hlo_pass_pipeline=1 (per run: 'HLO pass: NAME time: 1.2 ms (1234 us) ...')."""
  total, calls = {}, {}
  for name, us in _PASS_LINE.findall(log_text):
    total[name] = total.get(name, 0) + int(us)
    calls[name] = calls.get(name, 0) + 1
  ranked = sorted(total, key=total.get, reverse=True)[:top]
  return [(n, total[n] / 1e6, calls[n]) for n in ranked]


def _run_worker(kind, argv, timeout, log_dir, pass_times=False):
  cmd = [sys.executable, "-m", MODULE, "--worker", kind] + argv
  env = dict(os.environ, PYTHONPATH=common.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if "--dry-run-cpu" in argv:
    env["JAX_PLATFORMS"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
  if pass_times and kind == "jax":
    env.update(TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="hlo_pass_pipeline=1")
  log_path = os.path.join(log_dir, f"{kind}_worker.log")
  # stderr to a file, not a pipe: XLA's pass log can be large, and a cut-off worker's file keeps
  # everything it wrote.
  with open(log_path, "w") as err:
    try:
      p = subprocess.run(
        cmd,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env=env,
        timeout=timeout,
        cwd=common.ROOT,
      )
      stdout, failed = p.stdout, p.returncode and f"exit {p.returncode}"
    except subprocess.TimeoutExpired as e:
      stdout = (
        e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
      )
      failed = f"timed out after {timeout:.0f}s"
  with open(log_path, errors="replace") as f:
    stderr = f.read()
  reports = common.tagged(stdout)
  ours = [l for l in stderr.splitlines() if "hlo_pass_pipeline" not in l]  # XLA's pass log out
  if failed:
    sys.stderr.write("\n".join(ours[-40:]) + "\n")
  notes = []
  if pass_times and kind == "jax":
    passes = summarize_pass_times(stderr)
    notes.append(
      "slowest XLA passes: "
      + (", ".join(f"{n} {t:.1f}s/{c}" for n, t, c in passes) or "none logged")
    )
  # The last phase the worker logged says where a cut-off run spent its time (library warnings,
  # e.g. the autotuner's, would otherwise be the last line).
  phases = [l for l in ours if l.startswith(f"[{kind}")]
  last = (phases or ours or [""])[-1]
  if failed:
    failed += f" (last: {last!r})"
  if not reports:
    return None, "; ".join([f"{kind} failed ({failed})"] + notes)
  # The worker reports after every size, so a cut-off run keeps the sizes it finished.
  head = f"{kind}: {failed}; sizes it finished are shown" if failed else None
  return reports[-1], "; ".join(filter(None, [head] + notes)) or None


def main():
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--model", default="efficientnetv2-s")
  ap.add_argument("--sizes", default="300,384")
  ap.add_argument("--probe-batch", type=int, default=32)
  ap.add_argument("--max-batch", type=int, default=1024)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--torch-compile", action="store_true")
  ap.add_argument("--skip-timm", action="store_true")
  ap.add_argument("--peak-tflops", type=float, default=0.0, help="override the device peak")
  ap.add_argument(
    "--budget-s",
    type=float,
    default=None,
    help="wall budget for both workers (450 on a GPU, 1800 for --dry-run-cpu)",
  )
  ap.add_argument(
    "--dry-run-cpu",
    action="store_true",
    help="CPU, sizes 64,96, batches 2-4, 2 steps: proves the script end to end",
  )
  ap.add_argument(
    "--jax-share",
    type=float,
    default=0.6,
    help="fraction of --budget-s the jax worker gets when timm runs too",
  )
  ap.add_argument(
    "--xla-pass-times",
    action="store_true",
    help="log XLA's per-pass compile times and name the slowest in the Notes",
  )
  ap.add_argument(
    "--stack-every",
    type=float,
    default=0.0,
    help="print the jax worker's Python stack every S seconds (0: never)",
  )
  ap.add_argument("--compile-cache", default="", help="persistent XLA compilation cache folder")
  ap.add_argument("--log-dir", default="", help="where each worker's stderr is written")
  ap.add_argument("--cpu-memory-gib", type=float, default=4.0, help=argparse.SUPPRESS)
  ap.add_argument("--record", action="store_true", help="record a --dry-run-cpu run too")
  ap.add_argument("--worker", choices=("jax", "timm"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.dry_run_cpu and not args.worker:
    args.sizes, args.probe_batch, args.max_batch, args.steps, args.warmup = "64,96", 2, 4, 2, 1
  if args.budget_s is None:
    args.budget_s = 1800.0 if args.dry_run_cpu else 450.0
  args.sizes = [int(s) for s in str(args.sizes).split(",")]
  if args.worker:
    (jax_worker if args.worker == "jax" else timm_worker)(args)
    return

  t0 = time.perf_counter()
  argv = [
    "--model",
    args.model,
    "--sizes",
    ",".join(map(str, args.sizes)),
    "--probe-batch",
    str(args.probe_batch),
    "--max-batch",
    str(args.max_batch),
    "--steps",
    str(args.steps),
    "--warmup",
    str(args.warmup),
    "--stack-every",
    str(args.stack_every),
    "--compile-cache",
    args.compile_cache,
  ]
  if args.torch_compile:
    argv.append("--torch-compile")
  if args.dry_run_cpu:
    argv.append("--dry-run-cpu")
  results, notes = {}, []
  log_dir = args.log_dir or tempfile.mkdtemp(prefix="bench_gpu_")
  os.makedirs(log_dir, exist_ok=True)
  jax_budget = args.budget_s * (args.jax_share if not args.skip_timm else 1.0)
  results["jax"], err = _run_worker("jax", argv, jax_budget, log_dir, args.xla_pass_times)
  if err:
    notes.append(err)
  if not args.skip_timm:
    left = args.budget_s - (time.perf_counter() - t0)
    results["timm"], err = _run_worker("timm", argv, max(left, 30.0), log_dir)
    if err:
      notes.append(err)
  wall = time.perf_counter() - t0

  device = (results.get("jax") or results.get("timm") or {}).get("device", "?")
  peak = _peak(device, args.peak_tflops)
  versions = ", ".join(
    f"{k}: " + ", ".join(f"{a} {b}" for a, b in v.items() if a not in ("rows", "device"))
    for k, v in results.items()
    if v
  )
  lines = common.heading(
    f"{args.model}, bf16, {device}" + (" (CPU dry run, tiny sizes)" if args.dry_run_cpu else ""),
    common.command(MODULE),
    f"wall {wall:.0f}s; {versions}"
    + (f"; peak bf16 {peak / 1e12:.0f} TFLOP/s" if peak else "; peak unknown (no MFU)"),
  )
  lines += [
    "",
    "| size | contender | batch | images/s | MFU | jax / timm | compile or warm-up s |",
    "|---|---|---|---|---|---|---|",
  ]
  by = {k: {r["size"]: r for r in v["rows"]} for k, v in results.items() if v}
  for size in args.sizes:
    for k in ("jax", "timm"):
      r = by.get(k, {}).get(size)
      if not r:
        continue
      mfu = f"{r['images_per_s'] * 6 * r['macs'] / peak:.1%}" if peak else "n/a"
      other = by.get("timm", {}).get(size) if k == "jax" else None
      ratio = f"{r['images_per_s'] / other['images_per_s']:.2f}x" if other else ""
      lines.append(
        f"| {size} | {k} | {r['batch']} | {r['images_per_s']:.1f} | {mfu} | {ratio} | "
        f"{r['compile_s']:.0f} |"
      )
  if notes:
    lines += ["", "Notes: " + "; ".join(notes)]
  text = "\n".join(lines) + "\n"
  print(text)
  if not args.dry_run_cpu or args.record:
    common.append_result(
      "bench_gpu.md", "GPU training throughput and MFU: effnetv2_jax vs timm", MODULE, text
    )


if __name__ == "__main__":
  main()

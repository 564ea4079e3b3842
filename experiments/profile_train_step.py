r"""Where a train step's time goes: this codebase (jax.profiler) beside timm (torch.profiler).

  python -m experiments.profile_train_step --model efficientnetv2-b0 --batch 32 --image-size 128
  python -m experiments.profile_train_step ... --no-timm --no-record

jax: builds the same full train step as bench_train_step (common.build_jax_step), warms it up,
traces `--steps` steps with `jax.profiler.trace`, and reads the Perfetto trace. Every XLA:CPU thunk
event names the HLO instruction it ran (`args.hlo_op`); the compiled module's text maps that
instruction to the JAX source path in its metadata (`op_name`, which carries the Flax module path,
e.g. `.../blocks_3/dw/conv/...`) and to forward (`jvp(`), backward (`transpose(`) or the update
(optimizer, EMA, BN statistics, divergence guard). Thunk times are summed per (component, phase) and
divided by the number of steps.

timm: the same model and batch in PyTorch (bench_train_step's timm contender,
common.timm_train_step: RMSprop, label-smoothed CE, channels-last off, autocast under bf16),
`torch.profiler` self CPU time per aten op, with convolutions split into depthwise (weight
[C, 1, k, k]) and dense by their recorded input shapes.

Thunks can overlap on the two cores, so the summed times can exceed the wall time per step; both
are shown, with the count of thunks (jax) or kernels (timm: torch ops that call no other op) per
step and the time between them: for jax, the traced wall time minus the time at least one thunk was
running; for timm, the traced wall time minus the summed self time (its ops run one after another).
The untraced wall time per step is shown too (the tracer has a cost of its own), and for jax how
much of the idle time lies in gaps over 1 ms: idle time spread over thousands of tiny gaps is
dispatch overhead, a few long gaps after big convolutions and dots are something else (their
work on the intra-op thread pool, or a busy machine taking the cores away).
Appends to experiments/results/profile_train_step.md unless --no-record.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from experiments import common

MODULE = "experiments.profile_train_step"

# (component, predicate on the op_name path), first match wins.
COMPONENTS = (
  ("squeeze-excite", lambda p: "/se/" in p),
  ("depthwise conv", lambda p: "/dw/conv" in p),
  ("batch norm", lambda p: "/bn/" in p or "/bn" == p[-3:]),
  (
    "dense conv (stem, expand, project, head)",
    lambda p: "conv_general_dilated" in p or "/conv/" in p,
  ),
  ("dropout, drop-path", lambda p: "drop_path" in p or "Dropout" in p),
  (
    "activation (swish)",
    lambda p: (
      re.search(r"/(logistic|mul|neg|exp)(\b|$)", p) is not None
      and ("jvp(" in p or "transpose(" in p)
    ),
  ),
  ("classifier, loss", lambda p: "Dense" in p or "log_softmax" in p or "softmax" in p),
)


def classify(op_name: str) -> tuple[str, str]:
  if "transpose(" in op_name:
    phase = "backward"
  elif "jvp(" in op_name:
    phase = "forward"
  else:
    phase = "update"
  for name, pred in COMPONENTS:
    if pred(op_name):
      return name, phase
  return ("other model ops" if phase != "update" else "optimizer, EMA, guard, BN stats"), phase


def classify_unsourced(hlo_op: str) -> tuple[str, str]:
  """Instructions XLA created without source metadata: layout copies and transposes (of weights and
  activations), and the weight-gradient convolutions."""
  base = hlo_op.split(".")[0]
  if base.startswith("copy") or "transpose" in base:
    return "layout copies, transposes (XLA-inserted)", "no source"
  if base.startswith("convolution"):
    return "dense conv (stem, expand, project, head)", "backward"
  return "unattributed XLA ops", "no source"


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def hlo_op_names(hlo_text: str) -> dict:
  """instruction name -> source op_name; fusions take the first op_name inside their computation."""
  own, calls, first_in = {}, {}, {}
  comp = None
  for line in hlo_text.splitlines():
    m = _COMP.match(line)
    if m and "=" not in line.split("{")[0]:
      comp = m.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name = m.group(1)
    o = _OPNAME.search(line)
    if o:
      own[name] = o.group(1)
      if comp and comp not in first_in:
        first_in[comp] = o.group(1)
    c = _CALLS.search(line)
    if c:
      calls[name] = c.group(1)
  out = dict(own)
  for name, comp in calls.items():
    if name not in out and comp in first_in:
      out[name] = first_in[comp]
  return out


def profile_jax(args) -> dict:
  import jax

  compiled, state, data, rng, times = common.build_jax_step(
    args.model, args.batch, args.image_size, args.dtype
  )
  names = hlo_op_names(compiled.as_text())
  run = common.jax_runner(compiled, state, data, rng)
  run(2)
  t0 = time.perf_counter()
  run(args.steps)
  untraced = (time.perf_counter() - t0) / args.steps
  trace_dir = tempfile.mkdtemp(prefix="jaxprof-")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    t0 = time.perf_counter()
    run(args.steps)
    wall = (time.perf_counter() - t0) / args.steps  # not counting the trace's start and write-out
  path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  table = collections.Counter()
  unmapped = 0.0
  thunks = [
    e
    for e in events
    if e.get("ph") == "X"
    and "hlo_op" in (e.get("args") or {})
    and "train_step" in e["args"].get("hlo_module", "")
  ]
  for e in thunks:
    a = e["args"]
    op = names.get(a["hlo_op"])
    key = classify(op) if op is not None else classify_unsourced(a["hlo_op"])
    if op is None:
      unmapped += e["dur"]
    table[key] += e["dur"] / 1e6 / args.steps
  busy = _busy_us([(e["ts"], e["ts"] + e["dur"]) for e in thunks])
  return {
    "wall_s": wall,
    "untraced_wall_s": untraced,
    "table": table,
    "unmapped_s": unmapped / 1e6 / args.steps,
    "kernels": len(thunks) / args.steps,
    "small_kernels": sum(e["dur"] < 20 for e in thunks) / args.steps,
    # Wall time with no thunk running (the trace's start and end excluded: `wall` is timed inside).
    "idle_s": max(0.0, wall - busy / 1e6 / args.steps),
    "long_gaps": _long_gaps_us([(e["ts"], e["ts"] + e["dur"]) for e in thunks], 1000.0),
    "compile_s": times["compile_s"],
    "version": f"jax {jax.__version__}",
  }


def _long_gaps_us(intervals, threshold_us: float) -> tuple[int, float]:
  """(count, total length) of the gaps over `threshold_us` in which none of the intervals ran."""
  gaps, end = [], None
  for s, e in sorted(intervals):
    if end is not None and s - end > threshold_us:
      gaps.append(s - end)
    end = e if end is None else max(end, e)
  return len(gaps), sum(gaps)


def _busy_us(intervals) -> float:
  """Length of the union of (start, end) intervals: the time at least one of them ran."""
  total, start, end = 0.0, None, None
  for s, e in sorted(intervals):
    if end is not None and s <= end:  # overlaps the current run of busy time
      end = max(end, e)
      continue
    if end is not None:
      total += end - start
    start, end = s, e
  return total + (end - start if end is not None else 0.0)


def profile_timm(args) -> dict:
  import torch
  from torch.autograd.profiler import record_function
  from torch.profiler import ProfilerActivity, profile

  run = common.timm_train_step(
    args.model,
    args.batch,
    args.image_size,
    bf16=args.dtype == "bf16",
    phase=lambda name: record_function(f"phase:{name}"),
  )
  import timm

  run(2)
  t0 = time.perf_counter()
  run(args.steps)
  untraced = (time.perf_counter() - t0) / args.steps
  with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    t0 = time.perf_counter()
    run(args.steps)
    wall = (time.perf_counter() - t0) / args.steps
  table = collections.Counter()
  kernels = small = 0
  for ev in prof.events():
    if ev.key.startswith("phase:"):
      continue
    if not ev.cpu_children:  # an op that calls no other op: timm's analogue of a thunk
      kernels += 1
      small += ev.cpu_time_total < 20
    secs = ev.self_cpu_time_total / 1e6 / args.steps
    if secs <= 0:
      continue
    phase, up = "other", ev.cpu_parent
    while up is not None:
      if up.key.startswith("phase:"):
        phase = up.key[len("phase:") :]
        break
      up = up.cpu_parent
    table[(_timm_component(ev.key, ev.input_shapes or [], phase), phase)] += secs
  return {
    "wall_s": wall,
    "untraced_wall_s": untraced,
    "table": table,
    "kernels": kernels / args.steps,
    "small_kernels": small / args.steps,
    "idle_s": max(0.0, wall - sum(table.values())),  # one op at a time on the Python thread
    "version": f"torch {torch.__version__}, timm {timm.__version__}",
  }


def _timm_component(name: str, shapes, phase: str) -> str:
  """An aten op -> the component names used for jax; convolutions split by their weight shape."""

  def depthwise(weight_index):
    return (
      len(shapes) > weight_index and len(shapes[weight_index]) == 4 and shapes[weight_index][1] == 1
    )

  if phase == "update":
    return "optimizer, EMA, guard, BN stats"
  if "convolution_backward" in name:
    return "depthwise conv" if depthwise(2) else "dense conv (stem, expand, project, head)"
  if "conv" in name:
    return "depthwise conv" if depthwise(1) else "dense conv (stem, expand, project, head)"
  if "batch_norm" in name:
    return "batch norm"
  if "silu" in name or "sigmoid" in name:
    return "activation (swish), SE gate"
  if (
    name in ("aten::mm", "aten::addmm", "aten::log_softmax", "aten::_log_softmax") or "nll" in name
  ):
    return "classifier, loss"
  return "other model ops"


def render(args, jax_res, timm_res) -> str:
  lines = common.heading(
    f"{args.model}, batch {args.batch} at {args.image_size}px, {args.dtype}",
    common.command(MODULE),
    f"load average {common.load_average()}; 2 warm-up steps, {args.steps} untraced, then "
    f"{args.steps} traced steps. "
    "Seconds per step of summed op time (ops may overlap on the 2 cores).",
  )
  lines.append("")
  for label, res in (("jax (XLA:CPU thunks)", jax_res), ("timm (torch self CPU time)", timm_res)):
    if not res:
      continue
    total = sum(res["table"].values())
    lines += [
      f"**{label}**, {res['version']}: wall {res['wall_s']:.3f} s/step "
      f"({args.batch / res['wall_s']:.1f} img/s), summed op time {total:.3f} s"
      + (
        f" ({res['unmapped_s']:.3f} s of it in XLA-created ops without source metadata)"
        if res.get("unmapped_s")
        else ""
      ),
      "",
      f"{res['kernels']:.0f} {'thunks' if res is jax_res else 'kernels (leaf ops)'} per step, "
      f"{res['small_kernels']:.0f} of them under 20 us; {res['idle_s']:.3f} s/step of the traced "
      f"wall time with none running"
      + (
        f" ({res['long_gaps'][0] / args.steps:.0f} gaps over 1 ms hold "
        f"{res['long_gaps'][1] / 1e6 / args.steps:.3f} s of it)"
        if "long_gaps" in res
        else ""
      )
      + f"; untraced wall {res['untraced_wall_s']:.3f} s/step "
      f"({args.batch / res['untraced_wall_s']:.1f} img/s)",
      "",
      "| component | phase | s/step | share |",
      "|---|---|---|---|",
    ]
    for (comp, phase), secs in sorted(res["table"].items(), key=lambda kv: -kv[1]):
      if secs >= 0.0005:
        lines.append(f"| {comp} | {phase} | {secs:.4f} | {secs / total:.1%} |")
    lines.append("")
  return "\n".join(lines) + "\n"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="efficientnetv2-b0")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--image-size", type=int, default=128)
  ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--no-timm", action="store_true")
  ap.add_argument("--no-record", action="store_true")
  args = ap.parse_args()
  jax_res = profile_jax(args)
  timm_res = None
  if not args.no_timm:
    try:
      timm_res = profile_timm(args)
    except ImportError as e:
      print(f"timm not profiled: {e}", file=sys.stderr)
  common.publish(
    render(args, jax_res, timm_res),
    "profile_train_step.md",
    "Where the train step spends its time: effnetv2_jax vs timm on this CPU",
    MODULE,
    record=not args.no_record,
  )


if __name__ == "__main__":
  main()

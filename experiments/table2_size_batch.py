r"""Training throughput and memory against image size and batch (the paper's Table 2 shape).

  python -m experiments.table2_size_batch                        # efficientnetv2-s, CPU-sized grid
  python -m experiments.table2_size_batch --model efficientnet-b6 --sizes 380,512 --batches 24,32

The paper's Table 2 trains EfficientNet-B6 at 380 and 512 px at two batch sizes on TPUv3 and V100:
throughput falls with the image size and the larger batch at 512 px runs out of memory, which is
what motivates progressive learning. Here, for each (size, batch), this codebase's full
train step (common.build_jax_step: forward, backward, RMSProp, EMA; fp32) is compiled,
its memory read from XLA's buffer assignment (temp = activations + scratch, plus the state and
batch arguments), and `--steps` steps timed after one warm-up step. The last column says whether
the step would fit a 16 GiB accelerator (one TPUv3 core or a V100-16GB), from those bytes; on a
GPU/TPU the buffer layout differs, so read it as an estimate. Appends to
experiments/results/table2_size_batch.md and draws its last table into table2_size_batch.png
(`--replot`: only redraw the .png from the recorded .md, measuring nothing).
"""

from __future__ import annotations

import argparse
import sys
import time

from experiments import common, plotting

MODULE = "experiments.table2_size_batch"
GiB = 2.0**30


def plot_recorded():
  """table2_size_batch.png from the last table in table2_size_batch.md (the latest recorded run)."""
  rows = common.read_markdown_table("table2_size_batch.md")
  panels = {"train img/s": {}, "temp + state GiB": {}}
  for r in rows:
    series = f"batch {r['batch']}"
    for key in panels:  # each panel plots the table column of its name
      xs, ys = panels[key].setdefault((series, "measured here"), ([], []))
      xs.append(int(r["image size"]))
      ys.append(float(r[key]))
  return plotting.line_plot(
    "table2_size_batch.png",
    panels,
    title="Train step vs image size (latest run in table2_size_batch.md)",
    xlabel="image size (px)",
    ylabel="",
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="efficientnetv2-s")
  ap.add_argument("--sizes", default="128,192,256")
  ap.add_argument("--batches", default="4,8")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--device-gib", type=float, default=16.0)
  ap.add_argument("--replot", action="store_true", help="only redraw the .png from the .md")
  args = ap.parse_args()
  if args.replot:
    print(plot_recorded())
    return
  import jax

  start = time.time()
  rows = []
  for size in [int(s) for s in args.sizes.split(",")]:
    for batch in [int(b) for b in args.batches.split(",")]:
      compiled, state, data, rng, times = common.build_jax_step(args.model, batch, size, "fp32")
      mem = compiled.memory_analysis()
      run = common.jax_runner(compiled, state, data, rng)
      ips = common.throughput(run, batch, args.steps)
      total = mem.temp_size_in_bytes + mem.argument_size_in_bytes
      rows.append((size, batch, ips, mem.temp_size_in_bytes / GiB, total / GiB, times["compile_s"]))
      print(
        f"{size}px batch {batch}: {ips:.2f} img/s, temp {rows[-1][3]:.2f} GiB",
        file=sys.stderr,
        flush=True,
      )
      del compiled, state, data, run
  base = {b: ips for s, b, ips, *_ in rows if s == rows[0][0]}
  lines = [
    f"| image size | batch | train img/s | vs {rows[0][0]} px | temp GiB | temp + state GiB | "
    f"fits {args.device_gib:g} GiB? | compile s |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for size, batch, ips, temp, total, comp in rows:
    lines.append(
      f"| {size} | {batch} | {ips:.2f} | {ips / base[batch]:.2f}x | {temp:.2f} | "
      f"{total:.2f} | {'yes' if total < args.device_gib else 'no (OOM)'} | {comp:.0f} |"
    )
  head = common.heading(
    f"{args.model}, fp32, {jax.default_backend()} ({jax.device_count()} device(s))",
    common.command(MODULE),
    f"{time.time() - start:.0f} s, load average {common.load_average()} at the end; "
    f"{args.steps} timed steps after one warm-up step.",
  )
  text = "\n".join([*head, "", *lines, ""])
  print(text)
  common.append_result(
    "table2_size_batch.md",
    "Train throughput and memory vs image size and batch (Table 2 shape)",
    MODULE,
    text,
  )
  print(plot_recorded())


if __name__ == "__main__":
  main()

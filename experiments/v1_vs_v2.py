r"""EfficientNetV2 vs EfficientNet (V1): parameters, training cost per image, measured train speed.

  python -m experiments.v1_vs_v2                                   # static table + M vs B7 measured
  python -m experiments.v1_vs_v2 --measure efficientnetv2-s,efficientnet-b6 --batch 2
  python -m experiments.v1_vs_v2 --measure ''                      # static table only (~1 min)
  python -m experiments.v1_vs_v2 --replot                          # redraw the .png from the .md

For V2 B0-B3/S/M and V1 B0-B7 at their released training sizes: trainable parameters and forward
multiply-adds per image (jax.eval_shape, nothing allocated). V2 trains with progressive learning,
so its cost per image is the mean of MACs over the official preset's stages (configs/imagenet.py,
equal steps per stage); V1 trains at one size. `--measure` times this codebase's full train step
(common.build_jax_step: forward, backward, RMSProp, EMA; fp32) for the named models at
their training sizes, on this machine, one after the other in this process. The headline row
compares V2-M with B7, the paper's pair (reference section 6: "V2-M trains 4.1x faster than B7
with 17% fewer parameters", measured there on TPUv3 with progressive learning and a larger batch).
Writes experiments/results/v1_vs_v2.md and a .png drawn from that table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from experiments import common, plotting

MODULE = "experiments.v1_vs_v2"

V2 = (
  "efficientnetv2-b0",
  "efficientnetv2-b1",
  "efficientnetv2-b2",
  "efficientnetv2-b3",
  "efficientnetv2-s",
  "efficientnetv2-m",
)
V1 = tuple(f"efficientnet-b{i}" for i in range(8))


def stage_sizes(name: str) -> list[int]:
  """The official preset's stage sizes for a V2 model (one size for V1)."""
  from effnetv2_jax import models, plan

  if name not in V2:
    return [models.model_defaults(name)["train_size"]]
  from configs import imagenet

  config = imagenet.get_config(f"variant={name.rsplit('-', 1)[1]},preset=official")
  return [s.image_size for s in plan.resolve(config).stages]


def static_row(name: str) -> dict:
  import jax
  import jax.numpy as jnp
  from effnetv2_jax import models

  model = models.create_model(name)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  sizes = stage_sizes(name)
  macs = [models.count_macs(name, s) for s in sizes]
  return dict(
    name=name,
    params=models.count_params(shapes),
    train_size=sizes[-1],
    sizes=sizes,
    macs_final=macs[-1],
    macs_mean=statistics.fmean(macs),
  )


def measure(name: str, batch: int, steps: int) -> dict:
  from effnetv2_jax import models

  size = models.model_defaults(name)["train_size"]
  t0 = time.perf_counter()
  compiled, state, data, rng, times = common.build_jax_step(name, batch, size, "fp32")
  run = common.jax_runner(compiled, state, data, rng)
  ips = common.throughput(run, batch, steps)
  print(
    f"{name} @{size} batch {batch}: {ips:.3f} img/s "
    f"(compile {times['compile_s']:.0f}s, {time.perf_counter() - t0:.0f}s in all)",
    file=sys.stderr,
    flush=True,
  )
  return dict(images_per_s=ips, compile_s=times["compile_s"], size=size)


def plot_recorded():
  """experiments/results/v1_vs_v2.png from the table in v1_vs_v2.md (the recorded run)."""
  rows = common.read_markdown_table("v1_vs_v2.md")
  labels = [plotting.short_model_name(r["model"]) for r in rows]
  col = lambda key: [plotting.leading_number(r[key]) for r in rows]
  return plotting.bar_plot(
    "v1_vs_v2.png",
    labels,
    {
      "params": col("params"),
      "macs": col("MACs/img, mean over stages"),
      "speed": col("measured train img/s (this CPU, fp32)"),
    },
    title="EfficientNetV2 (progressive stages) vs EfficientNet V1 (one size)",
    ylabels={
      "params": "parameters (M, log)",
      "macs": "MACs per training image (G, log)",
      "speed": "measured train img/s (this CPU)",
    },
    log=("params", "macs"),
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument(
    "--measure",
    default="efficientnetv2-m,efficientnet-b7",
    help="comma-separated models to time ('' = none)",
  )
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--steps", type=int, default=2)
  ap.add_argument(
    "--replot",
    action="store_true",
    help="only redraw the .png from the recorded v1_vs_v2.md; measure nothing",
  )
  args = ap.parse_args()
  if args.replot:
    print(plot_recorded())
    return
  start = time.time()
  rows = {n: static_row(n) for n in V2 + V1}
  measured = {n: measure(n, args.batch, args.steps) for n in filter(None, args.measure.split(","))}

  lines = [
    "| model | params | train size (stages) | MACs/img @ final size | MACs/img, mean over "
    "stages | measured train img/s (this CPU, fp32) |",
    "|---|---:|---|---:|---:|---:|",
  ]
  for n, r in rows.items():
    sizes = "/".join(map(str, r["sizes"]))
    m = measured.get(n)
    lines.append(
      f"| {n} | {r['params'] / 1e6:.1f}M | {sizes} | {r['macs_final'] / 1e9:.2f}G | "
      f"{r['macs_mean'] / 1e9:.2f}G | "
      + (
        f"{m['images_per_s']:.3f} (batch {args.batch}, compile {m['compile_s']:.0f} s)"
        if m
        else "-"
      )
      + " |"
    )
  m2, b7 = rows["efficientnetv2-m"], rows["efficientnet-b7"]
  head = [
    f"- Parameters: V2-M {m2['params'] / 1e6:.1f}M vs B7 {b7['params'] / 1e6:.1f}M: "
    f"{100 * (1 - m2['params'] / b7['params']):.0f}% fewer (paper: 17% fewer).",
    f"- Forward MACs per training image: V2-M {m2['macs_mean'] / 1e9:.2f}G on average over its "
    f"progressive stages ({m2['macs_final'] / 1e9:.2f}G at 384) vs B7 {b7['macs_final'] / 1e9:.2f}G "
    f"at 600: {b7['macs_final'] / m2['macs_mean']:.2f}x fewer per image "
    f"({b7['macs_final'] / m2['macs_final']:.2f}x at the final size).",
  ]
  if "efficientnetv2-m" in measured and "efficientnet-b7" in measured:
    a, b = measured["efficientnetv2-m"], measured["efficientnet-b7"]
    ratio = a["images_per_s"] / b["images_per_s"]
    est = ratio * m2["macs_final"] / m2["macs_mean"]
    head.append(
      f"- Measured train step on this CPU at the final sizes: V2-M@384 "
      f"{a['images_per_s']:.3f} img/s vs B7@600 {b['images_per_s']:.3f} img/s: "
      f"{ratio:.2f}x faster per image. Scaling by the MACs saved in the smaller "
      f"progressive stages (an estimate, not measured): about {est:.1f}x "
      "(paper, TPUv3: 4.1x)."
    )
  text = "\n".join(
    [
      "# EfficientNetV2 vs EfficientNet (V1): parameters, training cost, training speed",
      "",
      f"Generated by `{common.command(MODULE)}` ({common.timestamp()}, "
      f"{time.time() - start:.0f} s, load average {common.load_average()} at the end). V2 sizes "
      "are the official progressive preset's stages (equal steps each); V1 trains at one size. "
      "MACs: forward multiply-adds of convolutions and dense layers.",
      "",
      *head,
      "",
      *lines,
      "",
    ]
  )
  print(text)
  common.write_result("v1_vs_v2.md", text)
  print(plot_recorded())


if __name__ == "__main__":
  main()

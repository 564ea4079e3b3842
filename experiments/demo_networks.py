r"""Which small network and learning rate buy the demo the most accuracy per second?

  python -m experiments.demo_networks                  # every probe below, 1 epoch each
  python -m experiments.demo_networks --probes v2 v2-stem2 --epochs 0.2

Each probe is configs/demo.py with one network from `configs.demo.NETWORKS` (and optionally another
optimizer or learning rate), trained for the same epochs at a fixed 28 px with the demo's final
regularization (progressive.preset=none), then evaluated on the 10,000 test images. It is a cheap
proxy for the 15-minute progressive demo: one epoch is 3-9 minutes here instead of 15. Probes run
one after another through the sweep runner (common.train; timings need the two cores to
themselves), each in WORKDIR/<epochs>ep/<probe> with its output in sweep.log there; a finished
probe is skipped on a re-run. Writes experiments/results/demo_networks.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from configs import demo
from effnetv2_jax import models
from experiments import common, plotting

MODULE = "experiments.demo_networks"

# name -> (network in configs.demo.NETWORKS, extra config overrides)
PROBES = {
  "v2-stem2": ("v2-stem2", {"lr_per_256": 0.016}),
  "v2-stem2, adamw": (
    "v2-stem2",
    {"lr_per_256": 0.004, "optimizer": "adamw", "weight_decay": 0.05},
  ),
  "v2-stem2, sgd": ("v2-stem2", {"lr_per_256": 0.2, "optimizer": "sgd"}),
  "v2-stem2, lr 0.048": ("v2-stem2", {"lr_per_256": 0.048}),
  "v2-stem2-late-stride": ("v2-stem2-late-stride", {"lr_per_256": 0.016}),
  "v2-stem2-wide": ("v2-stem2-wide", {"lr_per_256": 0.016}),
  "v2-deep-fused": ("v2-deep-fused", {"lr_per_256": 0.016}),
  "v2, lr 0.048": ("v2", {"lr_per_256": 0.048}),
  "v2-stem2-body-fullres-stem, lr 0.048": ("v2-stem2-body-fullres-stem", {"lr_per_256": 0.048}),
}


def run_probe(name, workdir, epochs):
  network, overrides = PROBES[name]
  # One folder per epoch count, so a run with other --epochs never reuses these results.
  wd = os.path.join(workdir, f"{epochs:g}ep", name.replace(", ", "_").replace(" ", ""))
  # The demo's final size and regularization, and the EMA the probes were recorded with (the
  # demo's is now 0.998).
  fixed = {"progressive.preset": "none", "num_epochs": epochs, "ema_decay": 0.999}
  run = common.Run(name, f"configs/demo.py:model={network}", wd, {**fixed, **overrides})
  if run.results() is None:
    os.makedirs(wd, exist_ok=True)
    if os.path.exists(os.path.join(wd, "caveat.txt")):  # it described the results being replaced
      os.remove(os.path.join(wd, "caveat.txt"))
    with open(os.path.join(wd, "load_at_start.txt"), "w") as f:
      f.write(common.load_average(1) + "\n")
    _, codes = common.train([run])
    if run.results() is None:
      raise RuntimeError(f"probe {name!r} failed (exit {codes.get(name)}); see {wd}/sweep.log")
  out = run.results()
  # The load when it started, and a note left beside its results by hand (caveat.txt), if any.
  read = lambda n: open(os.path.join(wd, n)).read().strip()
  out["notes"] = (
    [f"load {read('load_at_start.txt')} at start"]
    if os.path.exists(os.path.join(wd, "load_at_start.txt"))
    else []
  )
  out["notes"] += [read("caveat.txt")] if os.path.exists(os.path.join(wd, "caveat.txt")) else []
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--probes", nargs="+", default=list(PROBES), choices=list(PROBES))
  ap.add_argument("--epochs", type=float, default=1.0)
  ap.add_argument("--workdir", default=os.path.join(common.ROOT, "workdirs", "demo_networks"))
  args = ap.parse_args(argv)
  rows = []
  for name in args.probes:
    r = run_probe(name, args.workdir, args.epochs)
    network, overrides = PROBES[name]
    ov = dict(demo.NETWORKS[network], num_classes=10)
    macs = models.count_macs("efficientnetv2-b0", 28, **ov) / 1e6
    top1, wall = r["final_eval"]["top1"], r["total_wall_s"]
    img_s = plotting.stage_speeds(r)[-1]  # the only stage: no stage-end eval in its wall time
    rows.append(
      [
        name,
        f"{macs:.1f}",
        ", ".join(f"{k}={v}" for k, v in overrides.items()),
        f"{top1:.4f}",
        f"{wall:.0f}",
        f"{img_s:.0f}",
        "; ".join(r["notes"]),
      ]
    )
  cmd = common.command(MODULE, sys.argv[1:] if argv is None else argv)
  table = common.markdown_table(
    ["probe", "MMACs/img @28", "overrides", "top-1", "wall s", "train img/s", "note"], rows
  )
  text = (
    f"# Demo network probes: {args.epochs:g} epoch(s) at a fixed 28 px\n\n"
    f"Command: `{cmd}` ({common.timestamp()}; load average at the end "
    f"{common.load_average()}). Every probe is configs/demo.py with "
    "progressive.preset=none (the final size and regularization: RandAugment 4, dropout 0.1), "
    "RMSProp unless named, batch 128. Wall time includes compiling and the final eval.\n\n"
    + table
    + "\n"
  )
  print(common.write_result("demo_networks.md", text))
  return 0


if __name__ == "__main__":
  sys.exit(main())

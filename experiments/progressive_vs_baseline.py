r"""Progressive-learning ablation on Fashion-MNIST: the paper's Tables 12/13 in miniature.

  python -m experiments.progressive_vs_baseline                       # v2 net, 4 arms, seeds 0 1
  python -m experiments.progressive_vs_baseline --models v2-stem2 resnet --epochs 2
  python -m experiments.progressive_vs_baseline --quick               # 0.5 epochs, plumbing check

Every trial is configs/demo.py with one of its networks (MODELS below: the demo's `v2`, the earlier
`v2-stem2`, a small ResNet) run through the sweep runner (common.train: effnetv2_jax.sweep's trial
command and runner; one workdir per trial named by the sweep, DIR/sweep_results.md), with the same
epochs, batch, LR schedule and eval size; only the schedule differs between the arms:

  fixed                       progressive.preset=none: every step at the final size with the final
                              regularization (the baseline)
  progressive, constant reg   the paper's size schedule, regularization held at its final values
                              (the paper's Table 13 "progressive learning without adaptive reg.")
  progressive, adaptive       the paper's Algorithm 1: size and regularization grow together
  official, adaptive          the released code's schedule: sizes int(min + (max-min)(i+1)/M),
                              RandAugment/mixup linspace, dropout constant

For each arm it reports final top-1 (mean and each seed), wall time (compiles and stage-end evals
included), the speed-up over `fixed`, and the time at which the arm's stage-end eval first reached
the fixed arm's final top-1 (stage ends are the only eval points, so this is coarse). Writes
experiments/results/progressive_ablation[_quick].md and .png (top-1 at stage ends against
elapsed time). Finished trials are skipped on a re-run (the sweep runner's rule), so an
interrupted ablation continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from experiments import common, plotting

MODULE = "experiments.progressive_vs_baseline"

# name -> (config, overrides for every arm). Stage-end evals are on for every model: they are the
# curves and the "s to reach" column. `v2-stem2` is the demo network and learning rate before the
# demo moved to a full-resolution stem (demo v5). Both it and the ResNet keep the learning rate,
# first stage size (16 px) and EMA (0.999) they were recorded with; the demo has since moved on.
RECORDED = {
  "eval_every_stage": True,
  "lr_per_256": 0.016,
  "progressive.min_image_size": 16,
  "ema_decay": 0.999,
}
MODELS = {
  "v2": ("configs/demo.py", {"eval_every_stage": True}),
  "v2-stem2": ("configs/demo.py:model=v2-stem2", RECORDED),
  "resnet": ("configs/demo.py:model=resnet", RECORDED),
}
QUICK_EPOCHS = 0.5
# The paper's Table 12 claims (ImageNet, reference section 6) shown beside the toy result.
PAPER_SPEEDUPS = "ResNet50 1.4x, ResNet152 2.1x, EfficientNet-B4 2.2x at equal or better accuracy"


def arms(config) -> dict:
  """Arm name -> `config.*` overrides. The constant-regularization arm pins every regularizer's
  min to its max, so only the image size moves."""
  p = config.progressive
  return {
    "fixed": {"progressive.preset": "none"},
    "progressive, constant reg": {
      "progressive.preset": "paper",
      "progressive.min_randaug": float(p.max_randaug),
      "progressive.min_mixup": float(p.max_mixup),
      "progressive.min_cutmix": float(p.max_cutmix),
      "progressive.min_dropout": float(p.max_dropout),
    },
    "progressive, adaptive": {"progressive.preset": "paper"},
    "official, adaptive": {"progressive.preset": "official"},
  }


# Short names for --arms.
ARM_KEYS = {
  "fixed": "fixed",
  "const": "progressive, constant reg",
  "adaptive": "progressive, adaptive",
  "official": "official, adaptive",
}


def run_model(model: str, workdir: str, epochs: float, seeds, data_dir: str | None, only=None):
  """Runs (or resumes) the arms (`only`: names, default all) x seeds of one model;
  -> ({(arm, seed): results.json or None}, config)."""
  from effnetv2_jax import sweep

  config_arg, fixed = MODELS[model]
  config = sweep.load_config(os.path.join(common.ROOT, config_arg))
  for key, value in fixed.items():
    sweep.apply_override(config, key, value)
  trials, keys = [], []
  for arm, overrides in arms(config).items():
    if only and arm not in only:
      continue
    for seed in seeds:
      trials.append(dict(overrides, seed=seed))
      keys.append((arm, seed))
  # Every trial of the model: its workdir is named by its own overrides (as the sweep CLI names
  # it, so an interrupted ablation finds its trials again); length, data and `fixed` are common.
  base = dict(fixed, num_epochs=epochs, **({"data_dir": data_dir} if data_dir else {}))
  names = sweep.trial_names(trials)
  runs = [
    common.Run(name, config_arg, os.path.join(workdir, name), {**base, **t})
    for name, t in zip(names, trials)
  ]
  results, codes = common.train(runs)
  header, rows = sweep.gather(workdir, trials, names, codes)
  sweep.write_tables(workdir, header, rows, f"Sweep of `{config_arg}` ({model} arms x seeds)")
  return {key: results[name] for key, name in zip(keys, names)}, config


def _curve(r):
  elapsed, xs, ys = 0.0, [], []
  for s in r["stages"]:
    elapsed += s.get("wall_s", 0.0)
    if s.get("eval_top1") is not None:
      xs.append(elapsed)
      ys.append(s["eval_top1"])
  return xs, ys


def summarize(model, results):
  mean = lambda v: statistics.fmean(v) if v else float("nan")
  by_arm = {}
  for (arm, seed), r in results.items():
    by_arm.setdefault(arm, []).append((seed, r))
  fixed = [r for _, r in by_arm.get("fixed", []) if r]
  target = mean([r["final_eval"]["top1"] for r in fixed]) if fixed else None
  fixed_wall = mean([r["total_wall_s"] for r in fixed]) if fixed else None
  rows, curves = [], {}
  for arm, runs in by_arm.items():
    done = [(s, r) for s, r in runs if r]
    if not done:
      rows.append(
        [model, arm, "-", "missing (see the trial's sweep.log)", "-", "-", "-", "-", "-", "-"]
      )
      continue
    top1 = [r["final_eval"]["top1"] for _, r in done]
    walls = [r["total_wall_s"] for _, r in done]
    compile_s = mean([sum(st.get("compile_s", 0.0) for st in r["stages"]) for _, r in done])
    reach = []
    for _, r in done:
      xs, ys = _curve(r)
      hit = next((x for x, y in zip(xs, ys) if target is not None and y >= target), None)
      reach.append(hit)
    reach_txt = (
      "not reached"
      if all(h is None for h in reach)
      else " / ".join("-" if h is None else f"{h:.0f}" for h in reach)
    )
    sizes = "/".join(str(st["image_size"]) for st in done[0][1]["stages"])
    per_stage = list(
      zip(*[plotting.stage_speeds(r) for _, r in done])
    )  # stage -> speeds over seeds
    speeds = "/".join("-" if None in v else f"{mean(v):.0f}" for v in per_stage)
    rows.append(
      [
        model,
        arm,
        sizes,
        f"{mean(top1):.4f} (" + ", ".join(f"{t:.4f}" for t in top1) + ")",
        f"{100 * (mean(top1) - target):+.2f}" if target is not None else "-",
        f"{mean(walls):.0f}",
        f"{compile_s:.0f}",
        f"{fixed_wall / mean(walls):.2f}x" if fixed_wall else "-",
        reach_txt,
        speeds,
      ]
    )
    for s, r in done:
      curves[f"{model} {arm} (seed {s})"] = _curve(r)
  return rows, curves


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", nargs="+", default=["v2"], choices=sorted(MODELS))
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  ap.add_argument("--epochs", type=float, default=0.0, help="default: the demo's own length")
  ap.add_argument(
    "--arms",
    default="fixed,const,adaptive,official",
    help=f"comma-separated subset of {','.join(ARM_KEYS)}",
  )
  ap.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs, one seed")
  ap.add_argument("--workdir", default="")
  ap.add_argument("--data_dir", default="", help="TFDS data_dir holding fashion_mnist")
  args = ap.parse_args(argv)
  if args.quick:
    args.epochs, args.seeds = QUICK_EPOCHS, args.seeds[:1]
  suffix = "_quick" if args.quick else ""
  root = args.workdir or os.path.join(common.ROOT, "workdirs", "progressive_ablation" + suffix)
  command = common.command(MODULE, sys.argv[1:] if argv is None else argv)

  only = [ARM_KEYS[a.strip()] for a in args.arms.split(",") if a.strip()]
  for model in args.models:
    from effnetv2_jax import sweep

    epochs = args.epochs or float(
      sweep.load_config(os.path.join(common.ROOT, MODELS[model][0])).num_epochs
    )
    results, config = run_model(
      model, os.path.join(root, model), epochs, args.seeds, args.data_dir or None, only
    )
    r, c = summarize(model, results)
    some = next((x for x in results.values() if x), None)
    note = (
      (
        f"{model}: {config.model_name}, {epochs:g} epochs = {some['step']} steps at batch "
        f"{config.batch_size}, seeds {', '.join(map(str, args.seeds))}, eval at "
        f"{config.eval_image_size} px; final regularization RandAugment "
        f"{config.progressive.max_randaug:g} ({config.randaug_ops or 'all 16 ops'}, "
        f"{config.randaug_layers} layer(s)), mixup {config.progressive.max_mixup:g}, dropout "
        f"{config.progressive.max_dropout:g}."
      )
      if some
      else f"{model}: no finished trial."
    )
    # Each model's part is kept in its workdir, so models run by separate invocations (with their
    # own epochs, seeds, arms) end up in one table.
    with open(os.path.join(root, model, "summary.json"), "w") as f:
      json.dump({"rows": r, "curves": c, "note": note, "command": command.strip()}, f)
  rows, curves, notes = [], {}, []
  for model in MODELS:
    path = os.path.join(root, model, "summary.json")
    if os.path.exists(path):
      part = json.load(open(path))
      rows += part["rows"]
      curves.update({k: tuple(v) for k, v in part["curves"].items()})
      notes.append(f"{part['note']} (`{part['command']}`)")
  header = [
    "model",
    "arm",
    "stage sizes",
    "top-1 mean (per seed)",
    "vs fixed (points)",
    "wall s",
    "of which compiling",
    "speed-up vs fixed",
    "s to reach fixed's top-1 (per seed)",
    "train img/s per stage (compiles excluded, stage-end evals included)",
  ]
  text = "\n".join(
    [
      "# Progressive-learning ablation on Fashion-MNIST (paper's Tables 12/13 in miniature)",
      "",
      f"Generated by `python -m {MODULE}` (load average {common.load_average()} at the end of "
      "the last invocation; each model's command is below). Wall time includes compiling each "
      "stage's train step "
      "(cold XLA cache for a new shape or dropout rate, warm for a repeated one) and evaluating all "
      "10,000 test images at every stage end.",
      "",
      *notes,
      "",
      common.markdown_table(header, rows),
      "",
      f"Paper (ImageNet): {PAPER_SPEEDUPS}.",
      "",
    ]
  )
  print(text)
  common.write_result(f"progressive_ablation{suffix}.md", text)
  panels = {}  # model -> {(arm, "seed N"): curve}; keys come from summarize() as "model arm (seed N)"
  for key, curve in curves.items():
    model, rest = key.split(" ", 1)
    arm, _, seed = rest.rpartition(" (")
    panels.setdefault(model, {})[(arm, seed.rstrip(")"))] = curve
  png = plotting.line_plot(
    f"progressive_ablation{suffix}.png",
    panels,
    title="Fashion-MNIST: eval top-1 at stage ends",
    xlabel="elapsed train wall time (s)",
    ylabel="top-1",
    sharey=True,
  )
  if png:
    print(f"plot: {png}")


if __name__ == "__main__":
  main()

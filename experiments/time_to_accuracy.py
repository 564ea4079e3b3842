r"""Time to accuracy on Fashion-MNIST (issue 19, item 4): at this scale, does progressive learning
with adaptive regularization reach the fixed-size baseline's top-1 in less wall time, and does
adaptive beat constant regularization? (The paper's Tables 12 and 13, measured as time to accuracy.)

  python -m experiments.time_to_accuracy --dry-run --budget short      # run list, predicted hours
  python -m experiments.time_to_accuracy --budget short                # seeds 0 1 2, ~10 min a run
  python -m experiments.time_to_accuracy --budget long                 # seed 0, ~30 min a run
  python -m experiments.time_to_accuracy --budget short --networks resnet --arms fixed-demo
  python -m experiments.time_to_accuracy --budget short --report-only  # table and plot, no training
  python -m experiments.time_to_accuracy --smoke                       # plumbing, temp results

Networks (NETWORKS): `v2`, the demo network (configs/demo.py with the 4-stage 20 px schedule it
had when the grid started), and `resnet`, the small ResNet-50 (one bottleneck per stage) of the
progressive ablation (experiments/progressive_vs_baseline.py), with the learning rate and EMA that
ablation recorded it with (the demo's were tuned on the v2 network). Every run is that config with
the arm's overrides.

Arms (ARMS, data: edit the table to change the experiment; `--arms` picks a subset):
  fixed-<level>   progressive.preset=none: every step at 28 px, the final regularization of
                  REG_LEVELS[level]; five levels (none, minimal, light, demo, strong) are the
                  baseline's regularization sweep, and the best of them by mean final top-1 is
                  the reference
  prog-const      the paper's size schedule (4 stages, 20 -> 28 px), regularization held at the
                  `demo` level throughout (Table 13's "without adaptive regularization")
  prog-paper      the same sizes with the paper's adaptive regularization (Algorithm 1: from
                  none at 20 px to the `demo` level at 28 px)
  hold-ramp       size_curve=hold_then_ramp: 20 px for half of training, a ramp, 28 px for the
                  last 20%, regularization following the size (the MosaicML/FFCV shape)
  prog-none, prog-const-light, prog-light, hold-ramp-light
                  the same schedules at the regularization the fixed sweep found best at this
                  length (none) and the level next to it (light): constant none, constant light,
                  adaptive none -> light
  demo-3stage     configs/demo.py's schedule since issue 19 (3 stages, 20/24/28 px, RandAugment
                  0 -> 1, no dropout) at the grid's length
  prog-light-eqtime
                  prog-light with 1.15x the epochs (Arm.epochs_scale): about the fixed arm's wall
                  time, so it shows whether the time the small stages save buys the accuracy back
Arms with `post_eval` sizes (the fixed arms and the hold-ramp arms) are evaluated again after
training with `--mode=eval --eval_sizes=28,32 --config.recalibrate_bn=5000` (BN statistics
recomputed at each size, FixRes-style); that column is reported beside the training's own final top-1, and its
seconds are not in the wall time. Every arm keeps one batch size (progressive.batch_rule
'constant': the 'pixels' rule cost 0.77 points at one epoch, bench_stage_switch.md); compiling the
next stage ahead is on (configs/default.py compile_ahead).

Budgets and run length: a budget is the wall time one fixed-arm run should take (short 600 s with
seeds 0 1 2, long 1800 s with seed 0). The run length is set in epochs, the same for every arm of
a network, from the fixed arm's measured speed on this machine (Network.train_img_s, from the
recorded demo and ablation runs) after subtracting the start-up and eval costs (`epochs_for`);
`--epochs NET=E` sets it directly, `--train-img-s NET=X` replaces a measured speed. The
progressive arms then take less time than the budget. Curve evals every budget/15 s of wall
clock (`eval_every_seconds`, ~15 points a curve) on the first 2,000 test images (`eval_subset`,
the same for every arm), and a final eval on all 10,000, which is the curve's last point.

Runs: one at a time, each through the sweep runner (common.train), in
WORKDIR/<net>/<budget>/<arm>-seed<S>-<digest>, the digest of the run's resolved config without
the seed, so an edited arm or config never reuses an old run; a finished run (results.json) is
skipped, so the grid can be completed over several sittings. Before and after each run this
process reads /proc/stat: the CPU seconds other processes used while the run trained, over its
wall time, are the run's "other CPU load" (WORKDIR/.../machine.json); the report says the machine
was idle only when that stays under IDLE_CORES for every run.

Report (experiments/time_to_accuracy_report.py defines each number): per arm, mean ± sd over
seeds of final top-1, top-1 at equal wall time, wall time, time to the target (the best fixed
arm's mean final top-1) and to 99% of it, the speed-ups over the reference; the answer lines;
one plot per network and budget, experiments/results/time_to_accuracy_<net>_<budget>.png; one
dated block appended to experiments/results/time_to_accuracy.md with the command, the load
average, the commit and the idle statement. `--dry-run` prints the run list with each run's
stages and overrides and the predicted hours; `--smoke` trains two tiny runs per network (a few
steps at 8-16 px) and writes its results under a temp directory, never experiments/results.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from experiments import common
from experiments import progressive_vs_baseline as ablation
from experiments import time_to_accuracy_report as report

MODULE = "experiments.time_to_accuracy"
RESULTS_NAME = "time_to_accuracy.md"
MACHINE_NAME = "machine.json"
EVAL_RESULTS_NAME = "eval_results.json"  # what --mode=eval writes into a training workdir
IDLE_CORES = 0.1  # other processes' mean CPU use during a run below which the machine was idle


@dataclasses.dataclass(frozen=True)
class Network:
  config: str  # configs/demo.py[:args], relative to the repository root
  overrides: dict
  train_img_s: float  # fixed arm, 28 px, batch 128, on this machine (2 cores), idle
  eval_img_s: float  # eval forward pass, 28 px (estimated at ~3x train: forward only)
  smoke_config: str  # the same network at toy scale


NETWORKS = {
  # The demo network with the schedule the grid started with (4 stages from 20 px; the demo itself
  # moved to 3 stages, which is the `demo-3stage` arm): these two overrides keep the
  # resolved configs, and so the run names, of the runs already finished. 330 img/s: the 28 px
  # stage of the demo's v7 record (586 steps x 128 images in 236 s); 466-495 in this grid.
  "v2": Network(
    "configs/demo.py",
    {"progressive.min_image_size": 20, "progressive.num_stages": 4},
    330.0,
    1000.0,
    "configs/demo.py:runlocal",
  ),
  # progressive_ablation.md: the fixed arm trained 126 img/s at 28 px.
  "resnet": Network(
    ablation.MODELS["resnet"][0],
    {k: ablation.RECORDED[k] for k in ("lr_per_256", "ema_decay")},
    126.0,
    400.0,
    "configs/demo.py:model=resnet,runlocal",
  ),
}

# Final regularization strengths: RandAugment magnitude (the demo's 6 geometric ops and Cutout,
# 1 layer), mixup alpha, dropout. `demo` is the final level configs/demo.py had until issue 19.
REG_LEVELS = {
  "none": {"randaug": 0.0, "mixup": 0.0, "dropout": 0.0},
  "minimal": {"randaug": 1.0, "mixup": 0.0, "dropout": 0.0},  # configs/demo.py's since issue 19
  "light": {"randaug": 2.0, "mixup": 0.0, "dropout": 0.05},
  "demo": {"randaug": 4.0, "mixup": 0.0, "dropout": 0.1},
  "strong": {"randaug": 8.0, "mixup": 0.1, "dropout": 0.2},
}


@dataclasses.dataclass(frozen=True)
class Arm:
  key: str  # directory names and --arms
  label: str  # table rows and legend
  schedule: dict  # progressive.* overrides that shape the size schedule
  reg: str  # REG_LEVELS name of the final (largest) regularization
  reg_from: str | None = None  # REG_LEVELS name it starts at (adaptive); None: constant at `reg`
  fixed: bool = False  # a baseline arm: the best one's mean final top-1 is the target
  post_eval: tuple = ()  # sizes of a BN-recalibrated --mode=eval after training
  epochs_scale: float = 1.0  # run length in the network's epochs (>1: more epochs, ~equal time)


FIXED = {"progressive.preset": "none"}
PAPER = {"progressive.preset": "paper", "progressive.num_stages": 4}
HOLD_THEN_RAMP = {
  **PAPER,
  "progressive.size_curve": "hold_then_ramp",
  "progressive.hold_fraction": 0.5,
  "progressive.tail_fraction": 0.2,
}
DEMO3 = {**PAPER, "progressive.num_stages": 3, "progressive.min_image_size": 20}
POST_EVAL_SIZES = (28, 32)
RECAL_IMAGES = 5000

ARMS = (
  *(
    Arm(f"fixed-{level}", f"fixed size, reg {level}", FIXED, level, None, True, POST_EVAL_SIZES)
    for level in REG_LEVELS
  ),
  Arm("prog-const", "progressive, constant reg", PAPER, "demo"),
  Arm("prog-paper", "progressive, adaptive (paper)", PAPER, "demo", "none"),
  Arm(
    "hold-ramp", "hold_then_ramp, adaptive", HOLD_THEN_RAMP, "demo", "none", False, POST_EVAL_SIZES
  ),
  # The same schedules at the regularization that wins the fixed-size sweep at this length (none)
  # and the level next to it (light): the comparison at the `demo` level above regularizes more
  # than any run this short can use (time_to_accuracy.md, session 7).
  Arm("prog-none", "progressive, no reg", PAPER, "none"),
  Arm("prog-const-light", "progressive, constant reg light", PAPER, "light"),
  Arm("prog-light", "progressive, adaptive none->light", PAPER, "light", "none"),
  Arm(
    "hold-ramp-light",
    "hold_then_ramp, adaptive none->light",
    HOLD_THEN_RAMP,
    "light",
    "none",
    False,
    POST_EVAL_SIZES,
  ),
  # configs/demo.py's schedule since issue 19: 3 stages 20/24/28 px, RandAugment 0 -> 1.
  Arm("demo-3stage", "demo schedule 20/24/28, adaptive none->minimal", DEMO3, "minimal", "none"),
  # Equal wall time instead of equal epochs: the paper schedule's runs end ~1.14x sooner, so 1.15x
  # the epochs spends about the fixed arm's time; it answers whether the progressive run gets to
  # the baseline's top-1 at all when it is given the time it saved.
  Arm(
    "prog-light-eqtime",
    "progressive, adaptive none->light, 1.15x epochs",
    PAPER,
    "light",
    "none",
    epochs_scale=1.15,
  ),
)


@dataclasses.dataclass(frozen=True)
class Budget:
  seconds: float  # a fixed-arm run's wall time
  seeds: tuple
  points: int = 15  # curve evals a run gets, about
  eval_subset: int = 2000


BUDGETS = {"short": Budget(600.0, (0, 1, 2)), "long": Budget(1800.0, (0,))}
STARTUP_S = 30.0  # process start, imports, input pipeline, the first compile (demo.md: ~10 s)
# --smoke: a few steps at toy sizes, curve evals by steps, small eval split.
SMOKE_ARMS = ("fixed-demo", "hold-ramp")
SMOKE = {
  "num_train_steps": 24,
  "batch_size": 16,
  "eval_batch_size": 50,
  "eval_split": "test[:200]",
  "eval_every_steps": 6,
  "eval_subset": 100,
  "log_every_steps": 6,
  "checkpoint_every_steps": 24,
}
SMOKE_RECAL_IMAGES = 100


def epochs_for(net: Network, budget: Budget, num_train: int, num_eval: int, img_s=None) -> float:
  """Epochs that make a fixed-arm run of `net` take about `budget.seconds`: the budget less the
  start-up and the evals (curve points on the subset and the final eval on all images, at
  net.eval_img_s), times the train speed (img_s or net.train_img_s), over the train split;
  rounded to 0.01 so the run's name is the same at every sitting."""
  eval_s = (budget.points * budget.eval_subset + num_eval) / net.eval_img_s
  train_s = budget.seconds - STARTUP_S - eval_s
  if train_s <= 0:
    raise ValueError(f"budget {budget.seconds:g} s leaves no time to train after the evals")
  return round(train_s * (img_s or net.train_img_s) / num_train, 2)


def arm_overrides(arm: Arm) -> dict:
  """The arm's `config.*` overrides: its schedule, and the regularization end points (the fixed
  arms' preset 'none' reads only the max_* values)."""
  hi = REG_LEVELS[arm.reg]
  lo = hi if arm.reg_from is None else REG_LEVELS[arm.reg_from]
  out = dict(arm.schedule)
  for name in ("randaug", "mixup", "dropout"):
    out[f"progressive.max_{name}"] = float(hi[name])
    if not arm.fixed:
      out[f"progressive.min_{name}"] = float(lo[name])
  return out


@dataclasses.dataclass(frozen=True)
class Planned:
  network: str
  budget: str
  arm: Arm
  seed: int
  run: common.Run
  config: object  # the resolved ConfigDict the run trains with
  predicted_s: float  # wall seconds, post-eval included (an upper bound for progressive arms)

  def post_eval_command(self) -> list[str] | None:
    if not self.arm.post_eval:
      return None
    n = SMOKE_RECAL_IMAGES if self.budget == "smoke" else RECAL_IMAGES
    run = dataclasses.replace(self.run, overrides={**self.run.overrides, "recalibrate_bn": n})
    sizes = ",".join(map(str, self.arm.post_eval))
    return run.argv() + ["--mode=eval", f"--eval_sizes={sizes}"]


def config_digest(config) -> str:
  """8 hex digits of the resolved config without its seed: the seeds of one arm share it."""
  d = dict(config.to_dict())
  d.pop("seed", None)
  return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


def plan_runs(
  networks, arms, budget_name: str, seeds, root: str, *, epochs=None, img_s=None, data_dir=None
) -> list[Planned]:
  """Every run of `networks` x `arms` x `seeds` at the budget ('short', 'long' or 'smoke'), in
  that order. `epochs`/`img_s`: {network: value} replacing the derived length / measured speed."""
  from effnetv2_jax import plan, sweep

  out = []
  smoke = budget_name == "smoke"
  budget = BUDGETS.get(budget_name, Budget(0.0, (0,)))
  for name in networks:
    net = NETWORKS[name]
    config_arg = net.smoke_config if smoke else net.config
    base_config = sweep.load_config(os.path.join(common.ROOT, config_arg))
    base = dict(net.overrides, eval_every_stage=False)
    if data_dir:
      base["data_dir"] = data_dir
    if smoke:
      base.update(SMOKE)
    else:
      num_train = plan.train_examples(base_config)
      length = (epochs or {}).get(name) or epochs_for(
        net, budget, num_train, _num_eval(base_config), (img_s or {}).get(name)
      )
      base.update(
        num_epochs=float(length),
        eval_every_seconds=round(budget.seconds / budget.points, 1),
        eval_subset=budget.eval_subset,
      )
    for arm in arms:
      for seed in seeds:
        overrides = {**base, **arm_overrides(arm), "seed": int(seed)}
        if arm.epochs_scale != 1.0 and not smoke:
          overrides["num_epochs"] = round(base["num_epochs"] * arm.epochs_scale, 2)
        config = base_config.copy_and_resolve_references()
        for key, value in overrides.items():
          sweep.apply_override(config, key, value)
        run_name = f"{arm.key}-seed{seed}-{config_digest(config)}"
        workdir = os.path.join(root, name, budget_name, run_name)
        post_s = 0.0
        if arm.post_eval and not smoke:
          images = RECAL_IMAGES + len(arm.post_eval) * _num_eval(config)
          post_s = STARTUP_S + images / net.eval_img_s
        run = common.Run(run_name, config_arg, workdir, overrides)
        out.append(Planned(name, budget_name, arm, int(seed), run, config, budget.seconds + post_s))
  return out


def _num_eval(config) -> int:
  from effnetv2_jax.data import datasets

  info = datasets.get_dataset_info(config.dataset, config.data_dir)
  return info.known_split_size(config.eval_split or info.eval_split) or info.num_eval


def describe(p: Planned) -> str:
  """One run for --dry-run: name, predicted time, its stages (size, reg, steps), overrides."""
  from effnetv2_jax import plan

  run = plan.resolve(p.config)
  stages = "; ".join(
    f"{s.image_size}px ra {s.randaug_magnitude:.3g} mix {s.mixup_alpha:.3g} drop "
    f"{s.dropout_rate:.3g} steps {s.first_step}-{s.last_step}"
    for s in run.stages
  )
  done = " [done]" if p.run.results() is not None else ""
  post = p.post_eval_command()
  return "\n".join(
    [
      f"{p.network}/{p.budget}/{p.run.name}{done}: ~{p.predicted_s / 60:.1f} min",
      f"  {p.arm.label}: {run.total_steps} steps at batch {run.batch_size}; {stages}",
      f"  overrides {json.dumps(p.run.overrides, sort_keys=True)}",
    ]
    + ([f"  then python {' '.join(post[1:])}"] if post else [])
  )


def dry_run(planned) -> str:
  lines = [describe(p) for p in planned]
  todo = [p for p in planned if p.run.results() is None]
  hours = sum(p.predicted_s for p in planned) / 3600
  left = sum(p.predicted_s for p in todo) / 3600
  lines.append(
    f"{len(planned)} runs, {len(todo)} still to train: predicted {hours:.1f} h in all, "
    f"{left:.1f} h left (each run counted at its budget, so the progressive arms' shorter runs "
    "make this an upper bound; post-training evals included)"
  )
  return "\n".join(lines)


# --- running ---------------------------------------------------------------------------------


def _busy_cpu_s() -> float | None:
  """CPU seconds all processes spent busy since boot (/proc/stat), None where there is none."""
  try:
    with open("/proc/stat") as f:
      fields = [float(x) for x in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0.0] * 8)[:8]
  return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
  """CPU seconds of this process and its finished (waited-for) children."""
  total = 0.0
  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
    r = resource.getrusage(who)
    total += r.ru_utime + r.ru_stime
  return total


def other_cores(busy0, own0, busy1, own1, wall_s) -> float | None:
  """Mean cores other processes kept busy over `wall_s`: all busy CPU time less ours."""
  if busy0 is None or busy1 is None or wall_s <= 0:
    return None
  return max(0.0, ((busy1 - busy0) - (own1 - own0)) / wall_s)


def train_one(p: Planned, *, follow: bool) -> None:
  """Trains `p` alone unless it has finished, recording the machine's other load beside it;
  then its post-training eval, if the arm has one and it is missing."""
  if p.run.results() is None:
    t0, busy0, own0 = time.time(), _busy_cpu_s(), _own_cpu_s()
    load = common.load_average()
    _, codes = common.train([p.run], follow=follow)
    wall = time.time() - t0
    machine = {
      "load_average_before": load,
      "wall_s": wall,
      "other_cores": other_cores(busy0, own0, _busy_cpu_s(), _own_cpu_s(), wall),
      "cpu_count": os.cpu_count(),
      "exit_code": codes.get(p.run.name),
    }
    with open(os.path.join(p.run.workdir, MACHINE_NAME), "w") as f:
      json.dump(machine, f, indent=1)
  command = p.post_eval_command()
  if command and p.run.results() is not None and _post_eval(p) is None:
    from effnetv2_jax import sweep

    print("$ " + " ".join(command), flush=True)
    path = os.pathsep.join(filter(None, [common.ROOT, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    sweep.run_trials([(p.run.name + " eval", command, p.run.workdir)], parallel=1, env=env)


def _read_json(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _post_eval(p: Planned) -> dict | None:
  """{size: top-1} of the run's BN-recalibrated eval, or None while it has none."""
  r = _read_json(os.path.join(p.run.workdir, EVAL_RESULTS_NAME))
  if not r or not r.get("evals"):
    return None
  return {int(e["image_size"]): float(e["top1"]) for e in r["evals"]}


# --- the report ------------------------------------------------------------------------------


def _commit() -> str:
  def git(*args):
    return subprocess.run(
      ["git", *args], cwd=common.ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()

  head = git("rev-parse", "--short", "HEAD") or "unknown"
  return head + (" (uncommitted changes)" if git("status", "--porcelain", "--", ".") else "")


def idle_statement(loads: dict) -> str:
  """`loads`: run name -> other cores (None: not measured). An honest sentence on whether the
  machine was idle while the runs trained."""
  known = {k: v for k, v in loads.items() if v is not None}
  unknown = sorted(set(loads) - set(known))
  if not known:
    return "Machine idle: not measured (no run has a machine.json)."
  worst = max(known.values())
  busy = sorted(k for k, v in known.items() if v >= IDLE_CORES)
  head = (
    f"Machine idle: yes, other processes kept at most {worst:.2f} cores busy during any run"
    if not busy
    else f"Machine idle: NO, other processes kept up to {worst:.2f} cores busy; runs sharing the "
    f"machine (>= {IDLE_CORES} cores): {', '.join(busy)}; their times are not clean"
  )
  tail = f"; not measured for {', '.join(unknown)}" if unknown else ""
  return f"{head} (CPU time from /proc/stat less the runs' own, over their wall time){tail}."


def network_block(name: str, budget_name: str, planned, results_dir: str) -> tuple[str, dict]:
  """The markdown part and the machine loads of one network at one budget; draws its plot."""
  mine = [p for p in planned if p.network == name and p.budget == budget_name]
  arms = list({p.arm.key: p.arm for p in mine}.values())
  results = {a.key: {} for a in arms}
  extras, loads = {}, {}
  for p in mine:
    results[p.arm.key][p.seed] = p.run.results()
    machine = _read_json(os.path.join(p.run.workdir, MACHINE_NAME)) or {}
    if results[p.arm.key][p.seed] is not None:
      loads[p.run.name] = machine.get("other_cores")
    e = extras.setdefault(p.arm.key, {"other_cores": None, "post_eval": {}})
    if machine.get("other_cores") is not None:
      e["other_cores"] = max(e["other_cores"] or 0.0, machine["other_cores"])
    for size, top1 in (_post_eval(p) or {}).items():
      e["post_eval"].setdefault(size, []).append(top1)
  for e in extras.values():
    e["post_eval"] = {s: sum(v) / len(v) for s, v in e["post_eval"].items()}
  summary = report.summarize(arms, results)
  c = mine[0].config
  length = f"{c.num_train_steps} steps" if c.num_train_steps > 0 else f"{c.num_epochs:g} epochs"
  every = (
    f"{c.eval_every_seconds:g} s" if c.eval_every_seconds > 0 else f"{c.eval_every_steps} steps"
  )
  note = (
    f"**{name}, {budget_name} budget** ({c.model_name}, `{mine[0].run.config}`): {length} at batch "
    f"{c.batch_size} for every arm, eval at {c.eval_image_size} px, curve evals every "
    f"{every} on {c.eval_subset or 'all'} images, "
    f"final eval on the whole eval split; seeds {', '.join(map(str, sorted({p.seed for p in mine})))}."
  )
  png = os.path.join(results_dir, f"time_to_accuracy_{name}_{budget_name}.png")
  drawn = report.plot(png, f"Fashion-MNIST, {name}, {budget_name} budget", arms, results, summary)
  lines = [note, "", common.markdown_table(report.TABLE_HEADER, report.table_rows(summary, extras))]
  lines += ["", *[f"- {a}" for a in report.answer(summary, arms)]]
  if summary["equal_time"] is not None:
    lines.append(f"- Equal time for the top-1 column: {summary['equal_time']:.0f} s.")
  if drawn:
    lines.append(f"- Plot: `{os.path.relpath(drawn, results_dir)}`.")
  return "\n".join(lines), loads


def write_report(planned, budget_name, networks, results_dir, command) -> str:
  parts, loads = [], {}
  for name in networks:
    text, net_loads = network_block(name, budget_name, planned, results_dir)
    parts.append(text)
    loads.update(net_loads)
  facts = (
    f"load average {common.load_average()} when this block was written, commit {_commit()}, "
    f"{os.cpu_count()} CPUs. {idle_statement(loads)}"
  )
  block = "\n".join(
    common.heading(f"Time to accuracy, {budget_name} budget", command, facts)
    + ["", *[f"{p}\n" for p in parts]]
  )
  common.append_result(
    os.path.join(results_dir, RESULTS_NAME),
    "Time to accuracy on Fashion-MNIST: progressive learning vs a fixed-size baseline",
    MODULE,
    block,
  )
  return block


def _pairs(items, cast) -> dict:
  out = {}
  for item in items or ():
    key, _, value = item.partition("=")
    if key not in NETWORKS or not value:
      raise SystemExit(f"error: {item!r}: expected NET=VALUE with NET one of {sorted(NETWORKS)}")
    out[key] = cast(value)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--budget", choices=sorted(BUDGETS), default="short")
  ap.add_argument("--seeds", type=int, nargs="+", help="default: the budget's")
  ap.add_argument("--networks", nargs="+", choices=sorted(NETWORKS), default=sorted(NETWORKS))
  all_arms = ",".join(a.key for a in ARMS)
  ap.add_argument("--arms", default="", help=f"comma-separated arm keys; default all: {all_arms}")
  ap.add_argument("--epochs", nargs="*", help="NET=E: run length in epochs instead of derived")
  ap.add_argument("--train-img-s", nargs="*", help="NET=X: measured fixed-arm train img/s")
  ap.add_argument("--workdir", default="", help="default workdirs/time_to_accuracy")
  ap.add_argument("--results-dir", default="", help="default experiments/results")
  ap.add_argument("--data_dir", default="", help="TFDS data_dir holding fashion_mnist")
  ap.add_argument("--dry-run", action="store_true", help="print the runs and predicted hours")
  ap.add_argument("--report-only", action="store_true", help="no training: report what exists")
  ap.add_argument("--smoke", action="store_true", help="two tiny runs per network, temp output")
  ap.add_argument("--follow", action="store_true", help="echo each run's output")
  args = ap.parse_args(argv)
  command = common.command(MODULE, sys.argv[1:] if argv is None else argv)
  keys = [k.strip() for k in args.arms.split(",") if k.strip()]
  if args.smoke:
    keys = keys or list(SMOKE_ARMS)
    budget_name, seeds = "smoke", args.seeds or [0]
    tmp = tempfile.mkdtemp(prefix="tta_smoke_")
    root = args.workdir or os.path.join(tmp, "workdirs")
    results_dir = args.results_dir or tmp
  else:
    budget_name, seeds = args.budget, args.seeds or list(BUDGETS[args.budget].seeds)
    root = args.workdir or os.path.join(common.ROOT, "workdirs", "time_to_accuracy")
    results_dir = args.results_dir or common.RESULTS_DIR
  by_key = {a.key: a for a in ARMS}
  unknown = [k for k in keys if k not in by_key]
  if unknown:
    raise SystemExit(f"error: --arms: unknown {unknown}; known: {sorted(by_key)}")
  arms = [by_key[k] for k in keys] if keys else list(ARMS)
  planned = plan_runs(
    args.networks,
    arms,
    budget_name,
    seeds,
    root,
    epochs=_pairs(args.epochs, float),
    img_s=_pairs(args.train_img_s, float),
    data_dir=args.data_dir or None,
  )
  if args.dry_run:
    print(dry_run(planned))
    return
  if not args.report_only:
    for p in planned:
      train_one(p, follow=args.follow)
  os.makedirs(results_dir, exist_ok=True)
  print(write_report(planned, budget_name, args.networks, results_dir, command))
  print(f"results: {os.path.join(results_dir, RESULTS_NAME)}")


if __name__ == "__main__":
  main()

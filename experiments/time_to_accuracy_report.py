"""The report of experiments/time_to_accuracy.py: seeds aggregated per arm, times to the target,
speed-ups, the markdown table, the answer lines and the plot. Pure functions of results.json
dicts (no training, no JAX), so tests/test_time_to_accuracy.py checks the arithmetic on
synthetic results.

Definitions (the script's docstring states them for a reader of the table):

  target         the best fixed arm's mean final top-1 (the final eval: the whole test split);
                 that arm is the reference
  end time       a run's last curve point's wall_s: when its final weights were ready (before the
                 final eval's own seconds); results without a curve use total_wall_s
  time to X      curves.time_to(results, X): wall seconds, compiles, input and curve evals
                 included, at which the curve first reaches X (linear between points)
  T_ref(X)       the reference arm's mean end time for X = target (its final top-1 averages to
                 the target by definition); for lower thresholds its seeds' mean time to X, over
                 the seeds that reach X (leaving one out makes T_ref smaller: it favours the
                 baseline)
  speed-up at X  T_ref(X) / the arm's mean time to X, only when every finished seed reached X
  equal time     the earliest mean end time over the arms; "top-1 at equal time" is each seed's
                 last curve point at or before it (what the run had reached by then)
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence

from effnetv2_jax import curves

THRESHOLDS = (1.0, 0.99)  # fractions of the target; time to each is reported


def mean_std(values) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation (0 for one value) of the values that are not None;
  (None, None) when there are none."""
  xs = [float(v) for v in values if v is not None]
  if not xs:
    return None, None
  return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def end_time(results: Mapping) -> float:
  points = (results.get("curve") or {}).get("points") or []
  return float(points[-1]["wall_s"]) if points else float(results["total_wall_s"])


def top1_at(results: Mapping, t: float) -> float | None:
  """Top-1 of the last curve point at or before wall second `t`; None if there is none."""
  best = None
  for p in (results.get("curve") or {}).get("points") or []:
    if p["wall_s"] <= t + 1e-9:
      best = float(p["top1"])
  return best


def _final_top1(r: Mapping) -> float:
  return float(r["final_eval"]["top1"])


def _stage_speeds(r: Mapping) -> list:
  from experiments import plotting

  return plotting.stage_speeds(r)


def summarize(arms: Sequence, results: Mapping[str, Mapping[int, Mapping | None]]) -> dict:
  """`arms`: the script's Arm objects (key, label, fixed, ...); `results`: arm key -> {seed:
  results.json or None}. -> {'target', 'reference' (arm key), 'equal_time', 'ref_times'
  {threshold: s}, 'rows': [one dict per arm, in `arms` order]} (module docstring)."""
  done = {a.key: [r for r in results.get(a.key, {}).values() if r] for a in arms}
  fixed = [(a.key, mean_std(map(_final_top1, done[a.key]))[0]) for a in arms if a.fixed]
  fixed = [(k, m) for k, m in fixed if m is not None]
  reference, target = max(fixed, key=lambda kv: kv[1]) if fixed else (None, None)
  ends = [mean_std(map(end_time, runs))[0] for runs in done.values() if runs]
  equal_time = min(ends) if ends else None

  ref_times = {}
  if reference is not None:
    ref_runs = done[reference]
    for thr in THRESHOLDS:
      if thr == 1.0:
        ref_times[thr] = mean_std(map(end_time, ref_runs))[0]
      else:
        ref_times[thr] = mean_std(curves.time_to(r, thr * target) for r in ref_runs)[0]

  rows = []
  for a in arms:
    runs = done[a.key]
    row = {
      "key": a.key,
      "label": a.label,
      "seeds": sorted(s for s, r in results.get(a.key, {}).items() if r),
      "missing": sorted(s for s, r in results.get(a.key, {}).items() if not r),
      "top1": mean_std(map(_final_top1, runs)),
      "top1_each": [_final_top1(r) for r in runs],
      "top1_equal_time": mean_std(top1_at(r, equal_time) for r in runs) if runs else (None, None),
      "wall": mean_std(r["total_wall_s"] for r in runs),
      "end": mean_std(map(end_time, runs)),
      "compile_s": mean_std(sum(s.get("compile_s", 0.0) for s in r["stages"]) for r in runs)[0],
      "curve_eval_s": mean_std((r.get("curve") or {}).get("eval_s_total", 0.0) for r in runs)[0],
      "sizes": [s["image_size"] for s in runs[0]["stages"]] if runs else [],
      "img_s": [mean_std(v)[0] for v in zip(*map(_stage_speeds, runs))] if runs else [],
      "reach": {},
      "time_to": {},
      "speedup": {},
    }
    for thr in THRESHOLDS:
      if target is None or not runs:
        continue
      if a.key == reference and thr == 1.0:
        times = [end_time(r) for r in runs]
      else:
        times = [curves.time_to(r, thr * target) for r in runs]
      row["reach"][thr] = times
      all_reached = all(t is not None for t in times)
      row["time_to"][thr] = mean_std(times)[0] if all_reached else None
      ref = ref_times.get(thr)
      t_arm = row["time_to"][thr]
      row["speedup"][thr] = ref / t_arm if ref and t_arm else None
    row["end_speedup"] = (
      ref_times[1.0] / row["end"][0] if ref_times.get(1.0) and row["end"][0] else None
    )
    rows.append(row)
  return {
    "target": target,
    "reference": reference,
    "equal_time": equal_time,
    "ref_times": ref_times,
    "rows": rows,
  }


# --- text ------------------------------------------------------------------------------------


def _ms(pair, fmt="{:.4f}", scale=1.0) -> str:
  m, s = pair
  if m is None:
    return "-"
  return f"{fmt.format(m * scale)} ± {fmt.format(s * scale)}"


def _times(times: Sequence) -> str:
  if not times:
    return "-"
  reached = [t for t in times if t is not None]
  if not reached:
    return "not reached"
  each = " / ".join("-" if t is None else f"{t:.0f}" for t in times)
  if len(reached) < len(times):
    return f"{len(reached)}/{len(times)} seeds ({each})"
  return f"{statistics.fmean(reached):.0f} ({each})" if len(times) > 1 else each


def _x(v) -> str:
  return "-" if v is None else f"{v:.2f}x"


TABLE_HEADER = [
  "arm",
  "seeds",
  "stage sizes",
  "final top-1 mean ± sd (per seed)",
  "top-1 at equal time",
  "wall s mean ± sd",
  "of which compiling / curve evals",
  "s to target (per seed)",
  "speed-up to target",
  "s to 99% of target",
  "speed-up to 99%",
  "end-time ratio",
  "train img/s per stage",
  "other CPU load (cores)",
  "after BN recal (size: top-1)",
]


def table_rows(summary: Mapping, extras: Mapping[str, Mapping] | None = None) -> list[list[str]]:
  """One markdown row per arm. `extras`: arm key -> {'other_cores': float | None, 'post_eval':
  {size: top-1 mean}} (the machine record and the after-training evals)."""
  out = []
  for row in summary["rows"]:
    extra = (extras or {}).get(row["key"], {})
    if not row["seeds"]:
      missing = ", ".join(map(str, row["missing"])) or "-"
      out.append([row["label"], f"none done (missing {missing})"] + ["-"] * 13)
      continue
    each = ", ".join(f"{t:.4f}" for t in row["top1_each"])
    seeds = ", ".join(map(str, row["seeds"]))
    if row["missing"]:
      seeds += f" (missing {', '.join(map(str, row['missing']))})"
    other = extra.get("other_cores")
    post = extra.get("post_eval") or {}
    out.append(
      [
        row["label"] + (" (reference)" if row["key"] == summary["reference"] else ""),
        seeds,
        "/".join(map(str, row["sizes"])),
        f"{_ms(row['top1'])} ({each})",
        _ms(row["top1_equal_time"]),
        _ms(row["wall"], "{:.0f}"),
        f"{row['compile_s']:.0f} / {row['curve_eval_s']:.0f}",
        _times(row["reach"].get(1.0, [])),
        _x(row["speedup"].get(1.0)),
        _times(row["reach"].get(0.99, [])),
        _x(row["speedup"].get(0.99)),
        _x(row["end_speedup"]),
        "/".join("-" if v is None else f"{v:.0f}" for v in row["img_s"]),
        "unknown" if other is None else f"{other:.2f}",
        ", ".join(f"{s}px {t:.4f}" for s, t in sorted(post.items())) or "-",
      ]
    )
  return out


def answer(summary: Mapping, arms: Sequence, *, target_speedup: float = 1.4) -> list[str]:
  """The lines that answer the experiment's question from the measured numbers: does an adaptive
  arm reach the target >= `target_speedup` x sooner, and does adaptive beat constant
  regularization on the same size schedule (final top-1, mean over seeds)?"""
  if summary["target"] is None:
    return ["No fixed arm has finished: no target yet."]
  rows = {r["key"]: r for r in summary["rows"]}
  ref = rows[summary["reference"]]
  lines = [
    (
      f"Target: {summary['target']:.4f} top-1, the mean final top-1 of `{ref['label']}` (the "
      f"best fixed arm), reached when its runs end at {summary['ref_times'][1.0]:.0f} s on average."
    )
  ]
  adaptive = [a for a in arms if not a.fixed and a.reg_from is not None and rows[a.key]["seeds"]]
  best = None
  for a in adaptive:
    s = rows[a.key]["speedup"].get(1.0)
    if s is not None and (best is None or s > best[1]):
      best = (a, s)
  if best is None:
    lines.append(
      f"Speed-up: no adaptive arm reached the target on every seed, so none is faster than the "
      f"fixed baseline (paper: >= {target_speedup:g}x); see the s-to-target and 99% columns and "
      "the per-stage img/s."
    )
  else:
    a, s = best
    verdict = "meets" if s >= target_speedup else "does not meet"
    lines.append(
      f"Speed-up: `{a.label}` reaches the target at {rows[a.key]['time_to'][1.0]:.0f} s, "
      f"{s:.2f}x sooner than the baseline: {verdict} the paper's smallest speed-up "
      f"({target_speedup:g}x)."
    )
  for a in adaptive:
    twin = next(
      (
        c
        for c in arms
        if not c.fixed
        and c.reg_from is None
        and (c.schedule, c.reg, c.epochs_scale) == (a.schedule, a.reg, a.epochs_scale)
      ),
      None,
    )
    if twin is None or not rows[twin.key]["seeds"]:
      continue
    (ma, sa), (mc, sc) = rows[a.key]["top1"], rows[twin.key]["top1"]
    diff = 100 * (ma - mc)
    noise = 100 * math.hypot(sa, sc)
    word = "beats" if diff > 0 else ("ties" if diff == 0 else "loses to")
    lines.append(
      f"Adaptive vs constant regularization ({a.label} vs {twin.label}): {ma:.4f} vs {mc:.4f} "
      f"final top-1, {diff:+.2f} points: adaptive {word} constant (seed spread combined "
      f"{noise:.2f} points)."
    )
  return lines


# --- plot ------------------------------------------------------------------------------------


def plot(path: str, title: str, arms: Sequence, results: Mapping, summary: Mapping) -> str | None:
  """Top-1 against wall minutes for every arm and seed (colour per arm, marker per seed), the
  target and 99% of it as horizontal lines; left the whole curve, right zoomed near the target.
  Returns `path`, or None when no run has a curve."""
  series = []
  for i, a in enumerate(arms):
    for j, (seed, r) in enumerate(sorted(results.get(a.key, {}).items())):
      pts = (r or {}).get("curve", {}).get("points") or []
      if pts:
        xs = [p["wall_s"] / 60 for p in pts]
        series.append((a.label, seed, f"C{i % 10}", "osD^v"[j % 5], xs, [p["top1"] for p in pts]))
  if not series:
    return None
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(12, 5), dpi=110)
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 2)
  target = summary["target"]
  seen = set()
  for ax in axes:
    for label, seed, colour, marker, xs, ys in series:
      name = None if label in seen or ax is axes[1] else label
      seen.add(label)
      ax.plot(xs, ys, "-", color=colour, marker=marker, markersize=3, alpha=0.8, label=name)
    if target is not None:
      ax.axhline(target, color="black", linestyle="--", linewidth=1)
      ax.axhline(0.99 * target, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("wall minutes (compiles, input and curve evals included)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("eval top-1 (EMA)")
  axes[0].set_title("whole run", fontsize=9)
  if target is not None:
    top = max(max(s[5]) for s in series)
    axes[1].set_ylim(target - 0.03, max(top, target) + 0.005)
    axes[1].set_title("near the target (dashed; dotted: 99% of it)", fontsize=9)
  axes[0].legend(fontsize=7, loc="lower right")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path + ".tmp.png")
  os.replace(path + ".tmp.png", path)
  return path

"""Plots of the recorded tables, and the helpers that turn recorded values into plot data (table
cells, per-stage speeds of a run's results.json).

matplotlib is a dependency of the package (setup.py); should it be missing, `bar_plot`/`line_plot`
print one message and return None, and the scripts still write their tables.
"""

from __future__ import annotations

import os
import sys

from experiments import common


def leading_number(cell: str) -> float:
  """A table cell's number: '7.1M' -> 7.1, '8.8B (README 8.4B)' -> 8.8, '0.488 (batch 1)' -> 0.488,
  '-' -> NaN (no bar, no marker)."""
  head = cell.split(" ")[0].rstrip("MGB")
  try:
    return float(head)
  except ValueError:
    return float("nan")


def short_model_name(name: str) -> str:
  """'efficientnetv2-s' -> 'V2-s', 'efficientnet-b7' -> 'V1-b7', 'resnet50' -> 'ResNet50': axis labels."""
  return (
    name.replace("efficientnetv2-", "V2-")
    .replace("efficientnet-", "V1-")
    .replace("resnet", "ResNet")
  )


def stage_speeds(results: dict) -> list:
  """Train images/s of each stage of a training run's results.json: steps x batch over the stage's
  wall time less compiling (so a stage-end eval still counts); None where the record lacks the
  counts."""
  batch = results.get("config", {}).get("batch_size")
  out = []
  for st in results["stages"]:
    busy = st.get("wall_s", 0.0) - st.get("compile_s", 0.0)
    out.append(st["steps"] * batch / busy if batch and "steps" in st and busy > 0 else None)
  return out


def _pyplot():
  try:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    return plt
  except ImportError:
    print(
      "matplotlib is not installed (pip install matplotlib): table only, no plot",
      file=sys.stderr,
      flush=True,
    )
    return None


def _save(plt, fig, name: str, *, laid_out: bool = False) -> str:
  path = common.results_path(name)
  if not laid_out:
    fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=120)
  os.replace(path + ".tmp.png", path)
  plt.close(fig)
  return path


def bar_plot(
  name: str, labels, series: dict, *, title: str, ylabels: dict | None = None, log=False
):
  """One subplot per series (e.g. params, MACs, imgs/s), bars per label; PNG path or None.
  A series is a list, or (measured, paper) with NaN where the paper gives no number.
  `log`: True for log y axes everywhere, or the series keys that get one."""
  log_keys = set(series) if log is True else set(log or ())
  plt = _pyplot()
  if plt is None:
    return None
  width = max(4.0, 0.32 * len(labels))
  fig, axes = plt.subplots(1, len(series), figsize=(width * len(series), 3.8), squeeze=False)
  for ax, (key, values) in zip(axes[0], series.items()):
    ours = values if not isinstance(values, tuple) else values[0]
    ax.bar(range(len(labels)), ours, color="tab:blue", label="measured here")
    if isinstance(values, tuple) and values[1] is not None:  # (ours, paper): paper as markers
      ax.plot(range(len(labels)), values[1], "o", color="tab:red", label="paper")
      ax.legend(fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(
      labels,
      fontsize=8,
      rotation=60 if len(labels) > 8 else 0,
      ha="right" if len(labels) > 8 else "center",
    )
    if key in log_keys:
      ax.set_yscale("log")
    ax.set_title((ylabels or {}).get(key, key), fontsize=9)
  fig.suptitle(title, fontsize=10)
  return _save(plt, fig, name)


def line_plot(
  name: str, panels: dict, *, title: str, xlabel: str, ylabel: str, sharey: bool = False
):
  """panels: panel title -> {(series, run): (xs, ys)}; one subplot per panel, one colour per series,
  one marker per run (e.g. seeds), the legend under the plots; PNG path or None."""
  plt = _pyplot()
  if plt is None:
    return None
  fig, axes = plt.subplots(
    1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False, sharey=sharey
  )
  series = list(dict.fromkeys(s for curves in panels.values() for s, _ in curves))
  runs = list(dict.fromkeys(r for curves in panels.values() for _, r in curves))
  colours = {s: f"C{i % 10}" for i, s in enumerate(series)}
  markers = {r: "osD^v"[i % 5] for i, r in enumerate(runs)}
  for ax, (panel, curves) in zip(axes[0], panels.items()):
    for (s, r), (xs, ys) in curves.items():
      ax.plot(xs, ys, "-", marker=markers[r], color=colours[s], alpha=0.85)
    ax.set_title(panel, fontsize=10)
    ax.set_xlabel(xlabel)
    if not sharey:
      ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(ylabel)
  handles = [plt.Line2D([], [], color=colours[s], label=s) for s in series]
  handles += [
    plt.Line2D([], [], color="grey", marker=markers[r], linestyle="", label=r) for r in runs
  ]
  fig.legend(
    handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False
  )
  fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0.06 * (1 + len(handles) // 4), 1, 1))
  return _save(plt, fig, name, laid_out=True)

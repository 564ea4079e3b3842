r"""Sweeps: run one config under a list of `config.*` overrides, one workdir per trial, then tabulate.

  python -m effnetv2_jax.sweep --config=configs/demo.py:runlocal --sweep=sweeps/lr.py \
      --workdir=workdirs/lr_sweep [--parallel=2] [--dry_run] [--config.num_train_steps=100 ...]

SPEC is either
  * a Python file defining `get_sweep()` that returns a list of dicts, e.g.
        from effnetv2_jax.sweep import product, zipped, cross
        def get_sweep():
          return cross(product(lr_per_256=[0.008, 0.016], seed=[0, 1]),
                       zipped(**{"progressive.preset": ["paper", "none"], "eval_image_size": [28, 28]}))
  * or a YAML file with `grid:` (every combination) and/or `zip:` (lists walked together) mappings;
    the trials are grid x zip:
        grid: {lr_per_256: [0.008, 0.016], seed: [0, 1]}
        zip:  {progressive.preset: [paper, none], eval_image_size: [28, 28]}

Keys are config field paths, with or without a leading `config.`. Every override (and every extra
`--config.x=y` given to this command, applied to all trials) is checked against the config before
anything runs: a field the config lacks, or a value of the wrong type, is one `error:` line, exit 2.

Each trial is `python -m effnetv2_jax.main --config=... --workdir=DIR/<trial name> --config.k=v ...`
in a subprocess (its output in DIR/<trial name>/sweep.log); the name is built from the overrides, so
re-running the same sweep finds its trials again and skips the ones whose results.json exists (a
preempted trial has no results.json yet and resumes from its checkpoint). `--parallel=N` runs N
trials at once: for CPU or several GPUs of one host, not for a TPU slice, whose trials must each
hold every chip (run them one at a time there). DIR/sweep_results.md and .csv gather the final
top-1/top-5, steps and wall time of every trial.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import itertools
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Iterable, Sequence

from effnetv2_jax import exit_codes
from effnetv2_jax import paths

RESULTS_NAME = paths.RESULTS_NAME  # written by effnetv2_jax.train when a run completes
TABLE_NAME = "sweep_results"
EXIT_BAD_INPUT = exit_codes.BAD_INPUT
_MAX_NAME = 120  # directory names stay readable and well under file system limits


class SweepError(ValueError):
  """A bad spec or override; `str()` is one line naming the key or file."""


# --- building the list of trials -----------------------------------------------------------------


def product(**axes: Sequence[Any]) -> list[dict]:
  """Every combination of the axes' values (the first axis varies slowest)."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def zipped(**axes: Sequence[Any]) -> list[dict]:
  """The axes walked together: trial i takes value i of each. All axes must have the same length."""
  lengths = {k: len(v) for k, v in axes.items()}
  if len(set(lengths.values())) > 1:
    raise SweepError(f"zip: lists of different lengths {lengths}")
  keys = list(axes)
  return [dict(zip(keys, values)) for values in zip(*(axes[k] for k in keys))]


def cross(*lists: Iterable[dict]) -> list[dict]:
  """Cartesian product of lists of override dicts, merged; a key set by two lists is an error."""
  out = [{}]
  for trials in lists:
    trials = list(trials) or [{}]
    merged = []
    for a in out:
      for b in trials:
        both = set(a) & set(b)
        if both:
          raise SweepError(f"override {sorted(both)[0]!r} is set by two parts of the sweep")
        merged.append({**a, **b})
    out = merged
  return out


def _normalize_key(key: str) -> str:
  return key[len("config.") :] if key.startswith("config.") else key


def _normalize(trials: Any, source: str) -> list[dict]:
  if not isinstance(trials, (list, tuple)) or not all(isinstance(t, dict) for t in trials):
    raise SweepError(
      f"{source}: the sweep must be a list of dicts of overrides, got {type(trials).__name__}"
    )
  if not trials:
    raise SweepError(f"{source}: the sweep has no trials")
  return [{_normalize_key(str(k)): v for k, v in t.items()} for t in trials]


def _load_module(path: str, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise SweepError(f"{path}: not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def spec_from_yaml_text(text: str, source: str = "<yaml>") -> list[dict]:
  try:
    import yaml  # optional: Python specs need nothing beyond the package
  except ImportError:
    raise SweepError(
      f"{source}: YAML specs need PyYAML (pip install pyyaml), or write get_sweep() in a .py file"
    ) from None
  doc = yaml.safe_load(text) or {}
  if not isinstance(doc, dict) or not set(doc) <= {"grid", "zip"} or not doc:
    raise SweepError(f"{source}: a YAML sweep is a mapping with 'grid:' and/or 'zip:' keys")
  parts = []
  for kind, build in (("grid", product), ("zip", zipped)):
    axes = doc.get(kind) or {}
    if not isinstance(axes, dict) or not all(isinstance(v, list) for v in axes.values()):
      raise SweepError(f"{source}: '{kind}:' must map field names to lists of values")
    if axes:
      parts.append(build(**axes))
  return _normalize(cross(*parts), source)


def load_spec(path: str) -> list[dict]:
  """The trials of a .py (get_sweep()) or .yaml/.yml (grid/zip) spec, keys without 'config.'."""
  if not os.path.isfile(path):
    raise SweepError(f"--sweep: {path!r} does not exist")
  if path.endswith((".yaml", ".yml")):
    with open(path) as f:
      return spec_from_yaml_text(f.read(), path)
  module = _load_module(path, "_effnetv2_sweep_spec")
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"--sweep: {path} defines no get_sweep()")
  return _normalize(module.get_sweep(), path)


# --- checking overrides against the config -------------------------------------------------------


def load_config(config_arg: str):
  """The ConfigDict of 'path/to/config.py[:arg]', imported the way ml_collections does it."""
  path, _, arg = config_arg.partition(":")
  if not os.path.isfile(path):
    raise SweepError(f"--config: {path!r} does not exist")
  repo = os.path.dirname(
    os.path.dirname(os.path.abspath(path))
  )  # so `from configs import ...` works
  if repo not in sys.path:
    sys.path.insert(0, repo)
  module = _load_module(path, "_effnetv2_sweep_config")
  return module.get_config(arg) if arg else module.get_config()


def apply_override(config, key: str, value: Any) -> None:
  """Sets config.<key> = value in place; SweepError names the key when the field does not exist."""
  import ml_collections

  path = key.split(".")
  node = config
  for i, part in enumerate(path):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise SweepError(
        f"config.{key}: the config has no field {'.'.join(path[: i + 1])!r} "
        "(overrides must name existing fields; see configs/default.py)"
      )
    if i < len(path) - 1:
      node = node[part]
  leaf = path[-1]
  try:
    setattr(node, leaf, tuple(value) if isinstance(value, list) else value)
  except (TypeError, ValueError) as e:
    raise SweepError(f"config.{key}: {value!r} does not fit the field ({e})") from None


def check_overrides(config, trials: Sequence[dict], base: dict | None = None) -> None:
  """Raises SweepError for the first override the config cannot take (checked on a copy)."""
  for t in trials:
    trial_config = config.copy_and_resolve_references()
    for key, value in {**(base or {}), **t}.items():
      apply_override(trial_config, key, value)


# --- trials: names, commands, running ------------------------------------------------------------


def _fmt(value: Any) -> str:
  """A value as ml_collections' flag parser reads it back (tuples via literal_eval)."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return value if isinstance(value, str) else repr(value)


def trial_name(overrides: dict) -> str:
  """'lr_per_256=0.008,seed=1': readable, stable across re-runs, safe as a directory name."""
  if not overrides:
    return "base"
  parts = [f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in overrides.items()]
  name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))
  if len(name) > _MAX_NAME:  # keep it unique with a digest of the full overrides
    import hashlib

    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()
    name = name[: _MAX_NAME - 9] + "-" + digest[:8]
  return name


def trial_names(trials: Sequence[dict]) -> list[str]:
  names = [trial_name(t) for t in trials]
  seen = set()
  for n, t in zip(names, trials):
    if n in seen:
      raise SweepError(f"two trials get the same name {n!r} (duplicate overrides {t})")
    seen.add(n)
  return names


def trial_command(config_arg: str, workdir: str, overrides: dict, python: str = sys.executable):
  return [python, "-m", "effnetv2_jax.main", f"--config={config_arg}", f"--workdir={workdir}"] + [
    f"--config.{k}={_fmt(v)}" for k, v in overrides.items()
  ]


def _write_text(path: str, text: str) -> None:
  if paths.is_remote(path):  # an object write is atomic by itself
    paths.write_text(path, text)
    return
  paths.write_text(path + ".tmp", text)
  os.replace(path + ".tmp", path)  # a reader never sees half a table


def _child_env(config_arg: str) -> dict:
  env = dict(os.environ)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(config_arg.partition(":")[0])))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH", "")]))
  return env


def run_trials(
  jobs: Sequence[tuple[str, list[str], str]], *, parallel: int, env: dict, log=print
) -> dict[str, int]:
  """Runs (name, argv, trial workdir) jobs, `parallel` at a time; returns name -> exit code."""
  pending, running, codes = list(jobs), {}, {}
  while pending or running:
    while pending and len(running) < max(1, parallel):
      name, argv, wd = pending.pop(0)
      paths.makedirs(wd)
      log_path = os.devnull if paths.is_remote(wd) else os.path.join(wd, "sweep.log")
      out = open(log_path, "ab")  # closed when the trial ends
      log(f"[sweep] start {name}")
      running[name] = (
        subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env),
        out,
        time.time(),
      )
    time.sleep(0.2)
    for name, (proc, out, t0) in list(running.items()):
      if proc.poll() is None:
        continue
      out.close()
      codes[name] = proc.returncode
      log(
        f"[sweep] {'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'} "
        f"{name} in {time.time() - t0:.0f} s"
      )
      del running[name]
  return codes


# --- the results table ---------------------------------------------------------------------------


def gather(
  workdir: str, trials: Sequence[dict], names: Sequence[str], codes: dict | None = None
) -> tuple[list[str], list[list[str]]]:
  """Header and rows: one row per trial, from DIR/<name>/results.json where it exists."""
  keys = list(dict.fromkeys(k for t in trials for k in t))
  header = ["trial"] + keys + ["status", "step", "top1", "top5", "wall_s"]
  rows = []
  for name, t in zip(names, trials):
    path = paths.join(workdir, name, RESULTS_NAME)
    cells = [name] + [_fmt(t[k]) if k in t else "" for k in keys]
    if paths.exists(path):
      r = json.loads(paths.read_text(path))
      ev = r.get("final_eval") or {}
      cells += [
        str(r.get("status", "?")),
        str(r.get("step", "")),
        f"{ev['top1']:.4f}" if "top1" in ev else "",
        f"{ev['top5']:.4f}" if "top5" in ev else "",
        f"{r['total_wall_s']:.1f}" if "total_wall_s" in r else "",
      ]
    else:
      code = (codes or {}).get(name)
      cells += ["not run" if code is None else f"failed (exit {code})", "", "", "", ""]
    rows.append(cells)
  return header, rows


def format_markdown(header, rows, title: str = "") -> str:
  lines = [title, ""] if title else []
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def format_csv(header, rows) -> str:
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(header)
  writer.writerows(rows)
  return buf.getvalue()


def write_tables(workdir: str, header, rows, title: str) -> tuple[str, str]:
  md, cs = (paths.join(workdir, TABLE_NAME + ext) for ext in (".md", ".csv"))
  _write_text(md, format_markdown(header, rows, title))
  _write_text(cs, format_csv(header, rows))
  return md, cs


# --- command line --------------------------------------------------------------------------------


def _parse_args(argv):
  parser = argparse.ArgumentParser(
    prog="python -m effnetv2_jax.sweep", description=__doc__.split("\n")[0]
  )
  parser.add_argument(
    "--config", required=True, help="config file[:args], as for effnetv2_jax.main"
  )
  parser.add_argument(
    "--sweep", required=True, help="a .py file with get_sweep() or a .yaml grid/zip"
  )
  parser.add_argument("--workdir", required=True, help="one subdirectory per trial goes here")
  parser.add_argument("--parallel", type=int, default=1, help="trials run at once (default 1)")
  parser.add_argument(
    "--dry_run", action="store_true", help="print the trial commands, run nothing"
  )
  args, rest = parser.parse_known_args(argv)
  base = {}
  for item in rest:  # --config.x=y applies to every trial
    key, sep, value = item.partition("=")
    if not (key.startswith("--config.") and sep):
      raise SweepError(
        f"unexpected argument {item!r} (only --config.<field>=<value> passes through)"
      )
    base[key[len("--config.") :]] = value
  return args, base


def main(argv=None) -> int:
  try:
    args, base = _parse_args(sys.argv[1:] if argv is None else argv)
    config = load_config(args.config)
    trials = load_spec(args.sweep)
    # Pass-through values are strings from the shell: check them by what the flag parser makes
    # of them, i.e. only that the field exists (main reports a bad value as one line itself).
    for key in base:
      config_get(config, key)
    check_overrides(config, trials)
    names = trial_names(trials)
  except SweepError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT
  base_flags = [f"--config.{k}={v}" for k, v in base.items()]
  jobs, skipped = [], []
  for name, t in zip(names, trials):
    wd = paths.join(args.workdir, name)
    if paths.exists(paths.join(wd, RESULTS_NAME)):
      skipped.append(name)
      continue
    jobs.append((name, trial_command(args.config, wd, t) + base_flags, wd))
  print(
    f"[sweep] {len(trials)} trials, {len(skipped)} already finished, {len(jobs)} to run "
    f"({args.parallel} at a time)",
    flush=True,
  )
  for name in skipped:
    print(f"[sweep] skip {name} (results.json exists)", flush=True)
  if args.dry_run:
    import shlex

    for _, argv_, _ in jobs:
      print(" ".join(shlex.quote(a) for a in argv_), flush=True)
    return 0
  paths.makedirs(args.workdir)
  codes = run_trials(
    jobs, parallel=args.parallel, env=_child_env(args.config), log=lambda m: print(m, flush=True)
  )
  header, rows = gather(args.workdir, trials, names, codes)
  title = f"Sweep of `{args.config}` over `{args.sweep}`"
  md, _ = write_tables(args.workdir, header, rows, title)
  print(format_markdown(header, rows), flush=True)
  print(f"[sweep] table in {md} and .csv", flush=True)
  return 0 if all(c == 0 for c in codes.values()) else 1


def config_get(config, key: str):
  """The current value of config.<key> (SweepError when the field does not exist)."""
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      raise SweepError(
        f"--config.{key}: the config has no field {part!r} (overrides must name "
        "existing fields; see configs/default.py)"
      )
    node = node[part]
  return node


if __name__ == "__main__":
  sys.exit(main())

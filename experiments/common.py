"""What the experiment scripts share: results files, the benchmarked train steps, training runs.

Run every script from the repository root as a module, `python -m experiments.NAME`: the root is
then on sys.path, so `effnetv2_jax`, `configs` and `experiments` are this checkout's and nothing
edits sys.path.

Results files (experiments/results/):
  command(module, argv)              'python -m experiments.NAME ARGS', for a table's header
  load_average(n), timestamp()       what every header states about the machine and the time
  heading(title, command, facts)     '### title', the command, 'date, facts': a measured block
  write_result(name, text)           a whole table, atomically
  append_result(name, title, module, text)  one more dated block (a new file gets a title)
  markdown_table(header, rows)       a table, as the sweep runner formats its own
  read_markdown_table(name)          the last table of a recorded file (`--replot`)

The JAX train step (what bench_train_step, bench_gpu, bench_memory, profile_train_step,
table2_size_batch, v1_vs_v2 and the compile report time):
  build_jax_step(model, batch, size, 'fp32'|'bf16', opts, log) -> (compiled, state, batch, rng,
      {'trace_s', 'compile_s'}): the trainer's own step (train.make_stage_step, train.init_state,
      sharding.jit_train_step) for a one-stage run of configs/default.py, 1000 classes, synthetic
      data; `opts` are model overrides (strings coerced), `dropout_rate` among them, default
      models.model_defaults(model)['dropout_rate']
  compile_stage(config, run, stage, log)  the same for any config and stage of a resolved run
  step_builder(src)                  build_jax_step of another checkout (`src=DIR` variants)
  jax_runner(compiled, state, batch, rng) -> run(n); throughput(run, batch, steps, warmup)

The timm train step: timm_train_step(model, batch, size, bf16=, device=, channels_last=,
compile_model=, phase=) -> run(n), with TIMM_NAMES and stub_torchvision().

Training runs: train(runs) trains each `Run` (config, workdir, overrides, flags) that has no
results.json yet through the sweep runner (effnetv2_jax.sweep.trial_command and run_trials).

Worker processes report on stdout with say(obj); tagged(stdout) reads the reports back.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shlex
import sys
import threading
import time
from typing import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "experiments", "results")
TAG = "@@"  # worker report lines start with this; everything else a library prints is ignored
NUM_CLASSES = 1000
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# The benchmarks' LR schedule: 1000 steps per epoch, 100k steps (only the step's cost matters).
STEPS_PER_EPOCH = 1000
TOTAL_STEPS = 100_000


# --- results files ---------------------------------------------------------------------------


def command(module: str, argv: Sequence[str] | None = None) -> str:
  """The command line that reruns `module` ('experiments.NAME') with `argv` (default: this
  process' arguments), shell-quoted, as a recorded table names it."""
  args = sys.argv[1:] if argv is None else argv
  return " ".join(["python", "-m", module] + [shlex.quote(str(a)) for a in args])


def load_average(n: int = 3) -> str:
  """The 1-, 5- and 15-minute load averages (the first `n`), 'n/a' where the OS has none."""
  try:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()[:n])
  except OSError:
    return "n/a"


def timestamp() -> str:
  return time.strftime("%Y-%m-%d %H:%M")


def heading(title: str, cmd: str, facts: str) -> list[str]:
  """The first lines of a measured block: '### title', the command, then 'date, facts'."""
  return [f"### {title}", "", f"`{cmd}`  ", f"{timestamp()}, {facts}"]


def results_path(name: str) -> str:
  """experiments/results/<name> (an absolute `name` is kept as it is); the folder is created."""
  path = os.path.join(RESULTS_DIR, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return path


def write_result(name: str, text: str) -> str:
  """Writes a whole results file via a tmp file, so an interrupted run never leaves half a table."""
  path = results_path(name)
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
  return path


def append_result(name: str, title: str, module: str, text: str) -> str:
  """Appends one measured block to a results file; a new file starts with `title` and the module
  that writes it. Records accumulate: each run adds its own dated block."""
  path = results_path(name)
  new = not os.path.exists(path)
  header = f"# {title}\n\nWritten by `python -m {module}` (see its docstring).\n\n"
  with open(path, "a") as f:
    f.write((header if new else "") + text.rstrip() + "\n\n")
  return path


def publish(text: str, name: str, title: str, module: str, *, record: bool = True) -> None:
  """Print a measured block and, unless `record` is off (`--no-record`), append it to
  experiments/results/`name` (`append_result`)."""
  print(text)
  if record:
    append_result(name, title, module, text)


def markdown_table(header, rows) -> str:
  """A markdown table of any cells (str() of each), as the sweep runner writes its table."""
  from effnetv2_jax import sweep

  cells = lambda row: [str(c) for c in row]
  return sweep.format_markdown(cells(header), [cells(r) for r in rows]).rstrip("\n")


def read_markdown_table(name: str) -> list[dict]:
  """The last markdown table in experiments/results/<name>, as {header: cell} rows: lets a script
  re-plot a recorded run (`--replot`) without measuring again."""
  with open(os.path.join(RESULTS_DIR, name)) as f:
    lines = [line.strip() for line in f]
  cells = lambda line: [c.strip() for c in line.strip("|").split("|")]
  starts = [
    i for i in range(len(lines) - 1) if lines[i].startswith("|") and lines[i + 1].startswith("|---")
  ]
  if not starts:
    raise ValueError(f"{name}: no markdown table")
  header, rows = cells(lines[starts[-1]]), []
  for line in lines[starts[-1] + 2 :]:
    if not line.startswith("|"):
      break
    rows.append(dict(zip(header, cells(line))))
  return rows


# --- worker reports --------------------------------------------------------------------------


def say(obj) -> None:
  """One report line of a worker process (JSON after TAG)."""
  print(TAG, json.dumps(obj), flush=True)


def tagged(stdout: str) -> list:
  """The reports in a worker's stdout, in order."""
  return [json.loads(l[len(TAG) :]) for l in stdout.splitlines() if l.startswith(TAG)]


# --- the JAX train step ----------------------------------------------------------------------


def coerce(value):
  """A variant option's string as a Python value: '1' -> 1, '0.5' -> 0.5, 'true' -> True."""
  if not isinstance(value, str):
    return value
  for cast in (int, float):
    try:
      return cast(value)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(value.lower(), value)


def bench_config(model_name: str, batch: int, size: int, dtype_name: str, opts=None):
  """configs/default.py as a one-stage run at `size` px: the model, global batch, compute dtype,
  1000 classes, STEPS_PER_EPOCH x TOTAL_STEPS, and `opts` as model overrides; `dropout_rate`
  (default: the model's published one) is the stage's dropout."""
  from configs import default
  from effnetv2_jax import models

  overrides = {k: coerce(v) for k, v in (opts or {}).items()}
  dropout = float(overrides.pop("dropout_rate", models.model_defaults(model_name)["dropout_rate"]))
  c = default.get_config()
  c.model_name = model_name
  c.batch_size = batch
  c.dtype = DTYPES[dtype_name]
  c.num_classes = NUM_CLASSES
  c.num_train_steps = TOTAL_STEPS
  for key, value in overrides.items():
    c.model_overrides[key] = value
  p = c.progressive
  p.preset, p.max_image_size, p.min_dropout, p.max_dropout = "none", size, dropout, dropout
  return c


def build_jax_step(model_name, batch, size, dtype_name, opts=None, log=None):
  """-> (compiled step, state, batch, rng, {'trace_s', 'compile_s'}): the trainer's train step for
  `model_name` at `size` px (see bench_config), compiled for synthetic data.

  `log(message)`, when given, hears each phase as it ends (state built, lowered, compiled), so a
  run cut off by a time limit still tells where its time went.
  """
  from effnetv2_jax import plan

  config = bench_config(model_name, batch, size, dtype_name, opts)
  # Both counts given: no dataset is consulted.
  run = plan.resolve(config, num_train=STEPS_PER_EPOCH * batch, num_classes=NUM_CLASSES)
  return compile_stage(config, run, run.stages[0], log=log)


def compile_stage(config, run, stage, *, log: Callable[[str], None] | None = None):
  """The train step of `stage` of the resolved `run`, built as the trainer builds it (optimizer and
  LR schedule of the run, train.make_stage_step, train.init_state, sharding.jit_train_step) and
  compiled ahead of time for a synthetic batch at the stage's size; returns what build_jax_step
  returns."""
  import jax
  import numpy as np
  from effnetv2_jax import optim, sharding, train

  log = log or (lambda _: None)
  tx, lr_fn = optim.for_run(config, run)
  step = train.make_stage_step(config, run, stage, tx, lr_fn)
  mesh = sharding.make_mesh()
  model = train.build_model(config, run.num_classes, stage.dropout_rate)
  state = train.init_state(config, model, tx, stage.image_size, mesh)
  r = np.random.default_rng(0)
  size = stage.image_size
  host = {
    "image": r.normal(size=(stage.batch_size, size, size, 3)).astype(np.float32),
    "label": r.integers(0, run.num_classes, size=stage.batch_size).astype(np.int32),
  }
  data = sharding.shard_batch(host, mesh)
  rng = jax.device_put(jax.random.PRNGKey(1), sharding.replicated(mesh))
  jax.block_until_ready((state, data))
  log("state and batch on the device")
  t0 = time.perf_counter()
  lowered = sharding.jit_train_step(step, mesh, state).lower(state, data, rng)
  t1 = time.perf_counter()
  log(f"lowered in {t1 - t0:.1f}s")
  compiled = lowered.compile()
  t2 = time.perf_counter()
  log(f"compiled in {t2 - t1:.1f}s")
  return compiled, state, data, rng, {"trace_s": t1 - t0, "compile_s": t2 - t1}


def step_builder(src: str | None = None) -> Callable:
  """`build_jax_step` of the checkout at `src` (None or this checkout: this module's), for an A/B
  against another commit (a `git worktree` of it). A checkout of this layout has it in
  experiments/common.py, an older one in experiments/bench_train_step.py; the file is loaded
  under its own name and imports `effnetv2_jax` and `configs` as this process resolves them, so
  run it in a process started in `src` (`python -m` puts the working directory first on
  sys.path; bench_train_step starts its `src=DIR` workers there)."""
  if src is None or os.path.realpath(src) == os.path.realpath(ROOT):
    return build_jax_step
  for rel in ("experiments/common.py", "experiments/bench_train_step.py"):
    path = os.path.join(src, rel)
    if os.path.isfile(path):
      spec = importlib.util.spec_from_file_location("_src_step_builder", path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      return module.build_jax_step
  raise FileNotFoundError(f"src={src}: neither experiments/common.py nor bench_train_step.py there")


def jax_runner(compiled, state, data, rng) -> Callable[[int], None]:
  """-> run(n): `n` more train steps of `compiled` on the fixed batch, blocking until they are
  done. The state carries over between calls (it is donated, so the caller's copy is consumed)."""
  import jax

  holder = [state]

  def run(n):
    s = holder[0]
    for _ in range(n):
      s, metrics = compiled(s, data, rng)
    jax.block_until_ready((s, metrics))
    holder[0] = s

  return run


def throughput(run: Callable[[int], None], batch: int, steps: int, warmup: int = 1) -> float:
  """Images/s of `steps` steps of `run` after `warmup` untimed ones (first calls allocate)."""
  if warmup:
    run(warmup)
  t0 = time.perf_counter()
  run(steps)
  return batch * steps / (time.perf_counter() - t0)


# --- the timm train step ---------------------------------------------------------------------

TIMM_NAMES = {
  f"efficientnetv2-{v}": f"tf_efficientnetv2_{v}" for v in ("s", "m", "l", "b0", "b1", "b2", "b3")
}


def stub_torchvision():
  """timm imports torchvision (datasets, transforms, FrozenBatchNorm2d) at import time, for its data
  pipeline and BN-freezing helpers. PyPI's torchvision wheels link against CUDA torch, so with the
  CPU torch wheel an empty stand-in answers those imports (in the benchmark process only): every
  name it hands out is a placeholder class that a create_model + train step never touches."""
  import importlib.abc
  import importlib.machinery
  import types

  try:
    import torchvision  # noqa: F401  a working install wins

    return
  except Exception:  # pylint: disable=broad-except
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[name]

  class _Meta(type):
    def __getattr__(cls, attr):  # InterpolationMode.NEAREST and the like: more placeholders
      if attr.startswith("__"):
        raise AttributeError(attr)
      return _Meta(attr, (_Placeholder,), {})

  class _Placeholder(metaclass=_Meta):
    def __init__(self, *a, **k):
      raise RuntimeError("torchvision is stubbed out in this benchmark")

  class _Stub(types.ModuleType):
    def __getattr__(self, attr):
      if attr.startswith("__"):
        raise AttributeError(attr)
      return _Meta(attr, (_Placeholder,), {})

  class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
      if name == "torchvision" or name.startswith("torchvision."):
        return importlib.machinery.ModuleSpec(name, self, is_package=True)
      return None

    def create_module(self, spec):
      m = _Stub(spec.name)
      m.__path__ = []
      m.__version__ = "0.0+stub"
      return m

    def exec_module(self, module):
      pass

  sys.meta_path.insert(0, _Finder())


def timm_train_step(
  model_name: str,
  batch: int,
  size: int,
  *,
  bf16: bool = False,
  device: str = "cpu",
  channels_last: bool = False,
  compile_model: bool = False,
  phase: Callable | None = None,
) -> Callable[[int], None]:
  """-> run(n): `n` train steps of timm's tf_efficientnetv2_<v> (TF-SAME padding, as ours) on one
  random batch, 1000 classes: train mode, drop_rate the model's published dropout and
  drop_path_rate ours, CE with label smoothing 0.1, torch.optim.RMSprop(alpha=0.9, eps=1e-3,
  momentum=0.9, weight_decay=1e-5). No EMA (timm keeps it outside the step), so it does slightly
  less work than ours. `bf16`: torch.autocast; `compile_model`: torch.compile; on CUDA, run(n)
  synchronizes. `phase(name)`, when given, is a context manager entered around 'forward',
  'backward' and 'update' (profilers)."""
  import contextlib

  import torch

  stub_torchvision()
  import timm
  from effnetv2_jax import models
  from effnetv2_jax.models import effnetv2

  dev = torch.device(device)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  torch.manual_seed(0)
  model = timm.create_model(
    TIMM_NAMES[model_name],
    pretrained=False,
    num_classes=NUM_CLASSES,
    drop_rate=models.model_defaults(model_name)["dropout_rate"],
    drop_path_rate=effnetv2.DROP_PATH_RATE,
  )
  model = model.to(dev).to(memory_format=fmt)
  model.train()
  opt = torch.optim.RMSprop(
    model.parameters(), lr=1e-3, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=1e-5
  )
  loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
  forward = torch.compile(model) if compile_model else model
  x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=fmt)
  y = torch.randint(0, NUM_CLASSES, (batch,), device=dev)
  phase = phase or (lambda _: contextlib.nullcontext())

  def run(n):
    for _ in range(n):
      opt.zero_grad(set_to_none=True)
      with phase("forward"), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(forward(x), y)
      with phase("backward"):
        loss.backward()
      with phase("update"):
        opt.step()
    if dev.type == "cuda":
      torch.cuda.synchronize()

  return run


# --- training runs ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: `python -m effnetv2_jax.main --config=CONFIG --workdir=WORKDIR` with
  `--config.k=v` for each override (formatted by the sweep runner) and further main.py flags."""

  name: str
  config: str  # 'configs/demo.py[:args]', relative to the repository root
  workdir: str
  overrides: dict = dataclasses.field(default_factory=dict)
  flags: tuple = ()

  def argv(self, python: str = sys.executable) -> list[str]:
    from effnetv2_jax import sweep

    config = os.path.join(ROOT, self.config)
    return sweep.trial_command(config, self.workdir, self.overrides, python) + list(self.flags)

  def results(self) -> dict | None:
    """Its results.json, or None while it has none (not run, failed, preempted)."""
    from effnetv2_jax import paths

    path = os.path.join(self.workdir, paths.RESULTS_NAME)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)


def train(runs: Sequence[Run], *, follow: bool = False) -> tuple[dict, dict]:
  """Trains each run that has no results.json yet, one after another (timings need the cores to
  themselves), through the sweep runner: its trial command and `run_trials`, each run's output in
  WORKDIR/sweep.log (`follow`: echoed as it is written). Every override is checked against its
  config before anything starts (sweep.SweepError names the first bad one).

  -> ({name: results.json or None}, {name: exit code of the runs started now}).
  """
  from effnetv2_jax import sweep

  for r in runs:
    sweep.check_overrides(sweep.load_config(os.path.join(ROOT, r.config)), [r.overrides])
  jobs = [(r.name, r.argv(), r.workdir) for r in runs if r.results() is None]
  for _, argv, _ in jobs:
    print("$ " + shlex.join(argv), flush=True)
  # This checkout's package for every run, wherever the working directory is.
  env = dict(
    os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
  )
  stop = threading.Event()
  followers = [
    threading.Thread(target=_follow, args=(os.path.join(wd, "sweep.log"), stop), daemon=True)
    for _, _, wd in (jobs if follow else [])
  ]
  for t in followers:
    t.start()
  try:
    codes = sweep.run_trials(jobs, parallel=1, env=env, log=lambda m: print(m, flush=True))
  finally:
    stop.set()
    for t in followers:
      t.join()
  return {r.name: r.results() for r in runs}, codes


def _follow(path: str, stop: threading.Event) -> None:
  """Echoes what is appended to `path` from now on, until `stop` is set and all of it is read."""
  offset = os.path.getsize(path) if os.path.exists(path) else 0
  while not os.path.exists(path):
    if stop.wait(0.2) and not os.path.exists(path):
      return
  with open(path, errors="replace") as f:
    f.seek(offset)
    while True:
      line = f.readline()
      if line:
        print(line, end="", flush=True)
      elif stop.wait(0.2):
        print(f.read(), end="", flush=True)
        return

"""experiments/ is a package: every script imports as `experiments.NAME` with sys.path untouched,
and the shared module (experiments/common.py) builds the trainer's step and launches runs through
the sweep runner."""

import json
import os
import subprocess
import sys

import pytest

from effnetv2_jax import models, plan, sweep
from experiments import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(blocks=("r1_k3_s1_e1_i8_o8_c1",), stem_filters=8, head_filters=16)


def _experiment_modules():
  out = []
  for folder, _, files in os.walk(os.path.join(REPO, "experiments")):
    rel = os.path.relpath(folder, REPO).replace(os.sep, ".")
    out += [f"{rel}.{f[:-3]}" for f in sorted(files) if f.endswith(".py") and f != "__init__.py"]
  return out


IMPORT_ALL = """
import importlib, json, sys
report = {}
for name in json.loads(sys.argv[1]):
  before = list(sys.path)
  module = importlib.import_module(name)
  report[name] = {"file": module.__file__, "sys_path_changed": sys.path != before}
import effnetv2_jax
report["effnetv2_jax"] = {"file": effnetv2_jax.__file__, "sys_path_changed": False}
print(json.dumps(report))
"""


def test_every_experiment_module_imports_from_the_repo_root_without_touching_sys_path():
  modules = _experiment_modules()
  assert {"experiments.bench_train_step", "experiments.common", "experiments.tpu.launch"} <= set(
    modules
  )
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the working directory
  p = subprocess.run(
    [sys.executable, "-c", IMPORT_ALL, json.dumps(modules)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  report = json.loads(p.stdout.strip().splitlines()[-1])
  assert set(report) == set(modules) | {"effnetv2_jax"}
  for name, r in report.items():
    assert not r["sys_path_changed"], f"importing {name} edited sys.path"
    assert os.path.realpath(r["file"]).startswith(os.path.realpath(REPO) + os.sep), (name, r)


def test_command_names_the_module_and_quotes_its_arguments():
  cmd = common.command("experiments.bench_train_step", ["--jax-variant", "b:src=/a b", "--x", 3])
  assert cmd == "python -m experiments.bench_train_step --jax-variant 'b:src=/a b' --x 3"


def test_append_result_titles_a_new_file_once_and_accumulates_blocks(tmp_path, monkeypatch):
  monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
  common.append_result("r.md", "Title", "experiments.x", "### one\n")
  common.append_result("r.md", "Title", "experiments.x", "### two")
  text = (tmp_path / "r.md").read_text()
  assert text == (
    "# Title\n\nWritten by `python -m experiments.x` (see its docstring).\n\n### one\n\n### two\n\n"
  )


def test_the_bench_step_is_one_stage_with_the_models_dropout_unless_opts_set_it():
  c = common.bench_config("efficientnetv2-b2", 8, 64, "bf16", {"remat": "1"})
  run = plan.resolve(c, num_train=8000, num_classes=1000)
  assert len(run.stages) == 1 and run.stages[0].image_size == 64
  assert run.stages[0].dropout_rate == models.model_defaults("efficientnetv2-b2")["dropout_rate"]
  assert c.dtype == "bfloat16" and c.model_overrides.remat == 1 and run.steps_per_epoch == 1000
  c = common.bench_config("efficientnetv2-b2", 8, 64, "fp32", {"dropout_rate": "0.5"})
  assert plan.resolve(c, num_train=8000, num_classes=1000).stages[0].dropout_rate == 0.5
  assert "dropout_rate" not in c.model_overrides


def test_build_jax_step_compiles_a_step_that_trains():
  compiled, state, data, rng, times = common.build_jax_step(
    "efficientnetv2-b0", 8, 16, "fp32", dict(TINY, dropout_rate="0.1")
  )
  assert set(times) == {"trace_s", "compile_s"} and data["image"].shape == (8, 16, 16, 3)
  new_state, metrics = compiled(state, data, rng)
  assert int(new_state.step) == 1 and float(metrics["bad_step"]) == 0


def test_step_builder_loads_the_other_checkouts_own_builder(tmp_path):
  def checkout(name, files):
    for rel, value in files.items():
      path = tmp_path / name / "experiments" / rel
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(f"def build_jax_step(*args, **kwargs):\n  return {value!r}\n")
    return str(tmp_path / name)

  old = checkout("old", {"bench_train_step.py": "old layout"})
  new = checkout("new", {"common.py": "package layout", "bench_train_step.py": "not this one"})
  assert common.step_builder(old)() == "old layout"
  assert common.step_builder(new)() == "package layout"
  assert common.step_builder(None) is common.build_jax_step
  assert common.step_builder(REPO) is common.build_jax_step
  with pytest.raises(FileNotFoundError, match="src="):
    common.step_builder(str(tmp_path))


def test_train_launches_through_the_sweep_runner_and_skips_finished_runs(tmp_path, monkeypatch):
  launched = []
  monkeypatch.setattr(
    sweep, "run_trials", lambda jobs, **kw: launched.extend(jobs) or {j[0]: 0 for j in jobs}
  )
  done = tmp_path / "done"
  done.mkdir()
  (done / "results.json").write_text(json.dumps({"status": "completed"}))
  runs = [
    common.Run("done", "configs/demo.py", str(done), {"seed": 1}),
    common.Run("new", "configs/demo.py:model=resnet", str(tmp_path / "new"), {"seed": 2}, ("--x",)),
  ]
  results, codes = common.train(runs)
  assert results == {"done": {"status": "completed"}, "new": None} and codes == {"new": 0}
  config = os.path.join(REPO, "configs/demo.py:model=resnet")
  expected = sweep.trial_command(config, str(tmp_path / "new"), {"seed": 2}) + ["--x"]
  assert launched == [("new", expected, str(tmp_path / "new"))]
  with pytest.raises(sweep.SweepError, match="batch_sise"):  # checked before anything starts
    common.train([common.Run("bad", "configs/demo.py", str(tmp_path / "b"), {"batch_sise": 1})])
  assert len(launched) == 1

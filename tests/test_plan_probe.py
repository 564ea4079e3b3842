"""Plan mode's probe (effnetv2_jax/plan_probe.py): one measured row per stage, plan.json as
printed, the prediction's arithmetic (compile-ahead included), plan mode without the probe
device-free, and the flag errors."""

import contextlib
import io
import json
import os

import jax
import pytest

from configs import default, imagenet
from effnetv2_jax import main as main_lib
from effnetv2_jax import optim, paths, plan, plan_probe

import _train_fixtures as fx


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
  """One probe through main.run on the tiny two-stage folder config (unoptimized compiles: the
  checks are on structure and positive numbers, not on speed)."""
  base = tmp_path_factory.mktemp("probe")
  data = fx.make_folder_dataset(str(base / "data"), num_train=16, num_val=12)
  config = fx.tiny_config(data, steps=6)
  wd = str(base / "wd")
  out = io.StringIO()
  with fx.unoptimized_xla(), contextlib.redirect_stdout(out):
    code = main_lib.run(config, wd, "plan", plan_probe=True, plan_probe_steps=2)
  return config, wd, code, out.getvalue()


def test_probe_measures_one_row_per_stage(probed):
  config, wd, code, _ = probed
  assert code == 0
  with open(os.path.join(wd, paths.PLAN_NAME)) as f:
    result = json.load(f)
  run = plan.resolve(config)
  rows = result["stages"]
  assert [(r["index"], r["image_size"], r["steps"]) for r in rows] == [
    (s.index, s.image_size, s.num_steps) for s in run.stages
  ]
  assert all(r["batch_size"] == config.batch_size and r["grad_accum_steps"] == 1 for r in rows)
  for r in rows + [result["eval"]]:
    assert r["compile_s"] > 0 and r["step_s"] > 0 and r["peak_bytes"] > 0, r
  assert result["init_s"] > 0 and result["probe_steps"] == 2
  # 12 validation images in batches of 8: two eval batches per pass.
  assert result["eval"]["examples"] == 12 and result["eval"]["batches_per_pass"] == 2
  assert result["num_devices"] == jax.device_count()


def test_plan_json_round_trips_to_what_was_printed(probed):
  config, wd, _, printed = probed
  with open(os.path.join(wd, paths.PLAN_NAME)) as f:
    result = json.load(f)
  table = plan_probe.format_probe(result)
  assert table in printed
  assert plan.format_plan(config, plan.resolve(config)) in printed  # the plain table first
  for r in result["stages"]:
    assert f"| {r['predicted_s']:.1f} |" in table
  assert f"= {result['predicted_total_s']:.1f}s" in printed
  # The parts add up to the totals that were written.
  parts = sum(r["predicted_s"] for r in result["stages"]) + result["final_eval_s"]
  assert result["predicted_run_s"] == pytest.approx(parts)
  assert result["predicted_total_s"] == pytest.approx(result["init_s"] + parts)


def _two_stage_config(**fields):
  c = default.get_config()
  c.num_train_steps = 100
  c.batch_size = 8
  c.eval_batch_size = 10
  c.eval_image_size = 8
  c.warmup_epochs = 0.0
  c.progressive.preset = "paper"
  c.progressive.num_stages = 2
  c.progressive.min_image_size, c.progressive.max_image_size = 8, 16
  for k, v in fields.items():
    c[k] = v
  return c, plan.resolve(c, num_train=1000, num_classes=10)


def _measured(backend="cpu", step_s=(0.5, 1.0)):
  return {
    "backend": backend,
    "host_cores": 2,
    "device_kind": "test",
    "num_devices": 1,
    "steps": 3,
    "warmup": 1,
    "init_s": 3.0,
    "stages": [
      {"compile_s": 10.0, "peak_bytes": 1, "step_s": step_s[0]},
      {"compile_s": 20.0, "peak_bytes": 1, "step_s": step_s[1]},
    ],
    "eval": {"compile_s": 4.0, "peak_bytes": 1, "step_s": 0.25},
  }


def test_prediction_is_compiles_plus_steps_plus_evals():
  # Two stages of 50 steps; 95 eval images = 10 batches of 10 = 2.5 s a pass.
  c, run = _two_stage_config(compile_ahead=False, eval_every_stage=True)
  r = plan_probe.predict(c, run, _measured(), num_eval=95)
  s0, s1 = r["stages"]
  # Stage 0: its compile, 50 x 0.5 s, the stage-end eval and the eval step's compile before it.
  assert (s0["compile_paid_s"], s0["train_s"], s0["eval_s"]) == (10.0, 25.0, 2.5)
  assert s0["eval_compile_paid_s"] == 4.0 and s0["predicted_s"] == 41.5
  assert s1["predicted_s"] == 20.0 + 50.0 and s1["stage_end_evals"] == 0  # the last: final eval
  assert r["final_eval_s"] == 2.5
  assert r["predicted_run_s"] == 41.5 + 70.0 + 2.5
  assert r["predicted_total_s"] == 3.0 + 41.5 + 70.0 + 2.5
  assert s0["images_per_s"] == 8 / 0.5 and s1["lr"] == pytest.approx(optim.base_learning_rate(c))


def test_curve_evals_by_steps_count_the_multiples_in_each_stage():
  c, run = _two_stage_config(
    compile_ahead=False, eval_every_stage=False, eval_every_steps=20, eval_subset=30
  )
  r = plan_probe.predict(c, run, _measured(), num_eval=95)
  s0, s1 = r["stages"]
  assert (s0["curve_evals"], s1["curve_evals"]) == (2, 3)  # steps 20, 40 | 60, 80, 100
  assert r["eval"]["curve_batches_per_pass"] == 3
  assert s0["eval_s"] == 2 * 0.75 and s0["eval_compile_paid_s"] == 4.0
  assert s1["eval_s"] == 3 * 0.75 and r["final_eval_s"] == 2.5  # compile already paid


def test_compile_ahead_on_an_accelerator_hides_what_the_previous_stage_outlasts():
  c, run = _two_stage_config(compile_ahead=True, eval_every_stage=True)
  # The compile thread: eval step ready at 10 + 4 = 14, stage 1 at 14 + 20 = 34.
  r = plan_probe.predict(c, run, _measured("gpu"), num_eval=95)
  s0, s1 = r["stages"]
  assert s0["compile_paid_s"] == 10.0 and s0["eval_compile_paid_s"] == 0.0  # ready at 14 < 35
  assert s1["compile_paid_s"] == 0.0  # stage 1 starts at 37.5 > 34
  assert r["predicted_total_s"] == 3.0 + (10 + 25 + 2.5) + 50 + 2.5
  # A short stage 0 (50 x 0.1 s) ends at 15: stage 1 waits for the 34 - 17.5 s left.
  r = plan_probe.predict(c, run, _measured("gpu", step_s=(0.1, 1.0)), num_eval=95)
  assert r["stages"][1]["compile_paid_s"] == pytest.approx(16.5)
  assert r["stages"][0]["predicted_s"] == pytest.approx(10 + 5 + 2.5)


def test_compile_ahead_on_a_cpu_also_slows_the_stage_it_overlaps_by_a_cores_share():
  c, run = _two_stage_config(compile_ahead=True, eval_every_stage=True)
  r = plan_probe.predict(c, run, _measured("cpu"), num_eval=95)
  s0, s1 = r["stages"]
  # Stage 0 queued the eval step (4 s) and stage 1 (20 s): one of the 2 cores for 24 s.
  assert s0["compile_sharing_s"] == 12.0 and s0["predicted_s"] == 10 + 25 + 12 + 2.5
  assert s1["compile_paid_s"] == 0.0 and s1["compile_sharing_s"] == 0.0  # nothing left to queue
  assert r["predicted_total_s"] == 3.0 + 49.5 + 50 + 2.5
  assert r["compile_core_share"] == 0.5


def test_plan_mode_without_the_probe_compiles_nothing_and_needs_no_device(
  monkeypatch, tmp_path, capsys
):
  from jax._src import compiler, xla_bridge

  def refuse(*args, **kwargs):
    raise AssertionError("plan mode touched a JAX backend or compiled")

  monkeypatch.setattr(compiler, "compile_or_get_cached", refuse)
  monkeypatch.setattr(xla_bridge, "backends", refuse)
  monkeypatch.setattr(jax, "devices", refuse)
  c = imagenet.get_config("variant=s")
  wd = tmp_path / "wd"
  assert main_lib.run(c, str(wd), "plan") == 0
  out = capsys.readouterr().out
  assert "| batch | lr |" in out and "| 80502-107336 | 4096 |" in out
  assert not wd.exists()  # plain plan mode writes nothing


@pytest.mark.parametrize(
  "mode, workdir, steps, message",
  [
    ("train", "wd", 3, "error: --plan_probe: is only used by --mode=plan"),
    ("eval", "wd", 3, "error: --plan_probe: is only used by --mode=plan"),
    ("plan", None, 3, "error: --workdir: is required with --plan_probe"),
    ("plan", "wd", 0, "error: --plan_probe_steps: must be an integer >= 1"),
  ],
)
def test_probe_flag_errors_name_the_flag(tmp_path, capsys, mode, workdir, steps, message):
  c = imagenet.get_config("variant=s")
  wd = str(tmp_path / workdir) if workdir else None
  with pytest.raises(SystemExit) as e:
    main_lib.run(c, wd, mode, plan_probe=True, plan_probe_steps=steps)
  assert e.value.code == 2
  assert capsys.readouterr().err.startswith(message)
  assert not (tmp_path / "wd").exists()

"""The training loop end to end on a tiny two-stage config and a tiny image-folder dataset.

The runs use a one-device mesh (conftest forces 8 CPU devices; 1-vs-8-device numerics are pinned in
test_sharding.py, and the multi-device loop in test_multihost.py): XLA:CPU's emulated devices run
collectives on a shared thread pool that can deadlock on a 2-core machine when a collective program
comes from the persistent cache, see the report in the commit log.

One uninterrupted run (module fixture) is the reference: it must write TensorBoard events,
checkpoints and a complete results.json, compile the train step exactly once per stage, and a run
stopped mid-stage and again just past the stage boundary must end with bitwise-equal params.
All runs share one persistent compilation cache, so only the first pays for compiling, and all
compile with most XLA optimizations off (tests/_train_fixtures.py).
"""

import glob
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from effnetv2_jax import checkpoint as ckpt_lib
from effnetv2_jax import main as main_lib
from effnetv2_jax import reporting
from effnetv2_jax import sharding
from effnetv2_jax import train
from effnetv2_jax import workdir as workdir_lib

import _train_fixtures as fx

STEPS = 8  # two stages of 4 steps: 16px then 24px
ONE = jax.devices()[:1]


@pytest.fixture(scope="module", autouse=True)
def _trainer_settings():
  """Every run here compiles unoptimized (compiling, not running, is what these tiny runs cost;
  the references of the comparisons below are computed in this module too, in the same mode), and
  the persistent cache the runs turn on is off again for later modules (emulated-device collective
  programs loaded from it can deadlock, see above)."""
  with fx.restored_compilation_cache(), fx.unoptimized_xla():
    yield


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  base = tmp_path_factory.mktemp("train")
  data = fx.make_folder_dataset(str(base / "data"))
  return {"base": base, "data": data, "cache": fx.CACHE_DIR}


def _config(env, **kw):
  kw.setdefault("cache", env["cache"])
  return fx.tiny_config(env["data"], steps=STEPS, **kw)


class _CompileCounter(logging.Handler):
  def __init__(self):
    super().__init__()
    self.names = []

  def emit(self, record):
    msg = record.getMessage()
    if msg.startswith("Compiling jit("):
      self.names.append(msg[len("Compiling jit(") : msg.index(")")])


@pytest.fixture(scope="module")
def reference(env):
  """An uninterrupted run; returns (workdir, results, names of compiled jit functions)."""
  wd = str(env["base"] / "reference")
  counter = _CompileCounter()
  logger = logging.getLogger("jax._src.interpreters.pxla")
  logger.addHandler(counter)
  # Globally, not `with jax.log_compiles()`: that is thread-local, and the next stage's step
  # compiles on the compile-ahead thread.
  before = jax.config.jax_log_compiles
  jax.config.update("jax_log_compiles", True)
  try:
    cfg = _config(env)
    cfg.compile_ahead = False  # every compile inside its own stage; the other runs compile ahead
    results = train.train_and_evaluate(cfg, wd, devices=ONE)
  finally:
    jax.config.update("jax_log_compiles", before)
    logger.removeHandler(counter)
  return wd, results, counter.names


def test_results_json_is_complete(reference):
  wd, results, _ = reference
  with open(os.path.join(wd, "results.json")) as f:
    on_disk = json.load(f)
  assert on_disk["params_checksum"] == results["params_checksum"]
  assert on_disk["final_eval"]["num_examples"] == 16  # every eval image exactly once
  assert 0.0 <= on_disk["final_eval"]["top1"] <= on_disk["final_eval"]["top5"] <= 1.0
  stages = on_disk["stages"]
  assert [s["image_size"] for s in stages] == [16, 24]
  assert [(s["first_step"], s["last_step"], s["steps"]) for s in stages] == [(0, 4, 4), (4, 8, 4)]
  assert [s["dropout_rate"] for s in stages] == [0.1, 0.2]  # paper preset schedules dropout
  assert [s["mixup_alpha"] for s in stages] == [0.0, 0.2]
  assert all(s["compile_s"] > 0 and s["wall_s"] >= s["compile_s"] for s in stages)
  assert "eval_top1" in stages[0]  # stage-end eval
  assert on_disk["total_wall_s"] > 0
  assert on_disk["config"]["model_name"] == "efficientnetv2-b0"
  assert not glob.glob(os.path.join(wd, "*.tmp*"))  # written atomically
  assert not os.path.exists(os.path.join(wd, ".lock"))  # released at the end


def test_results_record_each_stages_micro_batches_and_peak_memory(env, reference):
  """results.json says per stage how its batch was trained (config.grad_accum_steps) and the
  step's per-device peak from XLA's buffer assignment; a fixed k reaches every stage's step."""
  _, ref, _ = reference
  for s in ref["stages"]:
    assert (s["grad_accum_steps"], s["micro_batch"]) == (1, 8) and s["peak_bytes"] > 0
  cfg = _config(env)
  cfg.grad_accum_steps = 2
  accum = train.train_and_evaluate(cfg, str(env["base"] / "accum"), devices=ONE)
  assert accum["status"] == "completed"
  for s, r in zip(accum["stages"], ref["stages"]):
    assert (s["grad_accum_steps"], s["micro_batch"]) == (2, 4)
    assert 0 < s["peak_bytes"] < r["peak_bytes"]  # activations of 4 images at a time, not 8
  assert accum["params_checksum"] != ref["params_checksum"]  # BN over 4 images: another run


def test_a_stage_that_cannot_fit_is_one_line_and_exit_2(env, capsys):
  cfg = _config(env)
  cfg.grad_accum_steps, cfg.device_memory_bytes = 0, 1024  # 1 KiB per device: nothing fits
  with pytest.raises(SystemExit) as e:
    main_lib.run(cfg, str(env["base"] / "too_small"), "train")
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: stage 0 (16px) does not fit"), err
  assert "1 per device" in err[0] and "(1024 bytes)" in err[0]


def test_checksum_is_of_the_final_checkpointed_params(reference):
  wd, results, _ = reference
  ck = ckpt_lib.Checkpointer(wd, read_only=True)
  assert ck.latest_step() == STEPS
  assert ck.all_steps() == [6, 8]  # keep_checkpoints=2 (saves at 3, 4, 6, 8)
  assert ck.read_meta(STEPS)["stage"] == 1
  ck.close()
  raw, _, _ = ckpt_lib.load_variables(wd, step=STEPS, prefer_ema=False)
  assert reporting.params_checksum(raw) == results["params_checksum"]


def test_tensorboard_events_hold_train_and_eval_scalars(reference):
  wd, _, _ = reference
  events = glob.glob(os.path.join(wd, "events.out.tfevents.*"))
  assert events
  import tensorflow as tf  # only to read the event file back

  tags = set()
  for path in events:
    for e in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in e.summary.value)
  assert {
    "train/loss",
    "train/accuracy",
    "train/lr",
    "train/steps_per_sec",
    "eval/top1",
    "eval/top5",
  } <= tags


def test_train_step_compiles_exactly_once_per_stage(reference):
  _, _, compiled = reference
  assert compiled.count("train_step") == 2, compiled
  assert compiled.count("eval_step") == 1, compiled  # one evaluator for every stage end


def test_compile_ahead_changes_no_number_and_waits_less_than_it_compiles(env, reference):
  """The next stage's step compiles on a background thread (config.compile_ahead, the default):
  the same params bit for bit as compiling at the switch; each stage records the compile's own
  seconds and the seconds the loop waited for it, which are part of its wall time."""
  _, ref, _ = reference
  ahead = train.train_and_evaluate(_config(env), str(env["base"] / "ahead"), devices=ONE)
  assert ahead["params_checksum"] == ref["params_checksum"]
  assert ahead["final_eval"] == ref["final_eval"]
  for s in ahead["stages"]:
    assert s["compile_s"] > 0 and s["wall_s"] >= s["compile_wait_s"] >= 0
  assert all(s["compile_wait_s"] == pytest.approx(s["compile_s"], abs=0.5) for s in ref["stages"])


def test_a_background_compile_error_surfaces_at_the_switch_naming_the_stage(env, monkeypatch):
  from effnetv2_jax import compile_ahead

  real = train.make_stage_step

  def broken(config, run, stage, tx, lr_fn, **kw):
    if stage.index == 1:
      raise ValueError("no such op")
    return real(config, run, stage, tx, lr_fn, **kw)

  monkeypatch.setattr(train, "make_stage_step", broken)
  wd = str(env["base"] / "broken_compile")
  with pytest.raises(
    compile_ahead.StageCompileError,
    match=r"compiling stage 2/2 \(24px\) failed: "
    "ValueError: no such op",
  ):
    train.train_and_evaluate(_config(env), wd, devices=ONE)
  ck = ckpt_lib.Checkpointer(wd, read_only=True)
  assert ck.latest_step() == 4 and ck.read_meta(4)["stage"] == 0  # stage 1's end, nothing later
  ck.close()


def test_time_to_accuracy_curve_is_recorded_plotted_and_survives_a_restart(env, reference):
  """eval_every_steps=2: curve points at steps 2, 4, 6 and 8 (EMA weights, eval size), the train
  loss per log interval and WORKDIR/curves.png; a run stopped at step 5 and resumed has the same
  points (the same top-1 at each step) as an uninterrupted one, and training is unchanged."""
  from effnetv2_jax import curves

  _, ref, _ = reference
  runs = {}
  for name, stops in (("curve", ()), ("curve_resumed", (5,))):
    cfg = _config(env)
    cfg.eval_every_steps = 2
    wd = str(env["base"] / name)
    for stop in stops:
      assert train.train_and_evaluate(cfg, wd, stop_at_step=stop, devices=ONE)["step"] == stop
    runs[name] = train.train_and_evaluate(cfg, wd, devices=ONE)
    assert os.path.getsize(os.path.join(wd, curves.CURVES_PNG)) > 1000
  a, b = runs["curve"], runs["curve_resumed"]
  assert a["params_checksum"] == b["params_checksum"] == ref["params_checksum"]
  points = a["curve"]["points"]
  assert [p["step"] for p in points] == [2, 4, 6, 8]
  assert [p["images_seen"] for p in points] == [16, 32, 48, 64]
  assert [p["top1"] for p in points] == [p["top1"] for p in b["curve"]["points"]]
  assert points[-1]["top1"] == a["final_eval"]["top1"]
  assert all(p["eval_s"] > 0 for p in points)
  assert [p["wall_s"] for p in points] == sorted(p["wall_s"] for p in points)
  assert [e["step"] for e in a["train_curve"]] == [2, 4, 6, 8]  # log_every_steps=2
  assert curves.time_to(a, points[-1]["top1"]) <= points[-1]["wall_s"]


def test_interrupted_runs_resume_bitwise(env, reference):
  """Stop mid stage 1, again one step into stage 2, then finish: same params as no interruption."""
  _, ref, _ = reference
  wd = str(env["base"] / "interrupted")
  cfg = _config(env)
  first = train.train_and_evaluate(cfg, wd, stop_at_step=3, devices=ONE)
  assert first == {"status": "stopped", "step": 3}
  assert not os.path.exists(os.path.join(wd, "results.json"))
  assert train.train_and_evaluate(cfg, wd, stop_at_step=5, devices=ONE)["step"] == 5
  final = train.train_and_evaluate(cfg, wd, devices=ONE)
  assert final["status"] == "completed"
  assert final["params_checksum"] == ref["params_checksum"]
  assert final["final_eval"] == ref["final_eval"]
  # Per-stage bookkeeping survives the restarts: stage 1 compiled in two runs, stage 0 in one.
  assert final["stages"][0]["eval_top1"] == ref["stages"][0]["eval_top1"]


def test_eval_mode_reproduces_the_final_eval(env, reference):
  wd, ref, _ = reference
  cfg = _config(env)
  cfg.init_from = wd
  out = str(env["base"] / "eval_only")
  res = train.evaluate(cfg, out, devices=ONE)
  assert res["final_eval"] == ref["final_eval"]
  assert res["step"] == STEPS
  with open(os.path.join(out, "results.json")) as f:
    assert json.load(f)["final_eval"]["num_examples"] == 16
  # Evaluating the training workdir itself leaves its training results.json alone.
  cfg.init_from = ""
  train.evaluate(cfg, wd, devices=ONE)
  with open(os.path.join(wd, "results.json")) as f:
    assert "stages" in json.load(f)
  with open(os.path.join(wd, "eval_results.json")) as f:
    assert json.load(f)["final_eval"] == ref["final_eval"]


def test_init_from_keeps_the_body_and_reinitialises_another_head(env, reference, caplog):
  wd, _, _ = reference
  cfg = _config(env)
  cfg.init_from = wd
  cfg.num_classes = 5
  mesh = sharding.make_mesh(ONE)
  model = train.build_model(cfg, 5, 0.1)
  tx = train.optim.make_optimizer(cfg, 4, STEPS)
  with caplog.at_level(logging.INFO):
    st = train.init_state(cfg, model, tx, 16, mesh)
  assert "classifier.kernel" in caplog.text and "re-initialised" in caplog.text
  src_params, _, _ = ckpt_lib.load_variables(wd)  # EMA weights of the reference
  np.testing.assert_array_equal(
    st.params["stem"]["conv"]["kernel"], src_params["stem"]["conv"]["kernel"]
  )
  np.testing.assert_array_equal(
    st.ema_params["stem"]["conv"]["kernel"], src_params["stem"]["conv"]["kernel"]
  )
  assert st.params["classifier"]["kernel"].shape == (16, 5)
  assert int(st.step) == 0  # fine-tuning starts a new schedule


def test_divergence_stops_without_checkpointing_a_bad_state(env, monkeypatch, caplog):
  """NaN inputs from step 5 on: the guard skips the updates, the run stops after max_bad_steps
  naming the step, and no checkpoint is written after the last good step."""
  from effnetv2_jax.data import input_pipeline

  real = input_pipeline.train_iterator

  def poisoned(**kw):
    step = kw["start_example"] // kw["global_batch_size"]  # one process: positions are global
    for batch in real(**kw):
      if step >= 5:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      step += 1
      yield batch

  monkeypatch.setattr(input_pipeline, "train_iterator", poisoned)
  cfg = _config(env, ckpt_every=1)
  cfg.max_bad_steps = 2
  wd = str(env["base"] / "diverge")
  with pytest.raises(
    train.TrainingDivergedError, match="2 consecutive non-finite steps ending at step 7"
  ):
    train.train_and_evaluate(cfg, wd, devices=ONE)
  assert "step 6: non-finite loss or gradient, update skipped" in caplog.text
  ck = ckpt_lib.Checkpointer(wd, read_only=True)
  assert ck.all_steps() == [4, 5]  # step 6 (bad) is never saved, nor anything at the stop
  ck.close()
  assert not os.path.exists(os.path.join(wd, ".lock"))


def test_cli_exit_codes(env, monkeypatch, capsys):
  def diverge(*a, **k):
    raise train.TrainingDivergedError("training diverged: 10 consecutive non-finite steps")

  monkeypatch.setattr(train, "train_and_evaluate", diverge)
  with pytest.raises(SystemExit) as e:
    main_lib.run(_config(env), str(env["base"] / "cli"), "train")
  assert e.value.code == main_lib.EXIT_DIVERGED == 3
  assert capsys.readouterr().err == "error: training diverged: 10 consecutive non-finite steps\n"


def test_bad_config_fails_before_touching_the_workdir(env, capsys):
  cfg = _config(env)
  cfg.progressive.min_image_size = 64  # > max_image_size 24
  wd = str(env["base"] / "never_created")
  with pytest.raises(SystemExit) as e:
    main_lib.run(cfg, wd, "train")
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [
    "error: progressive.min_image_size: 64 is larger than progressive.max_image_size 24"
  ]
  assert not os.path.exists(wd)


def test_missing_dataset_is_one_line(env, capsys):
  cfg = _config(env)
  cfg.dataset = "cifar10"
  cfg.data_dir = str(env["base"] / "no_tfds_here")
  with pytest.raises(SystemExit) as e:
    main_lib.run(cfg, str(env["base"] / "no_data"), "train")
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "cifar10" in err[0]


def test_busy_workdir_is_refused_naming_the_holder(env, capsys):
  wd = str(env["base"] / "busy")
  with workdir_lib.WorkdirLock(wd):
    with pytest.raises(SystemExit) as e:
      main_lib.run(_config(env), wd, "train")
  assert e.value.code == 2
  assert f"pid {os.getpid()}" in capsys.readouterr().err


def test_checkpoint_of_another_model_is_named(env, reference, capsys, tmp_path):
  wd, _, _ = reference
  cfg = _config(env)
  cfg.num_classes = 7
  other = str(tmp_path / "wd")
  shutil.copytree(os.path.join(wd, "checkpoints"), os.path.join(other, "checkpoints"))
  with pytest.raises(SystemExit) as e:
    main_lib.run(cfg, other, "train")
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "params.classifier.kernel: checkpoint shape (16, 2) != model shape (16, 7)" in err
  assert "Traceback" not in err


def test_optimized_and_unoptimized_programs_never_share_a_cache_entry(tmp_path):
  """The trainer tests compile unoptimized into the same persistent cache (fx.CACHE_DIR) as runs
  that compile optimized; JAX must key the two apart, or one mode would load the other's
  programs."""
  from jax.experimental.compilation_cache import compilation_cache

  settings = {
    "jax_compilation_cache_dir": str(tmp_path),
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": -1,
  }
  before = {k: getattr(jax.config, k) for k in settings}

  def compile_and_list():
    jax.clear_caches()  # compile again, through the persistent cache
    jax.jit(lambda a: jax.numpy.sin(a) @ a.T)(np.ones((8, 8), np.float32)).block_until_ready()
    return set(os.listdir(tmp_path))

  for k, v in settings.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()
  try:
    unoptimized = compile_and_list()  # this module's mode
    again = compile_and_list()
    jax.config.update("jax_disable_most_optimizations", False)
    optimized = compile_and_list()
  finally:
    jax.config.update("jax_disable_most_optimizations", True)
    for k, v in before.items():
      jax.config.update(k, v)
    compilation_cache.reset_cache()
  assert unoptimized and again == unoptimized  # the same program in the same mode: a cache hit
  assert len(optimized - unoptimized) == 1  # the other mode: its own entry

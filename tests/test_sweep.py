"""The sweep runner: spec parsing, up-front rejection of bad overrides, skipping, the results table,
and one real two-trial sweep of the CLI on the tiny folder dataset."""

import csv
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from effnetv2_jax import sweep

import _train_fixtures as fx

DEMO = os.path.join(fx.REPO, "configs", "demo.py")


def test_grid_times_zip_gives_every_grid_point_with_each_zipped_row(tmp_path):
  spec = tmp_path / "s.yaml"
  spec.write_text(
    textwrap.dedent("""\
      grid: {lr_per_256: [0.008, 0.016], config.seed: [0, 1]}
      zip: {progressive.preset: [paper, none], eval_image_size: [16, 24]}
  """)
  )
  trials = sweep.load_spec(str(spec))
  assert len(trials) == 2 * 2 * 2
  # 'config.' is stripped; the zipped keys stay paired, never crossed with each other.
  assert all(
    set(t) == {"lr_per_256", "seed", "progressive.preset", "eval_image_size"} for t in trials
  )
  pairs = {(t["progressive.preset"], t["eval_image_size"]) for t in trials}
  assert pairs == {("paper", 16), ("none", 24)}
  assert len({tuple(sorted(t.items())) for t in trials}) == 8


def test_python_spec_with_helpers(tmp_path):
  spec = tmp_path / "s.py"
  spec.write_text(
    textwrap.dedent("""\
      from effnetv2_jax.sweep import cross, product, zipped
      def get_sweep():
        return cross(product(seed=[0, 1, 2]), zipped(batch_size=[8, 16], lr_per_256=[0.1, 0.2]))
  """)
  )
  trials = sweep.load_spec(str(spec))
  assert len(trials) == 6
  assert {(t["batch_size"], t["lr_per_256"]) for t in trials} == {(8, 0.1), (16, 0.2)}


def test_spec_errors_are_one_line():
  with pytest.raises(sweep.SweepError, match="different lengths"):
    sweep.zipped(a=[1, 2], b=[1])
  with pytest.raises(sweep.SweepError, match="set by two parts"):
    sweep.cross(sweep.product(seed=[0]), sweep.product(seed=[1]))
  with pytest.raises(sweep.SweepError, match="grid"):
    sweep.spec_from_yaml_text("trials: [1, 2]")


def test_unknown_field_is_rejected_before_anything_runs(tmp_path, capsys):
  spec = tmp_path / "bad.yaml"
  spec.write_text("grid: {seed: [0, 1], progressive.max_imge_size: [32]}\n")
  wd = tmp_path / "wd"
  code = sweep.main([f"--config={DEMO}:runlocal", f"--sweep={spec}", f"--workdir={wd}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == sweep.EXIT_BAD_INPUT
  assert len(err) == 1 and "progressive.max_imge_size" in err[0] and err[0].startswith("error:")
  assert not wd.exists()  # nothing was created, let alone run


def test_wrong_type_and_unknown_pass_through_are_rejected(tmp_path, capsys):
  spec = tmp_path / "s.yaml"
  spec.write_text("grid: {batch_size: [8, 0.5]}\n")
  code = sweep.main([f"--config={DEMO}:runlocal", f"--sweep={spec}", f"--workdir={tmp_path}"])
  assert code == 2 and "config.batch_size" in capsys.readouterr().err
  spec.write_text("grid: {seed: [0]}\n")
  code = sweep.main(
    [f"--config={DEMO}:runlocal", f"--sweep={spec}", f"--workdir={tmp_path}", "--config.nosuch=1"]
  )
  assert code == 2 and "nosuch" in capsys.readouterr().err


def test_names_are_readable_stable_and_distinct():
  a = sweep.trial_name({"lr_per_256": 0.008, "progressive.preset": "paper"})
  assert a == "lr_per_256=0.008,preset=paper"
  assert sweep.trial_name({"lr_per_256": 0.008, "progressive.preset": "paper"}) == a
  long = sweep.trial_name({"model_overrides.blocks": ["r1_k3_s1_e1_i24_o24_c1"] * 20})
  assert len(long) <= 120 and "/" not in long
  with pytest.raises(sweep.SweepError, match="same name"):
    sweep.trial_names([{"seed": 1}, {"seed": 1}])


def test_dry_run_skips_finished_trials_and_prints_the_rest(tmp_path, capsys):
  spec = tmp_path / "s.yaml"
  spec.write_text("grid: {seed: [0, 1, 2]}\n")
  done = tmp_path / "wd" / "seed=1"
  done.mkdir(parents=True)
  (done / "results.json").write_text("{}")
  code = sweep.main(
    [
      f"--config={DEMO}:runlocal",
      f"--sweep={spec}",
      f"--workdir={tmp_path / 'wd'}",
      "--dry_run",
      "--config.num_train_steps=2",
    ]
  )
  out = capsys.readouterr().out
  commands = [l for l in out.splitlines() if "effnetv2_jax.main" in l]
  assert code == 0 and len(commands) == 2
  assert "skip seed=1" in out and not any("seed=1" in c for c in commands)
  assert all("--config.num_train_steps=2" in c and "--config.seed=" in c for c in commands)


def test_table_gathers_each_results_json_and_marks_missing_ones(tmp_path):
  trials = [{"seed": 0, "lr_per_256": 0.1}, {"seed": 1, "lr_per_256": 0.2}, {"seed": 2}]
  names = sweep.trial_names(trials)
  for name, top1 in zip(names[:2], (0.5, 0.75)):
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(
      json.dumps(
        {
          "status": "completed",
          "step": 4,
          "total_wall_s": 12.34,
          "final_eval": {"top1": top1, "top5": 1.0},
        }
      )
    )
  header, rows = sweep.gather(str(tmp_path), trials, names, codes={names[2]: 3})
  md, cs = sweep.write_tables(str(tmp_path), header, rows, "t")
  with open(cs) as f:
    table = list(csv.DictReader(f))
  assert [r["top1"] for r in table] == ["0.5000", "0.7500", ""]
  assert table[2]["status"] == "failed (exit 3)" and table[2]["lr_per_256"] == ""
  assert table[1]["wall_s"] == "12.3" and table[0]["seed"] == "0"
  text = open(md).read()
  assert text.count("\n|") == 2 + 3  # header, separator, one row per trial
  assert f"| {names[1]} | 1 | 0.2 | completed | 4 | 0.7500 |" in text


@pytest.mark.slow
def test_real_2x2_sweep_end_to_end_then_rerun_skips(tmp_path):
  data = fx.make_folder_dataset(str(tmp_path / "data"), num_train=16, num_val=8)
  config = fx.write_config_file(
    str(tmp_path / "cfg.py"), data, steps=2, log_every=1, ckpt_every=2, cache=fx.CACHE_DIR
  )
  spec = tmp_path / "s.yaml"
  spec.write_text("grid: {seed: [0, 1], lr_per_256: [0.1, 0.2]}\n")
  wd = tmp_path / "wd"
  argv = [
    sys.executable,
    "-m",
    "effnetv2_jax.sweep",
    f"--config={config}",
    f"--sweep={spec}",
    f"--workdir={wd}",
    "--parallel=2",
    "--config.progressive.num_stages=1",
  ]
  t0 = time.time()
  proc = subprocess.run(
    argv,
    cwd=fx.REPO,
    env=fx.subprocess_env(num_devices=1, **fx.UNOPTIMIZED_ENV),
    capture_output=True,
    text=True,
    timeout=300,
  )
  first_s = time.time() - t0
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(wd / "sweep_results.csv") as f:
    table = list(csv.DictReader(f))
  assert [r["trial"] for r in table] == [
    "seed=0,lr_per_256=0.1",
    "seed=0,lr_per_256=0.2",
    "seed=1,lr_per_256=0.1",
    "seed=1,lr_per_256=0.2",
  ]
  assert all(r["status"] == "completed" and r["step"] == "2" and r["top1"] for r in table)
  for r in table:  # the overrides reached the trial's resolved config
    saved = json.loads((wd / r["trial"] / "results.json").read_text())["config"]
    assert (saved["seed"], saved["lr_per_256"]) == (int(r["seed"]), float(r["lr_per_256"]))
    assert saved["progressive"]["num_stages"] == 1
  again = subprocess.run(
    argv,
    cwd=fx.REPO,
    env=fx.subprocess_env(num_devices=1, **fx.UNOPTIMIZED_ENV),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert again.returncode == 0 and "4 already finished, 0 to run" in again.stdout
  print(f"2x2 sweep: {first_s:.1f} s")

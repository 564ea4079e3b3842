"""The GPU stage-switch check (experiments/bench_gpu_stages.py): its CPU dry run measures one row
per stage and the 128-px comparison without TensorFlow, and its report marks the targets from the
numbers (the GPU run itself is never part of the suite)."""

import json
import os
import subprocess
import sys

import pytest

from experiments import bench_gpu_stages as bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  """One dry run (tiny S-layout net, 32/40/48/56 px): one device, unoptimized compiles (the checks
  are on structure and signs, not on speed), stages cut after 0.5 s of training (a switch may
  then wait for the rest of its compile), nothing recorded."""
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "").split()
  env["XLA_FLAGS"] = " ".join(f for f in flags if "force_host_platform_device_count" not in f)
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"
  log_dir = str(tmp_path_factory.mktemp("stages_logs"))
  code = (
    "import json, sys; from experiments import bench_gpu_stages as b; "
    "rep, text = b.main(sys.argv[1:]); print('@@REPORT', json.dumps(rep))"
  )
  p = subprocess.run(
    [sys.executable, "-c", code, "--dry-run-cpu", "--log-dir", log_dir, "--budget-s", "120"]
    + ["--max-stage-s", "0.5"],
    check=False,
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=180,
  )
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
  line = [l for l in p.stdout.splitlines() if l.startswith("@@REPORT")][-1]
  return json.loads(line[len("@@REPORT") :]), p.stdout, log_dir


def test_dry_run_has_one_row_per_stage_with_non_negative_waits(dry_run):
  rep, text, _ = dry_run
  assert rep["done"] and rep["sizes"] == [32, 40, 48, 56]
  # 'pixels' from the last stage's batch 8: 8 * (56/s)^2 rounded down to a multiple of 4.
  assert rep["batches"] == [24, 12, 8, 8]
  rows = rep["stages"]
  assert [r["index"] for r in rows] == [0, 1, 2, 3]
  assert [(r["size"], r["batch"]) for r in rows] == list(zip(rep["sizes"], rep["batches"]))
  assert rows[0]["cold_in_front"] and not any(r["cold_in_front"] for r in rows[1:])
  for r in rows:
    assert r["compile_s"] > 0 and r["wait_s"] >= 0 and r["train_steps"] >= 2, r
    # Stages cut at --max-stage-s before the next compile was ready have no "alone" steps.
    assert (r.get("alone_step_s") or r["overlap_step_s"]) > 0, r
  for r in rows[1:]:
    assert r["first_step_s"] > 0 and r["wait_s"] <= r["compile_s"] + 1e-6, r
  table = [l for l in text.splitlines() if l.startswith("| ") and l[2].isdigit()]
  assert [l.split("|")[2].strip() for l in table] == ["32", "40", "48", "56"]
  assert "not reached" not in text


def test_dry_run_compares_both_batches_at_the_first_size_without_tensorflow(dry_run):
  rep, text, log_dir = dry_run
  ratio = rep["ratio"]
  assert (ratio["size"], ratio["constant_batch"], ratio["pixels_batch"]) == (32, 8, 24)
  assert ratio["constant_ips"] > 0 and ratio["pixels_ips"] > 0
  assert "ratio " in text and "(target: at least 1.3x)" in text
  assert rep["tensorflow_imported"] is False
  assert os.path.getsize(os.path.join(log_dir, "stages_worker.log")) > 0


def test_the_module_imports_no_tensorflow():
  code = "import sys, experiments.bench_gpu_stages; print('tensorflow' in sys.modules)"
  p = subprocess.run(
    [sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True
  )
  assert p.returncode == 0 and p.stdout.strip() == "False", p.stderr


def _row(i, size, batch, **kw):
  row = dict(index=i, size=size, batch=batch, compile_s=100.0, wait_s=0.0, first_step_s=0.3)
  row.update(peak_bytes=2**30, cold_in_front=i == 0, train_s=100.0, train_steps=40)
  row.update(overlap_step_s=0.2, alone_step_s=0.2)
  row.update(kw)
  return row


def test_report_marks_targets_from_the_numbers_and_unreached_stages():
  rep = dict(device="H200", num_devices=1, jax="x", init_s=78.0, cache=".gpu_cache", notes=[])
  rep.update(sizes=[128, 185, 242, 300], batches=[1024, 640, 384, 256])
  rep["ratio"] = dict(size=128, constant_batch=256, constant_ips=4000.0, pixels_batch=1024)
  rep["ratio"]["pixels_ips"] = 6000.0
  # Switch 1: 2 s left of the compile + a first step 12.2 s over a 0.2 s step (a recompile).
  rep["stages"] = [_row(0, 128, 1024), _row(1, 185, 640, wait_s=2.0, first_step_s=12.4)]
  text = bench.format_report(rep, title="t", cmd="c", wall_s=1.0)
  assert "ratio 1.50x (target: at least 1.3x): **met**" in text
  assert "14.20/n/a/n/a s (target: at most 10 s each): **missed**" in text
  assert text.count("not reached") == 2 and "not measured" in text
  rep["stages"][1]["first_step_s"] = 0.3
  rep["ratio"]["pixels_ips"] = 4400.0
  text = bench.format_report(rep, title="t", cmd="c", wall_s=1.0)
  assert "ratio 1.10x (target: at least 1.3x): **missed**" in text
  assert "2.10/n/a/n/a s (target: at most 10 s each): **met**" in text
  empty = bench.format_report(None, title="t", cmd="c", wall_s=1.0, failed="worker exit 1")
  assert "128-px comparison: not reached" in empty and "worker exit 1" in empty

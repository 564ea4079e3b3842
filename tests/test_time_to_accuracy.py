"""experiments/time_to_accuracy.py without training: the arm table expands to the intended
schedules and regularization, the budget sets the run length, and the report's target, times,
speed-ups and seed aggregation are the stated arithmetic (on synthetic results dicts)."""

import dataclasses
import json
import math
import os

import pytest

from effnetv2_jax import plan
from experiments import time_to_accuracy as tta
from experiments import time_to_accuracy_report as rep


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tta"))
  return tta.plan_runs(["v2", "resnet"], tta.ARMS, "short", [0, 1], root)


def _arms(*keys):
  by_key = {a.key: a for a in tta.ARMS}
  return [by_key[k] for k in keys]


def _by(planned, network, key, seed=0):
  (p,) = [p for p in planned if p.network == network and p.arm.key == key and p.seed == seed]
  return p


def test_every_network_gets_every_arm_and_seed_once_with_the_budgets_curve_settings(short_runs):
  assert len(short_runs) == 2 * len(tta.ARMS) * 2
  assert len({p.run.workdir for p in short_runs}) == len(short_runs)
  for p in short_runs:
    c = p.config
    assert c.seed == p.seed and c.eval_subset == 2000 and not c.eval_every_stage
    assert c.eval_every_seconds == 40.0  # 600 s / 15 points
  # One run length per network for every equal-epochs arm: they differ only in the schedule; an
  # arm with an epochs_scale trains that multiple of it.
  for net in ("v2", "resnet"):
    mine = [p for p in short_runs if p.network == net]
    (length,) = {p.config.num_epochs for p in mine if p.arm.epochs_scale == 1.0}
    for p in mine:
      assert p.config.num_epochs == pytest.approx(length * p.arm.epochs_scale, abs=0.01)
  assert _by(short_runs, "v2", "prog-light-eqtime").config.num_epochs > length
  # The ResNet is the ablation's network with its recorded learning rate and EMA.
  r = _by(short_runs, "resnet", "fixed-demo").config
  assert r.model_name == "resnet50" and r.lr_per_256 == 0.016 and r.ema_decay == 0.999


def test_seeds_of_an_arm_share_a_config_digest_and_an_edited_arm_gets_a_new_one(short_runs):
  a, b = _by(short_runs, "v2", "prog-paper", 0), _by(short_runs, "v2", "prog-paper", 1)
  digest = lambda p: p.run.name.rsplit("-", 1)[1]
  assert digest(a) == digest(b) and a.run.name != b.run.name
  assert digest(a) != digest(_by(short_runs, "v2", "prog-const", 0))


def test_fixed_arms_train_one_stage_at_28px_with_their_levels_regularization(short_runs):
  for level, reg in tta.REG_LEVELS.items():
    p = _by(short_runs, "v2", f"fixed-{level}")
    (stage,) = plan.resolve(p.config).stages
    assert stage.image_size == 28 and p.arm.fixed
    assert (stage.randaug_magnitude, stage.mixup_alpha, stage.dropout_rate) == (
      reg["randaug"],
      reg["mixup"],
      reg["dropout"],
    )


def test_progressive_arms_grow_the_size_and_constant_vs_adaptive_differ_only_in_reg(short_runs):
  const = plan.resolve(_by(short_runs, "v2", "prog-const").config).stages
  paper = plan.resolve(_by(short_runs, "v2", "prog-paper").config).stages
  sizes = [s.image_size for s in paper]
  assert sizes == [s.image_size for s in const] and sizes[0] == 20 and sizes[-1] == 28
  assert [s.num_steps for s in const] == [s.num_steps for s in paper]
  demo = tta.REG_LEVELS["demo"]
  assert {(s.randaug_magnitude, s.dropout_rate) for s in const} == {
    (demo["randaug"], demo["dropout"])
  }
  assert (paper[0].randaug_magnitude, paper[0].dropout_rate) == (0.0, 0.0)
  assert (paper[-1].randaug_magnitude, paper[-1].dropout_rate) == (demo["randaug"], demo["dropout"])


def test_the_winning_level_arms_regularize_up_to_light_or_not_at_all(short_runs):
  light = tta.REG_LEVELS["light"]
  none = plan.resolve(_by(short_runs, "v2", "prog-none").config).stages
  assert {(s.randaug_magnitude, s.dropout_rate) for s in none} == {(0.0, 0.0)}
  const = plan.resolve(_by(short_runs, "v2", "prog-const-light").config).stages
  assert {(s.randaug_magnitude, s.dropout_rate) for s in const} == {
    (light["randaug"], light["dropout"])
  }
  for key in ("prog-light", "prog-light-eqtime", "hold-ramp-light"):
    stages = plan.resolve(_by(short_runs, "v2", key).config).stages
    assert (stages[0].randaug_magnitude, stages[0].dropout_rate) == (0.0, 0.0)
    assert (stages[-1].randaug_magnitude, stages[-1].dropout_rate) == (
      light["randaug"],
      light["dropout"],
    )


def test_the_demo_schedule_arm_is_three_stages_at_sizes_that_tile_by_four(short_runs):
  stages = plan.resolve(_by(short_runs, "v2", "demo-3stage").config).stages
  assert [s.image_size for s in stages] == [20, 24, 28]
  assert [s.randaug_magnitude for s in stages] == [0.0, 0.5, 1.0]
  assert {s.dropout_rate for s in stages} == {0.0}


def test_hold_then_ramp_holds_20px_for_half_and_keeps_28px_for_the_last_fifth(short_runs):
  p = _by(short_runs, "v2", "hold-ramp")
  run = plan.resolve(p.config)
  first, last = run.stages[0], run.stages[-1]
  assert (first.image_size, last.image_size, len(run.stages)) == (20, 28, 4)
  assert first.num_steps == pytest.approx(0.5 * run.total_steps, abs=1)
  assert last.num_steps == pytest.approx(0.2 * run.total_steps, abs=1)
  assert first.randaug_magnitude == 0.0 and last.randaug_magnitude == 4.0
  command = p.post_eval_command()
  assert command[-2:] == ["--mode=eval", "--eval_sizes=28,32"]
  assert "--config.recalibrate_bn=5000" in command
  assert _by(short_runs, "v2", "prog-paper").post_eval_command() is None


def test_the_budget_sets_epochs_from_the_fixed_arms_speed_less_startup_and_evals():
  net = tta.Network("c", {}, train_img_s=100.0, eval_img_s=1000.0, smoke_config="c")
  budget = tta.Budget(600.0, (0,), points=10, eval_subset=2000)
  # 600 - 30 start-up - (10 x 2000 + 10000) / 1000 eval = 540 s x 100 img/s / 60000 = 0.9
  assert tta.epochs_for(net, budget, 60000, 10000) == 0.9
  assert tta.epochs_for(net, budget, 60000, 10000, img_s=200.0) == 1.8
  long = dataclasses.replace(budget, seconds=1800.0)
  assert tta.epochs_for(net, long, 60000, 10000) == 2.9
  with pytest.raises(ValueError, match="no time to train"):
    tta.epochs_for(net, dataclasses.replace(budget, seconds=50.0), 60000, 10000)


def test_epochs_given_on_the_command_line_replace_the_derived_length(tmp_path):
  (p,) = tta.plan_runs(["v2"], _arms("fixed-none"), "long", [0], str(tmp_path), epochs={"v2": 7.5})
  assert p.config.num_epochs == 7.5 and p.config.eval_every_seconds == 120.0
  assert p.predicted_s > 1800.0  # the budget plus the fixed arm's BN-recalibrated eval


# --- the report ------------------------------------------------------------------------------


def _res(points, final, wall=None, stages=None):
  """A results.json with curve points [(wall_s, top1)], the final eval `final`."""
  pts = [{"wall_s": w, "top1": t, "eval_s": 1.0, "step": i + 1} for i, (w, t) in enumerate(points)]
  return {
    "final_eval": {"top1": final},
    "total_wall_s": wall if wall is not None else points[-1][0] + 5.0,
    "curve": {"points": pts, "eval_s_total": float(len(pts))},
    "stages": stages or [{"image_size": 28, "wall_s": 100.0, "compile_s": 2.0, "steps": 10}],
    "config": {"batch_size": 10},
  }


ARMS = (
  tta.Arm("fa", "fixed a", tta.FIXED, "none", fixed=True),
  tta.Arm("fb", "fixed b", tta.FIXED, "demo", fixed=True),
  tta.Arm("const", "const", tta.PAPER, "demo"),
  tta.Arm("adapt", "adapt", tta.PAPER, "demo", "none"),
)


def _summary():
  results = {
    "fa": {0: _res([(100, 0.80), (400, 0.85)], 0.85), 1: _res([(100, 0.80), (400, 0.87)], 0.87)},
    # The best fixed arm: mean final 0.90 is the target; its runs end at 380 and 420 s.
    "fb": {0: _res([(100, 0.80), (380, 0.89)], 0.89), 1: _res([(100, 0.80), (420, 0.91)], 0.91)},
    # Never reaches 0.90 on seed 1; reaches 99% (0.891) on both.
    "const": {
      0: _res([(100, 0.85), (300, 0.90)], 0.90),
      1: _res([(100, 0.85), (300, 0.895)], 0.895),
    },
    # Crosses 0.90 at 150 s (0.88 -> 0.92 between 100 and 200 s) and at 200 s.
    "adapt": {0: _res([(100, 0.88), (200, 0.92)], 0.92), 1: _res([(100, 0.86), (200, 0.90)], 0.90)},
  }
  return rep.summarize(ARMS, results), results


def test_mean_std_is_the_sample_deviation_and_ignores_missing_values():
  assert rep.mean_std([0.89, 0.91]) == (pytest.approx(0.90), pytest.approx(math.sqrt(2e-4)))
  assert rep.mean_std([0.5, None]) == (0.5, 0.0)
  assert rep.mean_std([None]) == (None, None)


def test_the_target_is_the_best_fixed_arms_mean_final_top1_reached_at_its_mean_end():
  s, _ = _summary()
  assert s["reference"] == "fb" and s["target"] == pytest.approx(0.90)
  assert s["ref_times"][1.0] == pytest.approx(400.0)
  # 99% of 0.90 = 0.891: seed 0 ends at 0.89 and never gets there, so the reference's time is
  # seed 1's alone, 100 + 320 * 0.091 / 0.11 s (leaving a seed out favours the baseline).
  assert s["ref_times"][0.99] == pytest.approx(100 + 320 * 0.091 / 0.11)


def test_time_to_target_and_speed_up_are_per_seed_means_over_the_reference():
  s, _ = _summary()
  rows = {r["key"]: r for r in s["rows"]}
  adapt = rows["adapt"]
  assert adapt["reach"][1.0] == [pytest.approx(150.0), pytest.approx(200.0)]
  assert adapt["time_to"][1.0] == pytest.approx(175.0)
  assert adapt["speedup"][1.0] == pytest.approx(400.0 / 175.0)
  assert adapt["end_speedup"] == pytest.approx(2.0)
  assert adapt["top1"] == (pytest.approx(0.91), pytest.approx(math.sqrt(2e-4)))
  # A seed that never reaches the target: no mean time, no speed-up, but 99% is reached.
  const = rows["const"]
  assert const["reach"][1.0][1] is None and const["time_to"][1.0] is None
  assert const["speedup"][1.0] is None and const["time_to"][0.99] is not None
  assert rows["fb"]["speedup"][1.0] == pytest.approx(1.0)


def test_top1_at_equal_time_is_each_runs_last_point_by_the_earliest_mean_end():
  s, _ = _summary()
  assert s["equal_time"] == pytest.approx(200.0)  # the adaptive arm's runs end first
  rows = {r["key"]: r for r in s["rows"]}
  assert rows["fb"]["top1_equal_time"][0] == pytest.approx(0.80)  # only its 100 s point by then
  assert rows["adapt"]["top1_equal_time"][0] == pytest.approx(0.91)


def test_the_answer_and_table_state_the_measured_verdict(tmp_path):
  s, results = _summary()
  lines = rep.answer(s, ARMS)
  assert "0.9000" in lines[0] and "fixed b" in lines[0]
  assert "2.29x" in lines[1] and "meets" in lines[1]
  assert "adaptive beats constant" in lines[2] and "+1.25 points" in lines[2]
  rows = rep.table_rows(s, {"adapt": {"other_cores": 0.03, "post_eval": {32: 0.93}}})
  assert len(rows) == len(ARMS) and all(len(r) == len(rep.TABLE_HEADER) for r in rows)
  adapt = rows[3]
  assert adapt[8] == "2.29x" and adapt[-2] == "0.03" and adapt[-1] == "32px 0.9300"
  assert rows[1][0].endswith("(reference)") and rows[2][7].startswith("1/2 seeds")
  png = rep.plot(str(tmp_path / "p.png"), "t", ARMS, results, s)
  assert png and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_adaptive_is_compared_only_with_the_constant_arm_at_its_final_level_and_length():
  s, _ = _summary()
  # The same schedule held at another level, or the same level at another length, is no twin.
  others = (
    tta.Arm("const", "const", tta.PAPER, "light"),
    tta.Arm("const", "const", tta.PAPER, "demo", epochs_scale=1.15),
  )
  for const in others:
    arms = (*ARMS[:2], const, ARMS[3])
    assert not any(l.startswith("Adaptive vs constant") for l in rep.answer(s, arms))
  assert any(l.startswith("Adaptive vs constant") for l in rep.answer(s, ARMS))


def test_without_a_finished_fixed_arm_there_is_no_target():
  s = rep.summarize(ARMS, {"adapt": {0: _res([(100, 0.9)], 0.9)}, "fa": {0: None}})
  assert s["target"] is None and rep.answer(s, ARMS)[0].startswith("No fixed arm")
  assert rep.table_rows(s)[0][1].startswith("none done")


def test_the_idle_statement_names_the_runs_that_shared_the_machine():
  assert tta.idle_statement({"a": 0.02, "b": 0.05}).startswith("Machine idle: yes")
  busy = tta.idle_statement({"a": 0.02, "b": 1.3, "c": None})
  assert "NO" in busy and ": b;" in busy and "not measured for c" in busy
  assert tta.other_cores(10.0, 1.0, 30.0, 11.0, 20.0) == pytest.approx(0.5)
  assert tta.other_cores(None, 0.0, 1.0, 0.0, 1.0) is None


def test_the_machine_record_feeds_the_report(tmp_path):
  (p,) = tta.plan_runs(["v2"], _arms("fixed-demo"), "short", [0], str(tmp_path))
  os.makedirs(p.run.workdir)
  with open(os.path.join(p.run.workdir, "results.json"), "w") as f:
    json.dump(_res([(100, 0.8), (500, 0.9)], 0.9), f)
  with open(os.path.join(p.run.workdir, tta.MACHINE_NAME), "w") as f:
    json.dump({"other_cores": 0.4}, f)
  with open(os.path.join(p.run.workdir, tta.EVAL_RESULTS_NAME), "w") as f:
    json.dump({"evals": [{"image_size": 28, "top1": 0.905}, {"image_size": 32, "top1": 0.91}]}, f)
  text, loads = tta.network_block("v2", "short", [p], str(tmp_path))
  assert loads == {p.run.name: 0.4}
  assert "28px 0.9050, 32px 0.9100" in text and "| 0.40 |" in text
  assert (tmp_path / "time_to_accuracy_v2_short.png").exists()


def test_the_dry_run_counts_finished_runs_as_done_and_sums_the_predicted_hours(tmp_path):
  planned = tta.plan_runs(["v2"], _arms("prog-const", "prog-paper"), "short", [0, 1], str(tmp_path))
  os.makedirs(planned[0].run.workdir)
  with open(os.path.join(planned[0].run.workdir, "results.json"), "w") as f:
    json.dump({"status": "completed"}, f)
  text = tta.dry_run(planned)
  assert text.count("[done]") == 1 and "4 runs, 3 still to train" in text
  # Two progressive arms without post-evals: every run is counted at the 600 s budget.
  assert "predicted 0.7 h in all, 0.5 h left" in text
